"""A small, explicit binary codec for untrusted bytes. Never pickle.

Used for cluster messages on the wire, for snapshot and journal files, and as
the body encoding of metadata commands. It encodes only plain data: ``None``,
``bool``, ``int`` (signed 64-bit), ``float``, ``str``, ``bytes``, ``list``,
``tuple`` and ``dict``. Decoding never constructs any other type and never
runs code; malformed input raises :class:`~streambus_consensus.errors.CodecError`.

Layout: one tag byte, then a fixed-size body or a 4-byte big-endian length and
the payload. Lists, tuples and dicts hold a 4-byte count and their items.
"""

from __future__ import annotations

import struct
from typing import Any, Final

from .errors import CodecError

__all__ = ["MAX_DEPTH", "decode", "encode"]

MAX_DEPTH = 64
"""Deepest nesting accepted by :func:`decode`."""

_NONE, _TRUE, _FALSE = b"N", b"T", b"F"
_INT, _FLOAT, _STR, _BYTES = b"i", b"f", b"s", b"b"
_LIST, _TUPLE, _DICT = b"l", b"t", b"d"

_Q = struct.Struct(">q")
_D = struct.Struct(">d")
_L = struct.Struct(">I")
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


def encode(value: Any) -> bytes:
    """Encode plain data to bytes. Raises :class:`CodecError` for other types."""
    out: list[bytes] = []
    _encode(value, out, 0)
    return b"".join(out)


def _encode(value: Any, out: list[bytes], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise CodecError(f"nesting deeper than {MAX_DEPTH}")
    t = type(value)
    if t is bytes:
        out.append(_BYTES + _L.pack(len(value)))
        out.append(value)
    elif t is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise CodecError(f"integer {value} does not fit in 64 bits")
        out.append(_INT + _Q.pack(value))
    elif t is str:
        try:
            raw = value.encode("utf-8")
        except UnicodeEncodeError:
            raise CodecError("string is not valid Unicode (lone surrogate)") from None
        out.append(_STR + _L.pack(len(raw)))
        out.append(raw)
    elif value is None:
        out.append(_NONE)
    elif t is bool:
        out.append(_TRUE if value else _FALSE)
    elif t is tuple or t is list:
        out.append((_TUPLE if t is tuple else _LIST) + _L.pack(len(value)))
        for item in value:
            _encode(item, out, depth + 1)
    elif t is dict:
        out.append(_DICT + _L.pack(len(value)))
        for key, item in value.items():
            _encode(key, out, depth + 1)
            _encode(item, out, depth + 1)
    elif t is float:
        out.append(_FLOAT + _D.pack(value))
    elif t is bytearray or t is memoryview:
        _encode(bytes(value), out, depth)
    else:
        raise CodecError(f"cannot encode a value of type {t.__name__}")


def decode(data: bytes | bytearray | memoryview) -> Any:
    """Decode bytes made by :func:`encode`.

    Raises :class:`CodecError` on any malformed, truncated or trailing input.
    """
    raw = data if type(data) is bytes else bytes(data)
    try:
        values, pos = _values(raw, 0, 1, 0)
    except (struct.error, UnicodeDecodeError, IndexError, TypeError) as exc:
        raise CodecError(f"malformed data: {exc}") from None
    if pos != len(raw):
        raise CodecError(f"{len(raw) - pos} trailing bytes after the value")
    return values[0]


# Tags as the ints that indexing bytes gives.
_T_NONE, _T_TRUE, _T_FALSE = _NONE[0], _TRUE[0], _FALSE[0]
_T_INT, _T_FLOAT, _T_STR, _T_BYTES = _INT[0], _FLOAT[0], _STR[0], _BYTES[0]
_T_LIST, _T_TUPLE, _T_DICT = _LIST[0], _TUPLE[0], _DICT[0]
_SIZED: Final = frozenset((_T_STR, _T_BYTES, _T_LIST, _T_TUPLE, _T_DICT))


def _values(
    data: bytes, pos: int, count: int, depth: int, keyed: bool = False
) -> tuple[list[Any], int]:
    """``count`` consecutive values from ``pos``, each at nesting ``depth``.

    One loop decodes the items of a container: scalars (most items) are
    decoded in place, only a nested container costs a call. ``keyed``: the
    values are a dict's keys and values, alternately; a key that is a list
    or a dict is refused as soon as it is decoded, an unhashable tuple once
    its value is.
    """
    values: list[Any] = []
    if count and depth > MAX_DEPTH:
        raise CodecError(f"nesting deeper than {MAX_DEPTH}")
    append = values.append
    size = len(data)
    for _i in range(count):
        if pos >= size:
            raise CodecError("truncated data")
        tag = data[pos]
        pos += 1
        if tag == _T_INT:
            append(_Q.unpack_from(data, pos)[0])
            pos += 8
            continue
        if tag not in _SIZED:
            if tag == _T_NONE:
                append(None)
            elif tag == _T_TRUE:
                append(True)
            elif tag == _T_FALSE:
                append(False)
            elif tag == _T_FLOAT:
                append(_D.unpack_from(data, pos)[0])
                pos += 8
            else:
                raise CodecError(f"unknown tag {bytes((tag,))!r} at byte {pos - 1}")
            continue
        # A length in bytes, or a count of items: each item takes at least one
        # byte, so a count larger than the remaining bytes is malformed too
        # (checking it bounds memory).
        (n,) = _L.unpack_from(data, pos)
        pos += 4
        if n > size - pos:
            raise CodecError(f"length {n} at byte {pos - 4} runs past the end of the data")
        if tag == _T_STR:
            end = pos + n
            append(data[pos:end].decode("utf-8"))
            pos = end
        elif tag == _T_BYTES:
            end = pos + n
            append(data[pos:end])
            pos = end
        elif tag == _T_TUPLE:
            items, pos = _values(data, pos, n, depth + 1)
            item = tuple(items)
            if keyed and not _i & 1:
                try:
                    hash(item)  # a tuple holding a list or a dict is no key
                except TypeError:
                    _values(data, pos, 1, depth)  # its value is decoded first, as it was
                    raise
            append(item)
        else:  # a list or a dict
            if tag == _T_LIST:
                value: Any
                value, pos = _values(data, pos, n, depth + 1)
            elif n:
                flat, pos = _values(data, pos, 2 * n, depth + 1, True)
                value = dict(zip(flat[0::2], flat[1::2], strict=True))
            else:
                value = {}
            if keyed and not _i & 1:
                raise CodecError("dict key must be hashable plain data")
            append(value)
    return values, pos
