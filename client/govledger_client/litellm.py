"""LiteLLM within govledger's limits: `GovledgerCallback` holds each call's estimate
before it runs, records its actual cost and tokens once it has answered (settling the
hold) and releases the hold when it fails; in the proxy (`proxy_handler` in
config.yaml, and `user_api_key_auth` so that the govledger key can be the bearer) and
in the SDK (through the deployment hook). Needs the extra:
`pip install 'govledger-client[litellm]'`.

The usage buffer is the `Recorder`'s, in memory: records are sent again until
govledger acknowledges them, so an outage loses nothing, but a crash of the gateway
process loses what was not yet acknowledged (usually the last 50 ms; all of an
outage's records if it crashes during one). Their holds then expire at their ttl.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import secrets
import time
import uuid
from collections import OrderedDict, deque
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any, Final, NoReturn, TypeGuard

# The extra's imports; mypy runs without the extra installed.
import litellm  # type: ignore[import-not-found, unused-ignore]
import msgspec
from litellm.exceptions import GuardrailRaisedException  # type: ignore[import-not-found, unused-ignore]
from litellm.integrations.custom_logger import CustomLogger  # type: ignore[import-not-found, unused-ignore]

from .errors import RecorderError
from .recorder import Recorder
from .settings import ConfigError, Settings
from .wire import (
    MAX_ESTIMATED_COST,
    MAX_ESTIMATED_TOKENS,
    CheckResult,
    Reservation,
    money,
)

__all__ = [
    "ConfigError",
    "GovledgerCallback",
    "GovledgerRefusal",
    "Settings",
    "proxy_handler",
    "user_api_key_auth",
]

log = logging.getLogger(__name__)

# The mark the proxy's pre-call hook leaves in a request's metadata (a call id of
# this process, never a value the client chose), and the one the SDK's deployment
# hook leaves on one attempt's logging details.
CALL_FIELD: Final = "govledger_call"
ATTEMPT_FIELD: Final = "govledger_attempt"
# SDK mode: the caller names the key in the call's metadata, by secret or by id.
KEY_FIELD: Final = "govledger_key"
KEY_ID_FIELD: Final = "govledger_key_id"
# user_api_key_auth's verdict, in the metadata of the key it answers: "master", or
# the SHA-256 of a govledger key (the secret itself stays out of logged metadata).
AUTH_FIELD: Final = "govledger_auth"
MASTER: Final = "master"

GOVLEDGER_KEY: Final = re.compile(r"sk-gl-[A-Za-z0-9_-]{32}")
# A failed proxy call may still log a success (a guardrail refused the answer after
# the model was paid for): its usage is recorded if that comes within this time.
FAILED_GRACE_S: Final = 60.0
# A call that neither succeeds nor fails (an abandoned stream) is forgotten after
# its hold's ttl and this much more.
FORGET_AFTER_S: Final = 3600.0
_NANO: Final = Decimal("1e-9")


class GovledgerRefusal(GuardrailRaisedException):  # type: ignore[misc, unused-ignore]
    """govledger refused a call in SDK mode: `http_status` and `reason` are the
    check's (402 budget_exceeded, 429 rate_limited, 401 no or unknown key, …; 503
    when govledger did not answer and the policy is fail-closed), `result` the
    check's answer when there was one.

    A guardrail's block to LiteLLM's router, so it is neither retried nor sent to a
    fallback. It has no `status_code`: the router reads that as the health of the
    deployment it tried, and a refusal says nothing about a deployment (with one, a
    key over budget would put the deployment in cooldown for everyone)."""

    def __init__(
        self,
        http_status: int,
        reason: str,
        message: str,
        result: CheckResult | None = None,
    ) -> None:
        super().__init__(
            guardrail_name="govledger",
            message=message,
            should_wrap_with_default_message=False,
            status_code=http_status,
        )
        del self.status_code
        self.http_status = http_status
        self.reason = reason
        self.result = result


class _Refused(Exception):
    """A refusal, before it takes the proxy's or the SDK's form."""

    def __init__(
        self, status: int, reason: str, message: str, result: CheckResult | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.result = result


class _Key(msgspec.Struct, frozen=True):
    """A virtual key, by its secret or by its id."""

    value: str | None = None  # exactly one of the two
    id: str | None = None


class _Call(msgspec.Struct):
    """A call this process admitted: whose it is (None: ungoverned), its hold."""

    key: _Key | None
    reservation: Reservation | None
    started: float
    failed: bool = False


class _Price(msgspec.Struct, frozen=True):
    input: Decimal  # per prompt token
    output: Decimal  # per completion token


class _Estimate(msgspec.Struct, frozen=True):
    cost: Decimal
    tokens: int


class _Bearers:
    """The govledger keys `user_api_key_auth` accepted lately, by SHA-256: the
    pre-call hook finds the secret here, so it never rides in request metadata."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._keys: OrderedDict[str, str] = OrderedDict()

    def put(self, secret: str) -> str:
        digest = hashlib.sha256(secret.encode()).hexdigest()
        self._keys[digest] = secret
        self._keys.move_to_end(digest)
        while len(self._keys) > self._size:
            self._keys.popitem(last=False)
        return digest

    def get(self, digest: str) -> str | None:
        return self._keys.get(digest)


_bearers = _Bearers()


class GovledgerCallback(CustomLogger):  # type: ignore[misc, unused-ignore]
    """govledger's gate and meter around LiteLLM calls.

    Proxy: `async_pre_call_hook` takes the govledger key (the `x-govledger-key`
    header, or the bearer through `user_api_key_auth`), estimates the call and
    reserves it (or checks it, with `reserve` off); a refusal is an HTTPException
    with govledger's status. SDK: `async_pre_call_deployment_hook` does the same
    for each attempt of `litellm.acompletion` (and the other async calls), with the
    key in the call's `metadata` (`govledger_key`, or `govledger_key_id`), raising
    `GovledgerRefusal`. Either way `async_log_success_event` records the cost and
    tokens LiteLLM reports, under an event id made here (so a repeat is counted
    once), settling the hold; a failed call's hold is released
    (`async_post_call_failure_hook` in the proxy, the attempt's
    `async_log_failure_event` in the SDK).

    `router`: the SDK's `litellm.Router`, so that an estimate takes the highest
    price among the deployments of the requested model group (the proxy's own
    router is found by itself); without one an attempt is priced at its
    deployment's price. `sdk=False` (the proxy's `proxy_handler`) leaves calls
    that did not pass the pre-call hook (the proxy's own health checks) alone.
    Call `await close()` before the event loop ends to flush the usage buffer.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The proxy calls the pre-call hook only when the registered class itself
        # defines it: a subclass that merely inherits it would go ungoverned.
        super().__init_subclass__(**kwargs)
        if "async_pre_call_hook" not in vars(cls):
            cls.async_pre_call_hook = GovledgerCallback.async_pre_call_hook  # type: ignore[method-assign]

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        router: Any = None,
        sdk: bool = True,
    ) -> None:
        super().__init__()
        self.settings = (
            settings if settings is not None else Settings.from_env(os.environ)
        )
        self.router = router
        self.sdk = sdk
        self.recorder = Recorder(
            self.settings.url,
            token=self.settings.token,
            check_timeout=self.settings.check_timeout,
            fail_open=self.settings.fail_open,
            ack_timeout=3.0,  # a stream a restarting server no longer answers
            max_backoff=0.5,  # back within a second of govledger's return
        )
        self._calls: dict[str, _Call] = {}  # in order of admission
        self._failed: deque[tuple[float, str]] = deque()

    async def close(self, grace: float | None = None) -> None:
        """Flush the usage buffer (at most `grace` seconds) and hang up."""
        await self.recorder.close(grace)

    @property
    def open_calls(self) -> int:
        """Calls admitted whose end LiteLLM has not reported yet."""
        return sum(not call.failed for call in self._calls.values())

    # --- the proxy ---

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: Any
    ) -> dict[str, Any]:
        """The proxy's gate: admit the request (its mark in `data`'s metadata) or
        raise an HTTPException with govledger's status."""
        metadata = _request_metadata(data)
        metadata.pop(CALL_FIELD, None)  # never the client's
        auth = getattr(user_api_key_dict, "metadata", None) or {}
        verdict = auth.get(AUTH_FIELD) if isinstance(auth, dict) else None
        call_id = str(uuid.uuid4())
        if verdict == MASTER:
            self._admitted(call_id, _Call(None, None, time.monotonic()))
            metadata[CALL_FIELD] = call_id
            return data
        try:
            key = _proxy_key(data, verdict, self.settings.key_header)
            group = str(data.get("model") or "")
            router = _proxy_router()
            price = _group_price(router, group)
            provider, model = _group_target(router, group)
            estimate = self._estimate(group, data, price)
            call = await self._admit(key, estimate, provider, model)
        except _Refused as refused:
            _raise_http(refused)
        self._admitted(call_id, call)
        metadata[CALL_FIELD] = call_id
        return data

    async def async_post_call_failure_hook(
        self,
        request_data: dict[str, Any],
        original_exception: Exception,
        user_api_key_dict: Any,
        traceback_str: str | None = None,
    ) -> None:
        """Once per failed proxy request (refusals included): drop its hold."""
        metadata = _metadata_in(request_data)
        call_id = metadata.get(CALL_FIELD) if metadata is not None else None
        call = self._calls.get(call_id) if isinstance(call_id, str) else None
        if call is None or call.failed:
            return
        if call.reservation is not None:
            self.recorder.release(call.reservation)
            call.reservation = None  # a late success is then counted, not settling
        call.failed = True
        self._failed.append((time.monotonic(), str(call_id)))

    # --- the SDK ---

    async def async_pre_call_deployment_hook(
        self, kwargs: dict[str, Any], call_type: Any
    ) -> None:
        """The SDK's gate, once per attempt: admit it (its mark on the attempt's
        logging details) or raise GovledgerRefusal."""
        metadata = _metadata_in(kwargs) or {}
        if metadata.get(CALL_FIELD) in self._calls or not self.sdk:
            return None  # the proxy's pre-call hook has decided
        logging_obj = kwargs.get("litellm_logging_obj")
        details = getattr(logging_obj, "model_call_details", None)
        if not isinstance(details, dict):
            raise GovledgerRefusal(
                500, "no_logging", "govledger cannot follow this call"
            )
        try:
            key = _sdk_key(metadata)
            model, provider = _split(kwargs)
            group = metadata.get("model_group")
            price = (
                _group_price(self.router, group)
                if self.router is not None and isinstance(group, str)
                else _deployment_price(kwargs, metadata, model, provider)
            )
            estimate = self._estimate(model, kwargs, price)
            call = await self._admit(key, estimate, provider, model)
        except _Refused as refused:
            raise GovledgerRefusal(
                refused.status, refused.reason, str(refused), refused.result
            ) from None
        call_id = str(uuid.uuid4())
        self._admitted(call_id, call)
        details[ATTEMPT_FIELD] = call_id
        return None

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """One per failed attempt: an SDK attempt's hold is dropped (the proxy's
        wait for its request's end, in async_post_call_failure_hook)."""
        call_id = kwargs.get(ATTEMPT_FIELD)
        call = self._calls.pop(call_id, None) if isinstance(call_id, str) else None
        if call is not None and call.reservation is not None:
            self.recorder.release(call.reservation)

    # --- both ---

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        """Once per answered request (a stream once it has ended): record what
        LiteLLM reports, settling the hold."""
        call_id = kwargs.get(ATTEMPT_FIELD)
        if call_id is None:
            metadata = _logged_metadata(kwargs)
            call_id = metadata.get(CALL_FIELD) if metadata is not None else None
        call = self._calls.pop(call_id, None) if isinstance(call_id, str) else None
        if call is None or call.key is None:
            return  # not admitted here, recorded already, or ungoverned
        logged = kwargs.get("standard_logging_object") or {}
        provider = str(
            kwargs.get("custom_llm_provider")
            or logged.get("custom_llm_provider")
            or "unknown"
        )
        model = str(kwargs.get("model") or logged.get("model") or "unknown")
        cost = logged.get("response_cost") or 0
        if kwargs.get("response_cost") is None or not _is_amount(cost):
            log.warning(
                "govledger: LiteLLM has no price for %s/%s: usage recorded at cost 0",
                provider,
                model,
            )
            cost = 0
        ended = logged.get("endTime")
        try:
            await self.recorder.record(
                virtual_key=call.key.value,
                virtual_key_id=call.key.id,
                event_id=str(call_id),
                provider=provider,
                model=model,
                cost=money(float(cost)),
                input_tokens=int(logged.get("prompt_tokens") or 0),
                output_tokens=int(logged.get("completion_tokens") or 0),
                occurred_at=datetime.fromtimestamp(float(ended), UTC)
                if isinstance(ended, int | float)
                else None,
                reservation_id=None
                if call.reservation is None
                else call.reservation.id,
            )
        except (RecorderError, ValueError):
            log.exception("govledger: usage of call %s not recorded", call_id)

    # --- shared ---

    def _estimate(
        self, model: str, request: dict[str, Any], price: _Price | None
    ) -> _Estimate:
        """The prompt's tokens at the input price plus the output allowed at the
        output price; a model without a price is refused or held at 0. An estimate
        past what a check takes (a request asking for 2^40 output tokens) is capped
        there: still over any budget or limit below the cap, and never a check the
        service refuses as malformed, which would fail the call closed or let it
        through ungoverned."""
        prompt = _prompt_tokens(model, request)
        output = _max_output(request) or self.settings.default_max_tokens
        tokens = min(prompt + output, MAX_ESTIMATED_TOKENS)
        if price is None:
            if self.settings.unpriced == "refuse":
                raise _Refused(
                    403,
                    "model_unpriced",
                    f"govledger: LiteLLM has no price for {model!r}, so its cost "
                    "cannot be held (GOVLEDGER_UNPRICED=refuse)",
                )
            return _Estimate(Decimal(0), tokens)
        cost = price.input * prompt + price.output * output
        # Capped first: 2^100 tokens priced has more digits than a quantize may make.
        cost = min(cost, MAX_ESTIMATED_COST).quantize(_NANO, rounding=ROUND_CEILING)
        return _Estimate(cost, tokens)

    async def _admit(
        self,
        key: _Key,
        estimate: _Estimate,
        provider: str | None,
        model: str | None,
    ) -> _Call:
        s = self.settings
        try:
            result = await self.recorder.check(
                virtual_key=key.value,
                virtual_key_id=key.id,
                provider=provider,
                model=model,
                estimated_cost=estimate.cost,
                within=s.check_timeout,
                reserve=s.reserve,
                estimated_tokens=estimate.tokens if s.reserve else None,
                ttl_s=s.ttl_s if s.reserve else None,
            )
        except RecorderError as exc:  # the check itself refused: a token, a version
            if exc.status == 400:
                # This call made a check the service cannot read (a key header of
                # 300 characters, a model name past 256): an answer about the call,
                # not govledger being unable to answer, so no policy lets it pass.
                raise _Refused(
                    400, exc.code, f"govledger cannot check this call: {exc}"
                ) from None
            log.error("govledger refused the check: %s (%s)", exc, exc.code)
            if s.fail_open:
                return _Call(key, None, time.monotonic())
            raise _Refused(
                503, "govledger_error", f"govledger refused the check: {exc}"
            ) from None
        if result.fallback:
            if result.allowed:
                log.warning("govledger did not answer (%s): call passes", result.reason)
                return _Call(key, None, time.monotonic())
            raise _Refused(
                503,
                result.reason,
                f"govledger did not answer ({result.reason}); refused"
                " (GOVLEDGER_FAIL_OPEN=false)",
            )
        if not result.allowed:
            raise _Refused(
                result.http_status, result.reason, result.explanation, result
            )
        return _Call(key, result.reservation, time.monotonic())

    def _admitted(self, call_id: str, call: _Call) -> None:
        """Remember a call until it ends; forget those that never will."""
        calls = self._calls
        now = time.monotonic()
        while self._failed and self._failed[0][0] < now - FAILED_GRACE_S:
            calls.pop(self._failed.popleft()[1], None)
        cutoff = now - self.settings.ttl_s - FORGET_AFTER_S
        while calls:
            oldest = next(iter(calls))
            if calls[oldest].started >= cutoff:
                break
            del calls[oldest]
        calls[call_id] = call


# --- custom auth ------------------------------------------------------------------


async def user_api_key_auth(request: Any, api_key: str) -> Any:
    """The proxy's `general_settings: custom_auth`: a govledger key as the bearer
    is accepted (the pre-call hook then governs with it), LiteLLM's master key
    passes ungoverned, anything else is refused with 401."""
    from fastapi import HTTPException  # type: ignore[import-not-found, unused-ignore]
    from litellm.proxy import proxy_server  # type: ignore[import-not-found, unused-ignore]
    from litellm.proxy._types import (  # type: ignore[import-not-found, unused-ignore]
        LitellmUserRoles,
        UserAPIKeyAuth,
    )

    bearer = (api_key or "").removeprefix("Bearer ").strip()
    master = proxy_server.master_key
    if master and secrets.compare_digest(bearer.encode(), str(master).encode()):
        return UserAPIKeyAuth(
            api_key=bearer,
            user_role=LitellmUserRoles.PROXY_ADMIN,
            metadata={AUTH_FIELD: MASTER},
        )
    if GOVLEDGER_KEY.fullmatch(bearer):
        return UserAPIKeyAuth(
            api_key=bearer, metadata={AUTH_FIELD: _bearers.put(bearer)}
        )
    raise HTTPException(
        status_code=401,
        detail="govledger: the bearer must be a govledger key (sk-gl-…)",
    )


# --- reading LiteLLM's structures --------------------------------------------------


def _request_metadata(data: dict[str, Any]) -> dict[str, Any]:
    """The metadata dict of a proxy request (`litellm_metadata` on /v1/messages
    and /v1/responses), created when absent."""
    field = (
        "litellm_metadata"
        if isinstance(data.get("litellm_metadata"), dict)
        else "metadata"
    )
    metadata = data.get(field)
    if not isinstance(metadata, dict):
        metadata = data[field] = {}
    return metadata


def _metadata_in(data: dict[str, Any]) -> dict[str, Any] | None:
    for field in ("metadata", "litellm_metadata"):
        metadata = data.get(field)
        if isinstance(metadata, dict) and CALL_FIELD in metadata:
            return metadata
    metadata = data.get("metadata")
    return metadata if isinstance(metadata, dict) else None


def _logged_metadata(kwargs: dict[str, Any]) -> dict[str, Any] | None:
    params = kwargs.get("litellm_params")
    return _metadata_in(params) if isinstance(params, dict) else None


def _proxy_key(data: dict[str, Any], verdict: object, header: str) -> _Key:
    if isinstance(verdict, str):
        secret = _bearers.get(verdict)
        if secret is not None:
            return _Key(value=secret)
    server_request = data.get("proxy_server_request")
    headers = (
        server_request.get("headers") if isinstance(server_request, dict) else None
    )
    if isinstance(headers, dict):
        for name, value in headers.items():
            if str(name).lower() == header and str(value).strip():
                return _Key(value=str(value).strip())
    raise _Refused(
        401,
        "no_govledger_key",
        f"govledger: no govledger key: send it in the {header} header"
        " (or as the bearer, with govledger_client.litellm.user_api_key_auth)",
    )


def _sdk_key(metadata: dict[str, Any]) -> _Key:
    value, key_id = metadata.get(KEY_FIELD), metadata.get(KEY_ID_FIELD)
    if isinstance(value, str) and value:
        return _Key(value=value)
    if isinstance(key_id, str) and key_id:
        return _Key(id=key_id)
    raise _Refused(
        401,
        "no_govledger_key",
        f"govledger: no govledger key: pass metadata={{{KEY_FIELD!r}: ...}}"
        f" (or {KEY_ID_FIELD!r})",
    )


def _proxy_router() -> Any:
    from litellm.proxy import proxy_server  # type: ignore[import-not-found, unused-ignore]

    return proxy_server.llm_router


def _split(kwargs: dict[str, Any]) -> tuple[str, str | None]:
    """(model, provider) of a deployment's call, as LiteLLM splits them."""
    model = str(kwargs.get("model") or "")
    provider = kwargs.get("custom_llm_provider")
    try:
        name, found, _, _ = litellm.get_llm_provider(
            model=model,
            custom_llm_provider=provider if isinstance(provider, str) else None,
        )
    except Exception:  # LiteLLM cannot place it: check without a provider
        return model, None
    return str(name), str(found)


def _group_deployments(router: Any, group: str) -> list[dict[str, Any]]:
    models = getattr(router, "model_list", None) or []
    return [d for d in models if isinstance(d, dict) and d.get("model_name") == group]


def _group_target(router: Any, group: str) -> tuple[str | None, str | None]:
    """The (provider, model) a check names for a model group: each when every
    deployment of the group shares it, else None (budgets still apply)."""
    deployments = _group_deployments(router, group) if router is not None else []
    targets = {_split(dict(d.get("litellm_params") or {})) for d in deployments}
    if not targets:
        model, provider = _split({"model": group})
        return provider, model
    providers = {provider for _, provider in targets}
    models = {model for model, _ in targets}
    return (
        providers.pop() if len(providers) == 1 else None,
        models.pop() if len(models) == 1 else None,
    )


def _group_price(router: Any, group: str) -> _Price | None:
    """The highest prices among a model group's deployments, their config.yaml
    prices included (the router knows them; LiteLLM's global helpers do not)."""
    info = router.get_model_group_info(group) if router is not None else None
    if info is None:
        try:
            found = litellm.get_model_info(model=group)
        except Exception:  # not a model LiteLLM knows
            return None
        return _price(
            found.get("input_cost_per_token"), found.get("output_cost_per_token")
        )
    return _price(info.input_cost_per_token, info.output_cost_per_token)


def _deployment_price(
    kwargs: dict[str, Any], metadata: dict[str, Any], model: str, provider: str | None
) -> _Price | None:
    """One deployment's prices: given with the call, in its router config, or
    LiteLLM's price list."""
    given = _price(
        kwargs.get("input_cost_per_token"), kwargs.get("output_cost_per_token")
    )
    if given is not None:
        return given
    info = metadata.get("model_info")
    if isinstance(info, dict):
        configured = _price(
            info.get("input_cost_per_token"), info.get("output_cost_per_token")
        )
        if configured is not None:
            return configured
    try:
        found = litellm.get_model_info(model=model, custom_llm_provider=provider)
    except Exception:  # not a model LiteLLM knows
        return None
    return _price(found.get("input_cost_per_token"), found.get("output_cost_per_token"))


def _price(input_cost: object, output_cost: object) -> _Price | None:
    """A deployment's prices per token; None unless both are numbers that can be a
    price (a NaN, an infinity or a negative one in a config is no price, and is
    treated as GOVLEDGER_UNPRICED says, not carried into an estimate)."""
    prices = [money(float(c)) for c in (input_cost, output_cost) if _is_amount(c)]
    return _Price(*prices) if len(prices) == 2 else None


def _is_amount(value: object) -> TypeGuard[int | float]:
    """Whether LiteLLM's number can be money: a price or a cost that is NaN,
    infinite or negative (a mistyped config) is treated as none."""
    return isinstance(value, int | float) and math.isfinite(value) and value >= 0


def _prompt_tokens(model: str, request: dict[str, Any]) -> int:
    messages = request.get("messages")
    try:
        if isinstance(messages, list):
            return int(litellm.token_counter(model=model, messages=messages))
        text = request.get("prompt", request.get("input"))
        if isinstance(text, list):
            text = "\n".join(str(part) for part in text)
        if isinstance(text, str):
            return int(litellm.token_counter(model=model, text=text))
    except Exception:  # a shape token_counter cannot read: hold the output only
        log.warning("govledger: cannot count the prompt's tokens for %s", model)
    return 0


def _max_output(request: dict[str, Any]) -> int | None:
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = request.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _raise_http(refused: _Refused) -> NoReturn:
    from fastapi import HTTPException  # type: ignore[import-not-found, unused-ignore]

    headers = {"Retry-After": "1"} if refused.status in (429, 503) else None
    raise HTTPException(
        status_code=refused.status, detail=str(refused), headers=headers
    ) from None


# The instance config.yaml names: litellm_settings: callbacks:
# ["govledger_client.litellm.proxy_handler"]. Configured from the environment when
# this module is imported, so a bad GOVLEDGER_* value stops the proxy at start.
proxy_handler: Final = GovledgerCallback(sdk=False)
