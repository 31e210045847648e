"""On-policy rankings (InstructGPT: labellers rank the SFT model's own samples):
python onpolicy.py SEED N K OUT  -> OUT/rankings.jsonl = bundled rankings + N prompts x K SFT samples ranked by
the simulated labeller (verifier score + N(0, DEFAULT_NOISE))."""
import json, random, sys, time
from pathlib import Path
from palmchat import checkpoint
from palmchat.data.world import World, DEFAULT_NOISE
from palmchat.eval import generate_replies
import torch

seed, n, k, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
run = Path(f"runs/bench_alignment/seed{seed}")
world = World(seed=seed)
prompts = [json.loads(l)["prompt"] for l in open(run / "data/prompts_train.jsonl")]
rng = random.Random(seed * 31 + 7)
prompts = rng.sample(prompts, min(n, len(prompts))) if n <= len(prompts) else [rng.choice(prompts) for _ in range(n)]
sft, _, _ = checkpoint.load_model(run / "sft"); sft.eval()
tok = checkpoint.load_tokenizer(run / "sft")
t0 = time.time()
samples = [generate_replies(sft, tok, prompts, temperature=1.0, seed=seed * 1000 + j, dtype=torch.bfloat16) for j in range(k)]
print(f"sampled {n}x{k} in {time.time() - t0:.0f}s")
records = []
for i, p in enumerate(prompts):
    resp = list(dict.fromkeys(s[i].text for s in samples))
    if len(resp) < 2:
        continue
    noisy = [world.verify(p, r).score + rng.gauss(0.0, DEFAULT_NOISE) for r in resp]
    records.append({"prompt": p, "responses": resp, "ranking": sorted(range(len(resp)), key=lambda j: -noisy[j])})
out.mkdir(parents=True, exist_ok=True)
with open(out / "rankings.jsonl", "w") as f:
    f.write(open(run / "data/rankings.jsonl").read())
    for r in records:
        f.write(json.dumps(r) + "\n")
print(f"{len(records)} on-policy rankings; mean verifier score {sum(world.verify(p, s[i].text).score for s in samples for i, p in enumerate(prompts)) / (n * k):.3f}")
