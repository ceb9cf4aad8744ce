"""Export and import of the log as JSONL envelopes, between two real databases."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from service import eventstore, transfer
from service.domain.events import (
    Budget,
    CustomerCreated,
    RateLimit,
    TeamBudgetsReplaced,
    TeamCreated,
    TeamUpdated,
    UsageRecorded,
    VirtualKeyCreated,
)
from service.errors import VersionConflict
from service.records import NewEvent
from tests.builders import append, behind_an_older_transaction

C1 = "00000000-0000-4000-8000-0000000000c1"
T1 = "00000000-0000-4000-8000-0000000000f1"
K1 = "00000000-0000-4000-8000-0000000000a1"
T0 = datetime(2026, 3, 1, tzinfo=UTC)
GOVLEDGER = Path(sys.executable).parent / "govledger"


def budget(budget_id: str, limit: str, duration: str) -> Budget:
    return Budget(
        budget_id=budget_id, max_limit=Decimal(limit), reset_duration=duration
    )


async def record_usage(pool, n: int, cost: str) -> None:
    """Append usage as the ingest path does: stream_version = global_position."""
    event = UsageRecorded(
        virtual_key_id=K1,
        provider="openai",
        model="gpt-4o",
        cost=Decimal(cost),
        occurred_at=T0 + timedelta(seconds=n),
        team_id=T1,
        customer_id=C1,
    )
    await pool.execute(
        """
        INSERT INTO events (global_position, event_id, stream_id, stream_version, type,
                            data, recorded_at)
        SELECT p, $1, $2, p, 'UsageRecorded', $3, $4 FROM (
            SELECT nextval(pg_get_serial_sequence('events', 'global_position')) AS p
        ) AS s
        """,
        f"00000000-0000-4000-9000-{n:012d}",
        f"usage-{K1}",
        eventstore.encode_event(event),
        T0 + timedelta(seconds=n),
    )


async def build_log(pool) -> None:
    """Customers, teams, a key and usage, with exact money and metadata."""

    async def append(stream: str, version: int, event: Any, n: int) -> None:
        await eventstore.append(
            pool,
            stream,
            version,
            [
                NewEvent(
                    event=event,
                    event_id=f"00000000-0000-4000-8000-{n:012d}",
                    metadata={"actor": "admin", "request_id": f"r{n}"},
                )
            ],
            recorded_at=T0 + timedelta(seconds=n),
        )

    await append(
        f"customer-{C1}",
        0,
        CustomerCreated(
            customer_id=C1, name="acme", budgets=(budget("b-c", "1000.5", "1M"),)
        ),
        1,
    )
    await append(
        f"team-{T1}",
        0,
        TeamCreated(team_id=T1, name="platform", customer_id=C1),
        2,
    )
    await append(
        f"team-{T1}",
        1,
        TeamBudgetsReplaced(team_id=T1, budgets=(budget("b-t", "12.000000001", "1d"),)),
        3,
    )
    await append(
        f"virtual_key-{K1}",
        0,
        VirtualKeyCreated(
            virtual_key_id=K1,
            name="ci",
            value_sha256="cd" * 32,
            value_hint="abcd",
            team_id=T1,
            rate_limit=RateLimit(token_max_limit=1000, token_reset_duration="1h"),
        ),
        4,
    )
    await record_usage(pool, 5, "0.123456789")
    await append(
        f"team-{T1}", 2, TeamUpdated(team_id=T1, name="platform-2", customer_id=C1), 6
    )
    await record_usage(pool, 7, "3")


async def export_bytes(pool) -> bytes:
    out = io.BytesIO()
    await transfer.export(pool, out, page_size=2)
    return out.getvalue()


async def test_export_then_import_into_a_fresh_database_gives_identical_envelopes(
    pool, copy_pool
):
    await build_log(pool)
    exported = await export_bytes(pool)

    report = await transfer.import_lines(copy_pool, exported.splitlines())

    assert (report.lines, report.appended, report.present) == (7, 7, 0)
    assert await export_bytes(copy_pool) == exported
    streams = "SELECT stream_id, version FROM streams ORDER BY stream_id"
    assert await copy_pool.fetch(streams) == await pool.fetch(streams)


async def test_the_export_holds_an_event_committed_behind_an_older_open_transaction(
    pool,
):
    exported = await behind_an_older_transaction(
        pool,
        lambda: append(
            pool, f"customer-{C1}", CustomerCreated(customer_id=C1, name="acme")
        ),
        lambda: export_bytes(pool),
    )

    lines = [msgspec.json.decode(line) for line in exported.splitlines()]
    assert [(e["stream_id"], e["type"]) for e in lines] == [
        (f"customer-{C1}", "CustomerCreated")
    ]


async def test_the_export_is_the_envelope_of_the_events_api(pool):
    await build_log(pool)

    first = msgspec.json.decode((await export_bytes(pool)).splitlines()[0])

    assert first == {
        "global_position": 1,
        "event_id": "00000000-0000-4000-8000-000000000001",
        "stream_id": f"customer-{C1}",
        "stream_version": 1,
        "type": "CustomerCreated",
        "schema_version": 2,
        "data": {
            "customer_id": C1,
            "name": "acme",
            "budgets": [
                {
                    "budget_id": "b-c",
                    "max_limit": 1000.5,
                    "reset_duration": "1M",
                    "calendar_aligned": False,
                    "reset_usage": False,
                }
            ],
            "rate_limit": None,
        },
        "metadata": {"actor": "admin", "request_id": "r1"},
        "recorded_at": "2026-03-01T00:00:01Z",
    }


async def test_importing_twice_appends_nothing(pool, copy_pool):
    await build_log(pool)
    lines = (await export_bytes(pool)).splitlines()
    await transfer.import_lines(copy_pool, lines)

    again = await transfer.import_lines(copy_pool, lines, batch_size=3)

    assert (again.lines, again.appended, again.present) == (7, 0, 7)
    assert await copy_pool.fetchval("SELECT count(*) FROM events") == 7


async def test_imported_usage_takes_its_new_position_as_stream_version(pool, copy_pool):
    await build_log(pool)
    lines = (await export_bytes(pool)).splitlines()
    # The copy already holds events: positions differ from the source's.
    await record_usage(copy_pool, 100, "1")

    await transfer.import_lines(copy_pool, lines)

    usage = await copy_pool.fetch(
        "SELECT global_position, stream_version FROM events"
        " WHERE type = 'UsageRecorded' ORDER BY global_position"
    )
    assert [(r["global_position"], r["stream_version"]) for r in usage] == [
        (1, 1),
        (6, 6),
        (8, 8),
    ]


async def test_an_imported_stream_keeps_optimistic_concurrency(pool, copy_pool):
    await build_log(pool)
    await transfer.import_lines(copy_pool, (await export_bytes(pool)).splitlines())
    renamed = NewEvent(event=TeamUpdated(team_id=T1, name="again"))

    with pytest.raises(VersionConflict):
        await eventstore.append(copy_pool, f"team-{T1}", 2, [renamed])
    [appended] = await eventstore.append(copy_pool, f"team-{T1}", 3, [renamed])

    assert appended.stream_version == 4


async def test_a_file_without_global_positions_imports(copy_pool):
    line = {
        "event_id": "00000000-0000-4000-8000-000000000001",
        "stream_id": f"team-{T1}",
        "stream_version": 1,
        "type": "TeamCreated",
        "schema_version": 2,
        "data": {"team_id": T1, "name": "platform"},
        "recorded_at": "2026-03-01T00:00:01+00:00",
    }

    report = await transfer.import_lines(copy_pool, [msgspec.json.encode(line)])
    [record] = await eventstore.read_all(copy_pool, eventstore.Checkpoint())

    assert report.appended == 1
    assert record.event == TeamCreated(team_id=T1, name="platform")
    assert record.recorded_at == datetime(2026, 3, 1, 0, 0, 1, tzinfo=UTC)
    assert record.metadata == {}


async def test_a_byte_order_mark_before_the_first_line_is_ignored(copy_pool):
    lines = [b"\xef\xbb\xbf" + envelope_line(1) + b"\r", envelope_line(2) + b"\r"]

    report = await transfer.import_lines(copy_pool, lines)

    assert (report.lines, report.appended) == (2, 2)


async def test_a_line_past_16_mib_is_refused_by_its_number_without_reading_on(
    copy_pool,
):
    first = envelope_line(1) + b"\n"
    source = io.BytesIO(first + b"x" * (transfer.MAX_LINE_BYTES * 2))

    with pytest.raises(transfer.ImportFailed) as refused:
        await transfer.import_lines(copy_pool, transfer.bounded_lines(source))

    assert str(refused.value) == "line 2: a line takes at most 16,777,216 bytes"
    assert source.tell() == len(first) + transfer.MAX_LINE_BYTES + 1
    assert await eventstore.read_all(copy_pool, eventstore.Checkpoint()) == []


def envelope_line(n: int, **changes: Any) -> bytes:
    line = {
        "event_id": f"00000000-0000-4000-8000-{n:012d}",
        "stream_id": f"team-{T1}",
        "stream_version": n,
        "type": "TeamUpdated",
        "schema_version": 1,
        "data": {"team_id": T1, "name": f"name-{n}"},
        "metadata": {},
        "recorded_at": "2026-03-01T00:00:00Z",
        **changes,
    }
    return msgspec.json.encode(line)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b'{"event_id": ', "line 2: not a valid event envelope: "),
        (
            envelope_line(2, type="TeamRenamed"),
            "line 2: unknown event type 'TeamRenamed'",
        ),
        (
            envelope_line(2, schema_version=7),
            "line 2: TeamUpdated v7: no upcaster from TeamUpdated v7",
        ),
        (
            envelope_line(2, data={"team_id": T1}),
            "line 2: TeamUpdated v1: Object missing required field `name`",
        ),
        (
            envelope_line(2, stream_id="team-other"),
            f"line 2: TeamUpdated of team-{T1} cannot be in stream 'team-other'",
        ),
        (
            envelope_line(2, recorded_at="2026-03-01T00:00:00"),
            "line 2: not a valid event envelope: Expected `datetime` with a timezone",
        ),
        (envelope_line(2, color="red"), "line 2: not a valid event envelope: "),
        (envelope_line(3), f"line 2: team-{T1} is at version 1;"),
    ],
)
async def test_an_invalid_line_stops_the_import_and_writes_nothing_of_its_batch(
    copy_pool, bad, message
):
    lines = [envelope_line(1), bad, envelope_line(3)]

    with pytest.raises(transfer.ImportFailed) as failed:
        await transfer.import_lines(copy_pool, lines)

    assert str(failed.value).startswith(message)
    assert failed.value.line == 2
    assert await copy_pool.fetchval("SELECT count(*) FROM events") == 0


async def test_batches_before_the_failing_one_stay_written(copy_pool):
    lines = [envelope_line(1), envelope_line(2), b"not json"]

    with pytest.raises(transfer.ImportFailed, match="line 3"):
        await transfer.import_lines(copy_pool, lines, batch_size=1)

    assert await copy_pool.fetchval("SELECT count(*) FROM events") == 2
    assert await copy_pool.fetchval("SELECT version FROM streams") == 2


async def test_an_event_id_present_with_other_content_is_an_error(copy_pool):
    await transfer.import_lines(copy_pool, [envelope_line(1)])
    changed = envelope_line(1, data={"team_id": T1, "name": "changed"})

    with pytest.raises(transfer.ImportFailed, match="already in the log with other"):
        await transfer.import_lines(copy_pool, [changed])


async def test_blank_lines_are_skipped_but_counted_in_line_numbers(copy_pool):
    with pytest.raises(transfer.ImportFailed, match=r"^line 4: "):
        await transfer.import_lines(
            copy_pool, [envelope_line(1), b"", b"  \n", envelope_line(3)]
        )


# --- the command line --------------------------------------------------------------


async def govledger(dsn: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(GOVLEDGER),
        *args,
        env={**os.environ, "DATABASE_URL": dsn},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_the_cli_exports_and_imports_with_a_summary_line(
    database, copy_database, pool, copy_pool, tmp_path
):
    await build_log(pool)
    path = tmp_path / "log.jsonl"

    exported = await govledger(database, "export", str(path))
    imported = await govledger(copy_database, "import", str(path))
    to_stdout = await govledger(copy_database, "export")

    assert exported[0] == imported[0] == to_stdout[0] == 0
    assert exported[2].splitlines()[-1].startswith("export: 7 events exported in ")
    assert (
        imported[2]
        .splitlines()[-1]
        .startswith("import: 7 events read, 7 appended, 0 present in ")
    )
    assert imported[2].rstrip().endswith("events/s)")
    assert to_stdout[1].encode() == path.read_bytes()


@pytest.mark.slow
async def test_the_cli_import_exits_non_zero_naming_the_bad_line(
    copy_database, copy_pool, tmp_path
):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(envelope_line(1) + b"\n{oops\n")

    code, _, err = await govledger(copy_database, "import", str(path))

    assert code == 1
    assert err.startswith("govledger import: line 2: not a valid event envelope")
    assert await copy_pool.fetchval("SELECT count(*) FROM events") == 0


# --- what every read of an imported line needs ---------------------------------------

B1 = "00000000-0000-4000-8000-00000000bbf1"


def legacy_budget_line(n: int, reset_duration: str) -> bytes:
    return envelope_line(
        n,
        type="TeamBudgetUpdated",
        data={
            "team_id": T1,
            "budget_id": B1,
            "max_limit": "10",
            "reset_duration": reset_duration,
        },
    )


async def test_a_convertible_legacy_duration_is_imported_as_given_and_read_current(
    copy_pool,
):
    await transfer.import_lines(
        copy_pool, [envelope_line(1), legacy_budget_line(2, "1h30m")]
    )

    stored = await copy_pool.fetchrow(
        "SELECT type, schema_version, data FROM events WHERE stream_version = 2"
    )
    records = await eventstore.read_all(copy_pool, eventstore.Checkpoint())

    assert (stored["type"], stored["schema_version"]) == ("TeamBudgetUpdated", 1)
    assert msgspec.json.decode(stored["data"])["reset_duration"] == "1h30m"
    assert records[1].event == TeamBudgetsReplaced(
        team_id=T1, budgets=(budget(B1, "10", "90m"),)
    )


@pytest.mark.parametrize(
    ("duration", "why"),
    [
        (
            "500ms",
            "has no exact current equivalent: the smallest unit is a whole second",
        ),
        ("1.5M", "has no exact current equivalent: calendar units count whole months"),
        ("1w1M", "has no exact current equivalent: it mixes calendar units"),
        ("1 day", "is not a duration, legacy or current"),
    ],
)
async def test_a_legacy_duration_without_an_equivalent_is_refused_by_its_line(
    copy_pool, duration, why
):
    lines = [envelope_line(1), legacy_budget_line(2, duration), envelope_line(3)]

    with pytest.raises(transfer.ImportFailed) as failed:
        await transfer.import_lines(copy_pool, lines)

    assert failed.value.line == 2
    assert str(failed.value).startswith(
        f"line 2: legacy_event_refused: TeamBudgetUpdated v1: reset_duration"
        f" {duration!r} {why}"
    )
    assert await copy_pool.fetchval("SELECT count(*) FROM events") == 0


def current_line(n: int, type_: str, data: dict[str, Any], **changes: Any) -> bytes:
    return envelope_line(
        n,
        type=type_,
        schema_version=2 if "Created" in type_ else 1,
        data=data,
        **changes,
    )


def budget_data(**changes: Any) -> dict[str, Any]:
    return {"budget_id": B1, "max_limit": "10", "reset_duration": "1d", **changes}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            current_line(
                1,
                "TeamBudgetsReplaced",
                {"team_id": T1, "budgets": [budget_data(reset_duration="1h30m")]},
            ),
            "line 1: TeamBudgetsReplaced v1: invalid_reset_duration: reset_duration"
            " '1h30m' is not valid",
        ),
        (
            current_line(
                1,
                "TeamBudgetsReplaced",
                {"team_id": T1, "budgets": [budget_data(max_limit="0")]},
            ),
            "line 1: TeamBudgetsReplaced v1: invalid_max_limit: max_limit of the '1d'"
            " budget must be greater than 0",
        ),
        (
            current_line(
                1,
                "TeamBudgetsReplaced",
                {"team_id": T1, "budgets": [budget_data(max_limit="1e30")]},
            ),
            "line 1: TeamBudgetsReplaced v1: invalid_max_limit: max_limit of the '1d'"
            " budget must be below 10^18",
        ),
        (
            current_line(
                1,
                "TeamBudgetsReplaced",
                {"team_id": T1, "budgets": [budget_data(), budget_data(budget_id=C1)]},
            ),
            "line 1: TeamBudgetsReplaced v1: duplicate_reset_duration:",
        ),
        (
            current_line(
                1,
                "TeamCreated",
                {"team_id": T1, "name": "x", "rate_limit": {"request_max_limit": 5}},
            ),
            "line 1: TeamCreated v2: invalid_rate_limit: request_max_limit needs a"
            " request_reset_duration",
        ),
        (
            envelope_line(1, recorded_at="0001-01-01T00:00:00+01:00"),
            "line 1: recorded_at must lie between 2000-01-01T00:00:00Z and 5 minutes"
            " from now, not 0001-01-01T00:00:00+01:00",
        ),
        (
            envelope_line(1, recorded_at="9999-12-31T23:59:59-01:00"),
            "line 1: recorded_at must lie between 2000-01-01T00:00:00Z and 5 minutes"
            " from now, not 9999-12-31T23:59:59-01:00",
        ),
        (
            envelope_line(1, recorded_at="1999-12-31T23:59:59Z"),
            "line 1: recorded_at must lie between",
        ),
    ],
)
async def test_a_line_no_read_could_take_is_refused(copy_pool, line, message):
    with pytest.raises(transfer.ImportFailed) as failed:
        await transfer.import_lines(copy_pool, [line])

    assert str(failed.value).startswith(message)
    assert await copy_pool.fetchval("SELECT count(*) FROM events") == 0


def usage_line(**changes: Any) -> bytes:
    data = {
        "virtual_key_id": K1,
        "provider": "openai",
        "model": "gpt-4o",
        "cost": "0.5",
        "occurred_at": "2026-03-01T00:00:00Z",
        **changes,
    }
    return envelope_line(
        1,
        stream_id=f"usage-{K1}",
        type="UsageRecorded",
        data=data,
        recorded_at="2026-03-01T00:00:00Z",
    )


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"occurred_at": "0001-01-01T00:00:00+01:00"}, "occurred_at_out_of_range"),
        ({"occurred_at": "9999-12-31T23:59:59-01:00"}, "occurred_at_out_of_range"),
        ({"occurred_at": "2026-03-01T00:05:00.000001Z"}, "occurred_at_out_of_range"),
        ({"cost": "-1"}, "negative_cost"),
        ({"cost": "NaN"}, "invalid_cost"),
        ({"provider": "p" * 257}, "invalid_record"),
        ({"requests": 2**31}, "invalid_record"),
    ],
)
async def test_a_usage_line_ingest_would_have_rejected_is_refused(
    copy_pool, changes, code
):
    with pytest.raises(transfer.ImportFailed, match=rf"^line 1: {code}: "):
        await transfer.import_lines(copy_pool, [usage_line(**changes)])

    assert await copy_pool.fetchval("SELECT count(*) FROM events") == 0


async def test_a_usage_line_up_to_5_minutes_after_its_recording_is_imported(copy_pool):
    report = await transfer.import_lines(
        copy_pool, [usage_line(occurred_at="2026-03-01T01:05:00+01:00")]
    )

    assert report.appended == 1
