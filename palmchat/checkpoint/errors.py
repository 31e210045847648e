"""The one error type of every checkpoint reader and writer (native folders, Hugging Face folders, GGUF files): a
ValueError whose message names the file and the field, which the command line prints as one line."""


class CheckpointError(ValueError):
    pass
