"""Training steps on the bundled data's real lengths: one forward padded to the batch's longest row against the
rows in chunks of similar length (palmchat/model/length_chunks.py), side by side.

    .venv/bin/python benchmarks/bench_length_chunks.py [--steps 30]
    PALMCHAT_MAX_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python \\
        benchmarks/bench_length_chunks.py --dtype fp32        # as an AVX2-only CPU runs it

The demo's model (`mini`, random weights: speed only) and the batches its stages take from the bundled world: the
reward model's (16 rankings x 4 replies), SFT's (16 conversations, with the world's tool conversations too) and
DPO's (8 rankings x 4 replies, log-probs of every reply). Each setting times forward + backward of the stage's loss
over the same batches and prints padded and real tokens, seconds per step and the ratio. `--forward-costs` also
runs the chunked path at other values of the per-forward cost the chunker counts (FORWARD_COST_TOKENS).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from palmchat.data.chat import encode_sft, group_by_ranking, pad_right, parse_ranking, ranking_batch
from palmchat.losses import IGNORE_INDEX, ranking_loss
from palmchat.model.config import preset
from palmchat.model.heads import RewardModel
from palmchat.model.length_chunks import FORWARD_COST_TOKENS, map_length_chunks
from palmchat.model.logprobs import response_logprobs
from palmchat.model.transformer import Transformer
from palmchat.tokenizer.bpe import train_tokenizer
from palmchat.train.sft import batch_loss
from palmchat.utils.device import autocast
from palmchat.world.synthetic import World

CAPS = ("PALMCHAT_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.partition(":")[2].strip() for line in f if line.startswith("model name")),
                    platform.processor())


def padded_forward(fn, ids, lengths):
    """The whole batch in one forward, padded to its longest row."""
    return fn(ids, torch.arange(len(ids)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="batches timed per stage and setting")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast or fp32")
    ap.add_argument("--forward-costs", type=int, nargs="*", default=[], help="other FORWARD_COST_TOKENS to try")
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    print(f"CPU: {cpu_model()}; {torch.get_num_threads()} threads; "
          f"caps: {' '.join(f'{k}={os.environ[k]}' for k in CAPS if k in os.environ) or 'none'}; {args.dtype}")

    world = World(seed=0)
    tokenizer = train_tokenizer(world.pretraining_documents(3000), vocab_size=2048)
    model = Transformer(preset("mini", vocab_size=tokenizer.vocab_size))
    reward_model = RewardModel(model, tokenizer.chat_format.eot_id)
    n = args.steps
    rankings = [parse_ranking(r) for r in world.ranking_examples(16 * n)]
    conversations = [c["messages"] for c in world.sft_conversations(12 * n)] + \
                    [c["messages"] for c in world.tool_conversations(4 * n)]
    conversations = [conversations[i] for i in torch.randperm(len(conversations)).tolist()]
    sft_examples = [encode_sft(tokenizer, c, 1024) for c in conversations]

    def reward_step(i, forward):
        batch = ranking_batch(tokenizer, rankings[16 * i:16 * (i + 1)], 1024)
        eot = batch["eot_index"]
        with autocast(torch.device("cpu"), dtype):
            rewards = forward(lambda chunk, rows: reward_model(chunk, eot[rows]), batch["ids"], batch["lengths"])
        ranking_loss(group_by_ranking(rewards.float(), batch["num_responses"]), batch["num_responses"])[0].backward()
        return batch["lengths"]

    def dpo_step(i, forward):
        batch = ranking_batch(tokenizer, rankings[8 * i:8 * (i + 1)], 1024)
        lengths, prompt_lens = batch["lengths"], batch["prompt_lens"]
        # return_hidden: response_logprobs's single forward (it would chunk by itself otherwise)
        logps = forward(lambda chunk, rows: response_logprobs(model, chunk, prompt_lens[rows], lengths[rows],
                                                              reduce="sum", dtype=dtype, return_hidden=True)[0],
                        batch["ids"], lengths)
        logps.sum().backward()
        return lengths

    def sft_step(i, forward):
        examples = sft_examples[16 * i:16 * (i + 1)]
        if forward is padded_forward:  # the token-mean cross-entropy over one padded forward
            ids, _ = pad_right([e[0] for e in examples], 0)
            targets, _ = pad_right([e[1] for e in examples], IGNORE_INDEX)
            with autocast(torch.device("cpu"), dtype):
                logp = model.token_logprobs(model.hidden_states(ids), targets)
            (-logp.sum() / (targets != IGNORE_INDEX).sum()).backward()
        else:
            batch_loss(model, examples, 0, torch.device("cpu"), dtype).backward()
        return torch.tensor([len(e[0]) for e in examples])

    def run(step, forward) -> tuple[float, int, int]:
        step(0, forward)  # warm-up
        real = padded = 0
        started = time.perf_counter()
        for i in range(1, n):
            lengths = step(i, forward)
            real, padded = real + int(lengths.sum()), padded + len(lengths) * int(lengths.max())
            model.zero_grad(set_to_none=True)
        return (time.perf_counter() - started) / (n - 1), real, padded

    def chunked(cost):
        return lambda fn, ids, lengths: map_length_chunks(fn, ids, lengths, forward_cost=cost)

    print(f"{'stage':8} {'real tokens':>12} {'padded':>8} {'padded s/step':>14} "
          f"{'chunked s/step':>15} {'speed-up':>9}  (FORWARD_COST_TOKENS={FORWARD_COST_TOKENS})")
    for name, step in (("reward", reward_step), ("dpo", dpo_step), ("sft", sft_step)):
        padded_s, real, padded = run(step, padded_forward)
        chunked_s, _, _ = run(step, chunked(FORWARD_COST_TOKENS))
        print(f"{name:8} {real:12,} {padded:8,} {padded_s:14.3f} {chunked_s:15.3f} {padded_s / chunked_s:8.2f}x")
        for cost in args.forward_costs if name != "sft" else ():
            other, _, _ = run(step, chunked(cost))
            print(f"{'':8} FORWARD_COST_TOKENS={cost}: {other:.3f} s/step ({padded_s / other:.2f}x)")


if __name__ == "__main__":
    main()
