"""Idempotency-Key on the commands that append through the usage writer: a reserving
check, a release, one usage record, a batch. Every answer but a 5xx is kept for its
key, refusals included, and replayed byte for byte with `Idempotent-Replayed: true`;
the key with another request (another body, route or command) is a 422; a malformed
key is a 400 (real PostgreSQL, real aiohttp server)."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from typing import Any

import pytest

from tests.api import Api, bearer, serve
from tests.reserving import CHECK, TOKENS, reserving, usage_record
from tests.reserving import key_under_team as a_key

CUSTOMERS = "/api/governance/customers"


@pytest.fixture
async def api(database):
    async with serve(database, TOKENS, bearer("adm")) as api:
        yield api


async def send(
    api: Api, method: str, path: str, body: Any, key: str | None
) -> tuple[int, bytes, str | None]:
    """(status, body bytes, Idempotent-Replayed) of a recorder's request."""
    headers = (
        bearer("rec") if key is None else {"Idempotency-Key": key, **bearer("rec")}
    )
    response = await api.request(method, path, body, headers=headers)
    return (
        response.status,
        await response.read(),
        response.headers.get("Idempotent-Replayed"),
    )


async def count(pool, event_type: str) -> int:
    return int(
        await pool.fetchval("SELECT count(*) FROM events WHERE type = $1", event_type)
    )


async def test_a_retried_reservation_is_the_first_answer_even_after_its_release(
    api, pool
):
    key_id = (await a_key(api)).key_id
    first = await send(api, "POST", CHECK, reserving(key_id, "4"), "call-1")
    reservation = json.loads(first[1])["reservation_id"]
    released = await send(
        api, "POST", f"/api/governance/reservations/{reservation}/release", None, None
    )
    retry = await send(api, "POST", CHECK, reserving(key_id, "4"), "call-1")

    assert (first[0], first[2]) == (200, None)
    assert json.loads(first[1])["remaining"] == 6
    assert released[0] == 200
    assert retry == (200, first[1], "true")
    assert await count(pool, "ReservationHeld") == 1


async def test_a_retry_while_the_first_is_in_flight_gets_its_answer(api, pool):
    key_id = (await a_key(api)).key_id

    answers = await asyncio.gather(
        *(send(api, "POST", CHECK, reserving(key_id, "3"), "same") for _ in range(5))
    )

    bodies = {body for _, body, _ in answers}
    assert [status for status, _, _ in answers] == [200] * 5
    assert len(bodies) == 1
    assert sorted(replayed or "" for _, _, replayed in answers) == [""] + ["true"] * 4
    assert await count(pool, "ReservationHeld") == 1


async def test_refusals_of_a_reserving_check_are_kept_for_its_key(api, pool):
    key_id = (await a_key(api, limit=10)).key_id
    held = await send(api, "POST", CHECK, reserving(key_id, "8"), "first")
    blocked = await send(api, "POST", CHECK, reserving(key_id, "7"), "blocked")
    malformed = await send(
        api, "POST", CHECK, {"virtual_key_id": key_id, "reserve": True}, "malformed"
    )
    reservation = json.loads(held[1])["reservation_id"]
    await send(
        api, "POST", f"/api/governance/reservations/{reservation}/release", None, None
    )

    # The room is back, but each key answers as it did the first time.
    blocked_again = await send(api, "POST", CHECK, reserving(key_id, "7"), "blocked")
    malformed_again = await send(
        api, "POST", CHECK, {"virtual_key_id": key_id, "reserve": True}, "malformed"
    )

    assert (blocked[0], json.loads(blocked[1])["reason"]) == (200, "budget_exceeded")
    assert blocked_again == (200, blocked[1], "true")
    assert json.loads(malformed[1])["error"]["code"] == "invalid_request"
    assert malformed_again == (400, malformed[1], "true")
    assert await count(pool, "ReservationHeld") == 1


async def test_a_key_with_another_request_is_a_422(api, pool):
    key_id = (await a_key(api)).key_id
    other_key = (await a_key(api)).key_id
    await send(api, "POST", CHECK, reserving(key_id, "4"), "taken")

    other_cost = await send(api, "POST", CHECK, reserving(key_id, "5"), "taken")
    other_vk = await send(api, "POST", CHECK, reserving(other_key, "4"), "taken")
    response = await api.request(
        "POST", CUSTOMERS, {"name": "c"}, headers={"Idempotency-Key": "taken"}
    )

    for status, body, _ in (other_cost, other_vk):
        assert (status, json.loads(body)["error"]["code"]) == (
            422,
            "idempotency_conflict",
        )
    assert response.status == 422
    assert await count(pool, "ReservationHeld") == 1
    assert await count(pool, "CustomerCreated") == 0


@pytest.mark.parametrize("key", ["", " " * 3 + "\t", "é", "k" * 256])
async def test_a_malformed_key_is_a_400_on_every_command(api, key):
    key_id = (await a_key(api)).key_id
    headers = {"Idempotency-Key": key, **bearer("rec")}
    record = usage_record(key_id)
    reservation = str(uuid.uuid4())

    answers = [
        await api.call("POST", CHECK, reserving(key_id, "1"), headers=headers),
        await api.call("POST", CHECK, {"virtual_key_id": key_id}, headers=headers),
        await api.call(
            "POST",
            f"/api/governance/reservations/{reservation}/release",
            headers=headers,
        ),
        await api.call("POST", "/api/usage", record, headers=headers),
    ]

    assert [(s, a["error"]["code"]) for s, a in answers] == [
        (400, "invalid_request")
    ] * 4


async def test_a_retried_release_is_replayed_and_another_release_under_it_is_a_422(
    api, pool
):
    key_id = (await a_key(api)).key_id
    a = json.loads((await send(api, "POST", CHECK, reserving(key_id, "1"), None))[1])
    b = json.loads((await send(api, "POST", CHECK, reserving(key_id, "1"), None))[1])
    path_a = f"/api/governance/reservations/{a['reservation_id']}/release"
    path_b = f"/api/governance/reservations/{b['reservation_id']}/release"

    first = await send(api, "POST", path_a, None, "release-1")
    again = await send(api, "POST", path_a, None, "release-1")
    other = await send(api, "POST", path_b, None, "release-1")

    assert first[0] == 200
    assert again == (200, first[1], "true")
    assert (other[0], json.loads(other[1])["error"]["code"]) == (
        422,
        "idempotency_conflict",
    )
    assert await count(pool, "ReservationReleased") == 1


async def test_a_retried_usage_record_and_batch_answer_as_they_first_did(api, pool):
    key_id = (await a_key(api)).key_id
    record = usage_record(key_id)
    batch = (
        b"\n".join(json.dumps(usage_record(key_id)).encode() for _ in range(3)) + b"\n"
    )

    one = await send(api, "POST", "/api/usage", record, "usage-1")
    one_again = await send(api, "POST", "/api/usage", record, "usage-1")
    headers = {"Idempotency-Key": "batch-1", **bearer("rec")}
    many = await api.request(
        "POST",
        "/api/usage/batch",
        data=batch,
        content_type="application/x-ndjson",
        headers=headers,
    )
    many_again = await api.request(
        "POST",
        "/api/usage/batch",
        data=batch,
        content_type="application/x-ndjson",
        headers=headers,
    )

    assert (one[0], json.loads(one[1])["duplicate"]) == (202, False)
    assert one_again == (202, one[1], "true")
    assert (many.status, json.loads(await many.read())["accepted"]) == (200, 3)
    assert many_again.headers.get("Idempotent-Replayed") == "true"
    assert await many_again.read() == await many.read()
    assert await count(pool, "UsageRecorded") == 4


@pytest.mark.parametrize("path", [CUSTOMERS, "/api/usage"])
async def test_a_body_refused_unread_is_an_answer_kept_for_its_key(api, pool, path):
    """A 413 (too large) or a 415 (a form or plain text) is an answer like any
    other: the key used again for another request is a 422, not a first answer."""
    valid = (
        {"name": "c"} if path == CUSTOMERS else usage_record((await a_key(api)).key_id)
    )
    large = json.dumps({**valid, "pad": "x" * (1 << 20)}).encode()
    before = await pool.fetchval("SELECT count(*) FROM events")

    async def post(key: str, data: bytes, content_type: str) -> tuple[int, bytes]:
        response = await api.request(
            "POST",
            path,
            data=io.BytesIO(data),  # aiohttp warns about large bytes bodies
            content_type=content_type,
            headers={"Idempotency-Key": key, **bearer("adm")},
        )
        return response.status, await response.read()

    too_large = await post("large", large, "application/json")
    again = await post("large", large, "application/json")
    after_large = await post("large", json.dumps(valid).encode(), "application/json")
    plain = await post("plain", json.dumps(valid).encode(), "text/plain")
    after_plain = await post("plain", json.dumps(valid).encode(), "application/json")

    assert too_large[0] == 413
    assert again == too_large
    assert plain[0] == 415
    for status, body in (after_large, after_plain):
        assert (status, json.loads(body)["error"]["code"]) == (
            422,
            "idempotency_conflict",
        )
    assert await pool.fetchval("SELECT count(*) FROM events") == before
