"""`occurred_at` must lie between 2000-01-01T00:00:00Z and 5 minutes after the receive
time, on each of the three ingest paths: a timestamp at the edge of the date range
(`0001-01-01T00:00:00+01:00`) is rejected with `occurred_at_out_of_range`, never a
500, and the service still takes and projects the records around it."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.domain.usage import OCCURRED_AT_OUT_OF_RANGE

KEYS = "/api/governance/virtual-keys"
NDJSON = {"Content-Type": "application/x-ndjson"}

# Each past one end of the range; the offsets put several past datetime's own range
# once converted to UTC.
OUT_OF_RANGE = [
    "0001-01-01T00:00:00+01:00",
    "0001-01-01T00:00:00Z",
    "0001-01-01T23:59:59+23:59",
    "1999-12-31T23:59:59.999999Z",
    "2000-01-01T00:30:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "9999-12-31T23:59:59.999999Z",
]
REJECTION = {
    "code": OCCURRED_AT_OUT_OF_RANGE.code,
    "message": OCCURRED_AT_OUT_OF_RANGE.message,
}


def _future() -> str:
    return (datetime.now(UTC) + timedelta(minutes=6)).isoformat()


def _edges() -> list[str]:
    return [*OUT_OF_RANGE, _future()]


@pytest.fixture
async def secret(api) -> str:
    """A virtual key the enforcement cache has seen."""
    created = await api.create(KEYS, {"name": "gateway"})
    await api.caught_up(created["position"])
    return str(created["virtual_key"]["value"])


def record(secret: str, occurred_at: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "virtual_key": secret,
        "provider": "openai",
        "model": "gpt-4o",
        "cost": "0.5",
    }
    if occurred_at is not None:
        body["occurred_at"] = occurred_at
    return body


async def test_post_usage_rejects_an_occurred_at_out_of_range(api, secret):
    answers = [
        await api.call("POST", "/api/usage", record(secret, at)) for at in _edges()
    ]

    assert answers == [(400, {"error": REJECTION})] * len(_edges())
    # The bounds themselves are inside, the zone offset taken into account.
    status, accepted = await api.call(
        "POST", "/api/usage", record(secret, "2000-01-01T00:30:00-01:00")
    )
    assert status == 202
    status, first = await api.call(
        "POST", "/api/usage", record(secret, "2000-01-01T00:00:00Z")
    )
    assert status == 202
    await api.caught_up(max(accepted["position"], first["position"]))


async def test_a_batch_rejects_those_lines_and_commits_the_others(api, secret):
    edges = _edges()
    lines = [record(secret, None), *(record(secret, at) for at in edges)]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)

    status, answer = await api.call(
        "POST", "/api/usage/batch", data=body, headers=NDJSON
    )

    assert status == 200
    assert answer == {
        "accepted": 1,
        "duplicates": 0,
        "rejected": [{"line": n, **REJECTION} for n in range(2, len(edges) + 2)],
        "position": answer["position"],
    }
    await api.caught_up(answer["position"])


async def test_a_stream_frame_rejects_those_records_by_index(api, secret):
    edges = _edges()
    frame = {
        "seq": 1,
        "records": [*(record(secret, at) for at in edges), record(secret, None)],
    }

    async with api.socket() as ws:
        await ws.send_json(frame)
        ack = await ws.receive_json()
        # The socket still takes frames.
        await ws.send_json({"seq": 2, "records": [record(secret, None)]})
        second = await ws.receive_json()

    assert ack == {
        "seq": 1,
        "accepted": 1,
        "duplicates": 0,
        "rejected": [{"index": i, **REJECTION} for i in range(len(edges))],
        "position": ack["position"],
    }
    assert (second["seq"], second["accepted"], second["rejected"]) == (2, 1, [])
    await api.caught_up(second["position"])
