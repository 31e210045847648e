"""RM vs verifier on the SFT model's own samples (held-out prompts): python rmdiag.py SEED RM_PATH..."""
import itertools, sys, torch
from palmchat import checkpoint
from palmchat.data.world import World
from palmchat.eval import generate_replies, _prompt_ids
from palmchat.model.heads import load_reward_model
from palmchat.inference.best_of_n import score_completions
seed = int(sys.argv[1]); run = f"runs/bench_alignment/seed{seed}"
world = World(seed=seed); prompts = world.prompts(300, "heldout")
sft, _, _ = checkpoint.load_model(f"{run}/sft"); sft.eval(); tok = checkpoint.load_tokenizer(f"{run}/sft")
samples = [generate_replies(sft, tok, prompts, seed=99 + j, dtype=torch.bfloat16) for j in range(4)]
ids = _prompt_ids(tok, prompts)
for path in sys.argv[2:]:
    rm, _ = load_reward_model(path); rm.eval()
    scores = [score_completions(rm, ids, [r.tokens for r in s], tok.eot_id, batch_size=100) for s in samples]
    stats = {"correctness": [0, 0], "style": [0, 0]}
    for i, p in enumerate(prompts):
        v = [world.verify(p, s[i].text) for s in samples]
        for a, b in itertools.combinations(range(4), 2):
            if v[a].score == v[b].score: continue
            kind = "correctness" if v[a].correct != v[b].correct else "style"
            good = (scores[a][i] > scores[b][i]) == (v[a].score > v[b].score)
            stats[kind][0] += good; stats[kind][1] += 1
    print(path, {k: f"{g / max(n, 1):.3f} of {n}" for k, (g, n) in stats.items()})
