"""Second round of on-policy rankings: the seed's PPO policy's replies, ranked by the simulated labellers.
python iterate.py SEED OUT -> OUT/rankings.jsonl = bundled + SFT-sample rankings + PPO-sample rankings."""
import json
import sys
from pathlib import Path

import torch

from palmchat import checkpoint
from palmchat.loop import rank_policy_samples
from palmchat.train.rollout import load_prompt_texts

seed, out = int(sys.argv[1]), Path(sys.argv[2])
run = Path(f"runs/bench_alignment/seed{seed}")
model, _, _ = checkpoint.load_model(run / "ppo")
tok = checkpoint.load_tokenizer(run / "sft")
prompts = load_prompt_texts([str(run / "data/prompts_train.jsonl")], seed)[1000:2000]  # not the SFT round's
records = rank_policy_samples(model.eval(), tok, prompts, k=4, seed=seed + 100, dtype=torch.bfloat16)
out.mkdir(parents=True, exist_ok=True)
with open(out / "rankings.jsonl", "w") as f:
    for name in ("rankings.jsonl", "sft_rankings.jsonl"):
        f.write((run / "data" / name).read_text())
    f.writelines(json.dumps(r) + "\n" for r in records)
print(len(records), "PPO-sample rankings")
