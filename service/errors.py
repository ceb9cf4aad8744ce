"""The error tree of govledger: each error has a snake_case `code`; none knows HTTP."""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    """Base of every error the service reports to a client."""

    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(ServiceError):
    """A client mistake in a request (400)."""

    code = "invalid_request"


class InvalidResetDuration(Invalid):
    code = "invalid_reset_duration"


class InvalidMaxLimit(Invalid):
    code = "invalid_max_limit"


class DuplicateResetDuration(Invalid):
    code = "duplicate_reset_duration"


class InvalidCalendarAlignment(Invalid):
    code = "invalid_calendar_alignment"


class InvalidRateLimit(Invalid):
    code = "invalid_rate_limit"


class DuplicateProvider(Invalid):
    code = "duplicate_provider"


class ConflictingOwner(Invalid):
    code = "conflicting_owner"


class UnknownReference(Invalid):
    """A body names a customer or team that does not exist."""

    code = "unknown_reference"


class InvalidPosition(Invalid):
    code = "invalid_position"


class UnsupportedMediaType(Invalid):
    """A body declared as a form or plain text: what any web page can send."""

    code = "unsupported_media_type"


# --- usage records: rejected one by one, by these codes (service.domain.usage) ---


class InvalidRecord(Invalid):
    code = "invalid_record"


class NegativeCost(Invalid):
    code = "negative_cost"


class InvalidCost(Invalid):
    code = "invalid_cost"


class FutureOccurredAt(Invalid):
    code = "future_occurred_at"


class UnknownVirtualKey(Invalid):
    """The key does not exist, and the cache had seen the whole log when asked."""

    code = "unknown_virtual_key"


class Unauthorized(ServiceError):
    code = "unauthorized"


class Forbidden(ServiceError):
    code = "forbidden"


class NotFound(ServiceError):
    code = "not_found"


class MethodNotAllowed(ServiceError):
    code = "method_not_allowed"


class VersionConflict(ServiceError):
    """The stream moved on since the caller read it (optimistic concurrency)."""

    code = "version_conflict"


class IdempotencyConflict(ServiceError):
    """An event id or idempotency key was reused for different content."""

    code = "idempotency_conflict"


class BodyTooLarge(ServiceError):
    code = "body_too_large"


class ProjectionLag(ServiceError):
    code = "projection_lag"


class Unavailable(ServiceError):
    """The database cannot be reached right now."""

    code = "database_unavailable"
