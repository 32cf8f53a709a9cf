"""Who may call the API, and how often: API keys checked against their hashes, then the
caller's rate limit. One FastAPI dependency (`admit_caller`) guards /v1 and the v2 infer
routes."""

from __future__ import annotations

import logging
from typing import Annotated

import grpc
from fastapi import Header, Request
from opentelemetry import trace

from gateway.apikeys import ApiKeyRing
from gateway.problems import GatewayError
from gateway.ratelimit import TokenBuckets, retry_after_header

logger = logging.getLogger(__name__)

#: Span attribute naming the API key a request used (its name, never the key).
KEY_NAME_ATTRIBUTE = "infermesh.api_key.name"


class Unauthorized(GatewayError):
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    title = "Unauthorized"

    def __init__(self, detail: str) -> None:
        # RFC 9110: a 401 names the scheme the client should use.
        super().__init__(detail, {"WWW-Authenticate": 'Bearer realm="infermesh"'})


class RateLimited(GatewayError):
    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    title = "Too many requests"

    def __init__(self, detail: str, wait_seconds: float) -> None:
        super().__init__(detail, {"Retry-After": retry_after_header(wait_seconds)})


class Admission:
    """Decides whether one request goes ahead: with keys configured, the offered key must
    be one of them and within that key's rate; without keys, the client address must be
    within its rate (when that limit is on)."""

    def __init__(
        self, keys: ApiKeyRing, key_buckets: TokenBuckets | None, address_buckets: TokenBuckets | None
    ) -> None:
        self.keys = keys
        self.key_buckets = key_buckets
        self.address_buckets = address_buckets

    def admit(self, offered_key: str | None, client_address: str) -> str | None:
        """The name of the key the request used (None when no keys are configured), or
        Unauthorized / RateLimited."""
        if not self.keys:
            if self.address_buckets is not None:
                wait = self.address_buckets.take(client_address)
                if wait:
                    raise RateLimited(f"this client is over its limit of {_rate(self.address_buckets)}", wait)
            return None
        if offered_key is None:
            raise Unauthorized("an API key is required: send `Authorization: Bearer <key>` or `X-API-Key`")
        name = self.keys.name_of(offered_key)
        if name is None:
            logger.info("refused a request with an unknown API key from %s", client_address)
            raise Unauthorized("the API key is not valid")
        if self.key_buckets is not None:
            wait = self.key_buckets.take(name)
            if wait:
                raise RateLimited(f"API key {name!r} is over its limit of {_rate(self.key_buckets)}", wait)
        return name


def _rate(buckets: TokenBuckets) -> str:
    return f"{buckets.rate_per_second:g} requests/s (burst {buckets.burst})"


async def admit_caller(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> None:
    """The dependency: the caller's key from `X-API-Key` or `Authorization: Bearer`.
    Async on purpose: FastAPI runs a plain `def` dependency in a thread pool, and the
    token buckets are not to be shared between threads."""
    admission: Admission = request.app.state.admission
    # RFC 9110: the scheme name is case-insensitive.
    bearer = authorization[7:] if authorization and authorization[:7].lower() == "bearer " else None
    client_address = request.client.host if request.client else "unknown"
    name = admission.admit(x_api_key or bearer, client_address)
    if name is not None:
        request.state.api_key_name = name
        trace.get_current_span().set_attribute(KEY_NAME_ATTRIBUTE, name)
