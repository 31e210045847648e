"""POST /v1/completions: plain text after bos (or the client's own token ids), streamed or not; several prompts
per request, n and best_of per prompt, log-probs.

Choice index = prompt index * n + j, as OpenAI numbers them. `best_of` picks the n best of that many candidates:
by the reward model when the server has one, else by the highest mean log-prob per token, as OpenAI's does.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request

from palmchat.serve import schemas as S
from palmchat.serve.errors import APIError
from palmchat.serve.generate import Generation, GenerationError, generate_replies, moderate_input
from palmchat.serve.logprobs import LogprobsCursor, completion_logprobs
from palmchat.serve.sampling import choice_counts, sampling_params, stops_of
from palmchat.serve.state import caller, server_state
from palmchat.serve.streaming import error_event, sse, stream_response
from palmchat.tokenizer.chat_format import conversation_start

router = APIRouter(prefix="/v1", dependencies=[Depends(caller)])

MAX_PROMPTS = 16  # prompts per request; with n, at most MAX_PROMPTS * 16 replies share the batch


def prompts_of(state, prompt) -> tuple[list[list[int]], list[str]]:
    """(token ids of each prompt, the text of each for moderation). A string is encoded after bos; token ids are
    taken as they are (checked against the vocabulary when they are submitted)."""
    if isinstance(prompt, str) or prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: at least one prompt is required", param="prompt")
    if len(prompt) > MAX_PROMPTS:
        raise APIError(400, f"prompt: at most {MAX_PROMPTS} prompts per request, got {len(prompt)}", param="prompt")
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            text = S.clean_text(p)
            ids.append(conversation_start(state.tokenizer.chat_format) + state.tokenizer.encode(text))
        else:
            if not p:
                raise APIError(400, "prompt: a token-id prompt must not be empty", param="prompt")
            vocab = state.scheduler.config.vocab_size
            if min(p) < 0 or max(p) >= vocab:
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            text = state.tokenizer.decode(p)
            ids.append(list(p))
        texts.append(text)
    return ids, texts


@router.post("/completions")
async def completions(body: S.CompletionRequest, request: Request, owner: str = Depends(caller)):
    state = server_state(request)
    n, candidates = choice_counts(state, body, mean_logprob_fallback=True)
    prompts, texts = prompts_of(state, body.prompt)
    params = [sampling_params(state, body, len(p), body.max_tokens, "max_tokens", "prompt", owner, default_max=16)
              for p in prompts]
    stops = stops_of(body.stop)
    flagged_in = await moderate_input(state, texts)
    id, created = S.new_id("cmpl-"), int(time.time())
    prompt_tokens = sum(len(p) for p in prompts)
    if flagged_in is not None and flagged_in.flagged and state.moderation_mode == "block":
        choices = [{"index": i, "text": "", "finish_reason": "content_filter", "logprobs": None}
                   for i in range(n * len(prompts))]
        result = S.text_completion(id, body.model, created, choices, S.chat_usage(prompt_tokens, 0, 0))
        if not body.stream:
            return result

        async def refused():
            yield sse(result)
            yield "data: [DONE]\n\n"

        return stream_response(refused())

    def logprobs_of(cursor):
        return completion_logprobs(cursor) if body.logprobs is not None else None

    def usage(generations) -> dict:
        return S.chat_usage(prompt_tokens, sum(g.completion_tokens for g in generations),
                            sum(g.cached_tokens for g in generations))

    if not body.stream:
        results = await asyncio.gather(*(generate_replies(state, p, ps, n, candidates, stops)
                                         for p, ps in zip(prompts, params)))
        choices = [{"index": k * n + i, "text": r.text, "finish_reason": r.finish_reason,
                    "logprobs": logprobs_of(LogprobsCursor(state.tokenizer, r))}
                   for k, (_, replies) in enumerate(results) for i, r in enumerate(replies)]
        return S.text_completion(id, body.model, created, choices, usage([g for g, _ in results]))

    # best_of: nothing to stream before the candidates are ranked; else every prompt's replies stream as they come
    generations = [] if candidates else [Generation(state, p, ps, n, stops, state.moderation_mode == "block")
                                         for p, ps in zip(prompts, params)]

    async def events():
        def chunk(index, text, finish, cursor):
            return sse(S.text_completion(id, body.model, created, [
                {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs_of(cursor)}], None))

        tasks = []
        try:
            if candidates:
                results = await asyncio.gather(*(generate_replies(state, p, ps, n, candidates, stops)
                                                 for p, ps in zip(prompts, params)))
                generations.extend(g for g, _ in results)
                for k, (_, replies) in enumerate(results):
                    for i, r in enumerate(replies):
                        yield chunk(k * n + i, r.text, r.finish_reason, LogprobsCursor(state.tokenizer, r))
            else:
                cursors = {(k, i): LogprobsCursor(state.tokenizer, r) for k, g in enumerate(generations)
                           for i, r in enumerate(g.replies)}
                queue: asyncio.Queue = asyncio.Queue()

                async def pump(k, generation):
                    try:
                        async for i, delta, finish in generation.deltas():
                            await queue.put((k, i, delta, finish))
                    except Exception as e:  # handed to the stream, which reports it as an error event
                        await queue.put(e)
                    await queue.put((k, None, None, None))

                tasks = [asyncio.create_task(pump(k, g)) for k, g in enumerate(generations)]
                running = len(tasks)
                while running:
                    item = await queue.get()
                    if isinstance(item, Exception):
                        raise item
                    k, i, delta, finish = item
                    if i is None:
                        running -= 1
                    else:
                        yield chunk(k * n + i, delta, finish, cursors[k, i])
        except (APIError, GenerationError) as e:
            yield sse(error_event(e))
            return
        finally:
            for task in tasks:
                task.cancel()
            for generation in generations:
                generation.cancel()
        if body.stream_options and body.stream_options.include_usage:
            yield sse(S.text_completion(id, body.model, created, [], usage(generations)))
        yield "data: [DONE]\n\n"

    return stream_response(events())
