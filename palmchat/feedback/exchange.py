"""Human feedback as training data: `palmchat feedback import` fills the labelling queue, `palmchat feedback
export` turns what people gave into the files the trainers read.

    palmchat feedback import prompts.jsonl --db palmchat.db --k 4                   # {"prompt": ...} per line
    palmchat feedback export --db palmchat.db --format rankings --out rankings.jsonl  # palmchat reward / dpo
    palmchat feedback export --db palmchat.db --format pairs --out pairs.jsonl        # palmchat dpo / reward
    palmchat feedback export --db palmchat.db --format sft --out liked.jsonl          # palmchat sft
    palmchat feedback export --db palmchat.db --format kto --out thumbs.jsonl         # palmchat kto
    palmchat feedback export --db palmchat.db --format oasst --merge ranked-pairs --out trees.jsonl  # any stage

Where feedback comes from (all of it in the server's database, see palmchat/store.py):
- the labelling page (/label): a queued prompt's K candidate replies, sampled once by the server when the first
  labeller asks for the task and stored, so that every labeller ranks the same replies (tasks of kind 'label');
- the chat page's compare view: 2-4 candidates for the next turn, ranked by the person chatting, all kept in the
  conversation as sibling replies (kind 'compare');
- rankings of the replies that follow one item of a conversation: regenerated and compared replies, ranked by
  anyone, each labeller's latest ranking kept, possibly of a subset of them (kind 'siblings');
- thumbs up/down on any reply of the chat page.

Rankings of the same replies are merged: a label task is one set of replies; compare and siblings tasks whose
candidates (their ids are item ids) are all replies to one item of a conversation are one set per item, where each
labeller counts once, with their latest ranking; a comparison whose replies are not all in its conversation any
more (stored before schema v4, or a reply deleted since) is a set of its own. `--merge borda` (the default) or
`--merge ranked-pairs` merges them (palmchat/feedback/rankings.py). Candidates with the same text count once, at
their best merged position; a set keeps its best 9 (the most a ranking record holds).

What each format holds:
- `rankings`: one record per ranked set with two or more different texts, `{"prompt", "responses", "ranking",
  "labellers", "source"}` (responses in candidate order, ranking = their indices best first; source: the kinds of
  its tasks, "compare+siblings" for both). The prompt is the first task's (compare: with the system prompt the page
  sent). Thumbs add K=2 rankings: where one prompt (the same messages) has a reply rated up and another rated down,
  every (up, down) pair is one.
- `pairs`: `{"prompt", "chosen", "rejected"}`: every (better, worse) pair of each merged ranking, then the
  thumbs pairs.
- `sft`: `{"messages": [...prompt, {"role": "assistant", "content": reply}]}` for every reply rated up
  (a ranking's best candidate is not taken: the best of bad replies is not a demonstration).
- `kto`: `{"prompt", "completion", "label"}` for every thumbs up (label true) and down (false): TRL's unpaired
  preference format, what KTO trains on. Unlike the thumbs pairs above, no reply rated the other way is needed.
- `oasst`: Open-Assistant's message-tree export, one tree per line: `{"message_tree_id", "tree_state":
  "ready_for_export", "prompt": root message}`, each message `{"message_id", "parent_id", "user_id", "text",
  "role": prompter|assistant, "lang": "und" (palmchat does not know the language), "review_result", "deleted":
  false, "rank", "synthetic": false, "replies": [...]}`. palmchat/data/formats.py reads it back (`--data
  trees.jsonl` of any stage): its rankings are the `rankings` export's (without system prompts and thumbs), its SFT
  conversations each tree's best path. The trees:
  * every conversation, one tree per first message (an edited first message starts another), message ids = item
    ids. Replies are listed with the one on the conversation's current branch first, then in the order they were
    made, so where nothing is ranked the best path is the conversation as last shown. `rank` is the merged rank
    among ranked replies (0 = best; null: not ranked, or its text ranked better under another id). A turn blocked
    by moderation is kept with `review_result` false (the reader leaves it out) and what followed it continues
    from the message before it, as its context did. A branch that starts with an assistant message cannot be an
    oasst tree and is left out (the command says so). `user_id` of a user message: the conversation's owner (an
    API key id, never a secret), null without keys;
  * every ranked set that is not replies in a conversation (label tasks, comparisons whose replies are not all
    there): its prompt's messages as a chain ("TASK:0", "TASK:1", ...), its candidates as replies to the last one
    ("TASK:CANDIDATE").
  palmchat's extensions (Open-Assistant's readers ignore them; palmchat's reads `system_prompt` back as each
  thread's system message): `labeller_rankings` on a message whose replies were ranked
  (`[{"labeller": API key id or name, "ranking": [message ids, best first]}]`, each labeller's raw ranking, a
  subset of the replies allowed); `system_prompt` on a root (the conversation's system items before it, or the
  task prompt's system messages; oasst has no system role, and a system item later in a branch is not written);
  `emojis` `{"+1", "-1"}` thumbs counts on a reply (as Open-Assistant counted reactions); `source` ("conversation"
  or the task kinds) and `source_id` (conversation or task id) on a tree. `instructions` sent with a request are not
  part of a conversation and are not in its tree.

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

from palmchat.data.formats import MAX_RESPONSES
from palmchat.feedback.rankings import MERGES
from palmchat.feedback.rankings import merge as merge_rankings
from palmchat.store import item_text
from palmchat.utils.args import arg
from palmchat.utils.jsonl import write_jsonl

FORMATS = ("rankings", "pairs", "sft", "kto", "oasst")


# =============================================================================================
# Export
# =============================================================================================


def prompt_field(messages: list[dict]):
    """A prompt as the readers take it: a string for one user message, else the list of messages."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def ranked_parent(task: dict, tree: dict) -> str | None:
    """The item whose replies a compare or siblings task ranked: the one parent its candidates (whose ids are item
    ids) all still have in the conversation `tree` (Store.tree); None when they are not all assistant replies to one
    item there (a compare task stored before schema v4, a reply deleted since)."""
    parents = {item["id"]: parent for item, parent in tree["items"]
               if item.get("type") == "message" and item.get("role") == "assistant"}
    ids = [c["id"] for c in task["candidates"]]
    common = {parents.get(i) for i in ids}
    if not all(i in parents for i in ids) or len(common) != 1 or None in common:
        return None
    return common.pop()


def merged_rankings(store, merge: str = "borda") -> list[dict]:
    """Every ranked set of replies, its labellers' rankings merged by `merge` (see palmchat/feedback/rankings.py).

    A label task is one set. Compare and siblings tasks whose candidates are replies to one item of a conversation
    are grouped by that item, so every ranking of the same replies counts once per labeller (their latest);
    the others are one set each. Each set is {"prompt" (messages, of its first task), "responses" (distinct texts
    in candidate order, the best MAX_RESPONSES), "order" (their indices best first), "best_first" (candidate ids
    of every distinct text, best first: a repeated text keeps its best position), "candidates" (every {"id",
    "text"}, in order), "labeller_rankings" ([{"labeller", "ranking"}], raw), "labellers", "source" (the tasks'
    kinds, joined by "+"), "task_id" (the first task's), "node" ((conversation id, item id) or None)}."""
    rows = store.rankings()
    ranked_tasks = {r["task_id"] for r in rows}
    groups: dict = {}  # (conversation id, parent item) or task id -> tasks
    trees: dict[str, dict] = {}
    for task in store.tasks():
        if task["id"] not in ranked_tasks or not task["candidates"]:
            continue
        key = task["id"]
        if task["kind"] in ("compare", "siblings") and task["conversation_id"]:
            cid = task["conversation_id"]
            if cid not in trees:
                trees[cid] = store.tree(cid)
            parent = ranked_parent(task, trees[cid])
            key = (cid, parent) if parent else key
        groups.setdefault(key, []).append(task)
    key_of = {task["id"]: key for key, tasks in groups.items() for task in tasks}
    latest: dict = defaultdict(dict)  # key -> labeller -> ranking (rows come oldest first)
    for r in rows:
        if r["task_id"] in key_of:
            latest[key_of[r["task_id"]]][r["labeller"]] = r["ranking"]
    out = []
    for key, tasks in groups.items():
        text: dict[str, str] = {}
        for task in tasks:
            for c in task["candidates"]:
                text.setdefault(c["id"], c["text"])
        rankings = list(latest[key].values())
        ranked = [cid for cid in text if any(cid in r for r in rankings)]  # a candidate nobody ranks is left out
        best_first, seen = [], set()
        for cid in merge_rankings(rankings, ranked, merge):
            if text[cid] not in seen:
                seen.add(text[cid])
                best_first.append(cid)
        kept = best_first[:MAX_RESPONSES]
        keep = [cid for cid in text if cid in kept]  # candidate order
        out.append({"prompt": tasks[0]["prompt"], "responses": [text[cid] for cid in keep],
                    "order": [keep.index(cid) for cid in kept], "best_first": best_first,
                    "candidates": [{"id": cid, "text": t} for cid, t in text.items()],
                    "labeller_rankings": [{"labeller": who, "ranking": r} for who, r in latest[key].items()],
                    "labellers": len(rankings), "source": "+".join(dict.fromkeys(t["kind"] for t in tasks)),
                    "task_id": tasks[0]["id"], "node": key if isinstance(key, tuple) else None})
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


def export_records(store, fmt: str, merge: str = "borda") -> list[dict]:
    """The records of one export format (see the module docstring); `merge`: how several labellers' rankings of
    the same replies are merged ("borda" or "ranked-pairs")."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if merge not in MERGES:
        raise ValueError(f"--merge must be one of {', '.join(MERGES)}, not {merge!r}")
    if fmt == "oasst":
        return oasst_trees(store, merge)[0]
    if fmt == "kto":
        return [{"prompt": prompt_field(row["prompt"]), "completion": row["reply"], "label": row["rating"] > 0}
                for row in store.feedback() if row["reply"].strip()]
    if fmt == "sft":
        return [{"messages": [*({"role": m["role"], "content": m["content"]} for m in row["prompt"]),
                              {"role": "assistant", "content": row["reply"]}]}
                for row in store.feedback() if row["rating"] > 0 and row["reply"].strip()]
    rankings = [r for r in merged_rankings(store, merge) if len(r["order"]) >= 2]
    thumbs = thumbs_pairs(store)
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


# ---------------------------------------------------------------- Open-Assistant message trees


def oasst_message(message_id: str, parent_id: str | None, role: str, text: str, user_id: str | None = None,
                  in_context: bool = True) -> dict:
    """One message of an oasst tree, with the fields Open-Assistant's export gives every message."""
    return {"message_id": message_id, "parent_id": parent_id, "user_id": user_id or None, "text": text,
            "role": "prompter" if role == "user" else "assistant", "lang": "und", "review_result": in_context,
            "deleted": False, "rank": None, "synthetic": False, "replies": []}


def put_ranking(parent: dict, replies: dict[str, dict], ranked: dict, rename=lambda i: i) -> None:
    """Give the replies of `parent` their merged rank (0 = best; a reply whose text ranked better under another
    id keeps null) and put the labellers' raw rankings on `parent` (ids through `rename`)."""
    for rank, cid in enumerate(ranked["best_first"]):
        replies[rename(cid)]["rank"] = rank
    parent["labeller_rankings"] = [{"labeller": r["labeller"], "ranking": [rename(i) for i in r["ranking"]]}
                                   for r in ranked["labeller_rankings"]]


def conversation_trees(store, conversation_id: str, owner: str, ranked_nodes: dict, thumbs: dict,
                       placed: set) -> tuple[list[dict], list[str]]:
    """(oasst trees, what was left out) of one conversation: a tree per first message (see the module docstring).
    `ranked_nodes`: item id -> the merged ranking of its replies; the (conversation id, item id) of those used go
    into `placed`."""
    tree = store.tree(conversation_id)
    items = {item["id"]: (item, parent) for item, parent in tree["items"]}
    created = {item_id: i for i, item_id in enumerate(items)}
    children = defaultdict(list)
    for item_id, (_, parent) in items.items():
        children[parent].append(item_id)
    in_context = set()  # items in their branch's token history: a turn blocked by moderation is not
    for leaf in (i for i in items if not children[i]):
        in_context.update(item["id"] for item, tokens, _ in store.context_items(conversation_id, leaf) if tokens)
    current, node = set(), tree["current_item"]
    while node in items:
        current.add(node)
        node = items[node][1]
    written = {i for i, (item, _) in items.items()
               if item.get("type") == "message" and item.get("role") in ("user", "assistant")}

    def parent_of(item_id: str) -> str | None:
        """The written message an item follows: its nearest written ancestor (in the context, for one in it)."""
        parent = items[item_id][1]
        while parent in items and (parent not in written or (item_id in in_context and parent not in in_context)):
            parent = items[parent][1]
        return parent if parent in items else None

    messages = {i: oasst_message(i, parent_of(i), items[i][0]["role"], item_text(items[i][0]),
                                 owner if items[i][0]["role"] == "user" else None, i in in_context)
                for i in items if i in written}
    for item_id, m in messages.items():
        if item_id in thumbs:
            m["emojis"] = dict(thumbs[item_id])
    for item_id in sorted(messages, key=lambda i: (i not in current, created[i])):  # current branch first
        parent = messages[item_id]["parent_id"]
        if parent is not None:
            messages[parent]["replies"].append(messages[item_id])
    for parent, ranked in ranked_nodes.items():
        replies = {m["message_id"]: m for m in messages[parent]["replies"]} if parent in messages else {}
        if messages.get(parent, {}).get("role") == "prompter" and all(i in replies for i in ranked["best_first"]):
            put_ranking(messages[parent], replies, ranked)
            placed.add((conversation_id, parent))
    trees, left_out = [], []
    for item_id, m in messages.items():
        if m["parent_id"] is not None:
            continue
        if m["role"] != "prompter":
            left_out.append(f"conversation {conversation_id}: the branch from {item_id} starts with an assistant "
                            "message (an oasst tree starts with a prompter message)")
            continue
        system, node = [], items[item_id][1]
        while node in items:
            if items[node][0].get("role") in ("system", "developer"):
                system.insert(0, item_text(items[node][0]))
            node = items[node][1]
        if system:
            m["system_prompt"] = "\n\n".join(system)
        trees.append({"message_tree_id": item_id, "tree_state": "ready_for_export", "prompt": m,
                      "source": "conversation", "source_id": conversation_id})
    return trees, left_out


def task_tree(ranked: dict) -> dict | None:
    """A ranked set of replies outside any conversation tree (a label task; a comparison whose replies are not all
    in their conversation) as an oasst tree: its prompt's messages as a chain, the candidates as replies to the
    last one. Message ids are "TASK:N" for the prompt's messages and "TASK:CANDIDATE" for the candidates. None when
    the prompt does not start with a user message."""
    prompt, system = list(ranked["prompt"]), []
    while prompt and prompt[0]["role"] == "system":
        system.append(prompt.pop(0)["content"])
    prompt = [m for m in prompt if m["role"] != "system"]
    if not prompt or prompt[0]["role"] != "user":
        return None
    task = ranked["task_id"]
    chain = [oasst_message(f"{task}:{i}", f"{task}:{i - 1}" if i else None, m["role"], m["content"])
             for i, m in enumerate(prompt)]
    for parent, child in zip(chain, chain[1:]):
        parent["replies"].append(child)
    last = chain[-1]
    replies = {f"{task}:{c['id']}": oasst_message(f"{task}:{c['id']}", last["message_id"], "assistant", c["text"])
               for c in ranked["candidates"]}
    last["replies"] = list(replies.values())
    put_ranking(last, replies, ranked, lambda cid: f"{task}:{cid}")
    if system:
        chain[0]["system_prompt"] = "\n\n".join(system)
    return {"message_tree_id": chain[0]["message_id"], "tree_state": "ready_for_export", "prompt": chain[0],
            "source": ranked["source"], "source_id": task}


def oasst_trees(store, merge: str = "borda") -> tuple[list[dict], list[str]]:
    """(every tree of the `oasst` export, what was left out and why); see the module docstring."""
    rankings = merged_rankings(store, merge)
    ranked_nodes: dict[str, dict[str, dict]] = defaultdict(dict)  # conversation id -> item id -> merged ranking
    for r in rankings:
        if r["node"]:
            ranked_nodes[r["node"][0]][r["node"][1]] = r
    thumbs: dict[str, dict[str, int]] = {}
    for row in store.feedback():
        counts = thumbs.setdefault(row["item_id"], {"+1": 0, "-1": 0})
        counts["+1" if row["rating"] > 0 else "-1"] += 1
    trees, left_out, placed = [], [], set()
    for conversation_id, owner in store.conversation_owners():
        more, skipped = conversation_trees(store, conversation_id, owner, ranked_nodes[conversation_id], thumbs,
                                           placed)
        trees += more
        left_out += skipped
    for r in rankings:
        if r["node"] in placed:
            continue
        tree = task_tree(r)
        if tree is None:
            left_out.append(f"task {r['task_id']}: its prompt does not start with a user message")
        else:
            trees.append(tree)
    return trees, left_out


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
    """Write the feedback in the database as training files, or the conversations as Open-Assistant trees."""

    db: str = arg("palmchat.db", "the server's database file")
    format: str = arg("rankings", "rankings (palmchat reward, dpo), pairs (palmchat dpo, reward), sft "
                                  "(palmchat sft: thumbs-up replies), kto (palmchat kto: every thumbs up/down) or "
                                  "oasst (every conversation tree and ranking as Open-Assistant message trees, "
                                  "which every stage's --data reads back)",
                      choices=list(FORMATS))
    merge: str = arg("borda", "how several labellers' rankings of the same replies become one: borda (Borda "
                              "count) or ranked-pairs (Tideman's ranked pairs; elects the reply a majority prefers "
                              "to each other one whenever there is one)", choices=list(MERGES))
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
        if args.format == "oasst":
            records, left_out = oasst_trees(store, args.merge)
        else:
            records, left_out = export_records(store, args.format, args.merge), []
    finally:
        store.close()
    for note in left_out:
        print(f"left out: {note}")
    if not records:
        what = {"sft": "thumbs-up replies", "kto": "thumbs up or down",
                "oasst": "conversations or ranked tasks"}.get(args.format, "ranked tasks or thumbs up/down pairs")
        raise ValueError(f"nothing to export: {args.db} holds no {what}")
    path = write_jsonl(args.out, records)
    print(f"wrote {len(records)} {args.format} {'trees' if args.format == 'oasst' else 'records'} to {path}")
    return path
