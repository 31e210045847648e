"""Headers that keep the chat and labelling pages safe even if a reply's markdown slipped something past the
sanitiser (static/common.js renderMarkdown): `SecurityHeaders` adds them to every response, pages, static files
and API answers alike.

The Content-Security-Policy lets a page run only the scripts and styles served by palmchat itself (no inline
script, nothing from another host), show images only from here or `data:` URLs, talk only to this server, and
never be framed by another site (clickjacking). `nosniff` stops a browser from running a file whose type it
guessed (a stored reply served as text cannot become a script).
"""

from __future__ import annotations

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "font-src 'self'",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))

# FastAPI's API reference pages (/docs, /redoc) are an inline script loading Swagger UI or ReDoc from a CDN: they
# show no user content, and get that much more
DOCS_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'unsafe-inline' https:",
    "style-src 'unsafe-inline' https:",
    "img-src 'self' data: https:",
    "font-src https:",
    "connect-src 'self'",
    "worker-src blob:",
    "frame-ancestors 'none'",
))
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc")

HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it
    (b"referrer-policy", b"no-referrer"),  # a link in a reply does not tell its site the conversation's URL
]


class SecurityHeaders:
    """ASGI middleware: a Content-Security-Policy and HEADERS on every HTTP response (a header the app already set
    is kept as it is)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        policy = DOCS_POLICY if scope["path"] in DOCS_PATHS else CONTENT_SECURITY_POLICY
        headers = [(b"content-security-policy", policy.encode()), *HEADERS]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((n, v) for n, v in headers if n not in present)]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
