"""Load benchmark: a real `palmchat serve` on loopback under 64 concurrent streaming clients plus one client sending
bad requests, for a bounded time.

- 64 well-formed clients (8 API keys, 8 clients each) each send streamed chat completions back to back through
  the official `openai` client; every error they see counts (there must be none: the server's limits are set so
  that they fit: --max-requests-per-key 16, --max-queue 256);
- one client sends oversized bodies, malformed JSON, stop strings of 12,000 characters, n above the limit,
  max_tokens above the limit and unknown models; each must get a 4xx;
- a poller times GET /health every half second.

Prints: well-formed requests done and their errors, bad requests and how many got a 4xx, p50/p99 time to first
token, /health latency, and the server's RSS at the start and the end (after a warm-up); the last line is the
same as JSON. Exits 1 when a well-formed request failed or a bad one got anything but a 4xx.

The model has random weights (only the server's behaviour is measured): `small` with a 4096-token tokenizer, or
with --quick `tiny` with a 512-token tokenizer and a 12-second run (what tests/test_server_load.py runs).

    .venv/bin/python benchmarks/bench_server_load.py [--seconds 180] [--clients 64] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from palmchat.checkpoint.native import save_checkpoint  # noqa: E402
from palmchat.model.config import preset  # noqa: E402
from palmchat.model.transformer import Transformer  # noqa: E402
from palmchat.tokenizer.bpe import train_tokenizer  # noqa: E402
from palmchat.world.synthetic import World  # noqa: E402

KEYS = 8
MAX_REQUEST_BYTES = 65536
MAX_TOKENS_LIMIT = 256


def build_checkpoint(folder: Path, shape: str, vocab: int, documents: int) -> Path:
    tokenizer = train_tokenizer(World(0).pretraining_documents(documents), vocab_size=vocab)
    tokenizer.save(folder / "tokenizer.json")
    torch.manual_seed(0)
    config = preset(shape, vocab_size=tokenizer.vocab_size, max_seq_len=2048)
    return save_checkpoint(folder / "model", 0, Transformer(config), {"model": config.to_dict(), "stage": "sft"},
                           folder / "tokenizer.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bad_requests(model: str) -> list[tuple[str, dict | None, bytes | None]]:
    """(what, JSON body or None, raw body or None): every one must be answered with a 4xx."""
    message = [{"role": "user", "content": "hi"}]
    return [
        ("oversized body", None, json.dumps({"model": model, "messages": [
            {"role": "user", "content": "x" * (MAX_REQUEST_BYTES + 10)}]}).encode()),
        ("malformed JSON", None, b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "cont'),
        ("long stop strings", {"model": model, "messages": message, "stop": ["z" * 12000] * 4}, None),
        ("five stop strings", {"model": model, "messages": message, "stop": list("abcde")}, None),
        ("n above the limit", {"model": model, "messages": message, "n": 1000}, None),
        ("max_tokens above the limit", {"model": model, "messages": message, "max_tokens": 10**6}, None),
        ("unknown model", {"model": "gpt-17", "messages": message}, None),
        ("messages not a list", {"model": model, "messages": "hi"}, None),
    ]


async def run(args, url: str, keys: list[str], pid: int) -> dict:
    from openai import AsyncOpenAI

    model = httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {keys[0]}"}).json()["data"][0]["id"]
    clients = [AsyncOpenAI(base_url=url + "/v1", api_key=keys[i % KEYS], max_retries=0, timeout=600)
               for i in range(KEYS)]
    await clients[0].chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=4)  # warm-up: the inference copy is built
    rss_start = rss_mb(pid)
    deadline = time.monotonic() + args.seconds
    ttft, ok, errors, bad, bad_4xx, health, rss, cache = [], [0], [], [0], [0], [], [], [0]
    prompts = World(1).prompts(64)

    async def well_formed(i: int):
        client = clients[i % KEYS]
        j = 0
        while time.monotonic() < deadline:
            j += 1
            start = time.perf_counter()
            first = None
            try:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompts[(i + j) % len(prompts)]}],
                    max_tokens=args.tokens, stream=True, stop=["\n\n\n"])
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - start
                ok[0] += 1
                if first is not None:
                    ttft.append(first)
            except Exception as e:  # noqa: BLE001 - every failure of a well-formed request counts
                errors.append(f"{type(e).__name__}: {e}"[:200])

    async def misbehaving():
        cases = bad_requests(model)
        headers = {"authorization": f"Bearer {keys[-1]}", "content-type": "application/json"}
        async with httpx.AsyncClient(timeout=60) as http:
            j = 0
            while time.monotonic() < deadline:
                what, body, raw = cases[j % len(cases)]
                j += 1
                r = await http.post(url + "/v1/chat/completions", headers=headers,
                                    content=raw if raw is not None else json.dumps(body).encode())
                bad[0] += 1
                if 400 <= r.status_code < 500:
                    bad_4xx[0] += 1
                else:
                    errors.append(f"bad request '{what}' got {r.status_code}: {r.text[:200]}")
                await asyncio.sleep(0.05)

    async def poll_health():
        async with httpx.AsyncClient(timeout=30) as http:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                r = await http.get(url + "/health")
                health.append(time.perf_counter() - start)
                rss.append(rss_mb(pid))
                if r.status_code != 200:
                    errors.append(f"/health answered {r.status_code}: {r.text[:200]}")
                else:
                    cache[0] = r.json()["prefix_cache_tokens"]
                await asyncio.sleep(0.5)

    await asyncio.gather(*(well_formed(i) for i in range(args.clients)), misbehaving(), poll_health())
    well_formed_errors = [e for e in errors if not e.startswith(("bad request", "/health"))]
    return {"clients": args.clients, "seconds": args.seconds, "tokens_per_reply": args.tokens,
            "well_formed_ok": ok[0], "well_formed_errors": len(well_formed_errors),
            "bad_requests": bad[0], "bad_4xx": bad_4xx[0],
            "health_failures": sum(e.startswith("/health") for e in errors),
            "ttft_p50_ms": round(percentile(ttft, 0.5) * 1000, 1),
            "ttft_p99_ms": round(percentile(ttft, 0.99) * 1000, 1),
            "health_p50_ms": round(percentile(health, 0.5) * 1000, 1),
            "health_p99_ms": round(percentile(health, 0.99) * 1000, 1),
            "health_max_ms": round(max(health, default=float("nan")) * 1000, 1),
            "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(rss_mb(pid), 1),
            "rss_quarters_mb": [round(rss[min(len(rss) - 1, q * len(rss) // 4)], 1) for q in range(1, 5) if rss],
            "prefix_cache_tokens": cache[0],
            "first_errors": errors[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--tokens", type=int, default=48, help="max_tokens of each well-formed request")
    parser.add_argument("--quick", action="store_true", help="tiny model, 12 seconds, 16-token replies")
    parser.add_argument("--workdir", default="", help="folder for the checkpoint, database and log (default: temp)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.tokens = min(args.seconds, 12), min(args.tokens, 16)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = build_checkpoint(work, *(("tiny", 512, 400) if args.quick else ("small", 4096, 3000)))
        db = work / "load.db"
        from palmchat.serve.keys import create_key
        from palmchat.store import Store

        store = Store(db)
        keys = [create_key(store, f"team-{i}", "0")[1] for i in range(KEYS)]  # "0": no rate limit
        store.close()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(work / "server.log", "w")  # noqa: SIM115 - the server writes to it until it stops
        proc = subprocess.Popen([sys.executable, "-m", "palmchat.cli", "serve", str(ckpt), "--db", str(db),
                                 "--port", str(port), "--moderation", "none", "--log-level", "warning",
                                 "--max-request-bytes", str(MAX_REQUEST_BYTES),
                                 "--max-tokens-limit", str(MAX_TOKENS_LIMIT)], stdout=log, stderr=subprocess.STDOUT)
        try:
            for _ in range(600):
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited: {(work / 'server.log').read_text()[-2000:]}")
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            summary = asyncio.run(run(args, url, keys, proc.pid))
        finally:
            proc.terminate()
            proc.wait(60)
            log.close()
    s = summary
    print(f"\n== {s['clients']} streaming clients + 1 bad-request client for {s['seconds']:g} s "
          f"({s['tokens_per_reply']}-token replies)")
    print(f"  well-formed requests: {s['well_formed_ok']} done, {s['well_formed_errors']} errors")
    print(f"  bad requests: {s['bad_requests']} sent, {s['bad_4xx']} answered 4xx")
    print(f"  time to first token: p50 {s['ttft_p50_ms']:.0f} ms, p99 {s['ttft_p99_ms']:.0f} ms")
    print(f"  /health latency: p50 {s['health_p50_ms']:.1f} ms, p99 {s['health_p99_ms']:.1f} ms, "
          f"max {s['health_max_ms']:.1f} ms ({s['health_failures']} not 200)")
    print(f"  server RSS: {s['rss_start_mb']:.0f} MB after warm-up; at each quarter of the run "
          f"{', '.join(f'{m:.0f}' for m in s['rss_quarters_mb'])} MB; {s['rss_end_mb']:.0f} MB at the end "
          f"(the prefix cache holds {s['prefix_cache_tokens']} tokens of K/V, of --prefix-cache-tokens 65536)")
    for e in s["first_errors"]:
        print("  error:", e)
    print(json.dumps(s))
    sys.exit(0 if s["well_formed_errors"] == 0 and s["bad_4xx"] == s["bad_requests"] else 1)


if __name__ == "__main__":
    main()
