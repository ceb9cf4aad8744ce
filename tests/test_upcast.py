"""Legacy single-budget events: the pure steps, the chain proof, upcast on read, and
the one-shot audited rewrite of the log on a real PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from projections import governance, replay
from projections.runner import Projector
from service import eventstore, rewrite, transfer
from service.domain import upcast
from service.domain.events import (
    AnyEvent,
    Budget,
    CustomerBudgetsReplaced,
    CustomerCreated,
    ProviderConfig,
    RateLimit,
    TeamBudgetsReplaced,
    TeamCreated,
    TeamUpdated,
    UsageRecorded,
    VirtualKeyBudgetsReplaced,
    VirtualKeyCreated,
)
from service.domain.upcast import BrokenChain, Step, legacy_budget_id
from service.errors import LegacyEventRefused
from service.records import Checkpoint

C1 = "00000000-0000-4000-8000-0000000000c1"
T1 = "00000000-0000-4000-8000-0000000000f1"
T2 = "00000000-0000-4000-8000-0000000000f2"
T3 = "00000000-0000-4000-8000-0000000000f3"
K1 = "00000000-0000-4000-8000-0000000000a1"
P1 = "00000000-0000-4000-8000-0000000000b1"
B_C1 = "00000000-0000-4000-8000-00000000bbc1"
B_T1 = "00000000-0000-4000-8000-00000000bbf1"
B_T3 = "00000000-0000-4000-8000-00000000bbf3"
B_K1 = "00000000-0000-4000-8000-00000000bba1"
SHA = "ab" * 32
T0 = datetime(2025, 1, 1, tzinfo=UTC)


# --- the steps, one by one ---------------------------------------------------------


def test_team_created_v1_with_a_budget_and_its_id_becomes_a_one_budget_set():
    legacy = {
        "team_id": T1,
        "name": "platform",
        "customer_id": C1,
        "budget_id": B_T1,
        "budget": {"max_limit": 100, "reset_duration": "1M", "calendar_aligned": True},
    }

    assert upcast.team_created_v1(legacy) == {
        "team_id": T1,
        "name": "platform",
        "customer_id": C1,
        "budgets": [
            {
                "budget_id": B_T1,
                "max_limit": "100",
                "reset_duration": "1M",
                "calendar_aligned": True,
                "reset_usage": False,
            }
        ],
    }


def test_team_created_v1_without_a_budget_has_no_budgets():
    legacy = {
        "team_id": T1,
        "name": "platform",
        "customer_id": None,
        "budget_id": None,
        "budget": None,
    }

    assert upcast.team_created_v1(legacy) == {
        "team_id": T1,
        "name": "platform",
        "customer_id": None,
        "budgets": [],
    }


def test_a_legacy_budget_without_an_id_gets_the_uuid5_of_owner_and_duration():
    legacy = {
        "team_id": T2,
        "name": "research",
        "customer_id": None,
        "budget_id": None,
        "budget": {"max_limit": "75.25", "reset_duration": "1w"},
    }

    [budget] = upcast.team_created_v1(legacy)["budgets"]

    assert budget["budget_id"] == str(
        uuid.uuid5(uuid.NAMESPACE_URL, f"govledger:budget:{T2}:1w")
    )
    assert budget["budget_id"] == legacy_budget_id(T2, "1w")
    assert budget["calendar_aligned"] is False


def test_a_float_amount_keeps_the_digits_the_legacy_writer_wrote():
    legacy = {"team_id": T1, "max_limit": 100.123456789, "reset_duration": "1d"}

    assert upcast.team_budget_updated_v1(legacy)["budgets"][0]["max_limit"] == (
        "100.123456789"
    )


def test_team_budget_updated_v1_becomes_a_replacement_by_that_one_budget():
    legacy = {
        "team_id": T1,
        "budget_id": B_T1,
        "max_limit": "250.5",
        "reset_duration": "1d",
    }

    assert upcast.team_budget_updated_v1(legacy) == {
        "team_id": T1,
        "budgets": [
            {
                "budget_id": B_T1,
                "max_limit": "250.5",
                "reset_duration": "1d",
                "calendar_aligned": False,
                "reset_usage": False,
            }
        ],
    }


def test_team_budget_removed_v1_becomes_a_replacement_by_nothing():
    assert upcast.team_budget_removed_v1({"team_id": T1, "budget_id": B_T1}) == {
        "team_id": T1,
        "budgets": [],
    }


def test_customer_created_v1_becomes_v2_with_budgets():
    legacy = {
        "customer_id": C1,
        "name": "acme",
        "budget_id": B_C1,
        "budget": {"max_limit": "1000", "reset_duration": "1M"},
    }

    assert upcast.customer_created_v1(legacy) == {
        "customer_id": C1,
        "name": "acme",
        "budgets": [
            {
                "budget_id": B_C1,
                "max_limit": "1000",
                "reset_duration": "1M",
                "calendar_aligned": False,
                "reset_usage": False,
            }
        ],
    }


def test_customer_budget_updated_v1_without_an_id_names_the_derived_budget():
    legacy = {"customer_id": C1, "max_limit": 2000, "reset_duration": "1M"}

    assert upcast.customer_budget_updated_v1(legacy) == {
        "customer_id": C1,
        "budgets": [
            {
                "budget_id": legacy_budget_id(C1, "1M"),
                "max_limit": "2000",
                "reset_duration": "1M",
                "calendar_aligned": False,
                "reset_usage": False,
            }
        ],
    }


def test_customer_budget_removed_v1_becomes_an_empty_replacement():
    assert upcast.customer_budget_removed_v1(
        {"customer_id": C1, "budget_id": B_C1}
    ) == {
        "customer_id": C1,
        "budgets": [],
    }


def test_virtual_key_created_v1_keeps_every_other_field():
    legacy = {
        "virtual_key_id": K1,
        "name": "ci",
        "value_sha256": SHA,
        "value_hint": "wxyz",
        "team_id": T1,
        "customer_id": None,
        "is_active": False,
        "rate_limit": {"token_max_limit": 1000, "token_reset_duration": "1m"},
        "provider_configs": [{"provider_config_id": P1, "provider": "openai"}],
        "budget_id": None,
        "budget": {"budget_id": B_K1, "max_limit": "10", "reset_duration": "1h"},
    }

    assert upcast.virtual_key_created_v1(legacy) == {
        "virtual_key_id": K1,
        "name": "ci",
        "value_sha256": SHA,
        "value_hint": "wxyz",
        "team_id": T1,
        "customer_id": None,
        "is_active": False,
        "rate_limit": {"token_max_limit": 1000, "token_reset_duration": "1m"},
        "provider_configs": [{"provider_config_id": P1, "provider": "openai"}],
        "budgets": [
            {
                "budget_id": B_K1,
                "max_limit": "10",
                "reset_duration": "1h",
                "calendar_aligned": False,
                "reset_usage": False,
            }
        ],
    }


def test_virtual_key_budget_updated_and_removed_v1_become_replacements():
    updated = {
        "virtual_key_id": K1,
        "budget_id": B_K1,
        "max_limit": "12.5",
        "reset_duration": "1h",
        "calendar_aligned": False,
    }

    assert upcast.virtual_key_budget_updated_v1(updated) == {
        "virtual_key_id": K1,
        "budgets": [
            {
                "budget_id": B_K1,
                "max_limit": "12.5",
                "reset_duration": "1h",
                "calendar_aligned": False,
                "reset_usage": False,
            }
        ],
    }
    assert upcast.virtual_key_budget_removed_v1(
        {"virtual_key_id": K1, "budget_id": B_K1}
    ) == {"virtual_key_id": K1, "budgets": []}


def test_steps_do_not_change_their_input():
    legacy = {
        "team_id": T1,
        "name": "platform",
        "customer_id": None,
        "budget_id": None,
        "budget": {"max_limit": 1, "reset_duration": "1d"},
    }
    copy = msgspec.json.decode(msgspec.json.encode(legacy))

    upcast.team_created_v1(legacy)

    assert legacy == copy


# --- chains ------------------------------------------------------------------------


def test_upcast_follows_the_chain_to_the_current_type():
    assert upcast.upcast("TeamBudgetRemoved", 1, {"team_id": T1, "budget_id": "x"}) == (
        "TeamBudgetsReplaced",
        {"team_id": T1, "budgets": []},
    )


def test_a_current_event_passes_through_untouched():
    data = {"team_id": T1, "name": "n"}

    assert upcast.upcast("TeamUpdated", 1, data) == ("TeamUpdated", data)


def test_upcast_refuses_an_unknown_schema():
    with pytest.raises(upcast.UnknownSchema, match="no upcaster from TeamRenamed v1"):
        upcast.upcast("TeamRenamed", 1, {})


def test_upcast_reports_legacy_data_missing_its_fields():
    with pytest.raises(upcast.MalformedLegacyEvent, match="TeamBudgetUpdated v1"):
        upcast.upcast("TeamBudgetUpdated", 1, {"team_id": T1, "max_limit": 1})


def test_strict_decoding_refuses_a_legacy_virtual_key_without_its_secret_hash():
    legacy = {"virtual_key_id": K1, "name": "ci", "budget_id": None, "budget": None}

    with pytest.raises(msgspec.ValidationError, match="value_sha256"):
        upcast.to_current("VirtualKeyCreated", 1, legacy)


def test_the_registered_chains_all_reach_a_current_schema():
    upcast.validate_chains()


def _same(data: upcast.Data) -> upcast.Data:
    return data


@pytest.mark.parametrize(
    ("steps", "types", "problem"),
    [
        (
            {("A", 1): Step("B", 1, _same), ("B", 1): Step("A", 1, _same)},
            {},
            "A v1 runs into a cycle",
        ),
        ({("A", 1): Step("B", 3, _same)}, {}, "neither current nor upcast"),
        (
            {("TeamCreated", 2): Step("TeamCreated", 2, _same)},
            {"TeamCreated": TeamCreated},
            "TeamCreated v2 is current but has a step",
        ),
        ({}, {"TeamCreated": TeamCreated}, "TeamCreated v1 .* has no step"),
    ],
)
def test_chain_validation_refuses_broken_chains(steps, types, problem):
    with pytest.raises(BrokenChain, match=problem):
        upcast.validate_chains(steps, types)


# --- a legacy log on PostgreSQL ----------------------------------------------------


def _line(
    n: int, type_: str, version: int, stream: str, stream_version: int, data: Any
) -> dict[str, Any]:
    return {
        "event_id": f"00000000-0000-4000-8000-{n:012d}",
        "stream_id": stream,
        "stream_version": stream_version,
        "type": type_,
        "schema_version": version,
        "data": data,
        "metadata": {"actor": "legacy-admin"},
        "recorded_at": (T0 + timedelta(minutes=n)).isoformat(),
    }


def _usage(n: int, cost: str) -> dict[str, Any]:
    return _line(
        n,
        "UsageRecorded",
        1,
        f"usage-{K1}",
        1,
        {
            "virtual_key_id": K1,
            "provider": "openai",
            "model": "gpt-4o",
            "cost": cost,
            "input_tokens": 100,
            "output_tokens": 20,
            "requests": 1,
            "occurred_at": (T0 + timedelta(minutes=n)).isoformat(),
            "provider_config_id": P1,
            "team_id": T1,
            "customer_id": C1,
        },
    )


LEGACY_LOG = [
    _line(
        1,
        "CustomerCreated",
        1,
        f"customer-{C1}",
        1,
        {
            "customer_id": C1,
            "name": "acme",
            "budget_id": B_C1,
            "budget": {
                "max_limit": 1000,
                "reset_duration": "1M",
                "calendar_aligned": True,
            },
        },
    ),
    _line(
        2,
        "TeamCreated",
        1,
        f"team-{T1}",
        1,
        {
            "team_id": T1,
            "name": "platform",
            "customer_id": C1,
            "budget_id": None,
            "budget": None,
        },
    ),
    _line(
        3,
        "TeamBudgetUpdated",
        1,
        f"team-{T1}",
        2,
        {
            "team_id": T1,
            "budget_id": B_T1,
            "max_limit": "250.5",
            "reset_duration": "1d",
        },
    ),
    _line(
        4,
        "TeamCreated",
        2,
        f"team-{T3}",
        1,
        {
            "team_id": T3,
            "name": "current",
            "budgets": [{"budget_id": B_T3, "max_limit": "5", "reset_duration": "1d"}],
        },
    ),
    _line(
        5,
        "TeamCreated",
        1,
        f"team-{T2}",
        1,
        {
            "team_id": T2,
            "name": "research",
            "customer_id": None,
            "budget_id": None,
            "budget": {"max_limit": 75.25, "reset_duration": "1w"},
        },
    ),
    _line(
        6,
        "VirtualKeyCreated",
        1,
        f"virtual_key-{K1}",
        1,
        {
            "virtual_key_id": K1,
            "name": "ci",
            "value_sha256": SHA,
            "value_hint": "wxyz",
            "team_id": T1,
            "customer_id": None,
            "is_active": True,
            "rate_limit": {"request_max_limit": 60, "request_reset_duration": "1m"},
            "provider_configs": [
                {
                    "provider_config_id": P1,
                    "provider": "openai",
                    "allowed_models": ["gpt-4o"],
                }
            ],
            "budget_id": B_K1,
            "budget": {"max_limit": "10", "reset_duration": "1h"},
        },
    ),
    _usage(7, "0.125"),
    _line(
        8, "TeamBudgetRemoved", 1, f"team-{T1}", 3, {"team_id": T1, "budget_id": B_T1}
    ),
    _line(
        9,
        "CustomerBudgetUpdated",
        1,
        f"customer-{C1}",
        2,
        {"customer_id": C1, "max_limit": 2000, "reset_duration": "1M"},
    ),
    _line(
        10,
        "VirtualKeyBudgetUpdated",
        1,
        f"virtual_key-{K1}",
        2,
        {
            "virtual_key_id": K1,
            "budget_id": B_K1,
            "max_limit": "12.5",
            "reset_duration": "1h",
            "calendar_aligned": False,
        },
    ),
    _line(
        11,
        "TeamUpdated",
        1,
        f"team-{T2}",
        2,
        {"team_id": T2, "name": "research-2", "customer_id": C1},
    ),
    _usage(12, "0.000000001"),
    _line(
        13,
        "VirtualKeyBudgetRemoved",
        1,
        f"virtual_key-{K1}",
        3,
        {"virtual_key_id": K1, "budget_id": B_K1},
    ),
    _line(
        14,
        "CustomerBudgetRemoved",
        1,
        f"customer-{C1}",
        3,
        {"customer_id": C1, "budget_id": legacy_budget_id(C1, "1M")},
    ),
    _line(
        15,
        "TeamBudgetUpdated",
        1,
        f"team-{T2}",
        3,
        {"team_id": T2, "max_limit": "80", "reset_duration": "1w"},
    ),
]
LEGACY_COUNT = 11


def _budget(budget_id: str, limit: str, duration: str, aligned=False) -> Budget:
    return Budget(
        budget_id=budget_id,
        max_limit=Decimal(limit),
        reset_duration=duration,
        calendar_aligned=aligned,
    )


def _usage_event(n: int, cost: str) -> UsageRecorded:
    return UsageRecorded(
        virtual_key_id=K1,
        provider="openai",
        model="gpt-4o",
        cost=Decimal(cost),
        input_tokens=100,
        output_tokens=20,
        requests=1,
        occurred_at=T0 + timedelta(minutes=n),
        provider_config_id=P1,
        team_id=T1,
        customer_id=C1,
    )


T2_BUDGET = legacy_budget_id(T2, "1w")
EXPECTED: list[AnyEvent] = [
    CustomerCreated(
        customer_id=C1, name="acme", budgets=(_budget(B_C1, "1000", "1M", True),)
    ),
    TeamCreated(team_id=T1, name="platform", customer_id=C1),
    TeamBudgetsReplaced(team_id=T1, budgets=(_budget(B_T1, "250.5", "1d"),)),
    TeamCreated(team_id=T3, name="current", budgets=(_budget(B_T3, "5", "1d"),)),
    TeamCreated(
        team_id=T2, name="research", budgets=(_budget(T2_BUDGET, "75.25", "1w"),)
    ),
    VirtualKeyCreated(
        virtual_key_id=K1,
        name="ci",
        value_sha256=SHA,
        value_hint="wxyz",
        team_id=T1,
        rate_limit=RateLimit(request_max_limit=60, request_reset_duration="1m"),
        provider_configs=(
            ProviderConfig(
                provider_config_id=P1, provider="openai", allowed_models=("gpt-4o",)
            ),
        ),
        budgets=(_budget(B_K1, "10", "1h"),),
    ),
    _usage_event(7, "0.125"),
    TeamBudgetsReplaced(team_id=T1),
    CustomerBudgetsReplaced(
        customer_id=C1, budgets=(_budget(legacy_budget_id(C1, "1M"), "2000", "1M"),)
    ),
    VirtualKeyBudgetsReplaced(
        virtual_key_id=K1, budgets=(_budget(B_K1, "12.5", "1h"),)
    ),
    TeamUpdated(team_id=T2, name="research-2", customer_id=C1),
    _usage_event(12, "0.000000001"),
    VirtualKeyBudgetsReplaced(virtual_key_id=K1),
    CustomerBudgetsReplaced(customer_id=C1),
    TeamBudgetsReplaced(team_id=T2, budgets=(_budget(T2_BUDGET, "80", "1w"),)),
]

_LEGACY_ROWS = (
    "SELECT count(*) FROM events WHERE type || ':' || schema_version = ANY($1::text[])"
)


async def import_legacy_log(pool) -> None:
    report = await transfer.import_lines(
        pool, [msgspec.json.encode(line) for line in LEGACY_LOG]
    )
    assert report.appended == len(LEGACY_LOG)


async def read_events(pool) -> list[eventstore.RecordedEvent]:
    return await eventstore.read_all(pool, Checkpoint(), 1000)


async def rows(pool) -> list[tuple[Any, ...]]:
    """Every column of the log, as stored."""
    return [
        tuple(r)
        for r in await pool.fetch(
            "SELECT global_position, tx_id, event_id, stream_id, stream_version, type,"
            " schema_version, data, metadata, recorded_at FROM events"
            " ORDER BY global_position"
        )
    ]


async def test_a_legacy_log_reads_as_current_events(pool):
    await import_legacy_log(pool)

    records = await read_events(pool)

    assert [r.event for r in records] == EXPECTED
    assert [r.schema_version for r in records] == [
        type(e).schema_version for e in EXPECTED
    ]


async def test_upcast_rewrites_every_legacy_row_into_the_events_read_before(pool):
    await import_legacy_log(pool)
    before = await read_events(pool)
    stored = await rows(pool)

    report = await rewrite.rewrite(pool)
    after = await read_events(pool)

    assert report.finished is True
    assert report.events == LEGACY_COUNT
    assert report.counts == {
        "CustomerBudgetRemoved v1": 1,
        "CustomerBudgetUpdated v1": 1,
        "CustomerCreated v1": 1,
        "TeamBudgetRemoved v1": 1,
        "TeamBudgetUpdated v1": 2,
        "TeamCreated v1": 2,
        "VirtualKeyBudgetRemoved v1": 1,
        "VirtualKeyBudgetUpdated v1": 1,
        "VirtualKeyCreated v1": 1,
    }
    assert [r.event for r in after] == [r.event for r in before] == EXPECTED
    identity = [
        (
            r.global_position,
            r.tx_id,
            r.event_id,
            r.stream_id,
            r.stream_version,
            r.recorded_at,
        )
        for r in after
    ]
    assert identity == [
        (
            r.global_position,
            r.tx_id,
            r.event_id,
            r.stream_id,
            r.stream_version,
            r.recorded_at,
        )
        for r in before
    ]
    assert await pool.fetchval(_LEGACY_ROWS, upcast.legacy_keys()) == 0
    legacy = [row for row in stored if (row[5], row[6]) in upcast.STEPS]
    archived = await pool.fetch(
        "SELECT event_id, run_id, global_position, type, schema_version, data, metadata"
        " FROM event_archive ORDER BY global_position"
    )
    assert [
        (
            r["global_position"],
            r["event_id"],
            r["type"],
            r["schema_version"],
            r["data"],
            r["metadata"],
        )
        for r in archived
    ] == [(row[0], row[2], row[5], row[6], row[7], row[8]) for row in legacy]
    assert {str(r["run_id"]) for r in archived} == {report.run_id}


async def test_rewritten_rows_carry_the_stamp_of_their_run(pool):
    await import_legacy_log(pool)

    report = await rewrite.rewrite(pool)
    [first] = [r for r in await read_events(pool) if r.event_id.endswith("1")][:1]

    stamp = first.metadata["upcast"]
    assert first.metadata["actor"] == "legacy-admin"
    assert {k: stamp[k] for k in ("run", "from_type", "from_version")} == {
        "run": report.run_id,
        "from_type": "CustomerCreated",
        "from_version": 1,
    }
    assert datetime.fromisoformat(stamp["at"]).tzinfo is not None


async def test_the_rewritten_data_is_what_current_code_writes(pool):
    await import_legacy_log(pool)

    await rewrite.rewrite(pool)
    stored = await pool.fetch("SELECT type, data FROM events ORDER BY global_position")

    legacy_positions = [
        i
        for i, line in enumerate(LEGACY_LOG)
        if line["schema_version"] == 1 and (line["type"], 1) in upcast.STEPS
    ]
    for i in legacy_positions:
        # jsonb orders keys its own way: compare the JSON values.
        assert msgspec.json.decode(stored[i]["data"]) == msgspec.json.decode(
            eventstore.encode_event(EXPECTED[i])
        )


async def test_a_second_upcast_changes_nothing(pool):
    await import_legacy_log(pool)
    await rewrite.rewrite(pool)
    stored = await rows(pool)
    archive = await pool.fetchval("SELECT count(*) FROM event_archive")

    again = await rewrite.rewrite(pool)

    assert (again.events, again.finished) == (0, True)
    assert await rows(pool) == stored
    assert await pool.fetchval("SELECT count(*) FROM event_archive") == archive
    runs = await pool.fetch(
        "SELECT status, counts->'events' AS events FROM event_rewrite_runs"
        " ORDER BY started_at"
    )
    assert [(r["status"], r["events"]) for r in runs] == [
        ("done", b"11"),
        ("done", b"0"),
    ]


async def test_an_upcast_killed_after_one_batch_is_finished_by_the_next_run(pool):
    await import_legacy_log(pool)
    before = await read_events(pool)

    killed = await rewrite.rewrite(pool, batch_size=2, stop_after=1)
    left = await pool.fetchval(_LEGACY_ROWS, upcast.legacy_keys())
    resumed = await rewrite.rewrite(pool, batch_size=2)

    assert (killed.events, killed.finished, left) == (2, False, LEGACY_COUNT - 2)
    assert resumed.superseded == [killed.run_id]
    assert resumed.resumed_from == killed.last_position == 2
    assert (resumed.events, resumed.finished) == (LEGACY_COUNT - 2, True)
    assert [r.event for r in await read_events(pool)] == [r.event for r in before]
    assert await pool.fetchval(_LEGACY_ROWS, upcast.legacy_keys()) == 0
    assert await pool.fetchval("SELECT count(*) FROM event_archive") == LEGACY_COUNT
    runs = {
        str(r["run_id"]): (r["status"], r["superseded_by"])
        for r in await pool.fetch(
            "SELECT run_id, status, counts->>'superseded_by' AS superseded_by"
            " FROM event_rewrite_runs"
        )
    }
    assert runs == {
        killed.run_id: ("failed", resumed.run_id),
        resumed.run_id: ("done", None),
    }


async def test_dry_run_counts_and_shows_a_diff_but_changes_nothing(pool):
    await import_legacy_log(pool)
    stored = await rows(pool)

    report = await rewrite.dry_run(pool, samples=1)

    assert report.events == LEGACY_COUNT
    assert report.counts["TeamCreated v1"] == 2
    assert report.failures == []
    diff = rewrite.render_diff(report.samples[0])
    assert '-  "type": "CustomerCreated"' not in diff  # the type is unchanged here
    assert '-  "schema_version": 1,' in diff
    assert '+  "schema_version": 2,' in diff
    assert '-    "budget_id": "' + B_C1 + '",' in diff
    assert await rows(pool) == stored
    assert await pool.fetchval("SELECT count(*) FROM event_rewrite_runs") == 0


async def test_a_legacy_row_that_cannot_be_upcast_fails_the_run_and_writes_nothing(
    pool,
):
    await pool.execute(
        "INSERT INTO events (event_id, stream_id, stream_version, type, schema_version,"
        " data) VALUES ($1, $2, 1, 'TeamBudgetUpdated', 1, $3)",
        str(uuid.uuid4()),
        f"team-{T1}",
        {"team_id": T1, "max_limit": "1"},  # no reset_duration
    )
    stored = await rows(pool)

    with pytest.raises(rewrite.RewriteFailed, match="does not have its legacy shape"):
        await rewrite.rewrite(pool)

    assert await rows(pool) == stored
    assert await pool.fetchval("SELECT count(*) FROM event_archive") == 0
    assert await pool.fetchval("SELECT status FROM event_rewrite_runs") == "failed"
    dry = await rewrite.dry_run(pool)
    assert (dry.events, len(dry.failures)) == (0, 1)


async def test_the_log_refuses_an_update_outside_a_rewrite_run(pool):
    await import_legacy_log(pool)

    with pytest.raises(Exception, match="append-only"):
        await pool.execute("UPDATE events SET schema_version = 2")


async def test_the_read_model_of_a_legacy_log_survives_the_rewrite_unchanged(pool):
    await import_legacy_log(pool)
    await Projector(pool, "governance", governance.apply).catch_up()

    await rewrite.rewrite(pool)
    report = await replay.rebuild(pool, verify=True)

    assert report.events == len(LEGACY_LOG)
    assert report.differences == []
    budgets = await pool.fetch(
        "SELECT id, owner_type, max_limit FROM governance_budgets ORDER BY id"
    )
    assert {(r["id"], r["owner_type"], r["max_limit"]) for r in budgets} == {
        (B_T3, "team", Decimal("5")),
        (T2_BUDGET, "team", Decimal("80")),
    }


# --- legacy values outside today's grammar -----------------------------------------


@pytest.mark.parametrize(
    ("legacy", "current"),
    [
        # already in today's grammar: kept as written, never respelled
        ("7d", "7d"),
        ("24h", "24h"),
        ("12M", "12M"),
        ("90m", "90m"),
        # an exact equivalent, in the largest unit (not above the largest one the
        # value names) in which the count is whole
        ("1h30m", "90m"),
        ("1.5d", "36h"),
        ("0.5w", "84h"),
        ("1d12h", "36h"),
        ("24h0m", "24h"),
        ("2.0d", "2d"),
        ("1.d", "1d"),
        (".5h", "30m"),
        ("01d", "1d"),
        ("2000ms", "2s"),
        ("1m30s", "90s"),
        ("1.5Y", "6Q"),
        ("1Y6M", "6Q"),
        ("1Y1M", "13M"),
        ("100Y0M", "100Y"),
    ],
)
def test_a_legacy_duration_with_an_exact_equivalent_is_converted(legacy, current):
    assert upcast.current_duration(legacy) == current


@pytest.mark.parametrize(
    ("legacy", "why"),
    [
        (
            "500ms",
            "has no exact current equivalent: the smallest unit is a whole second",
        ),
        (
            "1.5s",
            "has no exact current equivalent: the smallest unit is a whole second",
        ),
        (
            "1s1ms",
            "has no exact current equivalent: the smallest unit is a whole second",
        ),
        ("1µs", "has no exact current equivalent: the smallest unit is a whole second"),
        (
            "10ns",
            "has no exact current equivalent: the smallest unit is a whole second",
        ),
        ("1.5M", "has no exact current equivalent: calendar units count whole months"),
        ("0.1Q", "has no exact current equivalent: calendar units count whole months"),
        (
            "1M2d",
            "has no exact current equivalent: it mixes calendar units with a fixed"
            " length",
        ),
        ("0h", "has no exact current equivalent: a period must be longer than zero"),
        ("0.0d", "has no exact current equivalent: a period must be longer than zero"),
        ("101Y", "has no current equivalent: reset_duration '101Y' is too long"),
        ("36526d", "has no current equivalent: reset_duration '36526d' is too long"),
        ("3650000h0m", "(3650000h in today's grammar) has no current equivalent"),
        ("abc", "is not a duration, legacy or current"),
        ("1D", "is not a duration, legacy or current"),
        ("-1d", "is not a duration, legacy or current"),
        ("+1d", "is not a duration, legacy or current"),
        ("1h 30m", "is not a duration, legacy or current"),
        ("1e3s", "is not a duration, legacy or current"),
        ("", "is not a duration, legacy or current"),
        ("\uff11d", "is not a duration, legacy or current"),  # a full-width digit
        ("1" * 70 + "s", "is not a duration, legacy or current"),
    ],
)
def test_a_legacy_duration_without_an_exact_equivalent_is_refused(legacy, why):
    with pytest.raises(upcast.UnconvertibleLegacyValue) as refused:
        upcast.current_duration(legacy)

    assert refused.value.message.startswith(
        f"reset_duration {upcast._shown(legacy)} {why}"
    )
    assert isinstance(refused.value, LegacyEventRefused)
    assert refused.value.code == "legacy_event_refused"


def test_a_converted_legacy_budget_is_named_by_its_current_spelling():
    legacy = {"team_id": T1, "max_limit": "10", "reset_duration": "1h30m"}

    assert upcast.to_current("TeamBudgetUpdated", 1, legacy) == TeamBudgetsReplaced(
        team_id=T1,
        budgets=(_budget(legacy_budget_id(T1, "90m"), "10", "90m"),),
    )


def test_a_calendar_flag_is_kept_only_where_a_duration_can_be_aligned():
    """Every read ignores it elsewhere: false is the exact current form."""
    events = [
        upcast.to_current(
            "TeamBudgetUpdated",
            1,
            {
                "team_id": T1,
                "budget_id": B_T1,
                "max_limit": "10",
                "reset_duration": duration,
                "calendar_aligned": True,
            },
        )
        for duration in ("1.0d", "7d", "1h30m", "1M")
    ]

    assert [
        (e.budgets[0].reset_duration, e.budgets[0].calendar_aligned) for e in events
    ] == [
        ("1d", True),
        ("7d", False),
        ("90m", False),
        ("1M", True),
    ]


# Legacy events every reader must treat alike: (type, data, the current event or the
# start of the refusal).
K1_FIELDS: dict[str, Any] = {
    "virtual_key_id": K1,
    "name": "ci",
    "value_sha256": SHA,
    "value_hint": "wxyz",
    "budget_id": B_K1,
    "budget": None,
}
HOSTILE_LEGACY: list[tuple[str, Any, AnyEvent | str]] = [
    (
        "TeamBudgetUpdated",
        {"team_id": T1, "budget_id": B_T1, "max_limit": 1, "reset_duration": "1.5d"},
        TeamBudgetsReplaced(team_id=T1, budgets=(_budget(B_T1, "1", "36h"),)),
    ),
    (
        "TeamBudgetUpdated",
        {"team_id": T1, "max_limit": 1, "reset_duration": "500ms"},
        "TeamBudgetUpdated v1: reset_duration '500ms' has no exact current equivalent",
    ),
    (
        "TeamCreated",
        {
            "team_id": T1,
            "name": "x",
            "budget": {"max_limit": 1, "reset_duration": "1.5M"},
        },
        "TeamCreated v1: reset_duration '1.5M' has no exact current equivalent",
    ),
    (
        "VirtualKeyCreated",
        {**K1_FIELDS, "is_active": 1},
        "VirtualKeyCreated v1 upcast to VirtualKeyCreated does not decode: Expected"
        " `bool`, got `int` - at `$.is_active`",
    ),
    (
        "VirtualKeyCreated",
        {**K1_FIELDS, "is_active": "true"},
        "VirtualKeyCreated v1 upcast to VirtualKeyCreated does not decode",
    ),
    (
        "TeamBudgetUpdated",
        {"team_id": T1, "max_limit": 1, "reset_duration": "1d", "calendar_aligned": 1},
        "TeamBudgetUpdated v1 does not have its legacy shape",
    ),
    (
        "TeamBudgetUpdated",
        {"team_id": T1, "max_limit": "abc", "reset_duration": "1d"},
        "TeamBudgetUpdated v1 does not have its legacy shape",
    ),
    *(
        (
            "TeamBudgetUpdated",
            {"team_id": T1, "max_limit": limit, "reset_duration": "1d"},
            "TeamBudgetUpdated v1: max_limit of the '1d' budget must be",
        )
        for limit in ("NaN", "-1", 0, "1e18", "1e400")
    ),
    (
        "TeamBudgetUpdated",
        {"team_id": T1, "max_limit": "0.0000000001", "reset_duration": "1d"},
        "TeamBudgetUpdated v1: max_limit of the '1d' budget has more than 9 fractional",
    ),
    (
        "VirtualKeyCreated",
        {
            **K1_FIELDS,
            "rate_limit": {"token_max_limit": 10, "token_reset_duration": "1h30m"},
        },
        VirtualKeyCreated(
            virtual_key_id=K1,
            name="ci",
            value_sha256=SHA,
            value_hint="wxyz",
            rate_limit=RateLimit(token_max_limit=10, token_reset_duration="90m"),
        ),
    ),
    (
        "VirtualKeyCreated",
        {**K1_FIELDS, "rate_limit": {"token_max_limit": 10}},
        "VirtualKeyCreated v1: token_max_limit needs a token_reset_duration",
    ),
    (
        "VirtualKeyCreated",
        {
            **K1_FIELDS,
            "rate_limit": {"request_max_limit": 1, "request_reset_duration": "0.5s"},
        },
        "VirtualKeyCreated v1: reset_duration '0.5s' has no exact current equivalent",
    ),
    (
        "VirtualKeyCreated",
        {
            **K1_FIELDS,
            "provider_configs": [
                {
                    "provider_config_id": P1,
                    "provider": "openai",
                    "budgets": [
                        {"budget_id": B_T1, "max_limit": "5", "reset_duration": "1.5d"}
                    ],
                }
            ],
        },
        VirtualKeyCreated(
            virtual_key_id=K1,
            name="ci",
            value_sha256=SHA,
            value_hint="wxyz",
            provider_configs=(
                ProviderConfig(
                    provider_config_id=P1,
                    provider="openai",
                    budgets=(_budget(B_T1, "5", "36h"),),
                ),
            ),
        ),
    ),
    (
        "VirtualKeyCreated",
        {
            **K1_FIELDS,
            "provider_configs": [
                {"provider_config_id": P1, "provider": "openai"},
                {"provider_config_id": B_T1, "provider": "openai"},
            ],
        },
        "VirtualKeyCreated v1: provider 'openai' has more than one config",
    ),
    (
        "TeamCreated",
        {"team_id": T1, "name": "x", "budget": "1d"},
        "TeamCreated v1 does not have its legacy shape",
    ),
    ("TeamBudgetRemoved", [], "the data of a legacy event must be a JSON object"),
]


def _on_read(type_: str, data: Any) -> AnyEvent:
    return eventstore.decode_event(type_, 1, msgspec.json.encode(data))


def _at_import(type_: str, data: Any) -> AnyEvent:
    return transfer.decode_data(type_, 1, msgspec.json.encode(data))


def _in_the_rewrite(type_: str, data: Any) -> AnyEvent:
    """What `govledger upcast` writes for the row, decoded as every later read is."""
    row = {
        "event_id": uuid.uuid4(),
        "global_position": 1,
        "type": type_,
        "schema_version": 1,
        "data": msgspec.json.encode(data),
    }
    try:
        converted = rewrite.convert_row(row)
    except rewrite.RewriteFailed as exc:
        # The rewrite names the row; what it refused is the reads' refusal.
        if not isinstance(exc.__cause__, LegacyEventRefused):
            raise
        raise exc.__cause__ from None
    return eventstore.decode_event(
        converted.to_type, converted.to_version, converted.after
    )


@pytest.mark.parametrize(("type_", "data", "expected"), HOSTILE_LEGACY)
@pytest.mark.parametrize("path", [_on_read, _at_import, _in_the_rewrite])
def test_read_import_and_rewrite_take_the_same_legacy_events_alike(
    path, type_, data, expected
):
    if not isinstance(expected, str):
        assert path(type_, data) == expected
        return
    with pytest.raises(LegacyEventRefused) as refused:
        path(type_, data)
    assert refused.value.message.startswith(expected)
    assert refused.value.code == "legacy_event_refused"


async def test_a_log_with_a_converted_legacy_duration_projects_and_rewrites_alike(pool):
    legacy = _line(
        1,
        "TeamBudgetUpdated",
        1,
        f"team-{T2}",
        2,
        {"team_id": T2, "budget_id": B_T1, "max_limit": "7", "reset_duration": "1h30m"},
    )
    created = _line(
        2,
        "TeamCreated",
        1,
        f"team-{T2}",
        1,
        {"team_id": T2, "name": "research", "budget": None},
    )
    report = await transfer.import_lines(
        pool, [msgspec.json.encode(created), msgspec.json.encode(legacy)]
    )
    assert report.appended == 2
    await Projector(pool, "governance", governance.apply).catch_up()
    read = [r.event for r in await read_events(pool)]

    await rewrite.rewrite(pool)

    assert [r.event for r in await read_events(pool)] == read
    assert read[1] == TeamBudgetsReplaced(
        team_id=T2, budgets=(_budget(B_T1, "7", "90m"),)
    )
    assert [
        (r["id"], r["reset_duration"])
        for r in await pool.fetch("SELECT id, reset_duration FROM governance_budgets")
    ] == [(B_T1, "90m")]


async def test_a_log_holding_a_refused_legacy_event_fails_the_rewrite_by_name(pool):
    event_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO events (event_id, stream_id, stream_version, type, schema_version,"
        " data) VALUES ($1, $2, 1, 'TeamBudgetUpdated', 1, $3)",
        event_id,
        f"team-{T1}",
        {"team_id": T1, "max_limit": "1", "reset_duration": "500ms"},
    )
    position = await pool.fetchval("SELECT global_position FROM events")

    with pytest.raises(rewrite.RewriteFailed) as failed:
        await rewrite.rewrite(pool)

    assert str(failed.value) == (
        f"event {event_id} at position {position} (TeamBudgetUpdated v1):"
        " TeamBudgetUpdated v1: reset_duration '500ms' has no exact current"
        " equivalent: the smallest unit is a whole second"
    )
    with pytest.raises(upcast.UnconvertibleLegacyValue):
        await read_events(pool)
