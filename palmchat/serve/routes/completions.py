"""POST /v1/completions: plain text, the prompt's tokens after bos, streamed or not."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from palmchat.serve import schemas as S
from palmchat.serve.errors import APIError
from palmchat.serve.generate import Generation, GenerationError, generate_replies, moderate_input
from palmchat.serve.sampling import choice_counts, sampling_params, stops_of
from palmchat.serve.state import caller, server_state
from palmchat.serve.streaming import error_event, sse, stream_response
from palmchat.tokenizer.chat_format import conversation_start

router = APIRouter(prefix="/v1", dependencies=[Depends(caller)])


@router.post("/completions")
async def completions(body: S.CompletionRequest, request: Request, owner: str = Depends(caller)):
    state = server_state(request)
    n, candidates = choice_counts(state, body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise APIError(400, "this server takes one prompt per request", param="prompt")
    text = S.clean_text(prompts[0])
    prompt = conversation_start(state.tokenizer.chat_format) + state.tokenizer.encode(text)
    params = sampling_params(state, body, len(prompt), body.max_tokens, "max_tokens", "prompt", owner,
                             default_max=16)
    stops = stops_of(body.stop)
    flagged_in = await moderate_input(state, [text])
    id, created = S.new_id("cmpl-"), int(time.time())
    if flagged_in is not None and flagged_in.flagged and state.moderation_mode == "block":
        choices = [{"index": i, "text": "", "finish_reason": "content_filter", "logprobs": None} for i in range(n)]
        result = S.text_completion(id, body.model, created, choices, S.chat_usage(len(prompt), 0, 0))
        if not body.stream:
            return result

        async def refused():
            yield sse(result)
            yield "data: [DONE]\n\n"

        return stream_response(refused())

    if not body.stream:
        generation, replies = await generate_replies(state, prompt, params, n, candidates, stops)
        choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                   for i, r in enumerate(replies)]
        usage = S.chat_usage(len(prompt), generation.completion_tokens, generation.cached_tokens)
        return S.text_completion(id, body.model, created, choices, usage)

    generation = None if candidates else Generation(state, prompt, params, n, stops, state.moderation_mode == "block")

    async def events():
        nonlocal generation

        def chunk(index, text, finish=None):
            return sse(S.text_completion(id, body.model, created, [
                {"index": index, "text": text, "finish_reason": finish, "logprobs": None}], None))

        try:
            if generation is None:
                generation, replies = await generate_replies(state, prompt, params, n, candidates, stops)
                for i, r in enumerate(replies):
                    yield chunk(i, r.text, r.finish_reason)
            else:
                async for i, delta, finish in generation.deltas():
                    yield chunk(i, delta, finish)
        except (APIError, GenerationError) as e:
            yield sse(error_event(e))
            return
        finally:
            if generation is not None:
                generation.cancel()
        if body.stream_options and body.stream_options.include_usage:
            usage = S.chat_usage(len(prompt), generation.completion_tokens, generation.cached_tokens)
            yield sse(S.text_completion(id, body.model, created, [], usage))
        yield "data: [DONE]\n\n"

    return stream_response(events())
