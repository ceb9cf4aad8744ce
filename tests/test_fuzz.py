"""A fuzz pass beside schemathesis: raw header bytes on every route that reads a
header, and every string and list a body may carry, at its limit and past it. Each
asserts the same: never a 5xx, and afterwards the service still answers, and its
read model and cache still project what it accepted."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from service.config import Settings
from service.domain.bounds import (
    MAX_BUDGETS,
    MAX_MODELS,
    MAX_NAME,
    MAX_PROVIDER_CONFIGS,
)
from tests.api import WITHIN_S, Api, serve

TOKEN = "adm-fuzz"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
SETTINGS = Settings(admin_tokens=frozenset({TOKEN}))
CUSTOMERS = "/api/governance/customers"
TEAMS = "/api/governance/teams"
KEYS = "/api/governance/virtual-keys"
CHECK = "/api/governance/check"
# A character of four UTF-8 bytes: a string of MAX_NAME of them is 1 KiB.
WIDE = "\U0001f600"


@pytest.fixture
async def api(database: str) -> AsyncIterator[Api]:
    async with serve(database, SETTINGS, headers=ADMIN) as api:
        yield api


async def seeded(api: Api) -> dict[str, str]:
    customer = await api.create(CUSTOMERS, {"name": "acme"})
    team = await api.create(
        TEAMS, {"name": "platform", "customer_id": customer["customer"]["id"]}
    )
    key = await api.create(KEYS, {"name": "gateway", "team_id": team["team"]["id"]})
    await api.caught_up(key["position"])
    return {
        "customer": customer["customer"]["id"],
        "team": team["team"]["id"],
        "key": key["virtual_key"]["id"],
        "secret": key["virtual_key"]["value"],
    }


def record(key_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "virtual_key_id": key_id,
        "provider": "openai",
        "model": "gpt-4o",
        "cost": "0.5",
        **fields,
    }


async def still_serving(api: Api) -> None:
    """A command, a record and a check go through, and both projections apply
    them: the service answers and projects after whatever came before."""
    created = await api.create(KEYS, {"name": "after the fuzz"})
    key = created["virtual_key"]
    await api.caught_up(created["position"])
    status, accepted = await api.call("POST", "/api/usage", record(key["id"]))
    assert status == 202, accepted
    await api.caught_up(accepted["position"])
    status, found = await api.call("GET", f"{KEYS}/{key['id']}")
    assert (status, found["virtual_key"]["name"]) == (200, "after the fuzz")
    status, checked = await api.call("POST", CHECK, {"virtual_key": key["value"]})
    assert (status, checked["allowed"], checked["position"]) == (
        200,
        True,
        accepted["position"],
    )
    status, ready = await api.call("GET", "/readyz")
    assert (status, ready) == (200, {"status": "ready"})


# --- raw header bytes ---------------------------------------------------------------

# Bytes no client library would send: not UTF-8, cut UTF-8, an encoded surrogate,
# controls, C1 and line separators, non-ASCII text, and the edges of each header's
# grammar.
HOSTILE = [
    b"\xff",
    b"\xfe\xff",
    b"\xc3",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"a\x01b",
    b"\x7f",
    b"\xc2\x85",
    b"\xe2\x80\xa8",
    b"\xc2\xa0",
    b"\xc3\xa9",
    b"\xf0\x9f\x98\x80",
    b'"7"',
    b"-1",
    b"9" * 40,
    b"k" * 256,
    b"x" * 8000,
]
HEADERS = [
    "Idempotency-Key",
    "If-Match",
    "X-Request-Id",
    "Authorization",
    "Content-Type",
    "Origin",
    "Accept",
]


async def raw(api: Api, method: str, path: str, name: str, value: bytes) -> int:
    """Send one request as bytes, `name: value` among its headers; its status."""
    parts = urlsplit(api.base_url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        body = b"{}" if method in ("POST", "PUT") else b""
        auth = b"" if name == "Authorization" else b"Authorization: Bearer adm-fuzz\r\n"
        ctype = b"" if name == "Content-Type" else b"Content-Type: application/json\r\n"
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n".encode()
            + auth
            + ctype
            + name.encode()
            + b": "
            + (b"Bearer " + value if name == "Authorization" else value)
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), WITHIN_S)
    finally:
        writer.close()
    return int(line.split()[1])


@pytest.mark.slow
async def test_no_header_bytes_make_a_5xx_and_the_service_goes_on(api):
    known = await seeded(api)
    routes = [
        ("POST", CUSTOMERS),
        ("PUT", f"{TEAMS}/{known['team']}"),
        ("DELETE", f"{KEYS}/{uuid.uuid4()}"),
        ("POST", CHECK),
        ("POST", "/api/usage"),
        ("POST", "/api/usage/batch"),
        ("GET", f"{CUSTOMERS}/{known['customer']}"),
        ("GET", "/api/events"),
    ]

    statuses = {
        (method, path, name, value): await raw(api, method, path, name, value)
        for method, path in routes
        for name in HEADERS
        for value in HOSTILE
    }

    assert {k: s for k, s in statuses.items() if s >= 500} == {}
    # The headers a command reads are refused whole when they are not well formed.
    for method, path in routes[:3]:
        for value in (b"\xff", b"\xed\xa0\x80", b"a\x01b", b"\xc3\xa9", b"k" * 256):
            assert statuses[method, path, "Idempotency-Key", value] == 400, value
    for value in (b"\xff", b"-1", b"9" * 40, b"\xc2\x85"):
        assert statuses["PUT", routes[1][1], "If-Match", value] == 400, value
    assert statuses["POST", CUSTOMERS, "Authorization", b"\xff"] == 401
    await still_serving(api)


# --- every string and list at and past its limit ------------------------------------


def strings(known: dict[str, str]) -> list[tuple[str, str, Any, Any]]:
    """(method, path, body at the limit, body past it) for every bounded field."""
    team, key = f"{TEAMS}/{known['team']}", f"{KEYS}/{known['key']}"

    def config(**fields: Any) -> dict[str, Any]:
        return {"provider_configs": [{"provider": "openai", **fields}]}

    budgets = [{"max_limit": 1, "reset_duration": f"{n}h"} for n in range(1, 40)]
    return [
        ("POST", CUSTOMERS, {"name": WIDE * MAX_NAME}, {"name": "n" * (MAX_NAME + 1)}),
        ("PUT", team, {"name": "n" * MAX_NAME}, {"name": WIDE * (MAX_NAME + 1)}),
        (
            "POST",
            KEYS,
            {"name": "k", **config(provider=WIDE * MAX_NAME)},
            {"name": "k", **config(provider="p" * 4096)},
        ),
        (
            "PUT",
            key,
            config(allowed_models=[WIDE * MAX_NAME] * 4),
            config(allowed_models=["m" * (MAX_NAME + 1)]),
        ),
        (
            "PUT",
            key,
            config(allowed_models=[f"m{n}" for n in range(MAX_MODELS)]),
            config(allowed_models=[f"m{n}" for n in range(MAX_MODELS + 1)]),
        ),
        (
            "PUT",
            key,
            {
                "provider_configs": [
                    {"provider": f"p{n}"} for n in range(MAX_PROVIDER_CONFIGS)
                ]
            },
            {
                "provider_configs": [
                    {"provider": f"p{n}"} for n in range(MAX_PROVIDER_CONFIGS + 1)
                ]
            },
        ),
        (
            "PUT",
            team,
            {"budgets": budgets[:MAX_BUDGETS]},
            {"budgets": budgets[: MAX_BUDGETS + 1]},
        ),
        (
            "PUT",
            team,
            {"budgets": [{"max_limit": 1, "reset_duration": "3155760000s"}]},
            {"budgets": [{"max_limit": 1, "reset_duration": "31557600000s"}]},
        ),
        (
            "PUT",
            team,
            {"customer_id": known["customer"].upper()},
            {"customer_id": known["customer"] + "0"},
        ),
        (
            "POST",
            "/api/usage",
            record(known["key"], provider=WIDE * MAX_NAME, model="m" * MAX_NAME),
            record(known["key"], model="m" * (MAX_NAME + 1)),
        ),
        (
            "POST",
            CHECK,
            {"virtual_key_id": known["key"], "provider": WIDE * MAX_NAME},
            {"virtual_key_id": known["key"], "provider": "p" * (MAX_NAME + 1)},
        ),
        (
            "POST",
            CHECK,
            {"virtual_key": "s" * MAX_NAME},
            {"virtual_key": "s" * (MAX_NAME + 1)},
        ),
    ]


async def test_every_bounded_field_is_taken_at_its_limit_and_refused_past_it(api):
    known = await seeded(api)
    positions = [0]

    for method, path, at_limit, past_limit in strings(known):
        status, answer = await api.call(method, path, at_limit)
        assert status < 300, (path, answer)
        positions.append(answer.get("position", 0))
        status, answer = await api.call(method, path, past_limit)
        assert (status, answer["error"]["code"]) in {
            (400, "invalid_request"),
            (400, "invalid_record"),
            (400, "invalid_reset_duration"),
        }, (path, answer)

    # Everything accepted at its limit was projected: the widest provider too.
    await api.caught_up(max(positions))
    status, found = await api.call("GET", f"{KEYS}/{known['key']}")
    assert status == 200
    assert len(found["virtual_key"]["provider_configs"]) == MAX_PROVIDER_CONFIGS
    status, events = await api.call("GET", "/api/events?limit=10000")
    widest = [
        e
        for e in events["events"]
        if e["type"] == "VirtualKeyCreated"
        and json.dumps(e["data"]).count("\\ud83d") >= MAX_NAME
    ]
    assert len(widest) == 1
    await still_serving(api)
