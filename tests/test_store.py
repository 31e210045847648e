"""The server's database (palmchat/store.py): each turn's token ids stored once, delete means delete, listings a page
at a time in SQL, and reads that never wait for a writer."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from palmchat.store import Store


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "store.db")
    yield store
    store.close()


def response(response_id: str, previous: str | None = None) -> dict:
    return {"id": response_id, "created_at": 0.0, "previous_response_id": previous, "output": []}


def message(item_id: str, role: str = "user") -> dict:
    return {"id": item_id, "type": "message", "role": role, "content": [{"type": "input_text", "text": item_id}]}


def chain(store: Store, turns: int) -> tuple[list[int], list[dict]]:
    """`turns` responses, each continuing the one before (previous_response_id): their whole contexts grow."""
    context, messages, previous = [1], [], None
    for turn in range(turns):
        context = context + [10 + turn] * 5
        messages = messages + [{"role": "user", "content": f"q{turn}"}, {"role": "assistant", "content": f"a{turn}"}]
        store.commit_turn("me", response(f"resp_{turn}", previous), [], context, None, [], "tok", messages)
        previous = f"resp_{turn}"
    return context, messages


def test_a_chain_of_responses_stores_each_turns_ids_once(store, tmp_path):
    context, messages = chain(store, 20)
    stored = sqlite3.connect(tmp_path / "store.db").execute("SELECT sum(length(context)) FROM responses").fetchone()
    assert stored[0] == 4 * (1 + 20 * 5)  # uint32 each: every id once, not once per later turn
    last = store.get_response("me", "resp_19")
    assert last["context"] == context and last["messages"] == messages
    middle = store.get_response("me", "resp_9")
    assert middle["context"] == context[:1 + 10 * 5] and middle["messages"] == messages[:20]
    assert store.get_response("someone else", "resp_19") is None

    # deleting a response that others continue keeps theirs whole
    assert store.delete_response("me", "resp_9") and not store.delete_response("me", "resp_9")
    assert store.get_response("me", "resp_9") is None
    assert store.get_response("me", "resp_19")["context"] == context
    assert store.get_response("me", "resp_10")["messages"] == messages[:22]
    assert store.integrity_check() == "ok"


def test_a_response_that_does_not_extend_the_one_before_is_stored_whole(store):
    store.commit_turn("me", response("resp_a"), [], [1, 2, 3], None, [], "tok", [{"role": "user", "content": "x"}])
    store.commit_turn("me", response("resp_b", "resp_a"), [], [1, 9, 9, 4], None, [], "tok",
                      [{"role": "user", "content": "y"}])  # re-rendered (a template that is not prefix-stable)
    store.commit_turn("me", response("resp_c", "resp_a"), [], [1, 2, 3, 5], None, [], "other",
                      [{"role": "user", "content": "x"}, {"role": "assistant", "content": "z"}])  # another tokenizer
    assert store.get_response("me", "resp_b")["context"] == [1, 9, 9, 4]
    assert store.get_response("me", "resp_c")["context"] == [1, 2, 3, 5]
    store.delete_response("me", "resp_a")
    assert store.get_response("me", "resp_c")["messages"][1]["content"] == "z"


def test_a_conversations_responses_keep_their_context_in_it_and_go_with_it(store):
    store.create_conversation("me", {"id": "conv_1", "created_at": 0, "metadata": {}}, [])
    store.commit_turn("me", response("resp_1"), [], [1, 5, 6, 7], "conv_1",
                      [(message("u1"), [5]), (message("a1", "assistant"), [6, 7])], "tok", [])
    store.commit_turn("me", response("resp_2"), [], [1, 5, 6, 7, 8, 9], "conv_1",
                      [(message("u2"), [8]), (message("a2", "assistant"), [9])], "tok", [])
    first = store.get_response("me", "resp_1")
    assert first["context"] is None and [(i["id"], ids) for i, ids, _ in first["context_items"]] == [
        ("u1", [5]), ("a1", [6, 7])]
    assert [i["id"] for i, _, _ in store.get_response("me", "resp_2")["context_items"]] == ["u1", "a1", "u2", "a2"]
    store.delete_item("conv_1", "a2")
    assert store.get_response("me", "resp_2")["context_items"] is None  # its reply is gone: nothing to continue
    assert store.delete_conversation("me", "conv_1")
    assert store.get_response("me", "resp_1") is None and store.get_response("me", "resp_2") is None


def test_conversations_are_listed_a_page_at_a_time(store):
    for n in range(5):
        store.create_conversation("me", {"id": f"conv_{n}", "created_at": 100, "metadata": {}}, [])
    store.create_conversation("other", {"id": "conv_x", "created_at": 100, "metadata": {}}, [])
    page, more = store.list_conversations("me", limit=2, order="desc")
    assert [c["id"] for c in page] == ["conv_4", "conv_3"] and more
    page, more = store.list_conversations("me", limit=2, order="desc", after="conv_3")
    assert [c["id"] for c in page] == ["conv_2", "conv_1"] and more
    page, more = store.list_conversations("me", limit=2, order="asc", after="conv_3")
    assert [c["id"] for c in page] == ["conv_4"] and not more
    with pytest.raises(KeyError):
        store.list_conversations("me", limit=2, after="conv_x")  # another owner's
    assert [c["id"] for c in store.list_conversations("me")] == [f"conv_{n}" for n in range(5)]


def test_a_branch_is_listed_a_page_at_a_time(store):
    """Only the current branch's items, from the one after `after`, in either order; bodies read for the page only."""
    store.create_conversation("me", {"id": "conv_1", "created_at": 0, "metadata": {}},
                              [(message(f"m{n}"), [n]) for n in range(4)])
    store.add_items("me", "conv_1", [(message("other"), [9])], after="m1")  # a sibling of m2: now the current branch
    store.show_branch("me", "conv_1", "m3")
    page, more = store.branch_page("conv_1", 2, newest_first=True)
    assert [i["id"] for i in page] == ["m3", "m2"] and more
    page, more = store.branch_page("conv_1", 2, newest_first=True, after="m2")
    assert [i["id"] for i in page] == ["m1", "m0"] and not more
    page, more = store.branch_page("conv_1", 3, newest_first=False, after="m0")
    assert [i["id"] for i in page] == ["m1", "m2", "m3"] and not more
    with pytest.raises(KeyError):
        store.branch_page("conv_1", 2, newest_first=True, after="other")  # not on the branch shown


def test_reads_do_not_wait_for_a_writer(store):
    store.create_conversation("me", {"id": "conv_1", "created_at": 0, "metadata": {"title": "t"}}, [])
    writing, release, read = threading.Event(), threading.Event(), []

    def writer():
        with store.transaction() as db:
            db.execute("UPDATE conversations SET metadata = '{}' WHERE id = 'conv_1'")
            writing.set()
            release.wait(30)

    def reader():
        read.append(store.get_conversation("me", "conv_1"))

    threads = [threading.Thread(target=writer)]
    threads[0].start()
    assert writing.wait(30)
    threads.append(threading.Thread(target=reader))
    threads[1].start()
    threads[1].join(20)
    finished = not threads[1].is_alive()
    release.set()
    for thread in threads:
        thread.join(30)
    assert finished, "a read waited for the writer"
    assert read == [{"id": "conv_1", "object": "conversation", "created_at": 0, "metadata": {"title": "t"}}]
    assert store.get_conversation("me", "conv_1")["metadata"] == {}  # and sees the write once it is committed
