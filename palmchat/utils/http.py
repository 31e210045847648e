"""JSON over HTTP with the standard library only (the feedback loop and the judge need no client package)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request


def http_json(method: str, url: str, body: dict | None = None, headers: dict | None = None,
              timeout: float = 600, retries: int = 5) -> dict:
    """One request; an HTTP error raises RuntimeError with the server's message. A 429 (the server's rate
    limit) is retried after the time it asks for, up to `retries` times."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        if e.code == 429 and retries > 0:
            time.sleep(min(60.0, float(e.headers.get("retry-after") or 1)))
            return http_json(method, url, body, headers, timeout, retries - 1)
        try:
            message = json.loads(e.read())["error"]["message"]
        except Exception:  # noqa: BLE001 - not an OpenAI-shaped error: the status line says enough
            message = e.reason
        raise RuntimeError(f"{method} {url}: {e.code} {message}") from None
    except urllib.error.URLError as e:
        raise RuntimeError(f"{method} {url}: cannot reach the server ({e.reason})") from None
    except TimeoutError:
        raise RuntimeError(f"{method} {url}: no answer within {timeout:g} s") from None
