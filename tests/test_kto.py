"""KTO: the loss against hand-computed numbers, the data it reads (TRL's unpaired format, the chat page's thumbs,
the bundled rankings), and a tiny run whose held-out desirable/undesirable margin rises; gradient accumulation
equals the big batch and a killed run resumed equals the uninterrupted one."""

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from palmchat import checkpoint
from palmchat.cli import main as cli
from palmchat.data.chat import Ranking, load_unpaired, unpaired_from_rankings
from palmchat.losses import kto_loss
from palmchat.train.kto import KTOArgs
from palmchat.train.kto import main as kto
from palmchat.train.pretrain import PretrainArgs
from palmchat.train.pretrain import main as pretrain
from palmchat.train.sft import SFTArgs
from palmchat.train.sft import main as sft
from palmchat.utils.jsonl import DataError, read_jsonl, write_jsonl
from palmchat.world.synthetic import write_bundle


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_kto_loss_by_hand():
    policy = torch.tensor([0.5, -0.2], requires_grad=True)
    ref = torch.tensor([0.0, 0.0])
    # mismatched pairs: KL estimate mean(0.3 - 0.1, 0.1 - 0.1) = 0.1
    loss, rewards, z = kto_loss(policy, ref, torch.tensor([True, False]), torch.tensor([0.3, 0.1]),
                                torch.tensor([0.1, 0.1]), beta=1.0, desirable_weight=1.0, undesirable_weight=2.0)
    desirable = 1 - sigmoid(0.5 - 0.1)  # 0.401312
    undesirable = 2 * (1 - sigmoid(0.1 - (-0.2)))  # 2 * 0.425557
    assert z.item() == pytest.approx(0.1, abs=1e-7)
    assert loss.item() == pytest.approx((desirable + undesirable) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.626213, abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.5, -0.2])
    loss.backward()
    # d/dr of lambda (1 - sigmoid(s)) with s = beta (r - z) for desirable, beta (z - r) for undesirable; mean over 2
    s_d, s_u = 0.4, 0.3
    assert policy.grad.tolist() == pytest.approx([-sigmoid(s_d) * (1 - sigmoid(s_d)) / 2,
                                                  2 * sigmoid(s_u) * (1 - sigmoid(s_u)) / 2], abs=1e-6)
    # a negative KL estimate is clamped to 0; beta scales r - z
    loss, _, z = kto_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([True]), torch.tensor([0.0]),
                          torch.tensor([0.5]), beta=0.1)
    assert z.item() == 0.0 and loss.item() == pytest.approx(1 - sigmoid(0.1), abs=1e-7)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(policy, ref, torch.tensor([True, False]), ref, ref, beta=0.0)


def test_unpaired_data_formats(tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "Hi", "completion": "Hello!", "label": True},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "completion": [{"role": "assistant", "content": "Go away."}], "label": False}])
    a, b = load_unpaired(path)
    assert (a.prompt_messages, a.completion, a.desirable) == ([{"role": "user", "content": "Hi"}], "Hello!", True)
    assert b.prompt_messages[0]["role"] == "system" and b.completion == "Go away." and not b.desirable
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Hi", "completion": "x", "label": 1}])
    with pytest.raises(DataError, match="bad.jsonl:1: .*label"):
        load_unpaired(bad)
    pairs = unpaired_from_rankings([Ranking([{"role": "user", "content": "q"}], ["best", "middle", "worst"])])
    assert [(x.completion, x.desirable) for x in pairs] == [("best", True), ("worst", False)]


def test_thumbs_export_as_unpaired_feedback(tmp_path):
    from palmchat.feedback.exchange import export_records
    from palmchat.store import Store

    store = Store(tmp_path / "db.sqlite")
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    for i, (reply, rating) in enumerate([("5.", 1), ("6.", -1), ("", -1)]):
        store.put_feedback({"id": f"fb{i}", "owner": "", "conversation_id": "c", "item_id": f"i{i}", "rating": rating,
                            "comment": "", "prompt": prompt, "reply": reply, "created_at": float(i)})
    records = export_records(store, "kto")
    store.close()
    assert records == [{"prompt": "What is 2 + 3?", "completion": "5.", "label": True},
                       {"prompt": "What is 2 + 3?", "completion": "6.", "label": False}]  # an empty reply is skipped
    write_jsonl(tmp_path / "kto.jsonl", records)
    assert [x.desirable for x in load_unpaired(tmp_path / "kto.jsonl")] == [True, False]


SIZES = dict(pretrain=300, sft=160, rankings=5, pairs=200, prompts_train=4, prompts_heldout=4, moderation=5)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny SFT checkpoint, and the bundled world's pairs as unpaired feedback (chosen desirable, rejected not)."""
    root = tmp_path_factory.mktemp("kto")
    data = root / "data"
    write_bundle(data, seed=0, sizes=SIZES)
    pt = pretrain(PretrainArgs(out=str(root / "pt"), data=[str(data / "pretrain.txt")], preset="tiny", vocab_size=320,
                               seq_len=128, batch_size=8, max_steps=30, eval_every=30, save_every=30, dtype="fp32"))
    ckpt = sft(SFTArgs(base=str(pt), data=[str(data / "sft.jsonl")], out=str(root / "sft"), epochs=1, batch_size=16,
                       lr=1e-3, dtype="fp32", save_every=0))
    unpaired = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
                for r in read_jsonl(data / "pairs.jsonl") for key in ("chosen", "rejected")]
    write_jsonl(data / "kto.jsonl", unpaired)
    return dict(root=root, data=data, sft=ckpt)


def run(policy, name, **kw):
    args = dict(base=str(policy["sft"]), data=[str(policy["data"] / "kto.jsonl")], out=str(policy["root"] / name),
                epochs=1, batch_size=16, lr=1e-3, warmup_steps=2, val_fraction=0.2, dtype="fp32", save_every=0)
    args.update(kw)
    return kto(KTOArgs(**args))


def test_a_tiny_kto_run_raises_the_held_out_margin(policy, capsys):
    out = run(policy, "plain")  # 320 examples to train on, 80 held out
    rows = read_jsonl(policy["root"] / "plain" / "metrics.jsonl")
    margins = [r["val_margin"] for r in rows if "val_margin" in r]
    assert margins[0] == 0.0  # the policy is its reference
    assert margins[-1] > 0.5, margins  # 2.92 measured
    first = next(r for r in rows if "loss" in r)
    assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert checkpoint.read_config(out)["method"] == "kto"
    assert "kto done" in capsys.readouterr().out


def weights(out):
    return load_file(checkpoint.resolve(out) / "model.safetensors")


def test_kto_gradient_accumulation_and_resume(policy, tmp_path, capsys):
    few = dict(epochs=0.2)  # 4 steps of 16
    big = weights(run(policy, "big", **few, save_every=2))
    accumulated = weights(run(policy, "accum", **few, batch_size=8, grad_accum=2, gradient_checkpointing=True))
    for name in big:
        torch.testing.assert_close(big[name], accumulated[name], atol=1e-5, rtol=1e-4)
    crashed = tmp_path / "crashed"
    shutil.copytree(policy["root"] / "big", crashed)
    shutil.rmtree(crashed / checkpoint.resolve(crashed).name)
    (crashed / "latest").unlink()
    shutil.rmtree(crashed / "resume" / "step-000004")
    (crashed / "resume" / "latest").write_text("step-000002\n")
    capsys.readouterr()
    resumed = weights(run(policy, "unused", **few, out=str(crashed), save_every=2, resume=True))
    assert "kto: resuming at step 2 of 4" in capsys.readouterr().out
    assert all(torch.equal(big[name], resumed[name]) for name in big)
    assert read_jsonl(crashed / "metrics.jsonl") == read_jsonl(policy["root"] / "big" / "metrics.jsonl")


def test_kto_is_a_command(policy, tmp_path, capsys):
    for command in ("kto", "dpo", "sft"):  # the help of every flag renders
        with pytest.raises(SystemExit) as exit:
            cli([command, "--help"])
        assert exit.value.code == 0 and "--gradient-checkpointing" in capsys.readouterr().out
    assert cli(["kto", str(policy["sft"]), "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
