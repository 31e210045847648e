"""Prometheus metrics for GET /metrics: the scheduler's counters and gauges, read when scraped;
palmchat_http_requests_total{route, status}, counted by the CountRequests middleware; and per model (the base's id
or an adapter's name) the latency histograms vLLM exports (RequestLatency): time to first token, inter-token
latency, queue time and end-to-end latency of each generation request."""

from __future__ import annotations

import time

from palmchat.serve.state import ServerState

# vLLM's buckets, in seconds
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)


class RequestLatency:
    """The latency histograms of generation requests, labelled by model_name. `observe` runs in the scheduler's
    thread at each of a request's events, so every time is the scheduler's own."""

    def __init__(self, registry):
        from prometheus_client import Histogram

        def histogram(name, help, buckets):
            return Histogram(f"palmchat_{name}_seconds", help, ["model_name"], buckets=buckets, registry=registry)

        self.ttft = histogram("time_to_first_token", "from a request's arrival to its first token", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency", "between consecutive tokens of a reply", ITL_BUCKETS)
        self.queue = histogram("request_queue_time", "from arrival to joining the batch (its prefill)",
                               REQUEST_BUCKETS)
        self.e2e = histogram("e2e_request_latency", "from arrival to the last token, of requests that finished "
                                                    "(stop or length)", REQUEST_BUCKETS)

    def observe(self, event, model: str, last: list) -> None:
        """One scheduler event of a request for `model`; `last` holds the time of its previous tokens ([None]
        before the first), kept by the caller per request."""
        now, request = time.perf_counter(), event.request
        if event.tokens:
            if last[0] is None:
                self.ttft.labels(model).observe(now - request.submitted)
            else:
                for _ in event.tokens:
                    self.itl.labels(model).observe((now - last[0]) / len(event.tokens))
            last[0] = now
        if event.finished and request.finish_reason in ("stop", "length"):
            if request.admitted is not None:
                self.queue.labels(model).observe(request.admitted - request.submitted)
            self.e2e.labels(model).observe(now - request.submitted)


def metrics_registry(state: ServerState):
    """(registry, request counter): a registry of its own per app, so two apps in one process do not clash."""
    from prometheus_client import CollectorRegistry, Counter
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class SchedulerMetrics:
        def collect(self):
            stats = state.scheduler.stats()
            for name, help in (("requests", "generation requests submitted to the scheduler"),
                               ("prompt_tokens", "prompt tokens of those requests"),
                               ("cached_tokens", "prompt tokens whose K/V came from the prefix cache"),
                               ("generated_tokens", "tokens sampled"),
                               ("refused", "requests refused for now: queue full, key at its limit, draining"),
                               ("failed", "requests that failed on their own (the others went on)")):
                yield CounterMetricFamily(f"palmchat_{name}", help, value=stats.get(f"{name}_total", 0))
            prompt = stats.get("prompt_tokens_total", 0)
            yield GaugeMetricFamily("palmchat_prefix_cache_hit_rate", "cached / prompt tokens since start",
                                    value=stats.get("cached_tokens_total", 0) / prompt if prompt else 0.0)
            for name, key, help in (("batch_size", "running", "requests decoding in the batch now"),
                                    ("queue_length", "waiting", "requests waiting to join the batch"),
                                    ("scheduler_heartbeat_age_seconds", "heartbeat_age",
                                     "seconds since the scheduler's loop last completed an iteration"),
                                    ("prefix_cache_tokens", "prefix_cache_tokens", "tokens held by the prefix cache"),
                                    ("prefix_cache_entries", "prefix_cache_entries", "sequences in the prefix cache")):
                yield GaugeMetricFamily(f"palmchat_{name}", help, value=stats.get(key, 0))

    registry = CollectorRegistry()
    registry.register(SchedulerMetrics())
    state.latency = RequestLatency(registry)
    counter = Counter("palmchat_http_requests", "HTTP requests by route and status", ["route", "status"],
                      registry=registry)
    return registry, counter


class CountRequests:
    """ASGI middleware: palmchat_http_requests_total{route, status}."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.counter.labels(route=route, status=str(status[0])).inc()
