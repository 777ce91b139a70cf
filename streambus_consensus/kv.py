"""A small replicated key-value state machine.

The example state machine of the consensus core: the demo, the core cluster
tests and the benchmarks of raw replication use it. Commands and results are
:mod:`~streambus_consensus.codec` plain data:

- ``("set", key, value)`` -> the previous value or ``None``
- ``("delete", key)`` -> the previous value or ``None``
- ``("get", key)`` -> the value or ``None`` (a read through the log)
- ``("cas", key, expected, new)`` -> ``True`` when swapped
- ``("incr", key)`` -> the new integer value

Malformed commands are refused with an ``("error", reason)`` result, never an
exception: every replica must stay identical.

Coalescing (several commands in one log entry) is off unless the machine is
built with ``batching=True``: this example machine has no feature levels, so
only turn it on when every node of the cluster runs a release that reads
batch entries (one without them would apply a batch as one malformed
command, and diverge).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import codec
from .errors import CodecError

__all__ = ["KeyValueStateMachine", "kv_command"]

_Value = str | int | bytes | None


def kv_command(op: str, *args: _Value) -> bytes:
    """Encode a command for :class:`KeyValueStateMachine`."""
    return codec.encode((op, *args))


class KeyValueStateMachine:
    """A dict of ``str`` keys to plain values, driven through Raft."""

    def __init__(self, *, batching: bool = False) -> None:
        self._data: dict[str, Any] = {}
        self._batching = batching
        self.applied = 0
        """Commands applied (including refused ones)."""

    def batching_allowed(self) -> bool:
        """Whether commands may share a log entry (the ``batching`` argument)."""
        return self._batching

    def apply_batch(self, index: int, commands: Sequence[bytes]) -> list[Any]:
        """Apply a batch entry's commands in order (``index`` is not used)."""
        return [self.apply(command) for command in commands]

    def get(self, key: str) -> Any:
        """Local read (may be stale on a follower)."""
        return self._data.get(key)

    def items(self) -> dict[str, Any]:
        """A copy of the whole map (local read)."""
        return dict(self._data)

    def apply(self, command: bytes) -> Any:
        """Apply one command; see the module docstring."""
        self.applied += 1
        try:
            op, *args = codec.decode(command)
        except (CodecError, TypeError, ValueError):
            return ("error", "malformed command")
        data = self._data
        if op == "set" and len(args) == 2 and isinstance(args[0], str):
            previous = data.get(args[0])
            data[args[0]] = args[1]
            return previous
        if op == "get" and len(args) == 1:
            return data.get(args[0])
        if op == "delete" and len(args) == 1:
            return data.pop(args[0], None)
        if op == "cas" and len(args) == 3 and isinstance(args[0], str):
            if data.get(args[0]) == args[1]:
                data[args[0]] = args[2]
                return True
            return False
        if op == "incr" and len(args) == 1 and isinstance(args[0], str):
            current = data.get(args[0], 0)
            if not isinstance(current, int):
                return ("error", "value is not an integer")
            data[args[0]] = current + 1
            return current + 1
        return ("error", f"unknown or malformed operation {op!r}")

    def snapshot(self) -> bytes:
        """The whole map, encoded."""
        return codec.encode(self._data)

    def restore(self, data: bytes) -> None:
        """Replace the map with a snapshot's."""
        restored = codec.decode(data)
        if not isinstance(restored, dict):
            raise CodecError("key-value snapshot is not a mapping")
        self._data = restored
