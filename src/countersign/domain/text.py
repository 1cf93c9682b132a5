"""Text that every database can store: the one rule for what models and tools produce.

PostgreSQL refuses U+0000 in ``text`` and ``jsonb``; no driver can encode a lone surrogate
(U+D800..U+DFFF, e.g. from an undecodable file name or an escaped ``"\\ud800"`` in JSON) as
UTF-8; SQLite stores NUL. So that a run is stored and streamed the same on both (SPEC invariant
10), each such code point is replaced by U+FFFD, the Unicode replacement character, before it
is written. Text from people is refused instead (the API answers 422).
"""

from __future__ import annotations

import math
import re
from typing import Any, Final, TypeVar, cast

REPLACEMENT: Final = "\ufffd"
"""What an unstorable code point becomes."""

_UNSTORABLE: Final = re.compile("[\x00\ud800-\udfff]")
"""NUL and every surrogate code point: in a Python string none of them is part of a pair that
UTF-8 could encode (a JSON ``"\\ud83d\\ude00"`` is decoded to one character, U+1F600)."""

J = TypeVar("J")


def storable(value: J) -> J:
    """``value`` with NUL and lone surrogates replaced by U+FFFD in every string it holds.

    Strings, and the lists and dicts (keys too) of a JSON value; a float that is not finite
    (NaN, infinity: not JSON) becomes None; anything else is returned as it is. Nothing is
    copied when nothing changes: the result is then ``value`` itself. Replacing code point
    by code point keeps ``storable(a + b) == storable(a) + storable(b)``, so streamed pieces
    still add up to the stored whole.
    """
    return cast(J, _storable(value))


def _storable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or infinity; PostgreSQL's jsonb refuses them
    if isinstance(value, str):
        replaced, count = _UNSTORABLE.subn(REPLACEMENT, value)
        return replaced if count else value
    if isinstance(value, dict):
        items = [(_storable(key), _storable(item)) for key, item in value.items()]
        if all(
            new_key is key and new_item is item
            for (new_key, new_item), (key, item) in zip(items, value.items(), strict=True)
        ):
            return value
        return dict(items)
    if isinstance(value, list):
        new_items = [_storable(item) for item in value]
        if all(new is old for new, old in zip(new_items, value, strict=True)):
            return value
        return new_items
    return value
