"""Readers and collators for the alignment stages (SFT, reward model, DPO/IPO, PPO/GRPO).

File formats (JSON Lines, one record per line, blank lines skipped, unknown keys ignored)
-----------------------------------------------------------------------------------------
* **Conversations** (SFT), the OpenAI fine-tuning format::

      {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

  with at least one assistant message.  TRL's prompt-completion records
  ``{"prompt": str | messages, "completion": str | [assistant message]}`` are read too.  A record that offers
  tools (OpenAI's fine-tuning format for function calling) adds ``"tools": [...]`` (JSON-schema function tools);
  its assistant messages may then carry ``tool_calls`` and its ``tool`` messages the calls' results, and the
  conversation is read as a :class:`ToolConversation`, rendered with its tools.
* **Rankings** (reward model, DPO)::

      {"prompt": str | messages, "responses": [K strings], "ranking": [indices, best first]}

  with 2 <= K <= 9 and ``ranking`` a permutation of ``0..K-1``; or the pairwise (K = 2) form
  ``{"prompt", "chosen", "rejected"}``.  A prompt string is one user message; a list is a
  conversation that ends with a user turn.  A response may also be given TRL-style as a list
  holding one assistant message.
* **Unpaired feedback** (KTO), TRL's unpaired preference format::

      {"prompt": str | messages, "completion": str, "label": true | false}

  ``label`` true = desirable (thumbs up), false = undesirable (thumbs down).
* **Prompts** (RL, evaluation): ``{"prompt": str | messages}`` or ``{"messages": [...]}``,
  ending with a user turn.

The ``load_*`` functions raise :class:`DataError` with one line ``FILE:LINE: PROBLEM`` on the first malformed
record. They read every other format of :mod:`palmchat.data.formats` too (Open-Assistant, HH-RLHF, UltraFeedback,
OpenAI preference, ShareGPT, Alpaca; JSON, Parquet and ``datasets`` folders), detected from the records' keys or
named by ``format``. The training stages read through :func:`read_stage_data` instead: malformed rows are skipped and
reported in the stage's log (``FILE:ROW: PROBLEM``), and :func:`split_by_tree` holds out whole Open-Assistant trees.
An OpenAI ``weight`` of 0 on an assistant message is kept (``"weight": 0``) and :func:`encode_sft` puts no loss on
that reply.

Token-level helpers (pure functions on token ids)
-------------------------------------------------
* :func:`encode_sft` -- ``(ids, targets)``: next-token labels, ``-100`` off assistant tokens.
* :func:`scoring_sequence` -- ``prompt_ids + response_ids + [eot]``, what a reward model scores; too
  long sequences lose the *prompt's* oldest tokens first, bos kept (the reward is read at the eot).
  :func:`encode_response` is the same from messages and text.
* :func:`pad_right` / :func:`pad_left` -- padding is always explicit.
* :func:`scoring_sequences` / :func:`encode_ranking` -- the same for K responses of one prompt, which is
  truncated once so that every response sees the same prompt tokens.
* :func:`ranking_batch` -- all K responses of B rankings, flattened for one forward pass;
  :func:`group_by_ranking` turns per-response values back into the ``(B, K_max)`` layout of
  :func:`palmchat.losses.ranking_loss` / :func:`palmchat.losses.dpo_ranking_loss`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from palmchat.data.formats import (
    FEEDS,
    FORMAT_NAMES,
    MAX_RESPONSES,
    MIN_RESPONSES,
    Examples,
    FormatArgs,
    OasstFilters,
    Ranking,
    Unpaired,
    detect_format,
    file_format,
    iter_rows,
    parse_prompt,
    parse_ranking_record,
    parse_sft_record,
    parse_unpaired,
    read_examples,
    report_lines,
    tree_position,
    unpaired_from_rankings,
    without_cycle_collection,
)
from palmchat.losses import IGNORE_INDEX
from palmchat.utils.jsonl import DataError, RecordError, parse_records

__all__ = [
    "Ranking",
    "Unpaired",
    "load_unpaired",
    "unpaired_from_rankings",
    "MIN_RESPONSES",
    "MAX_RESPONSES",
    "load_conversations",
    "load_rankings",
    "load_prompts",
    "StageData",
    "read_stage_data",
    "split_by_tree",
    "EncodedSFT",
    "EncodedResponse",
    "encode_sft",
    "scoring_sequence",
    "encode_response",
    "encode_ranking",
    "scoring_sequences",
    "pad_right",
    "pad_left",
    "sft_batch",
    "ranking_batch",
    "group_by_ranking",
]

# =============================================================================================
# Reading: palmchat's own records keep their parsers' messages; every other format is read by formats.py
# =============================================================================================


def parse_ranking(record: dict) -> Ranking:
    """One ranking record (as found on a line of a rankings file) -> Ranking; DataError if malformed."""
    try:
        return parse_ranking_record(record)
    except RecordError as e:
        raise DataError(f"ranking record: {e}") from None


_WHAT = {"conversations": "SFT conversations", "rankings": "rankings or pairs", "prompts": "prompts",
         "unpaired": "unpaired examples"}
_PALMCHAT_RECORDS = {
    "conversations": "{'messages': [...]} or {'prompt', 'completion'}",
    "rankings": "{'prompt', 'responses', 'ranking'} or {'prompt', 'chosen', 'rejected'}",
    "prompts": "{'prompt'} or {'messages'}",
    "unpaired": "{'prompt', 'completion', 'label'}",
}


_PARSERS = {"conversations": parse_sft_record, "rankings": parse_ranking_record, "prompts": parse_prompt,
            "unpaired": parse_unpaired}


def _check_feeds(path, fmt: str, part: str, stage: str) -> None:
    """One clear error for a file whose format cannot give the stage's examples at all (Alpaca for DPO)."""
    if fmt not in FEEDS[part]:
        others = ", ".join(f for f in FEEDS[part] if f != "palmchat")
        raise DataError(f"{path}: {stage} needs {_WHAT[part]}, and this {fmt} file ({FORMAT_NAMES[fmt]}) has none: "
                        f"give palmchat records {_PALMCHAT_RECORDS[part]} or a file in one of these formats: {others}")


def _load(path, format: str, part: str, oasst: OasstFilters | None) -> list:
    """palmchat's own records through the stage's parser (``FILE:LINE: PROBLEM`` on the first malformed one);
    any other format through :func:`read_examples`, taking the stage's part."""
    fmt = file_format(path, format)
    _check_feeds(path, fmt, part, "this stage")
    if fmt == "palmchat":
        return parse_records(path, ((where, record) for where, _, record in iter_rows(path)), _PARSERS[part])
    examples = getattr(read_examples(path, fmt, strict=True, oasst=oasst), part)
    if not examples:
        raise DataError(f"{path}: this {fmt} file gives no {_WHAT[part]}")
    return examples


def load_conversations(path: str | os.PathLike, format: str = "auto",
                       oasst: OasstFilters | None = None) -> list[list[dict]]:
    """Read SFT conversations from a file of any format (:mod:`palmchat.data.formats`; ``format`` "auto" detects
    it) -> list of message lists.

    Messages are clean ``{"role", "content"}`` dicts (an assistant message of OpenAI ``weight`` 0 keeps
    ``"weight": 0``: :func:`encode_sft` puts no loss on it). Raises :class:`DataError` (``FILE:LINE: PROBLEM``)
    on the first malformed record.
    """
    return _load(path, format, "conversations", oasst)


def load_rankings(path: str | os.PathLike, format: str = "auto", oasst: OasstFilters | None = None) -> list[Ranking]:
    """Read K-wise rankings or chosen/rejected pairs (any format) -> :class:`Ranking` (responses best first).

    Raises :class:`DataError` (``FILE:LINE: PROBLEM``) on the first malformed record.
    """
    return _load(path, format, "rankings", oasst)


def load_unpaired(path: str | os.PathLike, format: str = "auto", oasst: OasstFilters | None = None) -> list[Unpaired]:
    """Read unpaired feedback (``{"prompt", "completion", "label"}`` per line; from a preference format: each
    ranking's best reply desirable, its worst undesirable) -> :class:`Unpaired`.

    Raises :class:`DataError` (``FILE:LINE: PROBLEM``) on the first malformed record.
    """
    return _load(path, format, "unpaired", oasst)


def load_prompts(path: str | os.PathLike, format: str = "auto", oasst: OasstFilters | None = None) -> list[list[dict]]:
    """Read prompts (``{"prompt": ...}`` or ``{"messages": [...]}``, or any format's prompts) -> message lists
    ending with a user turn.

    Raises :class:`DataError` (``FILE:LINE: PROBLEM``) on the first malformed record.
    """
    return _load(path, format, "prompts", oasst)


@dataclass
class StageData:
    """A stage's examples from its data files, and the Open-Assistant tree each one came from (None for every other
    format), so that :func:`split_by_tree` keeps a tree's examples on one side."""

    items: list
    trees: list[str | None]


def read_stage_data(paths: Sequence[str | os.PathLike], part: str, options: FormatArgs, stage: str) -> StageData:
    """A stage's examples (``part``: "conversations", "rankings", "prompts" or "unpaired") from files of any format,
    detected per file or named by ``options.format``, with ``options``' Open-Assistant filters.

    Each file's format, what it gave, what was dropped and its malformed rows (``FILE:ROW: PROBLEM``) are printed
    in the stage's log. A malformed row is skipped; a file that gives nothing (every row malformed or dropped, or a
    format that cannot feed the stage) is a DataError naming the file and why."""
    with without_cycle_collection():
        return _read_stage_data(paths, part, options, stage)


def _read_stage_data(paths, part: str, options: FormatArgs, stage: str) -> StageData:
    data = StageData([], [])
    filters = options.oasst_filters()
    for path in paths:
        fmt = file_format(path, options.format)
        _check_feeds(path, fmt, part, stage)
        if fmt == "palmchat":  # the stage's own parser: a ranking in an SFT file is malformed, not dropped
            examples = Examples(fmt)

            def bad(where: str, row: int, problem: str, examples=examples) -> None:
                examples.bad.append((row, f"{where}: {problem}"))
                examples.rows += 1

            for where, row, record in iter_rows(path, bad):
                examples.rows += 1
                try:
                    getattr(examples, part).append(_PARSERS[part](record))
                except RecordError as e:
                    examples.bad.append((row, f"{where}: {e}"))
        else:
            examples = read_examples(path, fmt, strict=False, oasst=filters)
        items = getattr(examples, part)
        print(f"{stage}: {path}: {FORMAT_NAMES[fmt]} (format {fmt}), {examples.rows} rows -> {len(items)} "
              f"{_WHAT[part]}")
        for line in report_lines(examples):
            print(f"{stage}:   {line}")
        if not items:
            raise DataError(_nothing_read(path, fmt, part, stage, examples, options.format))
        data.items += items
        data.trees += examples.trees.get(part, [None] * len(items))
    return data


def _nothing_read(path, fmt: str, part: str, stage: str, examples: Examples, named: str) -> str:
    """Why a file gave a stage nothing, in one line."""
    if not examples.rows:
        return f"{path}: no records"
    if examples.bad and not examples.dropped:
        hint = ""
        if named != "auto":
            for _, _, record in iter_rows(path, on_bad=lambda where, row, problem: None):
                hint = f" (--format {named} named it; its first record looks like {detect_format(record)})"
                break
        return (f"{path}: no row of this {fmt} file gives {stage} {_WHAT[part]}{hint}: all {len(examples.bad)} "
                f"malformed, the first at {examples.bad[0][1]}")
    reasons = "; ".join(f"{reason}: {len(rows)}" for reason, rows in sorted(examples.dropped.items()))
    return (f"{path}: this {fmt} file gives no {_WHAT[part]} for {stage} ({reasons}"
            + (f"; {len(examples.bad)} malformed rows" if examples.bad else "") + "): palmchat data inspect shows why")


def split_by_tree(items: Sequence, trees: Sequence[str | None], val_fraction: float, seed: int) -> tuple[list, list]:
    """``(train, validation)``, both shuffled by ``seed``.

    Items from Open-Assistant trees are split by tree (:func:`palmchat.data.formats.tree_split`: the trees whose
    place is below ``val_fraction``), so sibling replies never straddle the split, and ``palmchat data convert
    --split val`` with the same fraction and seed writes the same held-out trees; when no tree falls there and
    nothing else is held out, the lowest-placed tree is (so a file of one tree leaves nothing to train on). The other
    items are shuffled and the first ``max(1, int(n * val_fraction))`` held out."""
    loose = [x for x, tree in zip(items, trees) if tree is None]
    rng = random.Random(seed)
    rng.shuffle(loose)
    n_val = max(1, int(len(loose) * val_fraction)) if loose else 0
    val, train = loose[:n_val], loose[n_val:]
    ids = sorted({tree for tree in trees if tree is not None}, key=lambda tree: tree_position(tree, seed))
    if not ids:
        return train, val
    held = {tree for tree in ids if tree_position(tree, seed) < val_fraction}
    if not held and not val:
        held = {ids[0]}
    val += [x for x, tree in zip(items, trees) if tree in held]
    train += [x for x, tree in zip(items, trees) if tree is not None and tree not in held]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


# =============================================================================================
# Tokenisation
# =============================================================================================


class EncodedSFT(tuple):
    """``(ids, targets)``; unpacks as a pair.  ``truncated`` = tokens dropped from the right."""

    def __new__(cls, ids: list[int], targets: list[int], truncated: int = 0):
        self = super().__new__(cls, (ids, targets))
        self.truncated = truncated
        return self

    ids = property(lambda self: self[0])
    targets = property(lambda self: self[1])

    def __getnewargs__(self):  # keep pickling / copying working
        return (self[0], self[1], self.truncated)


class EncodedResponse(tuple):
    """``(ids, prompt_len)``; unpacks as a pair.

    ``prompt_truncated``: prompt tokens dropped (from the left, after bos);
    ``response_truncated``: response tokens dropped (only when the response alone does not fit).
    """

    def __new__(cls, ids: list[int], prompt_len: int, prompt_truncated: int = 0, response_truncated: int = 0):
        self = super().__new__(cls, (ids, prompt_len))
        self.prompt_truncated = prompt_truncated
        self.response_truncated = response_truncated
        return self

    ids = property(lambda self: self[0])
    prompt_len = property(lambda self: self[1])

    @property
    def truncated(self) -> bool:
        return bool(self.prompt_truncated or self.response_truncated)

    def __getnewargs__(self):
        return (self[0], self[1], self.prompt_truncated, self.response_truncated)


def encode_sft(tokenizer, messages: Sequence[Mapping], max_len: int) -> EncodedSFT:
    """Tokenise a conversation for SFT: ``(ids, targets)`` of equal length ``<= max_len``.

    With ``full, mask = tokenizer.chat_format.render(messages)``: ``ids = full[:-1]`` and
    ``targets[t] = full[t + 1]`` where ``mask[t + 1]`` is 1 (assistant content and its eot),
    else ``-100``.  So the model is trained to produce each assistant reply and to end it.

    An assistant message with ``"weight": 0`` (OpenAI's fine-tuning format) gets no targets: it is context.
    A :class:`ToolConversation` is rendered with its tools (tool calls are part of the reply, tool results not).

    Conversations longer than ``max_len`` input tokens are cut on the right; the result's
    ``.truncated`` says how many tokens were dropped.  A cut can remove every assistant token
    (all targets ``-100``): callers should skip such examples.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    tools = getattr(messages, "tools", None)  # a ToolConversation's
    render = tokenizer.chat_format.render
    full, mask = render(messages, tools=tools) if tools else render(messages)
    if any(m.get("weight") == 0 for m in messages):  # OpenAI's weight 0: the reply is context, not a target
        found = tokenizer.chat_format.message_starts(full)[-len(messages):]  # after a template's own system turn
        if [role for role, _ in found] != [m["role"] for m in messages]:
            raise ValueError(f"weight 0 on a reply: this chat format does not mark where each of the "
                             f"{len(messages)} messages starts, so the reply's tokens cannot be told apart")
        starts = [i for _, i in found]
        for m, start, end in zip(messages, starts, [*starts[1:], len(full)]):
            if m.get("weight") == 0:
                mask = mask[:start] + [0] * (end - start) + mask[end:]
    dropped = max(0, len(full) - 1 - max_len)
    if dropped:
        full, mask = full[: max_len + 1], mask[: max_len + 1]
    ids = full[:-1]
    targets = [tok if m else IGNORE_INDEX for tok, m in zip(full[1:], mask[1:])]
    return EncodedSFT(ids, targets, dropped)


def scoring_sequences(prompt_ids: Sequence[int], responses_ids: Sequence[Sequence[int]], max_len: int,
                      eot_id: int, max_prompt_len: int = 0) -> list[EncodedResponse]:
    """The sequences a model scores for one prompt and K responses, on token ids: ``prompt + response + [eot]``
    each, all with the SAME prompt tokens. The one truncation policy of palmchat (reward-model training,
    best-of-n, PPO/GRPO scoring, DPO, KTO):

    1. Each response ends with exactly one eot (a trailing eot in its ids is not repeated; a response cut short
       gets one, so it is scored as if it had ended there).
    2. The prompt is truncated ONCE, for all responses: it keeps its first token (bos) and its newest tokens, at
       most ``max_prompt_len`` in all (0 = no limit of its own) and no more than leaves the longest response
       whole in ``max_len``, but never fewer than 2 (bos and the ``<|assistant|>`` token). The cut may fall
       inside a message: a partial context is better than a partial answer.
    3. Only then is a response that still does not fit cut at its tail (its eot re-appended). A non-empty
       response of which not one token fits is a ValueError naming the limits, never an empty response.

    Counts of dropped tokens are on each result (``.prompt_truncated``, ``.response_truncated``).
    """
    if max_len < 3:
        raise ValueError(f"max_len must be >= 3 (bos, assistant token, eot), got {max_len}")
    if max_prompt_len and max_prompt_len < 2:
        raise ValueError(f"max_prompt_len must be >= 2 (bos and the assistant token), got {max_prompt_len}")
    prompt = [int(t) for t in prompt_ids]
    bodies = []
    for response in responses_ids:
        body = [int(t) for t in response]
        bodies.append(body[:-1] if body and body[-1] == eot_id else body)
    longest = max((len(b) + 1 for b in bodies), default=1)
    budget = max(2, max_len - longest)
    if max_prompt_len:
        budget = min(budget, max_prompt_len)
    prompt_dropped = max(0, len(prompt) - budget)
    if prompt_dropped:
        prompt = prompt[:1] + prompt[1 + prompt_dropped:]
    room = max_len - len(prompt) - 1  # response tokens that fit before the eot
    out = []
    for body in bodies:
        if body and room < 1:
            raise ValueError(f"nothing of a {len(body)}-token response fits: the prompt keeps {len(prompt)} of "
                             f"max_len {max_len} tokens and the eot needs one; raise --max-len or lower "
                             f"--max-prompt-len")
        response_dropped = max(0, len(body) - room)
        reply = body[:len(body) - response_dropped] + [eot_id]
        out.append(EncodedResponse(prompt + reply, len(prompt), prompt_dropped, response_dropped))
    return out


def scoring_sequence(prompt_ids: Sequence[int], response_ids: Sequence[int], max_len: int,
                     eot_id: int, max_prompt_len: int = 0) -> EncodedResponse:
    """The one sequence a reward model scores for a (prompt, response), on token ids: ``(ids, prompt_len)``.

    ``ids = prompt_ids + response_ids + [eot]``, truncated by :func:`scoring_sequences` (of which this is the
    one-response case): ``prompt_ids`` is a rendered prompt (bos first, the ``<|assistant|>`` token last); a too
    long sequence loses the prompt's oldest tokens after bos first, and the response's tail only if the response
    alone does not fit in ``max_len - 2`` tokens (or beside a prompt of ``max_prompt_len``).
    """
    return scoring_sequences(prompt_ids, [response_ids], max_len, eot_id, max_prompt_len)[0]


def encode_response(tokenizer, prompt_messages: Sequence[Mapping], response: str | Sequence[int],
                    max_len: int, max_prompt_len: int = 0) -> EncodedResponse:
    """``render_prompt(prompt_messages) + encode(response) + [eot]`` -> ``(ids, prompt_len)``, truncated to
    ``max_len`` by :func:`scoring_sequence` (the prompt's oldest tokens go first, bos stays).

    ``ids[:prompt_len]`` is the prompt (ending with the ``<|assistant|>`` token), ``ids[prompt_len:]``
    the response, whose LAST token is always the eot (where a reward model reads its score).
    ``response`` may be text or already-tokenised content ids (a trailing eot is not repeated).
    """
    return encode_ranking(tokenizer, prompt_messages, [response], max_len, max_prompt_len)[0]


def encode_ranking(tokenizer, prompt_messages: Sequence[Mapping], responses: Sequence[str | Sequence[int]],
                   max_len: int, max_prompt_len: int = 0) -> list[EncodedResponse]:
    """:func:`encode_response` for the K responses of one prompt: the prompt is rendered and truncated once, so
    every response sees the same prompt tokens (:func:`scoring_sequences`)."""
    bodies = [tokenizer.encode(r) if isinstance(r, str) else r for r in responses]
    return scoring_sequences(tokenizer.chat_format.render_prompt(prompt_messages), bodies, max_len,
                             tokenizer.chat_format.eot_id, max_prompt_len)


# =============================================================================================
# Collation
# =============================================================================================


def _as_lists(seqs) -> list[list[int]]:
    if isinstance(seqs, Tensor) or not isinstance(seqs, Sequence) or len(seqs) == 0:
        raise ValueError("expected a non-empty list of token-id sequences")
    return [s.tolist() if isinstance(s, Tensor) else list(s) for s in seqs]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad to the longest sequence: ``ids (N, T)`` long and ``lengths (N,)`` long.

    Real tokens of row ``i`` are ``ids[i, :lengths[i]]``.  A causal model needs no mask for right
    padding: real tokens never attend to the pads after them.
    """
    seqs = _as_lists(seqs)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), max(1, int(lengths.max()))), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, lengths


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad to the longest sequence: ``ids (N, T)`` long and ``padding_mask (N, T)`` bool,
    True on real tokens.  Pass the mask to the model (``padding_mask=``) so positions start at 0
    on each row's first real token and pads are never attended to."""
    seqs = _as_lists(seqs)
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = True
    return ids, mask


def sft_batch(tokenizer, conversations: Sequence[Sequence[Mapping]], max_len: int) -> dict[str, Tensor]:
    """Encode and right-pad conversations: ``ids``, ``targets`` (-100 on pads), ``lengths``,
    ``truncated`` (tokens dropped per conversation), all ``(N, ...)`` long tensors."""
    examples = [encode_sft(tokenizer, c, max_len) for c in conversations]
    ids, lengths = pad_right([e[0] for e in examples], tokenizer.chat_format.pad_id)
    targets, _ = pad_right([e[1] for e in examples], IGNORE_INDEX)
    truncated = torch.tensor([e.truncated for e in examples], dtype=torch.long)
    return {"ids": ids, "targets": targets, "lengths": lengths, "truncated": truncated}


def ranking_batch(tokenizer, rankings: Sequence[Ranking], max_len: int, max_prompt_len: int = 0) -> dict[str, Tensor]:
    """Flatten B rankings into N = sum(K_b) right-padded sequences for one forward pass.

    Rows are ranking by ranking, each ranking's responses best first; each ranking's prompt is truncated once,
    so all its responses see the same prompt tokens (:func:`encode_ranking`; ``max_prompt_len`` 0 = no limit
    beyond ``max_len``).  Returns long tensors:

    * ``ids (N, T)`` right-padded with ``tokenizer.chat_format.pad_id``; ``lengths (N,)``;
    * ``eot_index (N,)`` = ``lengths - 1``: each response's end-of-turn token (read rewards here);
    * ``prompt_lens (N,)``: the response is ``ids[i, prompt_lens[i]:lengths[i]]`` (eot included);
    * ``group (N,)`` index of the ranking, ``rank (N,)`` position within it (0 = best);
    * ``num_responses (B,)`` K of each ranking;
    * ``truncated (N,)`` 1 where :func:`encode_response` had to cut the sequence.

    :func:`group_by_ranking` maps any ``(N,)`` result (rewards, log-probs) to ``(B, K_max)``.
    """
    if len(rankings) == 0:
        raise ValueError("ranking_batch: no rankings")
    encoded, group, rank, num = [], [], [], []
    for b, r in enumerate(rankings):
        if len(r.responses) < MIN_RESPONSES:
            raise ValueError(f"ranking {b} has {len(r.responses)} response(s); need at least {MIN_RESPONSES}")
        num.append(len(r.responses))
        encoded.extend(encode_ranking(tokenizer, r.prompt_messages, r.responses, max_len, max_prompt_len))
        group.extend([b] * len(r.responses))
        rank.extend(range(len(r.responses)))
    ids, lengths = pad_right([e[0] for e in encoded], tokenizer.chat_format.pad_id)
    return {
        "ids": ids,
        "lengths": lengths,
        "eot_index": lengths - 1,
        "prompt_lens": torch.tensor([e[1] for e in encoded], dtype=torch.long),
        "group": torch.tensor(group, dtype=torch.long),
        "rank": torch.tensor(rank, dtype=torch.long),
        "num_responses": torch.tensor(num, dtype=torch.long),
        "truncated": torch.tensor([int(e.truncated) for e in encoded], dtype=torch.long),
    }


def group_by_ranking(values: Tensor, num_responses: Tensor, fill: float = 0.0) -> Tensor:
    """``(N,)`` per-response values in :func:`ranking_batch` order -> ``(B, K_max)``, column j =
    rank j, ``fill`` at padded columns.  Differentiable; feed to ``ranking_loss(x, num_responses)``."""
    num_responses = num_responses.to(values.device)
    if values.dim() != 1 or values.shape[0] != int(num_responses.sum()):
        raise ValueError(f"values must have shape ({int(num_responses.sum())},), got {tuple(values.shape)}")
    batch, k_max = num_responses.shape[0], int(num_responses.max())
    group = torch.repeat_interleave(torch.arange(batch, device=values.device), num_responses)
    starts = torch.cumsum(num_responses, 0) - num_responses
    rank = torch.arange(values.shape[0], device=values.device) - starts[group]
    out = values.new_full((batch, k_max), fill)
    return out.index_put((group, rank), values)
