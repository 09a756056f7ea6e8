"""Stripe's error answer as one exception, so every rule can refuse a call the way Stripe would."""

from __future__ import annotations

from typing import Any

from plugin.stripe.emulator.forms import InvalidParam


class ApiError(Exception):
    """An error answer in Stripe's shape; the SDK picks its exception class from `status` and `type`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, should_retry: bool | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.should_retry = should_retry
        """Sent as `Stripe-Should-Retry: true|false` when set (Stripe's hint to clients, e.g. on a duplicate)."""

    @classmethod
    def from_invalid_param(cls, error: InvalidParam) -> ApiError:
        return cls(400, error.message, code=error.code, param=error.param)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


def rate_limited(message: str) -> ApiError:
    return ApiError(429, message, code="rate_limit")


def not_found(label: str, object_id: str, param: str = "id") -> ApiError:
    return ApiError(404, f"No such {label}: '{object_id}'", code="resource_missing", param=param)
