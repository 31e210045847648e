"""Every data format the alignment stages read, detected from the records' keys, from every container.

Containers: JSON Lines, JSON (a list of objects), Parquet, and a local Hugging Face ``datasets`` folder
(``save_to_disk`` output, or a folder of parquet shards), read through the ``datasets`` package (imported only
then). Rows are numbered from 1: the line of a JSONL file, the item of a JSON list, the row of a table. Every
problem names ``FILE:ROW`` (``FILE:LINE`` for JSONL) and the field.

Formats (:data:`FORMATS`; :func:`detect_format` picks one from the first record's keys):

* ``palmchat`` -- palmchat's own records, which are also OpenAI's fine-tuning chat format (``messages``, with
  per-message ``weight`` 0/1) and TRL's (``prompt``/``completion``, ``prompt``/``chosen``/``rejected``,
  ``prompt``/``completion``/``label``); each stage parses them its own way (see :mod:`palmchat.data.chat`).
* ``oasst`` -- Open-Assistant's message-tree export (oasst1/oasst2 ``*.trees.jsonl``: one tree per row, a nested
  ``prompt`` with ``replies``); ``oasst-messages`` -- its flat table (one message per row, ``message_tree_id`` and
  ``parent_id`` linking them; the Hugging Face ``OpenAssistant/oasst1`` data set). SFT conversations are paths from
  the root (the best-ranked branch, or every leaf with ``branches="all"``); a ranking is a thread prefix ending in a
  prompter turn with its >= 2 ranked assistant replies, best (lowest ``rank``) first, at most K; prompts are every
  thread prefix ending in a prompter turn. Filters (:class:`OasstFilters`): deleted, synthetic, failed review
  (``review_result`` false), language, ``tree_state``; a dropped message takes its replies with it.
  :func:`tree_split` splits by tree, so siblings never straddle train and validation. A root's ``system_prompt``
  (palmchat's extension, written by ``palmchat feedback export --format oasst``) opens each of its threads as a
  system message.
* ``hh-rlhf`` -- Anthropic HH-RLHF (``chosen``/``rejected`` transcripts of "\\n\\nHuman: ..." and
  "\\n\\nAssistant: ..." turns): the shared prefix and the two final replies as a pair.
* ``ultrafeedback`` -- UltraFeedback's raw form (``instruction`` and ``completions`` with per-aspect ``Rating``s):
  a K-wise ranking by the mean of the numeric aspect ratings ("N/A" skipped; without any, ``fine-grained_score``,
  then ``overall_score``). Ties: completions are sorted by score, keeping file order among equals, and of each
  group of exactly tied completions only the first is kept, so no pair of the ranking is a tie; a row left with
  fewer than two distinct scores is dropped. Each completion's ``custom_system_prompt`` is not used (the
  responses of one ranking share one prompt).
  ``ultrafeedback-binarized`` -- ``prompt``, ``chosen``/``rejected`` as whole conversations, ``score_chosen``,
  ``score_rejected``; a pair with equal scores is dropped as a tie.
* ``openai-preference`` -- OpenAI's preference fine-tuning format (``input.messages``, ``preferred_output``,
  ``non_preferred_output``).
* ``sharegpt`` -- ``conversations`` of ``{"from": human|gpt|system, "value"}``.
* ``alpaca`` -- ``instruction``, optional ``input`` (appended to the instruction after a blank line), ``output``.

What each stage gets from a foreign format (:class:`Examples`): ``conversations`` (SFT), ``rankings`` (reward
model, DPO; pairs are rankings of two), ``prompts`` (PPO/GRPO/RLOO), ``unpaired`` (KTO: each ranking's best reply
desirable and its worst undesirable, as :func:`unpaired_from_rankings` makes them); :data:`FEEDS` says which
formats can feed each. :class:`FormatArgs` is the flags every stage and `palmchat data` take to read a file
(``--format``, the Open-Assistant filters).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from palmchat.tokenizer.tools import arguments_object, check_tools
from palmchat.utils.args import arg
from palmchat.utils.jsonl import DataError, RecordError, iter_records, json_type

__all__ = [
    "FORMATS",
    "ToolConversation",
    "parse_sft_record",
    "FORMAT_NAMES",
    "MIN_RESPONSES",
    "MAX_RESPONSES",
    "Ranking",
    "Unpaired",
    "Examples",
    "OasstFilters",
    "FormatArgs",
    "FEEDS",
    "iter_rows",
    "detect_format",
    "file_format",
    "read_examples",
    "without_cycle_collection",
    "tree_split",
    "tree_position",
    "report_lines",
    "parse_conversation",
    "parse_ranking_record",
    "parse_prompt",
    "parse_unpaired",
    "unpaired_from_rankings",
]

FORMATS = ("palmchat", "oasst", "oasst-messages", "hh-rlhf", "ultrafeedback", "ultrafeedback-binarized",
           "openai-preference", "sharegpt", "alpaca")
ROLE_NAMES = ("system", "user", "assistant")
MIN_RESPONSES, MAX_RESPONSES = 2, 9
FORMAT_NAMES = {
    "palmchat": "palmchat / OpenAI chat / TRL records",
    "oasst": "Open-Assistant message trees",
    "oasst-messages": "Open-Assistant messages (flat table)",
    "hh-rlhf": "Anthropic HH-RLHF",
    "ultrafeedback": "UltraFeedback (raw, per-aspect ratings)",
    "ultrafeedback-binarized": "UltraFeedback binarized",
    "openai-preference": "OpenAI preference fine-tuning",
    "sharegpt": "ShareGPT",
    "alpaca": "Alpaca",
}
_PREFERENCE_FORMATS = ("palmchat", "oasst", "oasst-messages", "hh-rlhf", "ultrafeedback", "ultrafeedback-binarized",
                       "openai-preference")
# which formats can give each stage's examples at all (a file of another format is refused before it is read)
FEEDS = {
    "conversations": FORMATS,
    "rankings": _PREFERENCE_FORMATS,
    "prompts": FORMATS,
    "unpaired": _PREFERENCE_FORMATS,
}


@dataclass
class Ranking:
    """One prompt with K >= 2 responses, ordered BEST FIRST."""

    prompt_messages: list[dict]
    responses: list[str]


@dataclass
class Unpaired:
    """One prompt with one completion judged desirable (True) or undesirable (False), as KTO takes them."""

    prompt_messages: list[dict]
    completion: str
    desirable: bool


def unpaired_from_rankings(rankings: Sequence[Ranking]) -> list[Unpaired]:
    """Two unpaired examples per ranking: its best response desirable, its worst undesirable."""
    return [x for r in rankings for x in (Unpaired(r.prompt_messages, r.responses[0], True),
                                          Unpaired(r.prompt_messages, r.responses[-1], False))]


# =============================================================================================
# Containers: rows from JSONL, JSON, Parquet and Hugging Face datasets folders
# =============================================================================================


def _is_datasets_folder(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "state.json").is_file()
                           or (p / "dataset_dict.json").is_file() or any(p.rglob("*.parquet")))


def _table_rows(path: Path) -> Iterator[dict]:
    """Rows of a Parquet file, a folder of parquet shards (read in name order, as ``datasets`` reads them) or a
    ``save_to_disk`` folder. Parquet is read by ``pyarrow`` directly (no cache written); ``save_to_disk`` output by
    the ``datasets`` package; both are imported only here."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet files and datasets folders needs the 'datasets' package "
                        "(pip install 'palmchat[data]')") from None
    def parquet(file: Path) -> Iterator[dict]:
        """The file's rows a record batch at a time (detecting a format reads only the first)."""
        try:
            for batch in pq.ParquetFile(file).iter_batches():
                yield from batch.to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
            raise DataError(f"{file}: not a readable Parquet file ({str(e).splitlines()[0]})") from None

    if path.is_file():
        yield from parquet(path)
        return
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        try:
            import datasets
        except ImportError:
            raise DataError(f"{path}: reading a save_to_disk folder needs the 'datasets' package "
                            "(pip install 'palmchat[data]')") from None
        try:
            table = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable save_to_disk folder ({str(e).splitlines()[0]})") from None
        if isinstance(table, datasets.DatasetDict):
            if len(table) != 1:
                raise DataError(f"{path}: a DatasetDict of {len(table)} splits ({', '.join(table)}); "
                                f"give one split's folder, e.g. {path / next(iter(table))}")
            table = next(iter(table.values()))
        yield from table
        return
    for shard in sorted(path.rglob("*.parquet")):
        yield from parquet(shard)


def _starts_with_bracket(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    return head.startswith("[")


def iter_rows(path: str | os.PathLike, on_bad: Callable[[str, int, str], None] | None = None
              ) -> Iterator[tuple[str, int, dict]]:
    """``(where, row number, record)`` for each record of a JSONL, JSON, Parquet file or datasets folder.

    ``where`` prefixes an error: ``FILE:LINE`` for JSONL, ``FILE:row N`` for the others. A row that is not a JSON
    object (a JSONL line that does not parse, an item of a JSON list) is a DataError, or with ``on_bad`` is passed to
    it as ``(where, row, problem)`` and skipped."""
    p = Path(path)
    if p.is_dir():
        if not _is_datasets_folder(p):
            raise DataError(f"{p}: a folder, but not a Hugging Face datasets folder (no state.json, "
                            "dataset_info.json or *.parquet)")
        for i, record in enumerate(_table_rows(p), start=1):
            yield f"{p}:row {i}", i, record
        return
    if not p.is_file():
        raise DataError(f"data file not found: {p}" if not p.exists() else f"not a file: {p}")
    if p.suffix == ".parquet":
        for i, record in enumerate(_table_rows(p), start=1):
            yield f"{p}:row {i}", i, record
        return
    if p.suffix == ".json" and _starts_with_bracket(p):  # a JSON list (``datasets``' to_json writes JSON Lines)
        try:
            items = json.loads(p.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not valid UTF-8 (byte {e.start + 1})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(items, list):
            raise DataError(f"{p}: a JSON file must hold a list of records, got {json_type(items)}")
        for i, record in enumerate(items, start=1):
            if not isinstance(record, dict):
                if on_bad is None:
                    raise DataError(f"{p}:item {i}: expected a JSON object, got {json_type(record)}")
                on_bad(f"{p}:item {i}", i, f"expected a JSON object, got {json_type(record)}")
                continue
            yield f"{p}:item {i}", i, record
        return
    for name, lineno, record in iter_records(p, on_bad):
        yield f"{name}:{lineno}", lineno, record


# =============================================================================================
# Detection
# =============================================================================================


def detect_format(record: dict) -> str:
    """The format of a record, from its keys (``palmchat`` when no other format's keys are there)."""
    keys = set(record)
    if "message_tree_id" in keys and isinstance(record.get("prompt"), dict):
        return "oasst"
    if {"message_id", "parent_id", "role", "text"} <= keys:
        return "oasst-messages"
    if "instruction" in keys and "completions" in keys:
        return "ultrafeedback"
    if "score_chosen" in keys or "score_rejected" in keys:
        return "ultrafeedback-binarized"
    if "preferred_output" in keys or "non_preferred_output" in keys:
        return "openai-preference"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if ({"chosen", "rejected"} <= keys and "prompt" not in keys and isinstance(record["chosen"], str)
            and _HH_TURN.search(record["chosen"])):
        return "hh-rlhf"
    return "palmchat"


def file_format(path: str | os.PathLike, format: str = "auto") -> str:
    """The format of a file: ``format`` itself unless "auto", else detected from its first readable record (a
    malformed line before it is reported by the reading, not here)."""
    if format != "auto":
        if format not in FORMATS:
            raise DataError(f"unknown data format {format!r}: one of auto, {', '.join(FORMATS)}")
        return format
    for _, _, record in iter_rows(path, on_bad=lambda where, row, problem: None):
        return detect_format(record)
    for _ in iter_rows(path):  # no readable record: the first malformed one is the error
        pass
    raise DataError(f"{path}: no records")


# =============================================================================================
# palmchat's own records (each stage's parser)
# =============================================================================================


def _messages(value: object, where: str) -> list[dict]:
    """Validate a list of ``{"role", "content"}`` messages; returns clean copies (an OpenAI ``weight`` of 0 on an
    assistant message is kept as ``"weight": 0``: SFT puts no loss on that reply)."""
    if not isinstance(value, list):
        raise RecordError(f"{where} must be a list of {{\"role\", \"content\"}} objects, got {json_type(value)}")
    if not value:
        raise RecordError(f"{where} is empty")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RecordError(f"{where}[{i}] must be an object with \"role\" and \"content\", got {json_type(m)}")
        if "role" not in m:
            raise RecordError(f"{where}[{i}] has no \"role\"")
        role = m["role"]
        if role not in ROLE_NAMES:
            raise RecordError(f"{where}[{i}].role {role!r} is not one of {', '.join(ROLE_NAMES)}")
        if "content" not in m:
            raise RecordError(f"{where}[{i}] has no \"content\"")
        if not isinstance(m["content"], str):
            raise RecordError(f"{where}[{i}].content must be a string, got {json_type(m['content'])}")
        clean = {"role": role, "content": m["content"]}
        if m.get("weight") is not None:
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                raise RecordError(f"{where}[{i}].weight must be 0 or 1, got {json.dumps(m['weight'])}")
            if role != "assistant":
                raise RecordError(f"{where}[{i}].weight is only for assistant messages, this one is {role!r}")
            if m["weight"] == 0:
                clean["weight"] = 0
        out.append(clean)
    return out


def _prompt(value: object, where: str) -> list[dict]:
    """A prompt string (one user message) or a conversation ending with a user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise RecordError(f"\"{where}\" must be a string or a list of messages, got {json_type(value)}")
    messages = _messages(value, where)
    if messages[-1]["role"] != "user":
        raise RecordError(f"\"{where}\" must end with a user message, but the last one is {messages[-1]['role']!r}")
    return messages


def _response(value: object, where: str) -> str:
    """A response string, or TRL's conversational form: a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        messages = _messages(value, where)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise RecordError(f"{where} must be a string or a list of exactly one assistant message")
        return messages[0]["content"]
    raise RecordError(f"{where} must be a string, got {json_type(value)}")


def parse_conversation(record: dict) -> list[dict]:
    """An SFT record (``messages``, or TRL's ``prompt`` + ``completion``) -> messages; RecordError if malformed."""
    if "messages" in record:
        messages = _messages(record["messages"], "messages")
    elif "prompt" in record and "completion" in record:  # TRL prompt-completion format
        messages = _prompt(record["prompt"], "prompt")
        messages.append({"role": "assistant", "content": _response(record["completion"], "completion")})
    else:
        raise RecordError("missing \"messages\"")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no assistant message (nothing to train on)")
    return messages


def _without_weights(messages: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_ranking_record(record: dict) -> Ranking:
    """A K-wise ranking or a chosen/rejected pair -> :class:`Ranking`; RecordError if malformed."""
    if "prompt" not in record:
        raise RecordError("missing \"prompt\"")
    prompt = _without_weights(_prompt(record["prompt"], "prompt"))
    has_k, has_pair = "responses" in record or "ranking" in record, "chosen" in record or "rejected" in record
    if has_k and has_pair:
        raise RecordError("give either \"responses\" + \"ranking\" or \"chosen\" + \"rejected\", not both")
    if has_pair:
        for key in ("chosen", "rejected"):
            if key not in record:
                raise RecordError(f"missing \"{key}\"")
        return Ranking(prompt, [_response(record["chosen"], "\"chosen\""),
                                _response(record["rejected"], "\"rejected\"")])
    if not has_k:
        raise RecordError("missing \"responses\" + \"ranking\" (or \"chosen\" + \"rejected\")")
    for key in ("responses", "ranking"):
        if key not in record:
            raise RecordError(f"missing \"{key}\"")
    responses, ranking = record["responses"], record["ranking"]
    if not isinstance(responses, list):
        raise RecordError(f"\"responses\" must be a list of strings, got {json_type(responses)}")
    if not MIN_RESPONSES <= len(responses) <= MAX_RESPONSES:
        raise RecordError(f"\"responses\" must hold {MIN_RESPONSES} to {MAX_RESPONSES} responses, got {len(responses)}")
    responses = [_response(r, f"responses[{i}]") for i, r in enumerate(responses)]
    k = len(responses)
    if (not isinstance(ranking, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ranking)
            or sorted(ranking) != list(range(k))):
        raise RecordError(f"\"ranking\" must be a permutation of 0..{k - 1}, got {json.dumps(ranking)}")
    return Ranking(prompt, [responses[i] for i in ranking])


def parse_unpaired(record: dict) -> Unpaired:
    """TRL's unpaired preference record (``prompt``, ``completion``, ``label``) -> :class:`Unpaired`."""
    for key in ("prompt", "completion", "label"):
        if key not in record:
            raise RecordError(f"missing \"{key}\" (unpaired feedback: {{\"prompt\", \"completion\", \"label\"}})")
    if not isinstance(record["label"], bool):
        raise RecordError(f"\"label\" must be true (desirable) or false (undesirable), "
                          f"got {json.dumps(record['label'])}")
    return Unpaired(_without_weights(_prompt(record["prompt"], "prompt")),
                    _response(record["completion"], "\"completion\""), record["label"])


class ToolConversation(list):
    """An SFT conversation from a record that offers tools: its messages (a list, as every conversation is) and
    ``tools``, which :func:`encode_sft` renders with them. Assistant messages may carry ``tool_calls`` (each call's
    arguments as the object their JSON text holds, as chat templates write them), ``tool`` messages hold results."""

    def __init__(self, messages: Sequence[dict], tools: Sequence[dict]):
        super().__init__(messages)
        self.tools = list(tools)


def parse_sft_record(record: dict) -> list[dict]:
    """An SFT record -> its messages (:func:`parse_conversation`), or for a record with ``"tools"`` a
    :class:`ToolConversation`; RecordError if malformed."""
    if "tools" not in record:
        return parse_conversation(record)
    try:
        check_tools(record["tools"])
    except ValueError as e:
        raise RecordError(f"\"tools\": {e}") from None
    value = record.get("messages")
    if not isinstance(value, list) or not value:
        raise RecordError("a record with \"tools\" needs \"messages\": a non-empty list of messages")
    messages = [_tool_message(m, f"messages[{i}]") for i, m in enumerate(value)]
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no assistant message (nothing to train on)")
    return ToolConversation(messages, record["tools"])


def _tool_message(message: object, where: str) -> dict:
    """One message of a conversation with tools: system, user, assistant (content and/or ``tool_calls``) or tool."""
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool"):
        raise RecordError(f"{where} must be an object whose role is system, user, assistant or tool")
    role, content = message["role"], message.get("content")
    calls = message.get("tool_calls") if role == "assistant" else None
    if calls is not None and not isinstance(calls, list):
        raise RecordError(f"{where}.tool_calls must be a list")
    if not isinstance(content, str) and not (content is None and calls):
        raise RecordError(f"{where}.content must be a string")
    clean = {"role": role, "content": content}
    if calls:
        clean["tool_calls"] = [_tool_call(call, f"{where}.tool_calls[{k}]") for k, call in enumerate(calls)]
    if role == "assistant" and message.get("weight") == 0:
        clean["weight"] = 0
    return clean


def _tool_call(call: object, where: str) -> dict:
    """A call as templates take it: its arguments' JSON text (OpenAI's wire form) read into the object it holds."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or "arguments" not in function:
        raise RecordError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}")
    return {"type": "function",
            "function": {"name": function["name"], "arguments": arguments_object(function["arguments"])}}


def parse_prompt(record: dict) -> list[dict]:
    """A prompt record (``prompt`` or ``messages``, ending with a user turn) -> messages."""
    if "prompt" in record:
        return _without_weights(_prompt(record["prompt"], "prompt"))
    if "messages" in record:
        return _without_weights(_prompt(record["messages"], "messages"))
    raise RecordError("missing \"prompt\" (or \"messages\")")


# =============================================================================================
# What each stage gets from a file
# =============================================================================================


@dataclass
class Examples:
    """What one file gives each stage, and what it dropped.

    ``dropped``: reason -> row numbers (rows filtered on purpose: deleted, synthetic, ties, ...);
    ``bad``: ``(row, "WHERE: PROBLEM")`` of malformed rows (only when read with ``strict=False``);
    ``trees`` (Open-Assistant only): for each part ("conversations", "rankings", "prompts", "unpaired") the id of
    the tree each of its items came from, so a stage can split train and validation by tree."""

    format: str
    rows: int = 0
    conversations: list[list[dict]] = field(default_factory=list)
    rankings: list[Ranking] = field(default_factory=list)
    prompts: list[list[dict]] = field(default_factory=list)
    unpaired: list[Unpaired] = field(default_factory=list)
    dropped: dict[str, list[int]] = field(default_factory=dict)
    bad: list[tuple[int, str]] = field(default_factory=list)
    trees: dict[str, list[str]] = field(default_factory=dict)  # Open-Assistant: part -> the tree id of each item

    def drop(self, reason: str, row: int) -> None:
        self.dropped.setdefault(reason, []).append(row)


@dataclass
class OasstFilters:
    """Which Open-Assistant messages and trees are kept, and how conversations are drawn from a tree."""

    tree_state: str = "ready_for_export"  # "" keeps every state
    langs: tuple[str, ...] = ()  # () keeps every language
    keep_deleted: bool = False
    keep_synthetic: bool = False
    keep_failed_review: bool = False
    branches: str = "best"  # "best": the best-ranked path of each tree; "all": a path to every leaf
    max_responses: int = MAX_RESPONSES  # K: a ranking keeps its best K replies
    split: str = ""  # "" = every tree; "train" / "val": the trees tree_split puts there
    val_fraction: float = 0.05
    seed: int = 0


@dataclass
class FormatArgs:
    """How a data file is read, as flags (every stage's --data / --prompts, and `palmchat data inspect|convert`):
    the format, and which Open-Assistant messages and branches are kept. A stage's argument dataclass lists it
    among its bases."""

    format: str = arg("auto", "the data's format; auto = detected from each file's records (palmchat data inspect "
                              "FILE shows it)", choices=["auto", *FORMATS])
    lang: list[str] = arg([], "Open-Assistant: keep only messages in these languages (e.g. --lang en de); "
                              "default: every language")
    tree_state: str = arg("ready_for_export", "Open-Assistant: keep only trees in this state; '' = every state")
    keep_deleted: bool = arg(False, "Open-Assistant: keep deleted messages")
    keep_synthetic: bool = arg(False, "Open-Assistant: keep synthetic messages")
    keep_failed_review: bool = arg(False, "Open-Assistant: keep messages whose review failed")
    oasst_branches: str = arg("best", "Open-Assistant SFT: the best-ranked path of each tree, or a path to every "
                                      "leaf", choices=["best", "all"])
    max_responses: int = arg(MAX_RESPONSES, "Open-Assistant rankings: keep the best K ranked replies of a prompt")

    def oasst_filters(self, split: str = "", val_fraction: float = 0.05, seed: int = 0) -> OasstFilters:
        if not MIN_RESPONSES <= self.max_responses <= MAX_RESPONSES:
            raise ValueError(f"--max-responses must be in [{MIN_RESPONSES}, {MAX_RESPONSES}], "
                             f"got {self.max_responses}")
        return OasstFilters(tree_state=self.tree_state, langs=tuple(self.lang), keep_deleted=self.keep_deleted,
                            keep_synthetic=self.keep_synthetic, keep_failed_review=self.keep_failed_review,
                            branches=self.oasst_branches, max_responses=self.max_responses, split=split,
                            val_fraction=val_fraction, seed=seed)


def tree_position(tree_id: str, seed: int = 0) -> float:
    """A tree's place in [0, 1), a pure function of (seed, tree id): the trees below ``val_fraction`` are held
    out."""
    digest = hashlib.sha256(f"{seed}:{tree_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def tree_split(tree_id: str, val_fraction: float, seed: int = 0) -> str:
    """``"train"`` or ``"val"`` for a tree, a pure function of (seed, tree id): every message and ranking of one
    tree lands on the same side, whatever else the file holds."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return "val" if tree_position(tree_id, seed) < val_fraction else "train"


@contextlib.contextmanager
def without_cycle_collection():
    """Pause Python's cyclic garbage collector while a file is read: the readers allocate millions of small dicts
    and lists and no reference cycles, and the collector's repeated passes over the growing heap took most of the
    time of reading an Open-Assistant export (benchmarks/README.md). Plain reference counting still frees memory."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_examples(path: str | os.PathLike, format: str = "auto", strict: bool = True,
                  oasst: OasstFilters | None = None) -> Examples:
    """Read a file of any format into what each stage would get (:class:`Examples`).

    ``strict``: the first malformed row raises a DataError naming ``FILE:ROW`` and the field; otherwise malformed
    rows are skipped and listed in ``bad``."""
    with without_cycle_collection():
        return _read_examples(path, format, strict, oasst)


def _read_examples(path, format: str, strict: bool, oasst: OasstFilters | None) -> Examples:
    fmt = file_format(path, format)
    out = Examples(fmt)

    def bad(where: str, row: int, problem: str) -> None:
        if strict:
            raise DataError(f"{where}: {problem}")
        out.bad.append((row, f"{where}: {problem}"))

    rows = list(iter_rows(path, bad))
    out.rows = len(rows) + len(out.bad)
    if not rows:
        raise DataError(f"{path}: no records" if not out.bad else
                        f"{path}: no readable records ({len(out.bad)} malformed, the first at {out.bad[0][1]})")

    if fmt in ("oasst", "oasst-messages"):
        _read_oasst(rows, fmt, oasst or OasstFilters(), out, bad)
    elif fmt == "palmchat":
        _read_palmchat(rows, out, bad)
    else:
        parse = _ROW_READERS[fmt]
        for where, row, record in rows:
            try:
                parse(record, row, out)
            except RecordError as e:
                bad(where, row, str(e))
    if fmt != "palmchat":
        out.unpaired = unpaired_from_rankings(out.rankings)
    if "rankings" in out.trees:
        out.trees["unpaired"] = [tree for tree in out.trees["rankings"] for _ in range(2)]
    return out


def report_lines(examples: Examples, shown: int = 5) -> list[str]:
    """What a file's reading dropped (reason: count and rows) and its malformed rows (``FILE:ROW: PROBLEM``), at
    most ``shown`` rows of each, as `palmchat data inspect` and the stages print them."""
    def rows(numbers: list[int]) -> str:
        return "rows " + ", ".join(str(r) for r in numbers[:shown]) + (", ..." if len(numbers) > shown else "")

    lines = []
    if examples.dropped:
        lines.append("dropped:")
        lines += [f"  {reason}: {len(numbers)} ({rows(numbers)})"
                  for reason, numbers in sorted(examples.dropped.items())]
    if examples.bad:
        lines.append(f"malformed rows: {len(examples.bad)} ({rows([row for row, _ in examples.bad])})")
        lines += [f"  {problem}" for _, problem in examples.bad[:shown]]
    return lines


def _read_palmchat(rows, out: Examples, bad) -> None:
    """A palmchat/OpenAI/TRL file: a record's keys say what it is (unpaired feedback, a ranking or pair, a
    conversation, a prompt) and that parser's problem makes it malformed; a ranking's or unpaired record's prompt
    is a prompt too, and so is a conversation that ends with a user turn."""
    for where, row, record in rows:
        try:
            if "label" in record:
                out.unpaired.append(parse_unpaired(record))
                out.prompts.append(out.unpaired[-1].prompt_messages)
            elif {"responses", "ranking", "chosen", "rejected"} & set(record):
                out.rankings.append(parse_ranking_record(record))
                out.prompts.append(out.rankings[-1].prompt_messages)
            elif "messages" in record or "completion" in record:
                try:
                    out.conversations.append(parse_sft_record(record))
                except RecordError:
                    if "messages" not in record:
                        raise
                    out.prompts.append(parse_prompt(record))  # a prompt-only conversation
                    continue
                if out.conversations[-1][-1]["role"] == "user":
                    out.prompts.append(_without_weights(out.conversations[-1]))
            else:
                out.prompts.append(parse_prompt(record))
        except RecordError as e:
            bad(where, row, str(e))


# ---------------------------------------------------------------- one-row formats


def _string(record: dict, key: str, where: str = "") -> str:
    name = where or key
    if key not in record:
        raise RecordError(f"missing \"{name}\"")
    if not isinstance(record[key], str):
        raise RecordError(f"\"{name}\" must be a string, got {json_type(record[key])}")
    return record[key]


def _add_pair(out: Examples, row: int, prompt: list[dict], chosen: str, rejected: str) -> None:
    """A preference pair: a ranking of two, and the chosen reply as an SFT conversation; a pair of equal replies
    is dropped."""
    out.prompts.append(prompt)
    out.conversations.append([*prompt, {"role": "assistant", "content": chosen}])
    if chosen == rejected:
        out.drop("chosen and rejected are the same reply", row)
    else:
        out.rankings.append(Ranking(prompt, [chosen, rejected]))


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_turns(text: str, key: str) -> list[dict]:
    """An HH-RLHF transcript -> messages: "\\n\\nHuman: ..." and "\\n\\nAssistant: ..." alternating, from Human,
    ending with an Assistant turn."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RecordError(f"\"{key}\" does not start with \"\\n\\nHuman:\" (starts {parts[0][:30]!r})")
    messages = []
    for i in range(1, len(parts), 2):
        role = "user" if parts[i] == "Human" else "assistant"
        content = parts[i + 1][1:] if parts[i + 1].startswith(" ") else parts[i + 1]
        expected = "user" if not messages or messages[-1]["role"] == "assistant" else "assistant"
        if role != expected:
            raise RecordError(f"\"{key}\": turn {len(messages) + 1} is {parts[i]}, expected "
                              f"{'Human' if expected == 'user' else 'Assistant'} (turns must alternate)")
        messages.append({"role": role, "content": content})
    if not messages:
        raise RecordError(f"\"{key}\" holds no \"\\n\\nHuman:\" turn")
    if messages[-1]["role"] != "assistant":
        raise RecordError(f"\"{key}\" does not end with an Assistant turn")
    return messages


def _read_hh(record: dict, row: int, out: Examples) -> None:
    chosen = _hh_turns(_string(record, "chosen"), "chosen")
    rejected = _hh_turns(_string(record, "rejected"), "rejected")
    if chosen[:-1] != rejected[:-1]:
        raise RecordError("\"chosen\" and \"rejected\" differ before their final Assistant turn")
    _add_pair(out, row, chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


def _rating(completion: dict, where: str) -> float | None:
    """A completion's score: the mean of its numeric aspect ratings ("N/A" skipped), else ``fine-grained_score``,
    else ``overall_score``; None when it has none."""
    annotations = completion.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise RecordError(f"{where}.annotations must be an object, got {json_type(annotations)}")
    ratings = []
    for aspect, value in annotations.items():
        rating = value.get("Rating") if isinstance(value, dict) else None
        if rating in (None, "N/A", "n/a", ""):
            continue
        try:
            ratings.append(float(rating))
        except (TypeError, ValueError):
            raise RecordError(f"{where}.annotations.{aspect}.Rating must be \"1\"..\"5\" or \"N/A\", "
                              f"got {json.dumps(rating)}") from None
    if ratings:
        return sum(ratings) / len(ratings)
    for key in ("fine-grained_score", "overall_score"):
        score = completion.get(key)
        if isinstance(score, (int, float)) and not isinstance(score, bool):
            return float(score)
    return None


def _read_ultrafeedback(record: dict, row: int, out: Examples) -> None:
    prompt = [{"role": "user", "content": _string(record, "instruction")}]
    completions = record["completions"]
    if not isinstance(completions, list):
        raise RecordError(f"\"completions\" must be a list, got {json_type(completions)}")
    scored = []
    for i, c in enumerate(completions):
        if not isinstance(c, dict):
            raise RecordError(f"completions[{i}] must be an object, got {json_type(c)}")
        response = _string(c, "response", f"completions[{i}].response")
        score = _rating(c, f"completions[{i}]")
        if score is None:
            out.drop("unrated completion", row)
        else:
            scored.append((score, response))
    scored.sort(key=lambda s: -s[0])  # stable: file order among equal scores
    distinct = [s for i, s in enumerate(scored) if i == 0 or s[0] != scored[i - 1][0]]
    if len(distinct) < len(scored):
        out.drop("tied completion (only the first of equal scores kept)", row)
    out.prompts.append(prompt)
    if scored:
        out.conversations.append([*prompt, {"role": "assistant", "content": scored[0][1]}])
    if len(distinct) < MIN_RESPONSES:
        out.drop("fewer than 2 distinct scores", row)
        return
    out.rankings.append(Ranking(prompt, [response for _, response in distinct[:MAX_RESPONSES]]))


def _conversation_end(value: object, key: str, prompt: list[dict]) -> str:
    """UltraFeedback-binarized's ``chosen``/``rejected``: the whole conversation (the prompt, then the reply), or
    the reply alone; returns the reply."""
    if isinstance(value, str):
        return value
    messages = _messages(value, key)
    if messages[-1]["role"] != "assistant":
        raise RecordError(f"\"{key}\" must end with an assistant message")
    if len(messages) > 1 and _without_weights(messages[:-1]) != prompt:
        raise RecordError(f"\"{key}\" does not start with the prompt")
    return messages[-1]["content"]


def _read_ultrafeedback_binarized(record: dict, row: int, out: Examples) -> None:
    if "prompt" not in record:
        raise RecordError("missing \"prompt\"")
    prompt = _without_weights(_prompt(record["prompt"], "prompt"))
    for key in ("chosen", "rejected"):
        if key not in record:
            raise RecordError(f"missing \"{key}\"")
    chosen = _conversation_end(record["chosen"], "chosen", prompt)
    rejected = _conversation_end(record["rejected"], "rejected", prompt)
    scores = record.get("score_chosen"), record.get("score_rejected")
    if scores[0] is not None and scores[0] == scores[1]:
        out.prompts.append(prompt)
        out.conversations.append([*prompt, {"role": "assistant", "content": chosen}])
        out.drop("tie (score_chosen == score_rejected)", row)
        return
    _add_pair(out, row, prompt, chosen, rejected)


def _read_openai_preference(record: dict, row: int, out: Examples) -> None:
    source = record.get("input")
    if not isinstance(source, dict) or "messages" not in source:
        raise RecordError("\"input\" must be an object with \"messages\"")
    prompt = _without_weights(_prompt(source["messages"], "input.messages"))
    replies = []
    for key in ("preferred_output", "non_preferred_output"):
        if key not in record:
            raise RecordError(f"missing \"{key}\"")
        messages = _messages(record[key], key)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise RecordError(f"\"{key}\" must be a list of exactly one assistant message")
        replies.append(messages[0]["content"])
    _add_pair(out, row, prompt, *replies)


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


def _read_sharegpt(record: dict, row: int, out: Examples) -> None:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"\"conversations\" must be a non-empty list, got {json_type(turns)}")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise RecordError(f"conversations[{i}] must be an object with \"from\" and \"value\"")
        if t.get("from") not in _SHAREGPT_ROLES:
            raise RecordError(f"conversations[{i}].from {t.get('from')!r} is not one of human, gpt, system")
        messages.append({"role": _SHAREGPT_ROLES[t["from"]],
                         "content": _string(t, "value", f"conversations[{i}].value")})
    if any(m["role"] == "assistant" for m in messages):
        out.conversations.append(messages)
    else:
        out.drop("no gpt turn", row)
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if users:
        out.prompts.append(messages[:users[-1] + 1])


def _read_alpaca(record: dict, row: int, out: Examples) -> None:
    instruction, output = _string(record, "instruction"), _string(record, "output")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise RecordError(f"\"input\" must be a string, got {json_type(extra)}")
    prompt = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction}]
    out.prompts.append(prompt)
    out.conversations.append([*prompt, {"role": "assistant", "content": output}])


_ROW_READERS: dict[str, Callable[[dict, int, Examples], None]] = {
    "hh-rlhf": _read_hh,
    "ultrafeedback": _read_ultrafeedback,
    "ultrafeedback-binarized": _read_ultrafeedback_binarized,
    "openai-preference": _read_openai_preference,
    "sharegpt": _read_sharegpt,
    "alpaca": _read_alpaca,
}


# ---------------------------------------------------------------- Open-Assistant trees


_OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def _oasst_message(m: object, where: str) -> dict:
    if not isinstance(m, dict):
        raise RecordError(f"{where} must be an object, got {json_type(m)}")
    for key in ("message_id", "role", "text"):
        if key not in m:
            raise RecordError(f"{where} has no \"{key}\"")
    if m["role"] not in _OASST_ROLES:
        raise RecordError(f"{where}.role {m['role']!r} is not prompter or assistant")
    if not isinstance(m["text"], str):
        raise RecordError(f"{where}.text must be a string, got {json_type(m['text'])}")
    rank = m.get("rank")
    if isinstance(rank, float) and rank != rank:  # a table written through pandas stores a missing rank as NaN
        m = {**m, "rank": None}
        rank = None
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float))):
        raise RecordError(f"{where}.rank must be a number or null, got {json_type(rank)}")
    return m


def _oasst_node(m: object, at: str, row: int, where: str) -> dict:
    m = _oasst_message(m, at)
    replies = m.get("replies") or []
    if not isinstance(replies, list):
        raise RecordError(f"{at}.replies must be a list, got {json_type(replies)}")
    return {"m": m, "row": row, "where": where,
            "children": [_oasst_node(r, f"{at}.replies[{i}]", row, where) for i, r in enumerate(replies)]}


def _oasst_trees(rows, fmt: str, bad) -> list[tuple[str, str, dict]]:
    """``(tree id, tree_state, root)`` per tree; each node is ``{"m": message, "row": row, "children": [...]}``."""
    trees = []
    if fmt == "oasst":
        for where, row, record in rows:
            try:
                root = _oasst_node(record.get("prompt"), "prompt", row, where)
                trees.append((str(record.get("message_tree_id", root["m"]["message_id"])),
                              record.get("tree_state") or "", root))
            except RecordError as e:
                bad(where, row, str(e))
        return trees
    nodes, order = {}, []
    for where, row, record in rows:
        try:
            m = _oasst_message(record, "message")
            if m["message_id"] in nodes:
                raise RecordError(f"message_id {m['message_id']!r} appears twice")
            nodes[m["message_id"]] = {"m": m, "row": row, "children": [], "where": where}
            order.append(m["message_id"])
        except RecordError as e:
            bad(where, row, str(e))
    for mid in order:
        node = nodes[mid]
        parent = node["m"].get("parent_id")
        if parent is None:
            tree_id = node["m"].get("message_tree_id") or mid
            trees.append((str(tree_id), node["m"].get("tree_state") or "", node))
        elif parent in nodes:
            nodes[parent]["children"].append(node)
        else:
            bad(node["where"], node["row"], f"parent_id {parent!r} names no message of this file")
    return trees


def _oasst_reason(m: dict, filters: OasstFilters) -> str:
    """Why a message is dropped, or ""."""
    if m.get("deleted") and not filters.keep_deleted:
        return "deleted message"
    if m.get("synthetic") and not filters.keep_synthetic:
        return "synthetic message"
    if m.get("review_result") is False and not filters.keep_failed_review:
        return "failed review"
    if filters.langs and m.get("lang") not in filters.langs:
        return "language not selected"
    return ""


def _rank_key(node: dict) -> tuple:
    rank = node["m"].get("rank")
    return (rank is None, rank if rank is not None else 0)


def _read_oasst(rows, fmt: str, filters: OasstFilters, out: Examples, bad) -> None:
    if filters.branches not in ("best", "all"):
        raise ValueError(f"branches must be 'best' or 'all', got {filters.branches!r}")
    for tree_id, state, root in _oasst_trees(rows, fmt, bad):
        if filters.tree_state and state != filters.tree_state:
            out.drop(f"tree_state is not {filters.tree_state}", root["row"])
            continue
        if filters.split and tree_split(tree_id, filters.val_fraction, filters.seed) != filters.split:
            out.drop(f"tree in the other split (not {filters.split})", root["row"])
            continue
        if root["m"]["role"] != "prompter":
            bad(root["where"], root["row"], f"tree {tree_id}: the root message's role must be prompter")
            continue
        before = {part: len(getattr(out, part)) for part in ("conversations", "rankings", "prompts")}
        paths: list[list[dict]] = []  # every path from the root to a leaf of the kept tree
        system = root["m"].get("system_prompt")  # palmchat's extension (feedback export --format oasst)
        start = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
        _walk_oasst(root, start, filters, out, paths)
        if filters.branches == "best":
            paths = [start + _best_path(root, filters)]
        seen = set()
        for path in paths:
            while path and path[-1]["role"] != "assistant":
                path = path[:-1]
            key = json.dumps(path)
            if path and key not in seen:
                seen.add(key)
                out.conversations.append(path)
        for part, start in before.items():
            out.trees.setdefault(part, []).extend([tree_id] * (len(getattr(out, part)) - start))


def _walk_oasst(node: dict, path: list[dict], filters: OasstFilters, out: Examples, paths: list) -> None:
    """Visit the kept subtree under ``node``: prompts and rankings at each prompter message, drop counts, and the
    path to every leaf into ``paths``."""
    reason = _oasst_reason(node["m"], filters)
    if reason:
        out.drop(reason, node["row"])
        return
    message = {"role": _OASST_ROLES[node["m"]["role"]], "content": node["m"]["text"]}
    if path and path[-1]["role"] == message["role"]:
        out.drop("same role as its parent", node["row"])
        return
    path = [*path, message]
    kept = [c for c in node["children"] if not _oasst_reason(c["m"], filters)]
    if message["role"] == "user":
        out.prompts.append(path)
        ranked = [c for c in kept if c["m"].get("rank") is not None and c["m"]["role"] == "assistant"]
        if len(ranked) >= MIN_RESPONSES:
            for c in kept:
                if c["m"].get("rank") is None:
                    out.drop("unranked reply", c["row"])
            ranked.sort(key=_rank_key)  # stable: file order among equal ranks
            out.rankings.append(Ranking(path, [c["m"]["text"] for c in ranked[:filters.max_responses]]))
    if not kept:
        paths.append(path)
    for c in node["children"]:
        _walk_oasst(c, path, filters, out, paths)


def _best_path(root: dict, filters: OasstFilters) -> list[dict]:
    """From the root, each time the kept reply of lowest rank (the first unranked one when none is ranked)."""
    path, node = [], root
    while node is not None and not _oasst_reason(node["m"], filters):
        message = {"role": _OASST_ROLES[node["m"]["role"]], "content": node["m"]["text"]}
        if path and path[-1]["role"] == message["role"]:
            break
        path.append(message)
        kept = sorted((c for c in node["children"] if not _oasst_reason(c["m"], filters)), key=_rank_key)
        node = kept[0] if kept else None
    return path
