"""The one exception callers catch: `RecorderError`."""

from __future__ import annotations

__all__ = ["RecorderError"]


class RecorderError(Exception):
    """The recorder cannot take records (closed or failed), or a check was refused
    for a reason no policy covers (a bad request, a bad token)."""

    def __init__(
        self, message: str, *, code: str = "recorder_error", status: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
