"""Helpers for tests/test_server.py: a tiny checkpoint (+ reward model) and a real `palmchat serve` subprocess.

The checkpoint has random weights (serving does not care what the model knows) and a 2048-token context, so
that a long streamed reply takes a few seconds on a CPU: long enough to kill the server in the middle of it.
build_demo_shaped_checkpoint makes one of the shape `make demo` serves instead, context included, for the tests
of conversations longer than that context.
The model never samples a special token (each ends a reply), so every reply runs to its max_tokens (exact usage
numbers, and a long reply whenever a test needs one): every input embedding gets a common component c, and the
(untied) output embedding is the same but -c for them. The residual stream then carries c at every position, and
their logits sit ~2|c|^2 below the others'. Tokens of control characters or of a part of a multi-byte character
are never sampled either: its word salad is at least readable.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from palmchat import checkpoint
from palmchat.checkpoint.heads import save_reward_model
from palmchat.model.config import ModelConfig, preset
from palmchat.model.heads import RewardModel
from palmchat.model.transformer import Transformer
from palmchat.tokenizer.bpe import Tokenizer, train_tokenizer
from palmchat.tokenizer.chat_format import NUM_SPECIAL_TOKENS

CONTEXT = 2048


def world_tokenizer(reverse: bool = False) -> Tokenizer:
    """A 512-token tokenizer trained on the bundled world's documents (reverse: on the same documents written
    backwards, which gives another tokenizer of the same size: the same ids mean other text)."""
    from palmchat.world.synthetic import World

    documents = World(seed=0).pretraining_documents(400)
    return train_tokenizer([d[::-1] for d in documents] if reverse else documents, vocab_size=512)


def build_checkpoints(root: Path, shape: str = "tiny", context: int | None = CONTEXT) -> tuple[Path, Path]:
    """(policy checkpoint, reward-model checkpoint) of a model preset (context None: the preset's), sharing a
    tokenizer trained on the bundled world."""
    tokenizer = world_tokenizer()
    tok_path = Path(tokenizer.save(root / "tokenizer.json"))
    policy, config = build_policy(root / f"{shape}-chat", tokenizer, tok_path, shape, context)
    reward = save_reward_model(RewardModel(Transformer(config), tokenizer.chat_format.eot_id), root / f"{shape}-rm", 0,
                               {"stage": "reward"}, tok_path)
    return policy, reward.parent


def build_policy(out: Path, tokenizer: Tokenizer, tok_path: Path, shape: str = "tiny",
                 context: int | None = CONTEXT, steer: bool = True) -> tuple[Path, ModelConfig]:
    """A policy checkpoint (run folder `out`) with the random weights described above, and its config. steer=False:
    random weights with the input projections of every block x3 instead, whose greedy reply depends on the
    whole prompt (the steered model's hardly does) and may end at any special token."""
    config = preset(shape, vocab_size=tokenizer.vocab_size, tie_embeddings=False,
                    **({"max_seq_len": context} if context else {}))
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        if not steer:
            for name, weight in model.named_parameters():
                if name.endswith(("in_proj.weight", "qkv.weight", "gate_up.weight")):
                    weight.mul_(3)  # sharper attention: the reply turns on which tokens the prompt holds
            return checkpoint.save_checkpoint(out, 0, model, {"stage": "sft", "model": config.to_dict()},
                                              tok_path).parent, config
        embed, head = model.embed.weight, model.lm_head.weight
        c = torch.randn(config.dim)
        c -= c.mean()  # the final LayerNorm removes the mean: only the rest of c survives it
        c *= 4 * embed.norm(dim=1).mean() / c.norm()
        embed += c
        head.copy_(embed)
        # never sampled: the special tokens (each ends a reply), control characters and parts of a multi-byte
        # character (U+FFFD alone), so that replies run to max_tokens and pages and screenshots are readable
        unreadable = [i for i in range(NUM_SPECIAL_TOKENS, tokenizer.vocab_size)
                      if any(ch == "\ufffd" or (ord(ch) < 32 and ch != "\n") or ord(ch) == 127
                             for ch in tokenizer.decode([i]))]
        head[list(range(NUM_SPECIAL_TOKENS)) + unreadable] = -c
    policy = checkpoint.save_checkpoint(out, 0, model, {"stage": "sft", "model": config.to_dict()}, tok_path)
    return policy.parent, config


def build_demo_shaped_checkpoint(root: Path) -> Path:
    """A policy checkpoint of the shape `make demo` serves (its preset, context included), with the random weights
    above."""
    from palmchat.demo import DemoArgs, settings

    return build_checkpoints(root, settings(DemoArgs()).preset, context=None)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def palmchat(*args: str, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess:
    """Run the `palmchat` command (this interpreter's), with `input` on its standard input, and return its result."""
    return subprocess.run([sys.executable, "-m", "palmchat.cli", *args], check=False, capture_output=True,
                          text=True, timeout=timeout, env=_env(), input=input)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Server:
    """`palmchat serve` in a subprocess on a free loopback port. no_auth: started with --no-auth (no keys: every
    caller is the one local person), as the tests of everything but keys and roles are."""

    def __init__(self, ckpt: Path, db: Path, *extra: str, log: Path, no_auth: bool = False):
        self.args = [sys.executable, "-m", "palmchat.cli", "serve", str(ckpt), "--db", str(db),
                     "--host", "127.0.0.1", "--log-level", "warning", *(["--no-auth"] if no_auth else []), *extra]
        self.log_path = log
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> Server:
        self.port = free_port()
        if getattr(self, "_log", None):
            self._log.close()
        self._log = open(self.log_path, "a")  # noqa: SIM115 - the server writes to it until stop()
        self.proc = subprocess.Popen(self.args + ["--port", str(self.port)], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=_env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not answer /health within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()
