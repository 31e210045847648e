"""RLOO (palmchat/train/rloo.py): the leave-one-out advantage by hand, in the loss function and through the trainer,
and a tiny run that saves, resumes exactly and is a `palmchat` command."""

import json
import shutil

import pytest
import torch

from palmchat import checkpoint
from palmchat.cli import main as cli
from palmchat.losses import leave_one_out_advantages
from palmchat.train import rloo


def test_leave_one_out_advantages_by_hand():
    adv = leave_one_out_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), k=3)
    # 1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2; then 0 - 1.5, 0 - 1.5, 3 - 0
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    torch.testing.assert_close(leave_one_out_advantages(torch.tensor([3.0, 1.0]), 2), torch.tensor([2.0, -2.0]))
    with pytest.raises(ValueError, match="k=1"):
        leave_one_out_advantages(torch.zeros(4), 1)


def rigged_scorer(rollout):
    return torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])


def run(policy, out, monkeypatch, scorer, **kw):
    monkeypatch.setattr(rloo, "make_scorer", lambda *a, **k: (scorer, None))
    args = dict(base=policy["ckpt"], prompts=[policy["prompts"]], out=str(out), iterations=1, prompts_per_iteration=2,
                k=3, max_new_tokens=8, dtype="fp32", missing_eot_penalty=0.0, sample_every=0, save_every=0)
    rloo.main(rloo.RLOOArgs(**{**args, **kw}))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_trainer_uses_the_leave_one_out_advantage(policy, tmp_path, monkeypatch):
    row = run(policy, tmp_path / "o", monkeypatch, rigged_scorer)[0]
    assert abs(row["kl"]) < 1e-5  # the first rollout comes from the reference: the reward is the score
    assert abs(row["advantage_mean"]) < 1e-5
    assert abs(row["advantage_std"] - (45 / 6) ** 0.5) < 1e-4  # of -3, -1.5, 4.5, -1.5, -1.5, 3
    assert row["clipfrac"] == 0.0 and abs(row["ratio_max"] - 1) < 1e-6  # one on-policy step: REINFORCE


def test_a_tiny_run_saves_and_resumes_exactly(policy, tmp_path, monkeypatch):
    def scorer(rollout):
        return torch.tensor([min(len(r), 20) / 20 for r in rollout.responses])

    kw = dict(iterations=2, save_every=1, lr=1e-3, minibatch=3, sample_every=1)
    full = tmp_path / "full"
    rows = run(policy, full, monkeypatch, scorer, **kw)
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "resume" / "step-000002")
    (crashed / "resume" / "latest").write_text("step-000001\n")
    resumed = run(policy, crashed, monkeypatch, scorer, resume=True, **kw)
    timing = {"rollout_s", "iteration_s", "samples_per_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in timing} for r in rows]
    a, config, _ = checkpoint.load_model(full)
    b, _, _ = checkpoint.load_model(crashed)
    assert config["stage"] == "rloo"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert len((crashed / "samples.jsonl").read_text().splitlines()) == 8  # 4 samples x 2 iterations, not 12


def test_rloo_is_a_command_with_clear_errors(policy, tmp_path, capsys):
    assert cli(["rloo", policy["ckpt"], "--k", "1", "--out", str(tmp_path / "o")]) == 2
    assert "--k must be >= 2" in capsys.readouterr().err
