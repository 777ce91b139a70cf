"""The snapshot file format, shared by every Storage and sent to lagging followers.

Layout::

    magic "SBCSNAP1" | u32 format version | u64 body length | u32 crc32(body) | body
    body = u32 header length | header (codec) | state bytes

The header holds the two log entries the snapshot ends with (PySyncObj keeps
them as the first two entries of a compacted log), the cluster members (and
learners, when there are any) and
the state machine's snapshot format. The state bytes are the state machine's
own ``snapshot()``.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

from .. import codec
from ..errors import CodecError, CorruptStorageError

__all__ = ["SnapshotHeader", "pack_snapshot", "unpack_snapshot"]

MAGIC = b"SBCSNAP1"
FORMAT_VERSION = 1
_PREFIX = struct.Struct(">8sIQI")
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    """What a snapshot covers."""

    last_entry: tuple[bytes, int, int]
    """The last applied entry covered (command, index, term)."""
    prev_entry: tuple[bytes, int, int]
    """The entry before it (PySyncObj needs both to resume the log)."""
    members: tuple[tuple[str, str], ...]
    """Voting members ``(node_id, address)`` at the snapshot, self included."""
    learners: tuple[tuple[str, str], ...] = ()
    """Non-voting members ``(node_id, address)`` still catching up (see
    ``Learners`` in :mod:`.engine`). Written only when there are some, so a
    snapshot without learners is byte for byte what earlier releases wrote."""

    @property
    def last_index(self) -> int:
        """Index of the last entry covered."""
        return self.last_entry[1]

    @property
    def last_term(self) -> int:
        """Term of the last entry covered."""
        return self.last_entry[2]


def pack_snapshot(header: SnapshotHeader, state: bytes) -> bytes:
    """Build a snapshot file's bytes."""
    fields: dict[str, Any] = {
        "last": header.last_entry,
        "prev": header.prev_entry,
        "members": [list(m) for m in header.members],
    }
    if header.learners:
        fields["learners"] = [list(m) for m in header.learners]
    head = codec.encode(fields)
    body = b"".join((_U32.pack(len(head)), head, state))
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body), zlib.crc32(body)) + body


def unpack_snapshot(blob: bytes, path: str) -> tuple[SnapshotHeader, bytes]:
    """Verify and split a snapshot file's bytes. Raises CorruptStorageError naming ``path``."""
    if len(blob) < _PREFIX.size:
        raise CorruptStorageError(path, f"snapshot is {len(blob)} bytes, shorter than its header")
    magic, version, length, crc = _PREFIX.unpack_from(blob, 0)
    if magic != MAGIC:
        raise CorruptStorageError(path, f"not a snapshot file (magic {magic!r})", offset=0)
    if version != FORMAT_VERSION:
        raise CorruptStorageError(path, f"unsupported snapshot format version {version}")
    body = memoryview(blob)[_PREFIX.size :]
    if len(body) != length:
        raise CorruptStorageError(
            path, f"snapshot truncated or padded: body is {len(body)} bytes, header says {length}"
        )
    if zlib.crc32(body) != crc:
        raise CorruptStorageError(path, "snapshot checksum mismatch (bit flip or overwrite)")
    try:
        (head_len,) = _U32.unpack_from(body, 0)
        raw: Any = codec.decode(body[4 : 4 + head_len])
        header = SnapshotHeader(
            last_entry=_entry(raw["last"]),
            prev_entry=_entry(raw["prev"]),
            members=tuple((str(m[0]), str(m[1])) for m in raw["members"]),
            learners=tuple((str(m[0]), str(m[1])) for m in raw.get("learners", ())),
        )
    except (CodecError, KeyError, TypeError, IndexError, AttributeError,
            struct.error) as exc:
        raise CorruptStorageError(path, f"snapshot header unreadable: {exc}") from None
    return header, bytes(body[4 + head_len :])


def _entry(raw: Any) -> tuple[bytes, int, int]:
    data, index, term = raw
    if not isinstance(data, bytes) or not isinstance(index, int) or not isinstance(term, int):
        raise TypeError("log entry must be (bytes, int, int)")
    return (data, index, term)
