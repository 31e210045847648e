"""A server under load and faults: the queue bound and per-key limits, a fault in one request, a client that leaves
a non-streamed request, stop-string limits, /health readiness, SSE keep-alives, and SIGTERM's drain.

Most tests run `create_app` under uvicorn in a thread of this process, on a loopback port, so that a test can
inject a fault into the model or hold the scheduler's loop; SIGTERM needs a `palmchat serve` subprocess
(tests/server_fixtures.py). The tiny random-weight checkpoint never samples an end-of-turn token: every reply runs
to its max_tokens, so a long reply keeps the batch busy as long as a test needs.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_fixtures import Server, build_checkpoints, build_policy, free_port

MODEL = "tiny-chat"
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    policy, reward = build_checkpoints(root)
    return {"root": root, "policy": policy, "reward": reward}


class LoopbackServer:
    """create_app under uvicorn in a thread, on a free loopback port; `model` is the scheduler's model itself (no
    inference copy), so a test may wrap its forward."""

    def __init__(self, policy: Path, db: Path, keys: tuple[str, ...] = (), moderator=None, **limits):
        import uvicorn

        from palmchat import checkpoint
        from palmchat.inference.scheduler import Scheduler
        from palmchat.serve.app import create_app
        from palmchat.serve.keys import create_key
        from palmchat.serve.state import ServerState
        from palmchat.store import Store

        self.model, _, ckpt = checkpoint.load_model(policy)
        self.model.eval().requires_grad_(False)
        self.store = Store(db)
        self.keys = {name: create_key(self.store, name)[1] for name in keys}
        self.scheduler = Scheduler(self.model, **limits)
        self.state = ServerState(model_id=MODEL, tokenizer=checkpoint.load_tokenizer(ckpt), scheduler=self.scheduler,
                                 store=self.store, moderator=moderator, no_auth=not keys,
                                 moderation_mode="off" if moderator is None else "block")
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.state), host="127.0.0.1", port=self.port,
                                                    log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def headers(self, key: str | None) -> dict:
        return {"authorization": f"Bearer {self.keys[key]}"} if key else {}

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.keys[key] if key else "none", max_retries=0)

    def health(self) -> httpx.Response:
        return httpx.get(self.url + "/health", timeout=10)

    def wait_for(self, condition, what: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.health().json()
            if condition(stats):
                return stats
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}: {self.health().json()}")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.store.close()


@pytest.fixture
def serve(artifacts, tmp_path):
    servers = []

    def start(**kwargs) -> LoopbackServer:
        servers.append(LoopbackServer(artifacts["policy"], tmp_path / f"db{len(servers)}.db", **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def throttle(srv: LoopbackServer, seconds: float = 0.005) -> None:
    """Make every forward of the server's model take `seconds` longer: a long reply then lasts long enough for a
    test to act while it runs, however fast the machine."""
    forward = srv.model.hidden_states

    def hidden_states(idx, cache=None, **kw):
        time.sleep(seconds)
        return forward(idx, cache=cache, **kw)

    srv.model.hidden_states = hidden_states


def chat(content: str = "Tell me a story.", max_tokens: int = 8, **more) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **more}


class Background:
    """A request sent from a thread; .result() waits for its response."""

    def __init__(self, send):
        self.response, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(send,), daemon=True)
        self.thread.start()

    def _run(self, send):
        try:
            self.response = send()
        except Exception as e:  # noqa: BLE001 - reported by result()
            self.error = e

    def result(self, timeout: float = 120):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request did not finish"
        if self.error is not None:
            raise self.error
        return self.response


def stream_lines(url: str, body: dict, headers: dict, lines: list, stop: threading.Event | None = None):
    """Read a streamed chat completion's status and non-empty lines into `lines` (until it ends, or `stop` is
    set)."""
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                      timeout=120) as r:
        lines.append(r.status_code)
        for line in r.iter_lines():
            if line:
                lines.append(line)
            if stop is not None and stop.is_set():
                return


# -- limits ---------------------------------------------------------------------------------------------------


def test_a_full_queue_answers_503_with_retry_after(serve):
    srv = serve(max_batch=1, max_queue=1)
    throttle(srv)
    stop, lines = threading.Event(), []
    running = Background(lambda: stream_lines(srv.url, chat(max_tokens=1500), {}, lines, stop))
    srv.wait_for(lambda s: s["running"] == 1, "the long stream to run")
    queued = Background(lambda: httpx.post(srv.url + "/v1/chat/completions", json=chat(max_tokens=4), timeout=120))
    srv.wait_for(lambda s: s["waiting"] == 1, "the second request to wait")
    refused = httpx.post(srv.url + "/v1/chat/completions", json=chat(max_tokens=4), timeout=30)
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert "--max-queue" in error["message"] and error["code"] == "server_overloaded"
    with pytest.raises(openai.APIStatusError) as raised:  # the official client sees a 503 it may retry
        srv.client().chat.completions.create(**chat(max_tokens=4))
    assert raised.value.status_code == 503
    stop.set()
    running.result()
    assert queued.result().status_code == 200  # the queued one runs once the row frees
    assert srv.health().json()["refused_total"] == 2
    assert "palmchat_refused_total 2.0" in httpx.get(srv.url + "/metrics").text


def test_a_key_over_its_cap_gets_429_while_another_key_gets_through(serve):
    srv = serve(keys=("alice", "bob"), max_requests_per_owner=1)
    throttle(srv)
    stop, lines = threading.Event(), []
    running = Background(lambda: stream_lines(srv.url, chat(max_tokens=1500), srv.headers("alice"), lines, stop))
    srv.wait_for(lambda s: s["running"] == 1, "alice's stream to run")
    refused = httpx.post(srv.url + "/v1/chat/completions", json=chat(), headers=srv.headers("alice"), timeout=30)
    assert refused.status_code == 429, refused.text
    assert "--max-requests-per-key" in refused.json()["error"]["message"] and "1 at a time" in refused.text
    assert refused.json()["error"]["code"] == "too_many_requests_in_flight"
    assert int(refused.headers["retry-after"]) >= 1
    bob = srv.client("bob").chat.completions.create(**chat(max_tokens=5))
    assert bob.choices[0].finish_reason == "length" and bob.usage.completion_tokens == 5
    stop.set()
    running.result()
    srv.wait_for(lambda s: s["running"] == 0 and s["waiting"] == 0, "alice's stream to leave")
    again = srv.client("alice").chat.completions.create(**chat(max_tokens=3))  # her slot is free again
    assert again.usage.completion_tokens == 3


def test_a_keys_token_budget_is_charged_at_admission_and_spent_budget_gets_429(serve):
    srv = serve(keys=("alice", "bob"))
    srv.state.token_rate_limit = "100/min"  # model tokens: prompt + max_tokens x n, charged when admitted
    first = srv.client("alice").chat.completions.create(**chat(max_tokens=30))
    charged = first.usage.prompt_tokens + 30
    assert charged < 100 < charged + first.usage.prompt_tokens + 60 - 10  # a second of 60 does not fit (10: refill)
    spent = httpx.post(srv.url + "/v1/chat/completions", json=chat(max_tokens=60), headers=srv.headers("alice"),
                       timeout=30)
    assert spent.status_code == 429 and spent.json()["error"]["type"] == "tokens", spent.text
    assert int(spent.headers["retry-after"]) >= 1
    bob = srv.client("bob").chat.completions.create(**chat(max_tokens=30))  # another key's budget is its own
    assert bob.usage.completion_tokens == 30
    whole = httpx.post(srv.url + "/v1/chat/completions", json=chat(max_tokens=40, n=3), headers=srv.headers("bob"),
                       timeout=30)
    assert whole.status_code == 429 and "more than this key's whole budget" in whole.json()["error"]["message"]


def test_n_samples_of_one_request_wait_for_rows_beyond_the_keys_share(serve):
    srv = serve(keys=("alice", "bob"), max_batch=4, max_rows_per_owner=2)
    throttle(srv)
    many = Background(lambda: srv.client("alice").chat.completions.create(**chat(max_tokens=200, n=6)))
    stats = srv.wait_for(lambda s: s["running"] == 2 and s["waiting"] == 4, "two of alice's six samples to run")
    assert stats["running"] == 2  # the batch has room for four, her share is two
    bob = srv.client("bob").chat.completions.create(**chat(max_tokens=4))  # a row is free for another key
    assert bob.usage.completion_tokens == 4
    assert [c.finish_reason for c in many.result().choices] == ["length"] * 6


# -- faults and disconnects ---------------------------------------------------------------------------------------


def test_a_fault_in_one_request_fails_only_it_while_a_stream_completes(serve):
    srv = serve()
    throttle(srv)
    forward = srv.model.hidden_states

    def hidden_states(idx, cache=None, **kw):  # an out-of-memory on any long prefill
        if idx.shape[1] > 100:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return forward(idx, cache=cache, **kw)

    srv.model.hidden_states = hidden_states
    lines = []
    stream = Background(lambda: stream_lines(srv.url, chat(max_tokens=300), {}, lines))
    srv.wait_for(lambda s: s["running"] == 1, "the stream to run")
    failed = httpx.post(srv.url + "/v1/chat/completions", json=chat("Tell me a story. " * 60, max_tokens=20),
                        timeout=60)
    assert failed.status_code == 500, failed.text
    assert failed.json()["error"]["type"] == "server_error" and "memory" not in failed.text
    stream.result()
    chunks = [json.loads(line[6:]) for line in lines[1:] if line.startswith("data: {")]
    assert lines[0] == 200 and lines[-1] == "data: [DONE]"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"][0]["delta"].get("content")) >= 250  # all 300 tokens came
    stats = srv.health().json()
    assert stats["failed_total"] == 1 and stats["status"] == "ok"


def test_a_non_streamed_request_is_cancelled_when_its_client_leaves(serve):
    srv = serve()
    throttle(srv)
    before = srv.health().json()["generated_tokens_total"]
    body = json.dumps(chat(max_tokens=2000)).encode()
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                  b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        srv.wait_for(lambda st: st["running"] == 1, "the request to run")
    stats = srv.wait_for(lambda st: st["running"] == 0, "the request to leave the batch once its client left")
    assert stats["generated_tokens_total"] - before < 2000  # cancelled, not run to its end


# -- stop strings ---------------------------------------------------------------------------------------------


def test_long_or_many_stop_strings_are_refused(serve):
    srv = serve()
    for stop, words in ((["x" * 12000], "256 characters"), (["a", "b", "c", "d", "e"], "at most 4")):
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat(stop=stop), timeout=30)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "stop"
    ok = srv.client().chat.completions.create(**chat(max_tokens=6, stop=["y" * 256, "\n\n"]))
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_stop_matching_only_looks_at_the_unreleased_tail():
    from palmchat.serve.generate import held_back

    assert held_back("one two thr", "three") == 3 and held_back("one two", "three") == 0
    assert held_back("aaaa", "aaab") == 3 and held_back("xa", "a") == 0  # a whole stop is a match, not a hold
    assert held_back("ab" * 50 + "a", "abab" * 64) == 101


class ThreadRecordingModerator:
    """Flags nothing; records the thread of every call."""

    def __init__(self):
        self.threads = []

    def moderate(self, texts):
        from palmchat.moderation.classifier import ModerationResult

        self.threads.append(threading.current_thread())
        return [ModerationResult(False, {"harassment": False}, {"harassment": 0.0}) for _ in texts]


def test_block_mode_moderation_runs_off_the_event_loop(serve):
    moderator = ThreadRecordingModerator()
    srv = serve(moderator=moderator)
    reply = srv.client().chat.completions.create(**chat(max_tokens=40))
    chunks = list(srv.client().chat.completions.create(**chat(max_tokens=40), stream=True))
    assert reply.choices[0].finish_reason == "length" and chunks[-1].choices[0].finish_reason == "length"
    assert len(moderator.threads) >= 2 * (1 + 40 // 8)  # the input, and the reply every 8 tokens, twice
    assert srv.thread not in moderator.threads  # uvicorn's event loop runs in srv.thread


# -- health, keep-alive ---------------------------------------------------------------------------------------


def test_health_reports_readiness_and_a_stalled_scheduler(serve):
    srv = serve(max_queue=7)
    health = srv.health()
    body = health.json()
    assert health.status_code == 200 and body["status"] == "ok" and body["ready"] is True
    assert body["checks"] == {"scheduler": "ok", "database": "ok"}
    assert body["limits"]["max_queue"] == 7 and body["waiting"] == 0 and "heartbeat_age" in body
    assert "/" not in json.dumps({k: v for k, v in body.items() if k != "model"})  # no file paths
    assert httpx.get(srv.url + "/health/live").status_code == 200

    release = threading.Event()
    forward = srv.model.hidden_states

    def stuck(idx, cache=None, **kw):  # a forward that hangs (a deadlocked kernel, a GPU that stopped answering)
        release.wait(60)
        return forward(idx, cache=cache, **kw)

    srv.scheduler.stall_seconds = 0.5
    srv.model.hidden_states = stuck
    request = Background(lambda: httpx.post(srv.url + "/v1/chat/completions", json=chat(max_tokens=3), timeout=60))
    srv.wait_for(lambda s: s["status"] == "stalled", "/health to see the stall")
    assert srv.health().status_code == 503 and httpx.get(srv.url + "/health/live").status_code == 503
    release.set()
    assert request.result().status_code == 200
    assert srv.wait_for(lambda s: s["status"] == "ok", "the scheduler to recover")["ready"]

    srv.scheduler.drain()
    assert srv.health().status_code == 503 and srv.health().json()["status"] == "draining"
    assert httpx.get(srv.url + "/health/live").status_code == 200  # alive, not ready
    refused = httpx.post(srv.url + "/v1/chat/completions", json=chat(), timeout=30)
    assert refused.status_code == 503 and "retry-after" in refused.headers
    assert refused.json()["error"]["code"] == "server_shutting_down"


def test_health_is_not_ready_when_the_database_is_not_writable(serve, monkeypatch):
    from palmchat.serve.routes import health

    monkeypatch.setattr(health, "DB_CHECK_TIMEOUT", 0.2)
    srv = serve()
    holder = sqlite3.connect(srv.store.path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        r = srv.health()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert r.status_code == 503 and r.json()["status"] == "database_unavailable"
    assert r.json()["checks"]["database"].startswith("not writable")
    assert srv.health().status_code == 200


def test_streams_send_keep_alive_comments_while_silent(serve, monkeypatch):
    from palmchat.serve import streaming

    monkeypatch.setattr(streaming, "KEEP_ALIVE_SECONDS", 0.1)
    srv = serve()
    release = threading.Event()
    forward = srv.model.hidden_states

    def slow(idx, cache=None, **kw):  # the first forward waits: the request sits as if queued
        release.wait(60)
        return forward(idx, cache=cache, **kw)

    srv.model.hidden_states = slow
    lines = []
    stream = Background(lambda: stream_lines(srv.url, chat(max_tokens=3), {}, lines))
    deadline = time.monotonic() + 30
    while lines.count(": keep-alive") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    release.set()
    stream.result()
    assert lines.count(": keep-alive") >= 3 and lines[-1] == "data: [DONE]"
    # the official client ignores the comments
    srv.model.hidden_states = forward
    chunks = list(srv.client().chat.completions.create(**chat(max_tokens=3), stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


# -- SIGTERM (a server process of its own) -------------------------------------------------------------------


def test_sigterm_drains_then_commits_the_running_stream_as_incomplete(artifacts, tmp_path):
    from palmchat.tokenizer.bpe import Tokenizer

    # the `small` shape: its 2000-token reply lasts well past the drain's second (the tiny model may finish it)
    tok_path = artifacts["root"] / "tokenizer.json"
    policy, _ = build_policy(tmp_path / "small-chat", Tokenizer.load(tok_path), tok_path, "small")
    db = tmp_path / "drain.db"
    srv = Server(policy, db, "--moderation", "none", "--drain-timeout", "1", "--model-name", MODEL,
                 log=tmp_path / "drain.log", no_auth=True).start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        first = c.responses.create(model=MODEL, input="First turn.", max_output_tokens=5)
        stream = c.responses.create(model=MODEL, input="A long story, please.", previous_response_id=first.id,
                                    max_output_tokens=2000, stream=True)
        response_id, deltas, during = None, 0, {}
        try:
            for event in stream:
                if event.type == "response.created":
                    response_id = event.response.id
                deltas += event.type == "response.output_text.delta"
                if deltas == 3 and not during:
                    srv.proc.send_signal(signal.SIGTERM)
                    time.sleep(0.2)
                    during["health"] = httpx.get(srv.url + "/health", timeout=5)
                    during["new"] = httpx.post(srv.url + "/v1/chat/completions", json=chat(), timeout=5)
        except (openai.APIError, httpx.HTTPError):
            pass  # the server cut the stream when the drain's time was up
        assert srv.proc.wait(timeout=60) == 0, srv.log()
    finally:
        srv.stop()
    assert during["health"].status_code == 503 and during["health"].json()["status"] == "draining"
    assert during["new"].status_code == 503 and "shutting down" in during["new"].text
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    srv.start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        stopped = c.responses.retrieve(response_id)
        assert stopped.status == "cancelled" and stopped.output[0].status == "incomplete"
        assert stopped.output_text and stopped.usage.output_tokens < 2000
        assert c.responses.retrieve(first.id).output_text == first.output_text
    finally:
        srv.stop()


# -- the load benchmark -------------------------------------------------------------------------------------------


def test_the_load_benchmark_quick_setting_has_no_errors(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_server_load.py"), "--quick",
                             "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=240,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["well_formed_errors"] == 0 and summary["well_formed_ok"] > 0
    assert summary["bad_requests"] > 0 and summary["bad_4xx"] == summary["bad_requests"]
