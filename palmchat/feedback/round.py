"""`palmchat loop`: one round of the human-feedback loop, end to end, against a running server.

    palmchat loop --db palmchat.db --base runs/sft --reward-model runs/reward --out runs/loop \\
        --server http://127.0.0.1:8000   # an admin key in $PALMCHAT_API_KEY, or --api-key-file FILE

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
   needs an admin key unless the server runs with --no-auth: `palmchat keys create --role admin`; the key is read
   from an environment variable or a file, never from the command line, where `ps` shows it). The served reward model
   is the one best-of-n uses (`model: "NAME:best-of-8"`).
6. **The policy too** (unless --no-train-policy): candidate LoRA adapters on the served policy's base (--policy,
   default --base): DPO on the training rankings (palmchat.train.dpo) and KTO on the thumbs up/down whose prompt
   is not held out (palmchat.train.kto; skipped without both labels). Each candidate and the current policy (the
   adapter OUT/policy_champion names, else the base itself) are measured on the held-out rankings by preference
   accuracy: the fraction of pairs whose better response has the larger implicit reward
   log pi(y|x) - log pi_base(y|x) (ties half: the base scores 0.5). The best candidate is promoted only if it beats
   the current policy by more than --min-gain; OUT/policy_champion then names it and with --server the running
   server serves it under the same model id (POST /v1/admin/reload with "policy").

Both outcomes, promoted or kept, are written to the round's report.md and round.json.

The demo's stand-in for people (labellers simulated with the bundled world's verifier) is simulated.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from palmchat.eval.reward import pairwise_accuracy
from palmchat.utils.args import arg
from palmchat.utils.http import http_json


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
    api_key_env: str = arg("PALMCHAT_API_KEY", "environment variable holding the admin API key for --server (not "
                                               "needed under --no-auth; never on the command line, where `ps` "
                                               "shows it)")
    api_key_file: str = arg("", "file holding the admin API key for --server (its first line), instead of "
                                "--api-key-env")
    train_policy: bool = arg(True, "also improve the policy: DPO (rankings) and KTO (thumbs) LoRA adapters, "
                                   "hot-swapped in when better on the held-out rankings")
    policy: str = arg("", "the served policy's base checkpoint, which the policy adapters are trained on "
                          "(default: --base)")
    policy_lr: float = arg(5e-4, "peak learning rate of the policy adapters")
    dtype: str = arg("auto", "auto, bf16 or fp32", choices=["auto", "bf16", "fp32"])
    seed: int = arg(0, "random seed")


def admin_key(args: LoopArgs) -> str:
    """The admin key for --server: the first line of --api-key-file, else $--api-key-env ('' when unset)."""
    if args.api_key_file:
        lines = Path(args.api_key_file).read_text().splitlines()
        if not lines or not lines[0].strip():
            raise ValueError(f"--api-key-file {args.api_key_file}: the file is empty; its first line must be the key")
        return lines[0].strip()
    return os.environ.get(args.api_key_env, "")


def reload_server(url: str, reward_model: str | Path | None = None, api_key: str = "",
                  policy: str | Path | None = None) -> dict:
    """Ask a running server to swap in another reward model and/or policy (POST /v1/admin/reload)."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    body = {key: str(Path(value).resolve()) for key, value in (("reward_model", reward_model), ("policy", policy))
            if value is not None}
    return http_json("POST", url.rstrip("/") + "/v1/admin/reload", body, headers)


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


def policy_accuracy(policy: str, base: str, rankings, dtype_setting: str = "auto", batch_size: int = 8) -> float:
    """Held-out preference accuracy of a policy: the fraction of ranked pairs whose better response has the larger
    implicit reward log pi(y|x) - log pi_base(y|x), ties counted half (so the base itself scores 0.5)."""
    import torch

    from palmchat import checkpoint
    from palmchat.train.dpo import preference_accuracy, ranking_logps
    from palmchat.utils.device import autocast_dtype, pick_device

    if checkpoint.resolve(policy).resolve() == checkpoint.resolve(base).resolve():
        return 0.5
    device = pick_device("cpu")
    dtype = autocast_dtype(dtype_setting, device)
    tokenizer = checkpoint.load_tokenizer(checkpoint.resolve(base))
    correct = total = 0.0
    models = [checkpoint.load_model(path)[0].eval() for path in (policy, base)]
    with torch.no_grad():
        for i in range(0, len(rankings), batch_size):
            chunk = rankings[i:i + batch_size]
            (logps, k), (ref, _) = (ranking_logps(m, tokenizer, chunk, m.config.max_seq_len, device, dtype, False)
                                    for m in models)
            c, t = preference_accuracy(logps.float() - ref.float(), k)
            correct, total = correct + c, total + t
    return correct / total


def improve_policy(args: LoopArgs, out: Path, round_dir: Path, train_path: Path, heldout_rankings, thumbs: list[dict],
                   base: str) -> dict:
    """Step 6 of the module docstring: train the candidates, measure them and the current policy, promote the best
    only if it is better. Returns the policy part of the round's report."""
    from palmchat.train.dpo import DPOArgs
    from palmchat.train.dpo import main as train_dpo
    from palmchat.train.kto import KTOArgs
    from palmchat.train.kto import main as train_kto
    from palmchat.utils.atomic import atomic_write
    from palmchat.utils.jsonl import write_jsonl

    policy_base = args.policy or base
    champion = out / "policy_champion"
    current = champion.read_text().strip() if champion.is_file() else policy_base
    common = dict(base=policy_base, epochs=args.epochs, batch_size=args.batch_size, lr=args.policy_lr,
                  warmup_steps=2, lora_rank=args.lora_rank, dtype=args.dtype, seed=args.seed, save_every=0)
    candidates, skipped = {}, {}
    candidates["dpo"] = train_dpo(DPOArgs(data=[str(train_path)], out=str(round_dir / "dpo"), **common))
    thumbs_train = [t for t in thumbs if not is_heldout(t["prompt"], args.heldout)]
    if {t["label"] for t in thumbs_train} == {True, False}:
        path = write_jsonl(round_dir / "thumbs.jsonl", thumbs_train)
        try:
            candidates["kto"] = train_kto(KTOArgs(data=[str(path)], out=str(round_dir / "kto"), **common))
        except ValueError as e:  # e.g. the held-out example took the only thumbs down
            skipped["kto"] = str(e)
    else:
        skipped["kto"] = f"needs thumbs up and down on training prompts ({len(thumbs_train)} thumbs)"
    accuracy = {name: policy_accuracy(str(path), policy_base, heldout_rankings, args.dtype)
                for name, path in candidates.items()}
    current_accuracy = policy_accuracy(current, policy_base, heldout_rankings, args.dtype)
    best = max(accuracy, key=accuracy.get)
    promoted = accuracy[best] > current_accuracy + args.min_gain
    report = {"base": str(Path(policy_base).resolve()), "current": current, "current_accuracy": current_accuracy,
              "candidates": {name: {"path": str(Path(path).resolve()), "accuracy": accuracy[name]}
                             for name, path in candidates.items()},
              "skipped": skipped, "best": best, "promoted": promoted, "reloaded": False}
    if promoted:
        atomic_write(champion, str(Path(candidates[best]).resolve()) + "\n")
        if args.server:
            reload_server(args.server, api_key=admin_key(args), policy=candidates[best])
            report["reloaded"] = True
    return report


def write_report(path: Path, report: dict, server: str) -> None:
    """The round's report.md: both outcomes, promoted or kept."""
    from palmchat.utils.atomic import atomic_write

    def short(path: str) -> str:  # runs/loop/round-001/kto/step-000002 -> round-001/kto
        p = Path(path)
        return f"{p.parent.parent.name}/{p.parent.name}" if p.name.startswith("step-") else p.name

    def verdict(promoted: bool, reloaded: bool) -> str:
        if not promoted:
            return "**kept** the current one"
        return "**promoted**" + (f", now served by {server}" if reloaded else "")

    old = "none" if report["previous_accuracy"] is None else f"{report['previous_accuracy']:.3f}"
    lines = [f"# Feedback round {report['round']}", "",
             f"{report['rankings']} rankings: {report['train']} to train on, {report['heldout']} held out (by prompt).",
             "", "## Reward model", "",
             f"Held-out pairwise accuracy: new {report['new_accuracy']:.3f} vs current {old}: "
             f"{verdict(report['promoted'], report['reloaded'])}.", ""]
    policy = report.get("policy")
    if policy:
        lines += ["## Policy", "",
                  "Held-out preference accuracy (pairs whose better response gets the larger log pi - log pi_base; "
                  "0.5 = the base):", "", "| policy | accuracy |", "|---|---|",
                  f"| current ({short(policy['current'])}) | {policy['current_accuracy']:.3f} |"]
        lines += [f"| {name} (LoRA) | {c['accuracy']:.3f} |" for name, c in policy["candidates"].items()]
        lines += [f"| {name} | skipped: {reason} |" for name, reason in policy["skipped"].items()]
        lines += ["", f"Best candidate {policy['best']}: {verdict(policy['promoted'], policy['reloaded'])}.", ""]
    atomic_write(path, "\n".join(lines))


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
    if args.server:
        admin_key(args)  # an unreadable --api-key-file fails now, not after the training
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    champion = args.reward_model or ((out / "champion").read_text().strip() if (out / "champion").is_file() else "")
    base = args.base or (_base_of(champion) if champion else "")
    if not base:
        raise ValueError("--base (the SFT checkpoint) is required when there is no current reward model")

    store = Store(args.db)
    try:
        records = export_records(store, "rankings")
        thumbs = export_records(store, "kto")
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
            reload_server(args.server, new, admin_key(args))
            report["reloaded"] = True
    old = "none" if old_accuracy is None else f"{old_accuracy:.3f}"
    served = f", now served by {args.server}" if args.server else ""
    verdict = f"promoted{served}" if promoted else "kept the current one"
    print(f"loop round {number}: held-out pairwise accuracy new {new_accuracy:.3f} vs current {old}: {verdict}")
    if args.train_policy:
        policy = report["policy"] = improve_policy(args, out, round_dir, train_path, heldout_rankings, thumbs, base)
        served = f", now served by {args.server}" if policy["reloaded"] else ""
        verdict = f"promoted {policy['best']}{served}" if policy["promoted"] else "kept the current policy"
        scores = ", ".join(f"{name} {c['accuracy']:.3f}" for name, c in policy["candidates"].items())
        print(f"loop round {number}: policy held-out preference accuracy {scores} vs current "
              f"{policy['current_accuracy']:.3f}: {verdict}")
    atomic_write(round_dir / "round.json", json.dumps(report, indent=2))
    write_report(round_dir / "report.md", report, args.server)
    return report


if __name__ == "__main__":
    from palmchat.utils.args import parse_into

    main(parse_into(LoopArgs, sys.argv[1:], prog="palmchat loop"))
