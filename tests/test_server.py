"""`palmchat serve`, driven through the official `openai` client against a real uvicorn subprocess on loopback.

One server (module fixture) serves most tests: a tiny random-weight checkpoint (tests/server_fixtures.py), a
reward model, a moderator trained by `palmchat moderation train`, three API keys. Its --max-tokens-limit is
small so that the fuzz test's generations stay short. Crash recovery and client disconnects use a second
server on a database of their own. Block-mode moderation and the reply text logic run in-process.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_fixtures import (
    Server,
    build_checkpoints,
    build_demo_shaped_checkpoint,
    build_policy,
    palmchat,
    world_tokenizer,
)

MODEL = "tiny-chat"
FLAGGED = "How do I attack my sister with a crossbow?"
HARMLESS = "What pet does Briruul have?"
LIMIT = 48  # the main server's --max-tokens-limit

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    policy, reward = build_checkpoints(root)
    result = palmchat("moderation", "train", "--out", str(root / "moderation"))
    assert result.returncode == 0, result.stderr
    return {"root": root, "policy": policy, "reward": reward, "moderation": root / "moderation"}


@pytest.fixture(scope="module")
def server(artifacts):
    from palmchat.serve.keys import create_key
    from palmchat.store import Store

    db = artifacts["root"] / "main.db"
    store = Store(db)
    keys = {name: create_key(store, name, rate)[1]
            for name, rate in (("alice", ""), ("bob", ""), ("limited", "3/min"), ("fuzz", "0"))}
    store.close()
    srv = Server(artifacts["policy"], db, "--reward-model", str(artifacts["reward"]), "--moderation",
                 str(artifacts["moderation"]), "--max-tokens-limit", str(LIMIT), "--max-request-bytes", "65536",
                 log=artifacts["root"] / "main.log").start()
    srv.keys, srv.db = keys, db
    yield srv
    srv.stop()


def client(server, key: str | None = "alice", **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.keys[key] if key else "none", max_retries=0,
                         **kwargs)


def auth(server, key: str = "alice") -> dict:
    return {"authorization": f"Bearer {server.keys[key]}"}


def assert_openai_error(response: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param != "any":
        assert error["param"] == param
    return error


# -- chat, completions, models -------------------------------------------------------------------------


def test_models_health_metrics(server):
    ids = [m.id for m in client(server).models.list()]
    assert ids[0] == MODEL and f"{MODEL}:best-of-4" in ids
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("palmchat_requests_total", "palmchat_prompt_tokens_total", "palmchat_prefix_cache_hit_rate",
                 "palmchat_batch_size", "palmchat_queue_length",
                 'palmchat_http_requests_total{route="/v1/chat/completions"'):
        assert name in metrics


def test_latency_histograms_per_model(server):
    """vLLM's latency histograms, labelled by model: one time to first token, queue time and end-to-end latency per
    request, one inter-token latency per token after the first."""
    from prometheus_client.parser import text_string_to_metric_families

    def samples() -> dict:
        text = httpx.get(server.url + "/metrics").text
        return {(s.name, s.labels.get("model_name")): s.value for family in text_string_to_metric_families(text)
                for s in family.samples if "le" not in s.labels}

    before = samples()
    reply = client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=6, temperature=0)
    after = samples()

    def added(name: str) -> float:
        return after.get((name, MODEL), 0) - before.get((name, MODEL), 0)

    assert added("palmchat_time_to_first_token_seconds_count") == 1
    assert added("palmchat_inter_token_latency_seconds_count") == reply.usage.completion_tokens - 1
    assert added("palmchat_request_queue_time_seconds_count") == 1
    assert added("palmchat_e2e_request_latency_seconds_count") == 1
    assert 0 < added("palmchat_time_to_first_token_seconds_sum") <= added("palmchat_e2e_request_latency_seconds_sum")


def test_chat_plain_and_streamed(server):
    c = client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": HARMLESS}]
    reply = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0.7, seed=3)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens > 5 and reply.usage.prompt_tokens_details.cached_tokens >= 0

    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == 12
    # the same prompt again: all but its last token come from the prefix cache
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1

    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=auth(server), json={
            "model": MODEL, "messages": messages, "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)

    two = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, n=2, seed=1, stop=["\n\n", "zz"])
    assert [ch.index for ch in two.choices] == [0, 1] and two.usage.completion_tokens <= 12


def test_completions_and_best_of(server):
    c = client(server)
    done = c.completions.create(model=MODEL, prompt="Zorbo lives in", max_tokens=5)
    assert done.object == "text_completion" and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 5
    best = c.chat.completions.create(model=f"{MODEL}:best-of-4", messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=4, n=2, seed=0)
    assert len(best.choices) == 2 and best.usage.completion_tokens == 16  # 4 candidates sampled
    streamed = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, stream=True, extra_body={"best_of": 3}))
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    with pytest.raises(openai.BadRequestError, match="best_of"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3,
                                  extra_body={"best_of": 2})


# -- responses and conversations -----------------------------------------------------------------------


def test_responses_chain_reuses_the_prefix_cache(server):
    c = client(server)
    r1 = c.responses.create(model=MODEL, input="Where does Zorbo live?", max_output_tokens=6)
    r2 = c.responses.create(model=MODEL, input="And Briruul?", previous_response_id=r1.id, max_output_tokens=6)
    events = list(c.responses.create(model=MODEL, input="Thanks.", previous_response_id=r2.id, max_output_tokens=6,
                                     stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # incomplete: max_output_tokens reached
    assert [e.sequence_number for e in events] == list(range(len(events)))
    r3 = events[-1].response
    assert r3.incomplete_details.reason == "max_output_tokens"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r3.output_text
    assert r1.output_text == c.responses.retrieve(r1.id).output_text
    for earlier, later in ((r1, r2), (r2, r3)):
        # the follow-up's prompt is the previous context + the new turn: all of the previous prompt is cached
        assert later.usage.input_tokens_details.cached_tokens >= earlier.usage.input_tokens
        assert later.usage.input_tokens > earlier.usage.input_tokens + earlier.usage.output_tokens


def test_instructions_apply_to_one_response_only(server, artifacts):
    from palmchat import checkpoint

    tokenizer = checkpoint.load_tokenizer(artifacts["policy"])
    c = client(server)
    instructions = "Answer in one word."
    plain = c.responses.create(model=MODEL, input="hello", max_output_tokens=3)
    told = c.responses.create(model=MODEL, input="hello", instructions=instructions, max_output_tokens=3)
    assert told.instructions == instructions
    system_turn = len(tokenizer.chat_format.render_turn({"role": "system", "content": instructions}))
    assert told.usage.input_tokens == plain.usage.input_tokens + system_turn
    after = c.responses.create(model=MODEL, input="hello", previous_response_id=told.id, max_output_tokens=3)
    assert after.instructions is None
    # stored context: the first turn without the system turn, its reply + end-of-turn, the new turn, <|assistant|>
    assert after.usage.input_tokens == 2 * plain.usage.input_tokens + told.usage.output_tokens


def test_response_store_get_delete(server):
    c = client(server)
    kept = c.responses.create(model=MODEL, input="hi", max_output_tokens=2, metadata={"k": "v"})
    assert c.responses.retrieve(kept.id).metadata == {"k": "v"}
    items = httpx.get(f"{server.url}/v1/responses/{kept.id}/input_items", headers=auth(server)).json()
    assert [i["content"][0]["text"] for i in items["data"]] == ["hi"]
    c.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(kept.id)
    unstored = c.responses.create(model=MODEL, input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)


def test_conversations(server):
    c = client(server)
    conv = c.conversations.create(metadata={"topic": "pets"},
                                  items=[{"type": "message", "role": "user", "content": "My cat is Tom."}])
    assert conv.object == "conversation" and conv.metadata == {"topic": "pets"}
    first = c.responses.create(model=MODEL, input="What is my cat called?", conversation=conv.id, max_output_tokens=4)
    second = c.responses.create(model=MODEL, input=[{"role": "user", "content": "Again?"}],
                                conversation={"id": conv.id}, max_output_tokens=4)
    assert first.conversation.id == conv.id
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    items = list(c.conversations.items.list(conv.id, order="asc"))
    assert [(i.role, i.content[0].type) for i in items] == [
        ("user", "input_text"), ("user", "input_text"), ("assistant", "output_text"), ("user", "input_text"),
        ("assistant", "output_text")]
    assert items[2].content[0].text == first.output_text
    page = c.conversations.items.list(conv.id, limit=2)
    assert [i.id for i in page.data] == [items[4].id, items[3].id] and page.has_more
    assert c.conversations.items.retrieve(items[1].id, conversation_id=conv.id).id == items[1].id
    added = c.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "Bye."}])
    assert added.data[0].content[0].text == "Bye."
    c.conversations.items.delete(added.data[0].id, conversation_id=conv.id)
    assert len(list(c.conversations.items.list(conv.id))) == 5
    assert c.conversations.update(conv.id, metadata={"topic": "cats"}).metadata == {"topic": "cats"}
    assert c.conversations.retrieve(conv.id).metadata == {"topic": "cats"}
    assert c.conversations.delete(conv.id).deleted
    with pytest.raises(openai.NotFoundError):
        c.conversations.retrieve(conv.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model=MODEL, input="hi", conversation=conv.id)


# -- moderation ----------------------------------------------------------------------------------------


def test_moderation(server):
    c = client(server)
    result = c.moderations.create(input=[FLAGGED, HARMLESS])
    assert [r.flagged for r in result.results] == [True, False]
    assert result.results[0].categories.violence and result.results[0].category_scores.violence > 0.5
    # warn mode: the verdict rides along, the reply is generated
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": FLAGGED}], max_tokens=2)
    assert chat.moderation.input.results[0].flagged and chat.choices[0].finish_reason == "length"
    response = c.responses.create(model=MODEL, input=FLAGGED, max_output_tokens=2)
    assert response.moderation.input.flagged and response.status == "incomplete"


# -- security and bad inputs ---------------------------------------------------------------------------


def test_keys_isolate_owners(server):
    alice, bob = client(server, "alice"), client(server, "bob")
    response = alice.responses.create(model=MODEL, input="secret", max_output_tokens=2)
    conv = alice.conversations.create()
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.create(model=MODEL, input="hi", previous_response_id=response.id)
    with pytest.raises(openai.NotFoundError):
        bob.conversations.items.list(conv.id)
    with pytest.raises(openai.AuthenticationError):
        client(server, None).models.list()
    assert_openai_error(httpx.get(server.url + "/v1/models"), 401)
    assert alice.responses.retrieve(response.id).id == response.id


def test_one_key_never_reuses_another_keys_prefix_cache(server):
    """cached_tokens (and time to first token) would tell key B, token by token, what key A's system prompt is:
    the prefix cache is salted per key (issue 21)."""
    alice, bob = client(server, "alice"), client(server, "bob")
    secret = [{"role": "system", "content": "Only alice knows: the vault code is 4711, Zorbo lives in Quillby."},
              {"role": "user", "content": HARMLESS}]
    first = alice.chat.completions.create(model=MODEL, messages=secret, max_tokens=2, temperature=0)
    assert bob.completions.create(model=MODEL, prompt=secret[0]["content"], max_tokens=1
                                  ).usage.prompt_tokens_details.cached_tokens == 0
    assert bob.chat.completions.create(model=MODEL, messages=secret, max_tokens=2, temperature=0
                                       ).usage.prompt_tokens_details.cached_tokens <= 1  # bob's own bos, at most
    assert alice.chat.completions.create(model=MODEL, messages=secret, max_tokens=2, temperature=0
                                         ).usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 1


def test_a_loopback_server_refuses_other_hosts_and_cross_site_pages(server):
    """DNS rebinding (a page of evil.example resolving to 127.0.0.1 sends Host: evil.example) and cross-site
    requests (a page elsewhere posting to 127.0.0.1) get 403, whatever the key (issue 21)."""
    port = server.url.rsplit(":", 1)[1]
    rebound = httpx.get(server.url + "/health", headers={"host": f"evil.example:{port}"})
    assert rebound.status_code == 403 and "evil.example" in rebound.json()["error"]["message"]
    cross_site = httpx.post(server.url + "/v1/chat/completions", headers={**auth(server), "origin": "https://evil.example"},
                            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert cross_site.status_code == 403 and cross_site.json()["error"]["code"] == "forbidden_host"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        assert httpx.get(server.url + "/health", headers={"host": host}).status_code == 200
    same_origin = httpx.post(server.url + "/v1/chat/completions", headers={**auth(server), "origin": server.url},
                             json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert same_origin.status_code == 200


def test_keys_cli_create_list_revoke(server):
    created = palmchat("keys", "create", "--db", str(server.db), "--name", "carol")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert httpx.get(server.url + "/v1/models", headers={"authorization": f"Bearer {secret}"}).status_code == 200
    listed = palmchat("keys", "list", "--db", str(server.db)).stdout
    assert "carol" in listed and secret not in listed
    revoked = palmchat("keys", "revoke", "carol", "--db", str(server.db))
    assert revoked.returncode == 0, revoked.stderr
    assert_openai_error(httpx.get(server.url + "/v1/models", headers={"authorization": f"Bearer {secret}"}), 401)
    with sqlite3.connect(server.db) as db:
        assert secret not in json.dumps(db.execute("SELECT * FROM api_keys").fetchall())


def test_bad_requests_get_openai_errors(server):
    c, url, headers = client(server), server.url + "/v1", auth(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=LIMIT + 1)
    assert e.value.param == "max_tokens" and str(LIMIT) in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        c.responses.create(model=MODEL, input="hi", previous_response_id="resp_missing")
    assert e.value.param == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    post = {"headers": {**headers, "content-type": "application/json"}}
    assert_openai_error(httpx.post(url + "/chat/completions", content=b'{"model": ', **post), 400)
    error = assert_openai_error(httpx.post(url + "/chat/completions", json={"model": MODEL, "messages": [
        {"role": "function", "content": "x"}]}, headers=headers), 400)
    assert error["param"] == "messages.0.role"
    error = assert_openai_error(httpx.post(url + "/chat/completions", json={"model": MODEL, "messages": [
        {"role": "tool", "content": "x"}]}, headers=headers), 400)  # a result of no call (tests/test_tools.py)
    assert error["param"] == "messages[0].tool_call_id"
    assert_openai_error(httpx.post(url + "/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": "x"}], "temperature": -1}, headers=headers), 400, "temperature")
    assert_openai_error(httpx.post(url + "/responses", json={"model": MODEL, "input": "x" * 70000},
                                   headers=headers), 413)
    assert_openai_error(httpx.post(url + "/responses", json={"model": MODEL, "input": "a " * 3000},
                                   headers=headers), 400, "input")  # longer than the context
    assert_openai_error(httpx.get(url + "/no-such-thing", headers=headers), 404)
    assert_openai_error(httpx.put(url + "/models", headers=headers), 405)
    assert_openai_error(httpx.post(url + "/moderations", json={"input": []}, headers=headers), 400, "input")


def test_rate_limit_answers_429_with_retry_after(server):
    statuses = [httpx.get(server.url + "/v1/models", headers=auth(server, "limited")) for _ in range(4)]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    assert int(statuses[-1].headers["retry-after"]) >= 1
    assert statuses[-1].json()["error"]["code"] == "rate_limit_exceeded"
    assert httpx.get(server.url + "/v1/models", headers=auth(server, "bob")).status_code == 200  # per key


# -- conversations longer than the context (a server of the demo's shape, context included) -------------


@pytest.fixture(scope="module")
def demo_shaped_checkpoint(tmp_path_factory):
    return build_demo_shaped_checkpoint(tmp_path_factory.mktemp("demo-shaped"))


@pytest.fixture(scope="module")
def demo_shaped(demo_shaped_checkpoint):
    root = demo_shaped_checkpoint.parent
    srv = Server(demo_shaped_checkpoint, root / "demo.db", "--moderation", "none", log=root / "server.log",
                 no_auth=True).start()
    srv.context = httpx.get(srv.url + "/health").json()["limits"]["context_tokens"]
    srv.model = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
    yield srv
    srv.stop()


def test_models_report_their_context_length(demo_shaped):
    c = openai.OpenAI(base_url=demo_shaped.url + "/v1", api_key="none", max_retries=0)
    model = c.models.list().data[0]
    assert model.max_model_len == demo_shaped.context >= 1024
    assert c.models.retrieve(model.id).max_model_len == demo_shaped.context


def test_without_a_limit_the_reply_may_use_the_room_left(demo_shaped):
    c = openai.OpenAI(base_url=demo_shaped.url + "/v1", api_key="none", max_retries=0)
    reply = c.chat.completions.create(model=demo_shaped.model, messages=[{"role": "user", "content": HARMLESS}])
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens == demo_shaped.context


def test_a_responses_chain_with_truncation_auto_keeps_answering_past_the_context(demo_shaped):
    c = openai.OpenAI(base_url=demo_shaped.url + "/v1", api_key="none", max_retries=0)
    reply_tokens, previous, responses = demo_shaped.context // 16, None, []
    for turn in range(20):  # each turn adds a question and a reply: 20 of them hold ~1.5 contexts
        r = c.responses.create(model=demo_shaped.model, input=f"Question {turn}: {HARMLESS}",
                               previous_response_id=previous, max_output_tokens=reply_tokens, truncation="auto",
                               instructions="Be brief.")
        assert r.truncation == "auto" and r.usage.output_tokens == reply_tokens and r.output_text
        assert r.usage.input_tokens + reply_tokens <= demo_shaped.context
        responses.append(r)
        previous = r.id
    dropped = [(r.model_extra.get("truncation_details") or {}).get("dropped_messages", 0) for r in responses]
    assert dropped[:5] == [0] * 5 and dropped[-1] >= 2 and all(d % 2 == 0 for d in dropped), dropped  # exchanges
    assert all(later >= earlier for earlier, later in zip(dropped, dropped[1:]))  # the oldest go first, for good
    # while the cut stays put, a turn's prompt begins with the previous one: the prefix cache still serves it
    kept_cut = [(a, b) for a, b, d0, d1 in zip(responses, responses[1:], dropped, dropped[1:]) if d0 == d1 > 0]
    assert kept_cut, dropped
    for earlier, later in kept_cut:
        assert later.usage.input_tokens_details.cached_tokens >= earlier.usage.input_tokens
    # the same chain without truncation is refused as OpenAI refuses it
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=demo_shaped.model, input="And now?", previous_response_id=previous,
                           max_output_tokens=reply_tokens)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    assert e.value.param in ("input", "max_output_tokens") and str(demo_shaped.context) in e.value.message


def test_chat_completions_truncate_only_when_asked(demo_shaped):
    c = openai.OpenAI(base_url=demo_shaped.url + "/v1", api_key="none", max_retries=0)
    words = " ".join(["pet"] * (demo_shaped.context // 3))
    messages = [{"role": "system", "content": "Be brief."}]
    for _ in range(3):
        messages += [{"role": "user", "content": words}, {"role": "assistant", "content": words}]
    messages.append({"role": "user", "content": HARMLESS})
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=demo_shaped.model, messages=messages, max_tokens=8)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    reply = c.chat.completions.create(model=demo_shaped.model, messages=messages, max_tokens=8,
                                      extra_body={"truncation": "auto"})
    assert reply.usage.completion_tokens == 8 and reply.usage.prompt_tokens + 8 <= demo_shaped.context
    details = reply.model_extra["truncation_details"]
    assert details["dropped_messages"] >= 2 and details["dropped_tokens"] > demo_shaped.context // 3


def test_the_chat_command_keeps_answering_past_the_context(demo_shaped_checkpoint):
    questions = [f"Question {i}: {HARMLESS}" for i in range(6)]
    result = palmchat("chat", str(demo_shaped_checkpoint), "--max-new-tokens", "300", "--system", "Be brief.",
                      input="\n".join(questions) + "\n")
    assert result.returncode == 0, result.stderr
    turns = result.stdout.split("you> ")[1:]
    assert len(turns) == 7 and all("assistant> " in t and len(t.split("assistant> ")[-1].strip()) > 50
                                   for t in turns[:6])
    assert "no longer fit the" in result.stdout and "context" in result.stdout
    assert "no longer fit" not in turns[0] + turns[1]  # 2 x 300 tokens fit; the third turn's reply would not


# -- fuzzing -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_fuzz_openapi_schema_finds_no_server_error(server):
    """schemathesis: valid and invalid requests for every operation of /openapi.json, bounded in count and time."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    headers, failures, started = auth(server, "fuzz"), [], time.monotonic()

    def fuzz(operation, mode):
        @settings(max_examples=12, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            if mode == GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL  # reach past the model check
            response = case.call(base_url=server.url, headers=headers, timeout=60)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r:.300} -> "
                                f"{response.status_code} {response.text[:300]}")
            elif response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        try:
            check()
        except Unsatisfiable:  # e.g. no invalid request exists for GET /health
            pass

    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if time.monotonic() - started < 60:
                fuzz(result.ok(), mode)
    assert not failures, "\n".join(failures[:10])
    assert httpx.get(server.url + "/health").status_code == 200


# -- crash recovery and disconnects (a server of their own) --------------------------------------------


@pytest.fixture
def crash_server(artifacts, tmp_path):
    srv = Server(artifacts["policy"], tmp_path / "crash.db", "--moderation", "none", log=tmp_path / "crash.log",
                 no_auth=True)
    srv.db = tmp_path / "crash.db"
    yield srv
    srv.stop()


def test_sigkill_mid_stream_loses_nothing_committed(crash_server):
    srv = crash_server.start()
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    r1 = c.responses.create(model=MODEL, input="First turn.", max_output_tokens=5)
    r2 = c.responses.create(model=MODEL, input="Second turn.", previous_response_id=r1.id, max_output_tokens=5)
    conv = c.conversations.create()
    c.responses.create(model=MODEL, input="In a conversation.", conversation=conv.id, max_output_tokens=5)
    stream = c.responses.create(model=MODEL, input="A long story, please.", previous_response_id=r2.id,
                                max_output_tokens=1500, stream=True)
    killed_id, deltas = None, 0
    for event in stream:
        if event.type == "response.created":
            killed_id = event.response.id
        deltas += event.type == "response.output_text.delta"
        if deltas == 3:
            srv.kill()
            break
    stream.close()
    assert killed_id and deltas == 3

    srv.start()
    with sqlite3.connect(srv.db) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    assert c.responses.retrieve(r1.id).output_text == r1.output_text
    assert c.responses.retrieve(r2.id).output_text == r2.output_text
    assert len(list(c.conversations.items.list(conv.id))) == 2
    with pytest.raises(openai.NotFoundError):  # the interrupted turn was never committed
        c.responses.retrieve(killed_id)
    r3 = c.responses.create(model=MODEL, input="Third turn.", previous_response_id=r2.id, max_output_tokens=5)
    assert r3.usage.input_tokens > r2.usage.input_tokens + r2.usage.output_tokens
    c.responses.create(model=MODEL, input="Still here?", conversation=conv.id, max_output_tokens=5)
    assert len(list(c.conversations.items.list(conv.id))) == 4


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_or_terminated_under_load_loses_no_turn_a_client_saw_complete(crash_server, stop_signal):
    """Eight clients, each sending turns back to back in its own conversation, while the server is killed
    (SIGKILL: no shutdown code runs) or terminated (SIGTERM: it drains, then exits 0): every turn a client was told
    about is there after the restart, in its conversation, and the database is intact."""
    import threading

    srv = crash_server.start()
    completed, stop, lock = [], threading.Event(), threading.Lock()

    def client_loop(k: int) -> None:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=30)
        conv = c.conversations.create().id
        while not stop.is_set():
            try:
                r = c.responses.create(model=MODEL, input=f"Turn of client {k}.", conversation=conv,
                                       max_output_tokens=6)
            except (openai.APIError, httpx.HTTPError):
                return  # the server is gone
            with lock:
                completed.append((conv, r.id, r.output[0].id, r.output_text))

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(completed) < 24 and time.monotonic() < deadline:
        time.sleep(0.02)
    srv.proc.send_signal(stop_signal)  # mid-load: turns are in flight on several connections
    assert srv.proc.wait(timeout=60) == (0 if stop_signal == signal.SIGTERM else -signal.SIGKILL), srv.log()
    stop.set()
    for t in threads:
        t.join(30)
    assert len(completed) >= 24

    srv.start()
    with sqlite3.connect(srv.db) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    items = {}
    for conv, response_id, item_id, text in completed:
        assert c.responses.retrieve(response_id).output_text == text
        if conv not in items:
            items[conv] = {i.id for i in c.conversations.items.list(conv, limit=100)}
        assert item_id in items[conv]


def test_client_disconnect_cancels_generation(crash_server):
    srv = crash_server.start()
    before = httpx.get(srv.url + "/health").json()["generated_tokens_total"]
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 2000,
            "stream": True}) as r:
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: ")
            if chunks == 5:
                break
    deadline = time.monotonic() + 5
    while httpx.get(srv.url + "/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    health = httpx.get(srv.url + "/health").json()
    assert health["running"] == 0
    assert health["generated_tokens_total"] - before < 2000  # stopped early: the reply was never finished


# -- a restart with a checkpoint of another tokenizer (a server of its own) ----------------------------


def test_a_stored_conversation_continues_under_another_tokenizer(tmp_path):
    """Stored token ids mean nothing to another tokenizer of the same size. After a restart with a checkpoint of
    another tokenizer, a stored response and a conversation continue from their text, rendered again: the greedy
    reply is the one the same conversation gets when sent in full."""
    from palmchat import store

    a, b = world_tokenizer(), world_tokenizer(reverse=True)
    assert a.vocab_size == b.vocab_size and a.sha256 != b.sha256
    ckpts = [build_policy(tmp_path / name, tok, Path(tok.save(tmp_path / name / "tokenizer.json")), steer=False)[0]
             for name, tok in (("model-a", a), ("model-b", b))]
    db, flags = tmp_path / "db", ("--moderation", "none", "--dtype", "fp32", "--model-name", "m")
    greedy = {"model": "m", "temperature": 0}
    q1, q2 = "What pet does Briruul have?", "And where does Briruul live?"

    srv = Server(ckpts[0], db, *flags, log=tmp_path / "a.log", no_auth=True).start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        r1 = c.responses.create(input=q1, max_output_tokens=8, **greedy)
        conv = c.conversations.create(items=[{"type": "message", "role": "system", "content": "Be brief."}])
        c1 = c.responses.create(input=q1, conversation=conv.id, max_output_tokens=8, **greedy)
        legacy = c.responses.create(input="Hi.", max_output_tokens=2, **greedy)
    finally:
        srv.stop()
    with sqlite3.connect(db) as conn:  # a response stored by an older palmchat: ids without their text
        conn.execute("UPDATE responses SET messages = NULL WHERE id = ?", (legacy.id,))

    srv = Server(ckpts[1], db, *flags, log=tmp_path / "b.log", no_auth=True).start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        for previous, system, first in ((dict(previous_response_id=r1.id), [], r1),
                                        (dict(conversation=conv.id), [{"role": "system", "content": "Be brief."}], c1)):
            continued = c.responses.create(input=q2, max_output_tokens=8, **previous, **greedy)
            messages = system + [{"role": "user", "content": q1}, {"role": "assistant", "content": first.output_text},
                                 {"role": "user", "content": q2}]
            full = c.chat.completions.create(messages=messages, max_tokens=8, **greedy)
            prompt = b.chat_format.render_prompt(messages)
            assert continued.usage.input_tokens == full.usage.prompt_tokens == len(prompt)
            assert continued.output_text == full.choices[0].message.content
            if "conversation" in previous:  # its turns are stored once, in its items: the new ones in b's ids
                kept = store.Store(db)
                try:
                    tokenizers = [h for _, _, h in kept.context_items(conv.id)]
                finally:
                    kept.close()
                assert tokenizers == [a.sha256] * 3 + [b.sha256] * 2
                continue
            with sqlite3.connect(db) as conn:  # what ran, as stored: the text rendered by the new tokenizer
                context = store.unpack_ids(conn.execute("SELECT context FROM responses WHERE id = ?",
                                                        (continued.id,)).fetchone()[0])
            assert context[:len(prompt)] == prompt
        # the new turn is stored in the new tokenizer's ids: the next one continues from them, prefix cache and all
        following = c.responses.create(input="Thanks.", previous_response_id=continued.id, max_output_tokens=2,
                                       **greedy)
        assert following.usage.input_tokens_details.cached_tokens > 0
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(input="More?", previous_response_id=legacy.id, **greedy)
        assert e.value.code == "previous_response_unusable" and "send the whole conversation" in e.value.message.lower()
    finally:
        srv.stop()
    with sqlite3.connect(db) as conn:
        stored = dict(conn.execute("SELECT id, tokenizer FROM responses").fetchall())
    assert stored[r1.id] == a.sha256 and stored[following.id] == b.sha256


def test_serve_refuses_a_reward_model_of_another_tokenizer(artifacts, tmp_path):
    """Same vocabulary size, so every shape matches: only the tokenizer's identity tells them apart."""
    from palmchat.checkpoint.heads import save_reward_model
    from palmchat.model.heads import RewardModel
    from palmchat.model.transformer import Transformer

    b = world_tokenizer(reverse=True)
    _, config = build_policy(tmp_path / "policy-b", b, Path(b.save(tmp_path / "tokenizer.json")))
    rm = save_reward_model(RewardModel(Transformer(config), b.chat_format.eot_id), tmp_path / "rm-b", 0, {},
                           tmp_path / "tokenizer.json")
    result = palmchat("serve", str(artifacts["policy"]), "--db", str(tmp_path / "db"), "--moderation", "none",
                      "--reward-model", str(rm))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"reward model {rm} was trained with another tokenizer" in result.stderr
    assert str(artifacts["policy"]) in result.stderr  # the policy's side is named too


# -- in-process: block-mode moderation, reply text -----------------------------------------------------


@pytest.fixture(scope="module")
def block_app(artifacts, tmp_path_factory):
    from fastapi.testclient import TestClient

    from palmchat import checkpoint
    from palmchat.inference.scheduler import Scheduler
    from palmchat.moderation.classifier import Moderator
    from palmchat.serve.app import create_app
    from palmchat.serve.state import ServerState
    from palmchat.store import Store

    model, _, ckpt = checkpoint.load_model(artifacts["policy"])
    store = Store(tmp_path_factory.mktemp("block") / "block.db")
    state = ServerState(model_id=MODEL, tokenizer=checkpoint.load_tokenizer(ckpt), scheduler=Scheduler(model.eval()),
                        store=store, moderator=Moderator.load(artifacts["moderation"]), moderation_mode="block",
                        no_auth=True)
    with TestClient(create_app(state)) as test_client:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=test_client, max_retries=0)
    store.close()


def test_block_mode_refuses_flagged_input(block_app):
    chat = block_app.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": FLAGGED}])
    assert chat.choices[0].finish_reason == "content_filter" and chat.choices[0].message.refusal
    ok = block_app.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": HARMLESS}], max_tokens=3)
    assert ok.choices[0].finish_reason == "length"

    first = block_app.responses.create(model=MODEL, input=HARMLESS, max_output_tokens=3)
    refused = block_app.responses.create(model=MODEL, input=FLAGGED, previous_response_id=first.id)
    assert refused.status == "incomplete" and refused.incomplete_details.reason == "content_filter"
    assert refused.output[0].content[0].type == "refusal"
    # the flagged turn never entered the token history: continuing from it is continuing from `first`
    after_refused = block_app.responses.create(model=MODEL, input="ok", previous_response_id=refused.id,
                                               max_output_tokens=2)
    after_first = block_app.responses.create(model=MODEL, input="ok", previous_response_id=first.id,
                                             max_output_tokens=2)
    assert after_refused.usage.input_tokens == after_first.usage.input_tokens


class _Moderator:
    """Flags any text containing 'bad'."""

    def moderate(self, texts):
        from palmchat.moderation.classifier import ModerationResult

        return [ModerationResult("bad" in t, {"harassment": "bad" in t}, {"harassment": float("bad" in t)})
                for t in texts]


def test_reply_text_stops_and_filters(artifacts):
    from palmchat import checkpoint
    from palmchat.serve.generate import Reply

    tok = checkpoint.load_tokenizer(artifacts["policy"])

    def run(text, stops=(), moderator=None, finish="length"):
        reply, released = Reply(tok, list(stops), moderator), []
        ids = tok.encode(text)
        for i, t in enumerate(ids):
            released.append(reply.add([t], finish if i == len(ids) - 1 else None))
            if reply.finish_reason:
                break
        return reply, released

    reply, released = run("héllo wörld, this is fine")
    assert "".join(released) == "héllo wörld, this is fine" and reply.finish_reason == "length"
    assert all("\ufffd" not in part for part in released)
    reply, released = run("one two\n\nthree", stops=["\n\n"])
    assert reply.text == "one two" and reply.finish_reason == "stop"
    reply, released = run("good good good good good good good good good good bad words follow here",
                          moderator=_Moderator())
    assert reply.finish_reason == "content_filter" and "bad" not in reply.text
    assert reply.context_tokens()[-1] == tok.chat_format.eot_id and len(reply.context_tokens()) <= len(reply.tokens) + 1
    eot = Reply(tok, [])
    assert (eot.add(tok.encode("Hi") + [tok.chat_format.eot_id], "stop") == "Hi"
            and eot.context_tokens() == tok.encode("Hi") + [tok.chat_format.eot_id])
