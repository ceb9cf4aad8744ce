"""Request bodies at the edge: every string and list bounded, money exact, ids in any
letter case made canonical, and the documented patterns equal to the rules that
enforce them."""

from __future__ import annotations

import json
import re
from decimal import Decimal

import msgspec
import pytest

from service.domain.bounds import (
    MAX_BUDGETS,
    MAX_MODELS,
    MAX_NAME,
    MAX_PROVIDER_CONFIGS,
    NAME_PATTERN,
)
from service.domain.budgets import (
    DURATION_PATTERN,
    MAX_RATE_LIMIT,
    BudgetSpec,
    new_budgets,
    parse_duration,
)
from service.domain.commands import (
    CustomerBody,
    CustomerChanges,
    RateLimitChanges,
    TeamBody,
    VirtualKeyBody,
    VirtualKeyChanges,
    body_decoder,
    canonical_references,
    checked_name,
    rate_limit_after,
    strict_decode,
)
from service.domain.events import (
    Budget,
    CustomerBudgetsReplaced,
    ProviderConfig,
    RateLimit,
    TeamCreated,
    VirtualKeyCreated,
)
from service.domain.numbers import (
    Money,
    Whole,
    decimal_number,
    decode_hook,
    schema_hook,
)
from service.domain.upcast import check_values
from service.errors import Invalid, InvalidRateLimit

UPPER = "A0B1C2D3-E4F5-4A6B-8C7D-9E0F1A2B3C4D"
LOWER = UPPER.lower()


def decode(type_, body):
    """Decode as the edge does (commands.body_decoder), any request struct."""
    decoder = msgspec.json.Decoder(
        type_, dec_hook=decode_hook, float_hook=decimal_number
    )
    return decoder.decode(json.dumps(body))


def refusal(type_, body) -> str:
    with pytest.raises(msgspec.ValidationError) as caught:
        decode(type_, body)
    return str(caught.value)


def budget(limit="1", duration="1d"):
    return {"max_limit": limit, "reset_duration": duration}


# --- bounds ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"name": "x" * (MAX_NAME + 1)}, "$.name"),
        ({"name": ""}, "$.name"),
        ({"name": " \t\u3000"}, "$.name"),
        ({"name": "a\x00b"}, "$.name"),
        (
            {"name": "a", "budgets": [budget(duration=f"{n}h") for n in range(1, 34)]},
            "$.budgets",
        ),
    ],
)
def test_a_name_or_list_outside_its_bounds_is_refused_at_its_path(body, where):
    assert refusal(CustomerBody, body).endswith(f"- at `{where}`")


def test_names_at_their_bounds_are_taken():
    longest = "é" * MAX_NAME
    budgets = [budget(duration=f"{n}h") for n in range(1, MAX_BUDGETS + 1)]

    body = decode(CustomerBody, {"name": longest, "budgets": budgets})

    assert (body.name, len(body.budgets)) == (longest, MAX_BUDGETS)
    assert decode(CustomerBody, {"name": " x "}).name == " x "


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"provider": "p" * (MAX_NAME + 1)}, "$.provider_configs[0].provider"),
        ({"provider": " "}, "$.provider_configs[0].provider"),
        (
            {"provider": "p", "allowed_models": ["m"] * (MAX_MODELS + 1)},
            "$.provider_configs[0].allowed_models",
        ),
        (
            {"provider": "p", "allowed_models": ["m" * (MAX_NAME + 1)]},
            "$.provider_configs[0].allowed_models[0]",
        ),
        (
            {"provider": "p", "allowed_models": [""]},
            "$.provider_configs[0].allowed_models[0]",
        ),
        (
            {"provider": "p", "allowed_models": ["a\x00"]},
            "$.provider_configs[0].allowed_models[0]",
        ),
    ],
)
def test_provider_configs_are_bounded_at_every_depth(config, where):
    body = {"name": "k", "provider_configs": [config]}

    assert refusal(VirtualKeyBody, body).endswith(f"- at `{where}`")
    assert refusal(VirtualKeyChanges, body).endswith(f"- at `{where}`")


def test_at_most_64_provider_configs():
    configs = [{"provider": f"p{n}"} for n in range(MAX_PROVIDER_CONFIGS + 1)]

    message = refusal(VirtualKeyBody, {"name": "k", "provider_configs": configs})

    assert message.endswith("- at `$.provider_configs`")
    kept = decode(VirtualKeyBody, {"name": "k", "provider_configs": configs[:-1]})
    assert len(kept.provider_configs) == MAX_PROVIDER_CONFIGS


def test_the_name_pattern_is_the_rule_checked_name_applies():
    pattern = re.compile(NAME_PATTERN)
    samples = ["a", " a", "\x1c", "\x1cb", "\u00a0", "\u200b", "\ufeff", "\n", "a\n"]
    samples += [chr(c) for c in range(0x3100) if chr(c) != "\x00"]

    for name in samples:
        try:
            checked_name(name, "test")
            taken = True
        except Invalid:
            taken = False
        assert bool(pattern.search(name)) is taken, repr(name)


# --- ids ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [UPPER, LOWER, UPPER[:9] + LOWER[9:]])
def test_a_uuid_in_any_letter_case_is_taken_and_made_canonical(value):
    team = decode(TeamBody, {"name": "t", "customer_id": value})
    key = decode(VirtualKeyChanges, {"team_id": value, "customer_id": None})

    assert canonical_references(team).customer_id == LOWER
    assert canonical_references(key) == VirtualKeyChanges(
        team_id=LOWER, customer_id=None
    )


@pytest.mark.parametrize(
    "value",
    [
        "not-a-uuid",
        LOWER.replace("-", ""),
        "{" + LOWER + "}",
        LOWER + "\n",
        "urn:uuid:" + LOWER,
        LOWER[:-1] + "g",
    ],
)
def test_anything_but_a_hyphenated_uuid_is_refused_as_an_id(value):
    assert refusal(TeamBody, {"name": "t", "customer_id": value}).endswith(
        "- at `$.customer_id`"
    )


# --- money -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"0.1", Decimal("0.1")),
        (b"0.1000000000000000055511151231257827", None),  # exact, then refused
        (b'"12.50"', Decimal("12.50")),
        (b"7", Decimal(7)),
        (b'"-1"', Decimal(-1)),
        (b"1e2", Decimal(100)),
    ],
)
def test_money_is_read_exactly_from_a_number_or_a_plain_decimal_string(raw, value):
    body = b'{"name": "a", "budgets": [{"max_limit": %s, "reset_duration": "1d"}]}'
    [spec] = body_decoder(CustomerBody).decode(body % raw).budgets

    assert type(spec.max_limit) is Decimal
    if value is None:
        assert spec.max_limit == Decimal(raw.decode())
        with pytest.raises(Invalid):
            new_budgets([spec], str)
    else:
        assert spec.max_limit == value


@pytest.mark.parametrize(
    "text", [" 1", "1 ", "+1", "1_000", "1e3", "1.", ".5", "\u0661", "0x10", ""]
)
def test_a_money_string_that_is_not_plain_decimal_digits_is_refused(text):
    message = refusal(CustomerBody, {"name": "a", "budgets": [budget(text)]})

    assert message.endswith("- at `$.budgets[0].max_limit`")


@pytest.mark.parametrize("quote", ['"', ""])
def test_a_money_value_is_spelled_in_at_most_64_characters(quote):
    """A number or a money string of 500,000 zeros was exact, so it was taken,
    kept whole in the log's event and echoed back (the limit is 1)."""

    def body(zeros: int) -> str:
        limit = f"{quote}1.{'0' * zeros}{quote}"
        spec = f'{{"max_limit": {limit}, "reset_duration": "1d"}}'
        return f'{{"name": "a", "budgets": [{spec}]}}'

    fits, over = body(62), body(63)  # 64 and 65 characters
    decoder = body_decoder(CustomerBody)

    [spec] = decoder.decode(fits).budgets
    with pytest.raises(msgspec.ValidationError) as caught:
        decoder.decode(over)

    assert spec.max_limit == 1
    assert str(caught.value).startswith(("a number takes", "Expected a decimal"))
    assert "at most 64 characters, got 65" in str(caught.value)
    assert str(caught.value).endswith("- at `$.budgets[0].max_limit`")


@pytest.mark.parametrize("value", [True, None, [], {}])
def test_money_of_another_type_is_refused(value):
    assert refusal(CustomerBody, {"name": "a", "budgets": [budget(value)]}).endswith(
        "- at `$.budgets[0].max_limit`"
    )


def test_the_money_and_whole_markers_take_exactly_what_decoding_makes():
    # msgspec checks each value dec_hook returns against its field's marker.
    assert [isinstance(v, Money) for v in (Decimal("1.5"), 1, 1.5, "1")] == [
        True,
        False,
        False,
        False,
    ]
    assert [isinstance(v, Whole) for v in (5, True, Decimal(5), 5.0)] == [
        True,
        False,
        False,
        False,
    ]
    assert decode_hook(Money, Decimal("0.25")) == Decimal("0.25")
    assert decode_hook(Whole, Decimal("5.0")) == 5


def _max_limit_schema() -> dict:
    schema = msgspec.json.schema(BudgetSpec, schema_hook=schema_hook)
    return schema["$defs"]["BudgetSpec"]["properties"]["max_limit"]


@pytest.mark.parametrize(
    "text",
    [
        "0",
        "1",
        "0.1",
        "00.5",
        "0.0000000001",
        "0.000000001",
        "0.0000000010",
        "1.1234567890",
        "1.12345678901",
        "999999999999999999",
        "0999999999999999999.999999999",
        "1000000000000000000",
        "-1",
        "-0",
        "0.0",
        "000",
        "10.000000000000000",
        "NaN",
        "-Infinity",
    ],
)
def test_the_documented_max_limit_string_is_exactly_what_is_taken(text):
    pattern = re.compile(_max_limit_schema()["anyOf"][1]["pattern"])
    spec = decode(BudgetSpec, budget(text))
    try:
        new_budgets([spec], str)
        taken = True
    except Invalid:
        taken = False

    assert bool(pattern.search(text)) is taken


def test_the_documented_max_limit_number_states_the_rule():
    number = _max_limit_schema()["anyOf"][0]

    assert number == {
        "type": "number",
        "exclusiveMinimum": 0,
        "exclusiveMaximum": 1e18,
        "multipleOf": 1e-9,
    }


# --- durations and rate limits ------------------------------------------------------


def test_the_documented_duration_pattern_is_exactly_the_grammar():
    pattern = re.compile(DURATION_PATTERN)
    counts = [*range(1300), 5216, 5217, 5218, 36524, 36525, 36526, 876600]
    counts += [876601, 52596000, 52596001, 3155760000, 3155760001, 10**12]
    for unit in "smhdwMQYx":
        for count in counts:
            for text in (f"{count}{unit}", f"0{count}{unit}", f"+{count}{unit}"):
                try:
                    parse_duration(text)
                    taken = True
                except Invalid:
                    taken = False
                assert bool(pattern.search(text)) is taken, text


def test_a_put_takes_null_for_a_list_and_a_create_does_not():
    """In a PUT null removes (the decision reads it as []); a create has no null."""
    changes = decode(
        VirtualKeyChanges,
        {
            "budgets": None,
            "provider_configs": [{"provider": "openai", "budgets": None}],
        },
    )

    assert (changes.budgets, changes.provider_configs[0].budgets) == (None, None)
    assert decode(CustomerChanges, {"budgets": None}).budgets is None
    assert (
        decode(VirtualKeyChanges, {"provider_configs": None}).provider_configs is None
    )
    assert "$.budgets" in refusal(CustomerBody, {"name": "a", "budgets": None})
    assert "$.provider_configs" in refusal(
        VirtualKeyBody, {"name": "a", "provider_configs": None}
    )


def test_a_put_rate_limit_may_name_one_field_of_a_half():
    changes = decode(CustomerChanges, {"rate_limit": {"token_max_limit": 5}})

    assert changes.rate_limit == RateLimitChanges(token_max_limit=5)
    assert changes.rate_limit.request_max_limit is msgspec.UNSET


@pytest.mark.parametrize("limit", [0, MAX_RATE_LIMIT + 1])
def test_a_rate_limit_outside_its_documented_range_is_refused(limit):
    with pytest.raises(InvalidRateLimit):
        rate_limit_after(
            None, RateLimitChanges(token_max_limit=limit, token_reset_duration="1h")
        )
    assert rate_limit_after(
        None,
        RateLimitChanges(token_max_limit=MAX_RATE_LIMIT, token_reset_duration="1h"),
    ) == RateLimit(token_max_limit=MAX_RATE_LIMIT, token_reset_duration="1h")


# --- what an imported or legacy event may carry -----------------------------------

KEY = VirtualKeyCreated(
    virtual_key_id=LOWER,
    name="ci",
    value_sha256="a" * 64,
    value_hint="WXYZ",
    provider_configs=(ProviderConfig(provider_config_id=UPPER, provider="openai"),),
)


def with_config(**fields) -> VirtualKeyCreated:
    config = msgspec.structs.replace(KEY.provider_configs[0], **fields)
    return msgspec.structs.replace(KEY, provider_configs=(config,))


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(with_config(provider="p" * 4096), id="a-4-KB-provider"),
        pytest.param(with_config(provider=" "), id="a-blank-provider"),
        pytest.param(
            with_config(allowed_models=("m",) * (MAX_MODELS + 1)), id="too-many-models"
        ),
        pytest.param(with_config(allowed_models=("",)), id="an-empty-model"),
        pytest.param(with_config(provider_config_id="c" * 256), id="a-long-config-id"),
        pytest.param(
            msgspec.structs.replace(KEY, provider_configs=KEY.provider_configs * 65),
            id="too-many-configs",
        ),
        pytest.param(msgspec.structs.replace(KEY, name="x\x00"), id="a-nul-name"),
        pytest.param(msgspec.structs.replace(KEY, name="\t"), id="a-blank-name"),
        pytest.param(
            msgspec.structs.replace(KEY, name="n" * (MAX_NAME + 1)), id="a-long-name"
        ),
        pytest.param(
            msgspec.structs.replace(KEY, value_sha256="f" * 129), id="a-long-digest"
        ),
        pytest.param(TeamCreated(team_id="t" * 256, name="t"), id="a-long-team-id"),
        pytest.param(
            TeamCreated(team_id="t", name="t", customer_id=""), id="an-empty-reference"
        ),
        pytest.param(
            CustomerBudgetsReplaced(
                customer_id="c",
                budgets=tuple(
                    Budget(
                        budget_id=f"b{n}", max_limit=Decimal(1), reset_duration=f"{n}h"
                    )
                    for n in range(1, MAX_BUDGETS + 2)
                ),
            ),
            id="too-many-budgets",
        ),
    ],
)
def test_an_event_a_command_could_not_have_written_is_refused(event):
    with pytest.raises(Invalid):
        check_values(event)


def test_an_event_at_every_bound_is_taken():
    longest = with_config(
        provider="p" * MAX_NAME,
        provider_config_id="c" * 255,
        allowed_models=("m" * MAX_NAME,) * MAX_MODELS,
    )

    check_values(msgspec.structs.replace(longest, name="n" * MAX_NAME))
    check_values(TeamCreated(team_id="legacy-team-1", name="t", customer_id="c-1"))


@pytest.mark.parametrize(
    ("body", "sentence"),
    [
        (
            {"name": " \t"},
            "Expected a name that is not blank and holds no U+0000 - at `$.name`",
        ),
        (
            {"name": "a\x00b"},
            "Expected a name that is not blank and holds no U+0000 - at `$.name`",
        ),
        (
            {"name": "k", "team_id": "x" * 36},
            "Expected a UUID (36 characters: 8-4-4-4-12 hex digits) - at `$.team_id`",
        ),
        (
            {
                "name": "k",
                "rate_limit": {
                    "token_max_limit": 1.5,
                    "token_reset_duration": "1m",
                },
            },
            "Expected an integer, got 1.5 - at `$.rate_limit.token_max_limit`",
        ),
    ],
)
def test_a_refused_body_is_told_in_words_not_in_regexes_or_reprs(body, sentence):
    with pytest.raises(Invalid) as refused:
        strict_decode(body_decoder(VirtualKeyBody), json.dumps(body).encode())

    assert refused.value.message == f"the request body is invalid: {sentence}"
