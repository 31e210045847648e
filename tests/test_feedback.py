"""Feedback: thumbs, the compare view's API, the labelling queue, export to the trainers' formats, the schema
migration, regenerate and stopped replies.

Most tests drive the app in-process (FastAPI's TestClient) around the tiny random-weight checkpoint of
tests/server_fixtures.py, whose replies always run to their max tokens. A stopped stream needs a real client
disconnect, so that test runs a `palmchat serve` subprocess.
"""

from __future__ import annotations

import json
import sqlite3
import time

import httpx
import pytest
from server_fixtures import Server, build_checkpoints

from palmchat.data.chat import load_conversations, load_rankings
from palmchat.feedback.exchange import export_records, import_prompts
from palmchat.feedback.rankings import agreement, borda, pair_agreement

MODEL = "tiny-chat"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("feedback")
    policy, reward = build_checkpoints(root)
    return {"root": root, "policy": policy, "reward": reward}


def make_app(artifacts, db, **state_args):
    from palmchat import checkpoint
    from palmchat.inference.scheduler import Scheduler
    from palmchat.serve.app import create_app
    from palmchat.serve.state import ServerState
    from palmchat.store import Store

    model, _, ckpt = checkpoint.load_model(artifacts["policy"])
    store = Store(db)
    state = ServerState(model_id=MODEL, tokenizer=checkpoint.load_tokenizer(ckpt), scheduler=Scheduler(model.eval()),
                        store=store, **state_args)
    return create_app(state), state


@pytest.fixture(scope="module")
def app(artifacts):
    from fastapi.testclient import TestClient

    application, state = make_app(artifacts, artifacts["root"] / "feedback.db", max_tokens_limit=64, no_auth=True)
    with TestClient(application) as client:
        client.state = state
        yield client
    state.store.close()


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def respond(app, conversation: str, text: str, tokens: int = 4) -> dict:
    return ok(app.post("/v1/responses", json={"model": MODEL, "input": text, "conversation": conversation,
                                              "max_output_tokens": tokens}))


def reply_text(response: dict) -> str:
    return response["output"][0]["content"][0]["text"]


def new_conversation(app, title: str = "t") -> str:
    return ok(app.post("/v1/conversations", json={"metadata": {"title": title}}))["id"]


# -- pure functions --------------------------------------------------------------------------------------


def test_borda_merges_rankings_by_hand():
    # points (K=3: 2, 1, 0): a = 2+1+0 = 3, b = 1+2+2 = 5, c = 0+0+1 = 1
    assert borda([["a", "b", "c"], ["b", "a", "c"], ["b", "c", "a"]], ["a", "b", "c"]) == ["b", "a", "c"]
    # a tie on points (a = b = 2) goes to the one ranked first more often, then to sampling order
    assert borda([["a", "c", "b"], ["b", "a", "c"], ["b", "c", "a"]], ["a", "b", "c"]) == ["b", "a", "c"]
    assert borda([["a", "b"], ["b", "a"]], ["b", "a"]) == ["b", "a"]
    assert borda([["c", "b", "a"]], ["a", "b", "c"]) == ["c", "b", "a"]  # one labeller: their order


def test_agreement_by_hand():
    assert pair_agreement(["a", "b", "c"], ["a", "b", "c"]) == 1.0
    assert pair_agreement(["a", "b", "c"], ["c", "b", "a"]) == 0.0
    assert pair_agreement(["a", "b", "c"], ["b", "a", "c"]) == pytest.approx(2 / 3)  # (a,c), (b,c) agree
    value, measured = agreement({"t1": [["a", "b", "c"], ["b", "a", "c"], ["a", "b", "c"]],  # (2/3 + 1 + 2/3) / 3
                                 "t2": [["x", "y"], ["y", "x"]],  # 0
                                 "t3": [["p", "q"]]})  # one labeller: not measured
    assert measured == 2 and value == pytest.approx((7 / 9 + 0) / 2)
    assert agreement({"t": [["a", "b"]]}) == (None, 0)


# -- conversations, regenerate ---------------------------------------------------------------------------


def test_list_conversations_newest_first_rename(app):
    first, second = new_conversation(app, "first"), new_conversation(app, "second")
    listed = ok(app.get("/v1/conversations?limit=100"))["data"]
    ids = [c["id"] for c in listed]
    assert ids.index(second) < ids.index(first)
    assert listed[ids.index(second)]["metadata"] == {"title": "second"}
    ok(app.post(f"/v1/conversations/{first}", json={"metadata": {"title": "renamed"}}))
    titles = {c["id"]: c["metadata"]["title"] for c in ok(app.get("/v1/conversations?limit=100"))["data"]}
    assert titles[first] == "renamed"
    assert [c["id"] for c in ok(app.get("/v1/conversations?limit=100&order=asc"))["data"]][-2:] == [first, second]


def test_regenerate_rebuilds_the_context_from_the_remaining_items(app):
    conv = new_conversation(app)
    respond(app, conv, "My cat is Tom.")
    second = respond(app, conv, "What is my cat called?")
    items = ok(app.get(f"/v1/conversations/{conv}/items?order=asc"))["data"]
    assert items[-1]["id"] == second["output"][0]["id"]  # the item is the response's output item
    for item in items[-1:-3:-1]:  # the last reply and the question it answered, as the page's regenerate does
        ok(app.delete(f"/v1/conversations/{conv}/items/{item['id']}"))
    again = respond(app, conv, "What is my cat called?")
    # the same prompt as before: the history without the deleted turn, plus the same question
    assert again["usage"]["input_tokens"] == second["usage"]["input_tokens"]
    assert again["usage"]["input_tokens_details"]["cached_tokens"] == second["usage"]["input_tokens"] - 1
    assert len(ok(app.get(f"/v1/conversations/{conv}/items"))["data"]) == 4


# -- thumbs ----------------------------------------------------------------------------------------------


def test_thumbs_are_stored_replaced_and_exported(app):
    convs = [new_conversation(app) for _ in range(2)]
    replies = [respond(app, c, "Where does Zorbo live?", tokens=3 + i) for i, c in enumerate(convs)]
    up, down = [r["output"][0]["id"] for r in replies]
    user_item = ok(app.get(f"/v1/conversations/{convs[0]}/items?order=asc"))["data"][0]["id"]
    ok(app.post("/v1/feedback", json={"item_id": up, "conversation_id": convs[0], "rating": -1}))
    given = ok(app.post("/v1/feedback", json={"item_id": up, "conversation_id": convs[0], "rating": 1,
                                              "comment": "good"}))
    assert given["rating"] == 1 and given["comment"] == "good"
    ok(app.post("/v1/feedback", json={"item_id": down, "conversation_id": convs[1], "rating": -1}))
    listed = ok(app.get(f"/v1/feedback?conversation_id={convs[0]}"))["data"]
    assert [(f["item_id"], f["rating"]) for f in listed] == [(up, 1)]  # replaced, not added
    assert "assistant" in error(app.post("/v1/feedback", json={"item_id": user_item, "conversation_id": convs[0],
                                                               "rating": 1}), 400)
    error(app.post("/v1/feedback", json={"item_id": "msg_nope", "conversation_id": convs[0], "rating": 1}), 404)
    error(app.post("/v1/feedback", json={"item_id": up, "conversation_id": convs[0], "rating": 2}), 400)
    error(app.post("/v1/feedback", json={"item_id": up, "conversation_id": "conv_nope", "rating": 1}), 404)

    store = app.state.store
    sft = [r for r in export_records(store, "sft") if r["messages"][-1]["content"] == reply_text(replies[0])]
    assert sft and sft[0]["messages"][0] == {"role": "user", "content": "Where does Zorbo live?"}
    pairs = [p for p in export_records(store, "pairs") if p["source"] == "thumbs"]
    assert {"prompt": "Where does Zorbo live?", "chosen": reply_text(replies[0]),
            "rejected": reply_text(replies[1]), "source": "thumbs"} in pairs
    ok(app.delete(f"/v1/conversations/{convs[0]}"))  # feedback is a training example: it stays
    assert any(r["messages"][-1]["content"] == reply_text(replies[0]) for r in export_records(store, "sft"))


# -- compare ---------------------------------------------------------------------------------------------


def test_compare_then_rank_commits_the_best_as_the_next_turn(app):
    conv = new_conversation(app)
    respond(app, conv, "Hello.")
    before = ok(app.get(f"/v1/conversations/{conv}/items?order=asc"))["data"]
    body = {"model": MODEL, "input": "Tell me about Zorbo.", "n": 3, "max_output_tokens": 5,
            "instructions": "Be brief."}
    result = ok(app.post(f"/v1/conversations/{conv}/compare", json=body))
    assert result["object"] == "comparison" and len(result["candidates"]) == 3
    assert result["usage"]["output_tokens"] == 15  # three candidates sampled together
    assert ok(app.get(f"/v1/conversations/{conv}/items?order=asc"))["data"] == before  # nothing committed yet
    stale = ok(app.post(f"/v1/conversations/{conv}/compare", json={**body, "n": 2}))

    ids = [c["id"] for c in result["candidates"]]
    assert "ranking" in error(app.post(f"/v1/comparisons/{result['id']}/ranking", json={"ranking": ids[:2]}), 400)
    ranking = [ids[2], ids[0], ids[1]]
    ranked = ok(app.post(f"/v1/comparisons/{result['id']}/ranking", json={"ranking": ranking}))
    items = ok(app.get(f"/v1/conversations/{conv}/items?order=asc"))["data"]
    assert [i["role"] for i in items[len(before):]] == ["user", "assistant"]
    assert items[-1]["id"] == ids[2] and items[-1]["content"][0]["text"] == result["candidates"][2]["text"]
    assert ranked["items"][-1]["id"] == ids[2]

    # the chosen candidate's tokens were appended: the next turn (same instructions, as the page sends them)
    # finds the whole compare prompt in the prefix cache
    follow = ok(app.post("/v1/responses", json={"model": MODEL, "input": "And then?", "conversation": conv,
                                                "instructions": "Be brief.", "max_output_tokens": 2}))
    assert follow["usage"]["input_tokens_details"]["cached_tokens"] >= result["usage"]["input_tokens"]

    assert "already" in error(app.post(f"/v1/comparisons/{result['id']}/ranking", json={"ranking": ranking}), 409)
    stale_ids = [c["id"] for c in stale["candidates"]]
    assert "changed" in error(app.post(f"/v1/comparisons/{stale['id']}/ranking", json={"ranking": stale_ids}), 409)
    # thumbs on a chosen candidate know its instructions
    ok(app.post("/v1/feedback", json={"item_id": ids[2], "conversation_id": conv, "rating": 1}))
    row = next(f for f in app.state.store.feedback() if f["item_id"] == ids[2])
    assert row["prompt"][0] == {"role": "system", "content": "Be brief."}

    exported = [r for r in export_records(app.state.store, "rankings") if r["source"] == "compare"
                and r["prompt"][-1]["content"] == "Tell me about Zorbo."]
    assert len(exported) == 1 and exported[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    texts = [c["text"] for c in result["candidates"]]
    assert exported[0]["responses"][exported[0]["ranking"][0]] == texts[2]


def test_ranking_a_deleted_conversation_is_a_clear_404(app):
    conv = new_conversation(app)
    result = ok(app.post(f"/v1/conversations/{conv}/compare", json={"model": MODEL, "input": "hi", "n": 2,
                                                                    "max_output_tokens": 3}))
    ok(app.delete(f"/v1/conversations/{conv}"))
    message = error(app.post(f"/v1/comparisons/{result['id']}/ranking",
                             json={"ranking": [c["id"] for c in result["candidates"]]}), 404)
    assert "deleted" in message and "Nothing was stored" in message
    assert not [r for r in app.state.store.rankings() if r["task_id"] == result["id"]]
    error(app.post(f"/v1/conversations/{conv}/compare", json={"model": MODEL, "input": "hi"}), 404)
    error(app.post("/v1/comparisons/cmp_nope/ranking", json={"ranking": ["a", "b"]}), 404)
    error(app.post(f"/v1/conversations/{new_conversation(app)}/compare", json={"model": MODEL, "input": "hi", "n": 5}),
          400)


# -- the labelling queue ---------------------------------------------------------------------------------


def test_labelling_queue_several_labellers_stats_and_export(app, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What pet does Briruul have?"}\n\n'
                       '{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]}\n'
                       '{"messages": [{"role": "user", "content": "Sort 3 1 2."}]}\n')
    store = app.state.store
    assert import_prompts(store, prompts, k=3, max_tokens=4) == (3, 3)
    assert import_prompts(store, prompts, k=3, max_tokens=4) == (0, 3)  # queued once

    def labeller(name):
        return {"x-palmchat-labeller": name}

    seen = {}
    for name in ("ann", "bob"):
        for _ in range(3):
            task = ok(app.get("/v1/label/next", headers=labeller(name)))["task"]
            assert len(task["candidates"]) == 3
            ids = sorted(c["id"] for c in task["candidates"])
            assert seen.setdefault(task["id"], ids) == ids  # every labeller ranks the same candidates
            ranking = ids if name == "ann" else [ids[1], ids[0], ids[2]]
            ok(app.post(f"/v1/label/tasks/{task['id']}/ranking", json={"ranking": ranking}, headers=labeller(name)))
        assert ok(app.get("/v1/label/next", headers=labeller(name)))["task"] is None
    assert len(seen) == 3
    stats = ok(app.get("/v1/label/stats", headers=labeller("ann")))
    assert stats["tasks"] == 3 and stats["rankings"] == 6 and stats["labellers"] == 2 and stats["mine"] == 3
    assert stats["agreement"] == pytest.approx(2 / 3) and stats["agreement_tasks"] == 3

    task_id = next(iter(seen))
    error(app.post(f"/v1/label/tasks/{task_id}/ranking", json={"ranking": ["x", "y"]}), 400)
    error(app.post("/v1/label/tasks/task_nope/ranking", json={"ranking": ["x", "y"]}), 404)

    labelled = [r for r in export_records(store, "rankings") if r["source"] == "label"]
    assert len(labelled) == 3 and all(r["labellers"] == 2 for r in labelled)
    # ann [a, b, c] and bob [b, a, c]: Borda points a = 2 + 1, b = 1 + 2, c = 0; first places a 1, b 1: the tie
    # goes to sampling order
    from palmchat.feedback.exchange import merged_rankings

    merged = {r["task_id"]: r for r in merged_rankings(store)}[task_id]
    a, b, c = seen[task_id]
    sampled = [x["id"] for x in store.get_task(task_id)["candidates"]]
    texts = {x["id"]: x["text"] for x in store.get_task(task_id)["candidates"]}
    expected = sorted([a, b], key=sampled.index) + [c]
    if len(set(texts.values())) == 3:  # equal texts would be merged
        assert [merged["responses"][i] for i in merged["order"]] == [texts[x] for x in expected]


def test_export_cli_files_read_back_through_the_trainers_readers(app, tmp_path, capsys):
    from palmchat.cli import main

    db = str(app.state.store.path)
    for fmt, reader in (("rankings", load_rankings), ("pairs", load_rankings), ("sft", load_conversations)):
        out = tmp_path / f"{fmt}.jsonl"
        assert main(["feedback", "export", "--db", db, "--format", fmt, "--out", str(out)]) == 0
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(reader(out)) == len(records) > 0
        if fmt == "pairs":
            assert {"prompt", "chosen", "rejected"} <= set(records[0])
    assert "wrote" in capsys.readouterr().out
    empty = tmp_path / "empty.db"
    from palmchat.store import Store

    Store(empty).close()
    assert main(["feedback", "export", "--db", str(empty), "--format", "sft", "--out", str(tmp_path / "x")]) == 2
    assert "nothing to export" in capsys.readouterr().err


def test_import_cli_reports_bad_lines(tmp_path, capsys):
    from palmchat.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    assert main(["feedback", "import", str(bad), "--db", str(tmp_path / "q.db")]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
    bad.write_text('{"prompt": "fine"}\nnot json\n')
    assert main(["feedback", "import", str(bad), "--db", str(tmp_path / "q.db")]) == 2
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    assert main(["feedback", "import", str(good), "--db", str(tmp_path / "q.db"), "--k", "5"]) == 2
    assert "--k" in capsys.readouterr().err
    assert main(["feedback", "import", str(good), "--db", str(tmp_path / "q.db"), "--k", "2"]) == 0
    assert "queued 2 of 2" in capsys.readouterr().out


# -- storage ---------------------------------------------------------------------------------------------


def test_a_v1_database_is_upgraded_in_place(tmp_path):
    from palmchat.store import SCHEMA_V1, SCHEMA_VERSION, Store

    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as db:
        for statement in SCHEMA_V1.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("INSERT INTO api_keys VALUES ('key_1', 'alice', 'hash', 'pc-abc', NULL, 0, NULL)")
        db.execute("""INSERT INTO conversations VALUES ('conv_1', 'key_1', 0, '{"title": "old"}')""")
        db.execute("PRAGMA user_version=1")
    store = Store(path)
    try:
        assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        assert store.get_conversation("key_1", "conv_1")["metadata"] == {"title": "old"}
        assert store.keys()[0]["name"] == "alice" and store.keys()[0]["role"] == "user"
        assert store.key_by_hash("hash")["id"] == "key_1"
        store.add_task({"id": "task_1", "kind": "label", "prompt": [{"role": "user", "content": "hi"}],
                        "params": {"k": 2}})
        assert store.next_label_task("local")["id"] == "task_1"
        assert store.integrity_check() == "ok"
    finally:
        store.close()
    Store(path).close()  # opening a current database again changes nothing


# -- admin: hot-swapping the reward model ----------------------------------------------------------------


def test_admin_reload_needs_an_admin_key(artifacts, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from palmchat.cli import main
    from palmchat.serve.keys import create_key
    from palmchat.store import Store

    db = tmp_path / "admin.db"
    store = Store(db)
    user = create_key(store, "user")[1]
    store.close()
    assert main(["keys", "create", "--db", str(db), "--name", "loop", "--admin"]) == 0
    admin = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["keys", "list", "--db", str(db)]) == 0
    listed = capsys.readouterr().out.splitlines()
    lines = {line.split()[1]: line for line in listed}
    assert lines["user"].split()[2] == "user" and lines["loop"].split()[2] == "admin"
    assert lines["user"].endswith("active") and lines["loop"].endswith("active")
    application, state = make_app(artifacts, db)
    with TestClient(application) as client:
        body = {"reward_model": str(artifacts["reward"])}
        assert client.get("/health").json()["reward_model"] is None
        error(client.post("/v1/admin/reload", json=body, headers={"authorization": f"Bearer {user}"}), 403)
        error(client.post("/v1/admin/reload", json=body), 401)
        admin_auth = {"authorization": f"Bearer {admin}"}
        assert "could not load" in error(client.post("/v1/admin/reload", json={"reward_model": str(tmp_path)},
                                                     headers=admin_auth), 400)
        models = [m["id"] for m in ok(client.get("/v1/models", headers=admin_auth))["data"]]
        assert models == [MODEL]
        swapped = ok(client.post("/v1/admin/reload", json=body, headers=admin_auth))
        assert swapped["reward_model"] == str(artifacts["reward"]) and swapped["previous"] is None
        served = client.get("/health").json()["reward_model"]
        assert served["name"] == artifacts["reward"].name and len(served["sha256"]) == 64
        assert str(artifacts["reward"]) not in client.get("/health").text  # no file paths
        assert f"{MODEL}:best-of-4" in [m["id"] for m in ok(client.get("/v1/models", headers=admin_auth))["data"]]
        best = ok(client.post("/v1/chat/completions", headers=admin_auth, json={
            "model": f"{MODEL}:best-of-2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
        assert best["usage"]["completion_tokens"] == 4
    state.store.close()


# -- a stopped stream (a real client disconnect) ---------------------------------------------------------


def test_a_stopped_reply_is_stored_as_it_stood(artifacts, tmp_path):
    srv = Server(artifacts["policy"], tmp_path / "stop.db", "--moderation", "none", log=tmp_path / "stop.log",
                 no_auth=True).start()
    try:
        conv = httpx.post(srv.url + "/v1/conversations", json={}).json()["id"]
        item_id, text = None, ""
        with httpx.stream("POST", srv.url + "/v1/responses", json={
                "model": MODEL, "input": "A long story, please.", "conversation": conv, "max_output_tokens": 1500,
                "stream": True}) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event["type"] == "response.output_item.added":
                    item_id = event["item"]["id"]
                text += event.get("delta", "") if event["type"] == "response.output_text.delta" else ""
                if len(text) > 20:
                    break  # the client goes away, as the page's Stop button does
        deadline, items = time.monotonic() + 10, []
        while time.monotonic() < deadline and len(items) < 2:
            items = httpx.get(f"{srv.url}/v1/conversations/{conv}/items?order=asc").json()["data"]
            time.sleep(0.05)
        assert [i["role"] for i in items] == ["user", "assistant"]
        stopped = items[1]
        assert stopped["id"] == item_id and stopped["status"] == "incomplete"
        assert stopped["content"][0]["text"].startswith(text) and len(stopped["content"][0]["text"]) < 1500 * 8
        assert httpx.get(srv.url + "/health").json()["running"] == 0  # the generation was cancelled
        # the conversation continues from the stored tokens
        after = httpx.post(srv.url + "/v1/responses", json={"model": MODEL, "input": "Go on.", "conversation": conv,
                                                            "max_output_tokens": 2}, timeout=60).json()
        assert after["status"] == "incomplete" and after["usage"]["input_tokens_details"]["cached_tokens"] > 0
        assert len(httpx.get(f"{srv.url}/v1/conversations/{conv}/items").json()["data"]) == 4
    finally:
        srv.stop()
