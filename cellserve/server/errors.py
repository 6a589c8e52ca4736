"""Errors at the protocol edge: each carries the HTTP status and gRPC code it is answered with,
and a message that says what was wrong."""

from __future__ import annotations

import grpc


class ServerError(Exception):
    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(ServerError):
    """The request is malformed or does not fit the model."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class SequenceError(BadRequest):
    """A request on a sequence that is not active (never started, ended or expired)."""


class NotFound(ServerError):
    """Unknown model or version."""

    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class Unavailable(ServerError):
    """The model is loaded but not ready, or the server is shutting down."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class Overloaded(ServerError):
    """Refused at once: the deadline cannot be met, or a bounded queue is full. `congestion`:
    other requests' work caused it (False: the deadline is too short for the request even
    alone), which is what the admission bound learns from."""

    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, congestion: bool = True):
        super().__init__(message)
        self.congestion = congestion


class DeadlineExceeded(ServerError):
    """Admitted, then dropped: it could no longer finish before its deadline."""

    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class TooLarge(ServerError):
    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
