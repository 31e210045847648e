"""Helpers for tests/test_server.py: a tiny checkpoint (+ reward model) and a real `palmchat serve` subprocess.

The checkpoint has random weights (serving does not care what the model knows) and a 2048-token context, so
that a long streamed reply takes a few seconds on a CPU: long enough to kill the server in the middle of it.
The model never samples end-of-turn or bos (the two tokens that end a reply), so every reply runs to its
max_tokens (exact usage numbers, and a long reply whenever a test needs one): every embedding but theirs gets a
common component c, theirs is -c. The residual stream then carries c at every position, and with tied embeddings
their logits sit ~2|c|^2 below the others' (p < 1e-6 per token, measured; zero embeddings gave ~0.4%). Tokens
of control characters or of a part of a multi-byte character get -c too: its word salad is at least readable.
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
from palmchat.config import preset
from palmchat.model.heads import RewardModel, save_reward_model
from palmchat.model.palm import PaLM
from palmchat.tokenizer import BOS_ID, EOT_ID, NUM_SPECIAL_TOKENS, train_tokenizer

CONTEXT = 2048


def build_checkpoints(root: Path) -> tuple[Path, Path]:
    """(policy checkpoint, reward-model checkpoint), tiny, sharing a tokenizer trained on the bundled world."""
    from palmchat.data.world import World

    tokenizer = train_tokenizer(World(seed=0).pretraining_documents(400), vocab_size=512)
    tok_path = Path(tokenizer.save(root / "tokenizer.json"))
    config = preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=CONTEXT)
    torch.manual_seed(0)
    model = PaLM(config)
    with torch.no_grad():
        weight = model.embed.weight
        c = torch.randn(config.dim)
        c -= c.mean()  # the final LayerNorm removes the mean: only the rest of c survives it
        c *= 4 * weight[NUM_SPECIAL_TOKENS:].norm(dim=1).mean() / c.norm()
        weight[NUM_SPECIAL_TOKENS:] += c
        weight[:NUM_SPECIAL_TOKENS] = c
        weight[EOT_ID] = weight[BOS_ID] = -c
        # nor control characters or parts of a multi-byte character (U+FFFD alone): readable pages and screenshots
        unreadable = [i for i in range(NUM_SPECIAL_TOKENS, tokenizer.vocab_size)
                      if any(ch == "\ufffd" or (ord(ch) < 32 and ch != "\n") or ord(ch) == 127
                             for ch in tokenizer.decode([i]))]
        weight[unreadable] = -c
    policy = checkpoint.save_checkpoint(root / "tiny-chat", 0, model,
                                        {"stage": "sft", "model": config.to_dict()}, tok_path)
    reward = save_reward_model(RewardModel(PaLM(config)), root / "tiny-rm", 0, {"stage": "reward"}, tok_path)
    return policy.parent, reward.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def palmchat(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the `palmchat` command (this interpreter's) and return its result."""
    return subprocess.run([sys.executable, "-m", "palmchat.cli", *args], check=False, capture_output=True,
                          text=True, timeout=timeout, env=_env())


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Server:
    """`palmchat serve` in a subprocess on a free loopback port."""

    def __init__(self, ckpt: Path, db: Path, *extra: str, log: Path):
        self.args = [sys.executable, "-m", "palmchat.cli", "serve", str(ckpt), "--db", str(db),
                     "--host", "127.0.0.1", "--log-level", "warning", *extra]
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
