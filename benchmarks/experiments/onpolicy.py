"""On-policy rankings (InstructGPT: labellers rank the SFT model's own samples):
python onpolicy.py SEED N K OUT  -> OUT/rankings.jsonl = bundled rankings + N prompts x K SFT samples ranked by
the simulated labeller (World.rank: verifier score + N(0, DEFAULT_NOISE))."""
import json
import random
import sys
import time
from pathlib import Path

import torch

from palmchat import checkpoint
from palmchat.data.world import World
from palmchat.eval import generate_replies
from palmchat.train.rollout import load_prompt_texts

seed, n, k, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
run = Path(f"runs/bench_alignment/seed{seed}")
world = World(seed=seed)
prompts = load_prompt_texts([str(run / "data/prompts_train.jsonl")], seed)
rng = random.Random(seed * 31 + 7)
prompts = rng.sample(prompts, n) if n <= len(prompts) else [rng.choice(prompts) for _ in range(n)]
sft, _, _ = checkpoint.load_model(run / "sft")
tok = checkpoint.load_tokenizer(run / "sft")
t0 = time.time()
samples = [generate_replies(sft.eval(), tok, prompts, temperature=1.0, seed=seed * 1000 + j, dtype=torch.bfloat16)
           for j in range(k)]
print(f"sampled {n}x{k} in {time.time() - t0:.0f}s")
records = []
for i, prompt in enumerate(prompts):
    responses = list(dict.fromkeys(replies[i].text for replies in samples))
    if len(responses) >= 2:
        records.append({"prompt": prompt, "responses": responses, "ranking": world.rank(prompt, responses, rng)})
out.mkdir(parents=True, exist_ok=True)
with open(out / "rankings.jsonl", "w") as f:
    f.write((run / "data/rankings.jsonl").read_text())
    f.writelines(json.dumps(r) + "\n" for r in records)
print(f"{len(records)} on-policy rankings")
