"""Human feedback as training data: `palmchat feedback import` fills the labelling queue, `palmchat feedback
export` turns what people gave into the files the trainers read.

    palmchat feedback import prompts.jsonl --db palmchat.db --k 4                   # {"prompt": ...} per line
    palmchat feedback export --db palmchat.db --format rankings --out rankings.jsonl  # palmchat reward / dpo
    palmchat feedback export --db palmchat.db --format pairs --out pairs.jsonl        # palmchat dpo / reward
    palmchat feedback export --db palmchat.db --format sft --out liked.jsonl          # palmchat sft
    palmchat feedback export --db palmchat.db --format kto --out thumbs.jsonl         # palmchat kto

Where feedback comes from (all of it in the server's database, see palmchat/store.py):
- the labelling page (/label): a queued prompt's K candidate replies, sampled once by the server when the first
  labeller asks for the task and stored, so that every labeller ranks the same replies;
- the chat page's compare view: 2-4 candidates for the next turn, ranked by the person chatting;
- thumbs up/down on any reply of the chat page.

What each format holds:
- `rankings`: one record per ranked task, `{"prompt", "responses", "ranking", "labellers", "source"}`
  (responses in the order they were sampled, ranking = their indices best first). Several labellers' rankings
  of one task are merged by **Borda count**: in a ranking of K candidates the one at position p (0 = best)
  gets K-1-p points; candidates are ordered by total points, ties broken by how many labellers put them
  first, then by sampling order. Candidates with the same text count once, at their best merged position; a
  task left with fewer than two different texts is skipped. Thumbs add K=2 rankings: where one prompt (the
  same messages) has a reply rated up and another rated down, every (up, down) pair is one.
- `pairs`: `{"prompt", "chosen", "rejected"}`: every (better, worse) pair of each merged ranking, then the
  thumbs pairs.
- `sft`: `{"messages": [...prompt, {"role": "assistant", "content": reply}]}` for every reply rated up
  (a ranking's best candidate is not taken: the best of bad replies is not a demonstration).
- `kto`: `{"prompt", "completion", "label"}` for every thumbs up (label true) and down (false): TRL's unpaired
  preference format, what KTO trains on. Unlike the thumbs pairs above, no reply rated the other way is needed.

A prompt is written as a string when it is one user message, else as its list of messages: the system
prompt the page sent, the conversation so far, the new user message. palmchat/data/chat.py reads both, and
renders the list exactly as the server rendered the conversation.
"""

from __future__ import annotations

import json
import secrets
from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from palmchat.feedback.rankings import borda
from palmchat.utils.args import arg
from palmchat.utils.jsonl import write_jsonl

FORMATS = ("rankings", "pairs", "sft", "kto")


# =============================================================================================
# Export
# =============================================================================================


def prompt_field(messages: list[dict]):
    """A prompt as the readers take it: a string for one user message, else the list of messages."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def merged_rankings(store) -> list[dict]:
    """Every ranked task as {"prompt" (messages), "responses" (texts in sampling order), "order" (indices best
    first), "labellers", "source", "task_id"}; labellers' rankings merged by Borda count, equal texts merged."""
    by_task = defaultdict(list)
    for r in store.rankings():
        by_task[r["task_id"]].append(r["ranking"])
    out = []
    for task in store.tasks():
        if task["id"] not in by_task or not task["candidates"]:
            continue
        ids = [c["id"] for c in task["candidates"]]
        text = {c["id"]: c["text"] for c in task["candidates"]}
        merged = borda(by_task[task["id"]], ids)
        responses, order, seen = [], [], set()
        for cid in merged:  # best first: a repeated text keeps its best position
            if text[cid] in seen:
                continue
            seen.add(text[cid])
            order.append(cid)
        keep = [cid for cid in ids if cid in order]  # sampling order
        responses = [text[cid] for cid in keep]
        if len(responses) < 2:
            continue
        out.append({"prompt": task["prompt"], "responses": responses, "order": [keep.index(c) for c in order],
                    "labellers": len(by_task[task["id"]]), "source": task["kind"], "task_id": task["id"]})
    return out


def thumbs_pairs(store) -> list[dict]:
    """(chosen, rejected) pairs from thumbs: for each prompt with replies rated both up and down, every
    (up, down) combination of different texts."""
    groups: dict[str, dict[int, list[str]]] = defaultdict(lambda: {1: [], -1: []})
    prompts = {}
    for row in store.feedback():
        key = json.dumps(row["prompt"])
        prompts[key] = row["prompt"]
        if row["reply"] not in groups[key][row["rating"]]:
            groups[key][row["rating"]].append(row["reply"])
    return [{"prompt": prompts[key], "chosen": up, "rejected": down}
            for key, g in groups.items() for up in g[1] for down in g[-1] if up != down]


def export_records(store, fmt: str) -> list[dict]:
    """The records of one export format (see the module docstring)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "kto":
        return [{"prompt": prompt_field(row["prompt"]), "completion": row["reply"], "label": row["rating"] > 0}
                for row in store.feedback() if row["reply"].strip()]
    if fmt == "sft":
        return [{"messages": [*({"role": m["role"], "content": m["content"]} for m in row["prompt"]),
                              {"role": "assistant", "content": row["reply"]}]}
                for row in store.feedback() if row["rating"] > 0 and row["reply"].strip()]
    rankings, thumbs = merged_rankings(store), thumbs_pairs(store)
    if fmt == "rankings":
        return ([{"prompt": prompt_field(r["prompt"]), "responses": r["responses"], "ranking": r["order"],
                  "labellers": r["labellers"], "source": r["source"]} for r in rankings]
                + [{"prompt": prompt_field(p["prompt"]), "responses": [p["chosen"], p["rejected"]], "ranking": [0, 1],
                    "labellers": 1, "source": "thumbs"} for p in thumbs])
    return ([{"prompt": prompt_field(r["prompt"]), "chosen": r["responses"][better],
              "rejected": r["responses"][worse], "source": r["source"]}
             for r in rankings for better, worse in combinations(r["order"], 2)]
            + [{"prompt": prompt_field(p["prompt"]), "chosen": p["chosen"], "rejected": p["rejected"],
                "source": "thumbs"} for p in thumbs])


# =============================================================================================
# The `palmchat feedback` commands
# =============================================================================================


@dataclass
class FeedbackImportArgs:
    """Queue prompts for the labelling page (/label) from a JSONL file: {"prompt": ...} per line."""

    file: str = arg("", "JSONL file: {\"prompt\": str or messages} (or {\"messages\": [...]}) per line",
                    positional=True)
    db: str = arg("palmchat.db", "the server's database file")
    k: int = arg(4, "candidate replies per prompt (2 to 4), sampled once by the server and ranked by every labeller")
    max_tokens: int = arg(128, "tokens per candidate reply at most")
    temperature: float = arg(1.0, "sampling temperature of the candidates")


@dataclass
class FeedbackExportArgs:
    """Write the feedback in the database as the training files palmchat reward / dpo / sft / kto read."""

    db: str = arg("palmchat.db", "the server's database file")
    format: str = arg("rankings", "rankings (palmchat reward, dpo), pairs (palmchat dpo, reward), sft "
                                  "(palmchat sft: thumbs-up replies) or kto (palmchat kto: every thumbs up/down)",
                      choices=list(FORMATS))
    out: str = arg("", "output JSONL file")


def new_task_id() -> str:
    return "task_" + secrets.token_hex(12)


def import_prompts(store, path: str | Path, k: int = 4, max_tokens: int = 128,
                   temperature: float = 1.0) -> tuple[int, int]:
    """Queue the prompts of a JSONL file (DataError `FILE:LINE: problem` on a bad line); returns (added, read).
    A prompt already in the queue is not added again."""
    from palmchat.data.chat import load_prompts

    if not 2 <= k <= 4:
        raise ValueError(f"--k must be 2, 3 or 4, not {k}")
    if max_tokens < 1:
        raise ValueError("--max-tokens must be >= 1")
    if not 0 <= temperature <= 2:
        raise ValueError("--temperature must be between 0 and 2")
    prompts = load_prompts(path)
    added = store.queue_prompts(prompts, {"k": k, "max_tokens": max_tokens, "temperature": temperature}, new_task_id)
    return added, len(prompts)


def import_main(args: FeedbackImportArgs) -> None:
    from palmchat.store import Store

    if not args.file:
        raise ValueError("a JSONL file of prompts is required: palmchat feedback import FILE --db DB")
    store = Store(args.db)
    try:
        added, read = import_prompts(store, args.file, args.k, args.max_tokens, args.temperature)
        queued = len(store.tasks("label"))
    finally:
        store.close()
    print(f"queued {added} of {read} prompts from {args.file} ({read - added} were queued already); "
          f"{queued} in the labelling queue of {args.db}")


def export_main(args: FeedbackExportArgs) -> Path:
    from palmchat.store import Store

    if not args.out:
        raise ValueError("--out is required")
    if not Path(args.db).is_file():
        raise FileNotFoundError(f"--db: {args.db} does not exist")
    store = Store(args.db)
    try:
        records = export_records(store, args.format)
    finally:
        store.close()
    if not records:
        what = {"sft": "thumbs-up replies", "kto": "thumbs up or down"}.get(args.format,
                                                                          "ranked tasks or thumbs up/down pairs")
        raise ValueError(f"nothing to export: {args.db} holds no {what}")
    path = write_jsonl(args.out, records)
    print(f"wrote {len(records)} {args.format} records to {path}")
    return path
