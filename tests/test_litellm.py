"""LiteLLM under govledger, against the real things: `litellm` proxies (from
.venv-litellm) with mock_response models in front of a real `govledger serve`, and
the SDK through tests/litellm/sdk_driver.py; each with reservations and with plain
check-then-record. `make test-litellm` prepares .venv-litellm and runs this file;
without GOVLEDGER_LITELLM_VENV only the pure test of the configuration runs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from govledger_client.settings import ConfigError, Settings

from tests.served import CHECK, KEYS, Served, call, free_port

# Relative to the directory pytest runs in (the checkout's root for make).
VENV = os.environ.get("GOVLEDGER_LITELLM_VENV", "")
VENV = os.path.abspath(VENV) if VENV else ""
HERE = Path(__file__).with_name("litellm")
CONFIG = HERE / "proxy.yaml"
DRIVER = HERE / "sdk_driver.py"

# Every test but the pure one: they run LiteLLM.
with_litellm = pytest.mark.skipif(
    not VENV,
    reason="the LiteLLM tests run with `make test-litellm` (they need"
    " .venv-litellm, named by GOVLEDGER_LITELLM_VENV)",
)

ADMIN = "adm-litellm-test"
RECORDER = "rec-litellm-test"
MASTER_KEY = "sk-litellm-master-test"  # tests/litellm/proxy.yaml's
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
RECORDER_AUTH = {"Authorization": f"Bearer {RECORDER}"}

# proxy.yaml's prices per token, (input, output), by deployment model name.
PRICES = {
    "cheap-a": (Decimal("0.000001"), Decimal("0.00001")),
    "pricey-b": (Decimal("0.000002"), Decimal("0.00002")),
    "flaky-up": (Decimal("0.000001"), Decimal("0.00001")),
}
# LiteLLM's token_counter counts 8 tokens for the one message "hello"; its mock
# answers report 10 prompt and 20 completion tokens, its mock streams count 8 and 5.
PROMPT_ESTIMATE = 8
MOCK_USAGE = (10, 20)
STREAM_USAGE = (8, 5)
START_S = 120.0  # a proxy starts in 8-12 s alone; three at once on two cores
RESERVATIONS_MISSING = (
    "needs server-side reservations (the wire contract's 'Reservations': POST"
    " /api/governance/check with reserve: true answering reservation_id and"
    " expires_at, reservation_id on usage records settling the hold, POST"
    " /api/governance/reservations/{id}/release); a reserving check"
)


def cost_of(model: str, prompt: int, completion: int) -> Decimal:
    price_in, price_out = PRICES[model]
    return price_in * prompt + price_out * completion


# --- the processes -----------------------------------------------------------------


class Proxy:
    """`litellm --config` on a free loopback port, from .venv-litellm."""

    def __init__(self, name: str, config: Path, env: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fd, log = tempfile.mkstemp(prefix=f"litellm-{name}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    f"{VENV}/bin/litellm",
                    "--config",
                    str(config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=HERE,
            )

    async def ready(self, session: aiohttp.ClientSession) -> None:
        """Return once /health/liveliness answers (a bounded start-up poll)."""
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited:\n{self.tail()}")
            try:
                async with session.get(
                    f"{self.url}/health/liveliness",
                    timeout=aiohttp.ClientTimeout(total=2),
                ) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
        raise AssertionError(f"{self.name} not up in {START_S} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(
            self.log_path.read_text(errors="replace").splitlines()[-lines:]
        )


class Proxies:
    """The three proxies every proxy test uses, all before the same govledger port:
    `reserve` (header key, reservations), `plain` (header key, check-then-record),
    `auth` (govledger_client.litellm.user_api_key_auth, check-then-record, fail
    open)."""

    def __init__(self, govledger_port: int, config_dir: Path) -> None:
        auth_config = config_dir / "proxy_auth.yaml"
        auth_config.write_text(
            CONFIG.read_text()
            + "  custom_auth: govledger_client.litellm.user_api_key_auth\n"
        )
        common = {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "GOVLEDGER_URL": f"http://127.0.0.1:{govledger_port}",
            "GOVLEDGER_TOKEN": RECORDER,
            "GOVLEDGER_CHECK_TIMEOUT": "5",
        }
        self.reserve = Proxy("reserve", CONFIG, {**common, "GOVLEDGER_RESERVE": "true"})
        self.plain = Proxy("plain", CONFIG, {**common, "GOVLEDGER_RESERVE": "false"})
        self.auth = Proxy(
            "auth",
            auth_config,
            {
                **common,
                "GOVLEDGER_RESERVE": "no",
                "GOVLEDGER_FAIL_OPEN": "yes",
                "GOVLEDGER_UNPRICED": "allow",
            },
        )
        self.all = [self.reserve, self.plain, self.auth]

    def of(self, mode: str) -> Proxy:
        return self.reserve if mode == "reserve" else self.plain


@pytest.fixture(scope="module")
def govledger_port() -> int:
    """One port for every test's server, so the proxies started once find it."""
    return free_port()


@pytest.fixture(scope="module")
async def proxies(govledger_port: int, tmp_path_factory) -> AsyncIterator[Proxies]:
    if not os.access(f"{VENV}/bin/litellm", os.X_OK):
        pytest.fail(f"no litellm in {VENV}: run `make test-litellm`")
    started = Proxies(govledger_port, tmp_path_factory.mktemp("litellm"))
    failed = True
    try:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(p.ready(session) for p in started.all))
        yield started
        failed = False
    finally:
        for proxy in started.all:
            proxy.stop()
            if failed:
                print(f"--- last lines of proxy {proxy.name}:\n{proxy.tail()}")
            proxy.log_path.unlink(missing_ok=True)


@pytest.fixture
async def govledger(database: str, govledger_port: int) -> AsyncIterator[Served]:
    """A `govledger serve` of this test (the tables are emptied after it)."""
    served = Served(
        database,
        name="govledger",
        port=govledger_port,
        env={"GOVLEDGER_ADMIN_TOKENS": ADMIN, "GOVLEDGER_RECORDER_TOKENS": RECORDER},
    )
    served.start()
    failed = True
    try:
        async with aiohttp.ClientSession() as session:
            await served.ready(session)
        yield served
        failed = False
    finally:
        served.kill()  # a graceful stop waits for the proxies' open streams
        if failed:
            print(f"--- last log lines of govledger:\n{served.tail()}")
        served.remove_log()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(params=["plain", "reserve"])
def mode(request) -> str:
    """Check-then-record, or reservations (see `requires`)."""
    return str(request.param)


async def requires(mode: str, session: aiohttp.ClientSession, url: str) -> None:
    """In reserve mode, fail at once, naming the missing server feature, unless the
    server takes a reserving check (of an unknown key: it holds nothing)."""
    if mode != "reserve":
        return
    status, answer = await call(
        session,
        "POST",
        url + CHECK,
        {"virtual_key": "sk-gl-" + "0" * 32, "estimated_cost": 0, "reserve": True},
        headers=RECORDER_AUTH,
    )
    if status != 200:
        pytest.fail(f"{RESERVATIONS_MISSING} answers {status} {answer}", pytrace=False)


# --- govledger's side ---------------------------------------------------------------


class Key:
    def __init__(self, created: dict[str, Any]) -> None:
        self.id: str = created["virtual_key"]["id"]
        self.value: str = created["virtual_key"]["value"]
        self.position: int = created["position"]


async def create_key(session, url: str, **fields: Any) -> Key:
    """A virtual key, known to the server's enforcement cache."""
    status, created = await call(
        session,
        "POST",
        url + KEYS,
        {"name": f"gateway-{uuid.uuid4().hex[:8]}", **fields},
        headers=ADMIN_AUTH,
    )
    assert status == 201, created
    key = Key(created)
    await known(session, url, key.id, key.position)
    return key


async def known(session, url: str, key_id: str, position: int) -> None:
    """Return once the server's cache has applied `position` (min_position)."""
    status, answer = await call(
        session,
        "POST",
        url + CHECK,
        {"virtual_key_id": key_id, "min_position": position},
        headers=RECORDER_AUTH,
    )
    assert status == 200, answer


async def spend(session, url: str, key: Key, cost: str) -> None:
    """Usage recorded directly, and applied by the cache before this returns."""
    status, answer = await call(
        session,
        "POST",
        url + "/api/usage",
        {
            "event_id": str(uuid.uuid4()),
            "virtual_key_id": key.id,
            "provider": "openai",
            "model": "cheap-a",
            "cost": cost,
        },
        headers=RECORDER_AUTH,
    )
    assert status == 202, answer
    await known(session, url, key.id, answer["position"])


async def usage_of(pool, key: Key) -> list[dict[str, Any]]:
    """The key's usage records in the log, oldest first."""
    rows = await pool.fetch(
        "SELECT event_id::text AS event_id, data FROM events"
        " WHERE type = 'UsageRecorded' AND data->>'virtual_key_id' = $1"
        " ORDER BY global_position",
        key.id,
    )
    return [{"event_id": r["event_id"], **json.loads(r["data"])} for r in rows]


async def recorded(pool, key: Key, count: int, within_s: float = 10.0):
    """The key's usage records once there are `count` (a bounded poll: LiteLLM
    logs after answering, the recorder sends every 50 ms)."""
    deadline = time.monotonic() + within_s
    while True:
        rows = await usage_of(pool, key)
        if len(rows) >= count or time.monotonic() > deadline:
            assert len(rows) == count, rows
            return rows
        await asyncio.sleep(0.02)


async def stream_head(pool, key: Key) -> int:
    """The position of the last event of the key's usage stream."""
    return int(
        await pool.fetchval(
            "SELECT coalesce(max(global_position), 0) FROM events WHERE stream_id = $1",
            f"usage-{key.id}",
        )
    )


async def count_events(pool, kind: str, key: Key) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM events WHERE type = $1 AND stream_id = $2",
            kind,
            f"usage-{key.id}",
        )
    )


async def held(session, url: str, key: Key, min_position: int = 0) -> list[Decimal]:
    """The key's budgets' `held`, from a read model that has applied `min_position`
    (the projector runs in a process of its own: read your writes, not sooner)."""
    status, answer = await call(
        session,
        "GET",
        f"{url}/api/governance/budgets?owner_type=virtual_key&owner_id={key.id}"
        f"&min_position={min_position}",
        headers=ADMIN_AUTH,
    )
    assert status == 200, answer
    return [Decimal(str(b["held"])) for b in answer["budgets"]]


async def released_within(session, url: str, key: Key, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while any(await held(session, url, key)):
        assert time.monotonic() < deadline, await held(session, url, key)
        await asyncio.sleep(0.02)


async def every_hold_settled_or_released(pool, key: Key, usage) -> None:
    """Each hold the key's calls took was settled by a usage record or released."""
    settled = [u["reservation_id"] for u in usage if u.get("reservation_id")]
    assert len(set(settled)) == len(settled) == len(usage), usage
    held_count = await count_events(pool, "ReservationHeld", key)
    released = await count_events(pool, "ReservationReleased", key)
    assert held_count == len(settled) + released, (held_count, settled, released)


# --- LiteLLM's side -----------------------------------------------------------------


async def chat(
    session: aiohttp.ClientSession,
    proxy: Proxy,
    model: str,
    *,
    key: str | None = None,
    bearer: str = MASTER_KEY,
    stream: bool = False,
    max_tokens: int = 20,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """POST /v1/chat/completions: {status, model, usage, cost (header), call_id}."""
    sent = {"Authorization": f"Bearer {bearer}", **(headers or {})}
    if key is not None:
        sent["x-govledger-key"] = key
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
    }
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    async with session.post(
        f"{proxy.url}/v1/chat/completions",
        json=body,
        headers=sent,
        timeout=aiohttp.ClientTimeout(total=60),
    ) as response:
        text = await response.text()
        answer: dict[str, Any] = {
            "status": response.status,
            "model": response.headers.get("x-litellm-model-name", "").split("/")[-1],
            "cost": response.headers.get("x-litellm-response-cost"),
            "call_id": response.headers.get("x-litellm-call-id"),
        }
    if response.status != 200:
        answer["error"] = text
        return answer
    if stream:
        chunks = [
            json.loads(line.removeprefix("data: "))
            for line in text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
        usage = next(c["usage"] for c in reversed(chunks) if c.get("usage"))
    else:
        usage = json.loads(text)["usage"]
    answer["usage"] = (usage["prompt_tokens"], usage["completion_tokens"])
    return answer


def as_records(
    answers: list[dict[str, Any]],
) -> list[tuple[str, str, Decimal, int, int]]:
    """What each answered call should have recorded, sorted."""
    return sorted(
        ("openai", a["model"], cost_of(a["model"], *a["usage"]), *a["usage"])
        for a in answers
    )


def records_of(usage: list[dict[str, Any]]) -> list[tuple[str, str, Decimal, int, int]]:
    return sorted(
        (
            u["provider"],
            u["model"],
            Decimal(str(u["cost"])),
            u["input_tokens"],
            u["output_tokens"],
        )
        for u in usage
    )


# --- the proxy ----------------------------------------------------------------------


@pytest.mark.slow
@with_litellm
async def test_allowed_calls_are_recorded_once_with_litellms_cost_and_tokens(
    proxies, govledger, mode, session, pool
):
    await requires(mode, session, govledger.url)
    key = await create_key(
        session, govledger.url, budgets=[{"max_limit": 10, "reset_duration": "1d"}]
    )
    proxy = proxies.of(mode)

    first = await chat(session, proxy, "cheap", key=key.value)
    first_usage = await recorded(pool, key, 1, within_s=1.0)  # within a second
    answers = [
        first,
        await chat(session, proxy, "cheap", key=key.value, stream=True),
        await chat(session, proxy, "flaky", key=key.value),  # retried
        await chat(session, proxy, "falls", key=key.value),  # fallen back
        await chat(session, proxy, "mixed", key=key.value),
        # The client may set LiteLLM's call id: two calls sharing one stay two.
        *[
            await chat(
                session,
                proxy,
                "cheap",
                key=key.value,
                headers={"x-litellm-call-id": "same"},
            )
            for _ in range(2)
        ],
    ]
    usage = await recorded(pool, key, len(answers))

    assert [a["status"] for a in answers] == [200] * 7, answers
    assert [a["model"] for a in answers[:4]] == [
        "cheap-a",
        "cheap-a",
        "flaky-up",
        "cheap-a",
    ]
    assert [a["usage"] for a in answers] == [
        MOCK_USAGE,
        STREAM_USAGE,
        *[MOCK_USAGE] * 5,
    ]
    assert records_of(usage) == as_records(answers)
    # The recorded cost is LiteLLM's own figure, where it tells it (not on streams).
    assert [Decimal(a["cost"]) for a in answers if a is not answers[1]] == [
        cost_of(a["model"], *a["usage"]) for a in answers if a is not answers[1]
    ]
    assert first_usage[0]["event_id"] == usage[0]["event_id"]
    event_ids = {u["event_id"] for u in usage}
    assert len(event_ids) == len(answers)
    assert not event_ids & {a["call_id"] for a in answers}
    if mode == "reserve":
        await every_hold_settled_or_released(pool, key, usage)
        head = await stream_head(pool, key)
        assert await held(session, govledger.url, key, head) == [Decimal(0)]


@pytest.mark.slow
@with_litellm
async def test_refused_calls_get_govledgers_status_and_record_nothing(
    proxies, govledger, mode, session, pool
):
    await requires(mode, session, govledger.url)
    url = govledger.url
    day = {"reset_duration": "1d"}
    spent = await create_key(session, url, budgets=[{"max_limit": "0.0001", **day}])
    await spend(session, url, spent, "0.0001")
    limited = await create_key(
        session,
        url,
        rate_limit={"request_max_limit": 1, "request_reset_duration": "1h"},
    )
    await spend(session, url, limited, "0")
    restricted = await create_key(
        session,
        url,
        provider_configs=[{"provider": "openai", "allowed_models": ["cheap-a"]}],
    )
    # 100 output tokens of "mixed" are held at its pricier deployment's price:
    # 8 * 0.000002 + 100 * 0.00002 = 0.002016 > 0.0015 ("cheap" holds 0.001008).
    tight = await create_key(session, url, budgets=[{"max_limit": "0.0015", **day}])
    proxy = proxies.of(mode)

    answers = {
        "over budget": await chat(session, proxy, "cheap", key=spent.value),
        "rate limited": await chat(session, proxy, "cheap", key=limited.value),
        "model not allowed": await chat(session, proxy, "broken", key=restricted.value),
        "unknown key": await chat(session, proxy, "cheap", key="sk-gl-" + "x" * 32),
        "no key": await chat(session, proxy, "cheap"),
        "unpriced": await chat(session, proxy, "unpriced", key=tight.value),
        "priced at NaN": await chat(session, proxy, "nan-priced", key=tight.value),
        "estimate over": await chat(
            session, proxy, "mixed", key=tight.value, max_tokens=100
        ),
        "estimate within": await chat(
            session, proxy, "cheap", key=tight.value, max_tokens=100
        ),
        # Past what a check takes (2^31 - 1 tokens): held at the cap, still over.
        "estimate past any": await chat(
            session, proxy, "cheap", key=tight.value, max_tokens=2**40
        ),
        # No key is this long: the check is refused as a bad request, and so is
        # the call, whatever GOVLEDGER_FAIL_OPEN says.
        "key past any": await chat(session, proxy, "cheap", key="sk-gl-" + "k" * 300),
    }
    allowed = await recorded(pool, tight, 1)

    assert {name: a["status"] for name, a in answers.items()} == {
        "over budget": 402,
        "rate limited": 429,
        "model not allowed": 403,
        "unknown key": 401,
        "no key": 401,
        "unpriced": 403,
        "priced at NaN": 403,
        "estimate over": 402,
        "estimate within": 200,
        "estimate past any": 402,
        "key past any": 400,
    }, answers
    assert "budget exceeded" in answers["over budget"]["error"]
    assert "no price for 'unpriced'" in answers["unpriced"]["error"]
    assert "no price for 'nan-priced'" in answers["priced at NaN"]["error"]
    assert "x-govledger-key" in answers["no key"]["error"]
    assert "govledger cannot check this call" in answers["key past any"]["error"]
    assert records_of(allowed) == as_records([answers["estimate within"]])
    assert [len(await usage_of(pool, k)) for k in (spent, limited, restricted)] == [
        1,
        1,
        0,
    ]
    if mode == "reserve":
        for key in (spent, limited, restricted):
            assert await count_events(pool, "ReservationHeld", key) == 0
        await every_hold_settled_or_released(pool, tight, allowed)


@pytest.mark.slow
@with_litellm
async def test_a_failed_call_records_nothing_and_its_hold_is_released_within_a_second(
    proxies, govledger, mode, session, pool
):
    await requires(mode, session, govledger.url)
    key = await create_key(
        session, govledger.url, budgets=[{"max_limit": 10, "reset_duration": "1d"}]
    )

    failed = await chat(session, proxies.of(mode), "broken", key=key.value)
    if mode == "reserve":
        await released_within(session, govledger.url, key, within_s=1.0)
    after = await chat(session, proxies.of(mode), "cheap", key=key.value)
    usage = await recorded(pool, key, 1)

    assert (failed["status"], after["status"]) == (500, 200), failed
    assert records_of(usage) == as_records([after])  # the failed call: nothing
    if mode == "reserve":
        assert await count_events(pool, "ReservationReleased", key) == 1
        await every_hold_settled_or_released(pool, key, usage)


@pytest.mark.slow
@with_litellm
async def test_64_concurrent_calls_against_room_for_10(
    proxies, govledger, mode, session, pool
):
    """With reservations exactly 10 are admitted and the limit holds up to what the
    admitted calls cost beyond their estimates; checked, then recorded, all 64
    pass. ("slow" answers after 3 s, so every check comes before any record.)"""
    await requires(mode, session, govledger.url)
    estimate = cost_of("cheap-a", PROMPT_ESTIMATE, 20)  # 0.000208
    limit = estimate * Decimal("10.5")
    key = await create_key(
        session,
        govledger.url,
        budgets=[{"max_limit": str(limit), "reset_duration": "1d"}],
    )

    answers = await asyncio.gather(
        *(chat(session, proxies.of(mode), "slow", key=key.value) for _ in range(64))
    )
    admitted = [a for a in answers if a["status"] == 200]
    usage = await recorded(pool, key, len(admitted))
    spent = sum(Decimal(str(u["cost"])) for u in usage)
    beyond_estimates = sum(
        max(Decimal(0), cost_of(a["model"], *a["usage"]) - estimate) for a in admitted
    )

    assert records_of(usage) == as_records(admitted)
    if mode == "plain":
        assert len(admitted) == 64
        assert spent == 64 * cost_of("cheap-a", *MOCK_USAGE) > 6 * limit
        return
    assert sorted(a["status"] for a in answers) == [200] * 10 + [402] * 54
    assert spent - limit <= beyond_estimates
    await every_hold_settled_or_released(pool, key, usage)
    head = await stream_head(pool, key)
    assert await held(session, govledger.url, key, head) == [Decimal(0)]


# --- custom auth, fail open and closed ---------------------------------------------


@pytest.mark.slow
@with_litellm
async def test_custom_auth_takes_the_govledger_key_as_bearer_and_passes_the_master_key(
    proxies, govledger, session, pool
):
    key = await create_key(session, govledger.url)

    answers = {
        "govledger key": await chat(session, proxies.auth, "cheap", bearer=key.value),
        "master key": await chat(session, proxies.auth, "cheap", bearer=MASTER_KEY),
        "other bearer": await chat(session, proxies.auth, "cheap", bearer="sk-other"),
        "unknown govledger key": await chat(
            session, proxies.auth, "cheap", bearer="sk-gl-" + "y" * 32
        ),
    }
    usage = await recorded(pool, key, 1)

    assert {name: a["status"] for name, a in answers.items()} == {
        "govledger key": 200,
        "master key": 200,
        "other bearer": 401,
        "unknown govledger key": 401,
    }, answers
    assert records_of(usage) == as_records([answers["govledger key"]])
    # The master key's call went ungoverned: recorded for no key.
    everything = "SELECT count(*) FROM events WHERE type = 'UsageRecorded'"
    assert await pool.fetchval(everything) == 1


@pytest.mark.slow
@with_litellm
async def test_a_call_priced_at_nan_under_unpriced_allow_is_recorded_at_cost_0(
    proxies, govledger, session, pool
):
    key = await create_key(session, govledger.url)

    answer = await chat(session, proxies.auth, "nan-priced", bearer=key.value)
    [usage] = await recorded(pool, key, 1)

    assert answer["status"] == 200, answer
    assert (usage["model"], Decimal(str(usage["cost"]))) == ("nan-priced-model", 0)
    assert (usage["input_tokens"], usage["output_tokens"]) == tuple(answer["usage"])


@pytest.mark.slow
@with_litellm
async def test_govledger_down_fails_closed_with_503_or_open_losing_no_usage(
    proxies, govledger, session, pool
):
    key = await create_key(session, govledger.url)
    govledger.kill()

    started = time.monotonic()
    closed = await chat(session, proxies.plain, "cheap", key=key.value)
    closed_s = time.monotonic() - started
    opened = await chat(session, proxies.auth, "cheap", bearer=key.value)
    govledger.start()
    await govledger.ready(session)
    back = time.monotonic()
    usage = await recorded(pool, key, 1, within_s=1.0)  # within a second of return

    assert (closed["status"], opened["status"]) == (503, 200), (closed, opened)
    assert closed_s < 3.0
    assert "GOVLEDGER_FAIL_OPEN=false" in closed["error"]
    assert records_of(usage) == as_records([opened])
    assert time.monotonic() - back < 1.0


# --- the SDK ------------------------------------------------------------------------


async def sdk(
    url: str, reserve: bool, calls: list[dict[str, Any]], *, concurrent: bool = False
) -> list[dict[str, Any]]:
    """Run tests/litellm/sdk_driver.py in .venv-litellm: its answer per call."""
    process = await asyncio.create_subprocess_exec(
        f"{VENV}/bin/python",
        str(DRIVER),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )
    spec = {
        "url": url,
        "token": RECORDER,
        "reserve": reserve,
        "calls": calls,
        "concurrent": concurrent,
    }
    async with asyncio.timeout(90):
        out, err = await process.communicate(json.dumps(spec).encode())
    assert process.returncode == 0, err.decode()[-3000:]
    lines = [json.loads(line) for line in out.decode().splitlines()]
    stats = lines.pop()["stats"]
    assert stats["buffered"] == 0, stats
    return lines


def answered(answer: dict[str, Any]) -> dict[str, Any]:
    """A driver's answer in chat()'s shape."""
    return {
        **answer,
        "model": str(answer.get("model", "")).split("/")[-1],
        "usage": (answer.get("prompt_tokens"), answer.get("completion_tokens")),
    }


@pytest.mark.slow
@with_litellm
async def test_sdk_calls_are_recorded_once_refused_with_govledgers_status_or_released(
    govledger, mode, session, pool
):
    await requires(mode, session, govledger.url)
    url = govledger.url
    day = {"reset_duration": "1d"}
    key = await create_key(session, url, budgets=[{"max_limit": 10, **day}])
    spent = await create_key(session, url, budgets=[{"max_limit": "0.0001", **day}])
    await spend(session, url, spent, "0.0001")
    tight = await create_key(session, url, budgets=[{"max_limit": "0.0015", **day}])

    answers = {
        a["name"]: answered(a)
        for a in await sdk(
            url,
            mode == "reserve",
            [
                {"name": "chat", "model": "cheap", "key": key.value},
                {"name": "stream", "model": "cheap", "key": key.value, "stream": True},
                {"name": "retried", "model": "flaky", "key": key.value},
                {"name": "fallen back", "model": "falls", "key": key.value},
                {"name": "failed", "model": "broken", "key": key.value},
                {"name": "over budget", "model": "cheap", "key": spent.value},
                {"name": "no key", "model": "cheap"},
                {"name": "unpriced", "model": "unpriced", "key": key.value},
                {
                    "name": "estimate over",
                    "model": "mixed",
                    "key": tight.value,
                    "max_tokens": 100,
                },
            ],
        )
    }
    ok = [answers[name] for name in ("chat", "stream", "retried", "fallen back")]
    usage = await recorded(pool, key, 4)

    assert {name: a["status"] for name, a in answers.items()} == {
        "chat": 200,
        "stream": 200,
        "retried": 200,
        "fallen back": 200,
        "failed": 500,
        "over budget": 402,
        "no key": 401,
        "unpriced": 403,
        "estimate over": 402,
    }, answers
    assert [a["model"] for a in ok] == ["cheap-a", "cheap-a", "flaky-up", "cheap-a"]
    assert records_of(usage) == as_records(ok)
    assert [len(await usage_of(pool, k)) for k in (spent, tight)] == [1, 0]
    if mode == "reserve":
        # Each attempt held its estimate: the failed ones were released.
        assert await count_events(pool, "ReservationReleased", key) >= 3
        await every_hold_settled_or_released(pool, key, usage)
        head = await stream_head(pool, key)
        assert await held(session, url, key, head) == [Decimal(0)]


@pytest.mark.slow
@with_litellm
async def test_sdk_64_concurrent_calls_against_room_for_10(
    govledger, mode, session, pool
):
    await requires(mode, session, govledger.url)
    estimate = cost_of("cheap-a", PROMPT_ESTIMATE, 20)
    limit = estimate * Decimal("10.5")
    key = await create_key(
        session,
        govledger.url,
        budgets=[{"max_limit": str(limit), "reset_duration": "1d"}],
    )

    answers = [
        answered(a)
        for a in await sdk(
            govledger.url,
            mode == "reserve",
            [{"name": str(n), "model": "slow", "key": key.value} for n in range(64)],
            concurrent=True,
        )
    ]
    admitted = [a for a in answers if a["status"] == 200]
    usage = await recorded(pool, key, len(admitted))
    spent = sum(Decimal(str(u["cost"])) for u in usage)
    beyond_estimates = sum(
        max(Decimal(0), cost_of(a["model"], *a["usage"]) - estimate) for a in admitted
    )

    assert records_of(usage) == as_records(admitted)
    if mode == "plain":
        assert len(admitted) == 64
        assert spent == 64 * cost_of("cheap-a", *MOCK_USAGE) > 6 * limit
        return
    assert sorted(a["status"] for a in answers) == [200] * 10 + [402] * 54
    assert spent - limit <= beyond_estimates
    await every_hold_settled_or_released(pool, key, usage)


# --- configuration ------------------------------------------------------------------


def test_the_environment_configures_the_integration_and_a_bad_value_is_named():
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env(
        {
            "GOVLEDGER_URL": "http://gov:9000/",
            "GOVLEDGER_TOKEN": "rec",
            "GOVLEDGER_KEY_HEADER": "X-Key",
            "GOVLEDGER_FAIL_OPEN": "YES",
            "GOVLEDGER_RESERVE": "0",
            "GOVLEDGER_UNPRICED": "allow",
            "GOVLEDGER_DEFAULT_MAX_TOKENS": "256",
        }
    ) == Settings(
        url="http://gov:9000",
        token="rec",
        key_header="x-key",
        fail_open=True,
        reserve=False,
        unpriced="allow",
        default_max_tokens=256,
    )
    with pytest.raises(ConfigError, match="GOVLEDGER_RESERVE must be true/false"):
        Settings.from_env({"GOVLEDGER_RESERVE": "maybe"})
    with pytest.raises(ConfigError, match="GOVLEDGER_UNPRICED must be refuse or allow"):
        Settings.from_env({"GOVLEDGER_UNPRICED": "free"})
    with pytest.raises(ConfigError) as no_url:
        Settings.from_env({"GOVLEDGER_URL": "gov:9000"})
    assert str(no_url.value) == (
        "GOVLEDGER_URL: the service URL must be http:// or https:// with a host and at"
        " most a path"
    )


@pytest.mark.slow
@with_litellm
def test_a_bad_setting_stops_the_integration_from_loading():
    result = subprocess.run(
        [f"{VENV}/bin/python", "-c", "import govledger_client.litellm"],
        env={
            **os.environ,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "GOVLEDGER_FAIL_OPEN": "sometimes",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "govledger_client.settings.ConfigError: GOVLEDGER_FAIL_OPEN must be"
        " true/false, 1/0 or yes/no, not 'sometimes'"
    )
