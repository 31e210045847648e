import pytest
import torch

from palmchat.config import preset

# Tiny models: one thread is faster than two, and two threads spin badly when the other core is busy.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config():
    return preset("tiny", vocab_size=97)
