"""`make demo`: the whole pipeline on the bundled assistant world, on a laptop CPU.

Each step calls the same stage function a user would call from the command line, with small settings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from palmchat.args import arg


@dataclass
class DemoArgs:
    """Run the pipeline end to end on the bundled data."""

    out: str = arg("runs/demo", "output folder")
    quick: bool = arg(False, "tiny settings for tests (seconds instead of minutes)")
    seed: int = arg(0, "random seed")
    pretrain_steps: int = arg(700, "pretraining steps")
    fresh: bool = arg(True, "delete earlier outputs in --out first")


def main(args: DemoArgs) -> None:
    import shutil

    from palmchat import checkpoint
    from palmchat.data.world import write_bundle
    from palmchat.inference.engine import Engine, SamplingParams
    from palmchat.train.pretrain import PretrainArgs
    from palmchat.train.pretrain import main as pretrain

    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    print(f"[1/2] bundled assistant world -> {out / 'data'}")
    write_bundle(out / "data", seed=args.seed)

    print("[2/2] tokenizer + pretraining")
    steps = 30 if args.quick else args.pretrain_steps
    pretrain(PretrainArgs(out=str(out / "pretrain"), preset="tiny" if args.quick else "mini",
                          data=[str(out / "data" / "pretrain.txt")], max_steps=steps,
                          vocab_size=512 if args.quick else 2048, seq_len=128 if args.quick else 256,
                          eval_every=max(10, steps // 8), save_every=max(10, steps // 4), warmup_steps=min(50, steps // 5),
                          seed=args.seed))

    model, _, ckpt = checkpoint.load_model(out / "pretrain")
    tokenizer = checkpoint.load_tokenizer(ckpt)
    engine = Engine(model.eval())
    print("\nsamples from the pretrained model (greedy):")
    for text in ["Zorbo lives in", "12 plus 7 is", "The sorted list is"][: 1 if args.quick else 3]:
        ids = [tokenizer.bos_id] + tokenizer.encode(text)
        c = engine.generate([ids], SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=(tokenizer.bos_id,)))[0]
        print(f"  {text!r} -> {tokenizer.decode(c.tokens)!r}")
    print(f"\ndemo finished in {(time.time() - started) / 60:.1f} min. outputs:")
    print(f"  data:        {out / 'data'}")
    print(f"  checkpoint:  {ckpt}")
    print(f"  metrics:     {out / 'pretrain' / 'metrics.jsonl'}  plot: {out / 'pretrain' / 'loss.png'}")
    print(f"  try:         palmchat generate {out / 'pretrain'} --prompt 'Zorbo lives in'")
