"""Checkpoints on disk: native run folders (native.py), the reward/value models' scalar heads (heads.py), Hugging
Face model folders in and out (hf.py) and GGUF files out (gguf_export.py)."""

from palmchat.checkpoint.native import (
    ADAPTER_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    TOKENIZER_KEY,
    CheckpointError,
    check_tokenizer,
    is_hf_model_folder,
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
           "is_hf_model_folder", "load_model", "load_optimizer", "load_tokenizer", "load_weights", "read_config",
           "resolve", "save_checkpoint", "tokenizer_hash", "tokenizer_identity"]
