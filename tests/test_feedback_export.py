"""Merging labellers' rankings (Borda, ranked pairs) and `palmchat feedback export --format oasst`: the server's
conversation trees and rankings as Open-Assistant message trees, read back through palmchat's oasst reader.

The unit tests build a database through `Store` directly, as the server stores turns, regenerations, comparisons
and sibling rankings (schema v4); the end-to-end test chats with a real server on loopback."""

from __future__ import annotations

import json
import time
from itertools import count

import pytest

from palmchat.data.formats import read_examples
from palmchat.feedback.exchange import export_records, merged_rankings, oasst_trees
from palmchat.feedback.rankings import borda, merge, ranked_pairs
from palmchat.store import Store

# -- merging rankings, by hand ---------------------------------------------------------------------------


def test_ranked_pairs_locks_the_strongest_majorities_and_skips_the_one_closing_a_cycle():
    # a Condorcet cycle (a>b>c, b>c>a, c>a>b) plus a fourth labeller's full a>b>c:
    # a>b 3:1 (margin 2), b>c 3:1 (margin 2), c>a 2:2 (a tie locks nothing) -> a>b, b>c locked: a, b, c
    cycle = [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert ranked_pairs(cycle + [["a", "b", "c"]], ["a", "b", "c"]) == ["a", "b", "c"]
    assert ranked_pairs(cycle + [["a", "b", "c"]], ["c", "b", "a"]) == ["a", "b", "c"]  # no tie to break
    # the fourth labeller ranks only a>b: a>b 3:1 (margin 2), b>c 2:1 (margin 1), c>a 2:1 (margin 1), and nothing
    # about c against a or b from them. a>b locks first. b>c and c>a tie on margin and on votes (2): the tie goes
    # by the winner's place in the Borda order. Borda: a = 2+0+1+1 = 4, b = 1+2+0+0 = 3, c = 0+1+2 = 3; b and c
    # are first once each, so the candidates' order decides between them.
    partial = cycle + [["a", "b"]]
    # b before c: b>c locks, then c>a would close a>b>c>a: skipped -> a, b, c
    assert ranked_pairs(partial, ["a", "b", "c"]) == ["a", "b", "c"]
    # c before b: c>a locks, then b>c would close c>a>b>c: skipped -> c, a, b (Borda says a, c, b)
    assert ranked_pairs(partial, ["c", "b", "a"]) == ["c", "a", "b"]
    assert borda(partial, ["c", "b", "a"]) == ["a", "c", "b"]


def test_ranked_pairs_elects_the_condorcet_winner_where_borda_does_not():
    # 3 x a>b>c, 2 x b>c>a. Borda: a = 3*2 = 6, b = 3*1 + 2*2 = 7, c = 2*1 = 2 -> b, a, c.
    # Pairs: a>b 3:2 (margin 1), a>c 3:2 (margin 1), b>c 5:0 (margin 5): a beats each other one.
    # Locked in order: b>c, then a>b and a>c (equal margins and votes; same winner; the loser first in the Borda
    # order goes first) -> a, b, c
    rankings = [["a", "b", "c"]] * 3 + [["b", "c", "a"]] * 2
    assert borda(rankings, ["a", "b", "c"]) == ["b", "a", "c"]
    assert ranked_pairs(rankings, ["a", "b", "c"]) == ["a", "b", "c"]
    assert merge(rankings, ["a", "b", "c"], "ranked-pairs") == ["a", "b", "c"]
    assert merge(rankings, ["a", "b", "c"], "borda") == ["b", "a", "c"]
    with pytest.raises(ValueError, match="--merge must be one of borda, ranked-pairs"):
        merge(rankings, ["a", "b", "c"], "copeland")


def test_ranked_pairs_with_partial_rankings_and_ties():
    # [a, b] and [c, d] say nothing about a against c: a>b and c>d lock; the unbeaten go by Borda order
    # (a = c = 1 point, first once each: the candidates' order), then b and d the same way
    assert ranked_pairs([["a", "b"], ["c", "d"]], ["a", "b", "c", "d"]) == ["a", "c", "b", "d"]
    assert ranked_pairs([["a", "b"], ["b", "a"]], ["b", "a"]) == ["b", "a"]  # a tie: Borda's order (given order)
    assert ranked_pairs([["c", "b", "a"]], ["a", "b", "c"]) == ["c", "b", "a"]  # one labeller: their order
    assert ranked_pairs([], ["a", "b"]) == ["a", "b"]
    # strength is the margin, not the votes for the winner: a>b 3:2 (margin 1, 3 votes), b>c 2:0 and c>a 2:0
    # (margin 2, 2 votes). b>c and c>a lock first (b is first in the Borda order: b 2+2 = 4, a 3, c 2), then a>b
    # would close b>c>a>b: b, c, a. (Ordered by votes, a>b would have locked first: a, b, c.)
    rankings = [["a", "b"]] * 3 + [["b", "a"]] * 2 + [["b", "c"]] * 2 + [["c", "a"]] * 2
    assert ranked_pairs(rankings, ["a", "b", "c"]) == ["b", "c", "a"]


# -- a database built through Store as the server builds it -----------------------------------------------


def message(item_id: str, role: str, text: str, refusal: bool = False) -> dict:
    part = ({"type": "refusal", "refusal": text} if refusal else
            {"type": "output_text" if role == "assistant" else "input_text", "text": text})
    return {"id": item_id, "type": "message", "role": role, "status": "completed", "content": [part]}


ANN, BOB, CAT = "key_ann", "key_bob", "key_cat"
MODEL = "tiny-chat"  # the model id the server gives a checkpoint folder of that name
SYSTEM = {"role": "system", "content": "Be brief."}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def build_database(path) -> Store:
    """Two conversations of ANN's and the labelling queue:

    c1: system "Be brief." -> u1 "Hi" -> replies a1 "Hello!", a1b "Hey there" (regenerated), a1c "Greetings";
        a1b -> u2 "Name a fruit" -> a2 "Apple" | a2x "Pear" | a2y "Apple" (a comparison: all three kept);
        a2 -> u3 (blocked by moderation, no tokens) -> r3 (the refusal) -> u4 "ok then" -> a4 "Fine" (current).
        Siblings of u1 ranked by ann, bob and cat (cat only two of them); u2's replies ranked in the comparison by
        ann, then again as siblings by ann and bob (bob two of them). ann gave a1b a thumbs up.
        And a comparison stored before schema v4: candidates that are no items of c1.
    c2: u5 "Q" -> a5 "A", and an edited first message u6 "Q2" -> a6 "A2" (a second root).
    label task: "Sort 3 1 2." (with a system prompt) ranked by five labellers, 3 x [x, y, z] and 2 x [y, z, x]:
        Borda puts y first, ranked pairs x.
    """
    store = Store(path)
    ids = count()

    def new_id():
        return f"task_{next(ids)}"

    tokens = count(10)

    def add(after, *items, blocked=False):
        store.add_items(ANN, "c1", [(m, [] if blocked else [next(tokens)]) for m in items], "tok", after=after)

    store.create_conversation(ANN, {"id": "c1", "created_at": 1, "metadata": {}},
                              [(message("sys", "system", "Be brief."), [1])], "tok")
    add("sys", message("u1", "user", "Hi"), message("a1", "assistant", "Hello!"))
    add("u1", message("a1b", "assistant", "Hey there"))
    add("u1", message("a1c", "assistant", "Greetings"))
    add("a1b", message("u2", "user", "Name a fruit"))
    prompt2 = [SYSTEM, user("Hi"), assistant("Hey there"), user("Name a fruit")]
    store.add_task({"id": "cmp_1", "kind": "compare", "owner": ANN, "conversation_id": "c1", "prompt": prompt2,
                    "candidates": [{"id": "a2", "text": "Apple"}, {"id": "a2x", "text": "Pear"},
                                   {"id": "a2y", "text": "Apple"}], "params": {}})
    for item_id, text in (("a2x", "Pear"), ("a2y", "Apple"), ("a2", "Apple")):  # the chosen one last: current
        add("u2", message(item_id, "assistant", text))
    store.add_ranking("cmp_1", ANN, ["a2x", "a2", "a2y"])
    add("a2", message("u3", "user", "something flagged"), message("r3", "assistant", "I can't help with that.",
                                                                  refusal=True), blocked=True)
    add("r3", message("u4", "user", "ok then"), message("a4", "assistant", "Fine"))

    prompt1 = [SYSTEM, user("Hi")]
    store.rank_siblings(ANN, "c1", "u1", ANN, ["a1b", "a1", "a1c"], prompt1, new_id)
    store.rank_siblings(ANN, "c1", "u1", BOB, ["a1", "a1b", "a1c"], prompt1, new_id)
    store.rank_siblings(ANN, "c1", "u1", CAT, ["a1b", "a1c"], prompt1, new_id)
    store.rank_siblings(ANN, "c1", "u2", ANN, ["a2", "a2x", "a2y"], prompt2, new_id)  # replaces ann's compare one
    store.rank_siblings(ANN, "c1", "u2", BOB, ["a2x", "a2y"], prompt2, new_id)
    store.put_feedback({"id": "fb_1", "owner": ANN, "conversation_id": "c1", "item_id": "a1b", "rating": 1,
                        "comment": "", "prompt": prompt1, "reply": "Hey there", "created_at": time.time()})
    store.add_task({"id": "cmp_old", "kind": "compare", "owner": ANN, "conversation_id": "c1",
                    "prompt": [user("Hi"), assistant("Hello!"), user("Old question")],
                    "candidates": [{"id": "msg_o1", "text": "Old one"}, {"id": "msg_o2", "text": "Old two"}],
                    "params": {}})
    store.add_ranking("cmp_old", ANN, ["msg_o2", "msg_o1"])

    store.create_conversation(ANN, {"id": "c2", "created_at": 2, "metadata": {}},
                              [(message("u5", "user", "Q"), [2]), (message("a5", "assistant", "A"), [3])], "tok")
    store.add_items(ANN, "c2", [(message("u6", "user", "Q2"), [4]), (message("a6", "assistant", "A2"), [5])],
                    "tok", after=None)

    label_prompt = [SYSTEM, user("Sort 3 1 2.")]
    store.add_task({"id": "lab_1", "kind": "label", "prompt": label_prompt, "params": {},
                    "candidates": [{"id": "x", "text": "1 2 3"}, {"id": "y", "text": "3 2 1"},
                                   {"id": "z", "text": "2 1 3"}]})
    for labeller, ranking in (("l1", "xyz"), ("l2", "xyz"), ("l3", "xyz"), ("l4", "yzx"), ("l5", "yzx")):
        store.add_ranking("lab_1", labeller, list(ranking))
    store.add_task({"id": "lab_unranked", "kind": "label", "prompt": [user("Nobody ranked me")], "params": {},
                    "candidates": [{"id": "p", "text": "P"}, {"id": "q", "text": "Q"}]})
    return store


@pytest.fixture
def store(tmp_path):
    store = build_database(tmp_path / "palmchat.db")
    yield store
    store.close()


def best_first(record: dict) -> list[str]:
    return [record["responses"][i] for i in record["ranking"]]


def test_rankings_export_groups_the_replies_of_one_item_and_keeps_each_labellers_latest(store):
    records = export_records(store, "rankings")
    by_source = {r["source"]: r for r in records}
    assert sorted(by_source) == ["compare", "compare+siblings", "label", "siblings"]
    # u1's siblings: ann a1b>a1>a1c, bob a1>a1b>a1c, cat a1b>a1c. Borda: a1b 2+1+1 = 4, a1 1+2 = 3, a1c 0
    siblings = by_source["siblings"]
    assert siblings["prompt"] == [SYSTEM, user("Hi")] and siblings["labellers"] == 3
    assert best_first(siblings) == ["Hey there", "Hello!", "Greetings"]
    # u2: ann's comparison ranking is replaced by her later sibling ranking a2>a2x>a2y; bob a2x>a2y. Borda a2 2,
    # a2x 1+1, a2y 0; a tie on points and on firsts: candidate order (a2 first). a2y repeats a2's text: left out
    fruit = by_source["compare+siblings"]
    assert fruit["labellers"] == 2 and best_first(fruit) == ["Apple", "Pear"]
    assert best_first(by_source["compare"]) == ["Old two", "Old one"]  # not in the conversation: a set of its own
    assert best_first(by_source["label"]) == ["3 2 1", "1 2 3", "2 1 3"]  # Borda: y 3+4 = 7, x 6, z 2
    ranked = {r["source"]: best_first(r) for r in export_records(store, "rankings", merge="ranked-pairs")}
    assert ranked["label"] == ["1 2 3", "3 2 1", "2 1 3"]  # x beats y 3:2 and z 3:2
    pairs = export_records(store, "pairs", merge="ranked-pairs")
    assert {"prompt": [SYSTEM, user("Sort 3 1 2.")], "chosen": "1 2 3", "rejected": "3 2 1",
            "source": "label"} in pairs
    raw = {r["source"]: r["labeller_rankings"] for r in merged_rankings(store)}
    assert raw["compare+siblings"] == [{"labeller": ANN, "ranking": ["a2", "a2x", "a2y"]},
                                       {"labeller": BOB, "ranking": ["a2x", "a2y"]}]


def walk(message: dict):
    yield message
    for reply in message["replies"]:
        yield from walk(reply)


def test_oasst_export_writes_every_tree_with_ranks_and_each_labellers_ranking(store):
    trees, left_out = oasst_trees(store)
    assert left_out == []
    assert [(t["source"], t["source_id"], t["message_tree_id"]) for t in trees] == [
        ("conversation", "c1", "u1"), ("conversation", "c2", "u5"), ("conversation", "c2", "u6"),
        ("compare", "cmp_old", "cmp_old:0"), ("label", "lab_1", "lab_1:0")]  # an unranked label task is no data
    assert all(t["tree_state"] == "ready_for_export" for t in trees)
    c1 = {m["message_id"]: m for m in walk(trees[0]["prompt"])}
    root = c1["u1"]
    assert root["system_prompt"] == "Be brief." and "sys" not in c1
    assert (root["role"], root["parent_id"], root["user_id"], root["lang"], root["deleted"], root["synthetic"]) == (
        "prompter", None, ANN, "und", False, False)
    # replies: the one on the current branch first, then in the order they were made
    assert [r["message_id"] for r in root["replies"]] == ["a1b", "a1", "a1c"]
    assert [c1[i]["rank"] for i in ("a1b", "a1", "a1c")] == [0, 1, 2]
    assert root["labeller_rankings"] == [{"labeller": ANN, "ranking": ["a1b", "a1", "a1c"]},
                                         {"labeller": BOB, "ranking": ["a1", "a1b", "a1c"]},
                                         {"labeller": CAT, "ranking": ["a1b", "a1c"]}]
    assert c1["a1b"]["emojis"] == {"+1": 1, "-1": 0} and "emojis" not in c1["a1"]
    assert [c1[i]["rank"] for i in ("a2", "a2x", "a2y")] == [0, 1, None]  # a2y's text ranked better as a2
    # the blocked turn is kept, marked as failed review; what followed it continues from a2, as its context did
    assert [r["message_id"] for r in c1["a2"]["replies"]] == ["u3", "u4"]
    assert (c1["u3"]["review_result"], c1["r3"]["review_result"], c1["u4"]["review_result"]) == (False, False, True)
    assert c1["r3"]["text"] == "I can't help with that." and c1["r3"]["parent_id"] == "u3"
    assert c1["u4"]["parent_id"] == "a2"
    label = {m["message_id"]: m for m in walk(trees[4]["prompt"])}
    assert trees[4]["prompt"]["system_prompt"] == "Be brief."
    assert [label[f"lab_1:{c}"]["rank"] for c in "xyz"] == [1, 0, 2]
    assert label["lab_1:0"]["labeller_rankings"][3] == {"labeller": "l4",
                                                        "ranking": ["lab_1:y", "lab_1:z", "lab_1:x"]}
    ranked_pairs_trees, _ = oasst_trees(store, "ranked-pairs")
    label = {m["message_id"]: m for m in walk(ranked_pairs_trees[4]["prompt"])}
    assert [label[f"lab_1:{c}"]["rank"] for c in "xyz"] == [0, 1, 2]


def messages_of(prompt) -> list[dict]:
    return [user(prompt)] if isinstance(prompt, str) else prompt


def without_system(messages: list[dict]) -> list[dict]:
    return [m for m in messages if m["role"] != "system"]


@pytest.mark.parametrize("merge_method", ["borda", "ranked-pairs"])
def test_oasst_export_reads_back_as_the_rankings_export_and_the_best_paths(store, tmp_path, capsys, merge_method):
    from palmchat.cli import main

    out = tmp_path / "trees.jsonl"
    assert main(["feedback", "export", "--db", str(store.path), "--format", "oasst", "--merge", merge_method,
                 "--out", str(out)]) == 0
    assert "wrote 5 oasst trees" in capsys.readouterr().out
    back = read_examples(out)
    assert back.format == "oasst" and back.bad == []
    # the oasst form has no system message: a conversation's system prompt is palmchat's extension on the root
    expected = sorted(json.dumps([messages_of(r["prompt"]), best_first(r)])
                      for r in export_records(store, "rankings", merge_method) if r["source"] != "thumbs")
    assert sorted(json.dumps([r.prompt_messages, r.responses]) for r in back.rankings) == expected
    assert back.conversations == [
        [SYSTEM, user("Hi"), assistant("Hey there"), user("Name a fruit"), assistant("Apple"), user("ok then"),
         assistant("Fine")],
        [user("Q"), assistant("A")], [user("Q2"), assistant("A2")],
        [user("Hi"), assistant("Hello!"), user("Old question"), assistant("Old two")],
        [SYSTEM, user("Sort 3 1 2."), assistant("1 2 3" if merge_method == "ranked-pairs" else "3 2 1")]]
    assert back.dropped == {"failed review": [1], "unranked reply": [1]}  # the blocked turn, the repeated "Apple"


def test_a_ranking_whose_reply_was_deleted_is_a_tree_of_its_own_and_still_round_trips(store, tmp_path):
    assert store.delete_branch("c1", "a2x")
    # u2's replies are no longer all there: the comparison and the sibling ranking are each a set of their own
    sources = sorted(r["source"] for r in export_records(store, "rankings"))
    assert sources == ["compare", "compare", "label", "siblings", "siblings"]
    trees, left_out = oasst_trees(store)
    assert left_out == [] and [t["source_id"] for t in trees][3:] == ["cmp_1", "task_1", "cmp_old", "lab_1"]
    c1 = {m["message_id"]: m for m in walk(trees[0]["prompt"])}
    assert c1["a2"]["rank"] is None and "labeller_rankings" not in c1["u2"]
    out = tmp_path / "trees.jsonl"
    out.write_text("".join(json.dumps(t) + "\n" for t in trees))
    expected = sorted(json.dumps([messages_of(r["prompt"]), best_first(r)])
                      for r in export_records(store, "rankings"))
    assert sorted(json.dumps([r.prompt_messages, r.responses]) for r in read_examples(out).rankings) == expected


def test_oasst_export_leaves_out_a_branch_that_starts_with_an_assistant_message(tmp_path, capsys):
    from palmchat.cli import main

    store = Store(tmp_path / "db")
    store.create_conversation("", {"id": "c", "created_at": 1, "metadata": {}},
                              [(message("a0", "assistant", "I start"), [1]), (message("u0", "user", "ok"), [2])])
    assert oasst_trees(store)[0] == []
    store.close()
    assert main(["feedback", "export", "--db", str(tmp_path / "db"), "--format", "oasst", "--out",
                 str(tmp_path / "t.jsonl")]) == 2
    captured = capsys.readouterr()
    assert "left out: conversation c: the branch from a0 starts with an assistant message" in captured.out
    assert "nothing to export" in captured.err and "conversations or ranked tasks" in captured.err
    with pytest.raises(SystemExit):
        main(["feedback", "export", "--db", str(tmp_path / "db"), "--merge", "copeland", "--out", "t.jsonl"])
    assert "argument --merge: invalid choice: 'copeland'" in capsys.readouterr().err


# -- end to end: a real server on loopback, the official client, the `palmchat` command ------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from server_fixtures import Server, build_policy, world_tokenizer

    from palmchat.serve.keys import create_key

    root = tmp_path_factory.mktemp("export")
    tokenizer = world_tokenizer()
    policy, _ = build_policy(root / "tiny-chat", tokenizer, tokenizer.save(root / "tokenizer.json"))
    store = Store(root / "palmchat.db")
    keys = {name: create_key(store, name, role="labeller") for name in ("alice", "bob")}  # name -> (key id, secret)
    store.close()
    srv = Server(policy, root / "palmchat.db", "--max-tokens-limit", "8", log=root / "server.log").start()
    srv.keys, srv.db, srv.root = keys, root / "palmchat.db", root
    yield srv
    srv.stop()


@pytest.mark.timeout(300)
def test_chat_regenerate_compare_rank_then_oasst_export_round_trips(server):
    import httpx
    import openai
    from server_fixtures import palmchat

    alice_id, alice = server.keys["alice"]
    bob_id, bob = server.keys["bob"]
    headers = {name: {"authorization": f"Bearer {secret}"} for name, (_, secret) in server.keys.items()}
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=alice, max_retries=0)

    def post(path, who="alice", **body):
        response = httpx.post(server.url + path, headers=headers[who], json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    def tree(conv):
        return httpx.get(f"{server.url}/v1/conversations/{conv}/tree", headers=headers["alice"]).json()["data"]

    # a conversation: a question, two regenerated replies, a follow-up on the last one, a comparison of three
    # candidates for the next question, the three first replies ranked, a thumbs up
    conv = c.conversations.create().id
    c.responses.create(model=MODEL, input="What pet does Briruul have?", conversation=conv)
    question = tree(conv)[0]["id"]
    for _ in range(2):
        c.responses.create(model=MODEL, input=[], conversation=conv, extra_body={"branch_from": question})
    c.responses.create(model=MODEL, input="And its name?", conversation=conv)
    compared = post(f"/v1/conversations/{conv}/compare", model=MODEL, input="How old is it?", n=3,
                    instructions="Answer in one word.")
    post(f"/v1/comparisons/{compared['id']}/ranking", ranking=[c_["id"] for c_ in compared["candidates"]][::-1])
    items = tree(conv)
    replies = [i["id"] for i in items if i["parent_id"] == question]
    assert len(replies) == 3
    post(f"/v1/conversations/{conv}/items/{question}/ranking", ranking=[replies[2], replies[0], replies[1]])
    post("/v1/feedback", item_id=replies[0], conversation_id=conv, rating=1)

    # the labelling queue: one prompt ranked by both keys
    prompts = server.root / "prompts.jsonl"
    prompts.write_text('{"prompt": "Sort 3 1 2."}\n')
    assert palmchat("feedback", "import", str(prompts), "--db", str(server.db), "--k", "3",
                    "--max-tokens", "4").returncode == 0
    for who in ("alice", "bob"):
        task = httpx.get(server.url + "/v1/label/next", headers=headers[who]).json()["task"]
        ranking = sorted(x["id"] for x in task["candidates"])
        post(f"/v1/label/tasks/{task['id']}/ranking", who, ranking=ranking if who == "alice" else ranking[::-1])

    out = server.root / "trees.jsonl"
    done = palmchat("feedback", "export", "--db", str(server.db), "--format", "oasst", "--merge", "ranked-pairs",
                    "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "wrote 2 oasst trees" in done.stdout and "left out" not in done.stdout
    text = out.read_text()
    assert alice not in text and bob not in text  # labellers are key ids, never secrets
    trees = [json.loads(line) for line in text.splitlines()]
    root = trees[0]["prompt"]
    assert root["message_id"] == question and root["user_id"] == alice_id
    assert root["labeller_rankings"] == [{"labeller": alice_id, "ranking": [replies[2], replies[0], replies[1]]}]
    by_id = {r["message_id"]: r for r in root["replies"]}
    assert [by_id[r]["rank"] for r in replies] == [1, 2, 0] and by_id[replies[0]]["emojis"] == {"+1": 1, "-1": 0}
    label_rankings = trees[1]["prompt"]["labeller_rankings"]
    assert sorted(r["labeller"] for r in label_rankings) == sorted([alice_id, bob_id])

    ranked = server.root / "rankings.jsonl"
    assert palmchat("feedback", "export", "--db", str(server.db), "--format", "rankings", "--merge", "ranked-pairs",
                    "--out", str(ranked)).returncode == 0
    records = [json.loads(line) for line in ranked.read_text().splitlines()]
    assert sorted(r["source"] for r in records) == ["compare", "label", "siblings"]
    back = read_examples(out)
    # the comparison's `instructions` (a system message for that request only) are not part of the conversation
    # and so not of its tree: compared without system messages
    expected = sorted(json.dumps([without_system(messages_of(r["prompt"])), best_first(r)]) for r in records)
    assert sorted(json.dumps([without_system(r.prompt_messages), r.responses]) for r in back.rankings) == expected

    # the best paths: the conversation through the best-ranked reply to the question and the best compared
    # candidate; the label task's prompt with its merged best candidate
    items = tree(conv)
    parent = {i["id"]: i["parent_id"] for i in items}
    text_of = {i["id"]: i["content"][0]["text"] for i in items}
    path, node = [], compared["candidates"][-1]["id"]  # ranked best
    while node is not None:
        path.insert(0, node)
        node = parent[node]
    assert path[:2] == [question, replies[2]] and len(path) == 6
    assert [m["content"] for m in back.conversations[0]] == [text_of[i] for i in path]
    label = next(r for r in records if r["source"] == "label")
    assert back.conversations[1:] == [[user("Sort 3 1 2."), assistant(best_first(label)[0])]]
