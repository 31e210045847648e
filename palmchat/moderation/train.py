"""Training data, evaluation and the command that trains the moderation classifier (classifier.py), and the
default moderator trained on the bundled world."""

from __future__ import annotations

import functools
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from palmchat.moderation.classifier import Moderator, read_terms
from palmchat.utils.args import arg
from palmchat.utils.jsonl import RecordError, json_type, read_records

WORLD_TRAIN_SIZE, WORLD_HELDOUT_SIZE = 3000, 1000  # the bundled world's moderation examples

# =============================================================================================
# Data, evaluation, the default moderator
# =============================================================================================


def _parse_example(record: dict) -> dict:
    text, categories = record.get("text"), record.get("categories")
    if "text" not in record:
        raise RecordError("missing \"text\"")
    if not isinstance(text, str):
        raise RecordError(f"\"text\" must be a string, got {json_type(text)}")
    if "categories" not in record:
        raise RecordError("missing \"categories\" (an object of category name -> true/false)")
    if not isinstance(categories, dict):
        raise RecordError(f"\"categories\" must be an object of name -> true/false, got {json_type(categories)}")
    if not categories:
        raise RecordError("\"categories\" is empty")
    for name, value in categories.items():
        if not name.strip():
            raise RecordError("\"categories\" has an empty name")
        if not isinstance(value, bool):
            raise RecordError(f"\"categories\".{name} must be true or false, got {json_type(value)}")
    if "flagged" in record:
        if not isinstance(record["flagged"], bool):
            raise RecordError(f"\"flagged\" must be true or false, got {json_type(record['flagged'])}")
        if record["flagged"] != any(categories.values()):
            raise RecordError(f"\"flagged\" is {json.dumps(record['flagged'])} but "
                       f"{'some' if any(categories.values()) else 'no'} category is true")
    return {"text": text, "flagged": any(categories.values()), "categories": dict(categories)}


def load_examples(path: str | os.PathLike) -> list[dict]:
    """A moderation JSONL file -> records; DataError ``FILE:LINE: PROBLEM`` for a malformed one."""
    return read_records(path, _parse_example)


def _prf(predicted: list[bool], actual: list[bool]) -> dict:
    tp = sum(p and a for p, a in zip(predicted, actual))
    fp = sum(p and not a for p, a in zip(predicted, actual))
    fn = sum(a and not p for p, a in zip(predicted, actual))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = sum(p == a for p, a in zip(predicted, actual)) / max(1, len(actual))
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": accuracy, "support": sum(actual)}


def evaluate(moderator: Moderator, examples: Sequence[dict]) -> dict[str, dict]:
    """Precision, recall, F1, accuracy and support (positives) for "flagged" and each labelled category.
    With no positives and no false alarms, precision and recall count as 1."""
    results = moderator.moderate([e["text"] for e in examples])
    metrics = {"flagged": _prf([r.flagged for r in results], [e["flagged"] for e in examples])}
    for c in dict.fromkeys(c for e in examples for c in e["categories"]):
        metrics[c] = _prf([r.categories.get(c, False) for r in results],
                          [bool(e["categories"].get(c, False)) for e in examples])
    return metrics


def format_metrics(metrics: dict[str, dict]) -> str:
    width = max(len(k) for k in metrics)
    lines = [f"{'':{width}}  precision  recall     f1  accuracy  positives"]
    for name, m in metrics.items():
        lines.append(f"{name:{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  "
                     f"{m['accuracy']:8.3f}  {m['support']:9d}")
    return "\n".join(lines)


@functools.lru_cache(maxsize=4)
def _world_moderator(seed: int) -> Moderator:
    from palmchat.world.synthetic import World

    return Moderator.train(World(seed).moderation_examples(WORLD_TRAIN_SIZE, "train"), seed=seed)


def default_moderator(seed: int = 0) -> Moderator:
    """The moderator trained on the bundled world (train split), trained once per process and seed. Each call
    returns its own copy, so setting terms on one does not change the others."""
    return _world_moderator(seed).copy()


# =============================================================================================
# Command line
# =============================================================================================


@dataclass
class ModerationTrainArgs:
    """Train the moderation classifier served at /v1/moderations."""

    data: str = arg("", "JSONL of {'text', 'categories': {name: bool}, 'flagged'}; default: the bundled world")
    out: str = arg("runs/moderation", "output folder (moderation.safetensors + moderation.json)")
    terms: str = arg("", "term file: 'category<TAB>phrase' or 'phrase' per line; a match flags that category")
    epochs: int = arg(5, "passes over the training examples")
    heldout_fraction: float = arg(0.1, "share of --data held out for the printed metrics (the bundled world has "
                                       "its own held-out split)")
    seed: int = arg(0, "random seed (the world's seed, the held-out slice and the batch order)")


def train_main(args: ModerationTrainArgs) -> Path:
    from palmchat.world.synthetic import World

    terms = read_terms(args.terms) if args.terms else []
    if args.data:
        examples = load_examples(args.data)
        if len(examples) < 2:
            raise ValueError(f"{args.data}: need at least 2 examples (one to train on, one to measure)")
        if not 0 < args.heldout_fraction < 1:
            raise ValueError(f"--heldout-fraction must be in (0, 1), got {args.heldout_fraction}")
        random.Random(args.seed).shuffle(examples)
        n_heldout = min(len(examples) - 1, max(1, round(len(examples) * args.heldout_fraction)))
        heldout, train = examples[:n_heldout], examples[n_heldout:]
        source = args.data
    else:
        world = World(args.seed)
        train = world.moderation_examples(WORLD_TRAIN_SIZE, "train")
        heldout = world.moderation_examples(WORLD_HELDOUT_SIZE, "heldout")
        source = f"bundled world (seed {args.seed})"
    print(f"moderation: {len(train)} train / {len(heldout)} held-out examples from {source}, {len(terms)} terms")
    started = time.time()
    moderator = Moderator.train(train, terms=terms, seed=args.seed, epochs=args.epochs)
    seconds = time.time() - started
    metrics = evaluate(moderator, heldout)
    print(f"trained in {seconds:.1f} s; held-out metrics (terms applied):")
    print(format_metrics(metrics))
    moderator.training |= {"data": source, "terms_file": args.terms, "seconds": round(seconds, 2),
                           "heldout_examples": len(heldout), "heldout_metrics": metrics}
    out = moderator.save(args.out)
    print(f"moderation done: {out}")
    return out


if __name__ == "__main__":
    from palmchat.utils.args import parse_into

    train_main(parse_into(ModerationTrainArgs, prog="python -m palmchat.moderation.train"))
