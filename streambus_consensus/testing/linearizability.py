"""A linearizability checker for recorded client histories.

This is the algorithm of Wing & Gong ("Testing and verifying concurrent
objects", 1993) with the memoization of Lowe ("Testing for linearizability",
2017), in the shape used by porcupine (github.com/anishathalye/porcupine):

- every operation becomes a *call* entry and a *return* entry, sorted by time
  into a doubly linked list (a call sorts before a return with the same
  timestamp, so touching intervals count as concurrent);
- the search repeatedly takes a call entry that precedes the first remaining
  return entry (an operation that may take effect next), asks the model
  whether it is legal from the current state, and if so *lifts* the operation
  out of the list and pushes it on a stack;
- when it reaches a return entry, the operation that returns there cannot be
  placed any later, so the search backtracks: it pops the stack and puts the
  operation back into the list (dancing links);
- every configuration ``(set of linearized operations, model state)`` visited
  is cached, and a configuration seen before is never explored again.

The search is iterative, so long histories do not hit Python's recursion
limit. Independent parts of the state (for example different topics) are
checked separately when the model supplies ``partition`` (linearizability is
compositional, Herlihy & Wing 1990), which keeps each search small.

Operations whose outcome is unknown (a timeout, a crashed client) have
``return_time = math.inf``: they may take effect at any point after their
call, or never. Their output is unconstrained: the model's ``step`` receives
:data:`UNKNOWN_OUTPUT` and must accept it. The search succeeds once every
operation with a known outcome is placed; unknown operations left over are
taken never to have happened (equivalently, to take effect after everything
else). For the same reason an unknown operation is never placed where it
would leave the state unchanged.

Histories are recorded from many threads with :class:`History` and can be
kept as JSON (:func:`save_history`, :func:`load_history`) for later analysis.

This module depends on nothing else in the package except the exception tree,
so it can check histories of any system.
"""

from __future__ import annotations

import enum
import json
import math
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeAlias, TypeVar

from ..errors import ConfigError, ConsensusError

__all__ = [
    "UNKNOWN_OUTPUT",
    "CheckOutcome",
    "CheckResult",
    "History",
    "HistoryError",
    "MetadataState",
    "Model",
    "Operation",
    "OperationHandle",
    "PartitionResult",
    "TopicState",
    "UnknownOutput",
    "check_operations",
    "history_from_json",
    "history_to_json",
    "load_history",
    "metadata_model",
    "partition_by_key",
    "register_model",
    "save_history",
]

S = TypeVar("S")

PartitionFn: TypeAlias = Callable[[Sequence["Operation"]], Sequence[Sequence["Operation"]]]


class HistoryError(ConsensusError, ValueError):
    """A history is malformed, its JSON form cannot be read, or a recorder
    handle was completed twice."""


class UnknownOutput(enum.Enum):
    """Type of :data:`UNKNOWN_OUTPUT` (a one-member enum, so it is a typed singleton)."""

    UNKNOWN_OUTPUT = "UNKNOWN_OUTPUT"

    def __repr__(self) -> str:
        return "UNKNOWN_OUTPUT"


UNKNOWN_OUTPUT = UnknownOutput.UNKNOWN_OUTPUT
"""The output passed to :attr:`Model.step` for an operation whose outcome is unknown.

A model must accept it (return ``ok=True``) together with the state the
operation would produce if it took effect now.
"""


# --------------------------------------------------------------------------- operations


@dataclass(frozen=True, kw_only=True, slots=True)
class Operation:
    """One client operation: what was asked, when, and what came back.

    Inputs and outputs are plain data (``None``, ``bool``, ``int``, ``float``,
    ``str``, ``bytes``, and ``list``/``tuple``/``dict`` of those) so that a
    history can be saved as JSON.
    """

    client_id: int | str
    """The client (thread, process) that issued the operation."""
    input: Any
    """What the client asked for, interpreted by :attr:`Model.step`."""
    call_time: float
    """When the client sent the request; taken before it was sent."""
    return_time: float
    """When the client received the answer; ``math.inf`` if it never knew the outcome."""
    output: Any = None
    """What the client received. Always :data:`UNKNOWN_OUTPUT` when the outcome is
    unknown (whatever was passed is replaced). :data:`UNKNOWN_OUTPUT` with a finite
    ``return_time`` means the operation took effect within its interval but its
    answer was not observed."""

    def __post_init__(self) -> None:
        if self.return_time == math.inf and self.output is not UNKNOWN_OUTPUT:
            object.__setattr__(self, "output", UNKNOWN_OUTPUT)

    @property
    def is_unknown(self) -> bool:
        """Whether the outcome is unknown: it may take effect any time after its call, or never."""
        return self.return_time == math.inf


def _validate(op: Operation) -> None:
    if not isinstance(op, Operation):
        raise HistoryError(f"history item {op!r} is not an Operation")
    if not math.isfinite(op.call_time):
        raise HistoryError(f"call_time must be finite: {op!r}")
    if math.isnan(op.return_time) or op.return_time < op.call_time:
        raise HistoryError(f"return_time must be >= call_time (or math.inf): {op!r}")


# --------------------------------------------------------------------------- models


def _describe_operation(input: Any, output: Any) -> str:
    return f"{input!r} -> {output!r}"


@dataclass(frozen=True, kw_only=True)
class Model(Generic[S]):
    """A sequential specification, the thing a history must be consistent with.

    States must be hashable and compare equal exactly when they behave the
    same: the checker memoizes ``(linearized operations, state)`` pairs in a
    set. Use immutable values (ints, tuples, frozensets, frozen dataclasses);
    give ``state_key`` when the natural state is not hashable. ``step`` must be
    pure and deterministic.
    """

    init: Callable[[], S]
    """Return the initial state."""
    step: Callable[[S, Any, Any], tuple[bool, S]]
    """``step(state, input, output) -> (ok, new_state)``: whether ``output`` is a
    legal answer to ``input`` in ``state``, and the state after it. The output
    is :data:`UNKNOWN_OUTPUT` for operations whose outcome is unknown; accept it."""
    partition: PartitionFn | None = None
    """Split a history into independent sub-histories checked separately (for
    example by key); ``None`` checks the history as a whole. Every operation
    must land in exactly one part. See :func:`partition_by_key`."""
    state_key: Callable[[S], Hashable] | None = None
    """Map a state to the hashable value used for memoization; default: the state itself."""
    describe_operation: Callable[[Any, Any], str] = _describe_operation
    """``describe_operation(input, output) -> str`` for explanations."""
    describe_state: Callable[[S], str] = repr
    """``describe_state(state) -> str`` for explanations."""


def partition_by_key(key: Callable[[Any], Hashable]) -> PartitionFn:
    """Build a :attr:`Model.partition` that groups operations by ``key(op.input)``.

    Parts appear in the order of their first operation.
    """

    def partition(history: Sequence[Operation]) -> list[list[Operation]]:
        parts: dict[Hashable, list[Operation]] = {}
        for op in history:
            parts.setdefault(key(op.input), []).append(op)
        return list(parts.values())

    return partition


# --------------------------------------------------------------------------- results


class CheckOutcome(enum.Enum):
    """The verdict on a history (or on one partition of it)."""

    OK = "ok"
    """Linearizable: an order consistent with real time and the model exists."""
    ILLEGAL = "illegal"
    """Not linearizable: no such order exists."""
    UNKNOWN = "unknown"
    """The check ran out of time before reaching a verdict."""


def _format_time(t: float) -> str:
    return "inf" if t == math.inf else f"{t:.6f}"


@dataclass(frozen=True, kw_only=True)
class PartitionResult:
    """The verdict on one independent part of a history, with what explains it."""

    outcome: CheckOutcome
    """The verdict for this part."""
    operations: tuple[Operation, ...]
    """The part's operations, in the order the partition function gave them."""
    linearization: tuple[Operation, ...]
    """``OK``: an order that explains the part (unknown operations that need
    not have happened are left out). Otherwise the longest linearizable prefix
    found (a valid order of some operations, consistent with real time)."""
    final_state: Any
    """The model state after ``linearization``."""
    stuck: tuple[Operation, ...] = ()
    """``ILLEGAL``: the operations that could come next after the longest
    prefix; none of them leads to a linearization. Without unknown outcomes the
    model refuses each of them from ``final_state``; an operation it allows here
    only leads to dead ends (:meth:`CheckResult.explain` says which is which)."""
    blocked_by: Operation | None = None
    """``ILLEGAL``: the earliest-returning operation not in the longest prefix;
    it had to take effect before it returned and could not."""
    steps: int = 0
    """How many times the model's ``step`` was called (a measure of search effort)."""

    @property
    def unplaced(self) -> tuple[Operation, ...]:
        """Operations of this part that are not in ``linearization``."""
        placed = {id(op) for op in self.linearization}
        return tuple(op for op in self.operations if id(op) not in placed)


@dataclass(frozen=True, kw_only=True)
class CheckResult:
    """The verdict on a whole history, with one :class:`PartitionResult` per part.

    ``ILLEGAL`` if any part is illegal, else ``UNKNOWN`` if any part timed
    out, else ``OK``.
    """

    outcome: CheckOutcome
    """The overall verdict."""
    partitions: tuple[PartitionResult, ...]
    """One result per independent part of the history."""

    @property
    def ok(self) -> bool:
        """Whether the history is linearizable (``outcome is CheckOutcome.OK``)."""
        return self.outcome is CheckOutcome.OK

    @property
    def illegal_partitions(self) -> tuple[PartitionResult, ...]:
        """The parts found not linearizable."""
        return tuple(p for p in self.partitions if p.outcome is CheckOutcome.ILLEGAL)

    def explain(self, model: Model[Any]) -> str:
        """A human-readable account of the verdict, using the model's descriptions."""

        def describe(op: Operation) -> str:
            what = model.describe_operation(op.input, op.output)
            span = f"[{_format_time(op.call_time)}, {_format_time(op.return_time)}]"
            return f"client {op.client_id} {span} {what}"

        total = len(self.partitions)
        lines = [f"{self.outcome.name}: {total} partition(s)"]
        for index, part in enumerate(self.partitions):
            if part.outcome is CheckOutcome.OK:
                continue
            lines.append(
                f"partition {index + 1} of {total}: {part.outcome.name}, "
                f"{len(part.operations)} operation(s), {part.steps} step(s)"
            )
            lines.append(f"  longest linearizable prefix ({len(part.linearization)} operation(s)):")
            lines.extend(f"    {n + 1}. {describe(op)}" for n, op in enumerate(part.linearization))
            lines.append(f"  state after it: {model.describe_state(part.final_state)}")
            if part.outcome is CheckOutcome.ILLEGAL:
                lines.append("  none of these can take effect next:")
                for op in part.stuck:
                    legal, _ = model.step(part.final_state, op.input, op.output)
                    why = "allowed, but leads only to dead ends" if legal else "refused"
                    lines.append(f"    - {describe(op)}  ({why})")
                if part.blocked_by is not None:
                    blocker = describe(part.blocked_by)
                    lines.append(f"  so this cannot take effect before it returned: {blocker}")
            else:
                lines.append(f"  not yet placed: {len(part.unplaced)} operation(s)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- the search


_CHECK_CLOCK_EVERY = 1024


def _check_partition(
    model: Model[S],
    operations: Sequence[Operation],
    deadline: float | None,
    clock: Callable[[], float],
) -> PartitionResult:
    ops = tuple(operations)
    n = len(ops)
    # Entries: (time, kind, op index); kind 0 = call sorts before 1 = return at equal times.
    events = sorted(
        [(op.call_time, 0, i) for i, op in enumerate(ops)]
        + [(op.return_time, 1, i) for i, op in enumerate(ops)]
    )
    # Doubly linked list over node indices; node 0 is the head sentinel, -1 is the end.
    size = 2 * n + 1
    nxt = [-1] * size
    prv = [-1] * size
    match = [-1] * size  # call node -> its return node; -1 for return nodes and the head
    op_of = [-1] * size
    return_node = [0] * n
    for node, (_, kind, i) in enumerate(events, start=1):
        op_of[node] = i
        if kind == 1:
            return_node[i] = node
    for node, (_, kind, i) in enumerate(events, start=1):
        if kind == 0:
            match[node] = return_node[i]
    for node in range(size):
        nxt[node] = node + 1 if node + 1 < size else -1
        prv[node] = node - 1

    inputs = [op.input for op in ops]
    outputs = [op.output for op in ops]
    definite = [not op.is_unknown for op in ops]
    remaining = sum(definite)

    step = model.step
    key_of = model.state_key
    state = model.init()
    state_key: Hashable = state if key_of is None else key_of(state)
    linearized = 0  # bitset of the op indices placed so far
    cache: set[tuple[int, Hashable]] = set()  # configurations explored: (linearized, state key)
    calls: list[tuple[int, S, Hashable]] = []  # (call node, state before it, its key)
    steps = 0

    best_depth = -1
    best_prefix: tuple[int, ...] = ()
    best_state: S = state
    best_stuck: tuple[int, ...] = ()
    best_blocker = -1

    node = nxt[0]
    iterations = 0
    while remaining > 0:
        if deadline is not None and iterations % _CHECK_CLOCK_EVERY == 0 and clock() > deadline:
            if len(calls) > best_depth:
                best_prefix = tuple(op_of[c] for c, _, _ in calls)
                best_state = state
            return PartitionResult(
                outcome=CheckOutcome.UNKNOWN,
                operations=ops,
                linearization=tuple(ops[i] for i in best_prefix),
                final_state=best_state,
                steps=steps,
            )
        iterations += 1
        ret = match[node]
        if ret >= 0:  # a call entry: try to linearize its operation now
            i = op_of[node]
            steps += 1
            legal, new_state = step(state, inputs[i], outputs[i])
            if legal:
                new_key = new_state if key_of is None else key_of(new_state)
                new_linearized = linearized | (1 << i)
                key = (new_linearized, new_key)
                # An unknown operation that would change nothing here may as well never
                # happen: placing it cannot help, and would only multiply configurations.
                if (definite[i] or new_key != state_key) and key not in cache:
                    cache.add(key)
                    calls.append((node, state, state_key))
                    state = new_state
                    state_key = new_key
                    linearized = new_linearized
                    # lift the call and its return out of the list
                    nxt[prv[node]] = nxt[node]
                    prv[nxt[node]] = prv[node]
                    nxt[prv[ret]] = nxt[ret]
                    if nxt[ret] != -1:
                        prv[nxt[ret]] = prv[ret]
                    if definite[i]:
                        remaining -= 1
                    node = nxt[0]
                    continue
            node = nxt[node]
        else:  # a return entry: its operation cannot be placed later; backtrack
            if len(calls) > best_depth:
                best_depth = len(calls)
                best_prefix = tuple(op_of[c] for c, _, _ in calls)
                best_state = state
                stuck = []
                walk = nxt[0]
                while walk != node:
                    stuck.append(op_of[walk])
                    walk = nxt[walk]
                best_stuck = tuple(stuck)
                best_blocker = op_of[node]
            if not calls:
                break
            node, state, state_key = calls.pop()
            i = op_of[node]
            linearized &= ~(1 << i)
            if definite[i]:
                remaining += 1
            # put the call and its return back (dancing links: in reverse order of lifting)
            ret = match[node]
            nxt[prv[ret]] = ret
            if nxt[ret] != -1:
                prv[nxt[ret]] = ret
            nxt[prv[node]] = node
            prv[nxt[node]] = node
            node = nxt[node]

    if remaining > 0:
        return PartitionResult(
            outcome=CheckOutcome.ILLEGAL,
            operations=ops,
            linearization=tuple(ops[i] for i in best_prefix),
            final_state=best_state,
            stuck=tuple(ops[i] for i in best_stuck),
            blocked_by=ops[best_blocker] if best_blocker >= 0 else None,
            steps=steps,
        )
    return PartitionResult(
        outcome=CheckOutcome.OK,
        operations=ops,
        linearization=tuple(ops[op_of[c]] for c, _, _ in calls),
        final_state=state,
        steps=steps,
    )


def check_operations(
    model: Model[S],
    history: Iterable[Operation],
    timeout: float | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> CheckResult:
    """Decide whether ``history`` is linearizable with respect to ``model``.

    Args:
        model: the sequential specification.
        history: the operations, in any order.
        timeout: seconds to search before giving up with ``UNKNOWN``; ``None``
            searches until a verdict (the problem is NP-complete in general).
        clock: the time source for ``timeout`` (injectable for tests).

    Returns:
        A :class:`CheckResult`; for ``ILLEGAL`` parts, the longest
        linearizable prefix and the operations that could not be placed.

    Raises:
        HistoryError: an operation has a non-finite call time or returns before
            it was called, or ``model.partition`` lost or duplicated operations.
        ConfigError: ``timeout`` is not a positive number.
    """
    ops = list(history)
    for op in ops:
        _validate(op)
    if timeout is not None and not (isinstance(timeout, int | float) and timeout > 0):
        raise ConfigError("timeout", timeout, "must be a positive number of seconds, or None")
    if model.partition is None:
        parts: list[Sequence[Operation]] = [ops]
    else:
        parts = list(model.partition(ops))
        placed = sorted(id(op) for part in parts for op in part)
        if placed != sorted(id(op) for op in ops):
            raise HistoryError(
                f"model.partition must put each of the {len(ops)} operations in exactly one "
                f"part; it returned {len(placed)} placements"
            )
    deadline = None if timeout is None else clock() + timeout
    results: list[PartitionResult] = []
    timed_out = False
    for part in parts:
        if timed_out:
            results.append(
                PartitionResult(
                    outcome=CheckOutcome.UNKNOWN,
                    operations=tuple(part),
                    linearization=(),
                    final_state=model.init(),
                )
            )
            continue
        result = _check_partition(model, part, deadline, clock)
        timed_out = result.outcome is CheckOutcome.UNKNOWN
        results.append(result)
    outcomes = {r.outcome for r in results}
    if CheckOutcome.ILLEGAL in outcomes:
        outcome = CheckOutcome.ILLEGAL
    elif CheckOutcome.UNKNOWN in outcomes:
        outcome = CheckOutcome.UNKNOWN
    else:
        outcome = CheckOutcome.OK
    return CheckResult(outcome=outcome, partitions=tuple(results))


# --------------------------------------------------------------------------- recording


class OperationHandle:
    """An invoked operation awaiting its outcome; complete it exactly once.

    Call :meth:`ok` with the answer, :meth:`fail` if the operation definitely
    did not take effect, or :meth:`unknown` if its outcome cannot be known. A
    handle never completed (its client crashed) counts as unknown.
    """

    __slots__ = ("_history", "_index")

    def __init__(self, history: History, index: int) -> None:
        self._history = history
        self._index = index

    @property
    def client_id(self) -> int | str:
        """The client that invoked the operation."""
        return self._history._records[self._index].client_id

    @property
    def input(self) -> Any:
        """The operation's input."""
        return self._history._records[self._index].input

    @property
    def call_time(self) -> float:
        """When the operation was invoked."""
        return self._history._records[self._index].call_time

    @property
    def done(self) -> bool:
        """Whether the handle was completed."""
        with self._history._lock:
            return self._history._records[self._index].status != _PENDING

    def ok(self, output: Any = None) -> None:
        """The operation completed and returned ``output``."""
        self._history._complete(self._index, _OK, output)

    def fail(self, reason: Any = None) -> None:
        """The operation definitely did not take effect; it is dropped from the history.

        ``reason`` is not recorded in the history; it is accepted so that call
        sites read naturally (``handle.fail(err)``). Only use this when the
        system guarantees no effect (for example a proposal rejected before it
        was appended to the log); otherwise use :meth:`unknown`.
        """
        self._history._complete(self._index, _FAILED, reason)

    def unknown(self) -> None:
        """The outcome is unknown (timeout, lost connection): it may or may not take effect."""
        self._history._complete(self._index, _UNKNOWN, UNKNOWN_OUTPUT)


_PENDING, _OK, _FAILED, _UNKNOWN = range(4)


@dataclass(slots=True)
class _Record:
    client_id: int | str
    input: Any
    call_time: float
    return_time: float = math.inf
    output: Any = UNKNOWN_OUTPUT
    status: int = _PENDING


class History:
    """A thread-safe recorder of client operations.

    Call :meth:`invoke` immediately before sending a request and complete the
    returned handle immediately after the answer arrives, so that each
    recorded interval contains the moment the operation really took effect::

        history = History()
        handle = history.invoke(client_id, ("create", "orders", 3, {}))
        try:
            answer = store.create_topic("orders", 3)
        except TimeoutError:
            handle.unknown()
        else:
            handle.ok(answer)
        result = check_operations(metadata_model(), history.operations())

    Timestamps come from ``clock`` (default :func:`time.monotonic`, which is
    monotonic and shared by all threads, and on Linux by all processes of a
    host).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._records: list[_Record] = []

    def invoke(self, client_id: int | str, input: Any) -> OperationHandle:
        """Record that ``client_id`` is about to issue ``input``; returns the handle to complete."""
        with self._lock:
            self._records.append(_Record(client_id, input, self._clock()))
            return OperationHandle(self, len(self._records) - 1)

    def _complete(self, index: int, status: int, output: Any) -> None:
        with self._lock:
            now = self._clock()
            record = self._records[index]
            if record.status != _PENDING:
                raise HistoryError(
                    f"operation {record.input!r} of client {record.client_id!r} "
                    "was already completed"
                )
            record.status = status
            if status == _OK:
                record.return_time = max(now, record.call_time)
                record.output = output

    def operations(self) -> list[Operation]:
        """A snapshot of the history, in invocation order.

        Failed operations are left out; pending and unknown ones have
        ``return_time = math.inf``.
        """
        with self._lock:
            return [
                Operation(
                    client_id=r.client_id,
                    input=r.input,
                    call_time=r.call_time,
                    return_time=r.return_time,
                    output=r.output,
                )
                for r in self._records
                if r.status != _FAILED
            ]

    def __len__(self) -> int:
        """The number of operations invoked so far, failed ones included."""
        with self._lock:
            return len(self._records)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save :meth:`operations` as JSON (see :func:`save_history`)."""
        save_history(self.operations(), path)


# --------------------------------------------------------------------------- JSON

_FORMAT = "streambus_consensus.linearizability.history"
_VERSION = 1


def _encode_value(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise HistoryError(f"{where}: non-finite float {value!r} is not plain data")
        return value
    if isinstance(value, bytes):
        return {"$bytes": value.hex()}
    if isinstance(value, list):
        return [_encode_value(v, where) for v in value]
    if isinstance(value, tuple):
        return {"$tuple": [_encode_value(v, where) for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode_value(v, where) for k, v in value.items()}
        return {
            "$dict": [[_encode_value(k, where), _encode_value(v, where)] for k, v in value.items()]
        }
    raise HistoryError(f"{where}: {type(value).__name__} {value!r} is not plain data")


def _freeze_key(value: Any, where: str) -> Hashable:
    try:
        hash(value)
    except TypeError as exc:
        raise HistoryError(f"{where}: {value!r} cannot be a dict key") from exc
    key: Hashable = value
    return key


def _decode_value(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return [_decode_value(v, where) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, body),) = value.items()
        if tag == "$tuple" and isinstance(body, list):
            return tuple(_decode_value(v, where) for v in body)
        if tag == "$bytes" and isinstance(body, str):
            try:
                return bytes.fromhex(body)
            except ValueError as exc:
                raise HistoryError(f"{where}: bad $bytes {body!r}") from exc
        if tag == "$dict" and isinstance(body, list):
            out: dict[Hashable, Any] = {}
            for pair in body:
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise HistoryError(f"{where}: bad $dict item {pair!r}")
                out[_freeze_key(_decode_value(pair[0], where), where)] = _decode_value(
                    pair[1], where
                )
            return out
    if any(k.startswith("$") for k in value):
        raise HistoryError(f"{where}: unknown tagged value {value!r}")
    return {k: _decode_value(v, where) for k, v in value.items()}


def history_to_json(operations: Iterable[Operation]) -> str:
    """Encode a history as JSON text.

    Tuples, bytes and dicts with non-string keys are tagged so that they load
    back as the same types; unknown outcomes are stored with
    ``"return_time": null``.

    Raises:
        HistoryError: an input or output is not plain data.
    """
    encoded = []
    for n, op in enumerate(operations):
        _validate(op)
        where = f"operation {n}"
        item: dict[str, Any] = {
            "client_id": op.client_id,
            "call_time": op.call_time,
            "return_time": None if op.is_unknown else op.return_time,
            "input": _encode_value(op.input, where),
        }
        if not op.is_unknown and op.output is not UNKNOWN_OUTPUT:
            item["output"] = _encode_value(op.output, where)
        encoded.append(item)
    document = {"format": _FORMAT, "version": _VERSION, "operations": encoded}
    return json.dumps(document, indent=1, allow_nan=False)


def _number(value: Any, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HistoryError(f"{where}: {name} must be a number, got {value!r}")
    return value


def history_from_json(text: str) -> list[Operation]:
    """Decode a history written by :func:`history_to_json`.

    Raises:
        HistoryError: the text is not such a document.
    """
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise HistoryError(f"history is not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != _FORMAT:
        raise HistoryError(f"not a history document (expected format {_FORMAT!r})")
    if document.get("version") != _VERSION:
        raise HistoryError(f"unsupported history version {document.get('version')!r}")
    items = document.get("operations")
    if not isinstance(items, list):
        raise HistoryError("history document has no 'operations' list")
    ops = []
    for n, item in enumerate(items):
        where = f"operation {n}"
        if not isinstance(item, dict) or not {"client_id", "call_time", "input"} <= item.keys():
            raise HistoryError(f"{where}: malformed {item!r}")
        client_id = item["client_id"]
        if isinstance(client_id, bool) or not isinstance(client_id, int | str):
            raise HistoryError(f"{where}: client_id must be an int or str, got {client_id!r}")
        raw_return = item.get("return_time")
        return_time = math.inf if raw_return is None else _number(raw_return, where, "return_time")
        op = Operation(
            client_id=client_id,
            input=_decode_value(item["input"], where),
            call_time=_number(item["call_time"], where, "call_time"),
            return_time=return_time,
            output=_decode_value(item["output"], where) if "output" in item else UNKNOWN_OUTPUT,
        )
        _validate(op)
        ops.append(op)
    return ops


def save_history(operations: Iterable[Operation], path: str | os.PathLike[str]) -> None:
    """Write a history to ``path`` as JSON (atomically: a temporary file, then a rename)."""
    text = history_to_json(operations)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.write("\n")
    os.replace(tmp, path)


def load_history(path: str | os.PathLike[str]) -> list[Operation]:
    """Read a history saved by :func:`save_history`."""
    with open(path, encoding="utf-8") as f:
        return history_from_json(f.read())


# --------------------------------------------------------------------------- register model


def _register_step(state: Hashable, input: Any, output: Any) -> tuple[bool, Hashable]:
    unknown = output is UNKNOWN_OUTPUT
    kind = input[0]
    if kind == "write":
        return True, input[1]
    if kind == "read":
        return unknown or output == state, state
    if kind == "cas":
        swapped = state == input[1]
        return unknown or output is swapped, input[2] if swapped else state
    raise HistoryError(f"unknown register operation {input!r}")


def _describe_register(input: Any, output: Any) -> str:
    shown = "?" if output is UNKNOWN_OUTPUT else repr(output)
    kind = input[0]
    if kind == "write":
        return f"write({input[1]!r})" + (" -> ?" if output is UNKNOWN_OUTPUT else "")
    if kind == "read":
        return f"read() -> {shown}"
    if kind == "cas":
        return f"cas({input[1]!r}, {input[2]!r}) -> {shown}"
    return _describe_operation(input, output)


def register_model(initial: Hashable = 0) -> Model[Hashable]:
    """A single read/write/compare-and-set register.

    Inputs: ``("write", value)`` (output ignored), ``("read",)`` -> the value,
    ``("cas", expected, new)`` -> ``True`` if the value was ``expected`` (and
    is now ``new``), else ``False``. Values must be hashable.
    """
    return Model(
        init=lambda: initial,
        step=_register_step,
        describe_operation=_describe_register,
    )


# --------------------------------------------------------------------------- metadata model


class TopicState(NamedTuple):
    """One topic in :data:`MetadataState`."""

    partitions: int
    """The partition count."""
    config: frozenset[tuple[str, Hashable]]
    """The configuration as frozen ``(key, value)`` items."""


MetadataState: TypeAlias = frozenset[tuple[str, TopicState]]
"""State of :func:`metadata_model`: ``(topic name, TopicState)`` pairs, names unique."""


def _freeze(value: Any) -> Hashable:
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return frozenset((k, _freeze(v)) for k, v in value.items())
    try:
        hash(value)
    except TypeError as exc:
        raise HistoryError(f"config value {value!r} is not plain data") from exc
    frozen: Hashable = value
    return frozen


def _freeze_config(config: Any) -> frozenset[tuple[str, Hashable]]:
    if not isinstance(config, Mapping):
        raise HistoryError(f"topic config must be a mapping, got {config!r}")
    return frozenset((k, _freeze(v)) for k, v in config.items())


def _find(state: MetadataState, name: str) -> TopicState | None:
    for topic, value in state:
        if topic == name:
            return value
    return None


def _replace(
    state: MetadataState, name: str, old: TopicState | None, new: TopicState | None
) -> MetadataState:
    if old is not None:
        state = state - {(name, old)}
    if new is not None:
        state = state | {(name, new)}
    return state


def _no_topics() -> MetadataState:
    return frozenset()


def _metadata_step(state: MetadataState, input: Any, output: Any) -> tuple[bool, MetadataState]:
    unknown = output is UNKNOWN_OUTPUT
    kind, name = input[0], input[1]
    current = _find(state, name)
    if kind == "create":
        if current is not None:
            return unknown or output == "exists", state
        topic = TopicState(input[2], _freeze_config(input[3]))
        return unknown or output == "ok", _replace(state, name, None, topic)
    if kind == "read":
        if unknown:
            return True, state
        if current is None:
            return output is None, state
        legal = (
            isinstance(output, list | tuple)
            and len(output) == 2
            and output[0] == current.partitions
            and isinstance(output[1], Mapping)
            and _freeze_config(output[1]) == current.config
        )
        return legal, state
    if kind not in ("delete", "alter", "add_partitions"):
        raise HistoryError(f"unknown metadata operation {input!r}")
    if current is None:
        return unknown or output == "unknown_topic", state
    if kind == "delete":
        return unknown or output == "ok", _replace(state, name, current, None)
    if kind == "alter":
        key, value = input[2], _freeze(input[3])
        config = frozenset(item for item in current.config if item[0] != key) | {(key, value)}
        return unknown or output == "ok", _replace(
            state, name, current, TopicState(current.partitions, config)
        )
    new_total = input[2]
    if new_total <= current.partitions:
        return unknown or output == "invalid_partitions", state
    return unknown or output == "ok", _replace(
        state, name, current, TopicState(new_total, current.config)
    )


def _describe_metadata(input: Any, output: Any) -> str:
    shown = "?" if output is UNKNOWN_OUTPUT else repr(output)
    kind = input[0]
    if kind == "create" and len(input) == 4:
        return f"create({input[1]!r}, partitions={input[2]!r}, config={input[3]!r}) -> {shown}"
    if kind == "alter" and len(input) == 4:
        return f"alter({input[1]!r}, {input[2]!r}={input[3]!r}) -> {shown}"
    if kind == "add_partitions" and len(input) == 3:
        return f"add_partitions({input[1]!r}, new_total={input[2]!r}) -> {shown}"
    if kind in ("delete", "read") and len(input) == 2:
        return f"{kind}({input[1]!r}) -> {shown}"
    return _describe_operation(input, output)


def _describe_metadata_state(state: MetadataState) -> str:
    if not state:
        return "{} (no topics)"
    topics = sorted(state)
    return (
        "{"
        + ", ".join(
            f"{name!r}: {value.partitions} partition(s), config={dict(sorted(value.config))!r}"
            for name, value in topics
        )
        + "}"
    )


def metadata_model(*, partitioned: bool = True) -> Model[MetadataState]:
    """The StreamBus topic metadata operations, over plain data.

    State: :data:`MetadataState`, a frozen mapping from topic name to
    :class:`TopicState` (absent topics are simply missing). Inputs and outputs:

    - ``("create", name, partitions, config_dict)`` -> ``"ok"`` | ``"exists"``
    - ``("delete", name)`` -> ``"ok"`` | ``"unknown_topic"``
    - ``("alter", name, key, value)`` -> ``"ok"`` | ``"unknown_topic"``
    - ``("add_partitions", name, new_total)`` -> ``"ok"`` | ``"unknown_topic"`` |
      ``"invalid_partitions"`` (when ``new_total`` <= the current count)
    - ``("read", name)`` -> ``None`` if absent, else ``(partition_count, config_dict)``
      (a two-item list is accepted too, as JSON gives back)

    Refusals decided without looking at the state (a malformed name, a
    negative partition count) never take effect: record them with
    :meth:`OperationHandle.fail`. With ``partitioned`` (the default) each topic
    is checked separately.
    """
    return Model(
        init=_no_topics,
        step=_metadata_step,
        partition=partition_by_key(lambda input: input[1]) if partitioned else None,
        describe_operation=_describe_metadata,
        describe_state=_describe_metadata_state,
    )
