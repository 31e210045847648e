"""Function calling: tool calls rendered by each chat format as transformers renders them, parsed out of replies
(whole and streamed, malformed ones as content), and served through Chat Completions and the Responses API to the
official openai client and LangChain's ChatOpenAI."""

from __future__ import annotations

import json

import httpx
import pytest
from hf_tokenizers import TOOL_FAMILIES, load_transformers_tokenizer, save_tiny_hf_tokenizer

from palmchat.tokenizer.bpe import train_tokenizer
from palmchat.tokenizer.chat_format import PALMCHAT_CHAT_TEMPLATE, tool_call_text
from palmchat.tokenizer.hf import HFTokenizer
from palmchat.tokenizer.tools import SYNTAXES, ToolCallParser, call_syntax, parse_tool_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now.",
                                         "parameters": {"type": "object", "properties": {}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather like in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."},
    {"role": "user", "content": "And the dog?"},
]


@pytest.fixture(scope="module")
def tool_tokenizers(tmp_path_factory):
    """family -> (palmchat's HFTokenizer, transformers' tokenizer) of the same folder."""
    out = {}
    for family in TOOL_FAMILIES:
        folder = save_tiny_hf_tokenizer(tmp_path_factory.mktemp(family), family)
        out[family] = (HFTokenizer.load(folder), load_transformers_tokenizer(folder))
    return out


@pytest.fixture(scope="module")
def palm_tokenizer():
    return train_tokenizer(["the cat sat on the mat", "What is the weather like in Paris? It is sunny.",
                            '{"name": "get_weather", "arguments": {"city": "Paris"}}'], vocab_size=300)


# ------------------------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("family", TOOL_FAMILIES)
def test_tool_conversations_render_as_transformers_renders_them(tool_tokenizers, family):
    tok, ref = tool_tokenizers[family]
    for k in (2, 3, 4, 5, 6):
        messages = CONVERSATION[:k]
        for prompt in (False, True):
            ids = tok.chat_format.render(messages, add_generation_prompt=prompt, tools=[WEATHER, TIME])[0]
            assert ids == ref.apply_chat_template(messages, tools=[WEATHER, TIME], tokenize=True,
                                                  add_generation_prompt=prompt)["input_ids"], (family, k, prompt)
    text = tok.decode(tok.chat_format.render(CONVERSATION, tools=[WEATHER])[0], skip_special_tokens=False)
    assert '"description": "The weather in a city."' in text  # the tools are in the prompt
    syntax = tok.chat_format.tool_syntax
    assert syntax.name == {"qwen2.5": "hermes", "llama3.1": "llama3_json"}[family]
    assert syntax.render("get_weather", '{"city": "Paris"}') in text  # the syntax writes calls as the template does


def test_a_template_without_tools_has_no_call_syntax(tmp_path):
    tok = HFTokenizer.load(save_tiny_hf_tokenizer(tmp_path, "llama3"))
    assert tok.chat_format.tool_syntax is None and call_syntax(tok.chat_templates["default"]) is None


def test_palmchat_format_renders_tools_as_plain_text_turns(palm_tokenizer):
    fmt = palm_tokenizer.chat_format
    ids, mask = fmt.render(CONVERSATION, tools=[WEATHER])
    tools_turn = [fmt.system_id] + palm_tokenizer.encode("# Tools\n" + json.dumps(WEATHER)) + [fmt.eot_id]
    assert ids[:len(tools_turn) + 1] == [fmt.bos_id] + tools_turn
    call_turn = fmt.render_turn(CONVERSATION[2])
    assert call_turn == [fmt.assistant_id] + palm_tokenizer.encode(
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>') + [fmt.eot_id]
    assert fmt.render_turn(CONVERSATION[3]) == [fmt.user_id] + palm_tokenizer.encode(
        "<tool_response>sunny</tool_response>") + [fmt.eot_id]
    # the call is trained on (SFT teaches calls), the result is not; the vocabulary has no new token
    start = len(ids) - sum(len(fmt.render_turn(m)) for m in CONVERSATION[2:])
    assert mask[start:start + len(call_turn)] == [0] + [1] * (len(call_turn) - 1)
    assert max(ids) < palm_tokenizer.vocab_size and palm_tokenizer.vocab_size == 300
    # prefix-stable with tools too: each message's turn is its own
    assert ids == [fmt.bos_id] + tools_turn + [t for m in CONVERSATION for t in fmt.render_turn(m)]
    # the call parses back with palmchat's syntax
    reply = fmt.decode_reply(call_turn[1:])
    content, calls = parse_tool_calls(reply, SYNTAXES["palmchat"])
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]


def test_palmchat_chat_template_renders_tools_as_the_format_does(palm_tokenizer, tmp_path):
    """The Jinja template a palmchat tokenizer folder carries (for transformers, llama.cpp...) gives the same ids."""
    folder = tmp_path / "palm"
    palm_tokenizer.save_pretrained(folder)
    ref = load_transformers_tokenizer(folder)
    assert ref.chat_template == PALMCHAT_CHAT_TEMPLATE
    for tools in (None, [WEATHER, TIME]):
        for prompt in (False, True):
            ids = palm_tokenizer.chat_format.render(CONVERSATION, add_generation_prompt=prompt, tools=tools)[0]
            assert ids == ref.apply_chat_template(CONVERSATION, tools=tools, tokenize=True,
                                                  add_generation_prompt=prompt)["input_ids"]
    assert tool_call_text("f", {"a": 1}) == SYNTAXES["palmchat"].render("f", '{"a": 1}')


# ------------------------------------------------------------------------------------------------ parsing


def streamed(text: str, syntax, tools=(), step: int = 1):
    """(content, [(name, arguments)], events) of ``text`` fed ``step`` characters at a time."""
    parser = ToolCallParser(syntax, tools)
    events = []
    for i in range(0, len(text), step):
        events += parser.feed(text[i:i + step])
    events += parser.finish()
    return parser.content, [(c.name, c.arguments) for c in parser.calls], events


HERMES_REPLY = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, '
                '{"note": "a } and a \\" inside"}]}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
                '{}}\n</tool_call><junk after the calls')


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_hermes_calls_parse_the_same_streamed_or_whole(step):
    content, calls, events = streamed(HERMES_REPLY, SYNTAXES["hermes"], ["get_weather", "get_time"], step)
    assert content == "Let me check.\n"
    assert calls == [("get_weather", '{"city": "Paris", "days": [1, {"note": "a } and a \\" inside"}]}'),
                     ("get_time", "{}")]
    assert json.loads(calls[0][1])["days"][1]["note"] == 'a } and a " inside'
    # no piece of a tag ever reaches the content; a call starts before its arguments arrive
    assert "".join(e[1] for e in events if e[0] == "content") == "Let me check.\n"
    assert [e[:2] for e in events if e[0] == "call"] == [("call", 0), ("call", 1)]
    assert "".join(e[2] for e in events if e[0] == "arguments" and e[1] == 0) == calls[0][1]
    if step == 1:  # the arguments arrive piece by piece, as the model writes them
        assert len([e for e in events if e[0] == "arguments" and e[1] == 0]) > 10


def test_llama3_json_calls_parse_the_same_streamed_or_whole():
    syntax = SYNTAXES["llama3_json"]
    for text in (' {"name": "get_weather", "parameters": {"city": "Paris"}}',
                 '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
                 '{"parameters": {"city": "Paris"}, "name": "get_weather"}'):
        for step in (1, 3, 100):
            assert streamed(text, syntax, step=step)[:2] == ("", [("get_weather", '{"city": "Paris"}')]), text
    assert streamed('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}', syntax)[1] == [
        ("a", "{}"), ("b", '{"x": 1}')]
    one = ToolCallParser(syntax, max_calls=1)  # parallel_tool_calls false: what follows the first call is dropped
    one.feed('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}')
    one.finish()
    assert [c.name for c in one.calls] == ["a"] and one.content == ""
    content, calls, events = streamed("It is {sunny} today.", syntax)
    assert (content, calls) == ("It is {sunny} today.", [])
    assert len(events) > 5  # plain text streams as it comes


@pytest.mark.parametrize("text", [
    "<tool_call>not json at all</tool_call>",
    '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',  # no such tool offered
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}, "extra": 1}\n</tool_call>',
    "The answer is <tool_cal",
    "<tool_call>\n{\"name\": \"get_we",  # cut off before the name ended
])
def test_malformed_calls_are_content(text):
    for step in (1, 1000):
        content, calls, _ = streamed(text, SYNTAXES["hermes"], ["get_weather"], step)
        if "extra" in text:  # the arguments were streamed before the extra key showed up: still a call
            assert calls == [("get_weather", '{"city": "Paris"}')]
            continue
        assert (content, calls) == (text, []), step


def test_a_tagged_call_in_another_key_order_is_taken_at_its_close():
    text = 'Sure. <tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_weather"}\n</tool_call>'
    for step in (1, 2, 3, 1000):
        assert streamed(text, SYNTAXES["hermes"], ["get_weather"], step)[:2] == (
            "Sure. ", [("get_weather", '{"city": "Paris"}')]), step
    long_name = '<tool_call>{"name": "' + "x" * 100 + '", "arguments": {}}</tool_call>'
    assert streamed(long_name, SYNTAXES["hermes"], step=7)[:2] == (long_name, [])  # no function has such a name


def test_a_call_cut_off_keeps_the_arguments_written_so_far():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    assert streamed(text, SYNTAXES["hermes"])[:2] == ("", [("get_weather", '{"city": "Par')])
    # arguments that are not JSON at all (an untrained model after a forced call's opening) are kept as written
    text = SYNTAXES["hermes"].opening("get_weather") + "the cat sat}\n</tool_call> and more"
    assert streamed(text, SYNTAXES["hermes"])[:2] == ("", [("get_weather", "the cat sat")])


# ------------------------------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory):
    """`palmchat serve` on a tiny random Qwen2 folder with Qwen2.5's template (Hermes tool calls)."""
    from hf_models import save_tiny_hf_model
    from server_fixtures import Server

    root = tmp_path_factory.mktemp("qwen-tools")
    folder = root / "tiny-qwen"
    save_tiny_hf_model(folder, "qwen2", seed=1, vocab_size=700, max_position_embeddings=2048)
    save_tiny_hf_tokenizer(folder, "qwen2.5")
    server = Server(folder, root / "db.sqlite", "--dtype", "fp32", "--moderation", "none", log=root / "server.log",
                    no_auth=True).start()
    server.folder, server.db = folder, root / "db.sqlite"
    yield server
    server.stop()


def client_of(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    return client, client.models.list().data[0].id


def reference_prompt(folder, messages, tools):
    """transformers' ids of a conversation the openai client sent (arguments as the objects they hold)."""
    ref = load_transformers_tokenizer(folder)
    plain = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                "name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]]
        plain.append(m)
    return ref.apply_chat_template(plain, tools=tools, tokenize=True, add_generation_prompt=True)["input_ids"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_two_step_tool_loop_with_the_openai_client(qwen_server, stream):
    """The model calls the function tool_choice names; the client answers with a tool message; the model finishes.
    The follow-up runs exactly transformers' rendering of the whole conversation, call and result included."""
    client, model = client_of(qwen_server)
    messages = [{"role": "user", "content": "What time is it?"}]
    choice = {"type": "function", "function": {"name": "get_time"}}
    if stream:
        from openai.lib.streaming.chat import ChatCompletionStreamState

        state = ChatCompletionStreamState()
        for chunk in client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME],
                                                    tool_choice=choice, max_tokens=6, temperature=0, stream=True):
            state.handle_chunk(chunk)
        first = state.get_final_completion()
    else:
        first = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME],
                                               tool_choice=choice, max_tokens=6, temperature=0)
    reply = first.choices[0]
    assert reply.finish_reason == "tool_calls"
    assert reply.message.content in (None, "")
    [call] = reply.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {})
    messages += [{"role": "assistant", "content": None, "tool_calls": [
                     {"id": call.id, "type": "function",
                      "function": {"name": "get_time", "arguments": call.function.arguments}}]},
                 {"role": "tool", "tool_call_id": call.id, "content": "12:30"}]
    second = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME], max_tokens=4,
                                            temperature=0)
    assert second.choices[0].finish_reason in ("length", "stop")  # (its text may be empty: ids past the tokenizer's)
    assert second.usage.prompt_tokens == len(reference_prompt(qwen_server.folder, messages, [WEATHER, TIME]))
    # tool_choice "none": the tools stay in the prompt, and the reply is text even where it looks like a call
    plain = client.chat.completions.create(model=model, messages=messages[:1], tools=[WEATHER, TIME],
                                           tool_choice="none", max_tokens=4, temperature=0)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "length"
    assert plain.usage.prompt_tokens == len(reference_prompt(qwen_server.folder, messages[:1], [WEATHER, TIME]))


ROUTE = {"type": "function", "function": {"name": "plan_route", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                     "stops": {"type": "integer", "enum": [1, 2, 3]}, "by_train": {"type": "boolean"}},
    "required": ["city", "stops", "by_train"], "additionalProperties": False}}}


def chat_reply(client, stream: bool, **kwargs):
    """A chat choice, streamed (rebuilt by the SDK's own stream state) or not."""
    if not stream:
        return client.chat.completions.create(**kwargs).choices[0]
    from openai.lib.streaming.chat import ChatCompletionStreamState

    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        state.handle_chunk(chunk)
    return state.get_final_completion().choices[0]


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_calls_arguments_follow_its_schema_for_any_seed(qwen_server, stream):
    """A random model writes no JSON by itself: with tool_choice naming a function, constrained decoding keeps the
    arguments valid under its schema, whatever is sampled."""
    client, model = client_of(qwen_server)
    choice = {"type": "function", "function": {"name": "plan_route"}}
    for seed in range(4):
        reply = chat_reply(client, stream, model=model, messages=[{"role": "user", "content": "Plan it."}],
                           tools=[WEATHER, ROUTE], tool_choice=choice, max_tokens=60, temperature=1.0, seed=seed)
        [call] = reply.message.tool_calls
        arguments = json.loads(call.function.arguments)
        assert call.function.name == "plan_route" and reply.finish_reason == "tool_calls"
        assert set(arguments) == {"city", "stops", "by_train"} and arguments["city"] in ("Paris", "Rome", "Oslo")
        assert arguments["stops"] in (1, 2, 3) and isinstance(arguments["by_train"], bool)
    bad = httpx.post(qwen_server.url + "/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "x"}], "tools": [ROUTE], "tool_choice": choice,
        "response_format": {"type": "json_object"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"


@pytest.mark.parametrize("stream", [False, True])
def test_strict_functions_keep_the_calls_a_model_makes_by_itself_valid(qwen_server, stream):
    """tool_choice "auto" with a strict function: a random model pushed to open a call (a logit bias on the tag)
    names an offered function and writes arguments valid under its schema, whatever is sampled; without strict
    the same model's calls are not JSON."""
    client, model = client_of(qwen_server)
    [tag] = HFTokenizer.load(qwen_server.folder).encode("<tool_call>")
    strict_route = {"type": "function", "function": {**ROUTE["function"], "strict": True}}
    asked = dict(model=model, messages=[{"role": "user", "content": "Plan it."}], tool_choice="auto",
                 parallel_tool_calls=False, logit_bias={str(tag): 100}, max_tokens=80, temperature=1.0)
    for seed in range(4):
        reply = chat_reply(client, stream, **asked, tools=[WEATHER, strict_route], seed=seed)
        [call] = reply.message.tool_calls
        arguments = json.loads(call.function.arguments)
        assert reply.finish_reason == "tool_calls" and isinstance(arguments, dict)
        if call.function.name == "plan_route":
            assert set(arguments) == {"city", "stops", "by_train"} and arguments["city"] in ("Paris", "Rome", "Oslo")
            assert arguments["stops"] in (1, 2, 3) and isinstance(arguments["by_train"], bool)
        else:
            assert call.function.name == "get_weather"
    loose = [client.chat.completions.create(**asked, tools=[ROUTE], seed=seed).choices[0] for seed in range(4)]
    assert not any(r.message.tool_calls for r in loose)  # a random model's own "calls" are not JSON: content


FLAT_TOOLS = [{"type": "function", **TIME["function"]}, {"type": "function", **WEATHER["function"]}]


def responses_create(client, stream: bool, **kwargs):
    """A response through the SDK's own stream helper (which rebuilds it from the events) or plainly."""
    if not stream:
        return client.responses.create(**kwargs)
    seen, final = [], None
    with client.responses.stream(**kwargs) as events:
        for event in events:
            seen.append(event)
            if event.type in ("response.completed", "response.incomplete"):
                final = event.response
    final.kinds, final.events = [e.type for e in seen], seen
    return final


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_loop_through_the_responses_api(qwen_server, stream):
    """A function_call output item, its result sent back as a function_call_output item, by previous_response_id
    and through a stored conversation; the follow-up runs transformers' rendering of the whole conversation."""
    client, model = client_of(qwen_server)
    common = dict(model=model, tools=FLAT_TOOLS, max_output_tokens=6, temperature=0)
    first = responses_create(client, stream, input="What time is it?",
                             tool_choice={"type": "function", "name": "get_time"}, **common)
    assert first.status == "completed"
    [call] = first.output
    assert (call.type, call.name, json.loads(call.arguments), call.status) == ("function_call", "get_time", {},
                                                                             "completed")
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert first.tools[0].name == "get_time" and first.tool_choice.name == "get_time"
    if stream:
        assert "response.function_call_arguments.done" in first.kinds
        assert "response.output_text.delta" not in first.kinds
        # a call with arguments streams them piece by piece into its item, as the SDK accumulates them
        weather = responses_create(client, stream, input="Weather in Paris?", **{**common, "max_output_tokens": 5},
                                   tool_choice={"type": "function", "name": "get_weather"})
        [item] = weather.output
        added = [e for e in weather.events if e.type == "response.output_item.added"]
        assert [(e.output_index, e.item.type, e.item.name) for e in added] == [(0, "function_call", "get_weather")]
        pieces = [e.delta for e in weather.events if e.type == "response.function_call_arguments.delta"]
        assert all(e.item_id == item.id for e in weather.events if e.type.startswith("response.function_call"))
        assert len(pieces) > 1 and "".join(pieces) == item.arguments and item.status == "incomplete"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "12:30"}
    second = responses_create(client, stream, input=[result], previous_response_id=first.id, **common)
    assert [o.type for o in second.output] == ["message"]  # (its text may be empty: ids past the tokenizer's)
    conversation = [{"role": "user", "content": "What time is it?"},
                    {"role": "assistant", "content": "", "tool_calls": [{"id": call.call_id, "type": "function",
                                                                         "function": {"name": "get_time",
                                                                                      "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": call.call_id, "content": "12:30"}]
    chat_tools = [TIME, WEATHER]
    listed = client.responses.input_items.list(second.id).data
    assert [(i.type, i.call_id, i.output) for i in listed] == [("function_call_output", call.call_id, "12:30")]
    assert second.usage.input_tokens == len(reference_prompt(qwen_server.folder, conversation, chat_tools))
    # a third turn without tools continues the stored conversation, calls and results rendered from their text
    third = responses_create(client, stream, model=model, input="Thanks!", previous_response_id=second.id,
                             max_output_tokens=3, temperature=0)
    whole = conversation + [{"role": "assistant", "content": second.output_text},
                            {"role": "user", "content": "Thanks!"}]
    assert third.usage.input_tokens == len(reference_prompt(qwen_server.folder, whole, None))

    # the same through a stored conversation: its items keep the call and its result
    stored = client.conversations.create()
    first = responses_create(client, stream, input="What time is it?", conversation=stored.id,
                             tool_choice="required", **{**common, "tools": FLAT_TOOLS[:1]})
    [call] = first.output
    assert call.name == "get_time"
    result["call_id"] = call.call_id
    second = responses_create(client, stream, input=[result], conversation=stored.id, **common)
    items = client.conversations.items.list(stored.id, order="asc").data
    assert [i.type for i in items] == ["message", "function_call", "function_call_output", "message"]
    assert items[2].call_id == call.call_id and items[2].output == "12:30"
    conversation[1]["tool_calls"][0]["id"] = conversation[2]["tool_call_id"] = call.call_id
    assert second.usage.input_tokens == len(reference_prompt(qwen_server.folder, conversation, chat_tools))


def test_langchain_bind_tools_returns_tool_calls(qwen_server):
    from langchain_core.messages import ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_time() -> str:
        """The time now."""
        return "12:30"

    _, model = client_of(qwen_server)
    llm = ChatOpenAI(base_url=qwen_server.url + "/v1", api_key="unused", model=model, temperature=0, max_tokens=6)
    bound = llm.bind_tools([get_time], tool_choice="get_time")
    message = bound.invoke("What time is it?")
    [call] = message.tool_calls
    assert (call["name"], call["args"]) == ("get_time", {}) and call["id"].startswith("call_")
    chunks = list(bound.stream("What time is it?"))  # LangChain merges the streamed deltas by index
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert [(c["name"], c["args"]) for c in whole.tool_calls] == [("get_time", {})]
    # the loop closes: the result goes back as a ToolMessage and the model answers
    answer = llm.bind_tools([get_time]).invoke(["What time is it?", message,
                                                ToolMessage(get_time.invoke({}), tool_call_id=call["id"])])
    assert answer.tool_calls == [] and answer.response_metadata["finish_reason"] in ("length", "stop")


def test_bad_tool_requests_get_a_400_naming_the_field(qwen_server):
    import httpx

    _, model = client_of(qwen_server)
    user = {"role": "user", "content": "What time is it?"}
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}

    def error(path: str, **body) -> tuple[str, str]:
        r = httpx.post(qwen_server.url + "/v1/" + path, json={"model": model, **body}, timeout=30)
        assert r.status_code == 400, r.text
        return r.json()["error"]["param"], r.json()["error"]["message"]

    chat = "chat/completions"
    assert error(chat, messages=[user, call, {"role": "tool", "tool_call_id": "call_b", "content": "x"}])[0] == \
        "messages[2].tool_call_id"
    assert error(chat, messages=[user, {"role": "tool", "content": "x"}])[0] == "messages[1].tool_call_id"
    bad_schema = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"city": {"type": "strin"}}}}}
    param, message = error(chat, messages=[user], tools=[TIME, bad_schema])
    assert param == "tools[1].function.parameters" and "properties.city.type" in message
    assert error(chat, messages=[user], tools=[{"type": "function", "function": {"name": "no spaces"}}])[0] == \
        "tools[0].function.name"
    assert error(chat, messages=[user], tools=[TIME, TIME])[0] == "tools"
    assert error(chat, messages=[user], tools=[{"type": "code_interpreter"}])[0] == "tools[0].type"
    param, message = error(chat, messages=[user], tools=[TIME],
                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert param == "tool_choice" and "get_weather" in message
    assert error(chat, messages=[user], tool_choice="required")[0] == "tool_choice"
    assert error(chat, messages=[user], tools=[TIME], tool_choice="sometimes")[0] == "tool_choice"
    strict = {"type": "function", "function": {**TIME["function"], "strict": True}}
    assert error(chat, messages=[user], tools=[strict, WEATHER], tool_choice="required")[0] == "tool_choice"
    assert error(chat, messages=[user], tools=[{"type": "function", "function": {**TIME["function"], "strict": 1}}]
                 )[0] == "tools[0].function.strict"
    assert error(chat, messages=[user], tools=[strict], response_format={"type": "json_object"})[0] == "tools"
    assert error(chat, messages=[user], functions=[TIME["function"]])[0] == "functions"
    # the Responses API's shapes
    assert error("responses", input=[{"type": "function_call_output", "call_id": "call_x", "output": "1"}],
                 tools=FLAT_TOOLS)[0].startswith("input[0]")
    assert error("responses", input="hi", tools=FLAT_TOOLS, tool_choice={"type": "function", "name": "nope"})[0] == \
        "tool_choice"
    assert error("responses", input="hi", tools=[{"type": "function", "name": "f", "parameters": []}])[0] == \
        "tools[0].parameters"


def test_a_template_without_tools_refuses_them(tmp_path):
    from palmchat.serve.errors import APIError
    from palmchat.serve.tools import tool_setup

    fmt = HFTokenizer.load(save_tiny_hf_tokenizer(tmp_path, "llama3")).chat_format
    with pytest.raises(APIError, match="no way to describe tools") as e:
        tool_setup(fmt, [TIME], None, None)
    assert e.value.param == "tools" and e.value.status == 400
    assert tool_setup(fmt, None, "auto", None) is None  # no tools: nothing to refuse


@pytest.fixture(scope="module")
def palm_server(tmp_path_factory):
    """`palmchat serve` on a checkpoint in palmchat's own chat format (tiny, random weights: it never writes a
    special token, so every reply runs to max_tokens)."""
    from server_fixtures import Server, build_checkpoints

    root = tmp_path_factory.mktemp("palm-tools")
    policy, _ = build_checkpoints(root)
    server = Server(policy, root / "db.sqlite", "--moderation", "none", log=root / "server.log", no_auth=True).start()
    server.policy = policy
    yield server
    server.stop()


def test_palmchat_format_tool_loop_streamed(palm_server):
    """palmchat's own format: the forced call streams as deltas the SDK accumulates; a call to a function with
    parameters keeps the arguments the (untrained) model wrote, cut at max_tokens; the follow-up prompt is the
    format's rendering of the conversation with the tools, the call and its result."""
    from openai.lib.streaming.chat import ChatCompletionStreamState

    from palmchat import checkpoint

    client, model = client_of(palm_server)
    messages = [{"role": "user", "content": "What is the weather like in Paris?"}]
    # "required" with two tools: the opening stops before the name, which the model writes; an untrained model
    # writes no tool's name, and its malformed call comes back as content
    required = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
        max_tokens=5, temperature=0)
    message = required.choices[0].message
    assert message.tool_calls or message.content.startswith('<tool_call>{"name": "')
    forced = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER, TIME], tool_choice={"type": "function",
                                                                           "function": {"name": "get_weather"}},
        max_tokens=5, temperature=0, stream=True)
    state = ChatCompletionStreamState()
    pieces = []
    for chunk in forced:
        state.handle_chunk(chunk)
        for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            pieces.append(delta.function.arguments)
    reply = state.current_completion_snapshot.choices[0]  # (get_final_completion refuses a reply cut by length)
    [call] = reply.message.tool_calls
    assert call.function.name == "get_weather" and reply.finish_reason == "length"
    assert pieces[0] == "" and len(pieces) > 2 and "".join(pieces) == call.function.arguments  # piece by piece
    timed = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME], max_tokens=5,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    [call] = timed.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments, timed.choices[0].finish_reason) == (
        "get_time", "{}", "tool_calls")
    two = client.chat.completions.create(model=model, messages=messages, tools=[TIME], tool_choice="required", n=2,
                                         max_tokens=2)  # one function: "required" names it
    ids = [c.message.tool_calls[0].id for c in two.choices]
    assert [c.message.tool_calls[0].function.name for c in two.choices] == ["get_time"] * 2 and ids[0] != ids[1]
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": "12:30"}]
    second = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME], max_tokens=3)
    fmt = checkpoint.load_tokenizer(palm_server.policy).chat_format
    plain = [dict(m, tool_calls=[{**c, "function": {**c["function"], "arguments": {}}} for c in m["tool_calls"]])
             if m.get("tool_calls") else m for m in messages]
    assert second.usage.prompt_tokens == len(fmt.render_prompt(plain, tools=[WEATHER, TIME]))
    assert second.choices[0].message.content and second.choices[0].message.tool_calls is None


def test_a_llama31_tool_loop_runs_transformers_rendering(tmp_path):
    """Llama 3.1's JSON calls through the server: the forced call, its result as an ipython turn, and the follow-up
    prompt as transformers renders it (the tools in the first user message)."""
    from hf_models import save_tiny_hf_model
    from server_fixtures import Server

    folder = tmp_path / "tiny-llama"
    save_tiny_hf_model(folder, "llama", vocab_size=700, max_position_embeddings=2048)
    save_tiny_hf_tokenizer(folder, "llama3.1")
    server = Server(folder, tmp_path / "db.sqlite", "--dtype", "fp32", "--moderation", "none",
                    log=tmp_path / "server.log", no_auth=True).start()
    try:
        client, model = client_of(server)
        messages = [{"role": "user", "content": "What time is it?"}]
        first = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME], max_tokens=4,
                                               tool_choice={"type": "function", "function": {"name": "get_time"}})
        [call] = first.choices[0].message.tool_calls
        assert (call.function.name, call.function.arguments, first.choices[0].finish_reason) == (
            "get_time", "{}", "tool_calls")
        messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "12:30"}]
        second = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME], max_tokens=3)
        assert second.usage.prompt_tokens == len(reference_prompt(folder, messages, [WEATHER, TIME]))
    finally:
        server.stop()
