"""Serving benchmarks: a real `palmchat serve` on loopback, driven by the official `openai` client.

1. Time to first token (TTFT) of the 10th turn of a conversation:
   - stateful: `responses.create(previous_response_id=..., input=<new message>)` (only the new message is sent;
     the server appends it to the stored tokens and reuses their K/V from its prefix cache),
   - stateless resend: `chat.completions.create(messages=<whole history>)` to a server started with
     `--prefix-cache-tokens 0` (what a server without prefix reuse does: recompute the whole history),
   - and, for reference, the same stateless resend to the caching server (it re-tokenises the history and
     finds the shared prefix in its cache).
   The conversation is built once, turn by turn; the 10th turn is then timed `--reps` times on each side.
2. Aggregate decode tokens/s with 16 concurrent streaming clients versus one (continuous batching).

The model has random weights (only speed is measured) in the `small` shape with a 2048-token context, and a
tokenizer trained on the bundled world. Not a test: ~3 minutes on 2 CPU cores.

    .venv/bin/python benchmarks/bench_serving.py [--turns 10] [--clients 16] [--reps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from palmchat.checkpoint.native import save_checkpoint  # noqa: E402
from palmchat.model.config import preset  # noqa: E402
from palmchat.model.transformer import Transformer  # noqa: E402
from palmchat.tokenizer.bpe import train_tokenizer  # noqa: E402
from palmchat.world.synthetic import World  # noqa: E402


def build_checkpoint(folder: Path) -> Path:
    texts = World(0).pretraining_documents(3000)
    tokenizer = train_tokenizer(texts, vocab_size=4096)
    tokenizer.save(folder / "tokenizer.json")
    torch.manual_seed(0)
    config = preset("small", vocab_size=tokenizer.vocab_size, max_seq_len=2048)
    model = Transformer(config)
    return save_checkpoint(folder / "model", 0, model, {"model": config.to_dict(), "stage": "sft"},
                           folder / "tokenizer.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt: Path, db: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "palmchat.cli", "serve", str(ckpt), "--db", str(db), "--port", str(self.port),
               "--moderation-mode", "off", "--no-auth", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        import httpx

        for _ in range(600):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def user_message(turn: int, words: int) -> str:
    """A different message per turn, about `words` words (~1.5 tokens each), from the bundled world's prompts."""
    text = " ".join(World(turn).prompts(words // 4 + 1))
    return f"Turn {turn}: " + " ".join(text.split()[:words])


async def first_token_time(start: float, stream) -> float:
    """Seconds from `start` (before the request was sent) to the first text delta; then reads the rest."""
    first = float("nan")
    async for event in stream:
        delta = getattr(event, "delta", None)  # responses: output_text.delta events
        if delta is None and getattr(event, "choices", None):  # chat completion chunks
            delta = event.choices[0].delta.content
        if delta and first != first:
            first = time.perf_counter() - start
    return first


async def conversation_ttft(client, stateless_client, model: str, turns: int, reps: int, words: int, reply: int):
    """Builds a `turns`-turn conversation, then times the last turn stateful vs stateless."""
    history, previous = [], None
    for turn in range(1, turns):
        msg = user_message(turn, words)
        r = await client.responses.create(model=model, input=msg, previous_response_id=previous,
                                          max_output_tokens=reply, temperature=1.0)
        previous = r.id
        history += [{"role": "user", "content": msg}, {"role": "assistant", "content": r.output_text}]
    last = user_message(turns, words)
    stateful, stateless, cached_stateless, cached_tokens, prompt_tokens = [], [], [], [], []
    for _ in range(reps):
        start = time.perf_counter()
        stream = await client.responses.create(model=model, input=last, previous_response_id=previous,
                                               max_output_tokens=4, stream=True, store=False)
        stateful.append(await first_token_time(start, stream))
        r = await client.responses.create(model=model, input=last, previous_response_id=previous,
                                          max_output_tokens=1, store=False)
        cached_tokens.append(r.usage.input_tokens_details.cached_tokens)
        prompt_tokens.append(r.usage.input_tokens)
        messages = history + [{"role": "user", "content": last}]
        for target, out in ((stateless_client, stateless), (client, cached_stateless)):
            start = time.perf_counter()
            stream = await target.chat.completions.create(model=model, messages=messages, max_tokens=4, stream=True)
            out.append(await first_token_time(start, stream))
    return dict(stateful=stateful, stateless=stateless, cached_stateless=cached_stateless,
                input_tokens=prompt_tokens[-1], cached_tokens=cached_tokens[-1])


async def decode_throughput(client, model: str, clients: int, tokens: int) -> tuple[float, int]:
    """Aggregate generated tokens/s of `clients` concurrent streamed chats of `tokens` tokens each."""

    async def one(i: int) -> int:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Tell me about town number {i}."}],
            max_tokens=tokens, temperature=1.0, seed=i, stream=True, stream_options={"include_usage": True})
        used = 0
        async for chunk in stream:
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
        return used

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(clients)))
    return sum(counts) / (time.perf_counter() - t0), sum(counts)


async def run(args, ckpt: Path, tmp: Path) -> None:
    from openai import AsyncOpenAI

    cached = Server(ckpt, tmp / "cached.db")
    uncached = Server(ckpt, tmp / "uncached.db", "--prefix-cache-tokens", "0")
    try:
        client = AsyncOpenAI(base_url=cached.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        stateless = AsyncOpenAI(base_url=uncached.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        model = (await client.models.list()).data[0].id
        await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        await stateless.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4)

        t = await conversation_ttft(client, stateless, model, args.turns, args.reps, args.words, args.reply)
        med = {k: statistics.median(t[k]) for k in ("stateful", "stateless", "cached_stateless")}
        print(f"\n== TTFT of turn {args.turns} ({t['input_tokens']} prompt tokens; the stateful turn reported "
              f"{t['cached_tokens']} cached), median of {args.reps} (min alongside)")
        for k, label in (("stateful", "stateful: previous_response_id + new message"),
                         ("stateless", "stateless resend, no prefix cache"),
                         ("cached_stateless", "stateless resend, prefix cache on")):
            print(f"  {label:48s} {med[k] * 1000:8.1f} ms  (min {min(t[k]) * 1000:.1f})")
        print(f"  speed-up stateful vs stateless resend without cache: {med['stateless'] / med['stateful']:.1f}x "
              f"(target 5x)")

        for n in (1, args.clients, 1, args.clients):  # interleaved, twice, against drift
            rate, total = await decode_throughput(client, model, n, args.tokens)
            print(f"  {n:2d} concurrent streams: {rate:7.1f} generated tokens/s ({total} tokens)")
            t.setdefault(n, []).append(rate)
        one, many = max(t[1]), max(t[args.clients])
        print(f"\n== aggregate decode with {args.clients} concurrent streaming clients vs 1 (best of 2 each): "
              f"{many:.1f} vs {one:.1f} tokens/s = {many / one:.1f}x (target 4x)")
        metrics = __import__("httpx").get(cached.url + "/metrics").text
        print("\nserver /metrics excerpt:\n" + "\n".join(
            line for line in metrics.splitlines() if line.startswith("palmchat_") and "bucket" not in line)[:1500])
    finally:
        cached.stop()
        uncached.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--words", type=int, default=40, help="words per user message (about 1.5 tokens each)")
    parser.add_argument("--reply", type=int, default=64, help="tokens per assistant reply while building the history")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per client in the throughput test")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(Path(tmp))
        asyncio.run(run(args, ckpt, Path(tmp)))


if __name__ == "__main__":
    main()
