"""Checkpoints on disk: native run folders (native.py) and the reward/value models' scalar heads (heads.py)."""

from palmchat.checkpoint.native import (
    ADAPTER_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    load_model,
    load_optimizer,
    load_tokenizer,
    load_weights,
    read_config,
    resolve,
    save_checkpoint,
)

__all__ = ["ADAPTER_FILE", "MODEL_FILE", "TOKENIZER_FILE", "CheckpointError", "load_model", "load_optimizer",
           "load_tokenizer", "load_weights", "read_config", "resolve", "save_checkpoint"]
