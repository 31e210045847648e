"""SFT at toy size: gradient accumulation equals the big batch (the loss is a mean over the step's assistant
tokens), and a killed-then-resumed run equals the uninterrupted one bit for bit (fp32)."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from palmchat import checkpoint
from palmchat.train.pretrain import PretrainArgs
from palmchat.train.pretrain import main as pretrain
from palmchat.train.sft import SFTArgs
from palmchat.train.sft import main as sft
from palmchat.utils.jsonl import read_jsonl
from palmchat.world.synthetic import write_bundle

SIZES = dict(pretrain=200, sft=72, rankings=5, pairs=5, prompts_train=4, prompts_heldout=4, moderation=5)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    data = root / "data"
    write_bundle(data, seed=0, sizes=SIZES)
    pt = pretrain(PretrainArgs(out=str(root / "pt"), data=[str(data / "pretrain.txt")], preset="tiny", vocab_size=320,
                               seq_len=64, batch_size=4, max_steps=4, eval_every=4, save_every=4, dtype="fp32"))
    return dict(root=root, data=data, pt=pt)


def run(base, out, **kw):
    # 72 conversations: 4 held out, 68 to train on, 4 steps of 16 (a full epoch's remainder is dropped)
    args = dict(base=str(base["pt"]), data=[str(base["data"] / "sft.jsonl")], out=str(out), epochs=1, batch_size=16,
                lr=1e-3, warmup_steps=1, dtype="fp32", save_every=0)
    args.update(kw)
    return sft(SFTArgs(**args))


def weights(out):
    return load_file(checkpoint.resolve(out) / "model.safetensors")


def test_gradient_accumulation_equals_the_big_batch(base, tmp_path):
    a = weights(run(base, tmp_path / "big"))
    b = weights(run(base, tmp_path / "accum", batch_size=4, grad_accum=4, gradient_checkpointing=True))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)  # vs ~1e-3 per step
    rows = [r for r in read_jsonl(tmp_path / "big" / "metrics.jsonl") if "loss" in r]
    accumulated = [r for r in read_jsonl(tmp_path / "accum" / "metrics.jsonl") if "loss" in r]
    assert [r["loss"] for r in accumulated] == pytest.approx([r["loss"] for r in rows], abs=1e-5)


def test_a_killed_sft_run_resumed_equals_the_uninterrupted_run(base, tmp_path, capsys):
    full = run(base, tmp_path / "full", save_every=2)  # states at steps 2 and 4
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "full", crashed)
    shutil.rmtree(crashed / full.name)  # the crash: right after the step-2 state
    (crashed / "latest").unlink()
    shutil.rmtree(crashed / "resume" / "step-000004")
    (crashed / "resume" / "latest").write_text("step-000002\n")
    capsys.readouterr()
    resumed = run(base, crashed, save_every=2, resume=True)
    assert "sft: resuming at step 2 of 4" in capsys.readouterr().out  # two steps left, not a new run
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[name], b[name]) for name in a)  # bit for bit
    assert read_jsonl(crashed / "metrics.jsonl") == read_jsonl(tmp_path / "full" / "metrics.jsonl")
