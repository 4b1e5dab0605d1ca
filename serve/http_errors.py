"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the matching status.

Every failure the API can report is an :class:`ApiError`; :func:`api_error_from` turns whatever
a request raised (bad input from the library, a full queue, a replica that died, a bug) into one,
so a client never sees a traceback or an internal name: unexpected errors are logged with their
traceback and answered with OpenAI's generic 500 message.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

from dalle2.images import InvalidInput

logger = logging.getLogger("ray.serve")

RETRY_AFTER_S = 1  # when a queue is full or a replica is being replaced
INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"


@dataclass
class ApiError(Exception):
    status: int
    message: str
    param: Optional[str] = None
    code: Optional[str] = None
    type: str = "invalid_request_error"
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param, code)


def too_large(message: str, param: Optional[str] = None) -> ApiError:
    return ApiError(413, message, param, "file_too_large")


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def overloaded(status: int = 503, retry_after_s: Optional[float] = None) -> ApiError:
    retry = str(max(1, math.ceil(retry_after_s if retry_after_s is not None else RETRY_AFTER_S)))
    if status == 429:
        message, kind, code = "Too many requests are queued; retry after a moment.", "requests", "rate_limit_exceeded"
    else:
        message, kind, code = "The server is overloaded; retry after a moment.", "server_error", "overloaded"
    return ApiError(status, message, None, code, kind, headers={"Retry-After": retry})


def _cause(error: BaseException) -> BaseException:
    """The user exception inside a Ray task error (``RayTaskError.cause``), else the error itself."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def api_error_from(error: BaseException) -> ApiError:
    """The response for an exception raised while serving a request."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    error = _cause(error)
    if isinstance(error, ApiError):
        return error
    if isinstance(error, InvalidInput):
        return bad_request(str(error), error.param)
    if isinstance(error, BackPressureError):
        return overloaded(error.status_code, error.retry_after_s)
    if isinstance(error, (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)):
        # A model replica died mid-request (the controller is replacing it): the request is
        # deterministic given its seed, so retrying it is safe.
        logger.warning("a model replica failed while serving a request: %s", type(error).__name__)
        return overloaded(503)
    logger.error("unexpected error while serving a request", exc_info=error)
    return ApiError(500, INTERNAL_ERROR_MESSAGE, type="server_error")
