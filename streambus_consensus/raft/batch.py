"""The batch envelope: several commands in one log entry.

Proposals queued on the Raft thread at the same moment are coalesced into
one entry (one fsync, one round trip, one MAC) when the state machine allows
it (:class:`~streambus_consensus.interfaces.BatchApplier`); each caller still
gets its own command's result. Layout, after the entry's kind byte::

    u32 count | count x (u32 length | command bytes)

A release that does not know the envelope cannot apply it, so it is only
written while the state machine says every replica reads it (for the
metadata machine: the cluster's finalized metadata version is at least
:data:`~streambus_consensus.metadata.commands.BATCHED_ENTRIES_VERSION`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ..errors import CodecError

__all__ = ["BATCH_OVERHEAD", "COMMAND_OVERHEAD", "pack_batch", "unpack_batch"]

_U32 = struct.Struct(">I")
BATCH_OVERHEAD = _U32.size
"""Bytes of envelope per batch (besides the entry's kind byte)."""
COMMAND_OVERHEAD = _U32.size
"""Bytes of envelope per command."""


def pack_batch(commands: Sequence[bytes]) -> bytes:
    """The envelope's bytes for ``commands`` (without the kind byte)."""
    parts = [_U32.pack(len(commands))]
    for command in commands:
        parts.append(_U32.pack(len(command)))
        parts.append(command)
    return b"".join(parts)


def unpack_batch(data: bytes | memoryview) -> list[bytes]:
    """The commands of an envelope. Raises CodecError if it is malformed."""
    view = memoryview(data)
    if len(view) < _U32.size:
        raise CodecError("batch envelope is shorter than its count")
    (count,) = _U32.unpack_from(view, 0)
    pos = _U32.size
    commands: list[bytes] = []
    for _ in range(count):
        if pos + _U32.size > len(view):
            raise CodecError(f"batch envelope ends inside command {len(commands)} of {count}")
        (length,) = _U32.unpack_from(view, pos)
        pos += _U32.size
        if pos + length > len(view):
            raise CodecError(f"batch envelope ends inside command {len(commands)} of {count}")
        commands.append(bytes(view[pos:pos + length]))
        pos += length
    if pos != len(view):
        raise CodecError(f"{len(view) - pos} stray bytes after a batch of {count} commands")
    return commands
