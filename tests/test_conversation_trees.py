"""Conversations as trees: a regenerated reply or an edited message is a new branch beside the old one, kept in the
database (palmchat/store.py, schema v4), shown and continued per branch, ranked as siblings, and still there after
the server restarts. The store's operations are checked directly, then the server's through the official client."""

from __future__ import annotations

import sqlite3

import httpx
import openai
import pytest
from server_fixtures import Server, build_policy, world_tokenizer

from palmchat.store import SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, Store, pack_ids

MODEL = "tiny-chat"
pytestmark = pytest.mark.timeout(300)


def message(item_id: str, role: str = "user") -> tuple[dict, list[int]]:
    return {"id": item_id, "type": "message", "role": role, "content": [{"type": "input_text", "text": item_id}]}, [1]


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "trees.db")
    store.create_conversation("me", {"id": "conv_1", "created_at": 0, "metadata": {}}, [])
    yield store
    store.close()


def ids(items) -> list[str]:
    return [item["id"] for item in items]


def test_a_v3_database_becomes_one_branch_per_conversation(tmp_path):
    path = tmp_path / "v3.db"
    with sqlite3.connect(path) as db:
        for statement in (SCHEMA_V1 + ";" + SCHEMA_V2 + ";" + SCHEMA_V3).split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("INSERT INTO conversations VALUES ('conv_1', '', 0, '{}')")
        db.execute("INSERT INTO conversations VALUES ('conv_2', '', 0, '{}')")
        for position, item_id in ((0, "u1"), (1, "a1"), (5, "u2")):
            db.execute("INSERT INTO items VALUES (?, 'conv_1', ?, ?, ?, NULL)",
                       (item_id, position, f'{{"id": "{item_id}"}}', pack_ids([position])))
        db.execute("INSERT INTO api_keys VALUES ('key_1', 'ops', 'h', 'pc-', NULL, 0, NULL, 1)")
        db.execute("PRAGMA user_version=3")
    store = Store(path)
    try:
        assert store.tree("conv_1") == {"current_item": "u2",
                                        "items": [({"id": "u1"}, None), ({"id": "a1"}, "u1"), ({"id": "u2"}, "a1")]}
        assert store.context_items("conv_1") == [({"id": "u1"}, [0], None), ({"id": "a1"}, [1], None),
                                                 ({"id": "u2"}, [5], None)]
        assert store.tree("conv_2") == {"current_item": None, "items": []}
        assert sqlite3.connect(path).execute("SELECT role FROM api_keys").fetchone()[0] == "admin"
        assert store.integrity_check() == "ok"
    finally:
        store.close()


def test_branches_are_appended_shown_and_deleted(store):
    store.add_items("me", "conv_1", [message("u1"), message("a1", "assistant")])
    store.add_items("me", "conv_1", [message("a2", "assistant")], after="u1")  # regenerated
    assert ids(store.items("conv_1")) == ["u1", "a2"]
    assert ids(store.items("conv_1", "a1")) == ["u1", "a1"]
    store.add_items("me", "conv_1", [message("u2"), message("a3", "assistant")])  # continues the current branch
    assert ids(store.items("conv_1")) == ["u1", "a2", "u2", "a3"]
    store.add_items("me", "conv_1", [message("v1")], after=None)  # an edited first message: a new root
    assert ids(store.items("conv_1")) == ["v1"]

    assert store.show_branch("me", "conv_1", "a2") == "a3"  # down to the branch's most recent end
    assert store.show_branch("me", "conv_1", "a1") == "a1"
    assert store.show_branch("someone else", "conv_1", "a1") is None
    assert store.show_branch("me", "conv_1", "nope") is None
    assert [p for _, p in store.tree("conv_1")["items"]] == [None, "u1", "u1", "a2", "u2", None]

    assert store.delete_branch("conv_1", "a1")  # the current branch goes: the newest sibling's branch is shown
    assert store.tree("conv_1")["current_item"] == "a3"
    assert store.delete_branch("conv_1", "a2")  # takes u2 and a3 with it; no sibling left: the parent
    assert ids(store.items("conv_1")) == ["u1"]
    assert ids(i for i, _ in store.tree("conv_1")["items"]) == ["u1", "v1"]
    assert not store.delete_branch("conv_1", "a3")
    with pytest.raises(Exception, match="was deleted"):
        store.add_items("me", "conv_1", [message("x", "assistant")], after="a2")


def test_deleting_one_item_keeps_what_follows_it(store):
    """OpenAI's DELETE of an item removes that item alone."""
    store.add_items("me", "conv_1", [message("u1"), message("a1", "assistant"), message("u2")])
    assert store.delete_item("conv_1", "a1")
    assert ids(store.items("conv_1")) == ["u1", "u2"]
    assert store.delete_item("conv_1", "u2")
    assert ids(store.items("conv_1")) == ["u1"]


def test_sibling_rankings_are_kept_per_labeller(store):
    store.add_items("me", "conv_1", [message("u1"), message("a1", "assistant")])
    store.add_items("me", "conv_1", [message("a2", "assistant")], after="u1")
    prompt = [{"role": "user", "content": "u1"}]
    new_id = iter(["sib_1", "sib_2"]).__next__
    task = store.rank_siblings("me", "conv_1", "u1", "ann", ["a2", "a1"], prompt, new_id)
    store.add_items("me", "conv_1", [message("a3", "assistant")], after="u1")
    assert store.rank_siblings("me", "conv_1", "u1", "bob", ["a1", "a3", "a2"], prompt, new_id) == task == "sib_1"
    assert store.rank_siblings("me", "conv_1", "u1", "ann", ["a3", "a2"], prompt, new_id) == task  # replaces ann's
    assert sorted((r["labeller"], r["ranking"]) for r in store.rankings("siblings")) == [
        ("ann", ["a3", "a2"]), ("bob", ["a1", "a3", "a2"])]
    stored = store.get_task(task)
    assert [c["id"] for c in stored["candidates"]] == ["a2", "a1", "a3"] and stored["prompt"] == prompt
    assert stored["candidates"][0]["text"] == "a2"
    with pytest.raises(KeyError):
        store.rank_siblings("me", "conv_1", "u1", "ann", ["a1", "u1"], prompt, new_id)


# -- through the server ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from palmchat.serve.keys import create_key

    root = tmp_path_factory.mktemp("trees")
    tokenizer = world_tokenizer()
    policy, _ = build_policy(root / "tiny-chat", tokenizer, tokenizer.save(root / "tokenizer.json"))
    store = Store(root / "trees.db")
    secret = create_key(store, "alice")[1]
    store.close()
    srv = Server(policy, root / "trees.db", "--max-tokens-limit", "8", log=root / "server.log").start()
    srv.secret, srv.headers = secret, {"authorization": f"Bearer {secret}"}
    yield srv
    srv.stop()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.secret, max_retries=0)


def tree(server, conversation: str) -> dict:
    response = httpx.get(f"{server.url}/v1/conversations/{conversation}/tree", headers=server.headers)
    assert response.status_code == 200, response.text
    return response.json()


def branch_texts(server, conversation: str) -> list[tuple[str, str]]:
    return [(i.role, i.content[0].text) for i in client(server).conversations.items.list(conversation, order="asc")]


def test_regenerate_edit_switch_rank_and_restart(server):
    c = client(server)
    conv = c.conversations.create().id
    first = c.responses.create(model=MODEL, input="What pet does Briruul have?", conversation=conv)
    user = tree(server, conv)["data"][0]
    # regenerate: another reply to the same user message, with no new input
    again = c.responses.create(model=MODEL, input=[], conversation=conv, extra_body={"branch_from": user["id"]})
    assert again.usage.input_tokens == first.usage.input_tokens
    assert again.usage.input_tokens_details.cached_tokens > 0  # the prompt is the first one's: its K/V is reused
    assert branch_texts(server, conv) == [("user", "What pet does Briruul have?"), ("assistant", again.output_text)]
    follow = c.responses.create(model=MODEL, input="And its name?", conversation=conv)
    assert follow.usage.input_tokens_details.cached_tokens >= again.usage.input_tokens
    assert [t for _, t in branch_texts(server, conv)] == ["What pet does Briruul have?", again.output_text,
                                                          "And its name?", follow.output_text]
    # edit the follow-up question: a new branch after the second reply
    after = tree(server, conv)["data"][2]["id"]  # the regenerated reply
    edited = c.responses.create(model=MODEL, input="And its age?", conversation=conv,
                                extra_body={"branch_from": after})
    assert [t for _, t in branch_texts(server, conv)][2:] == ["And its age?", edited.output_text]
    everything = tree(server, conv)
    assert [(i["role"], i["parent_id"]) for i in everything["data"]] == [
        ("user", None), ("assistant", user["id"]), ("assistant", user["id"]), ("user", after),
        ("assistant", everything["data"][3]["id"]), ("user", after), ("assistant", everything["data"][5]["id"])]
    assert everything["current_item"] == everything["data"][6]["id"]

    # switch back to the first follow-up, then to the first reply (whose branch ends there)
    shown = httpx.post(f"{server.url}/v1/conversations/{conv}/branch", headers=server.headers,
                       json={"item_id": everything["data"][3]["id"]}).json()
    assert shown["current_item"] == everything["data"][4]["id"]
    assert [t for _, t in branch_texts(server, conv)][2:] == ["And its name?", follow.output_text]
    httpx.post(f"{server.url}/v1/conversations/{conv}/branch", headers=server.headers,
               json={"item_id": everything["data"][1]["id"]})
    assert [t for _, t in branch_texts(server, conv)] == ["What pet does Briruul have?", first.output_text]

    # rank the two replies to the first message
    replies = [everything["data"][2]["id"], everything["data"][1]["id"]]
    ranked = httpx.post(f"{server.url}/v1/conversations/{conv}/items/{user['id']}/ranking", headers=server.headers,
                        json={"ranking": replies})
    assert ranked.status_code == 200 and ranked.json()["ranking"] == replies

    # the whole tree, and the branch shown, survive a restart
    server.stop()
    server.start()
    assert tree(server, conv) == {**everything, "current_item": everything["data"][1]["id"]}
    assert [t for _, t in branch_texts(server, conv)] == ["What pet does Briruul have?", first.output_text]

    # deleting the branch shown shows the newest remaining one
    deleted = httpx.delete(f"{server.url}/v1/conversations/{conv}/branches/{everything['data'][1]['id']}",
                           headers=server.headers).json()
    assert deleted["deleted"] and deleted["current_item"] == everything["data"][6]["id"]
    assert len(tree(server, conv)["data"]) == 6


def test_compared_candidates_stay_as_siblings(server):
    conv = client(server).conversations.create().id
    result = httpx.post(f"{server.url}/v1/conversations/{conv}/compare", headers=server.headers,
                        json={"model": MODEL, "input": "Hello", "n": 3}).json()
    ranking = [c["id"] for c in result["candidates"]][::-1]
    assert httpx.post(f"{server.url}/v1/comparisons/{result['id']}/ranking", headers=server.headers,
                      json={"ranking": ranking}).status_code == 200
    everything = tree(server, conv)
    user = everything["data"][0]["id"]
    assert sorted(i["id"] for i in everything["data"][1:]) == sorted(ranking)
    assert all(i["parent_id"] == user for i in everything["data"][1:])
    assert everything["current_item"] == ranking[0]  # the best one continues the conversation


def test_bad_branch_requests(server):
    c, url, headers = client(server), server.url, server.headers
    conv = c.conversations.create(items=[{"type": "message", "role": "user", "content": "Hi"}]).id
    with pytest.raises(openai.NotFoundError, match="msg_nope") as error:
        c.responses.create(model=MODEL, input="x", conversation=conv, extra_body={"branch_from": "msg_nope"})
    assert error.value.param == "branch_from"
    with pytest.raises(openai.BadRequestError, match="send `conversation` too"):
        c.responses.create(model=MODEL, input="x", extra_body={"branch_from": "msg_nope"})
    with pytest.raises(openai.BadRequestError, match="at least one message"):
        c.responses.create(model=MODEL, input=[], conversation=conv)
    user = tree(server, conv)["data"][0]["id"]
    reply = c.responses.create(model=MODEL, input=[], conversation=conv, extra_body={"branch_from": user})
    reply_id = reply.output[0].id
    with pytest.raises(openai.BadRequestError, match="at least one message"):  # a reply to a reply
        c.responses.create(model=MODEL, input=[], conversation=conv, extra_body={"branch_from": reply_id})
    bad = httpx.post(f"{url}/v1/conversations/{conv}/items/{user}/ranking", headers=headers,
                     json={"ranking": [reply_id, user]})
    assert bad.status_code == 400 and "is not a reply" in bad.json()["error"]["message"]
    missing = httpx.post(f"{url}/v1/conversations/{conv}/branch", headers=headers, json={"item_id": "msg_nope"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "item_id"
    other = openai.OpenAI(base_url=url + "/v1", api_key="pc-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        other.conversations.create()
