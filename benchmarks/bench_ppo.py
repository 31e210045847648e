"""PPO rollout + update throughput (samples/s): palmchat's `ppo` vs palm-rlhf-pytorch's `RLHFTrainer`.

Both sides run their own, unmodified PPO loop in this one process, one after the other, on the same shape
(the `small` preset: dim 512, depth 8, 8 heads of 64, multi-query, vocab 4096, random weights):

- palmchat: `palmchat.train.ppo.main` on a random policy checkpoint and a random reward-model checkpoint
  written to a temporary folder (with a BPE tokenizer trained on generated text). Times come from its
  metrics.jsonl: `rollout_s` (KV-cached batched sampling + reward + old/ref log-probs + values + GAE) and
  `iteration_s`; update = iteration - rollout.
- palm-rlhf-pytorch: `RLHFTrainer.train` (sampling one prompt at a time, no KV cache; the critic and reward
  forwards per sample), with its `learn` wrapped only to record when each update starts and ends.
  Rollout = time between updates, update = time inside `learn`.

palmchat runs twice (`--critic both`): with a separate critic backbone (`--critic separate`, the layout the
reference has: actor and critic are two PaLMs, two forward + backward passes per minibatch) and with a value
head on the policy's hidden states (`--critic shared`: one forward + backward per minibatch, and one forward
for old log-probs and values per rollout). The reference's `ActorCritic` has no shared-trunk mode.

Matched: the prompts (the same token ids, all exactly --prompt-len tokens), the response length (fixed:
the reference gets no eos token; palmchat stops only at its end-of-turn token, which random weights
almost never sample: the `finished` column shows whether any response ended early), samples per update,
PPO epochs and minibatch size, full fine-tuning of actor and critic (or LoRA of the same rank with --lora).
Each side runs in its fastest precision: palmchat `--dtype auto` (bf16 autocast on CPUs with bf16
matmuls), the reference under `torch.autocast("cpu", torch.bfloat16)` or fp32, whichever a short probe
finds faster (`--ref-dtype auto`).

Not matched (each side's own algorithm): palmchat's rollout also runs the frozen reference policy for the KL
penalty (the reference has no reference model: its KL term is to the old action probabilities, inside the
update) and values at every token (the reference pools one value per sequence, trained with an HL-Gauss
loss); the reference's update computes full-vocabulary entropies and KL(old || new) that palmchat's does not.

    .venv/bin/python benchmarks/bench_ppo.py            # ~5 minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_ppo.py --quick    # tiny smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from palmchat import checkpoint  # noqa: E402
from palmchat.checkpoint.heads import save_reward_model
from palmchat.model.config import ModelConfig, preset  # noqa: E402
from palmchat.model.heads import RewardModel  # noqa: E402
from palmchat.model.transformer import Transformer  # noqa: E402
from palmchat.tokenizer.bpe import Tokenizer, train_tokenizer  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Shared setup: tokenizer, prompts of one fixed length, random checkpoints
# ---------------------------------------------------------------------------------------------


def make_tokenizer(vocab_size: int, seed: int):
    """BPE on the bundled world's documents plus random syllable words (the world alone gives ~2.8k merges)."""
    from palmchat.world.synthetic import World

    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]
    noise = [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(50))
             for _ in range(2000)]
    tokenizer = train_tokenizer(World(seed=seed).pretraining_documents(3000) + noise, vocab_size=vocab_size)
    if tokenizer.vocab_size != vocab_size:
        raise SystemExit(f"tokenizer reached only {tokenizer.vocab_size} of {vocab_size} tokens")
    return tokenizer


def make_prompts(tokenizer, length: int, n: int, seed: int) -> tuple[list[str], list[list[int]]]:
    """n user prompts whose rendered chat prompt (bos, user, text, eot, assistant) is exactly `length` ids."""
    from palmchat.world.synthetic import World

    world = World(seed=seed)
    words = " ".join(world.prompts(400) + world.pretraining_documents(200)).split()
    rng = random.Random(seed)
    texts, ids = [], []
    for _ in range(100 * n):
        start = rng.randrange(len(words) - 4 * length)
        for count in range(1, 4 * length):
            text = " ".join(words[start:start + count])
            rendered = tokenizer.chat_format.render_prompt([{"role": "user", "content": text}])
            if len(rendered) >= length:
                break
        if len(rendered) == length and text not in texts:
            texts.append(text)
            ids.append(rendered)
            if len(texts) == n:
                return texts, ids
    raise SystemExit(f"could not build {n} prompts of exactly {length} tokens")


def model_config(args) -> ModelConfig:
    if args.quick:
        return ModelConfig(vocab_size=args.vocab, dim=128, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=512)
    return preset("small", vocab_size=args.vocab)


# ---------------------------------------------------------------------------------------------
# Watching for other CPU-heavy processes (two jobs on 2 cores ruin any timing)
# ---------------------------------------------------------------------------------------------


class OtherLoad:
    """Samples /proc every second; remembers the busiest other process (CPU cores used on average)."""

    def __init__(self, threshold: float = 0.3):
        self.threshold, self.worst, self.stop = threshold, (0.0, ""), threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _cpu_times() -> dict[int, tuple[int, str]]:
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1: stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            out[int(entry)] = (int(fields[11]) + int(fields[12]), name)
        return out

    def _run(self):
        before, t0 = self._cpu_times(), time.time()
        while not self.stop.wait(1.0):
            now, t1 = self._cpu_times(), time.time()
            for pid, (ticks, name) in now.items():
                if pid in before:
                    cores = (ticks - before[pid][0]) / self.tick / max(t1 - t0, 1e-3)
                    if cores > self.worst[0]:
                        try:
                            name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
                        except OSError:
                            pass
                        self.worst = (cores, f"pid {pid} ({name.strip()})")
            before, t0 = now, t1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def report(self) -> str:
        cores, who = self.worst
        if cores < self.threshold:
            return "no other busy process seen"
        return f"WARNING: another process used up to {cores:.1f} cores meanwhile: {who}; timings are unreliable"


# ---------------------------------------------------------------------------------------------
# palmchat
# ---------------------------------------------------------------------------------------------


def run_palmchat(args, work: Path, tokenizer_path: Path, prompt_texts: list[str], critic: str) -> dict:
    from palmchat.train.ppo import PPOArgs
    from palmchat.train.ppo import main as ppo_main

    config = model_config(args)
    torch.manual_seed(args.seed)
    checkpoint.save_checkpoint(work / "policy", 0, Transformer(config), {"model": config.to_dict(), "stage": "sft"},
                               tokenizer_path)
    eot_id = Tokenizer.load(tokenizer_path).chat_format.eot_id
    save_reward_model(RewardModel(Transformer(config), eot_id), work / "rm", 0, {"stage": "reward"}, tokenizer_path)
    prompts_file = work / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompt_texts))
    ppo_args = PPOArgs(base=str(work / "policy"), reward=str(work / "rm"), prompts=[str(prompts_file)],
                       out=str(work / f"ppo_{critic}"), iterations=args.warmup + args.iters, critic=critic,
                       rollout_batch=args.batch, minibatch=args.minibatch, ppo_epochs=args.epochs,
                       max_new_tokens=args.new_tokens, lora_rank=args.lora, dtype=args.ours_dtype, seed=args.seed,
                       device="cpu")
    with contextlib.redirect_stdout(io.StringIO()):
        ppo_main(ppo_args)
    rows = [json.loads(line) for line in (work / f"ppo_{critic}" / "metrics.jsonl").read_text().splitlines()]
    rows = rows[args.warmup:]
    iteration = sum(r["iteration_s"] for r in rows) / len(rows)
    rollout = sum(r["rollout_s"] for r in rows) / len(rows)
    from palmchat.utils.device import autocast_dtype

    dtype = autocast_dtype(args.ours_dtype, torch.device("cpu"))
    return dict(samples_per_s=args.batch / iteration, iteration_s=iteration, rollout_s=rollout,
                update_s=iteration - rollout, precision=f"--dtype {args.ours_dtype} ({'bf16' if dtype else 'fp32'})",
                length=sum(r["length"] for r in rows) / len(rows),
                finished=max(r["finished"] for r in rows))


# ---------------------------------------------------------------------------------------------
# palm-rlhf-pytorch
# ---------------------------------------------------------------------------------------------


def _quiet_reference():
    """The reference draws a progress bar per sampled response and prints each loss; keep the output readable."""
    import palm_rlhf_pytorch.palm as ref_palm
    import palm_rlhf_pytorch.ppo as ref_ppo

    def no_bar(iterable, *a, **k):
        return iterable

    ref_palm.tqdm = no_bar
    ref_ppo.tqdm = no_bar


def build_reference(args, prompt_ids: list[list[int]]):
    from palm_rlhf_pytorch import PaLM as RefPaLM
    from palm_rlhf_pytorch import RewardModel as RefRewardModel
    from palm_rlhf_pytorch import RLHFTrainer

    config = model_config(args)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    palm = RefPaLM(num_tokens=config.vocab_size, dim=config.dim, depth=config.n_layers, heads=config.n_heads,
                   dim_head=config.head_dim, ff_mult=config.ffn_hidden // config.dim)
    reward_model = RefRewardModel(palm, use_lora=False)  # frozen during PPO, as ours
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = RLHFTrainer(palm=palm, reward_model=reward_model, prompt_token_ids=torch.tensor(prompt_ids),
                              actor_lora=args.lora > 0, critic_lora=args.lora > 0, actor_lora_r=max(args.lora, 1),
                              critic_lora_r=max(args.lora, 1), minibatch_size=args.minibatch, epochs=args.epochs)
    return trainer


def precision_context(name: str):
    if name == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def probe_reference_precision(trainer, prompt: list[int], new_tokens: int) -> tuple[str, dict]:
    """Time one sampled response (plus its critic forward) in fp32 and under bf16 autocast; pick the faster."""
    state = torch.tensor(prompt)[None]
    times = {}
    for name in ("fp32", "bf16", "fp32", "bf16"):  # the first pass of each is a warm-up
        with precision_context(name):
            t0 = time.time()
            trainer.actor_critic_generate(state, max_seq_len=len(prompt) + new_tokens, return_values=True)
            times[name] = time.time() - t0
    return min(times, key=times.get), times


def run_reference(args, prompt_ids: list[list[int]]) -> dict:
    _quiet_reference()
    trainer = build_reference(args, prompt_ids)
    probe = {}
    precision = args.ref_dtype
    if precision == "auto":
        precision, probe = probe_reference_precision(trainer, prompt_ids[0], min(args.new_tokens, 16))

    spans = []  # (start, end) of every learn() call
    learn = trainer.learn

    def timed_learn(memories):
        start = time.time()
        learn(memories)
        spans.append((start, time.time()))

    trainer.learn = timed_learn
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    started = time.time()
    with precision_context(precision), contextlib.redirect_stdout(io.StringIO()):
        trainer.train(num_episodes=1, max_timesteps=args.batch * (args.warmup + args.iters),
                      update_timesteps=args.batch, max_seq_len=args.prompt_len + args.new_tokens,
                      eos_token=None, temperature=1.0)
    rollouts, updates, previous_end = [], [], started
    for start, end in spans:
        rollouts.append(start - previous_end)
        updates.append(end - start)
        previous_end = end
    rollout = sum(rollouts[args.warmup:]) / args.iters
    update = sum(updates[args.warmup:]) / args.iters
    probe_text = ", ".join(f"{k} {v:.2f}s" for k, v in probe.items())
    return dict(samples_per_s=args.batch / (rollout + update), iteration_s=rollout + update, rollout_s=rollout,
                update_s=update, precision=precision + (f" (probe, 1 response: {probe_text})" if probe else ""),
                length=float(args.new_tokens), finished=0.0)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="sampled responses per PPO update")
    parser.add_argument("--minibatch", type=int, default=8, help="sequences per gradient step")
    parser.add_argument("--epochs", type=int, default=2, help="PPO epochs over each rollout batch")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (every prompt exactly this long)")
    parser.add_argument("--new-tokens", type=int, default=48, help="response tokens (fixed)")
    parser.add_argument("--iters", type=int, default=2, help="measured iterations (rollout + update)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured iterations first")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank for actor and critic on both sides (0 = full)")
    parser.add_argument("--critic", default="both", choices=["separate", "shared", "both"],
                        help="palmchat's critic: its own backbone (as the reference's), a value head on the policy, "
                             "or both")
    parser.add_argument("--ours-dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--ref-dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["palmchat", "reference"], help="run one side")
    parser.add_argument("--quick", action="store_true", help="tiny model and batch (checks the script runs)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.minibatch, args.epochs, args.new_tokens, args.iters, args.warmup = 4, 2, 1, 8, 1, 1
    if args.batch % args.minibatch:
        parser.error("--batch must be a multiple of --minibatch")

    config = model_config(args)
    print(f"shape: dim {config.dim}, depth {config.n_layers}, {config.n_heads} heads of {config.head_dim} "
          f"(multi-query), vocab {config.vocab_size}; prompt {args.prompt_len} + response {args.new_tokens} tokens; "
          f"{args.batch} samples/update, minibatch {args.minibatch}, {args.epochs} PPO epoch(s); "
          f"{'LoRA rank ' + str(args.lora) if args.lora else 'full fine-tuning'} of actor and critic; "
          f"{args.warmup} warm-up + {args.iters} measured iteration(s); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        work = Path(tmp)
        tokenizer = make_tokenizer(args.vocab, args.seed)
        tokenizer.save(work / "tokenizer.json")
        texts, ids = make_prompts(tokenizer, args.prompt_len, 64, args.seed)
        critics = ["separate", "shared"] if args.critic == "both" else [args.critic]
        sides = [(f"palmchat {c}", "palmchat", lambda c=c: run_palmchat(args, work, work / "tokenizer.json", texts, c))
                 for c in critics]
        sides.append(("palm-rlhf-pytorch", "reference", lambda: run_reference(args, ids)))
        for name, key, run in sides:
            if args.only and args.only != key:
                continue
            with OtherLoad() as load:
                t0 = time.time()
                results[name] = run()
            results[name]["wall_s"] = time.time() - t0
            print(f"{name}: done in {results[name]['wall_s']:.0f}s; {load.report()}", flush=True)

    print(f"\n{'side':19} {'samples/s':>9} {'s/iter':>7} {'rollout s':>9} {'update s':>8} {'resp len':>8} "
          f"{'ended early':>11}  precision")
    for name, r in results.items():
        print(f"{name:19} {r['samples_per_s']:9.2f} {r['iteration_s']:7.2f} {r['rollout_s']:9.2f} {r['update_s']:8.2f} "
              f"{r['length']:8.1f} {r['finished']:11.0%}  {r['precision']}")
    ref = results.get("palm-rlhf-pytorch")
    for name, ours in results.items():
        if ref is None or name == "palm-rlhf-pytorch":
            continue
        print(f"{name}: rollout speedup {ref['rollout_s'] / ours['rollout_s']:.1f}x, update speedup "
              f"{ref['update_s'] / ours['update_s']:.1f}x; PPO samples/s ratio (palmchat / palm-rlhf-pytorch): "
              f"{ours['samples_per_s'] / ref['samples_per_s']:.1f}x")

if __name__ == "__main__":
    main()
