"""POST /v1/chat/completions: stateless chat, streamed or not; n, best_of, stop, seed, usage; function calling
(tools, tool_choice, parallel_tool_calls: serve/tools.py); truncation as an opt-in extension."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from palmchat.serve import schemas as S
from palmchat.serve.context import render_or_400
from palmchat.serve.errors import APIError
from palmchat.serve.generate import (
    REFUSAL,
    Generation,
    GenerationError,
    generate_replies,
    moderate_input,
    moderate_output,
    moderation_results,
)
from palmchat.serve.logprobs import LogprobsCursor, chat_logprobs
from palmchat.serve.sampling import choice_counts, constrain_tool_calls, fit_prompt, sampling_params, stops_of
from palmchat.serve.state import caller, server_state
from palmchat.serve.streaming import error_event, sse, stream_response
from palmchat.serve.tools import ReplyReader, chat_messages, refuse_legacy_functions, tool_setup

router = APIRouter(prefix="/v1", dependencies=[Depends(caller)])


@router.post("/chat/completions")
async def chat_completions(body: S.ChatCompletionRequest, request: Request, owner: str = Depends(caller)):
    state = server_state(request)
    n, candidates = choice_counts(state, body)
    chat_format = state.tokenizer.chat_format
    refuse_legacy_functions(body.model_extra)
    tools = tool_setup(chat_format, body.tools, body.tool_choice, body.parallel_tool_calls)
    messages = chat_messages(body.messages)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens or body.max_tokens
    rendered = render_or_400(chat_format, messages, tools, prompt=True, param="messages")
    fitted = fit_prompt(state, rendered, max_tokens, body.truncation)
    # a forced call's opening follows the generation prompt: the reply starts inside the call
    prompt = fitted.prompt + (state.tokenizer.encode(tools.opening()) if tools and tools.opening() else [])
    params = constrain_tool_calls(state, sampling_params(state, body, len(prompt), max_tokens, param, "messages",
                                                          owner), tools)
    stops = stops_of(body.stop) + (tools.stops() if tools else [])
    flagged_in = await moderate_input(state, [m["content"] for m in messages if m["role"] != "assistant"])
    id, created = S.new_id("chatcmpl-"), int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def extra(outputs=()) -> dict:
        """`moderation` as on OpenAI's chat completions (the input's verdict and one per choice), and what
        truncation left out."""
        more = {"truncation_details": fitted.details()} if fitted.details() else {}
        if flagged_in is None:
            return more
        return {**more, "moderation": {"input": moderation_results([flagged_in]),
                                       "output": moderation_results([o for o in outputs if o is not None])}}

    if flagged_in is not None and flagged_in.flagged and state.moderation_mode == "block":
        choices = [S.chat_choice(i, None, "content_filter", refusal=REFUSAL) for i in range(n)]
        usage = S.chat_usage(len(prompt), 0, 0)
        if not body.stream:
            return S.chat_completion(id, body.model, created, choices, usage, **extra())

        async def refused():
            yield sse(S.chat_chunk(id, body.model, created, [
                {"index": i, "delta": {"role": "assistant", "content": None, "refusal": REFUSAL},
                 "finish_reason": "content_filter", "logprobs": None} for i in range(n)], **extra()))
            if include_usage:
                yield sse(S.chat_chunk(id, body.model, created, [], usage))
            yield "data: [DONE]\n\n"

        return stream_response(refused())

    readers = [ReplyReader(tools) for _ in range(n)]
    if not body.stream:
        generation, replies = await generate_replies(state, prompt, params, n, candidates, stops)
        choices = []
        for i, (r, reader) in enumerate(zip(replies, readers)):
            reader.read(r.text)
            choices.append(S.chat_choice(i, reader.content or (None if reader.calls else ""),
                                         reader.finish_reason(r.finish_reason), tool_calls=reader.tool_calls()))
        if params.logprobs is not None:
            for choice, r in zip(choices, replies):
                choice["logprobs"] = chat_logprobs(LogprobsCursor(state.tokenizer, r))
        usage = S.chat_usage(len(prompt), generation.completion_tokens, generation.cached_tokens)
        return S.chat_completion(id, body.model, created, choices, usage,
                                 **extra([moderate_output(state, r) for r in replies]))

    generation = None if candidates else Generation(state, prompt, params, n, stops, state.moderation_mode == "block")

    cursors = {}  # reply index -> LogprobsCursor, when the request asked for logprobs

    async def events():
        def chunk(index, delta, finish=None, **more):
            logprobs = None
            if params.logprobs is not None and "content" in delta and index in cursors:
                logprobs = chat_logprobs(cursors[index])
            return sse(S.chat_chunk(id, body.model, created, [{"index": index, "delta": delta,
                                                                "finish_reason": finish, "logprobs": logprobs}],
                                    **more))

        nonlocal generation
        try:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
                for delta in readers[i].start():
                    yield chunk(i, delta)
            finishes = []  # (index, finish_reason) in the order the replies ended
            if generation is None:  # best-of: nothing to stream before the reward model chose
                generation, replies = await generate_replies(state, prompt, params, n, candidates, stops)
                cursors.update((i, LogprobsCursor(state.tokenizer, r)) for i, r in enumerate(replies))
                for i, r in enumerate(replies):
                    for delta in readers[i].feed(r.text) + readers[i].finish():
                        yield chunk(i, delta)
                    finishes.append((i, readers[i].finish_reason(r.finish_reason)))
                    if i < n - 1:
                        yield chunk(i, {}, finishes[-1][1])
            else:
                replies = generation.replies
                cursors.update((i, LogprobsCursor(state.tokenizer, r)) for i, r in enumerate(replies))
                async for i, text, finish in generation.deltas():
                    for delta in readers[i].feed(text) + (readers[i].finish() if finish else []):
                        yield chunk(i, delta)
                    if finish:
                        finishes.append((i, readers[i].finish_reason(finish)))
                        if len(finishes) < n:
                            yield chunk(i, {}, finishes[-1][1])
            # the last reply's finish carries the moderation verdicts, known only now
            last, finish = finishes[-1]
            yield chunk(last, {}, finish, **extra([moderate_output(state, r) for r in replies]))
        except (APIError, GenerationError) as e:
            yield sse(error_event(e))
            return
        finally:  # also when the client went away before the replies were read
            if generation is not None:
                generation.cancel()
        if include_usage:
            usage = S.chat_usage(len(prompt), generation.completion_tokens, generation.cached_tokens)
            yield sse(S.chat_chunk(id, body.model, created, [], usage))
        yield "data: [DONE]\n\n"

    return stream_response(events())
