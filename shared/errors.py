"""The one error taxonomy of infermesh and its mapping to gRPC status codes and HTTP.

Each class carries its gRPC code, HTTP status and title; `detail` is what the caller
sees. Cores, the pipeline client and the gateway raise them, and each transport maps
them once:

- gRPC: `shared.grpc_server.StatusInterceptor` aborts with the class's code and detail
  and names the class in the `infermesh-error-type` trailing metadata (InputTooLarge and
  InvalidInput share INVALID_ARGUMENT).
- HTTP: the gateway's handler (`gateway.problems`) answers application/problem+json
  with the class's status and title.
- Back from a downstream call: `from_grpc_error` rebuilds the class the service raised
  (by that metadata, else by status code), so the gateway answers a service's error
  with the same status and the worker can tell poison input (InvalidInput,
  InputTooLarge: dead-lettered) from transient failures (Unavailable, Overloaded,
  DeadlineExceeded: retried).

Anything else is INTERNAL (HTTP 500) with the generic detail "Internal server error",
its traceback going only to the log. A downstream status outside the taxonomy becomes
"downstream service failed", and an UNAVAILABLE raised by gRPC itself (whose detail
names internal addresses) a generic Unavailable, the detail going to the log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import cast

import grpc

logger = logging.getLogger(__name__)


class InfermeshError(Exception):
    """Base of every error a caller may see; `detail` is safe to show them."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500
    title: str = "Internal server error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(InfermeshError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    title = "Invalid input"


class UnknownHead(InvalidInput):
    """A request names a head its model version lacks (the detail names those it has):
    INVALID_ARGUMENT over gRPC; 422 over REST, as for a field that does not validate."""

    http_status = 422
    title = "Unknown head"


class InputTooLarge(InfermeshError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 413
    title = "Input too large"


class ModelControlDisabled(InfermeshError):
    """Load/unload asked of a server whose model control mode is `none`.

    Triton answers UNAVAILABLE here, which clients and our retry policy read as "try
    again"; retrying cannot help until the server is reconfigured, so FAILED_PRECONDITION."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409
    title = "Model control disabled"


class AdminUnauthenticated(InfermeshError):
    """Load/unload without the admin token, or with a wrong one."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    title = "Unauthenticated"


class ModelNotFound(InfermeshError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    title = "Model not found"

    @classmethod
    def named(cls, name: str, version: str | None = None, available: Iterable[str] | None = None) -> ModelNotFound:
        """`available`: the models there are, named in the detail so the caller can pick one."""
        what = f"model {name!r} version {version!r}" if version else f"model {name!r}"
        listed = sorted(available) if available is not None else None
        known = f"; models: {', '.join(listed) if listed else 'none'}" if listed is not None else ""
        return cls(f"{what} is not in the model repository{known}")


class ModelNotReady(InfermeshError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    title = "Model not ready"


class ModelLoadFailed(InfermeshError):
    """A version's artifacts could not be loaded; what was serving keeps serving."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409
    title = "Model load failed"


class Overloaded(InfermeshError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    title = "Overloaded"


class DeadlineExceeded(InfermeshError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    title = "Deadline exceeded"


class Unavailable(InfermeshError):
    """A downstream service could not be reached."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    title = "Service unavailable"


#: Trailing-metadata key naming the error class, so a caller can tell InputTooLarge
#: from InvalidInput (both INVALID_ARGUMENT) and map it to the right HTTP status.
ERROR_TYPE_METADATA_KEY = "infermesh-error-type"

_BY_GRPC_CODE: dict[grpc.StatusCode, type[InfermeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def from_grpc_error(error: grpc.aio.AioRpcError | grpc.RpcError) -> InfermeshError:
    """Turns a downstream gRPC failure back into our taxonomy, keeping its detail."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    detail = (error.details() if hasattr(error, "details") else None) or "downstream call failed"
    cls = _BY_GRPC_CODE.get(code)
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    pairs = cast(Iterable[tuple[str, str | bytes]], trailing or ())
    named = next((value for key, value in pairs if key == ERROR_TYPE_METADATA_KEY), None)
    if named:
        cls = next((c for c in _all_errors() if c.__name__ == named and c.grpc_code == code), cls)
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in detail:
        # gRPC's own message-size limit, not a full queue: retrying cannot help.
        cls = InputTooLarge
    if cls is None:
        return InfermeshError("downstream service failed")
    if cls is Unavailable and not named:
        # No service of ours said this: gRPC itself did ("failed to connect to all
        # addresses; last error: ... ipv4:10.0.3.7:50051 ..."), and internal addresses
        # are no business of the caller's. The detail goes to the log instead.
        logger.warning("downstream unavailable: %s", detail)
        return Unavailable("a service this request needs is unavailable; retry later")
    return cls(detail)


def _all_errors() -> list[type[InfermeshError]]:
    found: list[type[InfermeshError]] = []
    pending = [InfermeshError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found
