"""A check's answer as bytes: each decision of the cache is encoded once, and each
request splices in only its position (and `stale`), byte for byte what encoding the
whole CheckAnswer gives."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from projections.cache_entries import CheckResult
from service.web.answers import CheckAnswer

# The cache hands out few decision objects: one allowed answer per owner, kept while
# the owner's usage and limits are unchanged, and constants for most refusals. So
# they are told apart by identity; each is frozen, so the same object always
# encodes the same, and holding it here keeps its id from naming another object.
_heads: dict[int, tuple[CheckResult, bytes]] = {}
_MAX_HEADS = 4096
# `position` is the last field a plain check's answer sets, but for `stale`.
_POSITION_0 = b'"position":0}'
_STALE = b',"stale":true}'

_encoder = msgspec.json.Encoder(decimal_format="number")


def check_body(
    result: CheckResult,
    position: int,
    stale: bool,
    answer: Callable[[CheckResult, int, bool], CheckAnswer],
) -> bytes:
    """The JSON of `answer(result, position, stale)`."""
    entry = _heads.get(id(result))
    if entry is None or entry[0] is not result:
        whole = _encoder.encode(answer(result, 0, False))
        if not whole.endswith(_POSITION_0):  # a shape this splice does not know
            return _encoder.encode(answer(result, position, stale))
        if len(_heads) >= _MAX_HEADS:
            _heads.clear()
        entry = _heads[id(result)] = (result, whole[:-2])
    return b"%b%d%b" % (entry[1], position, _STALE if stale else b"}")
