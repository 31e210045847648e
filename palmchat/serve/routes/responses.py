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
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request

from palmchat.serve import schemas as S
from palmchat.serve.context import conversation_history, message_of, new_turns, previous_history
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
from palmchat.serve.sampling import fit_prompt, model_candidates, sampling_params
from palmchat.serve.state import ServerState, caller, server_state
from palmchat.serve.streaming import error_event, sse, stream_response
from palmchat.store import CURRENT, StoreError, context_digest
from palmchat.tokenizer.chat_format import PalmChatFormat, conversation_start

router = APIRouter(prefix="/v1", dependencies=[Depends(caller)])


@dataclass
class Turn:
    """One /v1/responses call, prepared: where its history comes from, what it adds, and its prompt."""

    history: list[int]  # the stored context it continues (starts with bos), in this server's tokenizer's ids
    history_messages: list[dict] | None  # the same as text ({"role", "content"}); None: a response stored before v3
    texts: list[tuple[str, str]]  # (role, text) of each input message
    turn_tokens: list[list[int]]  # each input message rendered
    input_items: list[dict]
    context: list[int]  # history and input, up to and including the generation prompt that opens the reply
    prompt: list[int]  # what runs: the context (with instructions), or with truncation "auto" what is left of it
    conversation_id: str | None
    truncation_details: dict | None = None
    digest: str = ""  # context_digest of the conversation's ids as stored (compare checks it did not change)
    after: object = CURRENT  # the conversation item the new items follow (store.CURRENT: the current branch's end)

    def messages(self, reply: str | None) -> list[dict] | None:
        """The context as text once `reply` answers this turn (None: the input was blocked and is not part of it)."""
        if self.history_messages is None:
            return None
        if reply is None:
            return self.history_messages
        return (self.history_messages + [{"role": S.role_of(role), "content": text} for role, text in self.texts]
                + [{"role": "assistant", "content": reply}])


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
    messages = [S.InputMessage(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    if not messages and not (body.branch_from and history_messages and history_messages[-1]["role"] == "user"):
        raise APIError(400, "input must hold at least one message (it may be empty only with `branch_from` naming a "
                            "user message, to write another reply to it)", param="input")
    texts = [(m.role, S.text_of(m.content)) for m in messages]
    new_messages = [{"role": S.role_of(role), "content": text} for role, text in texts]
    context, turn_tokens = new_turns(chat_format, history, history_messages, new_messages)
    context = context + chat_format.generation_prompt  # up to and including what opens the reply
    input_items = [S.message_item(S.new_id("msg_"), role, text) for role, text in texts]
    prompt = context
    if body.instructions:
        system = {"role": "system", "content": S.clean_text(body.instructions)}
        if isinstance(chat_format, PalmChatFormat):  # its turns do not depend on what comes before them
            start = conversation_start(chat_format)
            prompt = start + chat_format.render_turn(system) + prompt[len(start):]
        else:  # a template may write a default system prompt when there is none: render with this one instead
            prompt = chat_format.render_prompt([system, *(history_messages or []), *new_messages])
    fitted = fit_prompt(state, prompt, body.max_output_tokens, body.truncation)
    return Turn(history, history_messages, texts, turn_tokens, input_items, context, fitted.prompt, conversation_id,
                fitted.details(), digest, after)


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
    params = sampling_params(state, body, len(turn.prompt), body.max_output_tokens, "max_output_tokens", "input",
                             owner)
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
                                 truncation_details=turn.truncation_details,
                                 text_format=body.text.format if body.text else None)

    async def commit(final: dict, reply_tokens: list[int] | None) -> None:
        """Store the turn. A blocked input never enters the token history: its items are kept with no tokens."""
        if reply_tokens is None:
            context, items = turn.history, [(item, []) for item in turn.input_items + final["output"]]
            messages = turn.messages(None)
        else:
            context = turn.context + reply_tokens
            reply = (final["output"][0], chat_format.generation_prompt + reply_tokens)
            items = list(zip(turn.input_items, turn.turn_tokens)) + [reply]
            messages = turn.messages(message_of(final["output"][0])["content"])
        try:
            await asyncio.to_thread(state.store.commit_turn, owner, final if body.store else None, turn.input_items,
                                    context, turn.conversation_id, items, state.tokenizer_sha256, messages, turn.after)
        except KeyError:
            raise APIError(404, f"Conversation with id '{turn.conversation_id}' was deleted during this response.",
                           param="conversation") from None
        except StoreError as e:
            raise APIError(409, f"{e} during this response; nothing was stored.", param="branch_from",
                           code="conflict") from None

    def finished(reply, output_moderation) -> dict:
        status, reason = {"stop": ("completed", None), "length": ("incomplete", "max_output_tokens"),
                          "content_filter": ("incomplete", "content_filter")}[reply.finish_reason]
        item = S.message_item(item_id, "assistant", reply.text,
                              status="completed" if status == "completed" else "incomplete")
        usage = S.response_usage(len(turn.prompt), generation.completion_tokens, generation.cached_tokens)
        return response(status, [item], usage, reason, output_moderation)

    if blocked:
        final = response("incomplete", [S.message_item(item_id, "assistant", "", refusal=REFUSAL)],
                         S.response_usage(len(turn.prompt), 0, 0), "content_filter")
    generation = None
    if not body.stream:
        if blocked:
            await commit(final, None)
            return final
        generation, replies = await generate_replies(state, turn.prompt, params, 1, candidates, [])
        final = finished(replies[0], moderate_output(state, replies[0]))
        await commit(final, replies[0].context_tokens())
        return final

    if not blocked and not candidates:
        generation = Generation(state, turn.prompt, params, 1, [], block_output)
    settled = False  # committed, or failed: a disconnect from then on stores nothing

    def commit_stopped() -> None:
        """The client went away mid-reply: keep what was released so far (synchronously: this runs while the
        request is being torn down, where nothing may be awaited)."""
        if settled or generation is None or candidates:
            return
        reply = generation.replies[0]
        item = S.message_item(item_id, "assistant", reply.text, status="incomplete")
        final = response("cancelled", [item], S.response_usage(len(turn.prompt), generation.completion_tokens,
                                                                generation.cached_tokens))
        items = list(zip(turn.input_items, turn.turn_tokens))
        items.append((item, chat_format.generation_prompt + reply.context_tokens()))
        try:
            state.store.commit_turn(owner, final if body.store else None, turn.input_items,
                                    turn.context + reply.context_tokens(), turn.conversation_id, items,
                                    state.tokenizer_sha256, turn.messages(reply.text), turn.after)
        except (KeyError, StoreError):  # the conversation or the branch point was deleted meanwhile
            pass

    async def events():
        nonlocal generation, settled
        sequence = iter(range(1 << 62))

        def event(type: str, **data) -> str:
            return f"event: {type}\n" + sse({"type": type, "sequence_number": next(sequence), **data})

        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        started = response("in_progress", [], None)
        try:
            yield event("response.created", response=started)
            yield event("response.in_progress", response=started)
            if blocked:
                item = final["output"][0]
                yield event("response.output_item.added", output_index=0,
                            item={**item, "status": "in_progress", "content": []})
                yield event("response.content_part.added", **where, part={"type": "refusal", "refusal": ""})
                yield event("response.refusal.delta", **where, delta=REFUSAL)
                yield event("response.refusal.done", **where, refusal=REFUSAL)
                yield event("response.content_part.done", **where, part=item["content"][0])
                yield event("response.output_item.done", output_index=0, item=item)
                await commit(final, None)
                yield event("response.incomplete", response=final)
                return
            yield event("response.output_item.added", output_index=0,
                        item={"id": item_id, "type": "message", "role": "assistant", "status": "in_progress",
                              "content": []})
            yield event("response.content_part.added", **where,
                        part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            if generation is None:
                generation, replies = await generate_replies(state, turn.prompt, params, 1, candidates, [])
                reply = replies[0]
                if reply.text:
                    yield event("response.output_text.delta", **where, delta=reply.text, logprobs=[])
            else:
                async for _, delta, _ in generation.deltas():
                    if delta:
                        yield event("response.output_text.delta", **where, delta=delta, logprobs=[])
                reply = generation.replies[0]
            result = finished(reply, moderate_output(state, reply))
            item = result["output"][0]
            yield event("response.output_text.done", **where, text=reply.text, logprobs=[])
            yield event("response.content_part.done", **where, part=item["content"][0])
            yield event("response.output_item.done", output_index=0, item=item)
            settled = True
            await commit(result, reply.context_tokens())
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
