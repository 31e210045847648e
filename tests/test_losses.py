"""Tests for palmchat.losses against numbers computed by hand with ``math``."""

import math

import pytest
import torch
import torch.nn.functional as F

from palmchat.data.chat import pad_right
from palmchat.losses import (
    cross_entropy,
    dpo_loss,
    dpo_ranking_loss,
    gae,
    group_advantages,
    kl_penalty,
    linear_token_logprobs,
    masked_mean,
    masked_sum,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    ranking_loss,
    sequence_logprobs,
    token_logprobs,
)
from palmchat.model.transformer import Transformer


def close(actual, expected, tol=1e-5):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


# --------------------------------------------------------------------------- #
# masked reductions
# --------------------------------------------------------------------------- #


def test_masked_sum_and_mean():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_sum(x, mask), 1 + 2 + 4)
    close(masked_mean(x, mask), (1 + 2 + 4) / 3)
    close(masked_sum(x, mask, dim=1), [3.0, 4.0])
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    close(masked_mean(x, mask.bool(), dim=0), [2.5, 2.0, 0.0])  # empty column -> 0


def test_masked_mean_ignores_nan_padding_and_gradient():
    x = torch.tensor([1.0, 3.0, float("nan"), float("inf")], requires_grad=True)
    mask = torch.tensor([True, True, False, False])
    out = masked_mean(x, mask)
    close(out.detach(), 2.0)
    out.backward()
    close(x.grad, [0.5, 0.5, 0.0, 0.0])


def test_masked_mean_all_masked_is_zero():
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    mean = (1 + 2 + 3) / 3
    var = ((1 - mean) ** 2 + (2 - mean) ** 2 + (3 - mean) ** 2) / 3  # unbiased=False
    s = math.sqrt(var + 1e-8)
    close(masked_whiten(x, mask), [[(1 - mean) / s, (2 - mean) / s], [(3 - mean) / s, 0.0]])
    close(
        masked_whiten(x, mask, shift_mean=False),
        [[(1 - mean) / s + mean, (2 - mean) / s + mean], [(3 - mean) / s + mean, 0.0]],
    )


# --------------------------------------------------------------------------- #
# cross-entropy / token log-probs
# --------------------------------------------------------------------------- #

LOGITS = [[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [2.0, 0.0, -1.0]]]  # (1, 3, 3), exact in bf16
TARGETS = [[2, 0, 1]]
LSE = [
    math.log(math.exp(1) + math.exp(2) + math.exp(3)),
    math.log(3.0),
    math.log(math.exp(2) + math.exp(0) + math.exp(-1)),
]
NLL = [LSE[0] - 3.0, LSE[1] - 0.0, LSE[2] - 0.0]


def test_cross_entropy_by_hand():
    logits, targets = torch.tensor(LOGITS), torch.tensor(TARGETS)
    loss, z = cross_entropy(logits, targets)
    close(loss, sum(NLL) / 3)
    close(z, sum(v * v for v in LSE) / 3)

    loss, z = cross_entropy(logits, targets, z_loss=1e-2)
    close(loss, sum(NLL) / 3 + 1e-2 * sum(v * v for v in LSE) / 3)


def test_cross_entropy_mask_and_ignore_index():
    logits = torch.tensor(LOGITS)
    mask = torch.tensor([[1, 0, 1]])
    loss, z = cross_entropy(logits, torch.tensor(TARGETS), loss_mask=mask, z_loss=0.5)
    close(loss, (NLL[0] + NLL[2]) / 2 + 0.5 * (LSE[0] ** 2 + LSE[2] ** 2) / 2)
    close(z, (LSE[0] ** 2 + LSE[2] ** 2) / 2)
    # -100 in targets behaves the same as a masked token.
    loss2, _ = cross_entropy(logits, torch.tensor([[2, -100, 1]]), z_loss=0.5)
    close(loss2, loss)
    # Both mechanisms combined.
    loss3, _ = cross_entropy(logits, torch.tensor([[2, -100, 1]]), loss_mask=torch.tensor([[0, 1, 1]]))
    close(loss3, NLL[2])


def test_cross_entropy_matches_torch_and_token_mean_over_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    targets = torch.randint(0, 11, (3, 5))
    targets[1, 2:] = -100  # ragged row: token mean, not per-row mean
    loss, _ = cross_entropy(logits, targets)
    ref = F.cross_entropy(logits.view(-1, 11), targets.view(-1), ignore_index=-100)
    close(loss, ref)


def test_cross_entropy_bf16_is_float32():
    logits = torch.tensor(LOGITS, dtype=torch.bfloat16, requires_grad=True)
    loss, z = cross_entropy(logits, torch.tensor(TARGETS), z_loss=1e-4)
    assert loss.dtype == torch.float32 and z.dtype == torch.float32
    close(loss, sum(NLL) / 3 + 1e-4 * sum(v * v for v in LSE) / 3)
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16


def test_token_logprobs_by_hand():
    out = token_logprobs(torch.tensor(LOGITS), torch.tensor(TARGETS))
    assert out.shape == (1, 3)
    close(out, [[-v for v in NLL]])
    out = token_logprobs(torch.tensor(LOGITS), torch.tensor([[2, -100, 1]]))
    close(out, [[-NLL[0], 0.0, -NLL[2]]])


def test_token_logprobs_bf16_and_matches_log_softmax():
    out = token_logprobs(torch.tensor(LOGITS, dtype=torch.bfloat16), torch.tensor(TARGETS))
    assert out.dtype == torch.float32
    close(out, [[-v for v in NLL]])

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 4))
    ref = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    close(token_logprobs(logits, targets), ref, tol=1e-12)


# --------------------------------------------------------------------------- #
# reward model ranking loss
# --------------------------------------------------------------------------- #


def test_ranking_loss_k3_by_hand():
    rewards = torch.tensor([[2.0, 1.0, 0.5]])
    loss, acc = ranking_loss(rewards)
    # pairs (1st,2nd), (1st,3rd), (2nd,3rd); C(3,2) = 3
    expected = -(log_sigmoid(2.0 - 1.0) + log_sigmoid(2.0 - 0.5) + log_sigmoid(1.0 - 0.5)) / 3
    close(loss, expected)
    close(acc, 1.0)


def test_ranking_loss_padded_batch():
    nan = float("nan")
    rewards = torch.tensor([[2.0, 1.0, 0.5, nan], [0.3, 0.8, nan, nan]], requires_grad=True)
    loss, acc = ranking_loss(rewards, torch.tensor([3, 2]))
    row0 = -(log_sigmoid(1.0) + log_sigmoid(1.5) + log_sigmoid(0.5)) / 3
    row1 = -log_sigmoid(0.3 - 0.8)
    close(loss.detach(), (row0 + row1) / 2)
    close(acc, 3 / 4)  # 3 of 3 correct in row 0, 0 of 1 in row 1
    loss.backward()
    assert torch.isfinite(rewards.grad).all()
    assert rewards.grad[0, 3] == 0 and (rewards.grad[1, 2:] == 0).all()
    # d/dr_w of -log sigmoid(r_w - r_l) = -sigmoid(r_l - r_w); row 1 weighted by 1/B
    close(rewards.grad[1, 0], -0.5 / (1 + math.exp(-(0.8 - 0.3))))


def test_ranking_loss_k2_is_pairwise_loss():
    chosen = torch.tensor([1.0, -0.5, 2.0])
    rejected = torch.tensor([0.0, 0.5, 2.5])
    loss, acc = ranking_loss(torch.stack([chosen, rejected], dim=1))
    expected = sum(-log_sigmoid(c - r) for c, r in zip(chosen.tolist(), rejected.tolist())) / 3
    close(loss, expected)
    close(loss, -F.logsigmoid(chosen - rejected).mean())
    close(acc, 1 / 3)


def test_ranking_loss_k9_pair_count():
    rewards = torch.arange(9, 0, -1, dtype=torch.float64).unsqueeze(0)  # 9 > 8 > ... > 1
    loss, _ = ranking_loss(rewards)
    # pairs at rank distance d occur (9 - d) times; C(9,2) = 36
    expected = sum((9 - d) * -log_sigmoid(float(d)) for d in range(1, 9)) / 36
    close(loss, expected)


def test_ranking_loss_bad_num_responses():
    with pytest.raises(ValueError):
        ranking_loss(torch.zeros(2, 3), torch.tensor([1, 3]))
    with pytest.raises(ValueError):
        ranking_loss(torch.zeros(2, 3), torch.tensor([2, 4]))


# --------------------------------------------------------------------------- #
# DPO / IPO
# --------------------------------------------------------------------------- #

PC, PR, RC, RR = -1.0, -2.0, -1.5, -1.8  # h = (PC - RC) - (PR - RR) = 0.5 + 0.2 = 0.7


def _dpo_inputs(requires_grad=False):
    return [torch.tensor([v], requires_grad=requires_grad) for v in (PC, PR, RC, RR)]


def test_dpo_sigmoid_by_hand():
    loss, cr, rr = dpo_loss(*_dpo_inputs(), beta=0.1)
    close(loss, math.log(1 + math.exp(-0.1 * 0.7)))
    close(cr, [0.1 * 0.5])
    close(rr, [0.1 * -0.2])


def test_dpo_label_smoothing_by_hand():
    loss, _, _ = dpo_loss(*_dpo_inputs(), beta=0.1, label_smoothing=0.1)
    close(loss, 0.9 * math.log(1 + math.exp(-0.07)) + 0.1 * math.log(1 + math.exp(0.07)))


def test_ipo_by_hand():
    loss, _, _ = dpo_loss(*_dpo_inputs(), beta=0.1, loss_type="ipo")
    close(loss, (0.7 - 1 / (2 * 0.1)) ** 2)  # (0.7 - 5)^2 = 18.49
    close(loss, 18.49)


def test_dpo_batch_mean():
    pc = torch.tensor([PC, 0.0])
    pr = torch.tensor([PR, 0.0])
    rc = torch.tensor([RC, 0.0])
    rr = torch.tensor([RR, -1.0])  # h = 0 - (0 - -1) = -1
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    close(loss, (math.log(1 + math.exp(-0.5 * 0.7)) + math.log(1 + math.exp(0.5))) / 2)


def test_dpo_gradient_increases_chosen_decreases_rejected():
    for loss_type in ("sigmoid", "ipo"):
        pc, pr, rc, rr = _dpo_inputs(requires_grad=True)
        loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type)
        loss.backward()
        assert pc.grad.item() < 0 < pr.grad.item()  # descent raises chosen, lowers rejected
        # sigmoid: dL/dpi_c = -beta * sigmoid(-beta h)
        if loss_type == "sigmoid":
            close(pc.grad, [-0.1 / (1 + math.exp(0.07))])


def test_dpo_unknown_loss_type():
    with pytest.raises(ValueError):
        dpo_loss(*_dpo_inputs(), loss_type="hinge")


def test_dpo_ranking_loss_k2_equals_dpo_and_k3_by_hand():
    pol = torch.tensor([[PC, PR]])
    ref = torch.tensor([[RC, RR]])
    loss, rewards = dpo_ranking_loss(pol, ref, beta=0.1)
    close(loss, dpo_loss(*_dpo_inputs(), beta=0.1)[0])
    close(rewards, [[0.05, -0.02]])

    # K=3 row padded to K_max=4 plus a K=2 row; ratios pi - ref:
    # row 0: [0.5, -0.2, 0.1]; row 1: [0.0, 0.4]
    nan = float("nan")
    pol = torch.tensor([[-1.0, -2.0, -3.0, nan], [-1.0, -1.0, nan, nan]])
    ref = torch.tensor([[-1.5, -1.8, -3.1, nan], [-1.0, -1.4, nan, nan]])
    loss, rewards = dpo_ranking_loss(pol, ref, torch.tensor([3, 2]), beta=0.1)

    def pair(h):
        return math.log(1 + math.exp(-0.1 * h))

    row0 = (pair(0.5 - -0.2) + pair(0.5 - 0.1) + pair(-0.2 - 0.1)) / 3
    row1 = pair(0.0 - 0.4)
    close(loss, (row0 + row1) / 2)
    close(rewards, [[0.05, -0.02, 0.01, 0.0], [0.0, 0.04, 0.0, 0.0]])


# --------------------------------------------------------------------------- #
# KL estimators
# --------------------------------------------------------------------------- #


def test_kl_penalty_by_hand():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    close(kl_penalty(logp, ref, "k1"), [[0.5, -1.0]])
    close(kl_penalty(logp, ref, "k2"), [[0.5 * 0.5**2, 0.5 * 1.0**2]])
    # r = ref - logp = [-0.5, 1.0]
    close(kl_penalty(logp, ref, "k3"), [[math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]])
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")


def test_kl_estimators_k1_k3_unbiased_and_k3_nonnegative():
    p = [0.5, 0.3, 0.2]
    q = [0.2, 0.3, 0.5]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    logp = torch.tensor([math.log(v) for v in p], dtype=torch.float64)
    logq = torch.tensor([math.log(v) for v in q], dtype=torch.float64)
    weights = torch.tensor(p, dtype=torch.float64)
    for kind in ("k1", "k3"):  # exact expectation under p
        close((weights * kl_penalty(logp, logq, kind)).sum(), kl, tol=1e-12)
    torch.manual_seed(0)
    a, b = torch.randn(100) * 3, torch.randn(100) * 3
    assert (kl_penalty(a, b, "k3") >= 0).all() and (kl_penalty(a, b, "k2") >= 0).all()


# --------------------------------------------------------------------------- #
# GAE
# --------------------------------------------------------------------------- #


def test_gae_by_hand_with_padded_row():
    g, lam = 0.9, 0.8
    rewards = torch.tensor([[0.1, 0.0, -0.2, 1.0], [0.0, 2.0, 7.0, 7.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 0.6], [0.2, 0.6, 9.0, 9.0]])  # row 1 padded after 2 tokens
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=g, lam=lam)

    # row 0, four steps, terminal after t=3
    d3 = 1.0 - 0.6
    d2 = -0.2 + g * 0.6 - 0.3
    d1 = 0.0 + g * 0.3 - 0.4
    d0 = 0.1 + g * 0.4 - 0.5
    a3 = d3
    a2 = d2 + g * lam * a3
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    # row 1, two steps, the 9.0 values / 7.0 rewards in the padding are ignored
    e1 = 2.0 - 0.6
    e0 = 0.0 + g * 0.6 - 0.2
    b1 = e1
    b0 = e0 + g * lam * b1

    close(adv, [[a0, a1, a2, a3], [b0, b1, 0.0, 0.0]])
    close(ret, [[a0 + 0.5, a1 + 0.4, a2 + 0.3, a3 + 0.6], [b0 + 0.2, b1 + 0.6, 0.0, 0.0]])


def test_gae_lambda_one_gives_monte_carlo_returns():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.7, -0.3, 5.0]], requires_grad=True)
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=1.0)
    mc = [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0]
    close(ret, [mc])
    close(adv, [[mc[0] - 0.7, mc[1] + 0.3, mc[2] - 5.0]])
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_lambda_zero_gives_td_error():
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25]])
    adv, _ = gae(rewards, values, torch.ones(1, 2), gamma=0.9, lam=0.0)
    close(adv, [[0.0 + 0.9 * 0.25 - 0.5, 1.0 - 0.25]])


# --------------------------------------------------------------------------- #
# PPO
# --------------------------------------------------------------------------- #


def test_ppo_policy_loss_by_hand():
    ratios = [1.5, 0.5, 0.5, 1.1, 3.0]
    adv = torch.tensor([[1.0, 1.0, -1.0, 2.0, 100.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    logp = (old + torch.log(torch.tensor([ratios]))).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # per token -min(rho A, clip(rho) A):
    #   rho=1.5, A=+1 -> -min(1.5, 1.2)  = -1.2  (clipped)
    #   rho=0.5, A=+1 -> -min(0.5, 0.8)  = -0.5
    #   rho=0.5, A=-1 -> -min(-0.5,-0.8) = 0.8   (clipped)
    #   rho=1.1, A=+2 -> -min(2.2, 2.2)  = -2.2
    close(loss.detach(), (-1.2 - 0.5 + 0.8 - 2.2) / 4)
    close(stats["clipfrac"], 2 / 4)
    k3 = [(r - 1) - math.log(r) for r in ratios[:4]]
    close(stats["approx_kl"], sum(k3) / 4)
    close(stats["ratio"], sum(ratios[:4]) / 4)
    loss.backward()
    # clipped and masked tokens get no gradient; unclipped get -A * rho / n
    close(logp.grad, [[0.0, -1.0 * 0.5 / 4, 0.0, -2.0 * 1.1 / 4, 0.0]])


def test_ppo_value_loss_by_hand():
    values = torch.tensor([[1.0, 1.0, 0.0, 50.0]])
    old = torch.tensor([[0.5, 0.9, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
    # V_clip = [0.7, 1.0, 0.3]; errors (V-R)^2 = [1, 1, 0], (V_clip-R)^2 = [1.69, 1, 0.09]
    close(loss, 0.5 * (1.69 + 1.0 + 0.09) / 3)
    close(clipfrac, 2 / 3)


# --------------------------------------------------------------------------- #
# GRPO
# --------------------------------------------------------------------------- #


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.0, 1.0, 2.0, 3.0])
    eps = 1e-6
    std3 = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 4)
    expected = (
        [0.5 / (0.5 + eps), -0.5 / (0.5 + eps), -0.5 / (0.5 + eps), 0.5 / (0.5 + eps)]
        + [0.0] * 4
        + [(r - 1.5) / (std3 + eps) for r in (0.0, 1.0, 2.0, 3.0)]
    )
    adv = group_advantages(rewards, group_size=4, eps=eps)
    close(adv, expected)
    assert (adv[4:8] == 0).all()  # exactly zero for an all-equal group

    close(group_advantages(rewards, 4, scale=False), [0.5, -0.5, -0.5, 0.5] + [0.0] * 4 + [-1.5, -0.5, 0.5, 1.5])

    std3_unbiased = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)
    close(group_advantages(rewards, 4, unbiased=True)[8:],
          [(r - 1.5) / (std3_unbiased + 1e-6) for r in (0.0, 1.0, 2.0, 3.0)])


def test_group_advantages_g2_and_errors():
    close(group_advantages(torch.tensor([3.0, 1.0]), 2, eps=0.0), [1.0, -1.0])
    close(group_advantages(torch.tensor([3.0, 1.0]), 1), [0.0, 0.0])
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(2, 2), 2)


# --------------------------------------------------------------------------- #
# sequence log-probs
# --------------------------------------------------------------------------- #


def test_sequence_logprobs_equals_hand_loop(tiny_config):
    model = Transformer(tiny_config).eval()
    seqs = [[1, 3, 40, 41, 5, 4, 50, 51, 52, 5], [1, 3, 60, 5, 4, 70, 5], [1, 3, 20, 21, 22, 5, 4, 5]]
    prompt_lens = torch.tensor([6, 5, 7])
    ids, lengths = pad_right(seqs, 0)
    with torch.no_grad():
        logits = model(ids)
        got = sequence_logprobs(logits, ids, prompt_lens, lengths)
        got_mean = sequence_logprobs(logits, ids, prompt_lens, lengths, mean=True)
        for i, s in enumerate(seqs):
            alone = torch.log_softmax(model(torch.tensor([s]))[0].double(), -1)
            hand = sum(alone[t - 1, s[t]] for t in range(int(prompt_lens[i]), len(s)))
            n = len(s) - int(prompt_lens[i])
            assert got[i].item() == pytest.approx(hand.item(), abs=1e-4)
            assert got_mean[i].item() == pytest.approx(hand.item() / n, abs=1e-4)
    assert got.shape == (3,) and got.dtype == torch.float32


def test_sequence_logprobs_ignores_padding_garbage(tiny_config):
    logits = torch.randn(2, 6, tiny_config.vocab_size)
    ids = torch.tensor([[1, 4, 9, 5, 0, 0], [1, 4, 8, 8, 8, 5]])
    prompt_lens, lengths = torch.tensor([2, 2]), torch.tensor([4, 6])
    base = sequence_logprobs(logits, ids, prompt_lens, lengths)
    logits[0, 4:] = float("nan")  # logits at/after the last real token never score anything
    logits[0, :1] = 1e4  # nor do logits that predict prompt tokens
    assert torch.equal(sequence_logprobs(logits, ids, prompt_lens, lengths), base)


# --------------------------------------------------------------------------- #
# fused output projection + log-probs
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("weight_trains", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_token_logprobs_equals_logits_then_log_softmax(weight_trains, temperature):
    """Values and gradients (to the hidden states and, when it trains, the weight) equal log_softmax of the full
    logits, in float64, with blocks of rows and vocabulary tiles smaller than the batch, and ignored targets."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, requires_grad=weight_trains)
    targets = torch.randint(0, 11, (3, 5))
    targets[0, 1] = targets[2, 4] = -100
    upstream = torch.randn(3, 5, dtype=torch.float64)

    ref = token_logprobs(F.linear(hidden, weight) / temperature, targets)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [hidden, weight] if weight_trains else [hidden])
    # blocks of 2 rows, tiles of 4 columns (the last one 3 wide)
    out = linear_token_logprobs(hidden, weight, targets, temperature, chunk_rows=2, chunk_columns=4)
    grads = torch.autograd.grad((out * upstream).sum(), [hidden, weight] if weight_trains else [hidden])
    assert out.dtype == torch.float64 and out[0, 1] == 0 and out[2, 4] == 0
    close(out, ref, tol=1e-12)
    for g, r in zip(grads, ref_grads):
        close(g, r, tol=1e-12)
    assert float(grads[0][0, 1].abs().sum()) == 0.0  # an ignored target sends no gradient


def test_linear_token_logprobs_under_bf16_autocast_matches_the_unfused_path():
    """Under autocast both paths run the projection in bf16 and the softmax in float32: the same numbers."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 32, requires_grad=True)
    weight = torch.randn(50, 32) / 6
    targets = torch.randint(0, 50, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = token_logprobs(F.linear(hidden, weight), targets)
        out = linear_token_logprobs(hidden, weight, targets, chunk_rows=4, chunk_columns=16)
    assert out.dtype == torch.float32
    (ref_grad,) = torch.autograd.grad(ref.sum(), hidden)
    (grad,) = torch.autograd.grad(out.sum(), hidden)
    close(out, ref, tol=1e-5)
    close(grad, ref_grad, tol=2e-2)  # bf16 matmuls of the gradient on both sides
