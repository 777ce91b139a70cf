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
from typing import Any

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
    view = memoryview(data)
    try:
        value, pos = _decode(view, 0, 0)
    except (struct.error, UnicodeDecodeError, IndexError, TypeError) as exc:
        raise CodecError(f"malformed data: {exc}") from None
    if pos != len(view):
        raise CodecError(f"{len(view) - pos} trailing bytes after the value")
    return value


def _length(view: memoryview, pos: int) -> tuple[int, int]:
    (n,) = _L.unpack_from(view, pos)
    pos += 4
    if n > len(view) - pos:
        raise CodecError(f"length {n} at byte {pos - 4} runs past the end of the data")
    return n, pos


def _decode(view: memoryview, pos: int, depth: int) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise CodecError(f"nesting deeper than {MAX_DEPTH}")
    if pos >= len(view):
        raise CodecError("truncated data")
    tag = view[pos : pos + 1].tobytes()
    pos += 1
    if tag == _BYTES:
        n, pos = _length(view, pos)
        return view[pos : pos + n].tobytes(), pos + n
    if tag == _INT:
        return _Q.unpack_from(view, pos)[0], pos + 8
    if tag == _STR:
        n, pos = _length(view, pos)
        return str(view[pos : pos + n], "utf-8"), pos + n
    if tag == _NONE:
        return None, pos
    if tag == _TRUE:
        return True, pos
    if tag == _FALSE:
        return False, pos
    if tag in (_LIST, _TUPLE):
        # Each item takes at least one byte, so a count larger than the
        # remaining bytes is malformed; checking it bounds memory.
        n, _ = _length(view, pos)
        pos += 4
        items = []
        for _i in range(n):
            item, pos = _decode(view, pos, depth + 1)
            items.append(item)
        return (tuple(items) if tag == _TUPLE else items), pos
    if tag == _DICT:
        n, _ = _length(view, pos)
        pos += 4
        result: dict[Any, Any] = {}
        for _i in range(n):
            key, pos = _decode(view, pos, depth + 1)
            if isinstance(key, list | dict):
                raise CodecError("dict key must be hashable plain data")
            result[key], pos = _decode(view, pos, depth + 1)
        return result, pos
    if tag == _FLOAT:
        return _D.unpack_from(view, pos)[0], pos + 8
    raise CodecError(f"unknown tag {tag!r} at byte {pos - 1}")
