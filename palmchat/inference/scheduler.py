"""Continuous batching for a server: requests join and leave the decode batch at any step, and prompts reuse the
K/V of earlier requests through a prefix cache.

    scheduler = Scheduler(model, dtype=torch.bfloat16)
    scheduler.start()                                     # a background thread owns the model from now on
    async for event in scheduler.stream(prompt_ids, SamplingParams(max_new_tokens=64)):
        event.tokens, event.logprobs, event.finished, event.request.cached_tokens

Like the Engine (palmchat/inference/engine.py, whose sampler and inference copy it uses) it works on token ids.
Orca (Yu et al. 2022, https://www.usenix.org/conference/osdi22/presentation/yu) introduced scheduling per
iteration instead of per request; vLLM's chunked prefill is the same idea applied to prompts.

One KV slab holds `max_batch` decode rows plus one spare row. The rows decoding now are always rows 0..n-1, so a
decode step runs the model on a view of the slab with no copy. Each iteration of the loop:

1. Cancelled requests leave; a finished or cancelled row is replaced by the last row (one row's K/V copied).
2. Prefill, one chunk: a waiting request takes the spare row; its longest cached prefix is copied in and only
   the rest of its prompt is computed, `prefill_chunk` tokens per iteration so that a long prompt does not
   stall the streams already running. When its prompt is done its K/V is stored in the prefix cache (so its n
   siblings and later turns hit it), its row is copied to row n, and it joins the batch.
3. Decode: one token for every running row, sampled from its last logits; finished rows release their K/V to
   the prefix cache and leave.

Events (newly final tokens of one request) are passed to each request's `on_event` from the scheduler's thread;
`stream` bridges them to asyncio.

Limits, so that a server stays usable under load and one client cannot take it over:
- `max_queue`: requests waiting for a row at most; `submit` refuses more with `Refused` (status 503).
- `max_requests_per_owner`: submissions (a group of n samples counts once) of one owner in flight at most
  (429). The owner is `SamplingParams.cache_salt`, the server's API key.
- `max_rows_per_owner`: batch rows one owner's requests hold at once; the rest of its samples wait for rows to
  free, so that one n=16 request cannot take every row while others wait.
- Fair admission: when a row frees, the waiting request of the owner holding the fewest rows goes first (the
  oldest among equals), not the oldest overall.

Faults are isolated: an exception while one request prefills fails that request only; an exception in a decode
step runs each row alone to find the one that fails, and the others go on. `heartbeat` is the monotonic time of
the loop's last iteration, for a health check that the thread is making progress; `drain()` refuses new work
while what runs finishes.

Each request may name a LoRA adapter of the model (palmchat/model/lora.py): rows of different adapters decode in
the same step, each adding its own low-rank delta to the shared base matmuls. Adapters join the model between two
iterations (`between_steps`) and leave it once no request in flight uses them (`unload_adapter`), with their
prefix-cache entries; the prefix cache never shares K/V across adapters.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from palmchat.inference.engine import Engine, Row, Sampler, SamplingParams, TokenLogprobs
from palmchat.inference.kv_cache import KVCache
from palmchat.inference.prefix_cache import PrefixCache
from palmchat.model.lora import adapters, remove_adapter, set_adapter, set_row_adapters, use_adapter

log = logging.getLogger(__name__)
RETRY_AFTER = 2.0  # seconds a refused client is told to wait: about one reply's time on a busy server


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    adapter: str | None = None
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache; set before the first event
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    exception: BaseException | None = None  # what failed it (error), for the server's log
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # perf_counter() when the first token was sampled
    admitted: float | None = None  # perf_counter() when it left the queue for the batch (its prefill began)
    _row: Row = field(init=False)
    _cancelled: bool = False
    _prefilled: int = 0  # prompt tokens in the row's cache so far
    _sampled: list[int] = field(default_factory=list)  # every sampled token (the output may drop a stop sequence)
    _generator: torch.Generator | None = None  # the row's random stream, kept when the batch around it changes
    _group: list[int] = field(default_factory=lambda: [1])  # unfinished requests of its submit_all, shared

    def __post_init__(self):
        self._row = Row(self.params, self.prompt)

    @property
    def owner(self) -> str:
        """Who the request counts against for the per-owner limits: the cache salt (the server's API key)."""
        return self.params.cache_salt or ""

    @property
    def cache_key(self) -> tuple[str | None, str | None]:
        """The prefix-cache namespace: entries are reused only under the same weights (adapter) and for the same
        cache_salt (the server's API key), never across them."""
        return self.adapter, self.params.cache_salt

    @property
    def tokens(self) -> list[int]:
        return self._row.tokens

    @property
    def logprobs(self) -> list[float]:
        return self._row.logprobs

    @property
    def reported(self) -> list[TokenLogprobs | None]:
        return self._row.reported

    def cancel(self) -> None:
        """Thread-safe: the request leaves the batch at the scheduler's next iteration."""
        self._cancelled = True


class Refused(RuntimeError):
    """submit refused a request for now: the queue is full or the server is draining (status 503), or its owner
    has too many requests in flight (429). code: which of these; retry_after: seconds to wait before trying
    again."""

    def __init__(self, message: str, status: int, code: str, retry_after: float = RETRY_AFTER):
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


@dataclass
class Event:
    request: Request
    tokens: list[int]
    logprobs: list[float]
    finished: bool
    reported: list[TokenLogprobs | None] = field(default_factory=list)  # per token, when the params ask for logprobs


class Scheduler:
    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None, max_batch: int = 16,
                 prefix_cache_tokens: int = 65536, prefill_chunk: int = 256, max_queue: int = 0,
                 max_requests_per_owner: int = 0, max_rows_per_owner: int = 0, stall_seconds: float = 60.0,
                 quantize: str | None = None):
        """max_queue, max_requests_per_owner, max_rows_per_owner: the limits above (0: none). stall_seconds: how
        long the loop may go without an iteration while work is pending before `stalled` says so. quantize: the
        engine's (Engine: "int8" or "int4" weights in the inference copy)."""
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1")
        if min(max_queue, max_requests_per_owner, max_rows_per_owner) < 0:
            raise ValueError("max_queue, max_requests_per_owner and max_rows_per_owner must be >= 0 (0: no limit)")
        self.engine = Engine(model, dtype=dtype, quantize=quantize)
        self.config = model.config
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.max_queue, self.max_requests_per_owner = max_queue, max_requests_per_owner
        self.max_rows_per_owner, self.stall_seconds = max_rows_per_owner, stall_seconds
        self.prefix_cache = PrefixCache(prefix_cache_tokens)
        self._wake = threading.Condition()  # (an RLock inside: _emit may take it while it is held)
        self._waiting: list[Request] = []
        self._in_flight: Counter[str] = Counter()  # owner -> its unfinished submissions
        self._running: list[Request] = []  # row b of the slab decodes _running[b]
        self._prefilling: Request | None = None  # in the spare row, slab row max_batch
        self._logits: torch.Tensor | None = None  # (n, V): the running rows' next-token logits
        self._sampler: Sampler | None = None  # rebuilt when the running set changes
        self._slab: KVCache | None = None
        self._thread: threading.Thread | None = None
        self._stopping = self.draining = False
        self.heartbeat = time.monotonic()  # the loop's last sign of life
        # adapters: changes to the model wait for the scheduler's thread; what the decode rows use now
        self._between_steps: deque[tuple[Callable[[], object], concurrent.futures.Future]] = deque()
        # refused to new requests; each leaves the model (and its future is done) when no request in flight uses it
        self._unloading: dict[str, concurrent.futures.Future] = {}
        self._row_adapters: tuple[str | None, ...] = ()
        self._adapters = frozenset(adapters(model))  # the model's adapters as the scheduler's thread last saw them
        self.counters = dict(requests_total=0, prompt_tokens_total=0, cached_tokens_total=0,
                             generated_tokens_total=0, decode_steps_total=0, decode_rows_total=0,
                             refused_total=0, failed_total=0)

    # -- the public side (any thread) -------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams, on_event: Callable[[Event], None],
               adapter: str | None = None) -> Request:
        """Queue a request; raises ValueError for one that can never run (see Engine.check), Refused for one
        that does not fit now (see the limits above)."""
        return self.submit_all(prompt, [(params, on_event)], adapter)[0]

    def submit_all(self, prompt: list[int], samples: list[tuple[SamplingParams, Callable[[Event], None]]],
                   adapter: str | None = None) -> list[Request]:
        """Queue several samples of one prompt, all or none: one submission of one owner (the first sample's
        cache_salt) for the per-owner limit. Raises as submit does."""
        for params, _ in samples:
            self.engine.check(prompt, params)
        adapter = adapter if adapter is not None else samples[0][0].adapter
        group = [len(samples)]
        requests = [Request(list(prompt), params, on_event, adapter, _group=group) for params, on_event in samples]
        owner = requests[0].owner
        with self._wake:  # under the lock: an adapter being unloaded is either refused here or waited for
            if adapter is not None and (adapter in self._unloading or adapter not in self._loaded_adapters()):
                raise ValueError(f"unknown adapter {adapter!r}; loaded: {sorted(self._loaded_adapters()) or 'none'}")
            if self._stopping or self.draining:
                self.counters["refused_total"] += 1
                raise Refused("the server is shutting down and takes no new requests", 503, "server_shutting_down",
                              retry_after=10.0)
            if self.max_queue and self._waiting and len(self._waiting) + len(requests) > self.max_queue:
                self.counters["refused_total"] += 1
                raise Refused(f"the server is overloaded: {len(self._waiting)} requests are waiting, the queue's "
                              f"limit is {self.max_queue} (--max-queue); retry later", 503, "server_overloaded")
            if self.max_requests_per_owner and self._in_flight[owner] >= self.max_requests_per_owner:
                self.counters["refused_total"] += 1
                raise Refused(f"too many requests in flight for this key: the limit is "
                              f"{self.max_requests_per_owner} at a time (--max-requests-per-key); wait for one "
                              f"to finish", 429, "too_many_requests_in_flight")
            if self.idle:  # the loop wakes now: its last iteration may be long ago
                self.heartbeat = time.monotonic()
            self._in_flight[owner] += 1
            self._waiting.extend(requests)
            self.counters["requests_total"] += len(requests)
            self._wake.notify()
        return requests

    async def stream(self, prompt: list[int], params: SamplingParams, adapter: str | None = None,
                     on_submit: Callable[[Request], None] | None = None) -> AsyncIterator[Event]:
        """The request's events in an asyncio program. Closing the iterator early (a client that went away)
        cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        request = self.submit(prompt, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev), adapter)
        if on_submit is not None:
            on_submit(request)
        try:
            while True:
                event = await queue.get()
                yield event
                if event.finished:
                    return
        finally:
            if request.finish_reason is None:
                request.cancel()

    def start(self) -> Scheduler:
        if self._thread is None:
            self._adapters = frozenset(adapters(self.engine.model))
            self._thread = threading.Thread(target=self._loop, name="palmchat-scheduler", daemon=True)
            self._thread.start()
        return self

    def drain(self) -> None:
        """Refuse new requests (Refused, 503) from now on; those already submitted run to their end."""
        with self._wake:
            self.draining = True

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._running or self._prefilling)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or running, for at most `timeout` seconds; whether it is idle now."""
        deadline = time.monotonic() + timeout
        while not self.idle and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.idle

    @property
    def stalled(self) -> bool:
        """Work is pending, but the loop has not completed an iteration for stall_seconds (or its thread died)."""
        if self.idle:
            return False
        dead = self._thread is None or not self._thread.is_alive()
        return dead or time.monotonic() - self.heartbeat > self.stall_seconds

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def stats(self) -> dict:
        waiting = len(self._waiting) + (self._prefilling is not None)
        return dict(self.counters, running=len(self._running), waiting=waiting,
                    heartbeat_age=round(time.monotonic() - self.heartbeat, 3),
                    prefix_cache_tokens=self.prefix_cache.tokens, prefix_cache_entries=len(self.prefix_cache.entries))

    # -- the scheduler's thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._running or self._prefilling
                           or self._between_steps or self._unloading):
                    self._wake.wait()
                if self._stopping:
                    break
            self.heartbeat = time.monotonic()
            try:
                self._run_between_steps()
                self._release_unused_adapters()
                with torch.inference_mode():
                    self._iteration()
            except Exception as e:  # a bug outside any one request must not hang every client: fail those in flight
                log.exception("scheduler iteration failed; failing every request in flight")
                self._fail_all("the server had an error while generating", exception=e)
            self.heartbeat = time.monotonic()
        self._fail_all("the server is shutting down", reason="cancelled")
        with self._wake:
            pending = [f for _, f in self._between_steps] + list(self._unloading.values())
            self._between_steps.clear()
            self._unloading.clear()
        for future in pending:
            future.set_exception(RuntimeError("the scheduler is stopped"))

    def _iteration(self) -> None:
        runner = self.engine.sync()
        if self._slab is None:
            param = next(runner.parameters())
            self._slab = KVCache(self.config, self.max_batch + 1, dtype=param.dtype, device=param.device)
        for b in reversed(range(len(self._running))):
            if self._running[b]._cancelled:
                self._finish(b, "cancelled")
        if self._prefilling is not None and self._prefilling._cancelled:
            self._emit(self._prefilling, [], finish="cancelled")
            self._prefilling = None
        with self._wake:  # cancelled while waiting: leave now, not when a row would have freed
            for request in [r for r in self._waiting if r._cancelled]:
                self._waiting.remove(request)
                self._emit(request, [], finish="cancelled")
        if self._prefilling is None and len(self._running) < self.max_batch:
            request = self._next_waiting()
            if request is not None:
                try:
                    self._admit(request)
                except Exception as e:
                    self._fail(request, e)
        if self._prefilling is not None:
            try:
                self._prefill_chunk(runner)
            except Exception as e:  # say an out-of-memory on one long prompt: only that request fails
                request, self._prefilling = self._prefilling, None
                self._fail(request, e)
        if self._running:
            self._decode_step(runner)

    def _next_waiting(self) -> Request | None:
        """Take the waiting request of the owner holding the fewest rows (the oldest among equals), skipping
        owners at max_rows_per_owner."""
        rows = Counter(r.owner for r in self._running)
        with self._wake:
            best, fewest = None, None
            for i, request in enumerate(self._waiting):
                held = rows[request.owner]
                if self.max_rows_per_owner and held >= self.max_rows_per_owner:
                    continue
                if fewest is None or held < fewest:
                    best, fewest = i, held
                    if held == 0:
                        break
            return None if best is None else self._waiting.pop(best)

    def _admit(self, request: Request) -> None:
        prompt = torch.tensor(request.prompt, dtype=torch.long)
        # at least the prompt's last token is computed: its logits give the first new token
        entry, m = self.prefix_cache.lookup(request.cache_key, prompt, limit=len(request.prompt) - 1)
        row = self._slab.rows(self.max_batch, self.max_batch + 1)
        if m:
            row.k[:, 0, :, :m] = entry.k[:, :, :m]
            row.v[:, 0, :, :m] = entry.v[:, :, :m]
        row.lengths.fill_(m)
        request.cached_tokens = request._prefilled = m
        request.admitted = time.perf_counter()
        self.counters["prompt_tokens_total"] += len(request.prompt)
        self.counters["cached_tokens_total"] += m
        self._prefilling = request

    def _prefill_chunk(self, runner: nn.Module) -> None:
        request = self._prefilling
        start = request._prefilled
        stop = min(start + self.prefill_chunk, len(request.prompt))
        row = self._slab.rows(self.max_batch, self.max_batch + 1)
        ids = torch.tensor([request.prompt[start:stop]], dtype=torch.long, device=row.lengths.device)
        with use_adapter(runner, request.adapter):
            hidden = runner.hidden_states(ids, cache=row)  # (1, T, C)
        request._prefilled = stop
        if stop < len(request.prompt):
            return
        n = len(request.prompt)
        self.prefix_cache.insert(request.cache_key, torch.tensor(request.prompt),
                                 row.k[:, 0, :, :n].clone(), row.v[:, 0, :, :n].clone())
        logits = self._project(runner, hidden[:, -1]).float()  # (1, V)
        b = len(self._running)  # join the batch as row b
        self._copy_row(self.max_batch, b, n)
        self._logits = logits if self._logits is None else torch.cat([self._logits, logits])
        self._running.append(request)
        self._sampler = None
        self._prefilling = None

    def _decode_step(self, runner: nn.Module) -> None:
        if self._sampler is None:
            self._sampler = Sampler([r._row for r in self._running], self._logits.device,
                                    generators=[r._generator for r in self._running])
            for r, g in zip(self._running, self._sampler.generators):
                r._generator = g
        sampled = self._sampler(self._logits)
        now = time.perf_counter()
        for request, token, logprob, reported in zip(self._running, sampled.tokens.tolist(),
                                                     sampled.logprobs.tolist(), sampled.reported):
            if request._row.error is not None:  # its logits processor failed: it leaves below
                continue
            request.first_token = request.first_token or now
            request._sampled.append(token)
            self._emit(request, request._row.add(token, logprob, reported), finish=request._row.finish_reason)
        self.counters["generated_tokens_total"] += len(self._running)
        for b in reversed(range(len(self._running))):
            if self._running[b]._row.error is not None:
                self._finish(b, "error", error=self._running[b]._row.error)
            elif self._running[b]._row.finish_reason is not None:
                self._finish(b, None)
        if not self._running:
            return
        n = len(self._running)
        batch = self._slab.rows(0, n)
        # rows moved when others left: each row feeds back its own last sampled token
        tokens = torch.tensor([[r._sampled[-1]] for r in self._running], device=batch.lengths.device)  # (n, 1)
        self._set_row_adapters(tuple(r.adapter for r in self._running))
        try:
            hidden = runner.hidden_states(tokens, cache=batch)  # (n, 1, C)
            self._logits = self._project(runner, hidden[:, -1]).float()  # (n, V)
        except Exception as e:  # the cache advances only after a forward succeeded: each row can run again
            self._decode_rows_alone(runner, tokens, e)
        self.counters["decode_steps_total"] += 1
        self.counters["decode_rows_total"] += n

    def _decode_rows_alone(self, runner: nn.Module, tokens: torch.Tensor, batch_error: Exception) -> None:
        """The batch's decode step failed: run each row alone; the rows that fail alone leave with an error."""
        log.warning("decode step of %d rows failed (%s: %s); running each row alone", len(self._running),
                    type(batch_error).__name__, batch_error)
        logits, failed = [], []
        for b, request in enumerate(self._running):
            try:
                with use_adapter(runner, request.adapter):
                    hidden = runner.hidden_states(tokens[b:b + 1], cache=self._slab.rows(b, b + 1))  # (1, 1, C)
                logits.append(self._project(runner, hidden[:, -1]).float())
            except Exception as e:
                failed.append((b, e))
                logits.append(torch.zeros_like(self._logits[b:b + 1]))
        self._logits = torch.cat(logits)
        for b, e in reversed(failed):
            self._finish(b, "error", error=e)

    # -- adapters: per-row LoRA, and loading / unloading while serving ---------------------------------------

    def between_steps(self, change: Callable[[], object]) -> concurrent.futures.Future:
        """Run `change()` (e.g. adding an adapter to the model) on the scheduler's thread between two iterations, so
        that no step reads the model while it changes; at once when the scheduler is not running. The future holds
        its result or exception. The inference copy is rebuilt at the next step (engine.sync sees new parameters)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._thread is not None:
                self._between_steps.append((change, future))
                self._wake.notify()
                return future
        try:
            future.set_result(change())
        except Exception as e:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(e)
        return future

    def unload_adapter(self, name: str) -> concurrent.futures.Future:
        """Refuse new requests for adapter `name` from now on; the requests in flight that use it finish with it, then
        it leaves the model with its prefix-cache entries (the future's result: None)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if name not in self._loaded_adapters() or name in self._unloading:
                raise ValueError(f"unknown adapter {name!r}; loaded: {sorted(self._loaded_adapters()) or 'none'}")
            self._unloading[name] = future
            self._wake.notify()
        if self._thread is None:
            self._release_unused_adapters()
        return future

    def _loaded_adapters(self) -> frozenset[str]:
        """The model's adapters: while the scheduler runs, as its thread last saw them (another thread must not walk
        the model while `between_steps` changes it)."""
        return self._adapters if self._thread is not None else frozenset(adapters(self.engine.model))

    def _release_unused_adapters(self) -> None:
        """Remove the adapters being unloaded that no request in flight uses any more (the scheduler's thread)."""
        for name, future in list(self._unloading.items()):
            with self._wake:
                in_flight = [*self._running, *self._waiting, *([self._prefilling] if self._prefilling else [])]
            if any(r.adapter == name for r in in_flight):
                continue
            try:
                remove_adapter(self.engine.model, name)
            except Exception as e:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(e)
            else:
                future.set_result(None)
            del self._unloading[name]
            self._adapters = frozenset(adapters(self.engine.model))
            self._row_adapters = ()  # the rows' adapters are set again at the next decode step
            # a later adapter of the same name has other weights: its K/V must not be reused
            self.prefix_cache.drop(lambda key, name=name: key[0] == name)

    def _run_between_steps(self) -> None:
        with self._wake:
            pending = list(self._between_steps)
            self._between_steps.clear()
        for change, future in pending:
            try:
                result = change()
            except Exception as e:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(e)
            else:
                self._adapters = frozenset(adapters(self.engine.model))  # before the caller learns it is done
                future.set_result(result)

    def _set_row_adapters(self, names: tuple[str | None, ...]) -> None:
        """Each decode row applies its request's adapter in the same batched step (model/lora.py gathers the rows'
        A and B once per batch). Set on the model, which engine.sync mirrors onto its copy, only when the rows
        change: the per-row weights are kept while the `row_slots` tensor stays the same."""
        if names == self._row_adapters:
            return
        if any(names):
            set_row_adapters(self.engine.model, list(names))
        else:
            set_adapter(self.engine.model, None)
        self._row_adapters = names
        self.engine.sync()

    # -- helpers --------------------------------------------------------------------------------------

    def _project(self, runner: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        head = self.engine.packed_head  # the packed output projection of the runner, when there is one
        return runner.logits(hidden) if head is None else head(hidden)

    def _copy_row(self, src: int, dst: int, length: int) -> None:
        if src != dst:
            self._slab.k[:, dst, :, :length] = self._slab.k[:, src, :, :length]
            self._slab.v[:, dst, :, :length] = self._slab.v[:, src, :, :length]
        self._slab.lengths[dst] = length

    def _finish(self, b: int, reason: str | None, error: Exception | None = None) -> None:
        """Row b leaves the batch: its K/V goes to the prefix cache, the last row moves into its place."""
        request = self._running[b]
        if error is not None:
            self._fail(request, error)
        elif reason is not None:  # cancelled (a finished row has its reason and final event already)
            request._row.finish_reason = reason
            self._emit(request, [], finish=reason)
        length = int(self._slab.lengths[b])  # prompt + the sampled tokens fed back (all but the last)
        tokens = torch.tensor((request.prompt + request._sampled)[:length])
        self.prefix_cache.insert(request.cache_key, tokens, self._slab.k[:, b, :, :length].clone(),
                                 self._slab.v[:, b, :, :length].clone())
        last = len(self._running) - 1
        if self._sampler is not None:  # the same move in its per-row state (counts, bias, random streams)
            self._sampler.keep([last if i == b else i for i in range(last)])
        if b != last:
            self._copy_row(last, b, int(self._slab.lengths[last]))
            self._running[b] = self._running[last]
            self._logits[b] = self._logits[last]
        self._running.pop()
        self._logits = self._logits[: len(self._running)]

    def _fail(self, request: Request, error: Exception) -> None:
        """One request failed on its own (its prefill, or its row of a decode step): it ends with an error, and
        the exception goes to the log, not to the client."""
        log.error("request failed: %s: %s", type(error).__name__, error, exc_info=error)
        self.counters["failed_total"] += 1
        request._row.finish_reason = "error"
        request.error = f"the server had an error while generating this reply ({type(error).__name__})"
        request.exception = error
        self._emit(request, [], finish="error")

    def _emit(self, request: Request, released: list[tuple[int, float, TokenLogprobs | None]],
              finish: str | None) -> None:
        if finish is not None and request.finish_reason is None:
            with self._wake:  # the last of its group to end frees its owner's in-flight slot
                request._group[0] -= 1
                if request._group[0] == 0:
                    self._in_flight[request.owner] -= 1
                    if self._in_flight[request.owner] <= 0:
                        del self._in_flight[request.owner]
        if finish is not None:
            request.finish_reason = finish
        if not released and finish is None:
            return
        event = Event(request, [t for t, _, _ in released], [lp for _, lp, _ in released], finish is not None,
                      [r for _, _, r in released])
        try:
            request.on_event(event)
        except Exception:  # a consumer's bug (or a closed event loop) must not stop the batch
            request.cancel()

    def _fail_all(self, message: str, reason: str = "error", exception: BaseException | None = None) -> None:
        with self._wake:
            pending = list(self._waiting)
            self._waiting.clear()
        for request in self._running + ([self._prefilling] if self._prefilling else []) + pending:
            if request.finish_reason is None:
                request.error = message if reason == "error" else None
                request.exception = exception
                self._emit(request, [], finish=reason)
        self._running, self._prefilling, self._logits, self._sampler = [], None, None, None


__all__ = ["Scheduler", "Request", "Event", "Refused"]
