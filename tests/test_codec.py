"""The codec for untrusted bytes: exact round trips of plain data, and
CodecError (never anything else, never a big allocation) for bad input."""

from __future__ import annotations

import contextlib
import enum
import math
import struct
import time
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streambus_consensus import codec
from streambus_consensus.codec import MAX_DEPTH, decode, encode
from streambus_consensus.errors import CodecError, ConsensusError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def assert_same(got: Any, want: Any) -> None:
    """Equal *and* of the same types all the way down (1 == True == 1.0 in Python)."""
    assert type(got) is type(want), (got, want)
    if isinstance(want, float):
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == want
            assert math.copysign(1.0, got) == math.copysign(1.0, want)
    elif isinstance(want, list | tuple):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    elif isinstance(want, dict):
        assert len(got) == len(want)
        for (gk, gv), (wk, wv) in zip(got.items(), want.items(), strict=True):
            assert_same(gk, wk)
            assert_same(gv, wv)
    else:
        assert got == want


def roundtrip(value: Any) -> Any:
    return decode(encode(value))


def nested_list_bytes(levels: int) -> bytes:
    """``levels`` one-item lists around a None, built by hand (not by encode)."""
    return b"l\x00\x00\x00\x01" * levels + b"N"


# -- round trips ---------------------------------------------------------------

SAMPLES: list[Any] = [
    None, True, False, 0, 1, -1, INT64_MIN, INT64_MAX, 0.0, -0.0, 1.5, -2.25e300,
    float("inf"), float("-inf"), 5e-324,
    "", "plain", "ünïcødé ✓ 日本語 🚀", "\x00nul inside", b"", b"\x00\xff" * 3,
    [], (), {}, [None], (1,), {"k": "v"},
    [1, [2, [3, (4, {"five": b"6"})]]],
    {"list": [1, 2], "tuple": (1, 2), "nested": {"deeper": {"x": [True, None]}}},
    {1: "int key", (1, "a"): "tuple key", b"raw": "bytes key", None: "none key", 2.5: "float"},
    ([], (), {}),
]


@pytest.mark.parametrize("value", SAMPLES, ids=repr)
def test_round_trip_supported_values(value: Any) -> None:
    assert_same(roundtrip(value), value)


def test_nan_round_trips_as_nan() -> None:
    assert math.isnan(roundtrip(float("nan")))


def test_tuples_stay_tuples_and_lists_stay_lists() -> None:
    value: list[Any] = [(1, [2, (3,)]), [(), []]]
    got = roundtrip(value)
    assert type(got) is list
    assert type(got[0]) is tuple
    assert type(got[0][1]) is list
    assert type(got[0][1][1]) is tuple
    assert type(got[1][0]) is tuple and type(got[1][1]) is list


def test_bool_and_int_stay_distinct() -> None:
    got = roundtrip([True, 1, False, 0])
    assert [type(v) for v in got] == [bool, int, bool, int]


def test_large_bytes_round_trip() -> None:
    blob = bytes(range(256)) * (8 * 1024 * 4)  # 8 MiB
    assert roundtrip(blob) == blob
    assert roundtrip({"blob": blob, "after": 1}) == {"blob": blob, "after": 1}


def test_bytearray_and_memoryview_encode_as_bytes() -> None:
    assert_same(roundtrip(bytearray(b"abc")), b"abc")
    assert_same(roundtrip(memoryview(b"xyz")), b"xyz")


def test_decode_accepts_bytearray_and_memoryview() -> None:
    raw = encode({"a": [1, "b"]})
    assert decode(bytearray(raw)) == {"a": [1, "b"]}
    assert decode(memoryview(raw)) == {"a": [1, "b"]}


def test_dict_order_is_preserved() -> None:
    value = {"z": 1, "a": 2, "m": 3}
    assert list(roundtrip(value)) == ["z", "a", "m"]


def test_wire_layout_is_as_documented() -> None:
    # Snapshot and journal files depend on this layout staying put.
    assert encode(None) == b"N"
    assert encode(True) == b"T"
    assert encode(False) == b"F"
    assert encode(-2) == b"i" + struct.pack(">q", -2)
    assert encode(1.5) == b"f" + struct.pack(">d", 1.5)
    assert encode("é") == b"s\x00\x00\x00\x02\xc3\xa9"
    assert encode(b"ab") == b"b\x00\x00\x00\x02ab"
    assert encode([None]) == b"l\x00\x00\x00\x01N"
    assert encode((None,)) == b"t\x00\x00\x00\x01N"
    assert encode({None: True}) == b"d\x00\x00\x00\x01NT"


# -- integers -------------------------------------------------------------------

@pytest.mark.parametrize("value", [INT64_MIN, INT64_MAX])
def test_int64_bounds_round_trip(value: int) -> None:
    assert_same(roundtrip(value), value)


@pytest.mark.parametrize("value", [2**63, INT64_MIN - 1, 10**30, -(10**30)])
def test_integer_outside_int64_raises(value: int) -> None:
    with pytest.raises(CodecError, match="64 bits"):
        encode(value)
    with pytest.raises(CodecError):
        encode({"nested": [value]})


# -- unsupported types ------------------------------------------------------------

class Custom:
    pass


class Color(enum.IntEnum):
    RED = 1


@pytest.mark.parametrize(
    "value",
    [{1, 2}, frozenset({1}), object(), Custom(), 1 + 2j, Color.RED, [1, {2}], {"k": Custom()},
     {frozenset(): 1}, range(3)],
    ids=lambda v: type(v).__name__,
)
def test_unsupported_types_raise_codec_error(value: Any) -> None:
    with pytest.raises(CodecError, match="cannot encode"):
        encode(value)


def test_self_referencing_list_raises_codec_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(CodecError, match="nesting"):
        encode(loop)


def test_unencodable_string_raises_codec_error() -> None:
    with pytest.raises(CodecError):
        encode({"name": "bad \ud800 surrogate"})


def test_codec_error_is_a_consensus_error() -> None:
    with pytest.raises(ConsensusError):
        decode(b"")


# -- malformed input -----------------------------------------------------------------

@pytest.mark.parametrize("value", [*SAMPLES, {"a": [1, (2, b"x")], "b": "ü" * 5}], ids=repr)
def test_every_truncated_prefix_raises(value: Any) -> None:
    raw = encode(value)
    for cut in range(len(raw)):
        with pytest.raises(CodecError):
            decode(raw[:cut])


@pytest.mark.parametrize("value", [None, 7, "x", [], {"a": 1}, b"b"], ids=repr)
@pytest.mark.parametrize("extra", [b"\x00", b"N", b"garbage"])
def test_trailing_bytes_raise(value: Any, extra: bytes) -> None:
    with pytest.raises(CodecError, match="trailing"):
        decode(encode(value) + extra)


@pytest.mark.parametrize("raw", [b"x", b"\x00", b"\xff", b"l\x00\x00\x00\x01Z",
                                 b"d\x00\x00\x00\x01s\x00\x00\x00\x01k?"])
def test_unknown_tag_raises(raw: bytes) -> None:
    with pytest.raises(CodecError, match="unknown tag"):
        decode(raw)


def test_empty_input_raises() -> None:
    with pytest.raises(CodecError, match="truncated"):
        decode(b"")


@pytest.mark.parametrize("tag", [b"l", b"t", b"d", b"s", b"b"])
def test_huge_declared_length_fails_fast_without_allocating(tag: bytes) -> None:
    raw = tag + b"\xff\xff\xff\xff" + b"NNNNN"  # claims 2**32-1 items/bytes in 10 bytes
    assert len(raw) == 10
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(CodecError, match="runs past the end"):
            decode(raw)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 256 * 1024


def test_count_within_bounds_but_items_missing_raises() -> None:
    # 3 items declared, 3 bytes remain, but the second "item" is a truncated int.
    with pytest.raises(CodecError):
        decode(b"l\x00\x00\x00\x03Ni\x00")


def test_nesting_at_max_depth_is_accepted() -> None:
    value = decode(nested_list_bytes(MAX_DEPTH))
    for _ in range(MAX_DEPTH):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert value is None


def test_nesting_deeper_than_max_depth_raises_on_decode() -> None:
    with pytest.raises(CodecError, match="nesting"):
        decode(nested_list_bytes(MAX_DEPTH + 1))


def test_absurd_nesting_raises_codec_error_not_recursion_error() -> None:
    with pytest.raises(CodecError, match="nesting"):
        decode(nested_list_bytes(100_000))


def test_nesting_limit_is_symmetric_on_encode() -> None:
    value: Any = None
    for _ in range(MAX_DEPTH):
        value = [value]
    assert encode(value) == nested_list_bytes(MAX_DEPTH)
    with pytest.raises(CodecError, match="nesting"):
        encode([value])


@pytest.mark.parametrize("key", [[], [1], {}, {"a": 1}, (1, [2]), ((), {})], ids=repr)
def test_unhashable_dict_key_raises(key: Any) -> None:
    raw = b"d\x00\x00\x00\x01" + encode(key) + encode("value")
    with pytest.raises(CodecError):
        decode(raw)


def test_invalid_utf8_string_raises() -> None:
    with pytest.raises(CodecError, match="malformed"):
        decode(b"s\x00\x00\x00\x02\xc3\x28")
    with pytest.raises(CodecError):
        decode(b"s\x00\x00\x00\x03\xed\xa0\x80")  # an encoded surrogate


def test_decode_never_builds_other_types() -> None:
    # Nothing outside the documented set can come out, whatever the tags.
    allowed = (type(None), bool, int, float, str, bytes, list, tuple, dict)
    value = decode(encode({"a": [(1, 2.0, "s", b"b", None, True)], (1,): {}}))

    def walk(v: Any) -> None:
        assert isinstance(v, allowed)
        if isinstance(v, list | tuple):
            for item in v:
                walk(item)
        elif isinstance(v, dict):
            for k, item in v.items():
                walk(k)
                walk(item)

    walk(value)


# -- properties ------------------------------------------------------------------------

scalars = (
    st.none() | st.booleans() | st.integers(INT64_MIN, INT64_MAX)
    | st.floats(allow_nan=False) | st.text() | st.binary()
)
hashables = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3).map(tuple),
                         max_leaves=6)
plain_data = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.lists(children, max_size=5).map(tuple)
        | st.dictionaries(hashables, children, max_size=5)
    ),
    max_leaves=30,
)


@given(plain_data)
def test_round_trip_property(value: Any) -> None:
    assert_same(roundtrip(value), value)


@given(plain_data)
def test_encoding_is_deterministic(value: Any) -> None:
    assert encode(value) == encode(value)
    assert encode(roundtrip(value)) == encode(value)


def _decode_or_codec_error(raw: bytes) -> None:
    with contextlib.suppress(CodecError):  # the only acceptable failure
        decode(raw)


@settings(max_examples=400)
@given(st.binary(max_size=256))
def test_decode_arbitrary_bytes_returns_or_raises_codec_error(raw: bytes) -> None:
    _decode_or_codec_error(raw)


@settings(max_examples=300)
@given(plain_data, st.data())
def test_decode_mutated_encodings_returns_or_raises_codec_error(
    value: Any, data: st.DataObject
) -> None:
    raw = bytearray(encode(value))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    _decode_or_codec_error(bytes(raw[:cut]))


def test_module_surface() -> None:
    assert codec.__all__ == sorted(codec.__all__)
    assert set(codec.__all__) == {"MAX_DEPTH", "decode", "encode"}
