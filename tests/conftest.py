import getpass
import os
import tempfile

import pytest
import torch

from palmchat.model.config import preset

# torch.compile's cache does not tell ATEN_CPU_CAPABILITY settings apart (torch 2.13): code compiled under one and
# loaded under another gave NaN or crashed. A run emulating another CPU (`make test`'s second pass) keeps its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_aten_{os.environ['ATEN_CPU_CAPABILITY'].lower()}")

# Tiny models: one thread is faster than two, and two threads spin badly when the other core is busy.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    return preset("tiny", vocab_size=97)
