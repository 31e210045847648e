"""Feedback endpoints: what the chat page (/) and the labelling page (/label) call to collect human judgments,
and the admin endpoint `palmchat loop` calls to swap in a better reward model. All are extensions: OpenAI's
API has nothing for feedback. What is stored, and how it becomes training data: palmchat/feedback/exchange.py.

    POST /v1/feedback                      thumbs up/down (+ comment) on an assistant item of a conversation
    GET  /v1/feedback?conversation_id=     the caller's ratings (the page redraws its thumbs)
    POST /v1/conversations/{id}/compare    2-4 candidate replies to a new input, sampled in one batch; nothing is
                                           added to the conversation yet
    POST /v1/comparisons/{id}/ranking      stores the ranking and commits the input + the best candidate as the
                                           conversation's next turn (its sampled token ids: the prefix cache hits)
    GET  /v1/label/next                    the queued prompt this labeller has not ranked that has the fewest
                                           rankings, with its K candidates (sampled once, on first request)
    POST /v1/label/tasks/{id}/ranking      a labeller's ranking (a second one replaces the first)
    GET  /v1/label/stats                   {tasks, rankings, labellers, mine, agreement, agreement_tasks}
    POST /v1/admin/reload                  load another reward model and/or policy and swap it in, without a restart

The labelling queue needs a key with the role labeller or admin, the reload an admin key (state.py). A labeller
is an API key (its id). A server started with --no-auth listens on loopback only and trusts its callers: the
`X-Palmchat-Labeller` header names the labeller there (default "local").
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from palmchat.feedback.rankings import agreement
from palmchat.inference.engine import SamplingParams
from palmchat.serve import schemas as S
from palmchat.serve.context import message_of
from palmchat.serve.errors import APIError, not_found
from palmchat.serve.generate import generate_replies, moderate_input
from palmchat.serve.routes.responses import prepare_turn
from palmchat.serve.sampling import model_candidates, sampling_params
from palmchat.serve.state import ServerState, admin_key, caller, labeller_key, owned_conversation, server_state
from palmchat.store import StoreError

router = APIRouter(prefix="/v1", dependencies=[Depends(caller)])
LABELLER_HEADER = "x-palmchat-labeller"


class FeedbackRequest(S.Body):
    item_id: str = Field(min_length=1, max_length=200, description="an assistant item of the conversation")
    conversation_id: str = Field(min_length=1, max_length=200)
    rating: Literal[1, -1] = Field(description="1: thumbs up, -1: thumbs down")
    comment: str = Field("", max_length=4000)


class CompareRequest(S.Body):
    model: str
    input: str | list[S.InputMessage]
    instructions: str | None = Field(None, description="a system message for these candidates (as on /v1/responses)")
    n: int = Field(2, ge=2, le=4, description="candidates to sample")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    truncation: S.Truncation = Field(None, description="as on /v1/responses")


class RankingRequest(S.Body):
    ranking: list[str] = Field(min_length=2, max_length=S.MAX_CHOICES, description="candidate ids, best first")


class ReloadRequest(S.Body):
    reward_model: str | None = Field(None, min_length=1, max_length=4096,
                                     description="a reward-model checkpoint folder")
    policy: str | None = Field(None, min_length=1, max_length=4096,
                               description="a policy checkpoint folder to serve under the same model id: full "
                                           "weights, or a LoRA adapter folder (merged into the base it names)")


def labeller_of(request: Request, owner: str) -> str:
    if owner:
        return owner
    name = re.sub(r"[^\w.@-]", "", request.headers.get(LABELLER_HEADER, ""))[:64]
    return name or "local"


def conversation_messages(items: list[tuple[dict, list[int]]]) -> list[dict]:
    """The messages of a conversation's items that are part of its token history (a blocked turn is not)."""
    return [message_of(item) for item, tokens in items if item.get("type") == "message" and tokens]


def check_ranking(ranking: list[str], candidate_ids: list[str]) -> None:
    if len(set(ranking)) != len(ranking) or set(ranking) != set(candidate_ids):
        raise APIError(400, f"ranking must list each of the {len(candidate_ids)} candidate ids once, best first "
                            f"(got {len(ranking)} ids)", param="ranking")


# -- thumbs ----------------------------------------------------------------------------------------------


@router.post("/feedback")
async def give_feedback(body: FeedbackRequest, request: Request, owner: str = Depends(caller)):
    state = server_state(request)
    owned_conversation(state, owner, body.conversation_id)
    items = state.store.items_with_tokens(body.conversation_id, leaf=body.item_id)  # the branch up to the item
    at = next((i for i, (item, _) in enumerate(items) if item["id"] == body.item_id), None)
    if at is None:
        raise APIError(404, f"Item with id '{body.item_id}' not found in conversation '{body.conversation_id}'.",
                       param="item_id", code="not_found")
    item = items[at][0]
    if item.get("role") != "assistant":
        raise APIError(400, "only assistant replies can be rated", param="item_id")
    prompt = conversation_messages(items[:at])
    if not prompt or prompt[-1]["role"] != "user":
        raise APIError(400, "this reply does not answer a user message, so it cannot be rated", param="item_id")
    instructions = state.store.instructions_of_item(owner, body.conversation_id, body.item_id)
    if instructions:
        prompt = [{"role": "system", "content": instructions}] + prompt
    reply = "".join(part.get("text", "") for part in item.get("content", []))
    row = await asyncio.to_thread(state.store.put_feedback, {
        "id": S.new_id("fb_"), "owner": owner, "conversation_id": body.conversation_id, "item_id": body.item_id,
        "rating": body.rating, "comment": S.clean_text(body.comment), "prompt": prompt, "reply": reply,
        "created_at": time.time()})
    return _feedback_object(row)


def _feedback_object(row: dict) -> dict:
    return {"id": row["id"], "object": "feedback", "conversation_id": row["conversation_id"],
            "item_id": row["item_id"], "rating": row["rating"], "comment": row["comment"],
            "created_at": row["created_at"]}


@router.get("/feedback")
async def list_feedback(request: Request, conversation_id: str, owner: str = Depends(caller)):
    rows = server_state(request).store.feedback(owner=owner, conversation_id=conversation_id)
    return {"object": "list", "data": [_feedback_object(r) for r in rows]}


# -- compare in the chat page ------------------------------------------------------------------------------


@router.post("/conversations/{conversation_id}/compare")
async def compare(conversation_id: str, body: CompareRequest, request: Request, owner: str = Depends(caller)):
    state = server_state(request)
    if model_candidates(state, body.model) is not None:
        raise APIError(400, "compare samples plain candidates: use the model id without a ':best-of-N' suffix",
                       param="model")
    turn = await asyncio.to_thread(prepare_turn, state, owner, S.ResponseRequest(
        model=body.model, input=body.input, conversation=conversation_id, instructions=body.instructions,
        truncation=body.truncation, max_output_tokens=body.max_output_tokens))
    params = sampling_params(state, body, len(turn.prompt), body.max_output_tokens, "max_output_tokens", "input",
                             owner)
    flagged = await moderate_input(state, [text for role, text in turn.texts if role != "assistant"])
    if flagged is not None and flagged.flagged and state.moderation_mode == "block":
        raise APIError(400, "The input was flagged by moderation; no candidates were generated.", param="input",
                       code="content_filter")
    generation, replies = await generate_replies(state, turn.prompt, params, body.n, None, [])
    system = [{"role": "system", "content": S.clean_text(body.instructions)}] if body.instructions else []
    candidates = [{"id": S.new_id("msg_"), "text": r.text} for r in replies]
    task = {
        "id": S.new_id("cmp_"), "kind": "compare", "owner": owner, "conversation_id": conversation_id,
        "prompt": system + turn.history_messages + [{"role": S.role_of(role), "content": text}
                                                    for role, text in turn.texts],
        "candidates": candidates, "created_at": time.time(),
        "params": {  # what committing the chosen candidate needs
            "model": body.model, "instructions": body.instructions, "context_digest": turn.digest,
            "input_items": turn.input_items, "turn_tokens": turn.turn_tokens,
            "generation_prompt": state.tokenizer.chat_format.generation_prompt,
            "tokenizer": state.tokenizer_sha256,  # whose ids turn_tokens and reply_tokens are
            "reply_tokens": {c["id"]: r.context_tokens() for c, r in zip(candidates, replies)},
            "status": {c["id"]: "completed" if r.finish_reason == "stop" else "incomplete"
                       for c, r in zip(candidates, replies)}},
    }
    await asyncio.to_thread(state.store.add_task, task)
    return {"id": task["id"], "object": "comparison", "conversation_id": conversation_id, "candidates": candidates,
            **({"truncation_details": turn.truncation_details} if turn.truncation_details else {}),
            "usage": S.response_usage(len(turn.prompt), generation.completion_tokens, generation.cached_tokens)}


@router.post("/comparisons/{comparison_id}/ranking")
async def rank_comparison(comparison_id: str, body: RankingRequest, request: Request, owner: str = Depends(caller)):
    state = server_state(request)
    task = state.store.get_task(comparison_id)
    if task is None or task["kind"] != "compare" or task["owner"] != owner:
        raise not_found("Comparison", comparison_id)
    check_ranking(body.ranking, [c["id"] for c in task["candidates"]])
    p, best = task["params"], body.ranking[0]
    text = next(c["text"] for c in task["candidates"] if c["id"] == best)
    reply = S.message_item(best, "assistant", text, status=p["status"][best])
    opening = p["generation_prompt"] if "generation_prompt" in p else [p["assistant_id"]]  # (tasks stored before)
    items = list(zip(p["input_items"], p["turn_tokens"])) + [(reply, opening + p["reply_tokens"][best])]
    others = [(S.message_item(c["id"], "assistant", c["text"], status=p["status"][c["id"]]),
               opening + p["reply_tokens"][c["id"]]) for c in task["candidates"] if c["id"] != best]
    try:
        await asyncio.to_thread(state.store.commit_comparison, owner, task, labeller_of(request, owner),
                                body.ranking, items, p.get("tokenizer"), others)
    except KeyError:
        raise APIError(404, f"The conversation of this comparison ({task['conversation_id']}) was deleted, so the "
                            f"ranking cannot continue it. Nothing was stored.", code="conversation_deleted") from None
    except StoreError as e:
        raise APIError(409, f"{e}. Nothing was stored.", code="conflict") from None
    return {"id": comparison_id, "object": "comparison.ranking", "conversation_id": task["conversation_id"],
            "ranking": body.ranking, "items": [item for item, _ in items]}


@router.post("/conversations/{conversation_id}/items/{item_id}/ranking")
async def rank_replies(conversation_id: str, item_id: str, body: RankingRequest, request: Request,
                       owner: str = Depends(caller)):
    """Rank the replies that follow one item (regenerated or compared siblings), best first: a ranking like the
    labelling queue's, kept per labeller (a later ranking by the same labeller replaces theirs)."""
    state = server_state(request)
    owned_conversation(state, owner, conversation_id)
    items = state.store.items_with_tokens(conversation_id, leaf=item_id)
    if not items or items[-1][0]["id"] != item_id:
        raise APIError(404, f"Item with id '{item_id}' not found in conversation '{conversation_id}'.",
                       param="item_id", code="not_found")
    if len(set(body.ranking)) != len(body.ranking):
        raise APIError(400, "ranking lists an id twice", param="ranking")
    prompt = conversation_messages(items)
    if not prompt or prompt[-1]["role"] != "user":
        raise APIError(400, "the replies ranked must follow a user message", param="item_id")
    try:
        task_id = await asyncio.to_thread(state.store.rank_siblings, owner, conversation_id, item_id,
                                          labeller_of(request, owner), body.ranking, prompt,
                                          lambda: S.new_id("sib_"))
    except KeyError as e:
        raise APIError(400, f"ranking: {e.args[0]} is not a reply to item '{item_id}'", param="ranking") from None
    return {"id": task_id, "object": "conversation.ranking", "conversation_id": conversation_id,
            "item_id": item_id, "ranking": body.ranking}


# -- the labelling queue -------------------------------------------------------------------------------------


async def with_candidates(state: ServerState, locks: dict, task: dict) -> dict:
    """The task with its candidates, sampling them first if nobody has (once: concurrent requests wait)."""
    if task["candidates"] is not None:
        return task
    lock = locks.setdefault(task["id"], asyncio.Lock())
    async with lock:
        task = state.store.get_task(task["id"])
        if task["candidates"] is None:
            p, tok = task["params"], state.tokenizer
            prompt = tok.chat_format.render_prompt(task["prompt"])
            room = min(state.context - len(prompt), state.max_tokens_limit, p["max_tokens"])
            candidates = []  # a prompt that leaves no room for a reply stays unrankable and is skipped
            if room >= 1:
                params = SamplingParams(max_new_tokens=room, temperature=p["temperature"],
                                        stop_token_ids=tok.chat_format.reply_stop_ids)
                _, replies = await generate_replies(state, prompt, params, p["k"], None, [])
                candidates = [{"id": S.new_id("cand_"), "text": r.text} for r in replies]
            task = await asyncio.to_thread(state.store.set_candidates, task["id"], candidates)
    locks.pop(task["id"], None)
    return task


@router.get("/label/next")
async def next_task(request: Request, owner: str = Depends(labeller_key)):
    state, who = server_state(request), labeller_of(request, owner)
    locks = request.app.state.label_locks
    while True:
        task = state.store.next_label_task(who)
        if task is None:
            return {"object": "label.task", "task": None}
        task = await with_candidates(state, locks, task)
        if task["candidates"]:
            break
    candidates = list(task["candidates"])
    random.Random(f"{task['id']}:{who}").shuffle(candidates)  # no labeller sees the first sample always first
    return {"object": "label.task", "task": {
        "id": task["id"], "prompt": task["prompt"][-1]["content"], "messages": task["prompt"],
        "candidates": candidates}}


@router.post("/label/tasks/{task_id}/ranking")
async def rank_task(task_id: str, body: RankingRequest, request: Request, owner: str = Depends(labeller_key)):
    state, who = server_state(request), labeller_of(request, owner)
    task = state.store.get_task(task_id)
    if task is None or task["kind"] != "label":
        raise not_found("Labelling task", task_id)
    if not task["candidates"]:
        raise APIError(409, "this task has no candidates yet: take it from GET /v1/label/next first", code="conflict")
    check_ranking(body.ranking, [c["id"] for c in task["candidates"]])
    await asyncio.to_thread(state.store.add_ranking, task_id, who, body.ranking)
    return {"object": "label.ranking", "task_id": task_id, "labeller": who, "ranking": body.ranking}


@router.get("/label/stats")
async def label_stats(request: Request, owner: str = Depends(labeller_key)):
    state, who = server_state(request), labeller_of(request, owner)
    rankings = state.store.rankings("label")
    by_task: dict[str, list[list[str]]] = {}
    for r in rankings:
        by_task.setdefault(r["task_id"], []).append(r["ranking"])
    value, measured = agreement(by_task)
    return {"object": "label.stats", "tasks": state.store.task_count("label"), "rankings": len(rankings),
            "labellers": len({r["labeller"] for r in rankings}), "mine": sum(r["labeller"] == who for r in rankings),
            "agreement": value, "agreement_tasks": measured, "agreement_method": "mean pairwise agreement"}


# -- admin -------------------------------------------------------------------------------------------------


def _load_reward_model(path: str, state: ServerState):
    from palmchat.checkpoint.heads import load_reward_model

    model, _ = load_reward_model(path, eot_id=state.tokenizer.chat_format.eot_id, tokenizer=state.tokenizer)
    model.eval().requires_grad_(False)
    vocab = state.scheduler.config.vocab_size
    if model.config.vocab_size != vocab:
        raise ValueError(f"{path}: vocabulary of {model.config.vocab_size} tokens, but the policy's has {vocab}")
    return model


def _load_policy(path: str, state: ServerState):
    from palmchat import checkpoint

    model, _, _ = checkpoint.load_model(path)  # an adapter folder: its base with the adapter merged in
    model.eval().requires_grad_(False)
    vocab = state.scheduler.config.vocab_size
    if model.config.vocab_size != vocab:
        raise ValueError(f"{path}: vocabulary of {model.config.vocab_size} tokens, but the served policy's has {vocab}")
    return model


def _swap_policy(state: ServerState, model) -> None:
    """Serve `model` from a new scheduler (same settings, an empty prefix cache: its K/V came from the old
    weights). New requests go to it at once; the old scheduler finishes the requests it holds, then stops."""
    import threading

    from palmchat.inference.scheduler import Scheduler

    old = state.scheduler
    new = Scheduler(model, dtype=old.engine.dtype, max_batch=old.max_batch,
                    prefix_cache_tokens=old.prefix_cache.max_tokens, prefill_chunk=old.prefill_chunk).start()
    state.scheduler = new

    def drain():
        while True:
            stats = old.stats()
            if not stats["running"] and not stats["waiting"]:
                break
            time.sleep(0.05)
        old.stop()

    threading.Thread(target=drain, name="palmchat-drain-old-policy", daemon=True).start()


@router.post("/admin/reload")
async def reload_reward_model(body: ReloadRequest, request: Request, owner: str = Depends(admin_key)):
    """Swap the reward model (best-of-n) and/or the policy for other checkpoints without a restart. Needs an admin
    key (`palmchat keys create --role admin`); a server started with --no-auth lets its one local caller."""
    state = server_state(request)
    if body.reward_model is None and body.policy is None:
        raise APIError(400, "name a reward_model, a policy, or both", param="reward_model")
    out = {"object": "admin.reload"}
    model = policy = None
    try:
        if body.reward_model is not None:
            model = await asyncio.to_thread(_load_reward_model, body.reward_model, state)
        if body.policy is not None:
            policy = await asyncio.to_thread(_load_policy, body.policy, state)
    except Exception as e:  # noqa: BLE001 - any file an admin names: a missing folder, another shape, a bad file
        param = "reward_model" if model is None and body.reward_model is not None else "policy"
        name = body.reward_model if param == "reward_model" else body.policy
        raise APIError(400, f"{param}: could not load {name!r}: {e}", param=param) from None
    if model is not None:  # nothing is swapped unless everything named loaded
        out.update(reward_model=body.reward_model, previous=state.reward_model_path or None)
        state.reward_model, state.reward_model_path = model, body.reward_model
    if policy is not None:
        out.update(policy=body.policy, previous_policy=getattr(state, "policy_path", None))
        _swap_policy(state, policy)
        state.policy_path = body.policy
        # LoRA adapters were trained on the old weights: the new policy serves none until loaded for it
        state.adapters, state.base_path = {}, body.policy
    return out
