"""OpenAI-shaped errors: every failure is answered as {"error": {"message", "type", "param", "code"}}, whether an
endpoint raised APIError, FastAPI's validation refused the body, no route matched, the body was too large, or
the server failed. `add_error_handlers(app)` installs the handlers; `BodyLimit` is the middleware that answers
413 before anything reads an oversized body.

A client's mistake (a 4xx) is explained to it. The server's own failure (a 500: an unexpected exception, or a
generation the scheduler failed) is not: its text may name files, settings or what other callers sent. The client
gets a generic message with an error id, and the server's log gets that id with the exception and its traceback
(`client_error_body`).
"""

from __future__ import annotations

import json
import logging
import secrets
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("uvicorn.error")  # uvicorn's error log: where `palmchat serve` reports its own failures


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def internal_error_body(exc: BaseException) -> dict:
    """A failure of the server's own, as a client sees it: a generic message and an id; the exception, with its
    traceback, goes to the server's log under that id."""
    error_id = "err_" + secrets.token_hex(8)
    log.error("internal error %s: %s: %s", error_id, type(exc).__name__, exc,
              exc_info=(type(exc), exc, exc.__traceback__))
    return error_body(f"The server had an error while processing your request (error id {error_id}: its operator "
                      f"finds the details in the server's log under that id).", type="server_error",
                      code="internal_error")


def client_error_body(exc: BaseException) -> dict:
    """What a client is told of `exc`: an APIError's own message, unless it is a 500 (a server failure, whose
    text the scheduler or a library wrote), and nothing of any other exception."""
    if isinstance(exc, APIError) and exc.status != 500:
        return exc.body()
    return internal_error_body(exc)


def not_found(what: str, id: str) -> APIError:
    return APIError(404, f"{what} with id '{id}' not found.", param=None, code="not_found")


class ASCIIJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate a client sent (valid JSON, invalid UTF-8) can then be echoed
    in an error message without failing to encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(status: int, body: dict, headers: dict | None = None) -> ASCIIJSONResponse:
    return ASCIIJSONResponse(body, status_code=status, headers=headers)


async def api_error(request: Request, exc: APIError):
    return error_response(exc.status, client_error_body(exc), exc.headers)


async def validation_error(request: Request, exc: RequestValidationError):
    error = exc.errors()[0]
    loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path")]
    if error.get("type") == "json_invalid":
        message = ("We could not parse the JSON body of your request: "
                   f"{(error.get('ctx') or {}).get('error', 'invalid JSON')}. The body must be a JSON object.")
        return error_response(400, error_body(message, code="invalid_json"))
    where = ".".join(loc)
    message = f"{where}: {error.get('msg')}" if where else str(error.get("msg"))
    if len(exc.errors()) > 1:
        message += f" (and {len(exc.errors()) - 1} more problems)"
    return error_response(400, error_body(message, param=where or None, code=str(error.get("type"))))


async def http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, error_body(message, code=None), getattr(exc, "headers", None))


async def server_error(request: Request, exc: Exception):
    return error_response(500, internal_error_body(exc))


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)


class LocalOnly:
    """ASGI middleware for a server on loopback: a request whose Host header names another host (a web page that
    reached 127.0.0.1 by DNS rebinding), or that a page of another origin sent (a cross-site request), gets 403.
    Loopback alone proves nothing: any page the user opens can send requests there."""

    def __init__(self, app, hosts: frozenset[str]):
        self.app, self.hosts = app, hosts

    def local(self, url_or_host: str) -> bool:
        host = urlsplit(url_or_host if "//" in url_or_host else f"//{url_or_host}").hostname
        return host is not None and host in self.hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            host, origin = headers.get(b"host", b"").decode("latin-1"), headers.get(b"origin")
            problem = (f"Host '{host}'" if not self.local(host) else
                       f"Origin '{origin.decode('latin-1')}'" if origin is not None
                       and not self.local(origin.decode("latin-1")) else None)
            if problem:
                body = json.dumps(error_body(f"{problem} is refused: this server listens on loopback and answers "
                                             f"only requests addressed to {', '.join(sorted(self.hosts))} from "
                                             f"pages of the same", code="forbidden_host")).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json")]})
                return await send({"type": "http.response.body", "body": body})
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body larger than `limit` bytes gets 413 before anything reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._reject(send, declared.isdigit())
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._reject(send, True)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send, too_large: bool):
        status, message = (413, f"The request body is larger than this server's limit of {self.limit} bytes") \
            if too_large else (400, "Invalid Content-Length header")
        body = json.dumps(error_body(message, code="request_too_large" if too_large else None)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
