"""`palmchat eval`: a policy's pairwise win rate against a baseline policy, judged by any OpenAI-compatible model.

AlpacaEval's protocol (Dubois et al. 2024, https://arxiv.org/abs/2404.04475) in its plain pairwise form: both
policies answer every prompt; the judge sees the conversation and the two replies and names the better one, once
with the policy's reply first and once with it second, so that a judge's preference for a position cancels out.
A prompt scores 1 when the judge prefers the policy in both orders, 0 in neither, 0.5 when the orders disagree (or a
verdict cannot be read, counted apart); the win rate is the mean over prompts, with a 95% normal-approximation
confidence interval over prompts.

    palmchat eval runs/dpo --baseline runs/sft --prompts heldout.jsonl --judge http://127.0.0.1:8000/v1 \\
        --judge-model gpt-4o --out runs/eval-dpo.json

The judge's API key is read from the environment variable --judge-key-env (never from the command line).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from palmchat.utils.args import arg
from palmchat.utils.http import http_json

JUDGE_SYSTEM = ("You compare two replies of an AI assistant to the same conversation. Judge which reply is more "
                "helpful, correct and harmless for the user's last message. Answer with one letter: A or B.")
VERDICT = re.compile(r"\b([AB])\b")


@dataclass
class EvalArgs:
    """Pairwise win rate of a policy against a baseline, judged by an OpenAI-compatible model (both orders)."""

    policy: str = arg("", "the checkpoint (or Hugging Face model folder) to evaluate", positional=True)
    baseline: str = arg("", "the checkpoint it is compared with (usually the SFT model)")
    prompts: str = arg("", "prompts in any format `palmchat data inspect` reads")
    judge: str = arg("", "the judge's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    judge_model: str = arg("", "the judge's model name")
    judge_key_env: str = arg("OPENAI_API_KEY", "environment variable holding the judge's API key (may be unset)")
    max_prompts: int = arg(0, "evaluate the first this many prompts; 0 = all")
    max_new_tokens: int = arg(256, "reply length limit of both policies")
    temperature: float = arg(0.0, "sampling temperature of both policies; 0 = greedy")
    seed: int = arg(0, "sampling seed")
    timeout: float = arg(120.0, "seconds per judge request")
    out: str = arg("", "write the report (JSON, with every verdict) here")


def judge_messages(conversation: Sequence[dict], first: str, second: str) -> list[dict]:
    """The chat the judge answers: the conversation as a transcript, then reply A and reply B."""
    transcript = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in conversation)
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"Conversation:\n{transcript}\n\nReply A:\n{first}\n\nReply B:\n{second}\n\n"
                                        f"Which reply is better? Answer A or B."}]


def read_verdict(text: str) -> str | None:
    """"A", "B", or None when the judge's answer names neither (or both) as a standalone letter."""
    found = set(VERDICT.findall(text or ""))
    return found.pop() if len(found) == 1 else None


def win_rate(verdicts: Sequence[tuple[str | None, str | None]]) -> dict:
    """verdicts: per prompt, (the judge's verdict with the policy as A, its verdict with the policy as B).
    -> {"win_rate", "ci95", "n", "consistent", "unreadable"}: a prompt scores 1 if the policy wins both orders, 0 if
    it loses both, 0.5 otherwise (orders that disagree, or an unreadable verdict); ci95 is the half-width of the
    normal-approximation interval over prompts; consistent is the fraction of prompts whose two verdicts agree."""
    if not verdicts:
        raise ValueError("no verdicts to score")
    scores, consistent, unreadable = [], 0, 0
    for policy_first, policy_second in verdicts:
        unreadable += (policy_first is None) + (policy_second is None)
        wins = [v == want for v, want in ((policy_first, "A"), (policy_second, "B")) if v is not None]
        if len(wins) == 2 and wins[0] == wins[1]:
            consistent += 1
            scores.append(1.0 if wins[0] else 0.0)
        else:
            scores.append(0.5)
    n = len(scores)
    mean = sum(scores) / n
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) if n > 1 else 0.0
    return {"win_rate": mean, "ci95": 1.96 * std / math.sqrt(n), "n": n, "consistent": consistent / n,
            "unreadable": unreadable}


def ask_judge(url: str, model: str, messages: list[dict], api_key: str | None, timeout: float) -> str:
    """One chat completion from an OpenAI-compatible server (temperature 0, a few tokens), by plain HTTP."""
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": 8}
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        reply = http_json("POST", url.rstrip("/") + "/chat/completions", body, headers, timeout, retries=0)
        return reply["choices"][0]["message"]["content"] or ""
    except RuntimeError as e:
        raise ValueError(f"judge: {e}") from None
    except (KeyError, IndexError, TypeError, ValueError):
        raise ValueError(f"judge {url}: not an OpenAI chat completion response") from None


def main(args: EvalArgs) -> dict:
    import torch

    from palmchat import checkpoint
    from palmchat.data.chat import load_prompts
    from palmchat.eval.policy import generate_replies

    for name in ("policy", "baseline", "prompts", "judge", "judge_model"):
        if not getattr(args, name):
            raise ValueError(f"--{name.replace('_', '-')} is required")
    prompts = load_prompts(args.prompts)
    prompts = prompts[:args.max_prompts] if args.max_prompts else prompts
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompts")
    replies = {}
    for side in ("policy", "baseline"):
        model, _, ckpt = checkpoint.load_model(getattr(args, side))
        tokenizer = checkpoint.load_tokenizer(ckpt)
        replies[side] = [r.text for r in generate_replies(model.float(), tokenizer, prompts, args.temperature,
                                                          args.max_new_tokens, args.seed, dtype=torch.float32)]
        print(f"eval: {len(prompts)} replies from the {side} {ckpt}")
    api_key = os.environ.get(args.judge_key_env) or None
    rows = []
    for conversation, ours, theirs in zip(prompts, replies["policy"], replies["baseline"]):
        answers = [ask_judge(args.judge, args.judge_model, judge_messages(conversation, a, b), api_key, args.timeout)
                   for a, b in ((ours, theirs), (theirs, ours))]
        rows.append({"prompt": conversation, "policy": ours, "baseline": theirs, "judge": answers,
                     "verdicts": [read_verdict(a) for a in answers]})
    report = {"policy": args.policy, "baseline": args.baseline, "judge": args.judge, "judge_model": args.judge_model,
              **win_rate([tuple(r["verdicts"]) for r in rows]), "rows": rows}
    print(f"eval: win rate {report['win_rate']:.3f} ± {report['ci95']:.3f} over {report['n']} prompts (0.5 = even); "
          f"the two orders agree on {report['consistent']:.0%}; {report['unreadable']} unreadable verdicts")
    if args.out:
        from palmchat.utils.atomic import atomic_write

        atomic_write(args.out, json.dumps(report, indent=2) + "\n")
    return report
