"""`palmchat serve CHECKPOINT`: load a checkpoint (and optionally a reward model and a moderator) and serve
the OpenAI-compatible API (app.py) with uvicorn until Ctrl-C, or until drained after SIGTERM (drain.py).

Every request needs an API key of --db (`palmchat keys create`; a database without one gets every request a 401
saying so), unless the server is started with --no-auth: then every caller is the one person on this machine and
may do everything, which is why --no-auth is refused anywhere but loopback. A server on loopback also answers only
requests addressed to a loopback name from pages of the same (errors.LocalOnly): a web page the user opens cannot
reach it by DNS rebinding or cross-site requests.

This module imports neither FastAPI nor torch at import time: the `palmchat` command builds its parser from
ServeArgs for every sub-command.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from palmchat.utils.args import arg


@dataclass
class ServeArgs:
    """Serve a checkpoint over an OpenAI-compatible HTTP API."""

    checkpoint: str = arg("", "checkpoint folder (or a run folder with a 'latest' file)", positional=True)
    reward_model: str = arg("", "reward-model checkpoint: enables best_of and the ':best-of-N' model suffix (it must "
                                "have been trained with the checkpoint's tokenizer)")
    db: str = arg("palmchat.db", "SQLite file for responses, conversations and API keys (created if missing)")
    host: str = arg("127.0.0.1", "address to listen on")
    auth: bool = arg(True, "every request needs an API key of --db (palmchat keys create). --no-auth: no keys, every "
                           "caller may do everything (one person on this machine); allowed only on a loopback --host")
    port: int = arg(8000, "port")
    model_name: str = arg("", "model id clients use (default: the checkpoint folder's name)")
    lora: list[str] = arg([], "LoRA adapters served beside the checkpoint, NAME=PATH each (a palmchat LoRA checkpoint "
                              "or a PEFT folder, trained on this checkpoint): requests choose one by model 'NAME' or "
                              "'MODEL:NAME'; more load at run time through POST /v1/load_lora_adapter")
    moderation: str = arg("default", "moderator folder (palmchat moderation train), 'default' (trained on the "
                                     "bundled world at startup, a few seconds) or 'none'")
    moderation_mode: str = arg("warn", "off: no checks; warn: report verdicts in replies; block: refuse flagged "
                                       "input and stop flagged output (finish_reason content_filter)",
                               choices=["off", "warn", "block"])
    max_batch: int = arg(16, "requests decoded together at most")
    prefix_cache_tokens: int = arg(65536, "tokens of K/V the prefix cache keeps (least recently used evicted)")
    max_request_bytes: int = arg(1 << 20, "largest request body accepted (413 above)")
    max_tokens_limit: int = arg(4096, "largest max_tokens / max_output_tokens a request may ask for (400 above)")
    rate_limit: str = arg("600/min", "requests per key (one shared budget under --no-auth): N/s, N/min or "
                                     "N/hour; 0 = none; `palmchat keys create --rate-limit` sets one key's")
    token_rate_limit: str = arg("0", "model tokens per key, counted at admission as OpenAI does (prompt + the most its "
                                     "replies may take, times the samples), e.g. 200000/min; more get 429 with "
                                     "retry-after; 0 = none")
    max_queue: int = arg(256, "requests waiting for a batch row at most; more get 503 with retry-after (0: no limit)")
    max_requests_per_key: int = arg(16, "requests of one key generating or waiting at once (without keys: of all "
                                        "clients together); more get 429 with retry-after (0: no limit)")
    max_rows_per_key: int = arg(0, "batch rows one key's requests hold at once; its other samples wait for rows "
                                   "to free (0: half of --max-batch, rounded up)")
    drain_timeout: float = arg(30.0, "seconds SIGTERM lets running requests finish (new ones get 503) before the "
                                     "rest are cancelled and the server exits")
    dtype: str = arg("auto", "decode precision: auto (bf16 where the CPU has it), bf16 or fp32",
                     choices=["auto", "bf16", "fp32"])
    quantize: str = arg("none", "weights for decoding: none, int8 (a scale per row: half of bf16's bytes) or "
                       "int4 (llama.cpp's Q4_0: a scale per 32, ~0.28x bf16's bytes)", choices=["none", "int8", "int4"])
    log_level: str = arg("info", "uvicorn log level", choices=["critical", "error", "warning", "info", "debug"])


LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_state(args: ServeArgs, store):
    """Model, tokenizer, scheduler, reward model and moderator for ServerState."""
    import torch

    from palmchat import checkpoint
    from palmchat.inference.scheduler import Scheduler
    from palmchat.serve.keys import parse_rate
    from palmchat.serve.state import ServerState
    from palmchat.utils.device import decode_dtype

    parse_rate(args.rate_limit)  # a typo fails here, not at the first request
    parse_rate(args.token_rate_limit)
    if args.max_batch < 1 or args.max_tokens_limit < 1 or args.max_request_bytes < 1 or args.prefix_cache_tokens < 0:
        raise ValueError("--max-batch, --max-tokens-limit and --max-request-bytes must be >= 1, "
                         "--prefix-cache-tokens >= 0")
    if min(args.max_queue, args.max_requests_per_key, args.max_rows_per_key, args.drain_timeout) < 0:
        raise ValueError("--max-queue, --max-requests-per-key, --max-rows-per-key and --drain-timeout must be >= 0")
    model, _, ckpt = checkpoint.load_model(args.checkpoint)
    model.eval().requires_grad_(False)
    tokenizer = checkpoint.load_tokenizer(ckpt)
    folder = Path(args.checkpoint).resolve()
    name = args.model_name or (folder.parent.name if re.fullmatch(r"step-\d+", folder.name) else folder.name)
    adapters = load_adapters(args.lora, model, args.checkpoint, name, tokenizer)
    reward_model = None
    if args.reward_model:
        from palmchat.checkpoint.heads import load_reward_model

        reward_model, _ = load_reward_model(args.reward_model, eot_id=tokenizer.chat_format.eot_id,
                                            tokenizer=tokenizer)
        reward_model.eval().requires_grad_(False)
        if reward_model.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"--reward-model {args.reward_model}: vocabulary of {reward_model.config.vocab_size} "
                             f"tokens, but the policy's has {model.config.vocab_size} (another tokenizer)")
    moderator = None
    if args.moderation not in ("none", ""):
        from palmchat.moderation.classifier import Moderator
        from palmchat.moderation.train import default_moderator

        moderator = default_moderator() if args.moderation == "default" else Moderator.load(args.moderation)
    dtype = decode_dtype(args.dtype)
    quantize = None if args.quantize == "none" else args.quantize  # int8 weights live in an inference copy
    scheduler = Scheduler(model, dtype=None if dtype == torch.float32 and args.dtype == "auto" and not quantize
                          else dtype, quantize=quantize,
                          max_batch=args.max_batch, prefix_cache_tokens=args.prefix_cache_tokens,
                          max_queue=args.max_queue, max_requests_per_owner=args.max_requests_per_key,
                          max_rows_per_owner=args.max_rows_per_key or -(-args.max_batch // 2))
    return ServerState(model_id=name, tokenizer=tokenizer, scheduler=scheduler, store=store,
                       reward_model=reward_model, reward_model_path=args.reward_model, moderator=moderator,
                       moderation_mode=args.moderation_mode if moderator is not None else "off",
                       max_tokens_limit=args.max_tokens_limit, max_request_bytes=args.max_request_bytes,
                       rate_limit=args.rate_limit, token_rate_limit=args.token_rate_limit, no_auth=not args.auth,
                       local_hosts=LOCAL_HOSTS | {args.host.strip("[]")} if is_loopback(args.host) else None,
                       adapters=adapters, base_path=args.checkpoint)


def load_adapters(flags: list[str], model, base: str, model_id: str, tokenizer) -> dict[str, str]:
    """--lora NAME=PATH ...: each adapter checked against the base and added to the model; {name: path}."""
    from palmchat.serve.adapters import add_to_model, check_adapter_name, parse_lora_flags, read_adapter

    adapters = parse_lora_flags(flags)
    for name, path in adapters.items():
        check_adapter_name(name, model_id)
        tensors, lora = read_adapter(path, name, base, model.config, tokenizer)
        add_to_model(model, name, tensors, lora)
    return adapters


def main(args: ServeArgs) -> None:
    from palmchat.store import Store

    if not args.checkpoint:
        raise ValueError("a checkpoint folder is required: palmchat serve CHECKPOINT")
    if not args.auth and not is_loopback(args.host):
        raise ValueError(f"--no-auth is allowed only on loopback (127.0.0.1, ::1, localhost), not --host "
                         f"{args.host}: without keys anyone who can reach the port could use the server, read "
                         f"every conversation and swap models. Create a key with `palmchat keys create --db "
                         f"{args.db}` and drop --no-auth, or listen on 127.0.0.1")
    store = Store(args.db)
    try:
        state = load_state(args, store)
        from palmchat.serve import drain
        from palmchat.serve.app import create_app

        app = create_app(state)
        host = f"[{args.host}]" if ":" in args.host else args.host
        keys = store.active_key_count()
        extras = ", ".join(x for x in (
            f"best-of-n with {args.reward_model}" if state.reward_model is not None else "",
            f"LoRA adapters {', '.join(state.adapters)}" if state.adapters else "",
            f"moderation {state.moderation_mode}" if state.moderator is not None else "moderation off",
            "no authentication (--no-auth): every local caller may do everything" if not args.auth
            else f"{keys} API key(s)",
        ) if x)
        print(f"palmchat serve: model '{state.model_id}' at http://{host}:{args.port}/v1 ({extras}; db {args.db}). "
              f"Ctrl-C stops.", flush=True)
        if args.auth and not keys:
            print(f"palmchat serve: {args.db} holds no active API key, so every request gets 401 until you create "
                  f"one: `palmchat keys create --db {args.db} --role admin` (or restart with --no-auth, for one "
                  f"person on this machine)", flush=True)
        if not state.tokenizer.chat_format.prefix_stable:
            print("palmchat serve: the chat template rewrites earlier turns (it is not prefix-stable): every turn of "
                  "a stored conversation is rendered again from its text, and the prefix cache reuses only what "
                  "did not change", flush=True)
        drain.serve(app, args.host, args.port, args.log_level, state.scheduler, args.drain_timeout)
    finally:
        store.close()


if __name__ == "__main__":
    from palmchat.utils.args import parse_into

    main(parse_into(ServeArgs, sys.argv[1:], prog="palmchat serve"))
