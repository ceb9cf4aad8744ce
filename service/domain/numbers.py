"""How a request's numbers decode: money exactly, from a JSON number (never through a
binary float) or a plain decimal string; whole numbers from 5 or 5.0, which JSON
Schema's `integer` both admits.

Money is ASCII digits with an optional minus sign and fraction when it is a string:
no spaces, exponent, underscores or other digits, which Decimal() would also take.
Fields of type Money and Whole decode through `decode_hook` (with float_hook
`decimal_number`) into a Decimal and an int; each field states its range in the
OpenAPI document (`money_schema`), and the code that takes the field enforces it.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import TYPE_CHECKING


class _Exactly(type):
    """The type of a marker whose instances are exactly one built-in type.

    msgspec checks what dec_hook returns with isinstance(value, marker) on every
    field. ABCMeta answered that (Decimal and int registered as virtual subclasses)
    through its Python-level __instancecheck__ and __subclasscheck__: 1 to 3 µs a
    field, a fifth of decoding a usage record. This check is one comparison, and
    stricter: a bool is not a Whole.
    """

    exactly: type

    def __instancecheck__(cls, instance: object) -> bool:
        return type(instance) is cls.exactly


if TYPE_CHECKING:
    Money = Decimal
    Whole = int
else:

    class Money(metaclass=_Exactly):
        """The decoding of a request's money field: always a Decimal."""

        exactly = Decimal

    class Whole(metaclass=_Exactly):
        """The decoding of a request's whole-number field: always an int."""

        exactly = int


# Non-finite spellings pass here so the field's own rule names them (invalid_cost,
# invalid_max_limit): every one of them refuses a value that is not finite.
_MONEY_TEXT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?|[+-]?(?i:s?nan|inf|infinity)")
# Digits of the largest whole number a float spelling may stand for (far past any
# bound a field has): int() of 1e400000 would take its time.
_WHOLE_DIGITS = 20
# The longest spelling of a number a request may use, as a JSON number or a money
# string: no field takes that many digits (a limit has at most 18 + 9), and Decimal
# would keep every one of them, into the log's event and back out in answers.
MAX_NUMBER_CHARS = 64


def decimal_number(text: str) -> Decimal:
    """msgspec's float_hook for request bodies: a JSON number with a fraction or an
    exponent, exactly, spelled in at most MAX_NUMBER_CHARS characters."""
    if len(text) > MAX_NUMBER_CHARS:
        raise ValueError(
            f"a number takes at most {MAX_NUMBER_CHARS} characters, got {len(text):,}"
        )
    return Decimal(text)


def decode_hook(type_: type, value: object) -> object:
    """msgspec's dec_hook for the request bodies: Money and Whole."""
    if type_ is Money:
        return _money(value)
    if type_ is Whole:
        return _whole(value)
    raise NotImplementedError(f"no decoding for {type_!r}")


def _money(value: object) -> Decimal:
    if isinstance(value, str):
        if len(value) > MAX_NUMBER_CHARS:
            raise ValueError(
                f"Expected a decimal string of at most {MAX_NUMBER_CHARS} characters,"
                f" got {len(value):,}"
            )
        if _MONEY_TEXT.fullmatch(value) is None:
            raise ValueError(
                "Expected a number or a decimal string of ASCII digits, like"
                f' "12.50", got {value[:40]!r}'
            )
        return Decimal(value)
    if isinstance(value, Decimal) or (
        isinstance(value, int) and not isinstance(value, bool)
    ):
        return Decimal(value)
    raise TypeError(
        f"Expected a number or a decimal string, got {type(value).__name__}"
    )


def _whole(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if (
        isinstance(value, Decimal)
        and value.is_finite()
        and value.adjusted() < _WHOLE_DIGITS
        and value == value.to_integral_value()
    ):
        return int(value)
    shown = str(value) if isinstance(value, Decimal) else repr(value)
    raise TypeError(f"Expected an integer, got {shown:.40}")


def schema_hook(type_: type) -> dict[str, object]:
    """msgspec's schema_hook: a Money or Whole field states its range where it is."""
    if type_ is Money:
        return {}
    if type_ is Whole:
        return {"type": "integer"}
    raise NotImplementedError(f"no schema for {type_!r}")


def money_schema(
    *, number: dict[str, object], text: str, description: str
) -> dict[str, object]:
    """A money field as the OpenAPI document states it: a number within `number`'s
    bounds, or a decimal string matching `text`."""
    return {
        "anyOf": [
            {"type": "number", **number},
            {"type": "string", "pattern": text, "maxLength": MAX_NUMBER_CHARS},
        ],
        "description": description,
    }
