"""POST /v1/chat/completions: stateless chat, streamed or not; n, best_of, stop, seed, usage; truncation as
an opt-in extension."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from palmchat.serve import schemas as S
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
from palmchat.serve.sampling import choice_counts, fit_prompt, sampling_params, stops_of
from palmchat.serve.state import caller, server_state
from palmchat.serve.streaming import error_event, sse, stream_response

router = APIRouter(prefix="/v1", dependencies=[Depends(caller)])


@router.post("/chat/completions")
async def chat_completions(body: S.ChatCompletionRequest, request: Request, owner: str = Depends(caller)):
    state = server_state(request)
    n, candidates = choice_counts(state, body)
    messages = [{"role": S.role_of(m.role), "content": S.text_of(m.content)} for m in body.messages]
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens or body.max_tokens
    fitted = fit_prompt(state, state.tokenizer.chat_format.render_prompt(messages), max_tokens, body.truncation)
    prompt = fitted.prompt
    params = sampling_params(state, body, len(prompt), max_tokens, param, "messages", owner)
    stops = stops_of(body.stop)
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

    if not body.stream:
        generation, replies = await generate_replies(state, prompt, params, n, candidates, stops)
        choices = [S.chat_choice(i, r.text, r.finish_reason) for i, r in enumerate(replies)]
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
            finishes = []  # (index, finish_reason) in the order the replies ended
            if generation is None:  # best-of: nothing to stream before the reward model chose
                generation, replies = await generate_replies(state, prompt, params, n, candidates, stops)
                cursors.update((i, LogprobsCursor(state.tokenizer, r)) for i, r in enumerate(replies))
                for i, r in enumerate(replies):
                    yield chunk(i, {"content": r.text})
                    finishes.append((i, r.finish_reason))
                    if i < n - 1:
                        yield chunk(i, {}, r.finish_reason)
            else:
                replies = generation.replies
                cursors.update((i, LogprobsCursor(state.tokenizer, r)) for i, r in enumerate(replies))
                async for i, delta, finish in generation.deltas():
                    if delta:
                        yield chunk(i, {"content": delta})
                    if finish:
                        finishes.append((i, finish))
                        if len(finishes) < n:
                            yield chunk(i, {}, finish)
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
