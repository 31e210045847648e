"""RM vs verifier on the SFT model's own samples (held-out prompts): python rmdiag.py SEED RM_PATH...
Pairwise agreement with the verifier, split into pairs that differ in correctness and pairs that differ only
in style."""
import itertools
import sys

import torch

from palmchat import checkpoint
from palmchat.data.world import World
from palmchat.eval import _prompt_ids, generate_replies
from palmchat.inference.best_of_n import score_completions
from palmchat.model.heads import load_reward_model

seed = int(sys.argv[1])
run = f"runs/bench_alignment/seed{seed}"
world = World(seed=seed)
prompts = world.prompts(300, "heldout")
sft, _, _ = checkpoint.load_model(f"{run}/sft")
tok = checkpoint.load_tokenizer(f"{run}/sft")
samples = [generate_replies(sft.eval(), tok, prompts, seed=99 + j, dtype=torch.bfloat16) for j in range(4)]
ids = _prompt_ids(tok, prompts)
for path in sys.argv[2:]:
    rm, _ = load_reward_model(path)
    scores = [score_completions(rm.eval(), ids, [r.tokens for r in s], tok.eot_id, batch_size=100) for s in samples]
    stats = {"correctness": [0, 0], "style": [0, 0]}
    for i, p in enumerate(prompts):
        v = [world.verify(p, s[i].text) for s in samples]
        for a, b in itertools.combinations(range(4), 2):
            if v[a].score != v[b].score:
                kind = "correctness" if v[a].correct != v[b].correct else "style"
                stats[kind][0] += (scores[a][i] > scores[b][i]) == (v[a].score > v[b].score)
                stats[kind][1] += 1
    print(path, {k: f"{good / max(n, 1):.3f} of {n}" for k, (good, n) in stats.items()})
