"""Do PPO, DPO, GRPO, RLOO and KTO beat SFT on held-out prompts by more than the seed-to-seed spread?

Runs the demo pipeline (data -> pretrain -> SFT -> reward -> PPO, DPO, GRPO, RLOO, KTO -> evaluation) once per
training seed on one bundled world (`--world-seed`: the same people, tasks, data and held-out prompts for every seed,
so the spread is the training's, as a benchmark's seeds are; `--world-seed -1` draws a world per seed as well),
plus the demo's PPO with the verifier as reward instead of the reward model (`ppo_verifier`), and prints, per
stage, the mean and spread (min..max, std) of the held-out verifier score and of the gain over SFT. Not a
test: it took 12-16 minutes per seed on 2 CPU cores with AMX before RLOO and KTO joined the demo, and much longer
on an AVX2-only CPU (less when earlier stages can be reused: pretraining is). The reward
model's held-out pairwise accuracy is printed beside its ceiling: how often two simulated labellers agree.

    .venv/bin/python benchmarks/bench_alignment.py --seeds 0 1 2 --out runs/bench_alignment
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from palmchat.demo import DemoArgs, run_pipeline  # noqa: E402


def ppo_with_verifier(out: Path, seed: int, results: dict) -> dict:
    """The demo's PPO (same settings, same SFT start) with the verifier as its reward instead of the reward
    model: separates what PPO does from what the learned reward model lets it do."""
    import torch

    from palmchat import checkpoint
    from palmchat.eval.policy import evaluate_policy
    from palmchat.train.ppo import PPOArgs
    from palmchat.train.ppo import main as ppo
    from palmchat.world.synthetic import World

    saved = out / "ppo_verifier.json"
    if saved.exists():
        return json.loads(saved.read_text())
    settings = results["settings"]
    sft_ckpt = settings["checkpoints"]["sft"]
    ckpt = ppo(PPOArgs(base=sft_ckpt, reward="verifier", prompts=[str(out / "data" / "prompts_train.jsonl")],
                       out=str(out / "ppo_verifier"), iterations=settings["ppo_iterations"],
                       kl_coef=settings["ppo_kl_coef"], seed=seed))
    world = World(seed=settings["world_seed"])
    sft_model, _, _ = checkpoint.load_model(sft_ckpt)
    model, _, _ = checkpoint.load_model(ckpt)
    with torch.no_grad():
        metrics = evaluate_policy(model.eval(), checkpoint.load_tokenizer(sft_ckpt), world,
                                  world.prompts(settings["eval_prompts"], "heldout") * settings["eval_samples"],
                                  reference=sft_model.eval(), baseline_scores=results["stages"]["sft"]["scores"],
                                  seed=settings["world_seed"])
    saved.write_text(json.dumps(metrics))
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--world-seed", type=int, default=0, help="the bundled world every seed trains and is "
                        "evaluated on; -1: each seed its own world")
    parser.add_argument("--eval-samples", type=int, default=4, help="replies sampled per held-out prompt: with "
                        "one, the sampler's noise alone spreads one model's score over ~0.04 (benchmarks/README.md)")
    parser.add_argument("--out", default="runs/bench_alignment")
    parser.add_argument("--quick", action="store_true", help="toy settings (checks the script runs)")
    args = parser.parse_args()

    per_seed = {}
    for seed in args.seeds:
        world = seed if args.world_seed < 0 else args.world_seed
        out = Path(args.out) / f"world{world}-seed{seed}"
        if (out / "results.json").exists():  # resume a partly finished benchmark
            per_seed[seed] = json.loads((out / "results.json").read_text())
        else:  # fresh=False: stages already trained in the seed's folder with the same arguments are reused
            per_seed[seed] = run_pipeline(DemoArgs(out=str(out), seed=seed, world_seed=args.world_seed,
                                                    eval_samples=args.eval_samples, quick=args.quick,
                                                    fresh=False))["results"]
        per_seed[seed]["stages"]["ppo_verifier"] = ppo_with_verifier(out, seed, per_seed[seed])

    aligned = [s for s in ("ppo", "dpo", "rpo", "grpo", "rloo", "kto") if s in per_seed[args.seeds[0]]["stages"]]
    stages = ["sft", *aligned, "ppo_verifier"]
    worlds = sorted({per_seed[s]["settings"].get("world_seed", s) for s in args.seeds})
    print(f"\nheld-out verifier score over seeds {args.seeds}, world(s) {worlds} (mean, std, min..max)")
    print(f"{'stage':12} {'score':>24} {'gain over SFT':>28} {'win rate vs SFT':>16} {'KL':>8}")
    summary = {}
    for stage in stages:
        scores = [per_seed[s]["stages"][stage]["score"] for s in args.seeds]
        gains = [per_seed[s]["stages"][stage]["score"] - per_seed[s]["stages"]["sft"]["score"] for s in args.seeds]
        wins = [per_seed[s]["stages"][stage]["win_rate"] for s in args.seeds]
        kls = [per_seed[s]["stages"][stage].get("kl") or 0.0 for s in args.seeds]
        sd = statistics.pstdev
        summary[stage] = dict(score=statistics.mean(scores), score_std=sd(scores), gain=statistics.mean(gains),
                              gain_min=min(gains), gain_std=sd(gains), sft_spread=max(scores) - min(scores))
        print(f"{stage:12} {statistics.mean(scores):8.3f} ±{sd(scores):.3f} ({min(scores):.3f}..{max(scores):.3f})"
              f" {statistics.mean(gains):+9.3f} ±{sd(gains):.3f} ({min(gains):+.3f}..{max(gains):+.3f})"
              f" {statistics.mean(wins):16.3f} {statistics.mean(kls):8.3f}")
    sft_scores = [per_seed[s]["stages"]["sft"]["score"] for s in args.seeds]
    spread = max(sft_scores) - min(sft_scores)
    print(f"\nSFT seed-to-seed spread (max - min): {spread:.3f}")
    for stage in stages[1:]:
        g = summary[stage]
        verdict = "yes" if g["gain_min"] > spread else "no"
        print(f"{stage}: smallest gain over SFT {g['gain_min']:+.3f} > SFT spread {spread:.3f}? {verdict}")
    with_tools = [s for s in stages if all("tool_use" in per_seed[seed]["stages"].get(s, {}) for seed in args.seeds)]
    if with_tools:
        print("\ntool use on held-out tool questions (mean over seeds): right call / right answer / both")
        for stage in with_tools:
            means = [statistics.mean(per_seed[seed]["stages"][stage]["tool_use"][k] for seed in args.seeds)
                     for k in ("right_call", "right_answer", "both")]
            print(f"{stage:12} {means[0]:.3f} / {means[1]:.3f} / {means[2]:.3f}")
    rm = [per_seed[s]["reward_model"]["pairwise_accuracy"] for s in args.seeds]
    ceiling = [per_seed[s]["reward_model"].get("labeller_agreement", float("nan")) for s in args.seeds]
    print(f"reward model held-out pairwise accuracy: {statistics.mean(rm):.3f} (min {min(rm):.3f}); ceiling (two "
          f"simulated labellers agree on the same pairs): {statistics.mean(ceiling):.3f}")
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
