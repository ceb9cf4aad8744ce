"""GET /api/governance/* through a real server: wire shapes with exact values,
filters, 404/400 for bad ids and query values, and ?min_position= waits."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from service import eventstore
from service.config import Settings
from service.domain.events import (
    AnyEvent,
    Budget,
    CustomerCreated,
    ProviderConfig,
    RateLimit,
    TeamBudgetsReplaced,
    TeamCreated,
    UsageRecorded,
    VirtualKeyCreated,
)
from service.records import NewEvent
from service.web.app import create_app
from service.web.keys import governance_projector_key, pool_key

API = "/api/governance"
MISSING = "00000000-0000-4000-8000-00000000dead"
Client = TestClient[web.Request, web.Application]
# Whole seconds, a minute ago: every rolling period below contains the real now.
AT = (datetime.now(UTC) - timedelta(minutes=1)).replace(microsecond=0)


def uid() -> str:
    return str(uuid.uuid4())


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@asynccontextmanager
async def serve(database: str, **settings: Any) -> AsyncIterator[Client]:
    app = create_app(Settings(**settings), database)
    async with TestClient(TestServer(app)) as client:
        yield client


@pytest.fixture
async def client(database) -> AsyncIterator[Client]:
    async with serve(database, min_position_wait_s=0.2) as client:
        yield client


async def append(client: Client, stream_id: str, *events: AnyEvent) -> int:
    pool = client.app[pool_key]
    appended = await eventstore.append(
        pool, stream_id, None, [NewEvent(event=e) for e in events], recorded_at=AT
    )
    return appended[-1].global_position


async def applied(client: Client) -> None:
    await client.app[governance_projector_key].catch_up()


async def get(client: Client, path: str, **headers: str) -> tuple[int, Any]:
    response = await client.get(path, headers=headers)
    return response.status, json.loads(await response.text(), parse_float=Decimal)


def customer_created(customer_id: str, name: str = "acme", **fields) -> CustomerCreated:
    return CustomerCreated(customer_id=customer_id, name=name, **fields)


def key_created(key_id: str, **fields) -> VirtualKeyCreated:
    return VirtualKeyCreated(
        virtual_key_id=key_id,
        name="ci",
        value_sha256=hashlib.sha256(key_id.encode()).hexdigest(),
        value_hint="wxyz",
        **fields,
    )


async def test_get_customer_answers_the_wire_shape_with_current_usage(client):
    customer_id, budget_id, key_id = uid(), uid(), uid()
    await append(
        client,
        f"customer-{customer_id}",
        customer_created(
            customer_id,
            budgets=(
                Budget(
                    budget_id=budget_id,
                    max_limit=Decimal("10.000000001"),
                    reset_duration="1d",
                ),
            ),
            rate_limit=RateLimit(token_max_limit=5000, token_reset_duration="1h"),
        ),
    )
    await append(client, f"virtual_key-{key_id}", key_created(key_id))
    for cost, tokens in (("1.25", 100), ("0.000000001", 20)):
        await append(
            client,
            f"usage-{key_id}",
            UsageRecorded(
                virtual_key_id=key_id,
                customer_id=customer_id,
                provider="openai",
                model="gpt-4o",
                cost=Decimal(cost),
                input_tokens=tokens,
                occurred_at=AT + timedelta(seconds=10),
            ),
        )
    await applied(client)

    assert await get(client, f"{API}/customers/{customer_id}") == (
        200,
        {
            "customer": {
                "id": customer_id,
                "name": "acme",
                "budgets": [
                    {
                        "id": budget_id,
                        "max_limit": Decimal("10.000000001"),
                        "reset_duration": "1d",
                        "calendar_aligned": False,
                        "current_usage": Decimal("1.250000001"),
                        "last_reset": rfc3339(AT),
                        "owner_type": "customer",
                        "owner_id": customer_id,
                        "held": 0,
                    }
                ],
                "rate_limit": {
                    "token_max_limit": 5000,
                    "token_reset_duration": "1h",
                    "request_max_limit": None,
                    "request_reset_duration": None,
                    "token_current_usage": 120,
                    "request_current_usage": 0,
                    "token_held": 0,
                    "request_held": 0,
                },
                "version": 1,
                "created_at": rfc3339(AT),
                "updated_at": rfc3339(AT),
            }
        },
    )


async def test_get_virtual_key_shows_the_hint_but_never_the_secret_or_its_hash(
    client,
):
    key_id, config_id = uid(), uid()
    await append(
        client,
        f"virtual_key-{key_id}",
        key_created(
            key_id,
            provider_configs=(
                ProviderConfig(
                    provider_config_id=config_id,
                    provider="openai",
                    allowed_models=("gpt-4o", "gpt-4o-mini"),
                    rate_limit=RateLimit(
                        request_max_limit=10, request_reset_duration="1m"
                    ),
                ),
            ),
        ),
    )
    await applied(client)

    status, body = await get(client, f"{API}/virtual-keys/{key_id}")

    assert status == 200
    assert body == {
        "virtual_key": {
            "id": key_id,
            "name": "ci",
            "team_id": None,
            "customer_id": None,
            "is_active": True,
            "budgets": [],
            "rate_limit": None,
            "provider_configs": [
                {
                    "id": config_id,
                    "provider": "openai",
                    "allowed_models": ["gpt-4o", "gpt-4o-mini"],
                    "budgets": [],
                    "rate_limit": {
                        "token_max_limit": None,
                        "token_reset_duration": None,
                        "request_max_limit": 10,
                        "request_reset_duration": "1m",
                        "token_current_usage": 0,
                        "request_current_usage": 0,
                        "token_held": 0,
                        "request_held": 0,
                    },
                }
            ],
            "value_hint": "wxyz",
            "version": 1,
            "created_at": rfc3339(AT),
            "updated_at": rfc3339(AT),
        }
    }


async def test_lists_return_every_match_filtered_by_parent(client):
    acme, globex, ml, ops = uid(), uid(), uid(), uid()
    team_key, customer_key, lone_key = uid(), uid(), uid()
    await append(client, f"customer-{acme}", customer_created(acme, "acme"))
    await append(client, f"customer-{globex}", customer_created(globex, "globex"))
    await append(
        client, f"team-{ml}", TeamCreated(team_id=ml, name="ml", customer_id=acme)
    )
    await append(client, f"team-{ops}", TeamCreated(team_id=ops, name="ops"))
    await append(client, f"virtual_key-{team_key}", key_created(team_key, team_id=ml))
    await append(
        client,
        f"virtual_key-{customer_key}",
        key_created(customer_key, customer_id=globex),
    )
    await append(client, f"virtual_key-{lone_key}", key_created(lone_key))
    await applied(client)

    def ids(body: dict[str, Any], name: str) -> set[str]:
        return {entity["id"] for entity in body[name]}

    _, customers = await get(client, f"{API}/customers")
    _, all_teams = await get(client, f"{API}/teams")
    _, acme_teams = await get(client, f"{API}/teams?customer_id={acme}")
    _, all_keys = await get(client, f"{API}/virtual-keys")
    _, ml_keys = await get(client, f"{API}/virtual-keys?team_id={ml}")
    _, globex_keys = await get(client, f"{API}/virtual-keys?customer_id={globex}")
    _, both = await get(client, f"{API}/virtual-keys?team_id={ml}&customer_id={globex}")

    assert ids(customers, "customers") == {acme, globex}
    assert (ids(all_teams, "teams"), ids(acme_teams, "teams")) == ({ml, ops}, {ml})
    assert ids(all_keys, "virtual_keys") == {team_key, customer_key, lone_key}
    assert ids(ml_keys, "virtual_keys") == {team_key}
    assert ids(globex_keys, "virtual_keys") == {customer_key}
    assert both == {"virtual_keys": []}


async def test_lists_answer_the_page_that_limit_and_offset_ask_for(client):
    customers = [uid() for _ in range(3)]
    for customer_id in customers:
        await append(client, f"customer-{customer_id}", customer_created(customer_id))
    team_id = uid()
    await append(
        client,
        f"team-{team_id}",
        TeamCreated(
            team_id=team_id,
            name="t",
            customer_id=customers[0],
            budgets=tuple(
                Budget(budget_id=uid(), max_limit=Decimal(1), reset_duration=d)
                for d in ("1d", "1w", "1M")
            ),
        ),
    )
    for other in (uid(), uid()):
        await append(client, f"team-{other}", TeamCreated(team_id=other, name="u"))
    for _ in range(3):
        key_id = uid()
        await append(client, f"virtual_key-{key_id}", key_created(key_id))
    await applied(client)
    lists = [
        (f"{API}/customers?", "customers"),
        (f"{API}/teams?", "teams"),
        (f"{API}/virtual-keys?", "virtual_keys"),
        (f"{API}/budgets?", "budgets"),
        (f"{API}/budgets?owner_type=team&", "budgets"),
        (f"{API}/budgets?owner_type=team&owner_id={team_id}&", "budgets"),
    ]

    for path, name in lists:
        _, whole = await get(client, path)
        every = [entity["id"] for entity in whole[name]]
        assert len(every) >= 3, path
        for query, cut in (
            ("limit=2", slice(0, 2)),
            ("limit=2&offset=2", slice(2, 4)),
            ("offset=1&limit=1", slice(1, 2)),
            ("offset=1", slice(1, None)),
            ("limit=100", slice(0, 100)),
            (f"offset={len(every)}", slice(len(every), None)),
        ):
            status, page = await get(client, path + query)
            assert status == 200, (path, query)
            assert [e["id"] for e in page[name]] == every[cut], (path, query)


async def test_budgets_endpoint_filters_by_owner_type_and_owner_id(client):
    team_a, team_b, key_id = uid(), uid(), uid()
    on_a, on_b, on_key = uid(), uid(), uid()

    def one(budget_id: str) -> tuple[Budget, ...]:
        return (Budget(budget_id=budget_id, max_limit=Decimal(1), reset_duration="1M"),)

    await append(
        client,
        f"team-{team_a}",
        TeamCreated(team_id=team_a, name="a", budgets=one(on_a)),
    )
    await append(
        client,
        f"team-{team_b}",
        TeamCreated(team_id=team_b, name="b", budgets=one(on_b)),
    )
    await append(
        client, f"virtual_key-{key_id}", key_created(key_id, budgets=one(on_key))
    )
    await applied(client)

    async def budget_ids(query: str) -> set[str]:
        status, body = await get(client, f"{API}/budgets{query}")
        assert status == 200
        return {b["id"] for b in body["budgets"]}

    assert await budget_ids("") == {on_a, on_b, on_key}
    assert await budget_ids("?owner_type=team") == {on_a, on_b}
    assert await budget_ids(f"?owner_type=team&owner_id={team_b}") == {on_b}
    assert await budget_ids(f"?owner_id={key_id}") == {on_key}
    assert await budget_ids("?owner_type=provider_config") == set()


async def test_one_owners_budgets_come_in_the_order_of_the_whole_list(client):
    # Ordered by creation, then by the owner's order: a budget kept through a
    # replacement keeps its creation time, so it comes before one added later even
    # where the owner now lists it second. One owner's list is read without the
    # whole list's query, and must keep its order.
    team_id, kept, dropped, added, also_added = uid(), uid(), uid(), uid(), uid()

    def budget(budget_id: str, duration: str) -> Budget:
        return Budget(
            budget_id=budget_id, max_limit=Decimal(5), reset_duration=duration
        )

    await append(
        client,
        f"team-{team_id}",
        TeamCreated(
            team_id=team_id,
            name="a",
            budgets=(budget(dropped, "1d"), budget(kept, "1M")),
        ),
    )
    replaced = TeamBudgetsReplaced(
        team_id=team_id,
        budgets=(budget(added, "1h"), budget(kept, "1M"), budget(also_added, "1w")),
    )
    await eventstore.append(
        client.app[pool_key],
        f"team-{team_id}",
        None,
        [NewEvent(event=replaced)],
        recorded_at=AT + timedelta(seconds=1),
    )
    await applied(client)

    async def budget_ids(query: str) -> list[str]:
        status, body = await get(client, f"{API}/budgets{query}")
        assert status == 200
        return [b["id"] for b in body["budgets"]]

    assert await budget_ids("") == [kept, added, also_added]
    assert await budget_ids(f"?owner_type=team&owner_id={team_id}") == [
        kept,
        added,
        also_added,
    ]
    assert await budget_ids(f"?owner_type=customer&owner_id={team_id}") == []
    assert await budget_ids(f"?owner_type=team&owner_id={uid()}") == []


@pytest.mark.parametrize("kind", ["customers", "teams", "virtual-keys"])
@pytest.mark.parametrize("entity_id", [MISSING, "not-a-uuid"])
async def test_an_unknown_or_malformed_id_is_404_not_found(client, kind, entity_id):
    status, body = await get(client, f"{API}/{kind}/{entity_id}")

    assert (status, body["error"]["code"]) == (404, "not_found")


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("/customers?min_position=soon", "invalid_position"),
        ("/customers?min_position=-1", "invalid_position"),
        ("/budgets?owner_type=organisation", "invalid_request"),
        ("/budgets?owner_id=42", "invalid_request"),
        ("/teams?customer_id=acme", "invalid_request"),
        ("/virtual-keys?team_id=ml", "invalid_request"),
        ("/virtual-keys?customer_id=1", "invalid_request"),
        ("/customers?limit=0", "invalid_request"),
        ("/teams?offset=-1", "invalid_request"),
        ("/budgets?limit=ten", "invalid_request"),
        ("/virtual-keys?offset=1.5", "invalid_request"),
        ("/customers?limit=1&limit=2", "invalid_request"),
    ],
)
async def test_bad_query_values_are_400_with_a_code(client, query, code):
    status, body = await get(client, f"{API}{query}")

    assert (status, body["error"]["code"]) == (400, code)


async def test_min_position_past_the_head_is_503_projection_lag_after_the_wait(
    client,
):
    started = time.monotonic()
    status, body = await get(client, f"{API}/customers?min_position=1000000")

    assert (status, body["error"]["code"]) == (503, "projection_lag")
    assert time.monotonic() - started >= 0.2


async def test_min_position_answers_once_the_projector_applied_it(database):
    customer_id = uid()
    async with serve(database, min_position_wait_s=10) as client:
        position = await append(
            client, f"customer-{customer_id}", customer_created(customer_id)
        )
        # No catch_up here: the running projector, woken by NOTIFY, gets there.
        status, body = await get(
            client, f"{API}/customers/{customer_id}?min_position={position}"
        )

    assert (status, body["customer"]["id"]) == (200, customer_id)


async def test_reads_need_the_reader_right(database):
    async with serve(
        database,
        reader_tokens=frozenset({"read-secret"}),
        recorder_tokens=frozenset({"rec-secret"}),
    ) as client:
        reader = await get(client, f"{API}/budgets", Authorization="Bearer read-secret")
        recorder = await get(
            client, f"{API}/budgets", Authorization="Bearer rec-secret"
        )

    assert reader == (200, {"budgets": []})
    assert (recorder[0], recorder[1]["error"]["code"]) == (403, "forbidden")
