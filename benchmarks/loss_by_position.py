"""Held-out loss by position of a pretraining run's checkpoints, on windows of the model's whole context: does
the model use the positions it holds? (Why the demo pretrains its last steps on whole contexts: docs/decisions.md.)

    .venv/bin/python benchmarks/loss_by_position.py runs/demo/pretrain/step-001000 runs/demo/pretrain/step-001100

Each checkpoint of a `palmchat pretrain` run is read with the token shards in the run's folder (`data/val.bin`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from palmchat import checkpoint
from palmchat.data.shards import PackedBatches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint folders of one pretraining run")
    parser.add_argument("--windows", type=int, default=20, help="held-out windows averaged per position")
    parser.add_argument("--buckets", type=int, default=8, help="position ranges to print")
    args = parser.parse_args()
    for path in args.checkpoints:
        model, config, _ = checkpoint.load_model(path)
        context = model.config.max_seq_len
        val = PackedBatches(Path(checkpoint.resolve(path)).parent / "data" / "val.bin", context, 4)
        with torch.no_grad():
            losses = torch.cat([torch.nn.functional.cross_entropy(model.eval()(x).float().transpose(1, 2), y,
                                                                  reduction="none")
                                for x, y in val.iter_eval_batches(args.windows // 4)]).mean(0)
        size = context // args.buckets
        print(f"{path} (step {config['step']}):",
              "  ".join(f"{a}-{a + size}: {losses[a:a + size].mean():.3f}" for a in range(0, context, size)))


if __name__ == "__main__":
    main()
