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
    """A body not declared as JSON where it must be: a form or plain text is what
    any web page can send cross-site without a preflight."""

    code = "unsupported_media_type"


# --- usage records: rejected one by one, by these codes (service.domain.usage) ---


class InvalidRecord(Invalid):
    code = "invalid_record"


class NegativeCost(Invalid):
    code = "negative_cost"


class InvalidCost(Invalid):
    code = "invalid_cost"


class UnknownVirtualKey(Invalid):
    """The key does not exist, and the cache had seen the whole log when asked."""

    code = "unknown_virtual_key"


class OccurredAtOutOfRange(Invalid):
    """`occurred_at` before 2000-01-01T00:00:00Z or more than 5 minutes after the
    receive time."""

    code = "occurred_at_out_of_range"


# --- the log as input: imported lines and legacy events ------------------------------


class LegacyEventRefused(Invalid):
    """A legacy event with no exact current form (a value outside today's grammar,
    a shape its legacy schema does not have, data that does not decode strictly).
    Import refuses it; found in a log, the projectors skip it loudly and a command on
    its stream is answered with this error."""

    code = "legacy_event_refused"


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


class UnreadableBody(Invalid):
    """A body that cannot be read to its end (a coding that does not decode, a
    connection closed mid-body): the connection cannot carry another request."""


class BodyTimeout(ServiceError):
    """A declared body did not arrive in time (a slow or stalled sender)."""

    code = "body_timeout"


class BodyTooLarge(ServiceError):
    code = "body_too_large"


class ProjectionLag(ServiceError):
    code = "projection_lag"


class Unavailable(ServiceError):
    """The database cannot be reached right now."""

    code = "database_unavailable"
