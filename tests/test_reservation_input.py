"""What a reserving check, a release and a usage record may hold or carry: amounts
exact to the nano and bounded (what the log keeps, every reader can store and sum),
a lapsed hold released without an event, a release body declared as a form refused,
and a usage frame of exactly the documented 4 MiB (real PostgreSQL, real aiohttp)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import WSMsgType

from service.domain import upcast
from service.domain.events import ReservationHeld
from service.errors import InvalidCost
from service.web.routes.usage import MAX_FRAME_BYTES
from tests.api import Api, bearer, serve
from tests.builders import append
from tests.reserving import (
    TOKENS,
    budget,
    check_at,
    key_under_team,
    reserve,
    usage_record,
)


@pytest.fixture
async def api(database):
    async with serve(database, TOKENS, bearer("adm")) as api:
        yield api


async def held(api: Api, budget_id: str, position: int) -> Decimal:
    return Decimal((await budget(api, budget_id, position))["held"])


@pytest.mark.parametrize(
    ("cost", "code"),
    [
        ("0.0000000001", "invalid_cost"),  # finer than a nano
        (1e-30, "invalid_cost"),  # JSON numbers
        (1.5e-9, "invalid_cost"),
        ("1000000000000", "invalid_cost"),  # 10^12
        ("1" + "0" * 40, "invalid_cost"),
        # Spelled in more than 64 characters: refused as it is decoded.
        ("9" * 5000, "invalid_request"),
        ("0." + "0" * 16383 + "1", "invalid_request"),
    ],
)
async def test_an_estimate_no_ledger_can_hold_exactly_is_refused(api, pool, cost, code):
    key_id, _, _ = await key_under_team(api)

    status, answer = await reserve(api, key_id, cost)

    assert (status, answer["error"]["code"]) == (400, code)
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM events WHERE type = $1", "ReservationHeld"
        )
        == 0
    )


@pytest.mark.parametrize(
    ("cost", "kept"),
    [
        ("0." + "0" * 62, "0"),  # a zero in 64 characters, the most a number takes
        ("1.5" + "0" * 61, "1.500000000"),
        ("2.000000000", "2.000000000"),
        ("3", "3"),
    ],
)
async def test_a_hold_is_logged_in_nanos_and_every_reader_agrees(api, pool, cost, kept):
    key_id, _, budget_id = await key_under_team(api)

    status, answer = await reserve(api, key_id, cost)
    logged = await pool.fetchval(
        "SELECT data ->> 'amount' FROM events WHERE type = 'ReservationHeld'"
    )
    shown = await held(api, budget_id, answer["position"])
    _, check = await check_at(api, key_id, answer["position"], exact=True)

    assert (status, answer["allowed"]) == (200, True)
    assert logged == kept
    assert shown == Decimal(kept)
    assert check["remaining"] == Decimal(10) - Decimal(kept)


async def test_a_usage_cost_with_zeros_past_the_nanos_is_logged_in_nanos(api, pool):
    key_id, _, budget_id = await key_under_team(api)
    record = usage_record(key_id, "1.25" + "0" * 60)  # 64 characters

    status, answer = await api.call("POST", "/api/usage", record, headers=bearer("rec"))
    logged = await pool.fetchval(
        "SELECT data ->> 'cost' FROM events WHERE type = 'UsageRecorded'"
    )
    _, found = await api.call(
        "GET",
        f"/api/governance/budgets?min_position={answer['position']}",
        exact=True,
    )

    assert status == 202
    assert logged == "1.250000000"
    usage = [(b["id"], Decimal(b["current_usage"])) for b in found["budgets"]]
    assert usage == [(budget_id, Decimal("1.25"))]


async def test_releasing_a_lapsed_hold_appends_nothing(api, pool):
    key_id, _, _ = await key_under_team(api)
    _, answer = await reserve(api, key_id, "1", ttl_s=1)
    await asyncio.sleep(1.05)  # the hold's lifetime passing, not a projection

    status, released = await api.call(
        "POST",
        f"/api/governance/reservations/{answer['reservation_id']}/release",
        headers=bearer("rec"),
    )

    assert status == 200
    assert released["position"] >= answer["position"]
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM events WHERE type = 'ReservationReleased'"
        )
        == 0
    )


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded"]
)
async def test_a_release_declared_as_a_form_is_refused_and_holds_on(
    api, pool, content_type
):
    key_id, _, budget_id = await key_under_team(api)
    _, answer = await reserve(api, key_id, "4")

    status, refused = await api.call(
        "POST",
        f"/api/governance/reservations/{answer['reservation_id']}/release",
        data=b"a=b",
        content_type=content_type,
        headers=bearer("rec"),
    )

    assert (status, refused["error"]["code"]) == (415, "unsupported_media_type")
    assert await held(api, budget_id, answer["position"]) == Decimal(4)


def frame_of(size: int, record: dict[str, Any]) -> str:
    """A usage frame of exactly `size` bytes: one record, padded with spaces."""
    frame = json.dumps({"seq": 1, "records": [record]})
    return frame[:-1] + " " * (size - len(frame)) + "}"


@pytest.mark.parametrize(
    ("size", "acknowledged"),
    [(MAX_FRAME_BYTES, True), (MAX_FRAME_BYTES + 1, False)],
)
async def test_a_frame_of_4_mib_is_taken_and_one_byte_more_is_not(
    api, size, acknowledged
):
    key_id, _, _ = await key_under_team(api)
    record = usage_record(key_id, "0.5")

    async with api.session.ws_connect(
        api.url("/api/usage/stream"), headers=bearer("rec"), max_msg_size=0
    ) as ws:
        try:
            await ws.send_str(frame_of(size, record))
            message = await ws.receive(timeout=30)
        except ConnectionError:  # closed while the frame was still being sent
            message = None

    if acknowledged:
        assert message is not None
        assert message.type == WSMsgType.TEXT
        assert json.loads(message.data)["seq"] == 1
        assert json.loads(message.data)["accepted"] == 1
    else:
        # Refused: closed with 1009 (message too big), or cut off while sending.
        assert message is None or message.type in {WSMsgType.CLOSE, WSMsgType.CLOSED}
        assert ws.closed


async def test_a_logged_hold_spelled_with_digits_past_the_nanos_still_projects(
    api, pool
):
    # Written before holds were kept in nanos, or imported: 0 spelled with 16,384
    # fractional digits, which PostgreSQL's numeric cannot take as given.
    key_id, _, budget_id = await key_under_team(api)
    hold = ReservationHeld(
        reservation_id=str(uuid.uuid4()),
        virtual_key_id=key_id,
        budget_ids=(budget_id,),
        amount=Decimal("0E-16384"),
        expires_at=datetime.now(UTC) + timedelta(minutes=10),
    )
    position = await append(pool, f"usage-{key_id}", hold)

    await api.caught_up(position)
    stored = await pool.fetchval(
        "SELECT amount::text FROM governance_holds WHERE reservation_id = $1",
        hold.reservation_id,
    )

    assert stored == "0"
    assert await held(api, budget_id, position) == Decimal(0)


@pytest.mark.parametrize(
    "amount", ["1E+40", "0.0000000001", "-1", "NaN", "1000000000000"]
)
def test_an_imported_hold_of_an_amount_no_reserving_check_takes_is_refused(amount):
    hold = ReservationHeld(
        reservation_id=str(uuid.uuid4()),
        virtual_key_id=str(uuid.uuid4()),
        amount=Decimal(amount),
        expires_at=datetime.now(UTC),
    )

    with pytest.raises(InvalidCost):
        upcast.check_values(hold)


def test_an_imported_hold_of_zero_spelled_long_is_taken():
    hold = ReservationHeld(
        reservation_id=str(uuid.uuid4()),
        virtual_key_id=str(uuid.uuid4()),
        amount=Decimal("0E-16384"),
        expires_at=datetime.now(UTC),
    )

    assert upcast.check_values(hold) is None
