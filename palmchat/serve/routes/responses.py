"""POST /v1/responses (stateful: previous_response_id / conversation, instructions, store, truncation),
GET|DELETE /v1/responses/{id} and GET /v1/responses/{id}/input_items.

How a stateful turn is built (see palmchat/store.py): the conversation so far is a list of token ids, only ever
appended to. A follow-up's prompt is `history + new turns + <|assistant|>`, so it starts with the very tokens
of the previous prompt and reply, whose K/V the scheduler's prefix cache holds: only the new turn is computed,
and `usage.input_tokens_details.cached_tokens` says how many were not.

`instructions` apply to one response only, as in OpenAI's API: they are rendered as a system turn at the front
of that response's prompt, `[bos, system(instructions)] + history[1:] + new turns`, and are not stored. The
cache consequence: a turn with instructions shares only `bos` with a prompt built without them (and vice
versa), so switching instructions on or off costs one full prefill; a client that sends the same instructions
every turn (the usual pattern) still hits the cache, since each such prompt extends the one before.

Concurrent responses in one conversation never interleave: each is built on the branch as it stood when it
started and its items follow the item it was built on, so two turns sent at once become two branches (siblings),
and the one that finishes last is the current branch.

A turn is committed to the database before its reply completes (before the final SSE event, or before the
non-streamed response is sent), so a client that saw a response finish can always continue from it, even
after the server was killed.

Stored ids are only ever fed to the tokenizer that made them. Each stored context and item carries its tokenizer's
sha256 (store.py), and a response also keeps its context as text: when the server now runs a model with another
tokenizer (restarted with another checkpoint), the history is rendered again from that text, exactly as the same
conversation sent in full would be, and never fed as another tokenizer's ids. Stored before this (schema v2), a
conversation's items name no tokenizer and are rendered again from their text; a response has no text of its
context, so it is continued from its ids, as before.

A streamed reply whose client goes away (the page's Stop button aborts the request) is committed as it stood:
the input and the text released so far, as an assistant item with status `incomplete`, in a stored response
with status `cancelled`; the conversation continues from those tokens. A killed server commits nothing of the
turn it was generating.

Function calling (serve/tools.py): `tools` and `tool_choice` apply to one response, as in OpenAI's API. A reply's
calls are `function_call` output items, and the client sends each result back as a `function_call_output` input
item (with previous_response_id, a conversation, or the whole history as `input`); both are stored as items of
their own. A turn with tools is run as the whole conversation rendered with them (the tools sit at its start; the
prefix cache still serves what did not change), and a context that holds calls or results is stored and continued
as its text rendered again, never as the ids sampled for a call (a call's ids are a stand-in in the store).
"""

from __future__ import annotations

import asyncio
import copy
import time
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request

from palmchat.serve import schemas as S
from palmchat.serve.context import conversation_history, message_of, new_turns, previous_history, render_or_400
from palmchat.serve.errors import APIError, not_found
from palmchat.serve.generate import (
    REFUSAL,
    Generation,
    GenerationError,
    generate_replies,
    moderate_input,
    moderate_output,
    moderation_result,
)
from palmchat.serve.logprobs import LogprobsCursor, chat_logprobs
from palmchat.serve.sampling import constrain_tool_calls, fit_prompt, model_candidates, sampling_params
from palmchat.serve.state import ServerState, caller, server_state
from palmchat.serve.streaming import error_event, sse, stream_response
from palmchat.serve.tools import ReplyReader, ToolSetup, add_item, check_tool_results, has_tool_parts, tool_setup
from palmchat.store import CURRENT, StoreError, context_digest
from palmchat.tokenizer.chat_format import PalmChatFormat, conversation_start

router = APIRouter(prefix="/v1", dependencies=[Depends(caller)])


@dataclass
class Turn:
    """One /v1/responses call, prepared: where its history comes from, what it adds, and its prompt."""

    history: list[int]  # the stored context it continues (starts with bos), in this server's tokenizer's ids
    history_messages: list[dict] | None  # the same as text ({"role", "content"}); None: a response stored before v3
    texts: list[tuple[str, str]]  # (role, text) of each input item, for moderation
    new_messages: list[dict]  # the input as chat messages (tool calls and results included)
    turn_tokens: list[list[int]]  # each input item rendered (a stand-in for calls and results)
    input_items: list[dict]
    context: list[int]  # history and input, up to and including the generation prompt that opens the reply
    prompt: list[int]  # what runs: the context (with instructions), or with truncation "auto" what is left of it
    conversation_id: str | None
    truncation_details: dict | None = None
    digest: str = ""  # context_digest of the conversation's ids as stored (compare checks it did not change)
    after: object = CURRENT  # the conversation item the new items follow (store.CURRENT: the current branch's end)
    tools: ToolSetup | None = None
    opening: list[int] = ()  # a forced call's opening, after the prompt: the start of the reply's ids

    def messages(self, reply: dict | None) -> list[dict] | None:
        """The context as text once the message `reply` answers this turn (None: the input was blocked and is not
        part of it)."""
        if self.history_messages is None:
            return None
        if reply is None:
            return self.history_messages
        return self.history_messages + self.new_messages + [reply]

    @property
    def with_tool_parts(self) -> bool:
        return has_tool_parts(self.history_messages) or has_tool_parts(self.new_messages)


def prepare_turn(state: ServerState, owner: str, body: S.ResponseRequest) -> Turn:
    chat_format = state.tokenizer.chat_format
    if body.previous_response_id and body.conversation:
        raise APIError(400, "previous_response_id and conversation cannot be used together", param="conversation")
    conversation_id, digest, after = None, "", CURRENT
    if body.previous_response_id:
        previous = state.store.get_response(owner, body.previous_response_id)
        if previous is None:
            raise APIError(404, f"Previous response with id '{body.previous_response_id}' not found.",
                           param="previous_response_id", code="previous_response_not_found")
        history, history_messages = previous_history(state, previous, body.previous_response_id)
    elif body.conversation:
        conversation_id = body.conversation if isinstance(body.conversation, str) else body.conversation.id
        if state.store.get_conversation(owner, conversation_id) is None:
            raise APIError(404, f"Conversation with id '{conversation_id}' not found.", param="conversation",
                           code="not_found")
        # the turn follows the item it was built on, so that turns sent at once become siblings, not interleaved
        after = branch_point(state, conversation_id, body.branch_from)
        after = state.store.current_item(conversation_id) if after is CURRENT else after
        items = state.store.context_items(conversation_id, after)
        history, history_messages = conversation_history(state, items)
        digest = context_digest([t for _, tokens, _ in items for t in tokens])
    else:
        history, history_messages = conversation_start(chat_format), []
    if body.branch_from is not None and not body.conversation:
        raise APIError(400, "branch_from names an item of a conversation: send `conversation` too",
                       param="branch_from")
    items = [S.InputMessage(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    if not items and not (body.branch_from and history_messages and history_messages[-1]["role"] == "user"):
        raise APIError(400, "input must hold at least one message (it may be empty only with `branch_from` naming a "
                            "user message, to write another reply to it)", param="input")
    tools = tool_setup(chat_format, body.tools, body.tool_choice, body.parallel_tool_calls, flat=True)
    new_messages: list[dict] = []
    for item in items:
        add_item(new_messages, item)
    texts = [(m["role"], m["content"]) for m in new_messages]
    input_items = [input_item(item) for item in items]
    tool_parts = has_tool_parts(history_messages) or has_tool_parts(new_messages)
    if tool_parts:
        if history_messages is None:
            raise APIError(400, "this conversation was stored by an older palmchat without its text, so tool calls "
                                "cannot be added to it: send the whole conversation as `input`", param="input")
        check_tool_results(history_messages + new_messages, param="input")
        context = render_or_400(chat_format, history_messages + new_messages)
        turn_tokens, earlier = [], copy.deepcopy(history_messages)
        for item in input_items:
            turn_tokens.append(item_tokens(chat_format, item, earlier))
            add_item(earlier, item)
    else:
        context, turn_tokens = new_turns(chat_format, history, history_messages, new_messages)
    context = context + chat_format.generation_prompt  # up to and including what opens the reply
    prompt = context
    system = [{"role": "system", "content": S.clean_text(body.instructions)}] if body.instructions else []
    if tools or tool_parts:  # the whole conversation, with the tools at its start
        prompt = render_or_400(chat_format, system + (history_messages or []) + new_messages, tools, prompt=True)
    elif body.instructions:
        if isinstance(chat_format, PalmChatFormat):  # its turns do not depend on what comes before them
            start = conversation_start(chat_format)
            prompt = start + chat_format.render_turn(system[0]) + prompt[len(start):]
        else:  # a template may write a default system prompt when there is none: render with this one instead
            prompt = chat_format.render_prompt(system + (history_messages or []) + new_messages)
    fitted = fit_prompt(state, prompt, body.max_output_tokens, body.truncation)
    opening = state.tokenizer.encode(tools.opening()) if tools and tools.opening() else []
    return Turn(history, history_messages, texts, new_messages, turn_tokens, input_items, context,
                fitted.prompt + opening, conversation_id, fitted.details(), digest, after, tools, opening)


def input_item(item) -> dict:
    """An input item as it is stored (and listed by input_items): a new id, the shape OpenAI lists it in."""
    if isinstance(item, S.FunctionCallItem):
        return S.function_call_item(S.new_id("fc_"), item.call_id, item.name, item.arguments)
    if isinstance(item, S.FunctionCallOutputItem):
        return S.function_call_output_item(S.new_id("fco_"), item.call_id, S.text_of(item.output))
    return S.message_item(S.new_id("msg_"), item.role, S.text_of(item.content))


def item_tokens(chat_format, item: dict, earlier: list[dict]) -> list[int]:
    """The ids a stored item of a turn with tool calls keeps: a message's turn where the format renders one on its
    own, else (a call, a result) a stand-in, the end-of-turn id: such a context is always rendered again from its
    text (context.conversation_history)."""
    if item["type"] == "message" and chat_format.prefix_stable and not has_tool_parts(earlier):
        try:
            return chat_format.render_turn({"role": S.role_of(item["role"]),
                                            "content": item["content"][0].get("text", "")}, earlier)
        except ValueError:
            pass
    return [chat_format.eot_id]


def stored_turn(chat_format, turn: Turn, output: list[dict], reply_tokens: list[int], reader: ReplyReader
                ) -> tuple[list[int], list[tuple[dict, list[int]]], list[dict] | None]:
    """(context ids, (item, ids) of each new item, context as text) of a turn answered by `output`. A reply as
    plain text keeps its sampled ids; with tool calls or results anywhere in the turn, the context is its text
    rendered (calls as the template writes them) and the output items keep a stand-in (see item_tokens)."""
    items = list(zip(turn.input_items, turn.turn_tokens))
    if reader.calls or turn.with_tool_parts:
        messages = turn.messages(reader.message())
        try:
            context = chat_format.render(messages)[0] if messages is not None else turn.context + reply_tokens
        except ValueError:  # a template refusing the reply as the model wrote it: its ids as sampled
            context = turn.context + reply_tokens
        return context, items + [(item, [chat_format.eot_id]) for item in output], messages
    items.append((output[0], chat_format.generation_prompt + reply_tokens))
    return turn.context + reply_tokens, items, turn.messages(
        {"role": "assistant", "content": message_of(output[0])["content"]})


def branch_point(state: ServerState, conversation_id: str, branch_from: str | None):
    """Where a turn of the conversation goes: after the item `branch_from` ("": at the start), by default after
    the end of the current branch (store.CURRENT)."""
    if branch_from is None:
        return CURRENT
    if branch_from == "":
        return None
    if not state.store.parent_of(conversation_id, branch_from)[0]:
        raise APIError(404, f"Item with id '{branch_from}' not found in conversation '{conversation_id}'.",
                       param="branch_from", code="not_found")
    return branch_from


@router.post("/responses")
async def create_response(body: S.ResponseRequest, request: Request, owner: str = Depends(caller)):
    state = server_state(request)
    candidates = model_candidates(state, body.model)
    turn = await asyncio.to_thread(prepare_turn, state, owner, body)  # database reads and tokenizing
    chat_format = state.tokenizer.chat_format
    params = constrain_tool_calls(state, sampling_params(state, body, len(turn.prompt), body.max_output_tokens,
                                                          "max_output_tokens", "input", owner), turn.tools)
    flagged_in = await moderate_input(state, [text for role, text in turn.texts if role != "assistant"]
                                      + [S.clean_text(body.instructions or "")])
    blocked = flagged_in is not None and flagged_in.flagged and state.moderation_mode == "block"
    response_id, item_id, created_at = S.new_id("resp_"), S.new_id("msg_"), time.time()
    block_output = state.moderation_mode == "block"

    def response(status: str, output: list[dict], usage: dict | None, reason: str | None = None,
                 output_moderation=None) -> dict:
        moderation = None
        if flagged_in is not None or output_moderation is not None:
            moderation = {"input": moderation_result(flagged_in) if flagged_in else None,
                          "output": moderation_result(output_moderation) if output_moderation else None}
        return S.response_object(response_id, body.model, created_at, status, output,
                                 instructions=body.instructions, previous_response_id=body.previous_response_id,
                                 conversation_id=turn.conversation_id, max_output_tokens=body.max_output_tokens,
                                 temperature=body.temperature, top_p=body.top_p, metadata=body.metadata,
                                 store=body.store, usage=usage, incomplete_reason=reason, moderation=moderation,
                                 truncation=body.truncation or "disabled",
                                 truncation_details=turn.truncation_details, tools=body.tools,
                                 tool_choice=body.tool_choice or ("auto" if body.tools else "none"),
                                 parallel_tool_calls=body.parallel_tool_calls is not False,
                                 text_format=body.text.format if body.text else None)

    async def commit(final: dict, reply_tokens: list[int] | None, reader: ReplyReader | None = None) -> None:
        """Store the turn. A blocked input never enters the token history: its items are kept with no tokens."""
        if reply_tokens is None:
            context, items = turn.history, [(item, []) for item in turn.input_items + final["output"]]
            messages = turn.messages(None)
        else:
            context, items, messages = stored_turn(chat_format, turn, final["output"], reply_tokens, reader)
        try:
            await asyncio.to_thread(state.store.commit_turn, owner, final if body.store else None, turn.input_items,
                                    context, turn.conversation_id, items, state.tokenizer_sha256, messages, turn.after)
        except KeyError:
            raise APIError(404, f"Conversation with id '{turn.conversation_id}' was deleted during this response.",
                           param="conversation") from None
        except StoreError as e:
            raise APIError(409, f"{e} during this response; nothing was stored.", param="branch_from",
                           code="conflict") from None

    def finished(reply, reader: ReplyReader, output_moderation) -> dict:
        status, reason = {"stop": ("completed", None), "tool_calls": ("completed", None),
                          "length": ("incomplete", "max_output_tokens"),
                          "content_filter": ("incomplete", "content_filter")}[reader.finish_reason(reply.finish_reason)]
        output = reader.output_items(item_id, status="completed" if status == "completed" else "incomplete")
        usage = S.response_usage(len(turn.prompt), generation.completion_tokens, generation.cached_tokens)
        return response(status, output, usage, reason, output_moderation)

    stops = turn.tools.stops() if turn.tools else []

    if blocked:
        final = response("incomplete", [S.message_item(item_id, "assistant", "", refusal=REFUSAL)],
                         S.response_usage(len(turn.prompt), 0, 0), "content_filter")
    generation = None
    if not body.stream:
        if blocked:
            await commit(final, None)
            return final
        generation, replies = await generate_replies(state, turn.prompt, params, 1, candidates, stops)
        reader = ReplyReader(turn.tools)
        reader.read(replies[0].text)
        final = finished(replies[0], reader, moderate_output(state, replies[0]))
        if params.logprobs is not None:
            with_logprobs(final, chat_logprobs(LogprobsCursor(state.tokenizer, replies[0]))["content"])
        await commit(final, list(turn.opening) + replies[0].context_tokens(), reader)
        return final

    if not blocked and not candidates:
        generation = Generation(state, turn.prompt, params, 1, stops, block_output)
    reader = ReplyReader(turn.tools)
    settled = False  # committed, or failed: a disconnect from then on stores nothing
    logged: list[dict] = []  # the log-prob entries streamed so far, when the request included them
    cursor: LogprobsCursor | None = None

    def new_logprobs(reply) -> list[dict]:
        """The log-prob entries of the reply's tokens released since the last call (none unless asked for)."""
        nonlocal cursor
        if params.logprobs is None or reply is None:
            return []
        cursor = cursor or LogprobsCursor(state.tokenizer, reply)
        entries = chat_logprobs(cursor)["content"]
        logged.extend(entries)
        return entries

    def commit_stopped() -> None:
        """The client went away mid-reply: keep what was released so far (synchronously: this runs while the
        request is being torn down, where nothing may be awaited)."""
        if settled or generation is None or candidates:
            return
        reply = generation.replies[0]
        final = response("cancelled", reader.output_items(item_id, status="incomplete"),
                         S.response_usage(len(turn.prompt), generation.completion_tokens, generation.cached_tokens))
        context, items, messages = stored_turn(chat_format, turn, final["output"],
                                               list(turn.opening) + reply.context_tokens(), reader)
        try:
            state.store.commit_turn(owner, final if body.store else None, turn.input_items, context,
                                    turn.conversation_id, items, state.tokenizer_sha256, messages, turn.after)
        except (KeyError, StoreError):  # the conversation or the branch point was deleted meanwhile
            pass

    async def events():
        nonlocal generation, settled
        sequence = iter(range(1 << 62))

        def event(type: str, **data) -> str:
            return f"event: {type}\n" + sse({"type": type, "sequence_number": next(sequence), **data})

        started = response("in_progress", [], None)
        try:
            yield event("response.created", response=started)
            yield event("response.in_progress", response=started)
            if blocked:
                item = final["output"][0]
                yield event("response.output_item.added", output_index=0,
                            item={**item, "status": "in_progress", "content": []})
                at = {"item_id": item_id, "output_index": 0, "content_index": 0}
                yield event("response.content_part.added", **at, part={"type": "refusal", "refusal": ""})
                yield event("response.refusal.delta", **at, delta=REFUSAL)
                yield event("response.refusal.done", **at, refusal=REFUSAL)
                yield event("response.content_part.done", **at, part=item["content"][0])
                yield event("response.output_item.done", output_index=0, item=item)
                await commit(final, None)
                yield event("response.incomplete", response=final)
                return
            opened: list[str] = []  # the ids of the output items opened so far, in order

            def open_message() -> list[str]:
                opened.append(item_id)
                return [event("response.output_item.added", output_index=len(opened) - 1,
                              item={"id": item_id, "type": "message", "role": "assistant", "status": "in_progress",
                                    "content": []}),
                        event("response.content_part.added", **where(),
                              part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

            def close_message(item: dict) -> list[str]:
                part = item["content"][0]
                if params.logprobs is not None:
                    new_logprobs(reply)
                    part["logprobs"] = list(logged)
                return [event("response.output_text.done", **where(), text=part["text"], logprobs=part["logprobs"]),
                        event("response.content_part.done", **where(), part=item["content"][0]),
                        event("response.output_item.done", output_index=opened.index(item_id), item=item)]

            def on(events: list[tuple]) -> list[str]:
                """Parser events as the Responses API's stream events: text into the message item (opened at its
                first text), each call as a function_call item whose arguments stream."""
                out = []
                for e in events:
                    if e[0] == "content":
                        out += [] if item_id in opened else open_message()
                        out.append(event("response.output_text.delta", **where(), delta=e[1],
                                         logprobs=new_logprobs(reply)))
                    elif e[0] == "call":
                        if e[1] == 0 and item_id in opened:  # the text before the calls is final
                            out += close_message(S.message_item(item_id, "assistant", reader.content))
                        if e[1] > 0:
                            out += close_call(e[1] - 1, "completed")
                        opened.append(reader.item_ids[e[1]])
                        out.append(event("response.output_item.added", output_index=len(opened) - 1, item=(
                            S.function_call_item(reader.item_ids[e[1]], reader.ids[e[1]], e[2], "", "in_progress"))))
                    else:
                        out.append(event("response.function_call_arguments.delta", item_id=reader.item_ids[e[1]],
                                         output_index=opened.index(reader.item_ids[e[1]]), delta=e[2]))
                return out

            def close_call(index: int, status: str) -> list[str]:
                call = reader.calls[index]
                item = S.function_call_item(reader.item_ids[index], reader.ids[index], call.name, call.arguments,
                                            status)
                at = opened.index(item["id"])
                return [event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                              arguments=call.arguments),
                        event("response.output_item.done", output_index=at, item=item)]

            def where() -> dict:
                return {"item_id": item_id, "output_index": opened.index(item_id), "content_index": 0}

            reply = None if generation is None else generation.replies[0]
            if reader.parser is None:  # plain text: the message opens at once
                for e in open_message():
                    yield e
            for e in on(reader.start_events()):
                yield e
            if generation is None:
                generation, replies = await generate_replies(state, turn.prompt, params, 1, candidates, stops)
                reply = replies[0]
                for e in on(reader.feed_events(reply.text)):
                    yield e
            else:
                async for _, delta, _ in generation.deltas():
                    for e in on(reader.feed_events(delta)):
                        yield e
                reply = generation.replies[0]
            for e in on(reader.finish_events()):
                yield e
            result = finished(reply, reader, moderate_output(state, reply))
            if params.logprobs is not None:
                new_logprobs(reply)
                with_logprobs(result, list(logged))
            for item in result["output"]:
                if item["type"] == "message" and not reader.calls:  # (with calls it closed at the first one)
                    for e in ([] if item_id in opened else open_message()) + close_message(item):
                        yield e
            if reader.calls:
                for e in close_call(len(reader.calls) - 1, result["output"][-1]["status"]):
                    yield e
            settled = True
            await commit(result, list(turn.opening) + reply.context_tokens(), reader)
            yield event(f"response.{result['status']}", response=result)
        except (APIError, GenerationError) as e:
            settled = True
            error = error_event(e)["error"]
            yield event("error", code=error["code"], message=error["message"], param=error["param"])
        except (asyncio.CancelledError, GeneratorExit):
            commit_stopped()
            raise
        finally:
            if generation is not None:
                generation.cancel()

    return stream_response(events())


def with_logprobs(response: dict, entries: list[dict]) -> dict:
    """`response` with `entries` (Chat Completions' log-prob entries of the reply's released tokens) as the
    log-probs of its message's output_text part (a reply with tool calls: its tokens include the calls')."""
    for item in response["output"]:
        if item["type"] == "message" and item["content"] and item["content"][0]["type"] == "output_text":
            item["content"][0]["logprobs"] = entries
    return response


def _stored_response(state: ServerState, owner: str, response_id: str) -> dict:
    stored = state.store.get_response(owner, response_id)
    if stored is None:
        raise not_found("Response", response_id)
    return stored


@router.get("/responses/{response_id}")
async def get_response(response_id: str, request: Request, owner: str = Depends(caller)):
    return (await asyncio.to_thread(_stored_response, server_state(request), owner, response_id))["body"]


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, request: Request, owner: str = Depends(caller)):
    if not await asyncio.to_thread(server_state(request).store.delete_response, owner, response_id):
        raise not_found("Response", response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/responses/{response_id}/input_items")
async def response_input_items(response_id: str, request: Request, owner: str = Depends(caller),
                               limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "desc",
                               after: str | None = None):
    stored = await asyncio.to_thread(_stored_response, server_state(request), owner, response_id)
    return S.item_page(stored["input_items"], limit, order, after)
