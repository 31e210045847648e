"""GRPO (palmchat/train/grpo.py): each --loss-type reduces the per-token loss as its paper defines it (hand numbers),
Dr. GRPO's advantages are not divided by the std, zero-variance groups are counted and can be dropped, the first
minibatch is exactly on-policy, and a resumed run equals the uninterrupted one."""

import json
import shutil

import pytest
import torch

from palmchat import checkpoint
from palmchat.losses import aggregate_token_loss, ppo_policy_loss
from palmchat.train import grpo

NAN = float("nan")
# two responses of 3 and 1 tokens; the padding holds garbage that must not count
LOSS = torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, NAN, NAN, NAN]])
MASK = torch.tensor([[True, True, True, False], [True, False, False, False]])


def close(got, want, tol=1e-6):
    assert abs(float(got) - want) < tol, (float(got), want)


@pytest.mark.parametrize("loss_type,want", [
    ("grpo", (6 / 3 + 4 / 1) / 2),  # DeepSeekMath eq. 3: mean per response, then over responses = 3
    ("dapo", (1 + 2 + 3 + 4) / 4),  # DAPO: one mean over the batch's 4 tokens = 2.5
    ("dr_grpo", (1 + 2 + 3 + 4) / (2 * 4)),  # Dr. GRPO: sum / (2 responses x max_len 4) = 1.25
    ("sequence", (1 + 2 + 3 + 4) / 2),  # RLOO's REINFORCE on the sequence: sum per response, mean = 5
])
def test_each_loss_type_reduces_as_its_paper_defines(loss_type, want):
    close(aggregate_token_loss(LOSS, MASK, loss_type, max_len=4), want)
    # one micro-batch per response, normalised by the whole batch's counts: the parts add up to the whole
    parts = [aggregate_token_loss(LOSS[i:i + 1], MASK[i:i + 1], loss_type, max_len=4, num_seqs=2, num_tokens=4)
             for i in range(2)]
    close(sum(parts), want)


def test_the_policy_loss_takes_the_reduction_by_hand():
    logp = torch.zeros(2, 4)  # ratio 1: the per-token loss is -A
    adv = torch.tensor([[1.0] * 4, [-2.0] * 4])
    got = {t: ppo_policy_loss(logp, logp, adv, MASK, 0.2, loss_type=t, max_len=4)[0].item()
           for t in ("grpo", "dapo", "dr_grpo")}
    close(got["grpo"], (-1 + 2) / 2)
    close(got["dapo"], (-3 + 2) / 4)
    close(got["dr_grpo"], (-3 + 2) / 8)
    with pytest.raises(ValueError, match="max_len"):
        aggregate_token_loss(LOSS, MASK, "dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_token_loss(LOSS, MASK, "token")


def rigged_scorer(rollout):
    """Groups of 4: the first all 1, the second 0, 1, 0, 1, the third all 0."""
    return torch.tensor([1.0] * 4 + [0.0, 1.0, 0.0, 1.0] + [0.0] * 4)[: len(rollout.responses)]


def run(policy, out, monkeypatch, scorer=rigged_scorer, **kw):
    monkeypatch.setattr(grpo, "make_scorer", lambda *a, **k: (scorer, None))
    args = dict(base=policy["ckpt"], prompts=[policy["prompts"]], out=str(out), iterations=1, prompts_per_iteration=3,
                group_size=4, minibatch=4, max_new_tokens=8, dtype="fp32", missing_eot_penalty=0.0, sample_every=0,
                save_every=0)
    grpo.main(grpo.GRPOArgs(**{**args, **kw}))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_zero_variance_groups_are_counted_and_filtered_and_dr_grpo_does_not_scale(policy, tmp_path, monkeypatch):
    seen = []

    def recording(*args, **kwargs):
        loss, stats = ppo_policy_loss(*args, **kwargs)
        seen.append({k: float(v) for k, v in stats.items()})
        return loss, stats

    monkeypatch.setattr(grpo, "ppo_policy_loss", recording)
    row = run(policy, tmp_path / "plain", monkeypatch)[0]
    close(row["zero_variance_frac"], 2 / 3)
    assert row["rows_trained"] == 12
    close(row["score"], 6 / 12)
    close(row["advantage_std"], (4 / 12) ** 0.5, 1e-4)  # the middle group's +-1 (std-scaled), the rest 0
    # the first minibatch is exactly on-policy in fp32
    assert abs(seen[0]["ratio"] - 1) < 1e-6 and seen[0]["clipfrac"] == 0.0 and abs(seen[0]["approx_kl"]) < 1e-9

    row = run(policy, tmp_path / "filtered", monkeypatch, filter_zero_variance=True)[0]
    close(row["zero_variance_frac"], 2 / 3)
    assert row["rows_trained"] == 4  # only the middle group is trained on

    row = run(policy, tmp_path / "dr", monkeypatch, loss_type="dr_grpo")[0]
    close(row["advantage_std"], 0.5 * (4 / 12) ** 0.5, 1e-4)  # mean-centred only: +-0.5


def test_a_resumed_run_equals_the_uninterrupted_run(policy, tmp_path, monkeypatch):
    def scorer(rollout):
        return torch.tensor([min(len(r), 20) / 20 for r in rollout.responses])

    kw = dict(iterations=2, save_every=1, lr=1e-3)
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
    a, _, _ = checkpoint.load_model(full)
    b, _, _ = checkpoint.load_model(crashed)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    for r in rows:  # the logged fields are consistent
        assert 0 <= r["zero_variance_frac"] <= 1 and r["entropy"] > 0 and r["tis_weight"] == 1.0
        assert r["logprob_mismatch"] < 1e-4 and r["ratio_max"] >= 1.0 - 1e-6
