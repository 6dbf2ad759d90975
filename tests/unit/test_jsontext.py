"""realtime.jsontext: orjson's speed, the standard library's results."""

from __future__ import annotations

import json
import math
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from realtime.jsontext import dumps, dumps_utf8, loads

STDLIB_COMPACT = json.JSONEncoder(separators=(",", ":"))
STDLIB_CHECKING = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

# JSON values as the API and clients send them: any text (lone surrogates included, as JSON's
# \ud800 escapes give), integers beyond 64 bits, finite floats.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20)


def same(a: object, b: object) -> bool:
    """Equal, and of the same types all the way down (1 and 1.0 and True are not the same)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)  # type: ignore[index]
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    return a == b


@given(json_values)
def test_dumps_writes_ascii_json_that_reads_back_as_the_same_value(value: object) -> None:
    text = dumps(value)
    assert text.isascii()
    assert same(json.loads(text), json.loads(STDLIB_COMPACT.encode(value)))


@given(json_values.filter(lambda v: "e-" not in STDLIB_COMPACT.encode(v)))
def test_dumps_is_the_standard_librarys_text_but_for_small_floats_notation(value: object) -> None:
    assert dumps(value) == STDLIB_COMPACT.encode(value)


@pytest.mark.parametrize("value", ["é", "日本", "\x7f", "\u2028", "\ud800", {1: "int key"},
                                   2**64, -(2**63) - 1, [{"deep": ["é"]}]])
def test_dumps_leaves_what_orjson_writes_otherwise_to_the_standard_library(value: object) -> None:
    assert dumps(value) == STDLIB_COMPACT.encode(value)


def test_dumps_writes_nan_and_infinities_as_null_never_as_bare_words() -> None:
    assert dumps([math.nan, math.inf, -math.inf]) == "[null,null,null]"


def test_dumps_refuses_what_is_not_json_as_the_standard_library_does() -> None:
    with pytest.raises(TypeError):
        dumps({"bytes": b"x"})
    with pytest.raises(TypeError):
        dumps(object())


@given(json_values)
def test_loads_gives_the_standard_librarys_values(value: object) -> None:
    text = STDLIB_COMPACT.encode(value)
    assert same(loads(text), json.loads(text))
    assert same(loads(text.encode("utf-8", "surrogatepass")),
                json.loads(text.encode("utf-8", "surrogatepass")))


@pytest.mark.parametrize("text", [
    "123456789012345678901234567890",       # orjson would read a float and lose digits
    "-18446744073709551616",
    '{"offset":18446744073709551616}',
    '"\\ud800"',                            # a lone surrogate: orjson refuses it
    "NaN", "[Infinity]", "1e400",
])
def test_loads_hands_what_orjson_reads_otherwise_to_the_fallback(text: str) -> None:
    assert same(loads(text), json.loads(text)) or (
        isinstance(json.loads(text), float) and math.isnan(json.loads(text)))


def test_loads_refuses_as_its_fallback_refuses() -> None:
    def strict(text: str) -> object:
        raise ValueError("refused by the fallback")

    assert loads('{"a":1}', strict) == {"a": 1}
    with pytest.raises(ValueError, match="refused by the fallback"):
        loads("NaN", strict)
    with pytest.raises(ValueError):
        loads(b'{"a":')
    with pytest.raises(UnicodeDecodeError):
        loads(b'"\xff"')


@given(json_values)
def test_dumps_utf8_measures_as_the_standard_library(value: object) -> None:
    try:
        expected = STDLIB_CHECKING.encode(value).encode()
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            dumps_utf8(value)
        return
    encoded = dumps_utf8(value)
    assert same(json.loads(encoded), json.loads(expected))
    assert len(encoded) == len(expected) or "e" in expected.decode()  # float notation only


@pytest.mark.parametrize("value", [math.nan, [1, math.inf], {"x": -math.inf}])
def test_dumps_utf8_refuses_nan_and_infinities(value: object) -> None:
    with pytest.raises(ValueError):
        dumps_utf8(value)


def test_dumps_utf8_writes_a_uuid_that_the_data_check_then_refuses() -> None:
    # orjson writes UUIDs; publication data must also pack as msgpack, which refuses them.
    from realtime.errors import BadRequest
    from realtime.payloads import check_publication_data

    assert dumps_utf8(uuid.UUID(int=1)) == b'"00000000-0000-0000-0000-000000000001"'
    with pytest.raises(BadRequest, match="JSON value"):
        check_publication_data({"id": uuid.UUID(int=1)}, 1000)
