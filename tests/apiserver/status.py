"""``metav1.Status`` error bodies, built the way kube-apiserver builds them.

The fake API server answers every failure with a Status object whose ``code``, ``reason``,
``message`` and ``details`` follow k8s.io/apimachinery/pkg/api/errors, so that a client under
test sees exactly the exception (``ApiException.status``, ``reason``, body) it would see
against a real cluster. Each builder returns an :class:`ApiError`, which request handling
raises and the HTTP layer turns into a JSON response with that status code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

JsonObj = dict[str, Any]


class ApiError(Exception):
    """A failed request: the HTTP code and the Status body to send."""

    def __init__(self, body: JsonObj) -> None:
        super().__init__(body["message"])
        self.body = body

    @property
    def code(self) -> int:
        """The HTTP status code, equal to the Status body's ``code``."""
        code: int = self.body["code"]
        return code


def status_body(
    code: int,
    reason: str,
    message: str,
    *,
    details: JsonObj | None = None,
    continue_token: str | None = None,
) -> JsonObj:
    """A failure Status with the real server's field order (details only when given)."""
    metadata: JsonObj = {}
    if continue_token is not None:
        metadata["continue"] = continue_token
    body: JsonObj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": metadata,
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


def bad_request(message: str) -> ApiError:
    """400 BadRequest, as for unparseable query parameters or selectors."""
    return ApiError(status_body(400, "BadRequest", message))


def unauthorized() -> ApiError:
    """401 Unauthorized, sent before routing when the bearer token is wrong or missing."""
    return ApiError(status_body(401, "Unauthorized", "Unauthorized"))


def path_not_found() -> ApiError:
    """404 NotFound for a path the server does not serve at all."""
    return ApiError(
        status_body(404, "NotFound", "the server could not find the requested resource",
                    details={})
    )


def object_not_found(qualified_resource: str, group: str, resource: str, name: str) -> ApiError:
    """404 NotFound for a named object, e.g. ``services "web" not found``."""
    details: JsonObj = {"name": name}
    if group:
        details["group"] = group
    details["kind"] = resource
    return ApiError(
        status_body(404, "NotFound", f'{qualified_resource} "{name}" not found', details=details)
    )


def method_not_allowed() -> ApiError:
    """405 MethodNotAllowed for a verb the resource does not serve."""
    return ApiError(
        status_body(405, "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                    details={})
    )


def not_acceptable(accepted: Sequence[str]) -> ApiError:
    """406 NotAcceptable when the Accept header admits no media type the server speaks."""
    return ApiError(
        status_body(406, "NotAcceptable",
                    "only the following media types are accepted: " + ", ".join(accepted))
    )


def expired(message: str, *, continue_token: str | None = None) -> ApiError:
    """410 Expired (``NewResourceExpired``): a resourceVersion or continue token too old."""
    return ApiError(status_body(410, "Expired", message, continue_token=continue_token))


def invalid(group: str, kind: str, name: str, errors: Sequence[FieldError]) -> ApiError:
    """422 Invalid (``NewInvalid``) listing every field error, e.g. for ``ListOptions``."""
    qualified = f"{kind}.{group}" if group else kind
    rendered = [e.render() for e in errors]
    detail = rendered[0] if len(rendered) == 1 else "[" + ", ".join(rendered) + "]"
    details: JsonObj = {"name": name} if name else {}
    if group:
        details["group"] = group
    details["kind"] = kind
    details["causes"] = [
        {"reason": e.cause_type, "message": e.body(), "field": e.field} for e in errors
    ]
    return ApiError(
        status_body(422, "Invalid", f'{qualified} "{name}" is invalid: {detail}', details=details)
    )


def too_large_resource_version(requested: int, current: int) -> ApiError:
    """504 Timeout for a resourceVersion the store has not reached (``ResourceVersionTooLarge``)."""
    return ApiError(
        status_body(
            504,
            "Timeout",
            f"Timeout: Too large resource version: {requested}, current: {current}",
            details={
                "causes": [{"reason": "ResourceVersionTooLarge",
                            "message": "Too large resource version"}],
                "retryAfterSeconds": 1,
            },
        )
    )


def internal_error(message: str) -> ApiError:
    """500 InternalError: a bug in the fake server itself (also recorded for the test)."""
    return ApiError(
        status_body(500, "InternalError", f"Internal error occurred: {message}",
                    details={"causes": [{"message": message}]})
    )


class FieldError:
    """One ``field.Error`` (Forbidden or NotSupported) of a ListOptions validation."""

    def __init__(self, cause_type: str, field: str, detail: str) -> None:
        self.cause_type = cause_type
        self.field = field
        self.detail = detail

    @classmethod
    def forbidden(cls, field: str, detail: str) -> FieldError:
        """``field.Forbidden``."""
        return cls("FieldValueForbidden", field, detail)

    @classmethod
    def not_supported(cls, field: str, value: str, supported: Sequence[str]) -> FieldError:
        """``field.NotSupported`` with the quoted list of supported values."""
        values = ", ".join(f'"{v}"' for v in supported)
        return cls("FieldValueNotSupported", field,
                   f'"{value}": supported values: {values}')

    def _type_text(self) -> str:
        return {"FieldValueForbidden": "Forbidden",
                "FieldValueNotSupported": "Unsupported value"}[self.cause_type]

    def body(self) -> str:
        """``ErrorBody()``: the type and detail without the field path."""
        return f"{self._type_text()}: {self.detail}"

    def render(self) -> str:
        """``Error()``: ``field: Type: detail``."""
        return f"{self.field}: {self.body()}"
