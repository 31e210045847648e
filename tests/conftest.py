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


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny SFT policy on the bundled world's data, for the RL stages' tests (one per test module that asks)."""
    from palmchat.train.pretrain import PretrainArgs
    from palmchat.train.pretrain import main as pretrain
    from palmchat.train.sft import SFTArgs
    from palmchat.train.sft import main as sft
    from palmchat.world.synthetic import write_bundle

    root = tmp_path_factory.mktemp("policy")
    data = root / "data"
    write_bundle(data, seed=0, sizes=dict(pretrain=300, sft=150, rankings=20, pairs=20, prompts_train=32,
                                          prompts_heldout=16, moderation=10))
    pt = pretrain(PretrainArgs(out=str(root / "pt"), data=[str(data / "pretrain.txt")], preset="tiny", vocab_size=320,
                               seq_len=128, batch_size=8, max_steps=20, eval_every=20, save_every=20, dtype="fp32"))
    ckpt = sft(SFTArgs(base=str(pt), data=[str(data / "sft.jsonl")], out=str(root / "sft"), epochs=1, batch_size=16,
                       lr=1e-3, dtype="fp32"))
    return dict(root=root, prompts=str(data / "prompts_train.jsonl"), ckpt=str(ckpt))
