"""govledger_client: stream LLM usage to govledger and ask it for budget checks.

Depends on aiohttp and msgspec only; imports nothing of the server. The LiteLLM
integration, `govledger_client.litellm`, needs the `litellm` extra and is imported
only when asked for.
"""

from __future__ import annotations

from .checker import Checker
from .errors import RecorderError
from .ndjson import RecordReport, record_file, send_ndjson
from .recorder import Recorder, RecorderStats, RejectedRecord
from .reservations import Releaser
from .wire import CheckRequest, CheckResult, Reservation, UsageRecord

__all__ = [
    "CheckRequest",
    "CheckResult",
    "Checker",
    "RecordReport",
    "Recorder",
    "RecorderError",
    "RecorderStats",
    "RejectedRecord",
    "Releaser",
    "Reservation",
    "UsageRecord",
    "record_file",
    "send_ndjson",
]
