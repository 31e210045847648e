"""Checkpoints on disk: native run folders (native.py) and the reward/value models' scalar heads (heads.py)."""

from palmchat.checkpoint.native import (
    ADAPTER_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    TOKENIZER_KEY,
    CheckpointError,
    check_tokenizer,
    load_model,
    load_optimizer,
    load_tokenizer,
    load_weights,
    read_config,
    resolve,
    save_checkpoint,
    tokenizer_hash,
    tokenizer_identity,
)

__all__ = ["ADAPTER_FILE", "MODEL_FILE", "TOKENIZER_FILE", "TOKENIZER_KEY", "CheckpointError", "check_tokenizer",
           "load_model", "load_optimizer", "load_tokenizer", "load_weights", "read_config", "resolve",
           "save_checkpoint", "tokenizer_hash", "tokenizer_identity"]
