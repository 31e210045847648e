"""The demo's stand-in for people: simulated labellers that rank through the server's real HTTP API the way people
do on /label, with the bundled world's verifier plus noise standing in for judgment, and `demo_round`, which runs
queue -> labellers -> one feedback round (round.py) against a server that is already running. Demo-only: nothing
outside the demo and its tests uses this file."""

from __future__ import annotations

import random
from pathlib import Path

from palmchat.feedback.round import LoopArgs, main
from palmchat.utils.http import http_json


def simulated_labellers(url: str, labellers: int | list[str] = 3, *, api_keys: list[str] | None = None,
                        world=None, seed: int = 0, noise: float | None = None,
                        max_rankings: int | None = None) -> dict:
    """Rank the server's labelling queue through its HTTP API, as people do on /label.

    Each labeller takes GET /v1/label/next until nothing is left for them (or `max_rankings`), sorts the
    candidates by the bundled world's verifier score plus Gaussian noise (the labeller model of
    World.rank) and POSTs the ranking.
    Labellers are API keys (`api_keys`, one labeller each) or, on a server without keys, names sent in the
    X-Palmchat-Labeller header (`labellers`: a count or the names). They label one after the other.
    Returns {"rankings": total, "per_labeller": {name: count}}.
    """
    from palmchat.world.synthetic import DEFAULT_NOISE, World

    world = world or World(seed=0)
    noise = DEFAULT_NOISE if noise is None else noise
    if api_keys:
        who = [(f"key-{i}", {"authorization": f"Bearer {k}"}) for i, k in enumerate(api_keys)]
    else:
        names = [f"sim-{i}" for i in range(labellers)] if isinstance(labellers, int) else list(labellers)
        who = [(name, {"x-palmchat-labeller": name}) for name in names]
    base, counts = url.rstrip("/") + "/v1/label", {}
    for name, headers in who:
        rng, done = random.Random(f"{seed}:{name}"), 0
        while max_rankings is None or done < max_rankings:
            task = http_json("GET", base + "/next", headers=headers)["task"]
            if task is None:
                break
            candidates = task["candidates"]
            order = world.rank(task["prompt"], [c["text"] for c in candidates], rng, noise)
            ranking = [candidates[i]["id"] for i in order]
            http_json("POST", f"{base}/tasks/{task['id']}/ranking", {"ranking": ranking}, headers)
            done += 1
        counts[name] = done
    return {"rankings": sum(counts.values()), "per_labeller": counts}


def rank_policy_samples(model, tokenizer, prompts: list[str | list[dict]], k: int = 4, *, world=None, seed: int = 0,
                        noise: float | None = None, max_new_tokens: int = 48, dtype=None) -> list[dict]:
    """Rankings of the policy's own samples, offline: k replies per prompt at temperature 1, ranked by a
    simulated labeller (World.rank). InstructGPT's labellers ranked the SFT model's outputs (Ouyang et al. 2022
    §3.4), so the reward model also sees the kind of replies PPO will ask it to judge, not only curated
    candidates. A prompt is a question or a whole conversation (a message list ending with a user turn; the record's
    "prompt" is then that list). Prompts whose k replies are all the same are skipped (nothing to rank).
    dtype: the generation engine's (palmchat.eval.generate_replies)."""
    from palmchat.eval.policy import generate_replies
    from palmchat.world.synthetic import DEFAULT_NOISE, World

    world = world or World(seed=seed)
    rng = random.Random(f"policy-rankings:{seed}")
    samples = [generate_replies(model, tokenizer, prompts, temperature=1.0, max_new_tokens=max_new_tokens,
                                seed=seed * 1000 + j, dtype=dtype) for j in range(k)]
    records = []
    for i, prompt in enumerate(prompts):
        responses = list(dict.fromkeys(replies[i].text for replies in samples))
        if len(responses) >= 2:
            ranking = world.rank(prompt, responses, rng, DEFAULT_NOISE if noise is None else noise)
            records.append({"prompt": prompt, "responses": responses, "ranking": ranking})
    return records


def queue_world_prompts(db: str | Path, n: int, seed: int = 0, k: int = 4, max_tokens: int = 64,
                        split: str = "train") -> int:
    """Put n of the bundled world's prompts in a database's labelling queue; returns how many were new."""
    from palmchat.feedback.exchange import new_task_id
    from palmchat.store import Store
    from palmchat.world.synthetic import World

    prompts = [[{"role": "user", "content": p}] for p in World(seed=seed).prompts(n, split)]
    store = Store(db)
    try:
        return store.queue_prompts(prompts, {"k": k, "max_tokens": max_tokens, "temperature": 1.0}, new_task_id)
    finally:
        store.close()


def demo_round(url: str, db: str | Path, out: str | Path, base: str, reward_model: str, *, prompts: int = 40,
               labellers: int = 3, k: int = 4, max_tokens: int = 48, extra_data: list[str] | None = None,
               seed: int = 0, **loop_args) -> dict:
    """The demo's round against a running server (`url`, serving `db`): queue world prompts, let simulated
    labellers rank them over HTTP, then run `main`. Returns main's report plus the labelling counts."""
    queue_world_prompts(db, prompts, seed=seed, k=k, max_tokens=max_tokens)
    from palmchat.world.synthetic import World

    labelled = simulated_labellers(url, labellers, seed=seed, world=World(seed=seed))
    stats = http_json("GET", url.rstrip("/") + "/v1/label/stats")
    report = main(LoopArgs(db=str(db), out=str(out), base=base, reward_model=reward_model, server=url,
                           extra_data=list(extra_data or []), seed=seed, **loop_args))
    return {**report, "labelled": labelled, "agreement": stats["agreement"]}
