"""POST /api/governance/check over HTTP against a real server and PostgreSQL: the
answer shape, min_position, validation and rights, and a cache loaded from the read
model deciding like one folded from the log."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from projections import cache_loader
from projections.cache import GovernanceCache
from projections.cache_entries import CheckResult
from service import eventstore
from service.config import Settings
from service.records import Checkpoint
from service.web.keys import (
    cache_key,
    cache_projector_key,
    governance_projector_key,
    pool_key,
    readiness_key,
)
from tests.api import Api, bearer, serve
from tests.builders import against_commit_order

CHECK = "/api/governance/check"
CUSTOMERS = "/api/governance/customers"
TEAMS = "/api/governance/teams"
KEYS = "/api/governance/virtual-keys"


async def hierarchy(api: Api) -> dict[str, Any]:
    """A key under a team of a customer: 100/month customer, 10/day team, 5/day key
    with an openai config limited to gpt-4o."""
    customer = (
        await api.create(
            CUSTOMERS,
            {"name": "acme", "budgets": [{"max_limit": 100, "reset_duration": "1M"}]},
        )
    )["customer"]
    team = (
        await api.create(
            TEAMS,
            {
                "name": "platform",
                "customer_id": customer["id"],
                "budgets": [{"max_limit": 10, "reset_duration": "1d"}],
            },
        )
    )["team"]
    created = await api.create(
        KEYS,
        {
            "name": "gateway",
            "team_id": team["id"],
            "budgets": [{"max_limit": "5", "reset_duration": "1d"}],
            "provider_configs": [{"provider": "openai", "allowed_models": ["gpt-4o"]}],
        },
    )
    return {
        "customer": customer,
        "team": team,
        "key": created["virtual_key"],
        "position": created["position"],
    }


async def record_usage(api: Api, secret: str, cost: str, *, event_id: str) -> int:
    status, answer = await api.call(
        "POST",
        "/api/usage",
        {
            "event_id": event_id,
            "virtual_key": secret,
            "provider": "openai",
            "model": "gpt-4o",
            "cost": cost,
        },
    )
    assert status == 202, answer
    return int(answer["position"])


def decide(
    cache: GovernanceCache,
    sha: str,
    provider: str,
    model: str,
    estimate: Decimal | None,
    at: datetime,
) -> CheckResult:
    return cache.check(
        virtual_key_sha256=sha,
        virtual_key_id=None,
        provider=provider,
        model=model,
        estimated_cost=estimate,
        now=at,
    )


# --- answers -----------------------------------------------------------------------


async def test_a_new_key_is_allowed_with_the_smallest_headroom_as_remaining(api):
    made = await hierarchy(api)
    status, answer = await api.call(
        "POST",
        CHECK,
        {
            "virtual_key": made["key"]["value"],
            "provider": "openai",
            "model": "gpt-4o",
            "min_position": made["position"],
        },
    )
    assert status == 200
    assert answer == {
        "allowed": True,
        "reason": "ok",
        "http_status": 200,
        "remaining": 5,
        "position": answer["position"],
    }
    assert answer["position"] >= made["position"]


async def test_spend_recorded_over_http_blocks_with_the_budget_named(api):
    made = await hierarchy(api)
    secret, key = made["key"]["value"], made["key"]
    await api.caught_up(made["position"])
    position = await record_usage(
        api, secret, "5", event_id="e0000000-0000-4000-8000-000000000001"
    )
    status, answer = await api.call(
        "POST",
        CHECK,
        {
            "virtual_key_id": key["id"],
            "provider": "openai",
            "model": "gpt-4o",
            "min_position": position,
        },
    )
    assert status == 200
    assert answer == {
        "allowed": False,
        "reason": "budget_exceeded",
        "http_status": 402,
        "budget_id": key["budgets"][0]["id"],
        "owner_type": "virtual_key",
        "owner_id": key["id"],
        "current_usage": 5,
        "max_limit": 5,
        "position": answer["position"],
    }


async def test_an_estimate_above_the_headroom_blocks_and_may_be_a_string(api):
    made = await hierarchy(api)
    body = {
        "virtual_key": made["key"]["value"],
        "provider": "openai",
        "model": "gpt-4o",
        "min_position": made["position"],
    }
    _, fits = await api.call("POST", CHECK, {**body, "estimated_cost": "5"})
    _, over = await api.call("POST", CHECK, {**body, "estimated_cost": 5.01})
    assert (fits["reason"], fits["remaining"]) == ("ok", 5)
    assert (over["reason"], over["budget_id"], over["current_usage"]) == (
        "budget_exceeded",
        made["key"]["budgets"][0]["id"],
        0,
    )


async def test_refusals_of_the_key_provider_and_model_are_200_answers(api):
    made = await hierarchy(api)
    secret = made["key"]["value"]
    await api.caught_up(made["position"])
    cases = [
        ({"virtual_key": "sk-gl-unknown"}, "unknown_virtual_key", 401),
        ({"virtual_key": secret, "provider": "anthropic"}, "provider_not_allowed", 403),
        (
            {"virtual_key": secret, "provider": "openai", "model": "o1"},
            "model_not_allowed",
            403,
        ),
    ]
    for body, reason, http_status in cases:
        status, answer = await api.call("POST", CHECK, body)
        assert status == 200
        assert answer == {
            "allowed": False,
            "reason": reason,
            "http_status": http_status,
            "position": answer["position"],
        }


async def test_a_deactivated_key_is_refused_once_the_cache_has_its_update(api):
    made = await hierarchy(api)
    status, updated = await api.call(
        "PUT", f"{KEYS}/{made['key']['id']}", {"is_active": False}
    )
    assert status == 200, updated
    _, answer = await api.call(
        "POST",
        CHECK,
        {"virtual_key": made["key"]["value"], "min_position": updated["position"]},
    )
    assert (answer["reason"], answer["http_status"]) == ("key_inactive", 403)


# --- the request -------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"virtual_key": "sk-gl-x", "virtual_key_id": "x"},
        {"virtual_key": "sk-gl-x", "estimated_cost": -1},
        {"virtual_key": "sk-gl-x", "estimated_cost": "NaN"},
        {"virtual_key": "sk-gl-x", "estimated_cost": True},
        {"virtual_key": "sk-gl-x", "colour": "blue"},
        {"virtual_key": 42},
        {"virtual_key": "sk-gl-x", "min_position": "soon"},
    ],
)
async def test_a_malformed_body_is_a_400(api, body):
    status, answer = await api.call("POST", CHECK, body)
    assert status == 400
    assert answer["error"]["code"] == "invalid_request"


async def test_a_negative_min_position_is_a_400(api):
    status, answer = await api.call(
        "POST", CHECK, {"virtual_key": "sk-gl-x", "min_position": -1}
    )
    assert (status, answer["error"]["code"]) == (400, "invalid_position")


async def test_a_min_position_the_cache_does_not_reach_is_a_503(database):
    async with serve(database, Settings(min_position_wait_s=0.2)) as api:
        status, answer = await api.call(
            "POST",
            CHECK,
            {"virtual_key": "sk-gl-x", "min_position": 1_000_000},
        )
    assert (status, answer["error"]["code"]) == (503, "projection_lag")


async def test_readers_and_recorders_may_check_and_a_missing_token_may_not(database):
    settings = Settings(
        admin_tokens=frozenset({"adm"}),
        recorder_tokens=frozenset({"rec"}),
        reader_tokens=frozenset({"read"}),
    )
    body = {"virtual_key": "sk-gl-x"}
    async with serve(database, settings) as api:
        for token in ("adm", "rec", "read"):
            status, answer = await api.call("POST", CHECK, body, headers=bearer(token))
            assert (status, answer["reason"]) == (200, "unknown_virtual_key")
        status, answer = await api.call("POST", CHECK, body)
        assert (status, answer["error"]["code"]) == (401, "unauthorized")


async def test_the_cache_reports_to_readiness(api):
    await api.app[cache_projector_key].catch_up()
    assert api.app[readiness_key]["cache"].ready is True


async def test_a_check_answers_the_highest_position_applied_not_the_checkpoints(api):
    # The tail applies in commit order, (tx_id, position): here the later position
    # comes first, so the checkpoint ends on the lower one. A check that waited
    # for the later position must not answer as of a position below it.
    made = await hierarchy(api)
    await api.caught_up(made["position"])
    pool = api.app[pool_key]
    first, second = await against_commit_order(pool)
    for waited in (second, first):
        status, answer = await api.call(
            "POST",
            CHECK,
            {"virtual_key": made["key"]["value"], "min_position": waited},
        )
        assert (status, answer["position"]) == (200, second)
    cache = api.app[cache_key]
    assert (cache.checkpoint.position, cache.position) == (first, second)

    # So does a cache loaded from the read model whose checkpoint is the lower one.
    governance = api.app[governance_projector_key]
    await governance.catch_up()
    assert governance.checkpoint.position == first
    async with pool.acquire() as conn:
        loaded, _ = await cache_loader.load(conn)
    assert (loaded.checkpoint.position, loaded.position) == (first, second)


# --- loading -----------------------------------------------------------------------


async def test_a_cache_loaded_from_the_read_model_decides_like_one_folded_from_the_log(
    api,
):
    made = await hierarchy(api)
    secret = made["key"]["value"]
    await api.caught_up(made["position"])
    for n, cost in enumerate(("1.25", "2.5", "0.000000001")):
        await record_usage(
            api, secret, cost, event_id=f"e0000000-0000-4000-8000-00000000000{n}"
        )
    governance = api.app[governance_projector_key]
    await governance.catch_up()
    pool = api.app[pool_key]
    async with pool.acquire() as conn:
        loaded, checkpoint = await cache_loader.load(conn)
    assert checkpoint == governance.checkpoint
    folded = GovernanceCache()
    for record in await eventstore.read_all(pool, Checkpoint(), 10_000):
        folded.apply(record)
    now = datetime.now(UTC)
    sha = hashlib.sha256(secret.encode()).hexdigest()
    assert decide(loaded, sha, "openai", "gpt-4o", None, now) == CheckResult(
        allowed=True, reason="ok", http_status=200, remaining=Decimal("1.249999999")
    )
    for provider, model, estimate in [
        ("openai", "gpt-4o", None),
        ("openai", "gpt-4o", Decimal("1.249999999")),
        ("openai", "gpt-4o", Decimal("1.25")),
        ("openai", "o1", None),
        ("anthropic", "claude", None),
    ]:
        for at in (now, now + timedelta(days=1)):
            asked = (sha, provider, model, estimate, at)
            assert decide(loaded, *asked) == decide(folded, *asked)
    assert loaded.keys.keys() == folded.keys.keys()


async def test_a_restarted_service_starts_from_the_read_model_and_tails_on(database):
    async with serve(database, Settings()) as first:
        made = await hierarchy(first)
        secret = made["key"]["value"]
        await first.caught_up(made["position"])
        await record_usage(
            first, secret, "4", event_id="e0000000-0000-4000-8000-000000000011"
        )
        await first.app[governance_projector_key].catch_up()
    async with serve(database, Settings()) as second:
        cache = second.app[cache_key]
        assert cache.position > 0  # started from the read model's checkpoint
        position = await record_usage(
            second, secret, "0.5", event_id="e0000000-0000-4000-8000-000000000012"
        )
        _, answer = await second.call(
            "POST",
            CHECK,
            {
                "virtual_key": secret,
                "provider": "openai",
                "model": "gpt-4o",
                "min_position": position,
            },
        )
    assert (answer["reason"], answer["remaining"]) == ("ok", 0.5)
