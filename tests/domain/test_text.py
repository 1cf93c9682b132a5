"""``storable``: NUL and lone surrogates become U+FFFD; nothing else changes, nothing is copied."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from countersign.domain.text import REPLACEMENT, storable

UNSTORABLE = frozenset({"\x00", *map(chr, range(0xD800, 0xE000))})

EDGES = ["\x00", "\ud800", "\udbff", "\udc00", "\udfff", "\ud83d", "\ude00", "\ufffd"]
any_text = st.text(
    alphabet=st.characters(exclude_categories=[]) | st.sampled_from(EDGES), max_size=60
)
"""Any code points; NUL, surrogates (halves of a pair too) and U+FFFD itself drawn often."""
unstorable_text = st.text(alphabet=st.sampled_from(EDGES[:-1]))
storable_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)  # not JSON: those become null
    | any_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=20,
)


def strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in (*strings_in(key), *strings_in(item))]
    if isinstance(value, list):
        return [s for item in value for s in strings_in(item)]
    return []


@given(any_text)
def test_any_text_comes_out_encodable_without_nul(text: str) -> None:
    stored = storable(text)
    stored.encode("utf-8")
    assert "\x00" not in stored


@given(any_text)
def test_each_unstorable_code_point_becomes_one_replacement_character(text: str) -> None:
    expected = "".join(REPLACEMENT if char in UNSTORABLE else char for char in text)
    assert storable(text) == expected


@given(storable_text)
def test_text_without_nul_or_surrogates_is_returned_itself(text: str) -> None:
    assert storable(text) is text


@given(any_text, any_text)
def test_pieces_add_up_to_the_whole(first: str, second: str) -> None:
    """Streamed deltas, each made storable, add up to the stored message made storable."""
    assert storable(first) + storable(second) == storable(first + second)


@given(storable_text, unstorable_text.filter(bool), storable_text)
def test_surrounding_text_is_kept(before: str, bad: str, after: str) -> None:
    assert storable(before + bad + after) == before + REPLACEMENT * len(bad) + after


@given(json_values)
def test_every_string_of_a_json_value_comes_out_storable_names_included(value: Any) -> None:
    stored = storable(value)
    for text in strings_in(stored):
        text.encode("utf-8")
        assert "\x00" not in text
    json.dumps(stored, ensure_ascii=False).encode("utf-8")


@given(json_values)
def test_a_json_value_with_nothing_to_replace_is_returned_itself(value: Any) -> None:
    stored = storable(value)
    if all(not UNSTORABLE.intersection(text) for text in strings_in(value)):
        assert stored is value
    else:
        assert stored is not value
    assert storable(stored) is stored, "what is storable is left as it is"


def test_dict_keys_nested_values_and_other_types() -> None:
    value = {
        "a\x00": ["x\ud800y", 1, 2.5, None, True, {"k": "\udfff"}],
        "ok": "fine",
        "n": 3,
    }
    assert storable(value) == {
        "a\ufffd": ["x\ufffdy", 1, 2.5, None, True, {"k": "\ufffd"}],
        "ok": "fine",
        "n": 3,
    }
    assert value["a\x00"][0] == "x\ud800y", "the input is not changed in place"


def test_unchanged_parts_are_shared_not_copied() -> None:
    kept = {"deep": ["nothing", "to", "replace"]}
    value = {"kept": kept, "changed": "\x00"}
    stored = storable(value)
    assert stored is not value
    assert stored["kept"] is kept
    listed = [kept, "\ud800"]
    assert storable(listed)[0] is kept
    assert storable(kept) is kept


def test_what_is_not_text_is_left_alone() -> None:
    data = b"\x00\xff"
    assert storable(data) is data
    pair = ("\x00",)
    assert storable(pair) is pair
    assert storable(None) is None


def test_floats_json_cannot_hold_become_none() -> None:
    """NaN and infinities are not JSON (PostgreSQL's jsonb refuses them): stored as null."""
    assert storable({"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5]}) == {
        "a": None,
        "b": [None, None, 1.5],
    }
