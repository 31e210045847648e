"""Prometheus metrics for GET /metrics: the scheduler's counters and gauges, read when scraped, and
palmchat_http_requests_total{route, status}, counted by the CountRequests middleware."""

from __future__ import annotations

from palmchat.serve.state import ServerState


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
