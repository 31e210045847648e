"""DPO at toy size, with checks that can fail: the first step's loss is ln 2 (the policy is its reference), the
held-out preference accuracy rises above chance, RPO only when asked, gradient accumulation equals the big batch,
and a killed-then-resumed run equals the uninterrupted one bit for bit (fp32)."""

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from palmchat import checkpoint
from palmchat.train.dpo import DPOArgs
from palmchat.train.dpo import main as dpo
from palmchat.train.pretrain import PretrainArgs
from palmchat.train.pretrain import main as pretrain
from palmchat.train.sft import SFTArgs
from palmchat.train.sft import main as sft
from palmchat.utils.jsonl import read_jsonl
from palmchat.world.synthetic import write_bundle

SIZES = dict(pretrain=300, sft=160, rankings=40, pairs=400, prompts_train=8, prompts_heldout=8, moderation=5)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny SFT checkpoint and the bundled world's files."""
    root = tmp_path_factory.mktemp("dpo")
    data = root / "data"
    write_bundle(data, seed=0, sizes=SIZES)
    pt = pretrain(PretrainArgs(out=str(root / "pt"), data=[str(data / "pretrain.txt")], preset="tiny", vocab_size=320,
                               seq_len=128, batch_size=8, max_steps=30, eval_every=30, save_every=30, dtype="fp32"))
    ckpt = sft(SFTArgs(base=str(pt), data=[str(data / "sft.jsonl")], out=str(root / "sft"), epochs=1, batch_size=16,
                       lr=1e-3, dtype="fp32", save_every=0))
    return dict(root=root, data=data, sft=ckpt)


def run(policy, name, data="rankings.jsonl", **kw):
    args = dict(base=str(policy["sft"]), data=[str(policy["data"] / data)], out=str(policy["root"] / name),
                epochs=1, batch_size=8, lr=1e-3, warmup_steps=2, val_fraction=0.2, dtype="fp32", save_every=0)
    args.update(kw)
    return dpo(DPOArgs(**args))


def test_plain_dpo_starts_at_ln2_and_its_held_out_accuracy_rises(policy, capsys):
    out = run(policy, "plain", data="pairs.jsonl")  # 320 pairs to train on, 80 held out
    rows = read_jsonl(policy["root"] / "plain" / "metrics.jsonl")
    first = next(r for r in rows if "loss" in r)
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    accuracy = [r["val_preference_accuracy"] for r in rows if "val_preference_accuracy" in r]
    assert accuracy[0] == 0.5  # every held-out pair a tie at step 0
    assert accuracy[-1] > 0.6, accuracy  # 0.71 measured
    config = checkpoint.read_config(out)
    assert config["method"] == "dpo" and config["train"]["rpo_alpha"] == 0.0
    assert "dpo done" in capsys.readouterr().out


def test_rpo_is_an_option_and_named(policy, capsys):
    out = run(policy, "rpo", rpo_alpha=1.0, epochs=0.5)
    assert checkpoint.read_config(out)["method"] == "rpo"
    first = next(r for r in read_jsonl(policy["root"] / "rpo" / "metrics.jsonl") if "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2) + first["best_nll"], abs=1e-5)
    assert "rpo done" in capsys.readouterr().out


def weights(out):
    return load_file(checkpoint.resolve(out) / "model.safetensors")


def test_gradient_accumulation_equals_the_big_batch(policy):
    big = run(policy, "big", batch_size=8)  # 32 rankings to train on: 4 steps of 8
    accumulated = run(policy, "accum", batch_size=4, grad_accum=2, gradient_checkpointing=True)
    a, b = weights(big), weights(accumulated)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)  # vs ~1e-3 per step
    assert any(not torch.equal(a[name], weights(policy["sft"])[name]) for name in a)  # it trained


def test_a_killed_dpo_run_resumed_equals_the_uninterrupted_run(policy, tmp_path, capsys):
    full = run(policy, "full", save_every=2)  # 4 steps: states at 2 and 4
    crashed = tmp_path / "crashed"
    shutil.copytree(policy["root"] / "full", crashed)
    # the crash: right after the step-2 state; nothing after it was written
    shutil.rmtree(crashed / full.name)
    (crashed / "latest").unlink()
    shutil.rmtree(crashed / "resume" / "step-000004")
    (crashed / "resume" / "latest").write_text("step-000002\n")
    capsys.readouterr()
    resumed = run(policy, "unused", out=str(crashed), save_every=2, resume=True)
    assert "dpo: resuming at step 2 of 4" in capsys.readouterr().out  # two steps left, not a new run
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[name], b[name]) for name in a)  # bit for bit
    assert read_jsonl(crashed / "metrics.jsonl") == read_jsonl(policy["root"] / "full" / "metrics.jsonl")
    with pytest.raises(ValueError, match="no resumable state"):
        run(policy, "nothing", resume=True)
