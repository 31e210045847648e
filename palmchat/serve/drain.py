"""`palmchat serve` under uvicorn, with a drain on SIGTERM (what an orchestrator sends before it stops a server):

1. the scheduler refuses new generation requests (503 with retry-after) and /health answers 503 "draining", so a
   load balancer stops sending work;
2. the requests already admitted run to their end, for up to `drain_timeout` seconds;
3. then uvicorn shuts down: a request still running is cancelled as when its client goes away (a streamed turn
   of /v1/responses is committed as incomplete), and the process exits with 0.

Ctrl-C (SIGINT), or a second SIGTERM, stops at once as uvicorn does.
"""

from __future__ import annotations

import signal
import threading

import uvicorn


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, scheduler, drain_timeout: float):
        super().__init__(config)
        self.scheduler, self.drain_timeout = scheduler, drain_timeout
        self.drain_thread: threading.Thread | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if sig != signal.SIGTERM or self.drain_thread is not None:
            return super().handle_exit(sig, frame)
        # not recorded as a captured signal: uvicorn would raise it again after shutting down (exit status -15)
        self.scheduler.drain()
        print(f"palmchat serve: SIGTERM: draining (new requests get 503; up to {self.drain_timeout:g}s for "
              f"those running)", flush=True)
        self.drain_thread = threading.Thread(target=self._exit_when_drained, name="palmchat-drain", daemon=True)
        self.drain_thread.start()

    def _exit_when_drained(self) -> None:
        if not self.scheduler.wait_idle(self.drain_timeout):  # the drain's time is up: what still runs is cancelled
            self.config.timeout_graceful_shutdown = 0.1
        self.should_exit = True


def serve(app, host: str, port: int, log_level: str, scheduler, drain_timeout: float) -> None:
    """Run `app` until Ctrl-C, or until drained after SIGTERM."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=3)
    DrainingServer(config, scheduler, drain_timeout).run()
