"""Sampling controls, log-probs, several prompts, best_of and structured outputs through `palmchat serve`, driven
by the official `openai` client against a real server on loopback (tests/server_fixtures.py).

The tiny random-weight model writes word salad and never samples end-of-turn by itself: it only writes valid JSON
and stops when the grammar forces it, which is what the structured-output tests check. The server decodes in fp32,
so its log-probs can be compared with a forward pass of the checkpoint's model.
"""

from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pytest
import torch
from pydantic import BaseModel, Field
from server_fixtures import Server, build_policy, world_tokenizer

from palmchat import checkpoint
from palmchat.model.logprobs import response_logprobs
from palmchat.serve.structured import token_bytes

MODEL = "tiny-chat"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    tokenizer = world_tokenizer()
    policy, _ = build_policy(root / f"{MODEL}", tokenizer, tokenizer.save(root / "tokenizer.json"))
    srv = Server(policy, root / "db.sqlite", "--moderation", "none", "--dtype", "fp32", log=root / "server.log",
                 no_auth=True).start()
    srv.policy, srv.tokenizer = policy, tokenizer
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def model(server):
    return checkpoint.load_model(server.policy)[0].eval()


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=120)


def ids_of(tokenizer, entries) -> list[int]:
    """Token ids back from the `bytes` of chat log-prob entries (each token of this vocabulary has its own bytes)."""
    by_bytes = {b: i for i, b in enumerate(token_bytes(tokenizer.hf_tokenizer)) if b}
    return [by_bytes[bytes(e.bytes)] for e in entries]


def sequence_logprob(model, prompt: list[int], reply: list[int]) -> float:
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        return float(response_logprobs(model, ids, torch.tensor([len(prompt)]), torch.tensor([ids.shape[1]]),
                                       reduce="sum")[0])


MESSAGES = [{"role": "user", "content": "Where does Zorbo live?"}]


# -- fields that would change the reply are never silently ignored ----------------------------------------------


@pytest.mark.parametrize("path, field, value", [
    ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "wav"}),
    ("/v1/chat/completions", "prediction", {"type": "content", "content": "x"}),
    ("/v1/chat/completions", "reasoning_effort", "high"),
    ("/v1/chat/completions", "modalities", ["text", "audio"]),
    ("/v1/chat/completions", "guided_json", {"type": "object"}),
    ("/v1/completions", "echo", True),
    ("/v1/completions", "suffix", "the end"),
    ("/v1/completions", "use_beam_search", True),
    ("/v1/completions", "skip_special_tokens", False),
    ("/v1/responses", "reasoning", {"effort": "low"}),
    ("/v1/responses", "background", True),
    ("/v1/responses", "include", ["reasoning.encrypted_content"]),
])
def test_unimplemented_fields_are_refused_by_name(server, path, field, value):
    body = {"messages": MESSAGES} if "chat" in path else {"input": "hi"} if "responses" in path else {"prompt": "hi"}
    r = post(server, path, {**body, "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_parameter" and field in error["message"]
    # null, false, empty and what palmchat does anyway (modalities ["text"], skip_special_tokens) are accepted
    ok = post(server, path, {**body, field: [] if field == "include" else None, "modalities": ["text"],
                             "skip_special_tokens": True})
    assert ok.status_code == 200, ok.text


def test_out_of_range_controls_are_400_naming_the_field(server):
    c = client(server)
    for field, value in [("presence_penalty", 3), ("frequency_penalty", -2.5), ("top_logprobs", 21),
                         ("logit_bias", {"5": 101}), ("logit_bias", {"99999": 1}), ("logit_bias", {"x": 1}),
                         ("logit_bias", {str(i): 1 for i in range(301)}), ("min_p", 2), ("repetition_penalty", 0)]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, logprobs=True,
                                      extra_body={field: value})
        assert e.value.body["param"] == field, (field, e.value.body)
    with pytest.raises(openai.BadRequestError, match="logprobs must be true") as e:
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, top_logprobs=2)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="hi", max_tokens=2, logprobs=6)
    assert e.value.body["param"] == "logprobs"


# -- sampling controls -------------------------------------------------------------------------------------------


def test_logit_bias_forces_and_bans_tokens(server):
    c = client(server)
    plain = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True)
    first = ids_of(server.tokenizer, plain.choices[0].logprobs.content)[0]
    banned = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                       logit_bias={str(first): -100})
    assert first not in ids_of(server.tokenizer, banned.choices[0].logprobs.content)
    forced_id = server.tokenizer.encode(" Zorbo")[0]
    forced = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=1.0, seed=3,
                                       logit_bias={str(forced_id): 100})
    assert forced.choices[0].message.content == server.tokenizer.decode([forced_id]) * 5


def test_vllm_extras_and_penalties_change_the_reply(server):
    c = client(server)
    base = dict(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0)
    plain = c.chat.completions.create(**base).choices[0].message.content
    penalised = c.chat.completions.create(**base, frequency_penalty=2.0, presence_penalty=2.0).choices[0]
    repetition = c.chat.completions.create(**base, extra_body={"repetition_penalty": 3.0}).choices[0]
    assert penalised.message.content != plain and repetition.message.content != plain
    # top_k 1 and min_p 1 each keep only the most likely token: greedy, whatever the temperature
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        sampled = c.chat.completions.create(**{**base, "temperature": 1.5}, seed=7, extra_body=extra)
        assert sampled.choices[0].message.content == plain, extra


# -- log-probs ---------------------------------------------------------------------------------------------------


def test_chat_logprobs_sum_to_the_sequence_logprob(server, model):
    c = client(server)
    reply = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0.8, seed=11,
                                      logprobs=True, top_logprobs=3, presence_penalty=1.0)
    content = reply.choices[0].logprobs.content
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    ids = ids_of(server.tokenizer, content)
    prompt = server.tokenizer.chat_format.render_prompt(MESSAGES)
    # the raw distribution (temperature 1, no penalty), as OpenAI reports it
    assert sum(e.logprob for e in content) == pytest.approx(sequence_logprob(model, prompt, ids), abs=2e-3)
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-5
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)

    chunks = list(c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0.8, seed=11,
                                            logprobs=True, top_logprobs=3, presence_penalty=1.0, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]
    plain = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_responses_include_logprobs_streamed_or_not(server, model):
    c = client(server)
    asked = dict(model=MODEL, input=MESSAGES[-1]["content"], max_output_tokens=12, temperature=0,
                 include=["message.output_text.logprobs"], top_logprobs=2)
    done = c.responses.create(**asked)
    part = done.output[0].content[0]
    assert "".join(e.token for e in part.logprobs) == part.text == done.output_text
    prompt = server.tokenizer.chat_format.render_prompt([{"role": "user", "content": MESSAGES[-1]["content"]}])
    assert sum(e.logprob for e in part.logprobs) == pytest.approx(
        sequence_logprob(model, prompt, ids_of(server.tokenizer, part.logprobs)), abs=2e-3)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-5 for e in part.logprobs)
    assert c.responses.retrieve(done.id).output[0].content[0].logprobs == part.logprobs  # stored with the reply

    events = list(c.responses.create(**asked, stream=True))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [(x.token, round(x.logprob, 4)) for e in deltas for x in e.logprobs] == [
        (x.token, round(x.logprob, 4)) for x in part.logprobs]
    text_done = next(e for e in events if e.type == "response.output_text.done")
    assert [x.token for x in text_done.logprobs] == [x.token for x in part.logprobs]
    assert events[-1].response.output[0].content[0].logprobs == part.logprobs

    assert c.responses.create(model=MODEL, input="Hi", max_output_tokens=3).output[0].content[0].logprobs == []
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=MODEL, input="Hi", include=["file_search_call.results"])
    assert e.value.body["param"] == "include" and e.value.body["code"] == "unsupported_parameter"


def test_completions_several_prompts_logprobs_and_token_prompts(server, model):
    c = client(server)
    token_prompt = server.tokenizer.encode("Zorbo lives")
    prompts = ["Where is", "The cat"]
    done = c.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, logprobs=2, seed=5)
    assert [ch.index for ch in done.choices] == [0, 1, 2, 3] and done.usage.completion_tokens == 24
    for ch in done.choices:
        lp = ch.logprobs
        assert "".join(lp.tokens) == ch.text and len(lp.token_logprobs) == 6
        assert all(len(top) <= 2 and max(top.values()) >= t - 1e-5 for top, t in zip(lp.top_logprobs,
                                                                                   lp.token_logprobs))
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]

    tokens = c.completions.create(model=MODEL, prompt=token_prompt, max_tokens=8, logprobs=0, temperature=0)
    lp = tokens.choices[0].logprobs
    ids = server.tokenizer.encode(tokens.choices[0].text)
    assert server.tokenizer.decode(ids) == tokens.choices[0].text
    assert sum(lp.token_logprobs) == pytest.approx(sequence_logprob(model, token_prompt, ids), abs=2e-3) or \
        len(ids) != 8  # re-encoding the text may merge tokens differently
    two_lists = c.completions.create(model=MODEL, prompt=[token_prompt, token_prompt[:2]], max_tokens=3)
    assert [ch.index for ch in two_lists.choices] == [0, 1]

    streamed = list(c.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, logprobs=2, seed=5,
                                         stream=True))
    texts, token_lists = {}, {}
    for chunk in streamed:
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            token_lists[ch.index] = token_lists.get(ch.index, []) + (ch.logprobs.tokens if ch.logprobs else [])
    assert texts == {ch.index: ch.text for ch in done.choices}
    assert token_lists == {ch.index: ch.logprobs.tokens for ch in done.choices}

    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt=[[0, 10**6]], max_tokens=2)
    assert e.value.body["param"] == "prompt"


def test_best_of_without_a_reward_model_ranks_by_mean_logprob(server):
    c = client(server)
    ranked = c.completions.create(model=MODEL, prompt="Zorbo", n=3, best_of=3, max_tokens=5, logprobs=0, seed=2)
    means = [sum(ch.logprobs.token_logprobs) / len(ch.logprobs.token_logprobs) for ch in ranked.choices]
    assert means == sorted(means, reverse=True) and ranked.usage.completion_tokens == 15
    best = c.completions.create(model=MODEL, prompt="Zorbo", best_of=3, max_tokens=5, logprobs=0, seed=2)
    assert best.choices[0].text == ranked.choices[0].text and best.usage.completion_tokens == 15


# -- structured outputs ------------------------------------------------------------------------------------------


class Pet(BaseModel):
    name: str = Field(max_length=12)
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)
    vaccinated: bool
    toys: list[Literal["ball", "rope", "bell"]] = Field(max_length=3)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_parse_returns_a_valid_object_for_any_seed(server, seed):
    completion = client(server).chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Pet,
                                                       max_tokens=300, temperature=1.0, seed=seed)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Pet)
    assert Pet.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_mode_returns_parseable_json_streamed_or_not(server):
    c = client(server)
    # nothing in json_object mode bounds a string, and the random model's run on: a bias towards `"` and `}` ends
    # them sooner (it makes no invalid JSON more likely: the grammar alone keeps the document valid)
    bias = {str(server.tokenizer.encode(ch)[0]): 6 for ch in '"}'}
    for seed in (0, 1):
        reply = c.chat.completions.create(model=MODEL, messages=MESSAGES, response_format={"type": "json_object"},
                                          max_tokens=400, seed=seed, logit_bias=bias)
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    chunks = list(c.chat.completions.create(model=MODEL, messages=MESSAGES, response_format={"type": "json_object"},
                                            max_tokens=400, seed=3, logit_bias=bias, stream=True))
    assert isinstance(json.loads("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)), dict)


def test_responses_text_format_json_schema(server):
    c = client(server)
    response = c.responses.parse(model=MODEL, input="Describe a pet", text_format=Pet, max_output_tokens=300)
    assert isinstance(response.output_parsed, Pet)
    assert response.text.format.type == "json_schema"


def test_invalid_schema_is_a_400_naming_the_field(server):
    c = client(server)
    cases = [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}},
         "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
         "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
        ({"type": "yaml"}, "response_format.type"),
    ]
    for response_format, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, response_format=response_format)
        assert e.value.body["param"] == param, (response_format, e.value.body)
    r = post(server, "/v1/responses", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x",
                                                                          "schema": {"type": 5}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "text.format.schema", r.text
