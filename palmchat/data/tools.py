"""`palmchat data inspect FILE` and `palmchat data convert FILE --to sft|rankings|pairs|prompts|kto --out OUT`.

    palmchat data inspect 2023-04-12_oasst_ready.trees.jsonl          # what each stage would get, what is dropped
    palmchat data convert hh/train.jsonl --to pairs --out pairs.jsonl  # palmchat's own JSONL, for any stage
    palmchat data convert oasst.parquet --to rankings --lang en --split val --out val_rankings.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from palmchat.data.formats import FORMAT_NAMES, Examples, FormatArgs, OasstFilters, read_examples, report_lines
from palmchat.utils.args import arg
from palmchat.utils.jsonl import write_jsonl

__all__ = ["DataInspectArgs", "DataConvertArgs", "inspect_text", "inspect_main", "convert_records", "convert_main"]

TARGETS = ("sft", "rankings", "pairs", "prompts", "kto")
SHOWN_ROWS = 5  # row numbers listed per drop reason


@dataclass
class DataInspectArgs(FormatArgs):
    """Show a data file's detected format, what each stage would get from it, and what is dropped and why."""

    file: str = arg("", "a JSONL, JSON or Parquet file, or a Hugging Face datasets folder", positional=True)
    split: str = arg("all", "Open-Assistant: every tree, or the trees of one side of the split by tree (a stage "
                            "with the same --val-fraction and --seed holds out the same trees)",
                     choices=["all", "train", "val"])
    val_fraction: float = arg(0.05, "Open-Assistant: the share of trees in the val split")
    seed: int = arg(0, "Open-Assistant: the seed of the split by tree")


@dataclass
class DataConvertArgs(DataInspectArgs):
    """Convert a data file of any format to palmchat's own JSONL for one stage."""

    to: str = arg("", "what to write: sft (conversations), rankings (K-wise), pairs (every better/worse pair of "
                      "each ranking), prompts, kto (unpaired)", choices=list(TARGETS))
    out: str = arg("", "output JSONL file (written atomically)")


def _oasst_filters(args: DataInspectArgs) -> OasstFilters:
    return args.oasst_filters("" if args.split == "all" else args.split, args.val_fraction, args.seed)


def inspect_text(examples: Examples, path: str) -> str:
    """The report `palmchat data inspect` prints."""
    sizes = sorted({len(r.responses) for r in examples.rankings})
    k = f" (K = {sizes[0]}{'..' + str(sizes[-1]) if len(sizes) > 1 else ''})" if sizes else ""
    pairs = sum(len(r.responses) * (len(r.responses) - 1) // 2 for r in examples.rankings)
    lines = [f"{path}: {FORMAT_NAMES[examples.format]} (format {examples.format}), {examples.rows} rows",
             f"  sft conversations    {len(examples.conversations):>7}   palmchat sft",
             f"  rankings             {len(examples.rankings):>7}   palmchat reward, dpo{k}",
             f"  pairs                {pairs:>7}   every better/worse pair of the rankings",
             f"  prompts              {len(examples.prompts):>7}   palmchat ppo, grpo, rloo",
             f"  kto examples         {len(examples.unpaired):>7}   palmchat kto"]
    if not examples.dropped:
        lines.append("dropped: nothing")
    return "\n".join(lines + report_lines(examples, SHOWN_ROWS))


def inspect_main(args: DataInspectArgs) -> Examples:
    examples = read_examples(args.file, args.format, strict=False, oasst=_oasst_filters(args))
    print(inspect_text(examples, args.file))
    return examples


def _prompt_field(messages: list[dict]) -> str | list[dict]:
    """A single user message is written as its text, a conversation as messages."""
    return messages[0]["content"] if len(messages) == 1 and messages[0]["role"] == "user" else messages


def convert_records(examples: Examples, to: str) -> list[dict]:
    """palmchat's own records for one stage (what `palmchat data convert --to` writes)."""
    if to == "sft":
        return [{"messages": c} for c in examples.conversations]
    if to == "rankings":
        return [{"prompt": _prompt_field(r.prompt_messages), "responses": r.responses,
                 "ranking": list(range(len(r.responses)))} for r in examples.rankings]
    if to == "pairs":
        return [{"prompt": _prompt_field(r.prompt_messages), "chosen": better, "rejected": worse}
                for r in examples.rankings for i, better in enumerate(r.responses) for worse in r.responses[i + 1:]]
    if to == "prompts":
        return [{"prompt": _prompt_field(p)} for p in examples.prompts]
    if to == "kto":
        return [{"prompt": _prompt_field(u.prompt_messages), "completion": u.completion, "label": u.desirable}
                for u in examples.unpaired]
    raise ValueError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")


def convert_main(args: DataConvertArgs) -> Path:
    """Read strictly (the first malformed row is an error naming it), write ``--out`` atomically."""
    if not args.to:
        raise ValueError(f"--to is required: one of {', '.join(TARGETS)}")
    if not args.out:
        raise ValueError("--out is required")
    examples = read_examples(args.file, args.format, strict=True, oasst=_oasst_filters(args))
    records = convert_records(examples, args.to)
    if not records:
        raise ValueError(f"{args.file}: this {examples.format} file gives no {args.to} records")
    out = write_jsonl(args.out, records)
    dropped = sum(len(rows) for rows in examples.dropped.values())
    print(f"wrote {len(records)} {args.to} records from {examples.rows} {examples.format} rows to {out}"
          + (f" ({dropped} dropped: palmchat data inspect says why)" if dropped else ""))
    return out
