"""Token-id generation engine: batched prefill into a KV cache, then one token per step for every live row.

There is no tokenizer in here (as in nanochat's engine.py): prompts and outputs are lists of token ids.

    engine = Engine(model)                                  # or Engine(model, dtype=torch.bfloat16)
    outs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=32, temperature=0.7, top_p=0.9))
    outs[0].tokens, outs[0].logprobs, outs[0].finish_reason

How a batch runs (B rows, prompts of different lengths):
1. prefill: the prompts, right-padded to the longest one, go through the model in one forward call that writes
   every position into a fresh KVCache; then `cache.lengths` is set to the true prompt lengths, so the padding
   slots are never attended to and the next tokens overwrite them. Each row's first next-token distribution is
   read at its last real token.
2. decode: one token per step for every live row. When rows finish, the batch is compacted (their cache rows are
   dropped), so the remaining rows run at the smaller batch size; the copy is cheap next to a decode step.

Sampling one step (Sampler, every setting a per-row tensor): the raw logits are adjusted by the request's
repetition penalty (over prompt + output), frequency and presence penalties (over the output so far), logit bias
and its logits processor (a constraint such as a JSON grammar), then divided by the temperature and filtered by
min-p, top-k and top-p before one token is drawn.

Log-probabilities are those of the distribution the token is drawn from *before* min-p/top-k/top-p filtering: the
log-softmax of the adjusted, temperature-scaled logits (of the adjusted logits when greedy). Without penalties,
bias or a processor they equal what a forward pass over prompt + response gives with its logits divided by the
same temperature, which is what the RL stages recompute (palmchat/train/rollout.py; tests/test_engine.py and
tests/test_rollout.py check it). A request with `logprobs` set also gets, per token, what OpenAI's API reports:
the token's log-prob under the raw model distribution (temperature 1, before any adjustment or filter) and the
`logprobs` most likely tokens there (TokenLogprobs).

`dtype` (decode speed of each choice: benchmarks/README.md):
- None: the model itself runs, in its own dtype. Nothing is copied, the numerics are exactly the model's, and
  weight updates (a PPO loop) are seen at once. The slowest choice.
- torch.bfloat16 (or torch.float32): a private inference copy of the model in that dtype, whose linear layers
  are palmchat.kernels.cpu_linear.PackedLinear on CPU (oneDNN's pre-packed kernel), and whose blocks, for
  decode steps of 1-4 rows in bf16, each run as one C call (palmchat.inference.fused_block). Decode on CPU is
  bound by reading every weight once per token: bf16 halves those bytes, so the bf16 copy is the fastest. Autocast
  (bf16 compute on the fp32 model) is not used: it re-casts every weight at every step, slower than either copy.
  The copy is rebuilt when the model's parameters change (their version counters move, as in load_state_dict, or
  any optimizer steps: fused AdamW does not move the counters), and it follows the model's active LoRA adapter.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from palmchat.inference.fused_block import fuse_blocks
from palmchat.inference.kv_cache import KVCache
from palmchat.kernels.cpu_linear import (
    QUANTIZATIONS,
    PackedLinear,
    can_pack,
    pack_linears,
    quantize_linears,
    quantized_linear,
)
from palmchat.model.lora import lora_layers

# ---------------------------------------------------------------------------------------------
# Requests and results
# ---------------------------------------------------------------------------------------------


MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (the legacy completions endpoint allows 5)


class LogitsProcessor(Protocol):
    """One row's constraint on what it may sample next (structured outputs: palmchat/serve/structured.py)."""

    def allowed(self, tokens: Sequence[int]) -> torch.Tensor | None:
        """The row's output so far -> a (V,) bool mask of the tokens it may sample next, or None (any)."""

    def advance(self, token: int) -> None:
        """The row sampled `token`."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # nucleus; 1.0 -> off
    stop_token_ids: tuple[int, ...] = ()  # e.g. end-of-turn; the stop token is included in the output tokens
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token-id sequences; output is truncated before the sequence
    seed: int | None = None  # per-request determinism
    # whose prefix-cache entries this request may reuse (vLLM's name): requests of different salts share none, so
    # one API key can never find out, by cached_tokens or by timing, what another one sent; None shares with None
    cache_salt: str | None = None
    # OpenAI's penalties, over the tokens generated so far: logit - frequency_penalty * count - presence_penalty *
    # (count > 0), each in [-2, 2]
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's and Hugging Face's (Keskar et al. 2019), over prompt + output: a logit of a token seen so far is divided
    # by it when positive and multiplied by it when negative; 1.0 -> off
    repetition_penalty: float = 1.0
    # token id -> bias in [-100, 100] added to its logit; -100 bans the token (as OpenAI documents)
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_p: float = 0.0  # keep tokens with probability >= min_p * the most likely one's (after temperature); 0 -> off
    logprobs: int | None = None  # report TokenLogprobs with this many top alternatives (0..20); None -> not reported
    # called once per row (n samples of a request get one each): that row's LogitsProcessor; None -> unconstrained
    new_logits_processor: Callable[[], LogitsProcessor] | None = None
    adapter: str | None = None  # the LoRA adapter the scheduler runs this request with (None: the base model)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"sampling params: {name}={getattr(self, name)!r} {why}")

        if self.max_new_tokens < 0:
            bad("max_new_tokens", "must be >= 0")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            bad("top_k", "must be >= 0 (0 is off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1] (1 is off)")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1] (0 is off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, "must be in [-2, 2]")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", "must be > 0 (1 is off)")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            bad("logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            bad("logit_bias", f"holds at most {MAX_LOGIT_BIAS_ENTRIES} entries")
        if any(not -100 <= b <= 100 for _, b in self.logit_bias):
            bad("logit_bias", "values must be in [-100, 100]")
        if any(t < 0 for t, _ in self.logit_bias):
            bad("logit_bias", "token ids must be >= 0")
        # accept lists from JSON callers; store tuples so the params stay hashable
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop_sequences", tuple(tuple(int(t) for t in s) for s in self.stop_sequences))
        if any(len(s) == 0 for s in self.stop_sequences):
            bad("stop_sequences", "must not contain an empty sequence")


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log-prob under the raw model distribution (temperature 1, before penalties, bias,
    constraints and filters: what OpenAI's API reports), and the `top` most likely (token id, log-prob) there."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Completion:
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    token_logprobs: list[TokenLogprobs] | None = None  # when the params asked for `logprobs`


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor | int = 0,
                  top_p: torch.Tensor | float = 1.0, min_p: torch.Tensor | float = 0.0) -> torch.Tensor:
    """logits: (B, V) -> (B, V), -inf outside each row's kept set.

    A row keeps the tokens whose probability is at least min_p times the most likely one's (0 keeps all: vLLM's
    min-p, applied first as vLLM does), of those its top_k largest logits (0 keeps all), then, of those, the
    smallest set taken from the most likely down whose probability mass is at least top_p (1.0 keeps all). As in
    Hugging Face transformers, top-p measures mass after the top-k cut. top_k, top_p, min_p: scalars or (B,)
    tensors, one value per row.
    """
    B, V = logits.shape
    top_k = torch.as_tensor(top_k, device=logits.device).expand(B)
    top_p = torch.as_tensor(top_p, dtype=torch.float32, device=logits.device).expand(B)
    min_p = torch.as_tensor(min_p, dtype=torch.float32, device=logits.device).expand(B)
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(V, device=logits.device)
    keep = rank[None, :] < torch.where(top_k > 0, top_k, V)[:, None]  # (B, V), in sorted order
    # p >= min_p * p_max  <=>  logit >= logit_max + log(min_p); the most likely token always stays
    keep &= sorted_logits >= sorted_logits[:, :1] + min_p.log()[:, None]
    probs = sorted_logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    # the most likely token always has mass_before 0 < top_p; `top_p >= 1` guards against cumsum rounding
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1)
    filtered = sorted_logits.masked_fill(~keep, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, filtered)


class Sampler:
    """Per-row sampling settings as (B,) tensors plus one torch.Generator per sampled row.

    The penalties need each row's token counts: a (B, V) tensor of output-token counts (frequency, presence) and
    a (B, V) mask of the tokens seen in prompt + output (repetition), built once from the rows' tokens when the
    sampler is made and updated with each sampled token, only when some row uses them. The logit bias is a (B, V)
    tensor made once.
    """

    def __init__(self, rows: list[Row], device, generators: list[torch.Generator | None] | None = None):
        """rows: the batch's rows (their params, prompts, outputs so far and logits processors); generators: their
        random streams carried over from an earlier batch (None entries: new ones)."""
        params = [r.params for r in rows]
        self.rows = rows
        self.temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        self.top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        self.min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
        self.greedy = self.temperature == 0
        self.generators: list[torch.Generator | None] = []  # None for greedy rows
        for p, g in zip(params, generators or [None] * len(params)):
            if g is None and p.temperature > 0:
                g = torch.Generator(device=device)
                # unseeded rows draw their seed from torch's global RNG, so torch.manual_seed makes them repeatable
                g.manual_seed(p.seed if p.seed is not None else int(torch.randint(2**62, ())))
            self.generators.append(g)
        self.device, self.vocab = device, None  # vocab: V, known at the first call
        self.frequency = self._column([p.frequency_penalty for p in params])
        self.presence = self._column([p.presence_penalty for p in params])
        self.repetition = self._column([p.repetition_penalty for p in params], off=1.0)
        self.counts = self.seen = self.bias = None  # (B, V) each, made at the first call when some row needs it
        self._refresh()

    def _column(self, values: list[float], off: float = 0.0) -> torch.Tensor | None:
        """(B, 1) per-row values, or None when every row has the `off` value."""
        if all(v == off for v in values):
            return None
        return torch.tensor(values, dtype=torch.float32, device=self.device)[:, None]

    def _refresh(self):
        self.report = max((r.params.logprobs for r in self.rows if r.params.logprobs is not None), default=None)
        self.all_greedy = bool(self.greedy.all())
        self.any_filter = bool(((self.top_k > 0) | (self.top_p < 1) | (self.min_p > 0)).any())

    def _make_state(self, V: int) -> None:
        """The count, seen and bias tensors, from the rows' tokens so far (once: later steps update them)."""
        self.vocab, B = V, len(self.rows)
        if self.frequency is not None or self.presence is not None:
            self.counts = torch.zeros(B, V, dtype=torch.float32, device=self.device)
            for b, r in enumerate(self.rows):
                if r.tokens:
                    self.counts[b] = torch.bincount(torch.tensor(r.tokens, device=self.device), minlength=V)[:V]
        if self.repetition is not None:
            self.seen = torch.zeros(B, V, dtype=torch.bool, device=self.device)
            for b, r in enumerate(self.rows):
                ids = [t for t in list(r.prompt) + r.tokens if t < V]
                if ids:
                    self.seen[b, torch.tensor(ids, device=self.device)] = True
        if any(r.params.logit_bias for r in self.rows):
            self.bias = torch.zeros(B, V, dtype=torch.float32, device=self.device)
            for b, r in enumerate(self.rows):
                for t, value in r.params.logit_bias:
                    if t < V:
                        # -100 bans the token: added as -inf, so that it is never sampled whatever its logit
                        self.bias[b, t] = float("-inf") if value <= -100 else value

    def keep(self, rows: list[int]):
        """Keep only these batch rows, in this order (finished rows leave the batch)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.temperature.device)
        self.temperature, self.top_k, self.top_p, self.min_p, self.greedy = (
            t[index] for t in (self.temperature, self.top_k, self.top_p, self.min_p, self.greedy))
        self.frequency, self.presence, self.repetition, self.counts, self.seen, self.bias = (
            None if t is None else t[index]
            for t in (self.frequency, self.presence, self.repetition, self.counts, self.seen, self.bias))
        self.generators = [self.generators[i] for i in rows]
        self.rows = [self.rows[i] for i in rows]
        self._refresh()

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: (B, V) raw -> (B, V) after repetition, frequency and presence penalties, logit bias and the
        rows' logits processors (a new tensor when anything changes, else `logits` itself)."""
        if self.vocab is None:
            self._make_state(logits.shape[-1])
        raw = logits
        if self.seen is not None:  # vLLM's repetition penalty: shrink a seen token's logit towards (below) zero
            penalised = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
            logits = torch.where(self.seen, penalised, logits)
        if self.counts is not None:  # OpenAI's: mu - c * alpha_frequency - (c > 0) * alpha_presence
            if self.frequency is not None:
                logits = logits - self.counts * self.frequency
            if self.presence is not None:
                logits = logits - (self.counts > 0).float() * self.presence
        if self.bias is not None:
            logits = logits + self.bias
        masks = [(b, self._allowed(r)) for b, r in enumerate(self.rows) if r.processor is not None]
        masks = [(b, m) for b, m in masks if m is not None]
        if masks:
            logits = logits.clone() if logits is raw else logits
            for b, allowed in masks:
                if len(allowed):
                    logits[b].masked_fill_(~allowed.to(logits.device)[: logits.shape[-1]], float("-inf"))
                else:
                    logits[b] = float("-inf")
        if masks or self.bias is not None:
            # a row left with no token at all (every one banned, or a constraint at a dead end) ends: only its
            # stop tokens stay, else it samples unconstrained, rather than failing the whole batch on NaNs
            for b in torch.nonzero(torch.isneginf(logits).all(dim=-1)).flatten().tolist():
                stops = [t for t in self.rows[b].params.stop_token_ids if t < logits.shape[-1]]
                logits[b] = raw[b]
                if stops:
                    keep = torch.zeros_like(logits[b], dtype=torch.bool)
                    keep[stops] = True
                    logits[b].masked_fill_(~keep, float("-inf"))
        return logits

    @staticmethod
    def _allowed(row: Row) -> torch.Tensor | None:
        """The row's processor's mask; a processor that fails ends its row (only its stop tokens stay allowed, and
        the error is kept in row.error for the caller to fail that request alone)."""
        if row.error is not None:
            return torch.zeros(0, dtype=torch.bool)  # nothing allowed: the row falls back to its stop tokens
        try:
            return row.processor.allowed(row.tokens)
        except Exception as e:
            row.error = e
            return torch.zeros(0, dtype=torch.bool)

    def __call__(self, logits: torch.Tensor) -> Sampled:
        """logits: (B, V) float32 -> the sampled tokens, their log-probs in the unfiltered (adjusted,
        temperature-scaled) distribution, and the raw ones of the rows that asked for them."""
        raw = logits
        logits = self.adjust(logits)
        if self.all_greedy:
            tokens = logits.argmax(dim=-1)  # (B,)
            logprobs = logits.log_softmax(dim=-1).gather(-1, tokens[:, None])[:, 0]
        else:
            scaled = logits / torch.where(self.greedy, 1.0, self.temperature)[:, None]  # (B, V)
            filtered = filter_logits(scaled, self.top_k, self.top_p, self.min_p) if self.any_filter else scaled
            probs = filtered.softmax(dim=-1)
            tokens = scaled.argmax(dim=-1)  # greedy rows keep this
            for i in torch.nonzero(~self.greedy).flatten().tolist():
                tokens[i] = torch.multinomial(probs[i], 1, generator=self.generators[i])[0]
            logprobs = scaled.log_softmax(dim=-1).gather(-1, tokens[:, None])[:, 0]
        B = len(self.rows)
        if self.counts is not None:
            self.counts[torch.arange(B, device=tokens.device), tokens] += 1
        if self.seen is not None:
            self.seen[torch.arange(B, device=tokens.device), tokens] = True
        if any(r.processor is not None for r in self.rows):
            for r, token in zip(self.rows, tokens.tolist()):
                if r.processor is not None and r.error is None:
                    try:
                        r.processor.advance(token)
                    except Exception as e:
                        r.error = e
        return Sampled(tokens, logprobs, self._reported(raw, tokens))

    def _reported(self, raw: torch.Tensor, tokens: torch.Tensor) -> list[TokenLogprobs | None]:
        """What OpenAI reports, for the rows that asked: the raw distribution's log-prob and top alternatives."""
        if self.report is None:
            return [None] * len(self.rows)
        raw_logprobs = raw.log_softmax(dim=-1)  # (B, V): temperature 1, nothing adjusted or filtered
        chosen = raw_logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
        top_values, top_ids = raw_logprobs.topk(max(self.report, 1), dim=-1) if self.report else (None, None)
        out = []
        for b, r in enumerate(self.rows):
            k = r.params.logprobs
            if k is None:
                out.append(None)
            else:
                top = tuple(zip(top_ids[b, :k].tolist(), top_values[b, :k].tolist())) if k else ()
                out.append(TokenLogprobs(chosen[b], top))
        return out


@dataclass
class Sampled:
    tokens: torch.Tensor  # (B,)
    logprobs: torch.Tensor  # (B,) in the distribution sampled from, before min-p/top-k/top-p
    reported: list[TokenLogprobs | None]  # per row: OpenAI's raw log-probs, for the rows whose params ask


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


@dataclass
class Row:
    """One request's output so far. `released` tokens were already streamed; the rest may still turn out to be
    the start of a stop sequence and are held back."""

    params: SamplingParams
    prompt: Sequence[int] = ()  # for the repetition penalty
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reported: list[TokenLogprobs | None] = field(default_factory=list)  # OpenAI's log-probs, when params ask
    released: int = 0
    finish_reason: str | None = None
    processor: LogitsProcessor | None = None  # made from params.new_logits_processor
    error: Exception | None = None  # what its processor raised: the row's request fails, not the batch

    def __post_init__(self):
        if self.params.new_logits_processor is not None and self.processor is None:
            self.processor = self.params.new_logits_processor()

    def add(self, token: int, logprob: float,
            reported: TokenLogprobs | None = None) -> list[tuple[int, float, TokenLogprobs | None]]:
        """Append one sampled token; return the (token, logprob, reported) triples that are now final."""
        p = self.params
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.reported.append(reported)
        if token in p.stop_token_ids:
            self.finish_reason = "stop"
        else:
            for seq in p.stop_sequences:
                if len(self.tokens) >= len(seq) and tuple(self.tokens[-len(seq):]) == seq:
                    del self.tokens[-len(seq):], self.logprobs[-len(seq):], self.reported[-len(seq):]
                    self.finish_reason = "stop"
                    break
        if self.finish_reason is None and len(self.tokens) >= p.max_new_tokens:
            self.finish_reason = "length"
        end = len(self.tokens) if self.finish_reason else len(self.tokens) - self._held_back()
        out = list(zip(self.tokens[self.released:end], self.logprobs[self.released:end],
                       self.reported[self.released:end]))
        self.released = max(self.released, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the output that is a proper prefix of a stop sequence."""
        best = 0
        for seq in self.params.stop_sequences:
            for n in range(min(len(seq) - 1, len(self.tokens)), best, -1):
                if tuple(self.tokens[-n:]) == seq[:n]:
                    best = n
                    break
        return best


class Engine:
    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None, quantize: str | None = None):
        """dtype: of the inference copy (None: decode with the model itself). quantize="int8": the copy's linear
        layers and output projection hold int8 weights with a scale per row (kernels/cpu_linear.Int8Linear);
        "int4": 4-bit weights with a scale per block of 32 (Int4Linear; int8 where a layer's input is not a
        multiple of 32 wide)."""
        if quantize not in (None, *QUANTIZATIONS):
            raise ValueError(f"quantize must be None or one of {', '.join(QUANTIZATIONS)}, not {quantize!r}")
        if quantize and dtype is None:
            raise ValueError(f"{quantize} weights are an inference copy's: give its dtype (bf16 or fp32)")
        self.model = model
        self.config = model.config
        self.dtype, self.quantize = dtype, quantize
        self._copy: nn.Module | None = None
        self._copy_versions: list | None = None
        # set by sync(): the copy's output projection, quantized or packed (its weight is the tied embedding or
        # lm_head's), or None
        self.packed_head = None

    # -- the module that runs --------------------------------------------------------------

    def _source_versions(self) -> tuple:
        # fused optimizers (AdamW(fused=True)) update parameters without bumping their version counters, so
        # every optimizer step anywhere in the process also counts as a change
        return _optimizer_steps, [(id(p), p._version) for p in self.model.parameters()]

    def sync(self) -> nn.Module:
        """The module used for decoding: the model itself (dtype=None) or its inference copy, rebuilt if stale."""
        if self.dtype is None:
            return self.model
        versions = self._source_versions()
        if self._copy is None or versions != self._copy_versions:
            with torch.inference_mode():
                runner = copy.deepcopy(self.model).to(self.dtype).eval().requires_grad_(False)
                # Transformer.logits reads lm_head.weight, so lm_head stays a plain Linear; the engine projects its
                # decode steps with a quantized or packed copy of the output weight instead
                head = None
                if self.quantize:
                    head = quantized_linear(runner.output_weight, None, self.quantize)
                    quantize_linears(runner, skip=("lm_head",), kind=self.quantize)
                    fuse_blocks(runner)  # where the decode kernel serves the quantized weights (bf16 copies)
                elif next(runner.parameters()).device.type == "cpu" and can_pack(self.dtype):
                    head = PackedLinear(runner.output_weight)
                    pack_linears(runner, skip=("lm_head",))
                    fuse_blocks(runner)
            self._copy, self._copy_versions, self.packed_head = runner, versions, head
        # which LoRA adapter is active (palmchat.model.lora) is module state, not a parameter: mirror it (the copy's
        # LoRA layers come in the same order, also inside fused blocks)
        for (_, module), (_, target) in zip(lora_layers(self.model), lora_layers(self._copy), strict=True):
            target.active_adapter, target.row_adapters, target.row_slots = (
                module.active_adapter, module.row_adapters, module.row_slots)
        return self._copy

    # -- context length ---------------------------------------------------------------------

    def clamp_max_new_tokens(self, prompt: Sequence[int], params: SamplingParams) -> SamplingParams:
        """params with max_new_tokens lowered so that prompt + response fit the model's context."""
        room = self.config.max_seq_len - len(prompt)
        if room < 0:
            raise ValueError(f"prompt of {len(prompt)} tokens is longer than the model's context of "
                             f"{self.config.max_seq_len} tokens")
        return params if params.max_new_tokens <= room else dataclasses.replace(params, max_new_tokens=room)

    def check(self, prompt: Sequence[int], params: SamplingParams):
        """Raise ValueError for a request that can never run: not a list of ids, empty, out of the vocabulary, or
        longer than the context with its max_new_tokens."""
        if isinstance(prompt, (int, str)):  # a flat list of ids passed as the batch
            raise ValueError("prompts must be a list of prompts, each a list of token ids (e.g. [[1, 2, 3]]), got "
                             f"{type(prompt).__name__} {prompt!r:.40} as a prompt")
        ctx, n = self.config.max_seq_len, len(prompt)
        if n == 0:
            raise ValueError("empty prompt: generation needs at least one prompt token")
        if n > ctx:
            raise ValueError(f"prompt of {n} tokens is longer than the model's context of {ctx} tokens")
        if n + params.max_new_tokens > ctx:
            raise ValueError(f"prompt of {n} tokens + max_new_tokens {params.max_new_tokens} = "
                             f"{n + params.max_new_tokens} tokens is longer than the model's context of {ctx} "
                             f"tokens (Engine.clamp_max_new_tokens fits it)")
        if min(prompt) < 0 or max(prompt) >= self.config.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")

    # -- generation -------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        rows = self._rows(prompts, params)
        for _ in self._decode(prompts, rows):
            pass
        return [Completion(r.tokens, r.logprobs, r.finish_reason,
                           r.reported if r.params.logprobs is not None else None) for r in rows]

    def stream(self, prompts: list[list[int]],
               params: SamplingParams | list[SamplingParams]) -> Iterator[list[tuple[int, int, float]]]:
        """Per decode step, the newly final (row index, token id, logprob) of the rows still generating.

        The tokens are exactly those `generate` returns. A token that may be the start of a stop sequence is
        held back until it is known not to be, so a step can release several tokens of one row, or none
        (steps that release nothing are not yielded). Bad requests raise here, before the first step.
        """
        return self._stream(prompts, self._rows(prompts, params))

    @torch.inference_mode()
    def _stream(self, prompts, rows) -> Iterator[list[tuple[int, int, float]]]:
        yield from self._decode(prompts, rows)

    def _rows(self, prompts, params) -> list[Row]:
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        for prompt, p in zip(prompts, params):
            self.check(prompt, p)
        return [Row(p, prompt) for prompt, p in zip(prompts, params)]

    def _decode(self, prompts: list[list[int]], rows: list[Row]) -> Iterator[list[tuple[int, int, float]]]:
        for r in rows:
            if r.params.max_new_tokens == 0:
                r.finish_reason = "length"
        live = [i for i, r in enumerate(rows) if r.finish_reason is None]  # batch slot -> row index
        if not live:
            return
        runner = self.sync()
        head = runner.logits if self.packed_head is None else self.packed_head  # (..., C) -> (..., V)
        param = next(runner.parameters())
        device, dtype = param.device, param.dtype
        # Per-row LoRA adapters (palmchat.model.lora.set_row_adapters) index the batch, so they follow its rows
        # when rows leave it; the caller's setting is restored at the end.
        row_adapters = [(m, m.row_slots) for m in runner.modules() if getattr(m, "row_slots", None) is not None]

        def keep_adapter_rows(batch: list[int]):
            for module, _ in row_adapters:
                module.row_slots = module.row_slots[torch.tensor(batch, device=module.row_slots.device)]

        try:
            if len(live) < len(rows):
                keep_adapter_rows(live)

            # prefill: right-padded prompts in one forward, then each row's cache length set to its real length
            lengths = torch.tensor([len(prompts[i]) for i in live], device=device)  # (B,)
            ids = torch.zeros(len(live), int(lengths.max()), dtype=torch.long, device=device)  # (B, T)
            for b, i in enumerate(live):
                ids[b, : len(prompts[i])] = torch.tensor(prompts[i], device=device)
            max_len = max(len(prompts[i]) + rows[i].params.max_new_tokens for i in live)
            cache = KVCache(self.config, len(live), max_len=max_len, dtype=dtype, device=device)
            hidden = runner.hidden_states(ids, cache=cache)  # (B, T, C)
            cache.lengths.copy_(lengths)
            last = hidden[torch.arange(len(live), device=device), lengths - 1]  # (B, C): each row's last real token
            logits = head(last).float()  # (B, V)

            # decode: sample one token per live row, release what is final, feed the tokens back
            sampler = Sampler([rows[i] for i in live], device)
            while True:
                sampled = sampler(logits)
                tokens = sampled.tokens  # (B,)
                for i in live:
                    if rows[i].error is not None:
                        raise rows[i].error
                events = []
                for i, token, logprob, reported in zip(live, tokens.tolist(), sampled.logprobs.tolist(),
                                                       sampled.reported):
                    events += [(i, t, lp) for t, lp, _ in rows[i].add(token, logprob, reported)]
                if events:
                    yield events
                still = [b for b, i in enumerate(live) if rows[i].finish_reason is None]
                if not still:
                    return
                if len(still) < len(live):  # compact: finished rows leave the batch
                    live = [live[b] for b in still]
                    cache.keep_rows(still)
                    sampler.keep(still)
                    keep_adapter_rows(still)
                    tokens = tokens[still]
                hidden = runner.hidden_states(tokens[:, None], cache=cache)  # (B, 1, C)
                logits = head(hidden[:, -1]).float()  # (B, V)
        finally:
            for module, slots in row_adapters:
                module.row_slots = slots


__all__ = ["SamplingParams", "Completion", "Engine", "Row", "Sampler", "Sampled", "TokenLogprobs", "LogitsProcessor",
           "filter_logits"]
