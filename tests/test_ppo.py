"""PPO (palmchat/train/ppo.py): the KL penalty in the reward is k1 and the score sits on the last token, GAE's returns
are the score-to-go, truncated importance sampling weights the loss by hand-computed numbers, the first minibatch is
exactly on-policy, gradient accumulation changes nothing, and a killed-then-resumed run equals the uninterrupted
one."""

import json
import math
import shutil

import pytest
import torch

from palmchat import checkpoint
from palmchat.losses import gae, kl_shaped_rewards, ppo_policy_loss, truncated_is_weights
from palmchat.train import ppo


def close(got, want, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float32), torch.as_tensor(want, dtype=torch.float32),
                               atol=tol, rtol=0)


def length_scorer(rollout):
    """A deterministic reward: longer replies score higher (up to 20 characters)."""
    return torch.tensor([min(len(r), 20) / 20 for r in rollout.responses])


@pytest.fixture
def rigged(monkeypatch):
    monkeypatch.setattr(ppo, "make_scorer", lambda *a, **k: (length_scorer, None))


def run(policy, out, **kw):
    args = dict(base=policy["ckpt"], prompts=[policy["prompts"]], out=str(out), iterations=1, rollout_batch=8,
                minibatch=4, max_new_tokens=8, dtype="fp32", sample_every=0, save_every=0)
    ppo.main(ppo.PPOArgs(**{**args, **kw}))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_rewards_kl_term_is_k1_per_token_and_the_score_sits_on_the_last_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 9.0, 9.0]])  # garbage past row 1's single token
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    rewards, kl = kl_shaped_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    close(kl, [[0.5, -1.0, 0.0], [-0.2, 0.0, 0.0]])  # log pi - log pi_ref: k1, not k3 (k3 of -1.0 is 0.718)
    close(rewards, [[-0.05, 0.1, 2.0], [-0.98, 0.0, 0.0]])
    with pytest.raises(ValueError, match="no response token"):
        kl_shaped_rewards(torch.tensor([1.0]), logp[:1], ref[:1], torch.zeros(1, 3, dtype=torch.bool), 0.1)
    assert not any(f.name == "kl_estimator" for f in ppo.PPOArgs.__dataclass_fields__.values())


def test_gae_returns_equal_the_score_to_go_with_zero_values_and_gamma_lambda_one():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    rewards, _ = kl_shaped_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    advantages, returns = gae(rewards, torch.zeros(2, 3), mask, gamma=1.0, lam=1.0)
    close(returns, [[2.05, 2.1, 2.0], [-0.98, 0.0, 0.0]])  # -0.05 + 0.1 + 2, 0.1 + 2, 2
    close(advantages, returns)  # V = 0


def test_truncated_importance_sampling_weights_the_policy_loss_by_hand():
    old = torch.tensor([[-1.0, -2.0, 0.0]])
    engine = torch.tensor([[-1.5, -0.5, 7.0]])
    mask = torch.tensor([[True, True, False]])
    w = truncated_is_weights(old, engine, mask, cap=1.5)
    close(w, [[1.5, math.exp(-1.5), 1.0]])  # exp(0.5) = 1.65 is capped at 1.5
    adv = torch.tensor([[1.0, 1.0, 5.0]])
    loss, stats = ppo_policy_loss(old.clone(), old, adv, mask, 0.2, is_weights=w)
    close(loss, -(1.5 + math.exp(-1.5)) / 2)  # ratio 1: -A * w per token, token mean
    assert stats["ratio_max"] == 1.0


def test_the_first_minibatch_is_on_policy_ratio_one_clipfrac_zero(policy, rigged, tmp_path, monkeypatch):
    seen = []

    def recording(*args, **kwargs):
        loss, stats = ppo_policy_loss(*args, **kwargs)
        seen.append({k: float(v) for k, v in stats.items()})
        return loss, stats

    monkeypatch.setattr(ppo, "ppo_policy_loss", recording)
    run(policy, tmp_path / "o")
    assert abs(seen[0]["ratio"] - 1) < 1e-6 and abs(seen[0]["ratio_max"] - 1) < 1e-6
    assert seen[0]["clipfrac"] == 0.0 and abs(seen[0]["approx_kl"]) < 1e-9
    assert any(s["ratio_max"] != 1.0 for s in seen[1:])  # later minibatches are off-policy


def test_gradient_accumulation_2x8_equals_1x16(policy, rigged, tmp_path, monkeypatch):
    real = ppo.optimizer_step

    def runs_with(grad_accum):
        grads = []

        def recording(optimizer, params, max_norm, lr=None):
            grads.append([p.grad.clone() for p in params if p.grad is not None])
            return real(optimizer, params, max_norm, lr)

        monkeypatch.setattr(ppo, "optimizer_step", recording)
        run(policy, tmp_path / f"acc{grad_accum}", rollout_batch=16, minibatch=16, ppo_epochs=1,
            grad_accum=grad_accum)
        return grads

    one, two = runs_with(1), runs_with(2)
    assert len(one) == len(two) == 2  # the policy's step and the critic's
    for a, b in zip(one, two):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)


def test_a_killed_then_resumed_run_equals_the_uninterrupted_run(policy, rigged, tmp_path):
    full = tmp_path / "full"
    kw = dict(iterations=3, save_every=1, kl_target=1.0, sample_every=1)
    rows = run(policy, full, **kw)
    assert (full / "resume" / "step-000002").exists() and len(rows) == 3

    crashed = tmp_path / "crashed"  # killed after iteration 2's state was written
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "resume" / "step-000003")
    (crashed / "resume" / "latest").write_text("step-000002\n")
    resumed = run(policy, crashed, resume=True, **kw)

    timing = {"rollout_s", "iteration_s", "samples_per_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in timing} for r in rows]
    assert rows[1]["kl_coef"] != rows[0]["kl_coef"]  # the KL controller's state came back, not its start value
    a, _, _ = checkpoint.load_model(full)
    b, _, _ = checkpoint.load_model(crashed)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    samples = [json.loads(line) for line in (crashed / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [s["step"] for s in map(json.loads, (full / "samples.jsonl").open())]
