"""Loss functions for the palmchat PaLM + RLHF pipeline.

Every loss here is a pure function: tensors in, tensors out, no ``nn.Module``
state and no globals, so the same code serves pretraining, SFT, reward
modelling, DPO/IPO, PPO and GRPO and can be unit-tested on hand-made tensors.

Conventions
-----------
* ``B`` batch, ``T`` sequence length, ``V`` vocabulary, ``K`` responses per
  prompt (best first), ``N`` flat number of samples.
* Masks are boolean (or 0/1) tensors that mark *valid* positions. Masked-out
  positions never influence a result or receive gradient, even when they hold
  ``inf``/``nan`` garbage, because they are removed with ``torch.where``
  rather than multiplied by zero.
* Losses are computed in at least float32, whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_whiten",
    "cross_entropy",
    "token_logprobs",
    "linear_token_logprobs",
    "sequence_logprobs",
    "ranking_loss",
    "dpo_loss",
    "dpo_ranking_loss",
    "kto_loss",
    "kl_penalty",
    "gae",
    "ppo_policy_loss",
    "ppo_value_loss",
    "group_advantages",
]

IGNORE_INDEX = -100


def _float(x: Tensor) -> Tensor:
    """Upcast half-precision tensors to float32; keep float32/float64 as is."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# --------------------------------------------------------------------------- #
# Masked reductions
# --------------------------------------------------------------------------- #


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``mask`` is true.

    ``sum_i x_i * m_i`` over all elements (``dim=None``) or along ``dim``.

    Args:
        x (Tensor): values, any shape.
        mask (Tensor): bool or 0/1 tensor broadcastable to ``x``.
        dim (Optional[int]): reduction dim; ``None`` reduces everything.

    Returns:
        Tensor: scalar if ``dim`` is None, else ``x`` reduced along ``dim``.
    """
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over valid positions: ``sum(x * m) / sum(m)``.

    A reduction with no valid position returns 0 instead of NaN, so an
    all-padding micro-batch contributes nothing rather than poisoning the step.

    Args:
        x (Tensor): values, any shape.
        mask (Tensor): bool or 0/1 tensor broadcastable to ``x``.
        dim (Optional[int]): reduction dim; ``None`` reduces everything.

    Returns:
        Tensor: scalar if ``dim`` is None, else ``x`` reduced along ``dim``.
    """
    mask = mask.bool().expand_as(x)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1).to(x.dtype)


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """Whiten ``x`` using the statistics of valid positions only.

    ``(x - mu) / sqrt(var + eps)`` with ``mu = masked_mean(x)`` and the biased
    (``unbiased=False``) variance ``var = masked_mean((x - mu)^2)`` taken over
    all valid elements of the batch. With ``shift_mean=False`` the mean is added
    back (only the scale is normalised), as in TRL/OpenAI ``lm-human-preferences``.

    Args:
        x (Tensor): values, e.g. advantages of shape (B, T).
        mask (Tensor): bool or 0/1 tensor of the same shape.
        shift_mean (bool): if False, keep the original mean.
        eps (float): added to the variance for stability.

    Returns:
        Tensor: same shape as ``x``; masked-out positions are 0.
    """
    mask = mask.bool()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros_like(out))


# --------------------------------------------------------------------------- #
# Language modelling
# --------------------------------------------------------------------------- #


def cross_entropy(
    logits: Tensor,
    targets: Tensor,
    loss_mask: Tensor | None = None,
    z_loss: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Token-mean next-token cross-entropy plus the PaLM z-loss.

    With ``lse_t = logsumexp(logits_t)`` and valid tokens ``S``
    (``loss_mask`` true and target != -100):

        ce   = 1/|S| * sum_{t in S} (lse_t - logits_t[y_t])
        z    = 1/|S| * sum_{t in S} lse_t^2
        loss = ce + z_loss * z

    The z-loss (PaLM, Chowdhery et al. 2022, §5, https://arxiv.org/abs/2204.02311,
    coefficient 1e-4 there) pulls the softmax normaliser towards 1 for stability.
    Computed in float32 even for bf16 logits.

    Args:
        logits (Tensor): (B, T, V) (any leading dims work).
        targets (Tensor): (B, T) token ids; ``-100`` marks ignored tokens.
        loss_mask (Optional[Tensor]): (B, T) bool/0-1 mask of tokens to train on.
        z_loss (float): z-loss coefficient; 0 disables it.

    Returns:
        tuple[Tensor, Tensor]: scalar total loss (float32) and the detached mean
        squared log-normaliser ``z`` for logging.
    """
    logits = _float(logits)
    valid = targets != IGNORE_INDEX
    if loss_mask is not None:
        valid = valid & loss_mask.bool()
    lse = torch.logsumexp(logits, dim=-1)
    target_logits = logits.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ce = masked_mean(lse - target_logits, valid)
    z = masked_mean(lse.pow(2), valid)
    loss = ce + z_loss * z if z_loss else ce
    return loss, z.detach()


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """Log-probabilities of ``targets`` under ``logits``: ``logits[y] - logsumexp(logits)``.

    Avoids materialising a (B, T, V) ``log_softmax``. For half-precision inputs
    the float32 logsumexp is computed one batch row at a time, so the peak extra
    memory is a single (T, V) float32 row rather than an upcast copy of the batch.

    Args:
        logits (Tensor): (B, T, V).
        targets (Tensor): (B, T) token ids; negative ids (e.g. -100) give 0.

    Returns:
        Tensor: (B, T) log-probs in float32 (float64 if the logits are float64).
    """
    safe = targets.clamp_min(0)
    picked = _float(logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1))
    if logits.dtype in (torch.float16, torch.bfloat16):
        lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])
    else:
        lse = torch.logsumexp(logits, dim=-1)
    out = picked - lse
    return torch.where(targets < 0, torch.zeros_like(out), out)


class _LinearTokenLogprobs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T / temperature)[target] in blocks; see :func:`linear_token_logprobs`."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, chunk_rows: int,
                chunk_columns: int | None, compute_dtype: torch.dtype):
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        acc = _accumulate_dtype(compute_dtype)
        # with a frozen weight the gradient to each row's hidden state is its own scalar upstream gradient times a
        # fixed vector, d logp / d h = (W[y] - softmax @ W) / temperature: formed in the same pass over the
        # vocabulary as the log-normaliser, so backward needs neither the logits nor another matmul
        frozen = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        out = torch.empty(h.shape[0], dtype=acc, device=h.device)
        lse = torch.empty(h.shape[0], dtype=acc, device=h.device)
        jacobian = torch.empty(h.shape, dtype=acc, device=h.device) if frozen else None
        for rows in _row_chunks(h.shape[0], chunk_rows):
            lse[rows], picked, mean_weight = _online_log_normaliser(h[rows], w, targets[rows], temperature,
                                                                    chunk_columns, frozen)
            out[rows] = picked - lse[rows]
            if frozen:
                jacobian[rows] = (w[targets[rows].clamp_min(0)].to(acc) - mean_weight) / temperature
        ignored = targets < 0
        out.masked_fill_(ignored, 0.0)
        if frozen:
            jacobian.masked_fill_(ignored[:, None], 0.0)
        ctx.save_for_backward(hidden, weight, targets, jacobian if frozen else lse)
        ctx.temperature, ctx.chunk_rows, ctx.chunk_columns, ctx.compute_dtype = (temperature, chunk_rows,
                                                                                 chunk_columns, compute_dtype)
        ctx.frozen = frozen
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, targets, saved = ctx.saved_tensors
        acc = _accumulate_dtype(ctx.compute_dtype)
        grad_out = grad_out.to(acc).masked_fill(targets < 0, 0.0)
        if ctx.frozen:
            return (grad_out[:, None] * saved).to(hidden.dtype), None, None, None, None, None, None
        # the weight trains too: a second pass over the vocabulary with the log-normaliser known;
        # G = g * (onehot(y) - softmax) / temperature, dh = G @ W, dW = G^T h
        lse, temperature = saved, ctx.temperature
        h, w = hidden.to(ctx.compute_dtype), weight.to(ctx.compute_dtype)
        grad_h = torch.zeros(h.shape, dtype=acc, device=h.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if ctx.needs_input_grad[1] else None
        for rows in _row_chunks(h.shape[0], ctx.chunk_rows):
            g = grad_out[rows] / temperature
            safe = targets[rows].clamp_min(0)
            for cols in _column_chunks(w.shape[0], rows.stop - rows.start, ctx.chunk_columns):
                logits = (h[rows] @ w[cols].t()).to(acc)
                if temperature != 1.0:
                    logits.div_(temperature)
                grad_logits = logits.sub_(lse[rows, None]).exp_().mul_(-g[:, None])  # -g * softmax
                inside = (safe >= cols.start) & (safe < cols.stop)
                grad_logits[inside, safe[inside] - cols.start] += g[inside]
                grad_logits = grad_logits.to(ctx.compute_dtype)
                if grad_h is not None:
                    grad_h[rows] += (grad_logits @ w[cols]).to(acc)
                if grad_w is not None:
                    grad_w[cols] += (grad_logits.t() @ h[rows]).to(acc)
        return (grad_h.to(hidden.dtype) if grad_h is not None else None,
                grad_w.to(weight.dtype) if grad_w is not None else None, None, None, None, None, None)


def _row_chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _column_chunks(vocab: int, rows: int, columns: int | None) -> list[slice]:
    """Vocabulary tiles: ``columns`` wide, or by default as wide as keeps a float32 tile of logits near 4 MB
    (a core's L2 cache) with at least 256 columns, so a tile is written, read and reduced while it is in cache."""
    return _row_chunks(vocab, columns or max(256, (1 << 20) // max(rows, 1)))


def _online_log_normaliser(h: Tensor, w: Tensor, targets: Tensor, temperature: float, columns: int | None,
                           mean_weight: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """For rows ``h (R, C)`` and logits ``h @ w.T / temperature`` (divided in at least float32, as the engine's
    sampler does), computed one vocabulary tile at a time with a running maximum (the online softmax of Milakov and
    Gimelshein 2018, as flash attention uses it): the log-normaliser (R,), the target logits (R,) (column 0 for a
    negative target; callers mask it) and, with ``mean_weight``, ``softmax @ w`` (R, C), all in at least float32."""
    acc = _accumulate_dtype(h.dtype)
    rows = h.shape[0]
    running_max = torch.full((rows,), -math.inf, dtype=acc, device=h.device)
    total = torch.zeros(rows, dtype=acc, device=h.device)
    picked = torch.zeros(rows, dtype=acc, device=h.device)
    weighted = torch.zeros(h.shape, dtype=acc, device=h.device) if mean_weight else None
    safe = targets.clamp_min(0)
    for cols in _column_chunks(w.shape[0], rows, columns):
        logits = (h @ w[cols].t()).to(acc)
        if temperature != 1.0:
            logits.div_(temperature)
        inside = (safe >= cols.start) & (safe < cols.stop)
        picked[inside] = logits[inside, safe[inside] - cols.start]
        new_max = torch.maximum(running_max, logits.amax(1))
        rescale = torch.exp(running_max - new_max)  # 0 for the first tile (exp(-inf))
        probs = logits.sub_(new_max[:, None]).exp_()  # exp(logit - running max), in place
        total.mul_(rescale).add_(probs.sum(1))
        if weighted is not None:
            weighted.mul_(rescale[:, None]).add_((probs.to(h.dtype) @ w[cols]).to(acc))
        running_max = new_max
    if weighted is not None:
        weighted.div_(total[:, None])
    return running_max + total.log(), picked, weighted


def _accumulate_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision or float32 matmuls, float64 for float64 ones."""
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def linear_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                          chunk_rows: int = 1024, chunk_columns: int | None = None) -> Tensor:
    """``token_logprobs(hidden @ weight.T / temperature, targets)`` without the (..., V) logits: the output
    projection, the log-normaliser and the gradient run over blocks of rows and vocabulary tiles with an online
    softmax (the fused linear cross-entropy of Liger Kernel and Apple's Cut Cross-Entropy, Wijmans et al. 2024,
    https://arxiv.org/abs/2411.09009), so a 150k-token vocabulary costs one cache-sized tile of logits at a time
    instead of a float32 copy of all of them and of their gradient.

    The matmuls run in the autocast dtype when autocast is on (as ``F.linear`` would), else in the inputs'
    common dtype; the softmax in at least float32. With a frozen ``weight`` (LoRA, a reference model) the gradient
    to ``hidden`` is formed in the forward pass (one pass over the vocabulary, two matmuls per tile); when
    ``weight`` trains, backward makes a second pass.

    Args:
        hidden (Tensor): (..., C) hidden states.
        weight (Tensor): (V, C) output projection.
        targets (Tensor): (...) token ids; negative ids (e.g. -100) give 0 and no gradient.
        temperature (float): the logits are divided by it in float32 (a sampler's temperature).
        chunk_rows (int): rows per block.
        chunk_columns (Optional[int]): vocabulary tile width; default: a ~4 MB float32 tile of logits.

    Returns:
        Tensor: (...) log-probs in float32 (float64 for float64 inputs).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match targets {tuple(targets.shape)}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    flat = _LinearTokenLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                      float(temperature), chunk_rows, chunk_columns, compute_dtype)
    return flat.reshape(targets.shape)


def sequence_logprobs(logits: Tensor, ids: Tensor, prompt_lens: Tensor, lengths: Tensor,
                      mean: bool = False) -> Tensor:
    """Log-probability of each row's response under ``logits`` (right-padded rows).

    ``logits (N, T, V)`` are the model's outputs for ``ids (N, T)``; the response of row i is
    ``ids[i, prompt_lens[i]:lengths[i]]`` (its eot included), each token scored by the logits one
    position earlier.  Returns ``(N,)`` float32: the sum of the response tokens' log-probs, or
    with ``mean=True`` their average (IPO uses length-normalised log-probs).
    """
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match ids {tuple(ids.shape)}")
    if bool((prompt_lens < 1).any()):
        raise ValueError("prompt_lens must be >= 1 (the first token has no prediction)")
    logp = token_logprobs(logits[:, :-1], ids[:, 1:])  # (N, T-1): column j scores token j + 1
    pos = torch.arange(1, ids.shape[1], device=ids.device)[None, :]
    mask = (pos >= prompt_lens.to(ids.device)[:, None]) & (pos < lengths.to(ids.device)[:, None])
    total = masked_sum(logp, mask, dim=1)
    if mean:
        total = total / mask.sum(1).clamp_min(1).to(total.dtype)
    return total


# --------------------------------------------------------------------------- #
# Reward model
# --------------------------------------------------------------------------- #


def _pair_indices(k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Indices (w, l) of all C(k, 2) pairs with w ranked above l (w < l)."""
    idx = torch.triu_indices(k, k, offset=1, device=device)
    return idx[0], idx[1]


def _pair_valid(num_responses: Tensor | None, batch: int, k: int, loser: Tensor) -> Tensor:
    """(B, P) mask of pairs whose both members exist (the loser index is the larger)."""
    if num_responses is None:
        return torch.ones(batch, loser.numel(), dtype=torch.bool, device=loser.device)
    if num_responses.shape != (batch,):
        raise ValueError(f"num_responses must have shape ({batch},), got {tuple(num_responses.shape)}")
    if bool(((num_responses < 2) | (num_responses > k)).any()):
        raise ValueError(f"num_responses must be in [2, {k}], got {num_responses.tolist()}")
    return loser.unsqueeze(0) < num_responses.to(loser.device).unsqueeze(1)


def ranking_loss(
    rewards: Tensor, num_responses: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """InstructGPT K-wise ranking loss for the reward model.

    For one prompt with K responses ranked best first (Ouyang et al. 2022,
    eq. 1, https://arxiv.org/abs/2203.02155):

        loss = -1/C(K,2) * sum_{w < l} log sigmoid(r_w - r_l)

    All C(K,2) pairs of a prompt are kept together in one batch element (the
    paper's fix for overfitting when pairs are shuffled independently). The
    batch loss is the mean of per-prompt losses. For K=2 this is the usual
    pairwise loss ``-log sigmoid(r_chosen - r_rejected)``.

    Args:
        rewards (Tensor): (B, K_max); column j is the reward of the response
            ranked j-th (0 = best). Columns ``>= num_responses[b]`` are padding
            and may hold anything.
        num_responses (Optional[Tensor]): (B,) long, each row's K in
            ``[2, K_max]``; ``None`` means every row has ``K_max`` responses.

    Returns:
        tuple[Tensor, Tensor]: scalar loss and the detached pairwise accuracy,
        the fraction of valid pairs (over the batch) with ``r_w > r_l``.

    Raises:
        ValueError: if ``num_responses`` has the wrong shape or a value outside
            ``[2, K_max]``.
    """
    batch, k = rewards.shape
    win, lose = _pair_indices(k, rewards.device)
    valid = _pair_valid(num_responses, batch, k, lose)
    rewards = _float(rewards)
    # Zero invalid pairs *before* softplus so nan/inf padding cannot leak into
    # the forward value or the gradient.
    diff = torch.where(valid, rewards[:, win] - rewards[:, lose], torch.zeros((), device=rewards.device))
    per_prompt = masked_mean(F.softplus(-diff), valid, dim=1)  # -log sigmoid(d) = softplus(-d)
    accuracy = masked_mean((diff > 0).float(), valid)
    return per_prompt.mean(), accuracy.detach()


# --------------------------------------------------------------------------- #
# Direct preference optimisation
# --------------------------------------------------------------------------- #


def _preference_losses(
    h: Tensor, beta: float, loss_type: str, label_smoothing: float
) -> Tensor:
    """Elementwise DPO/IPO loss of the log-ratio margin ``h``."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type == "sigmoid":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        return (
            -F.logsigmoid(beta * h) * (1.0 - label_smoothing)
            - F.logsigmoid(-beta * h) * label_smoothing
        )
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"Unknown loss_type {loss_type!r}; expected 'sigmoid' or 'ipo'")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (sigmoid) or IPO preference loss.

    With ``h = (pi_c - ref_c) - (pi_r - ref_r)``:

    * ``"sigmoid"`` — DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290),
      with conservative DPO label smoothing ``eps`` as in TRL:
      ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
      Inputs are per-sequence **summed** token log-probs.
    * ``"ipo"`` — IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036):
      ``(h - 1/(2 beta))^2``. As in TRL the caller must pass the **average**
      per-token log-prob of each sequence (sum / number of response tokens);
      with sums the fixed target margin ``1/(2 beta)`` depends on length.

    Implicit rewards are ``beta * (pi - ref)`` for chosen and rejected.

    Args:
        policy_chosen_logps (Tensor): (B,) policy log-probs of chosen responses.
        policy_rejected_logps (Tensor): (B,) policy log-probs of rejected responses.
        ref_chosen_logps (Tensor): (B,) reference log-probs of chosen responses.
        ref_rejected_logps (Tensor): (B,) reference log-probs of rejected responses.
        beta (float): KL-strength / inverse temperature, > 0.
        loss_type (str): ``"sigmoid"`` or ``"ipo"``.
        label_smoothing (float): assumed label-flip probability in [0, 0.5);
            sigmoid loss only.

    Returns:
        tuple[Tensor, Tensor, Tensor]: scalar mean loss, detached chosen
        rewards (B,), detached rejected rewards (B,).

    Raises:
        ValueError: unknown ``loss_type``, ``beta <= 0`` or bad ``label_smoothing``.
    """
    chosen_ratio = _float(policy_chosen_logps) - _float(ref_chosen_logps)
    rejected_ratio = _float(policy_rejected_logps) - _float(ref_rejected_logps)
    losses = _preference_losses(chosen_ratio - rejected_ratio, beta, loss_type, label_smoothing)
    return losses.mean(), (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def dpo_ranking_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    num_responses: Tensor | None = None,
    beta: float = 0.1,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """All-pairs extension of :func:`dpo_loss` to K-wise rankings.

    Each prompt's loss is the mean of the pairwise DPO/IPO loss over its
    C(K,2) pairs (w ranked above l); the batch loss is the mean over prompts,
    mirroring :func:`ranking_loss`. For K=2 this equals :func:`dpo_loss`. This
    is the simple pairwise decomposition, not the full Plackett-Luce
    likelihood of Rafailov et al. 2023 (https://arxiv.org/abs/2305.18290, App. A.3).

    Args:
        policy_logps (Tensor): (B, K_max) policy log-probs, column j = rank j (0 best).
        ref_logps (Tensor): (B, K_max) reference log-probs, same layout.
        num_responses (Optional[Tensor]): (B,) long, each row's K in ``[2, K_max]``.
        beta (float): see :func:`dpo_loss`.
        loss_type (str): ``"sigmoid"`` or ``"ipo"`` (pass average log-probs for IPO).
        label_smoothing (float): see :func:`dpo_loss`.

    Returns:
        tuple[Tensor, Tensor]: scalar loss and detached implicit rewards
        ``beta * (policy - ref)`` of shape (B, K_max), 0 at padded columns.
    """
    batch, k = policy_logps.shape
    win, lose = _pair_indices(k, policy_logps.device)
    valid = _pair_valid(num_responses, batch, k, lose)
    ratio = _float(policy_logps) - _float(ref_logps)
    h = torch.where(valid, ratio[:, win] - ratio[:, lose], torch.zeros((), device=ratio.device))
    losses = _preference_losses(h, beta, loss_type, label_smoothing)
    loss = masked_mean(losses, valid, dim=1).mean()
    cols = torch.arange(k, device=ratio.device).unsqueeze(0)
    col_valid = cols < (num_responses.unsqueeze(1) if num_responses is not None else k)
    rewards = torch.where(col_valid, beta * ratio, torch.zeros((), device=ratio.device))
    return loss, rewards.detach()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_policy_logps: Tensor,
    kl_ref_logps: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """KTO, Kahneman-Tversky optimisation on unpaired desirable/undesirable completions.

    (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306; TRL's ``KTOTrainer``.) With the completion's
    log-ratio ``r = log pi(y|x) - log pi_ref(y|x)`` (summed token log-probs) and the reference point

        z = max(0, mean_j(log pi(y_j'|x_j) - log pi_ref(y_j'|x_j)))      (detached)

    estimated from mismatched pairs (x_j, y_j') -- a prompt with another example's completion -- the loss of
    one example is

        desirable:   lambda_D * (1 - sigmoid(beta * (r - z)))
        undesirable: lambda_U * (1 - sigmoid(beta * (z - r)))

    and the batch loss is the mean over examples (as TRL). The paper recommends
    ``lambda_D n_D / (lambda_U n_U)`` in [1, 4/3].

    Args:
        policy_logps (Tensor): (B,) policy log-probs of each example's completion.
        ref_logps (Tensor): (B,) reference log-probs of the same.
        desirable (Tensor): (B,) bool, True for a desirable (thumbs-up) example.
        kl_policy_logps (Tensor): (M,) policy log-probs of the mismatched pairs.
        kl_ref_logps (Tensor): (M,) reference log-probs of the mismatched pairs.
        beta (float): > 0.
        desirable_weight (float): lambda_D.
        undesirable_weight (float): lambda_U.

    Returns:
        tuple[Tensor, Tensor, Tensor]: scalar loss, detached implicit rewards ``beta * r`` (B,), and the
        reference point ``z`` (scalar, detached).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    r = _float(policy_logps) - _float(ref_logps)
    z = (_float(kl_policy_logps) - _float(kl_ref_logps)).mean().clamp_min(0).detach()
    desirable = desirable.bool().to(r.device)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - r))),
    )
    return losses.mean(), (beta * r).detach(), z


# --------------------------------------------------------------------------- #
# Policy-gradient RLHF (PPO / GRPO)
# --------------------------------------------------------------------------- #


def kl_penalty(
    logp: Tensor, ref_logp: Tensor, kind: Literal["k1", "k2", "k3"] = "k1"
) -> Tensor:
    """Per-token sample estimators of KL(pi || pi_ref) for tokens sampled from pi.

    With ``r = log pi_ref(x) - log pi(x)`` (Schulman, "Approximating KL
    Divergence", http://joschu.net/blog/kl-approx.html):

    * ``k1 = -r``              unbiased, high variance, can be negative;
    * ``k2 = r^2 / 2``         biased, low variance, >= 0;
    * ``k3 = exp(r) - r - 1``  unbiased, low variance, >= 0.

    Args:
        logp (Tensor): (B, T) log-probs of the sampled tokens under the policy.
        ref_logp (Tensor): (B, T) log-probs of the same tokens under the reference.
        kind (str): ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        Tensor: (B, T) per-token KL estimates (mask them yourself).

    Raises:
        ValueError: unknown ``kind``.
    """
    r = ref_logp - logp
    if kind == "k1":
        return -r
    if kind == "k2":
        return 0.5 * r**2
    if kind == "k3":
        # expm1 keeps precision when r ~ 0, where exp(r) - 1 would cancel.
        return torch.expm1(r) - r
    raise ValueError(f"Unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation over response tokens.

    (Schulman et al. 2015, https://arxiv.org/abs/1506.02438):

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t

    The episode ends after a row's last valid token: ``V`` and ``A`` past it
    are 0 (terminal), whatever ``values``/``rewards`` hold in the padding. An
    invalid position inside a row is likewise treated as an episode end.
    Computed without gradient: advantages and returns are PPO targets.

    Args:
        rewards (Tensor): (B, T) per-token rewards (e.g. -beta * KL plus the
            sequence reward on the last valid token).
        values (Tensor): (B, T) value estimates.
        mask (Tensor): (B, T) bool/0-1, true on valid response tokens.
        gamma (float): discount.
        lam (float): GAE lambda.

    Returns:
        tuple[Tensor, Tensor]: advantages (B, T) and returns (B, T), both 0 at
        masked positions and detached.
    """
    with torch.no_grad():
        m = mask.bool()
        zero = torch.zeros((), dtype=_float(values).dtype, device=values.device)
        values = torch.where(m, _float(values), zero)
        rewards = torch.where(m, _float(rewards), zero)
        cont = m.to(values.dtype)  # 1 where the *next* step still belongs to the episode
        T = rewards.shape[-1]
        adv = torch.zeros_like(values)
        last = torch.zeros_like(values[..., 0])
        next_value = torch.zeros_like(last)
        next_cont = torch.zeros_like(last)
        for t in reversed(range(T)):
            delta = rewards[..., t] + gamma * next_value * next_cont - values[..., t]
            last = delta + gamma * lam * next_cont * last
            adv[..., t] = last
            next_value, next_cont = values[..., t], cont[..., t]
        adv = torch.where(m, adv, zero)
        return adv, adv + values


def ppo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float | None = 0.2,
    *,
    loss_type: Literal["dapo", "grpo", "dr_grpo", "sequence"] = "dapo",
    max_len: int | None = None,
    num_seqs: int | None = None,
    num_tokens: int | Tensor | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate policy loss.

    (Schulman et al. 2017, https://arxiv.org/abs/1707.06347), with
    ``rho = exp(logp - old_logp)``, per token:

        l_t = -min(rho_t * A_t, clip(rho_t, 1 - eps, 1 + eps) * A_t) * w_t

    reduced over the batch by :func:`aggregate_token_loss` (``loss_type``;
    the default ``"dapo"`` is the masked mean over every token of the batch).
    ``w_t`` are optional importance weights (e.g. :func:`truncated_is_weights`),
    1 by default. ``old_logp``, ``advantages`` and ``is_weights`` are treated as
    constants (detached).

    Args:
        logp (Tensor): (B, T) log-probs of the taken tokens under the current policy.
        old_logp (Tensor): (B, T) log-probs under the policy that sampled them.
        advantages (Tensor): (B, T) advantages.
        mask (Tensor): (B, T) bool/0-1, true on valid response tokens.
        clip_eps (Optional[float]): clipping range epsilon; None (or <= 0) does
            not clip: the plain importance-weighted surrogate (REINFORCE's
            gradient at rho = 1).
        loss_type, max_len, num_seqs, num_tokens: the reduction, see
            :func:`aggregate_token_loss`.
        is_weights (Optional[Tensor]): (B, T) per-token weights of the loss.

    Returns:
        tuple[Tensor, dict[str, Tensor]]: scalar loss and detached stats:
        ``clipfrac`` (fraction of tokens where the clipped term is active),
        ``approx_kl`` (masked mean of the k3 estimator of KL(pi_old || pi),
        ``(rho - 1) - log rho``), ``ratio`` (masked mean of ``rho``) and
        ``ratio_max``.
    """
    old_logp, advantages = old_logp.detach(), advantages.detach()
    m = mask.bool()
    log_ratio = torch.where(m, logp - old_logp, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    if clip_eps is not None and clip_eps > 0:
        clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    else:
        clipped = unclipped
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    loss = aggregate_token_loss(per_token, m, loss_type, max_len=max_len, num_seqs=num_seqs, num_tokens=num_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), m),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, m),
            "ratio": masked_mean(ratio, m),
            "ratio_max": torch.where(m, ratio, torch.zeros_like(ratio)).max() if m.any() else ratio.new_ones(()),
        }
    return loss, stats


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    num_tokens: int | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO clipped value loss.

    ``V_clip = V_old + clip(V - V_old, -eps, eps)``;
    ``loss = 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))``
    (Schulman et al. 2017, https://arxiv.org/abs/1707.06347; the OpenAI
    baselines / TRL formulation).

    Args:
        values (Tensor): (B, T) current value predictions.
        old_values (Tensor): (B, T) value predictions at rollout time.
        returns (Tensor): (B, T) return targets (e.g. from :func:`gae`).
        mask (Tensor): (B, T) bool/0-1, true on valid response tokens.
        clip_eps (float): value clipping range.
        num_tokens (Optional[int]): the mean's denominator; default the valid
            tokens of this batch. A micro-batch of a larger optimizer batch
            passes the larger batch's count, so the micro-batches' losses add
            up to the larger batch's.

    Returns:
        tuple[Tensor, Tensor]: scalar loss and detached clip fraction
        (fraction of tokens where the clipped error is the larger one).
    """
    old_values, returns = old_values.detach(), returns.detach()
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * aggregate_token_loss(torch.maximum(err, err_clipped), mask, "dapo", num_tokens=num_tokens)
    clipfrac = masked_mean((err_clipped > err).float(), mask).detach()
    return loss, clipfrac


def group_advantages(
    rewards: Tensor,
    group_size: int,
    eps: float = 1e-6,
    scale: bool = True,
    unbiased: bool = False,
) -> Tensor:
    """GRPO group-relative advantages.

    (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300):
    ``rewards`` holds consecutive groups of G samples per prompt and

        A_i = (r_i - mean(group)) / (std(group) + eps)

    ``std`` is the population std (``unbiased=False``) by default, so each
    non-degenerate group's advantages have unit variance and G=2 gives ±1;
    TRL uses ``unbiased=True``, which shrinks advantages by sqrt((G-1)/G).
    ``scale=False`` only centres (Dr. GRPO, Liu et al. 2025,
    https://arxiv.org/abs/2503.20783). Groups whose rewards are all equal get
    exactly 0.

    Args:
        rewards (Tensor): (N,) scalar rewards, N = num_prompts * G.
        group_size (int): G, samples per prompt.
        eps (float): added to the std.
        scale (bool): divide by the group std.
        unbiased (bool): use Bessel's correction for the std.

    Returns:
        Tensor: (N,) advantages in float32 (or float64 for float64 input).

    Raises:
        ValueError: if ``rewards`` is not 1-D, ``group_size < 1`` or N is not
            divisible by ``group_size``.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of {group_size}")
    r = _float(rewards).view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        std = r.std(dim=1, keepdim=True, unbiased=unbiased) if group_size > 1 else torch.zeros_like(adv)
        adv = adv / (std + eps)
    # The float mean of identical values need not equal them exactly; force 0.
    degenerate = (r == r[:, :1]).all(dim=1, keepdim=True)
    adv = torch.where(degenerate, torch.zeros_like(adv), adv)
    return adv.view(-1)


# --------------------------------------------------------------------------- #
# Online RL: loss reductions, KL-shaped rewards, importance weights, RLOO
# --------------------------------------------------------------------------- #

__all__ += [
    "aggregate_token_loss",
    "kl_shaped_rewards",
    "truncated_is_weights",
    "leave_one_out_advantages",
]

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "sequence")


def aggregate_token_loss(
    loss: Tensor,
    mask: Tensor,
    loss_type: Literal["grpo", "dapo", "dr_grpo", "sequence"] = "dapo",
    *,
    max_len: int | None = None,
    num_seqs: int | None = None,
    num_tokens: int | Tensor | None = None,
) -> Tensor:
    """Reduce a (B, T) per-token loss over a batch of responses, as each paper defines it.

    With ``L_it`` the loss of token t of response i and ``|o_i|`` its length:

    * ``"grpo"``: ``1/N sum_i 1/|o_i| sum_t L_it`` — mean over each response's
      tokens, then over responses (Shao et al. 2024, DeepSeekMath eq. 3,
      https://arxiv.org/abs/2402.03300). A long response's tokens weigh less.
    * ``"dapo"``: ``sum_it L_it / sum_i |o_i|`` — one mean over every token of
      the batch (Yu et al. 2025, DAPO's token-level loss,
      https://arxiv.org/abs/2503.14476; PPO's usual masked mean).
    * ``"dr_grpo"``: ``sum_it L_it / (N * max_len)`` — a constant normaliser,
      so no length bias (Liu et al. 2025, "Understanding R1-Zero-Like
      Training", https://arxiv.org/abs/2503.20783; ``max_len`` is the
      generation budget, e.g. ``max_new_tokens``).
    * ``"sequence"``: ``1/N sum_i sum_t L_it`` — the loss of each whole
      sequence, averaged over sequences: REINFORCE on the sequence log-prob
      (RLOO, Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740).

    ``N`` and ``sum_i |o_i|`` are this batch's unless ``num_seqs`` /
    ``num_tokens`` are given: a micro-batch of a larger optimizer batch passes
    the larger batch's counts, so that the micro-batches' losses add up to the
    loss of the whole batch (gradient accumulation changes nothing).

    Args:
        loss (Tensor): (B, T) per-token loss.
        mask (Tensor): (B, T) bool/0-1, true on valid response tokens.
        loss_type (str): ``"grpo"``, ``"dapo"``, ``"dr_grpo"`` or ``"sequence"``.
        max_len (Optional[int]): ``"dr_grpo"``'s constant (required there).
        num_seqs (Optional[int]): N (default B).
        num_tokens (Optional[int]): ``"dapo"``'s token count (default the
            valid tokens of ``mask``).

    Returns:
        Tensor: scalar loss (0 for a batch without valid tokens).

    Raises:
        ValueError: unknown ``loss_type``, or ``"dr_grpo"`` without ``max_len``.
    """
    m = mask.bool()
    per_token = torch.where(m, _float(loss), torch.zeros((), dtype=_float(loss).dtype, device=loss.device))
    n = loss.shape[0] if num_seqs is None else num_seqs
    if loss_type == "grpo":
        per_seq = per_token.sum(-1) / m.sum(-1).clamp_min(1).to(per_token.dtype)
        return per_seq.sum() / max(n, 1)
    if loss_type == "dapo":
        count = m.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=loss.device)
        return per_token.sum() / count.clamp_min(1).to(per_token.dtype)
    if loss_type == "dr_grpo":
        if not max_len or max_len < 1:
            raise ValueError("loss_type 'dr_grpo' needs max_len (the generation budget) >= 1")
        return per_token.sum() / (max(n, 1) * max_len)
    if loss_type == "sequence":
        return per_token.sum() / max(n, 1)
    raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def kl_shaped_rewards(
    scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Per-token rewards of RLHF with a KL penalty in the reward (Ziegler et al.
    2019, https://arxiv.org/abs/1909.08593; InstructGPT eq. 2):

        r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t))   on every response token
        r_T += score                                        on the last one

    The KL term is the k1 estimator on purpose. A reward enters the gradient
    as ``E[R * grad log pi]``; with k1 that is ``grad KL(pi || pi_ref)``
    (``E[grad log pi] = 0``), the penalty asked for. With k3 =
    ``pi_ref/pi - 1 - log(pi_ref/pi)`` it is ``grad KL(pi || pi_ref) -
    grad KL(pi_ref || pi)``: an unbiased estimate of the KL's *value* whose
    gradient is not the KL's (Tang & Munos 2025, "On a few pitfalls in KL
    divergence gradient estimation for RL", https://arxiv.org/abs/2506.09477).
    k3 belongs in a loss that is differentiated, as GRPO uses it.

    Args:
        scores (Tensor): (B,) sequence scores.
        logp (Tensor): (B, T) log-probs of the response tokens under the policy.
        ref_logp (Tensor): (B, T) the same under the reference.
        mask (Tensor): (B, T) bool, true on response tokens (a prefix of each row).
        kl_coef (float): the penalty's weight.

    Returns:
        tuple[Tensor, Tensor]: rewards (B, T) (0 past each response) and the
        per-token KL (B, T) (0 past each response), both detached float32.

    Raises:
        ValueError: a row without response tokens (its score would have nowhere
        to go).
    """
    with torch.no_grad():
        m = mask.bool()
        lengths = m.sum(-1)
        if (lengths == 0).any():
            rows = torch.nonzero(lengths == 0).flatten().tolist()
            raise ValueError(f"rows {rows[:5]} have no response token: their score cannot be placed")
        zero = torch.zeros((), device=logp.device)
        kl = torch.where(m, _float(logp) - _float(ref_logp), zero)
        rewards = -kl_coef * kl
        rewards[torch.arange(len(lengths), device=logp.device), lengths - 1] += _float(scores).to(logp.device)
        return rewards, kl


def truncated_is_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling (TIS) weights for rollouts sampled by another
    engine than the trainer's forward (bf16 inference copy vs training):

        w_t = min(exp(logp_train_old - logp_rollout), cap)

    as verl and OpenRLHF apply to the policy-gradient loss (Yao et al. 2025,
    "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training",
    https://fengyao.notion.site/off-policy-rl). The tokens were drawn from the
    rollout engine's distribution, so the on-policy gradient needs this ratio;
    truncating at ``cap`` bounds its variance.

    Args:
        old_logp (Tensor): (B, T) log-probs under the trainer's forward at rollout time.
        rollout_logp (Tensor): (B, T) log-probs the engine sampled with.
        mask (Tensor): (B, T) bool, true on response tokens.
        cap (float): the truncation C (> 0).

    Returns:
        Tensor: (B, T) detached float32 weights, 1 past each response.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    with torch.no_grad():
        w = torch.exp(_float(old_logp) - _float(rollout_logp).to(old_logp.device)).clamp(max=cap)
        return torch.where(mask.bool(), w, torch.ones_like(w))


def leave_one_out_advantages(rewards: Tensor, k: int) -> Tensor:
    """RLOO advantages (Ahmadian et al. 2024, "Back to Basics",
    https://arxiv.org/abs/2402.14740; Kool et al. 2019): ``rewards`` holds
    consecutive groups of k samples of one prompt, and each sample's baseline is
    the mean reward of the other k - 1:

        A_i = r_i - 1/(k-1) sum_{j != i} r_j   ( = k/(k-1) (r_i - mean(group)) )

    Args:
        rewards (Tensor): (N,) rewards, N = prompts * k.
        k (int): samples per prompt, >= 2.

    Returns:
        Tensor: (N,) advantages in float32 (float64 for float64 input).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if k < 2 or rewards.numel() % k != 0:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of k={k} >= 2")
    r = _float(rewards).view(-1, k)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (k - 1)
    return (r - baseline).view(-1)
