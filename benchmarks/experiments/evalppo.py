"""Demo-identical held-out evaluation (500 prompts, seed = run seed): python evalppo.py SEED TAG CKPT"""
import json
import sys
import time

import torch

from palmchat import checkpoint
from palmchat.data.world import World
from palmchat.eval import evaluate_policy

torch.set_num_threads(1)
seed, tag, ckpt = int(sys.argv[1]), sys.argv[2], sys.argv[3]
run = f"runs/bench_alignment/seed{seed}"
world = World(seed=seed)
prompts = world.prompts(500, "heldout")
sft, _, _ = checkpoint.load_model(f"{run}/sft")
tok = checkpoint.load_tokenizer(f"{run}/sft")
base = json.loads(open(f"{run}/results.json").read())["stages"]["sft"]
model, _, _ = checkpoint.load_model(ckpt)
t0 = time.time()
r = evaluate_policy(model.eval(), tok, world, prompts, reference=sft.eval(), baseline_scores=base["scores"], seed=seed)
o = {k: (round(r[k], 4) if isinstance(r.get(k), float) else r.get(k))
     for k in ("correct", "style", "score", "kl", "length", "win_rate")}
o.update(per_task={k: round(v, 3) for k, v in r["per_task"].items()}, tag=tag, seed=seed, sft=round(base["score"], 4),
         gain=round(r["score"] - base["score"], 4), eval_s=round(time.time() - t0))
with open("runs/rmexp/results.jsonl", "a") as f:
    f.write(json.dumps(o) + "\n")
print(json.dumps(o))
