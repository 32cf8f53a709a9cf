"""Security headers on every response the gateway sends, pages and API alike."""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Our pages (/dashboard, /explain, /traces) load their scripts and styles from /static
#: and talk only to this gateway (fetch, EventSource); no inline script or style runs, so
#: markup injected into a page could not execute. API responses get the same policy,
#: which forbids everything a JSON body never needs.
PAGE_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)

#: FastAPI's /docs (Swagger UI) and /redoc load their bundles from jsdelivr, fonts from
#: Google and start with an inline script whose text depends on the request's root path,
#: so those pages, and only those, allow inline code and those hosts. They show nothing
#: but our own OpenAPI document.
DOCS_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net",
        "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com",
        "font-src https://fonts.gstatic.com",
        "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly",
        "connect-src 'self'",
        "worker-src blob:",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)

#: Sent with every response; a response that already names one keeps its own.
SECURITY_HEADERS = {
    "Content-Security-Policy": PAGE_POLICY,
    # Browsers take the declared type (JSON stays JSON, never sniffed into HTML).
    "X-Content-Type-Options": "nosniff",
    # For browsers older than CSP's frame-ancestors: no page of ours in anyone's frame.
    "X-Frame-Options": "DENY",
    # Trace ids and model names in our URLs stay here when a link leads elsewhere.
    "Referrer-Policy": "no-referrer",
}


class SecurityHeaders:
    """ASGI middleware adding `SECURITY_HEADERS` to every HTTP response, with
    `DOCS_POLICY` as the policy of the paths in `docs_paths`. Plain ASGI, not
    BaseHTTPMiddleware, so the dashboard's event stream is not buffered."""

    def __init__(self, app: ASGIApp, docs_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.docs_paths = docs_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        policy = DOCS_POLICY if path in self.docs_paths else PAGE_POLICY
        # Answers carry the caller's texts and their labels: no shared cache may keep them.
        private = path.startswith(("/v1/", "/v2/"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers[name] = policy if name == "Content-Security-Policy" else value
                if private and "Cache-Control" not in headers:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)
