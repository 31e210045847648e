"""`palmchat loop`: one round of the human-feedback loop, end to end, against a running server.

    palmchat loop --db palmchat.db --base runs/sft --reward-model runs/reward --out runs/loop \\
        --server http://127.0.0.1:8000 [--api-key ADMIN_KEY]

One round (a folder OUT/round-NNN holds everything it wrote):
1. **Export** the database's feedback as rankings (labelling queue, compare view and thumbs pairs, several
   labellers merged by Borda count: palmchat/feedback/exchange.py).
2. **Split** by prompt: a prompt is held out when a hash of it falls under --heldout, so it stays on the same
   side in every round and the held-out set only grows.
3. **Train** a reward model with palmchat.train.reward: a fresh LoRA adapter and scalar head on --base (the SFT
   checkpoint) over the training rankings plus --extra-data (e.g. the rankings the current reward model was
   trained on, so that a few dozen new rankings add to what it knew rather than replace it). Each round starts
   from --base, not from the previous reward model: `palmchat reward` starts a new head on its base, and each
   round sees all the feedback so far, so nothing is lost.
4. **Evaluate** the new reward model and the current one (the "champion": --reward-model in the first round,
   then the model OUT/champion names) by pairwise accuracy on the held-out rankings: the fraction of
   candidate pairs each orders as the people did.
5. **Promote** the new model only if it beats the champion by more than --min-gain: OUT/champion then names
   it, and with --server the running server swaps it in without a restart (POST /v1/admin/reload, which
   needs an admin key when the server has keys: `palmchat keys create --admin`). The served reward model
   is the one best-of-n uses (`model: "NAME:best-of-8"`).

The demo's stand-in for people (labellers simulated with the bundled world's verifier) is simulated.py.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from palmchat.eval.reward import pairwise_accuracy
from palmchat.utils.args import arg


@dataclass
class LoopArgs:
    """One round of the feedback loop: export rankings, retrain the reward model (LoRA), evaluate against the
    current one on held-out rankings, hot-swap it into the server if better."""

    db: str = arg("palmchat.db", "the server's database, holding the feedback")
    out: str = arg("runs/loop", "folder for the rounds (round-NNN/) and the `champion` file")
    base: str = arg("", "checkpoint the reward model is trained from (default: the one the current reward model "
                        "was trained from)")
    reward_model: str = arg("", "the current (served) reward model; default: the one OUT/champion names")
    extra_data: list[str] = arg([], "more rankings JSONL files to train on (not evaluated on)")
    heldout: float = arg(0.2, "fraction of prompts held out for the evaluation")
    min_gain: float = arg(0.0, "promote only if held-out pairwise accuracy improves by more than this")
    lora_rank: int = arg(8, "LoRA rank of the new reward model")
    epochs: float = arg(2.0, "passes over the training rankings")
    batch_size: int = arg(8, "rankings per step")
    lr: float = arg(3e-4, "peak learning rate")
    server: str = arg("", "URL of a running `palmchat serve` to hot-swap a promoted model into")
    api_key: str = arg("", "admin API key for --server (when the server has keys)")
    dtype: str = arg("auto", "auto, bf16 or fp32", choices=["auto", "bf16", "fp32"])
    seed: int = arg(0, "random seed")


# =============================================================================================
# HTTP (standard library: the loop needs no client package)
# =============================================================================================


def http_json(method: str, url: str, body: dict | None = None, headers: dict | None = None,
              timeout: float = 600, retries: int = 5) -> dict:
    """One request; an HTTP error raises RuntimeError with the server's message. A 429 (the server's rate
    limit) is retried after the time it asks for, up to `retries` times."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        if e.code == 429 and retries > 0:
            time.sleep(min(60.0, float(e.headers.get("retry-after") or 1)))
            return http_json(method, url, body, headers, timeout, retries - 1)
        try:
            message = json.loads(e.read())["error"]["message"]
        except Exception:  # noqa: BLE001 - not an OpenAI-shaped error: the status line says enough
            message = e.reason
        raise RuntimeError(f"{method} {url}: {e.code} {message}") from None
    except urllib.error.URLError as e:
        raise RuntimeError(f"{method} {url}: cannot reach the server ({e.reason})") from None


def reload_server(url: str, reward_model: str | Path, api_key: str = "") -> dict:
    """Ask a running server to swap in another reward model (POST /v1/admin/reload)."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    return http_json("POST", url.rstrip("/") + "/v1/admin/reload", {"reward_model": str(Path(reward_model).resolve())},
                     headers)


# =============================================================================================
# One round
# =============================================================================================


def is_heldout(prompt, fraction: float) -> bool:
    digest = hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()
    return int(digest[:8], 16) / 16**8 < fraction


def split_rankings(records: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held out) by prompt; at least one record is held out when there are three or more."""
    heldout = [r for r in records if is_heldout(r["prompt"], fraction)]
    if not heldout and len(records) >= 3 and fraction > 0:
        first = min(records, key=lambda r: hashlib.sha256(json.dumps(r["prompt"], sort_keys=True).encode()).digest())
        heldout = [r for r in records if r["prompt"] == first["prompt"]]
    train = [r for r in records if r not in heldout]
    return train, heldout


def _base_of(reward_model: str) -> str:
    from palmchat import checkpoint

    config = checkpoint.read_config(checkpoint.resolve(reward_model))
    base = config.get("train", {}).get("base") or config.get("base")
    if not base:
        raise ValueError(f"--base is required: {reward_model} does not record the checkpoint it was trained from")
    return base


def main(args: LoopArgs) -> dict:
    from palmchat.data.chat import load_rankings
    from palmchat.feedback.exchange import export_records
    from palmchat.store import Store
    from palmchat.train.reward import RewardArgs
    from palmchat.train.reward import main as train_reward
    from palmchat.utils.atomic import atomic_write
    from palmchat.utils.jsonl import write_jsonl

    if not Path(args.db).is_file():
        raise FileNotFoundError(f"--db: {args.db} does not exist")
    if not 0 < args.heldout < 1:
        raise ValueError("--heldout must be between 0 and 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    champion = args.reward_model or ((out / "champion").read_text().strip() if (out / "champion").is_file() else "")
    base = args.base or (_base_of(champion) if champion else "")
    if not base:
        raise ValueError("--base (the SFT checkpoint) is required when there is no current reward model")

    store = Store(args.db)
    try:
        records = export_records(store, "rankings")
    finally:
        store.close()
    train, heldout = split_rankings(records, args.heldout)
    if len(train) < 2 or not heldout:
        raise ValueError(f"{args.db} holds {len(records)} rankings; a round needs at least 3 (2 to train on, 1 held "
                         f"out). Rank more prompts on /label, or import more with palmchat feedback import")
    number = 1 + len(list(out.glob("round-*")))
    round_dir = out / f"round-{number:03d}"
    round_dir.mkdir()
    train_path = write_jsonl(round_dir / "train.jsonl", train)
    heldout_path = write_jsonl(round_dir / "heldout.jsonl", heldout)
    print(f"loop round {number}: {len(records)} rankings from {args.db}: {len(train)} to train on, "
          f"{len(heldout)} held out", flush=True)

    new = train_reward(RewardArgs(base=base, data=[str(train_path), *args.extra_data], out=str(round_dir / "reward"),
                                  epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  warmup_steps=2, lora_rank=args.lora_rank, dtype=args.dtype, seed=args.seed))
    heldout_rankings = load_rankings(heldout_path)  # what the trainers read, read the same way
    new_accuracy = pairwise_accuracy(new, heldout_rankings, args.dtype)
    old_accuracy = pairwise_accuracy(champion, heldout_rankings, args.dtype) if champion else None
    promoted = old_accuracy is None or new_accuracy > old_accuracy + args.min_gain
    report = {"round": number, "rankings": len(records), "train": len(train), "heldout": len(heldout),
              "new": str(Path(new).resolve()), "new_accuracy": new_accuracy, "previous": champion or None,
              "previous_accuracy": old_accuracy, "promoted": promoted, "reloaded": False}
    if promoted:
        atomic_write(out / "champion", str(Path(new).resolve()) + "\n")
        if args.server:
            reload_server(args.server, new, args.api_key)
            report["reloaded"] = True
    atomic_write(round_dir / "round.json", json.dumps(report, indent=2))
    old = "none" if old_accuracy is None else f"{old_accuracy:.3f}"
    served = f", now served by {args.server}" if args.server else ""
    verdict = f"promoted{served}" if promoted else "kept the current one"
    print(f"loop round {number}: held-out pairwise accuracy new {new_accuracy:.3f} vs current {old}: {verdict}")
    return report


if __name__ == "__main__":
    from palmchat.utils.args import parse_into

    main(parse_into(LoopArgs, sys.argv[1:], prog="palmchat loop"))
