"""`govledger record FILE|-`: feeds an NDJSON file or pipe through a `Recorder`, with
progress on stderr, rejected records on stdout and a summary line last."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import IO, Any

import msgspec

from .recorder import Recorder, RejectedRecord
from .wire import encode, service_url

__all__ = ["RecordReport", "record_file", "send_ndjson"]


class RecordReport(msgspec.Struct, frozen=True, kw_only=True):
    """What `govledger record` did."""

    records: int
    accepted: int
    duplicates: int
    rejected: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"record: {self.records} records, {self.accepted} accepted,"
            f" {self.duplicates} duplicates, {self.rejected} rejected"
            f" in {self.seconds:.2f} s ({self.rate:.0f} records/s)"
        )


_decode_line = msgspec.json.Decoder(dict[str, Any], float_hook=Decimal).decode
_BOM = b"\xef\xbb\xbf"
# The longest line read whole: a record takes at most 64 KiB once encoded, so a line
# past this (whitespace aside) is none, and reading no further bounds the memory a
# file without line ends (or /dev/zero) can take.
MAX_LINE_BYTES = 1 << 20


async def send_ndjson(
    source: IO[bytes],
    recorder: Recorder,
    on_invalid: Callable[[int, str], object],
) -> int:
    """Send each line of `source` (a JSON object) through the recorder. Blank lines
    are skipped, and a byte order mark before the first (as some editors and shells
    write UTF-8) is ignored, as RFC 8259 allows; a line that is not a JSON object
    goes to `on_invalid(line_number, message)`. Returns the number of records
    (non-blank lines)."""
    number = records = 0
    async for lines in _lines(source):
        for line in lines:
            number += 1
            if number == 1:
                line = line.removeprefix(_BOM)
            if not line.strip():
                continue
            records += 1
            if len(line) > MAX_LINE_BYTES:
                on_invalid(
                    number,
                    f"line {number} is not a usage record: a line takes at most"
                    f" {MAX_LINE_BYTES} bytes",
                )
                continue
            try:
                await recorder.record_raw(_decode_line(line))
            except (msgspec.MsgspecError, ValueError) as exc:
                on_invalid(number, f"line {number} is not a usage record: {exc}")
    return records


async def _lines(source: IO[bytes]) -> AsyncIterator[list[bytes]]:
    """The complete lines read so far, as they arrive: reads happen in a thread (acks
    keep flowing meanwhile) and return what a pipe holds, without waiting to fill a
    buffer, so `tail -f usage.ndjson | govledger record -` records as it goes."""
    fd = source.fileno()
    buffer = bytearray()
    while chunk := await asyncio.to_thread(os.read, fd, 1 << 20):
        buffer += chunk
        end = chunk.rfind(b"\n")
        if end >= 0:
            end += len(buffer) - len(chunk)
            lines = bytes(buffer[:end]).split(b"\n")
            del buffer[: end + 1]
            yield lines
        if len(buffer) > MAX_LINE_BYTES:
            # The line in progress is already too long to be a record: keep only
            # enough of it to say so when its end comes.
            del buffer[MAX_LINE_BYTES + 1 :]
    if buffer:
        yield [bytes(buffer)]


def record_file(path: str, *, url: str, token: str | None) -> int:
    """`govledger record FILE|-`: progress on stderr, one JSON line per rejected
    record on stdout, the summary line last. Exit status 1 if any record was
    rejected or the file cannot be opened, 2 if the URL is none (as the other
    govledger commands)."""
    try:
        service_url(url)
    except ValueError as exc:
        print(f"govledger record: {exc}", file=sys.stderr)
        return 2
    if path == "-":
        return asyncio.run(_record_file(sys.stdin.buffer, url, token))
    try:
        source = open(path, "rb")  # noqa: SIM115 -- closed by the with below
    except OSError as exc:
        print(f"govledger record: {path}: {exc.strerror}", file=sys.stderr)
        return 1
    with source:
        return asyncio.run(_record_file(source, url, token))


async def _record_file(source: IO[bytes], url: str, token: str | None) -> int:
    local_rejections = 0

    def rejected(record: RejectedRecord) -> None:
        _print_rejection(
            {
                "event_id": record.event_id,
                "code": record.code,
                "message": record.message,
            }
        )

    def invalid(line: int, message: str) -> None:
        nonlocal local_rejections
        local_rejections += 1
        _print_rejection({"line": line, "code": "invalid_record", "message": message})

    started = time.monotonic()
    recorder = Recorder(url, token=token, on_rejected=rejected)
    progress = asyncio.create_task(_show_progress(recorder, started))
    try:
        async with recorder:
            records = await send_ndjson(source, recorder, invalid)
    finally:
        progress.cancel()
        await asyncio.gather(progress, return_exceptions=True)
    stats = recorder.stats
    report = RecordReport(
        records=records,
        accepted=stats.accepted,
        duplicates=stats.duplicates,
        rejected=sum(stats.rejected.values()) + local_rejections,
        seconds=time.monotonic() - started,
    )
    _clear_progress()
    print(report.summary(), file=sys.stderr, flush=True)
    return 1 if report.rejected else 0


def _print_rejection(fields: dict[str, object]) -> None:
    sys.stdout.buffer.write(encode(fields) + b"\n")


async def _show_progress(recorder: Recorder, started: float) -> None:
    """A stderr line: rewritten in place at most 10 times a second on a terminal,
    else a line a second."""
    tty = sys.stderr.isatty()
    while True:
        await asyncio.sleep(0.1 if tty else 1.0)
        stats = recorder.stats
        seconds = time.monotonic() - started
        line = (
            f"record: {stats.recorded} sent, {stats.acked} acknowledged,"
            f" {sum(stats.rejected.values())} rejected,"
            f" {stats.acked / seconds:.0f} records/s"
        )
        if stats.buffered and stats.last_error and stats.failures:
            line += f", retrying ({stats.failures} failures: {stats.last_error})"
        sys.stderr.write(f"\r{line}\033[K" if tty else f"{line}\n")
        sys.stderr.flush()


def _clear_progress() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
