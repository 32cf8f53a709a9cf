"""RFC 9457 problem details for every error the gateway returns, mapped once from
`shared.errors` (and from FastAPI's own validation and HTTP errors)."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry import trace
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.headers import SECURITY_HEADERS
from shared.errors import InfermeshError

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    413: "Content too large",
    422: "Unprocessable content",
}


class GatewayError(InfermeshError):
    """An error only the gateway raises, with the HTTP headers its response needs."""

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.headers = headers or {}


class Problem(BaseModel):
    """An error response (RFC 9457)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str
    trace_id: str


def trace_id() -> str:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else uuid.uuid4().hex


def problem(
    request: Request, status: int, title: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = Problem(title=title, status=status, detail=detail, instance=request.url.path, trace_id=trace_id())
    return JSONResponse(body.model_dump(), status_code=status, media_type=PROBLEM_JSON, headers=headers)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(InfermeshError)
    async def infermesh_error(request: Request, error: InfermeshError) -> JSONResponse:
        headers = dict(error.headers) if isinstance(error, GatewayError) else {}
        if error.http_status in (429, 503):
            headers.setdefault("Retry-After", "1")
        return problem(request, error.http_status, error.title, error.detail, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return problem(request, 400, "Malformed JSON", f"the body is not valid JSON: {first.get('msg')}")
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
        return problem(request, 422, "Invalid request", f"{where}: {first.get('msg')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        title = TITLES.get(error.status_code, "Error")
        return problem(request, error.status_code, title, str(error.detail), dict(error.headers or {}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        # Starlette answers this one outside every middleware, SecurityHeaders included.
        return problem(request, 500, "Internal server error", "Internal server error", dict(SECURITY_HEADERS))
