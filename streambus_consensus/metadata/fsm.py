"""The metadata state machine: pure apply, snapshot and restore.

:class:`MetadataStateMachine` turns (state, command) into (new state, result)
with no I/O, clock, randomness, logging or metrics. Every replica that applies
the same log gets the same state and the same results.

State is copy-on-write. Records are immutable; the maps that hold them are
persistent (a change copies one short path, not the map), so an apply costs
O(what it changes) and readers on other threads get a consistent
:class:`MetadataImage` from :meth:`MetadataStateMachine.image` without locks.
Partitions are kept per topic, as one tuple per topic.

Apply never raises for a command it can decode. A command the state machine
refuses ("topic already exists"), or one of a metadata version above the
cluster's finalized one, is answered with an :class:`ApplyResult` whose
``ok`` is false and whose ``code`` is a stable :class:`RefusalCode`; the state
is then unchanged (only the offset moves on), the same on every replica. A
command this replica's software cannot decode at a version the cluster has
finalized is another matter: answering it would let this replica diverge
from those that can, so :meth:`MetadataStateMachine.apply_at` raises
:class:`~streambus_consensus.errors.ReplicaHaltError` and the node stops
(fail-stop). A successful result lists its :class:`Change` s, in order, for
listeners.

The finalized metadata version (:class:`~.commands.SetMetadataVersion`) is
part of the state, of the image and of snapshots; a state that never set one
is at version 1.

Retries are idempotent: the result of every state-changing command is
remembered under its :class:`~.commands.RequestId` (at most
``max_results_per_client`` per client, oldest first out; at most
``max_clients`` clients, least recently used first out), and a retry gets the
original result back (``duplicate=True``, no changes). A retry whose result
has been forgotten is refused as ``request_expired`` and never applied again:
a client keeps the highest seq whose result was forgotten, and a client whose
results are all forgotten (evicted as least recently used) keeps just that
number (a retried create after a delete must not bring the topic back with
its old id and epochs restarted). This table is part of snapshots.

Rules follow Kafka KRaft: brokers register fenced and are unfenced by the
controller; fencing (or controlled shutdown, or unregistering, or a restart
with a new incarnation) removes the broker from every ISR it is not the last
member of and moves its leaderships to active ISR members, bumping the
partition epoch (and the leader epoch when the leader changes); a partition
with no active ISR member is offline (``leader is None``) until one returns or
an unclean election is asked for.
"""

from __future__ import annotations

import enum
import functools
import re
import struct
import zlib
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Generic, NoReturn, TypeVar, overload

from .. import codec
from ..errors import (
    CodecError,
    CommandRefusedError,
    ConfigError,
    ReplicaHaltError,
    UnsupportedMetadataVersionError,
)
from .commands import (
    BATCHED_ENTRIES_VERSION,
    BOOTSTRAP_REQUEST_ID,
    FORMAT_VERSION,
    AddPartitions,
    AlterIsr,
    AlterTopicConfig,
    BeginControlledShutdown,
    Command,
    CreateTopic,
    CreateTopics,
    DeleteTopic,
    ElectLeaders,
    FenceBroker,
    NoOp,
    Read,
    ReassignReplicas,
    RegisterBroker,
    RequestId,
    SetMetadataVersion,
    TopicSpec,
    UnfenceBroker,
    UnregisterBroker,
    command_level,
    decode_command,
    encode_command,
    supported_metadata_versions,
)
from .placement import PlacementError, _pick_period, place_on_racks, rack_groups
from .records import Broker, BrokerState, Partition, Topic, TopicConfig

if TYPE_CHECKING:
    from ..config import NodeConfig

__all__ = [
    "MAX_PARTITIONS_PER_TOPIC",
    "MAX_REPLICATION_FACTOR",
    "OK",
    "SNAPSHOT_VERSION",
    "ApplyResult",
    "Change",
    "ChangeKind",
    "MetadataImage",
    "MetadataStateMachine",
    "RefusalCode",
    "TopicOutcome",
    "register_handler",
]

SNAPSHOT_VERSION: Final = 1
"""Version of the snapshots written at metadata version 1. A snapshot's
version is the metadata version of its state, so a release reads every
snapshot up to its highest metadata version and refuses newer ones by name."""

OK: Final = "ok"
"""The ``code`` of every successful :class:`ApplyResult`."""

MAX_PARTITIONS_PER_TOPIC: Final = 100_000
"""Most partitions one topic may have (one apply must stay short)."""

MAX_REPLICATION_FACTOR: Final = 32767
"""Largest replication factor (Kafka's is an int16)."""

_SNAPSHOT_MAGIC: Final = "streambus.metadata.snapshot"
_DEFAULT_CONFIG: Final = TopicConfig()
_TOPIC_NAME: Final = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_UUID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NIL_UUID: Final = "00000000-0000-0000-0000-000000000000"
_ENDPOINT: Final = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")

K = TypeVar("K")
V = TypeVar("V")
_T = TypeVar("_T")


# --------------------------------------------------------------------------
# Results and changes


class RefusalCode(enum.StrEnum):
    """Why a command was refused. Stable strings, part of the API."""

    ALREADY_APPLIED = "already_applied"
    """``apply_at`` was given an index at or below the applied offset (ignored)."""
    INTERNAL_ERROR = "internal_error"
    """A bug in the state machine; the state is unchanged."""
    REQUEST_EXPIRED = "request_expired"
    """A retry of a request whose result is no longer remembered."""
    INVALID_ENDPOINT = "invalid_endpoint"
    """A broker endpoint is not ``host:port``."""
    INVALID_RACK = "invalid_rack"
    """A rack name is empty, too long or not printable."""
    INVALID_INCARNATION_ID = "invalid_incarnation_id"
    """An incarnation id is not canonical UUID text."""
    INCARNATION_CONFLICT = "incarnation_conflict"
    """The same incarnation registered again with a different endpoint or rack."""
    UNKNOWN_BROKER = "unknown_broker"
    """No broker is registered under that id."""
    STALE_BROKER_EPOCH = "stale_broker_epoch"
    """The broker epoch named is not the broker's current epoch."""
    INVALID_TOPIC_NAME = "invalid_topic_name"
    """Not 1-249 characters of ``[a-zA-Z0-9._-]``, or ``.`` / ``..``."""
    TOPIC_EXISTS = "topic_exists"
    """A topic of that name exists."""
    TOPIC_NAME_COLLISION = "topic_name_collision"
    """Another topic's name differs only by ``.`` versus ``_``."""
    INVALID_TOPIC_ID = "invalid_topic_id"
    """A topic id is not canonical UUID text, or is the nil UUID."""
    TOPIC_ID_EXISTS = "topic_id_exists"
    """Another topic has that id."""
    TOPIC_ID_MISMATCH = "topic_id_mismatch"
    """The topic named has another id than the one given."""
    INVALID_PARTITIONS = "invalid_partitions"
    """A partition count below 1, above the limit, or not above the current one."""
    INVALID_REPLICATION_FACTOR = "invalid_replication_factor"
    """A replication factor below 1 or above the limit, or replicas not
    matching the topic's replication factor."""
    INVALID_CONFIG = "invalid_config"
    """An unknown config key, a bad value, or ``min.insync.replicas`` above
    the replication factor."""
    NOT_ENOUGH_BROKERS = "not_enough_brokers"
    """Fewer active brokers than the replication factor."""
    UNKNOWN_TOPIC = "unknown_topic"
    """No topic of that name."""
    UNKNOWN_PARTITION = "unknown_partition"
    """The topic has no partition of that index."""
    PREFERRED_LEADER_NOT_AVAILABLE = "preferred_leader_not_available"
    """The preferred replica is not active or not in the ISR."""
    LEADER_NOT_AVAILABLE = "leader_not_available"
    """No replica may lead (no active ISR member; no active replica for unclean)."""
    NOT_LEADER = "not_leader"
    """The broker sending an ISR change does not lead the partition."""
    STALE_LEADER_EPOCH = "stale_leader_epoch"
    """The request's leader epoch is older than the partition's."""
    INVALID_LEADER_EPOCH = "invalid_leader_epoch"
    """The request's leader epoch is newer than the partition's."""
    STALE_PARTITION_EPOCH = "stale_partition_epoch"
    """The request's partition epoch is older than the partition's."""
    INVALID_PARTITION_EPOCH = "invalid_partition_epoch"
    """The request's partition epoch is newer than the partition's."""
    INVALID_ISR = "invalid_isr"
    """An ISR that is empty, repeats a broker, names a non-replica or leaves out the leader."""
    INELIGIBLE_REPLICA = "ineligible_replica"
    """A broker added to an ISR is not active."""
    INVALID_REPLICAS = "invalid_replicas"
    """A replica list that is empty, repeats a broker, or keeps no ISR member."""
    FEATURE_NOT_ENABLED = "feature_not_enabled"
    """The command needs a metadata version above the cluster's finalized one."""
    INVALID_METADATA_VERSION = "invalid_metadata_version"
    """A metadata version below the finalized one (downgrades are not supported)."""


class ChangeKind(enum.StrEnum):
    """What a :class:`Change` reports."""

    BROKER_REGISTERED = "broker_registered"
    """A broker (or a new incarnation of it) registered; record: the Broker."""
    BROKER_UNREGISTERED = "broker_unregistered"
    """A broker was removed; record: the removed Broker."""
    BROKER_FENCED = "broker_fenced"
    """A broker was fenced; record: the Broker."""
    BROKER_UNFENCED = "broker_unfenced"
    """A broker became active; record: the Broker."""
    BROKER_SHUTTING_DOWN = "broker_shutting_down"
    """A broker began controlled shutdown; record: the Broker."""
    TOPIC_CREATED = "topic_created"
    """A topic was created; record: the Topic (its partitions follow)."""
    TOPIC_CHANGED = "topic_changed"
    """A topic's partition count grew; record: the Topic (new partitions follow)."""
    CONFIG_CHANGED = "config_changed"
    """A topic's configuration changed; record: the Topic."""
    TOPIC_DELETED = "topic_deleted"
    """A topic and its partitions were deleted; record: the deleted Topic."""
    PARTITION_CREATED = "partition_created"
    """A new partition; record: the Partition."""
    PARTITION_CHANGED = "partition_changed"
    """A partition's replicas, ISR, leader or epochs changed; record: the Partition."""


@dataclass(frozen=True, slots=True)
class Change:
    """One change made by one command, for listeners (in log order)."""

    kind: ChangeKind
    """What happened."""
    key: int | str | tuple[str, int]
    """Broker id, topic name, or ``(topic, partition index)``."""
    record: Broker | Topic | Partition
    """The new record (the removed one for removals)."""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """The state machine's answer to one log entry."""

    ok: bool
    """Whether the command was carried out (a no-op counts as carried out)."""
    code: str
    """``"ok"``, or a :class:`RefusalCode` value."""
    message: str
    """Human-readable detail; empty on success."""
    value: Any
    """The command's answer: the Broker, Topic or Partition it made or found,
    a tuple of changed Partitions (ElectLeaders), what a Read read, else ``None``."""
    changes: tuple[Change, ...]
    """What changed, in order; empty for refusals and duplicates."""
    offset: int
    """Log index of the entry that produced this result (for a duplicate:
    the original entry)."""
    duplicate: bool = False
    """``True`` when this is a retry answered from the remembered results."""

    def raise_for_refusal(self) -> None:
        """Raise :class:`~streambus_consensus.errors.CommandRefusedError` when refused."""
        if not self.ok:
            raise CommandRefusedError(self.code, self.message)


@dataclass(frozen=True, slots=True)
class TopicOutcome:
    """What became of one topic of a batched create (:class:`~.commands.CreateTopics`)."""

    name: str
    """The topic's name, as given."""
    code: str
    """``"ok"`` when created, else a :class:`RefusalCode` value (e.g. ``topic_exists``)."""
    message: str
    """Why it was refused; empty when created."""
    topic: Topic | None
    """The created topic, or ``None`` when refused."""

    @property
    def ok(self) -> bool:
        """Whether the topic was created."""
        return self.code == OK


def _refusal(code: RefusalCode, message: str, offset: int) -> ApplyResult:
    return ApplyResult(False, str(code), message, None, (), offset)


class _RefusalError(Exception):
    """Raised inside a handler to refuse; caught before anything is committed."""

    def __init__(self, code: RefusalCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _refuse(code: RefusalCode, message: str) -> NoReturn:
    raise _RefusalError(code, message)


# --------------------------------------------------------------------------
# Building records fast. A frozen dataclass's __init__ sets each field through
# object.__setattr__ (about 0.1 us a field); a command that changes a million
# partitions builds a million Partitions and Changes, so the hot paths set the
# slots through their descriptors instead: the same records, half the time.

_NEW: Final = object.__new__
_UNSEEN: Final = object()
_P_SLOTS: Final = tuple(Partition.__dict__[name].__set__ for name in (
    "topic", "index", "replicas", "isr", "leader", "leader_epoch", "partition_epoch",
    "recovering"))
_C_SLOTS: Final = tuple(Change.__dict__[name].__set__ for name in ("kind", "key", "record"))

# Faster still, for the records a create makes by the hundred: a draft class
# with the record's slots (CPython lays slots out by name, so both have the
# same layout), whose plain attribute stores the interpreter specialises; once
# every slot is set, the object becomes the record by assigning ``__class__``
# (allowed between classes of the same layout). The record is then as
# immutable as one built by its constructor, and built in half the time.


class _PartitionDraft:
    __slots__ = ("index", "isr", "leader", "leader_epoch", "partition_epoch", "recovering",
                 "replicas", "topic")


class _ChangeDraft:
    __slots__ = ("key", "kind", "record")


class _TopicDraft:
    __slots__ = ("config", "name", "partition_count", "replication_factor", "topic_id")


class _OutcomeDraft:
    __slots__ = ("code", "message", "name", "topic")


def _check_drafts() -> None:
    # A field added to a record must be added to its draft (and set where drafts are built).
    for draft, record in ((_PartitionDraft, Partition), (_ChangeDraft, Change),
                          (_TopicDraft, Topic), (_OutcomeDraft, TopicOutcome)):
        if sorted(draft.__slots__) != sorted(record.__slots__):
            raise TypeError(f"{draft.__name__} has slots {draft.__slots__}, "
                            f"{record.__name__} has {record.__slots__}")


_check_drafts()


def _partition(
    topic: str, index: int, replicas: tuple[int, ...], isr: tuple[int, ...],
    leader: int | None, leader_epoch: int, partition_epoch: int, recovering: bool,
) -> Partition:
    """``Partition(...)`` with every field given, built as a draft."""
    p: Any = _NEW(_PartitionDraft)
    p.topic = topic
    p.index = index
    p.replicas = replicas
    p.isr = isr
    p.leader = leader
    p.leader_epoch = leader_epoch
    p.partition_epoch = partition_epoch
    p.recovering = recovering
    p.__class__ = Partition
    built: Partition = p
    return built


def _topic(
    name: str, topic_id: str, config: TopicConfig, partition_count: int,
    replication_factor: int,
) -> Topic:
    """``Topic(...)``, built as a draft."""
    t: Any = _NEW(_TopicDraft)
    t.name = name
    t.topic_id = topic_id
    t.config = config
    t.partition_count = partition_count
    t.replication_factor = replication_factor
    t.__class__ = Topic
    built: Topic = t
    return built


def _outcome(name: str, code: str, message: str, topic: Topic | None) -> TopicOutcome:
    """``TopicOutcome(...)``, built as a draft."""
    o: Any = _NEW(_OutcomeDraft)
    o.name = name
    o.code = code
    o.message = message
    o.topic = topic
    o.__class__ = TopicOutcome
    built: TopicOutcome = o
    return built


def _change(kind: ChangeKind, key: int | str | tuple[str, int], record: Any) -> Change:
    """``Change(kind, key, record)``, built as a draft."""
    c: Any = _NEW(_ChangeDraft)
    c.kind = kind
    c.key = key
    c.record = record
    c.__class__ = Change
    built: Change = c
    return built


def _new_partitions(
    topic: str, first: int, assignment: Sequence[tuple[int, ...]], changes: list[Change]
) -> tuple[Partition, ...]:
    """The new partitions ``first, first + 1, ...`` of ``topic``, one per
    replica tuple of ``assignment`` (led by its first replica); a
    ``partition_created`` change for each is appended to ``changes``."""
    parts: list[Any] = []
    add_part, add_change = parts.append, changes.append
    created = ChangeKind.PARTITION_CREATED
    new = _NEW
    for index, replicas in enumerate(assignment, first):
        # _partition and _change, inlined: a batch of topics runs this per partition.
        p: Any = new(_PartitionDraft)
        p.topic = topic
        p.index = index
        p.replicas = replicas
        p.isr = replicas
        p.leader = replicas[0]
        p.leader_epoch = 0
        p.partition_epoch = 0
        p.recovering = False
        p.__class__ = Partition
        add_part(p)
        c: Any = new(_ChangeDraft)
        c.kind = created
        c.key = (topic, index)
        c.record = p
        c.__class__ = Change
        add_change(c)
    return tuple(parts)


# --------------------------------------------------------------------------
# A persistent map: a fixed two-level trie of 64 x 64 slots over dict leaves.
# Setting a key copies two 64-slot tuples and one leaf (about n / 4096
# entries), so a map of a million keys changes in microseconds and every
# earlier version stays valid for the readers that hold it.

_FAN: Final = 64
_SHIFT: Final = 6
_MASK: Final = _FAN - 1
_LEAF_BITS: Final = _FAN * _FAN - 1

_Leaf = dict[Any, Any]
_Mid = tuple[_Leaf | None, ...]
_EMPTY_ROOT: Final[tuple[_Mid | None, ...]] = (None,) * _FAN


class _PersistentMap(Mapping[K, V]):
    """An immutable mapping whose updates return a new map sharing most of the old."""

    __slots__ = ("_len", "_root")

    def __init__(self, root: tuple[_Mid | None, ...] = _EMPTY_ROOT, length: int = 0) -> None:
        self._root = root
        self._len = length

    def __getitem__(self, key: K) -> V:
        h = hash(key)
        mid = self._root[h & _MASK]
        if mid is not None:
            leaf = mid[(h >> _SHIFT) & _MASK]
            if leaf is not None:
                value: V = leaf[key]
                return value
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        h = hash(key)
        mid = self._root[h & _MASK]
        if mid is None:
            return False
        leaf = mid[(h >> _SHIFT) & _MASK]
        return leaf is not None and key in leaf

    @overload
    def get(self, key: K, /) -> V | None: ...

    @overload
    def get(self, key: K, /, default: V | _T) -> V | _T: ...

    def get(self, key: K, /, default: object = None) -> object:
        """The value of ``key``, or ``default``."""
        h = hash(key)
        mid = self._root[h & _MASK]
        if mid is not None:
            leaf = mid[(h >> _SHIFT) & _MASK]
            if leaf is not None:
                return leaf.get(key, default)
        return default

    def __iter__(self) -> Iterator[K]:
        for mid in self._root:
            if mid is not None:
                for leaf in mid:
                    if leaf is not None:
                        yield from leaf

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"PersistentMap({dict(self.items())!r})"

    def evolver(self) -> _Evolver[K, V]:
        """A builder for a changed copy."""
        return _Evolver(self)

    def set(self, key: K, value: V) -> _PersistentMap[K, V]:
        """A copy with ``key`` set to ``value``."""
        ev = self.evolver()
        ev[key] = value
        return ev.persistent()

    def delete(self, key: K) -> _PersistentMap[K, V]:
        """A copy without ``key`` (the same map when absent)."""
        ev = self.evolver()
        ev.delete(key)
        return ev.persistent()


class _Evolver(Generic[K, V]):
    """Batches changes to a :class:`_PersistentMap`; each touched path is copied once."""

    __slots__ = ("_base", "_leaves", "_len", "_mids")

    def __init__(self, base: _PersistentMap[K, V]) -> None:
        self._base = base
        self._len = len(base)
        self._mids: dict[int, list[_Leaf | None]] = {}
        self._leaves: dict[int, _Leaf] = {}

    def _leaf(self, key: K) -> _Leaf:
        h = hash(key)
        # The low 12 bits of the hash name the leaf (6 for the mid, 6 within).
        leaf = self._leaves.get(h & _LEAF_BITS)
        if leaf is not None:
            return leaf
        i = h & _MASK
        j = (h >> _SHIFT) & _MASK
        mid = self._mids.get(i)
        if mid is None:
            old_mid = self._base._root[i]
            mid = [None] * _FAN if old_mid is None else list(old_mid)
            self._mids[i] = mid
        old_leaf = mid[j]
        leaf = {} if old_leaf is None else dict(old_leaf)
        mid[j] = leaf
        self._leaves[h & _LEAF_BITS] = leaf
        return leaf

    def __setitem__(self, key: K, value: V) -> None:
        self.put(key, value)

    def put(self, key: K, value: V) -> V | None:
        """Set ``key`` to ``value``; return the value it had, or ``None``."""
        leaf = self._leaves.get(hash(key) & _LEAF_BITS) or self._leaf(key)
        before: V | None = leaf.get(key)
        if before is None and key not in leaf:
            self._len += 1
        leaf[key] = value
        return before

    def delete(self, key: K) -> V | None:
        """Remove ``key`` if present; return the value it had, or ``None``."""
        leaf = self._leaf(key)
        if key not in leaf:
            return None
        self._len -= 1
        before: V = leaf.pop(key)
        return before

    def persistent(self) -> _PersistentMap[K, V]:
        """The changed map. Call once; the evolver must not be used afterwards."""
        if not self._mids:
            return self._base
        root = list(self._base._root)
        for i, mid in self._mids.items():
            root[i] = tuple(mid)  # emptied leaves stay as {}: harmless, and cheaper
        return _PersistentMap(tuple(root), self._len)


# --------------------------------------------------------------------------
# The image


@dataclass(frozen=True, slots=True)
class MetadataImage:
    """A consistent, immutable view of the whole metadata at one offset.

    Cheap to take and safe to share between threads. Two images are equal
    when they hold equal records at the same offset.
    """

    offset: int
    """Log index of the last entry applied (0 before any)."""
    brokers: Mapping[int, Broker]
    """Registered brokers by id."""
    topics: Mapping[str, Topic]
    """Topics by name."""
    partitions: Mapping[str, tuple[Partition, ...]]
    """Each topic's partitions, in index order, by topic name."""
    metadata_version: int = 1
    """The cluster's finalized metadata version: commands up to it may be written."""

    def partition(self, topic: str, index: int) -> Partition | None:
        """One partition, or ``None`` when there is no such topic or index."""
        parts = self.partitions.get(topic)
        if parts is None or not 0 <= index < len(parts):
            return None
        return parts[index]

    def active_broker_ids(self) -> tuple[int, ...]:
        """Ids of the ``ACTIVE`` brokers, sorted."""
        return tuple(sorted(b.broker_id for b in self.brokers.values() if b.is_active))


_CHUNK: Final = 32


@dataclass(frozen=True, slots=True)
class _Session:
    """What is remembered about one client.

    Results live in chunks of at most ``_CHUNK`` (oldest first), so that
    remembering one more result copies two short containers, not the table. A
    client evicted as least recently used keeps a session with no results and
    its highest seq (see :meth:`forgotten`).
    """

    last_offset: int
    """Offset of its latest remembered request (orders least-recently-used eviction)."""
    chunks: tuple[dict[int, ApplyResult], ...]
    """Remembered results by seq, oldest first. Never mutated once published."""
    count: int
    """Number of remembered results."""
    max_evicted_seq: int
    """Highest seq whose result was forgotten (-1 when none)."""

    def get(self, seq: int) -> ApplyResult | None:
        """The remembered result of ``seq``, or ``None``."""
        for chunk in reversed(self.chunks):  # retries are usually of recent requests
            result = chunk.get(seq)
            if result is not None:
                return result
        return None

    def items(self) -> Iterator[tuple[int, ApplyResult]]:
        """``(seq, result)`` pairs, oldest first."""
        for chunk in self.chunks:
            yield from chunk.items()

    def forgotten(self) -> _Session:
        """What stays of an evicted client: no results, and the highest seq it
        used as ``max_evicted_seq``, so that none of its old requests is applied again."""
        highest = max((seq for chunk in self.chunks for seq in chunk), default=-1)
        return _Session(self.last_offset, (), 0, max(self.max_evicted_seq, highest))

    def added(self, seq: int, result: ApplyResult, offset: int, limit: int) -> _Session:
        """A copy that remembers one more result, forgetting the oldest beyond ``limit``."""
        chunks = list(self.chunks)
        if chunks and len(chunks[-1]) < _CHUNK:
            chunks[-1] = {**chunks[-1], seq: result}
        else:
            chunks.append({seq: result})
        count, evicted = self.count + 1, self.max_evicted_seq
        while count > limit:
            first = dict(chunks[0])
            oldest = next(iter(first))
            del first[oldest]
            evicted = max(evicted, oldest)
            count -= 1
            if first:
                chunks[0] = first
            else:
                del chunks[0]
        return _Session(offset, tuple(chunks), count, evicted)


_NO_SESSION: Final = _Session(0, (), 0, -1)


# --------------------------------------------------------------------------
# Partition transitions: pure functions of a partition and who is active.


def _first_active(
    replicas: tuple[int, ...], isr: tuple[int, ...], active: Callable[[int], bool]
) -> int | None:
    """The first replica, in replica order, that is in the ISR and active."""
    for r in replicas:
        if r in isr and active(r):
            return r
    return None


def _changed(
    p: Partition,
    *,
    isr: tuple[int, ...] | None = None,
    leader: int | None,
    replicas: tuple[int, ...] | None = None,
    recovering: bool | None = None,
) -> Partition:
    """``p`` with new fields; partition epoch +1, leader epoch +1 if the leader changed."""
    return replace(
        p,
        replicas=p.replicas if replicas is None else replicas,
        isr=p.isr if isr is None else isr,
        leader=leader,
        leader_epoch=p.leader_epoch + (1 if leader != p.leader else 0),
        partition_epoch=p.partition_epoch + 1,
        recovering=p.recovering if recovering is None else recovering,
    )


def _without_broker(p: Partition, broker: int, active: Callable[[int], bool]) -> Partition:
    """``broker`` leaves the ISR (unless it is the last member) and the leadership."""
    if broker not in p.replicas:
        return p
    isr = p.isr
    if broker in isr and len(isr) > 1:
        isr = tuple(r for r in isr if r != broker)
    leader = p.leader
    if leader == broker:
        leader = _first_active(p.replicas, isr, lambda r: r != broker and active(r))
    if isr == p.isr and leader == p.leader:
        return p
    return _changed(p, isr=isr, leader=leader)


def _elect_offline(p: Partition, active: Callable[[int], bool]) -> Partition:
    """Give an offline partition a leader from its active ISR members, if any."""
    if p.leader is not None:
        return p
    leader = _first_active(p.replicas, p.isr, active)
    return p if leader is None else _changed(p, leader=leader)


def _elect(p: Partition, kind: str, active: Callable[[int], bool]) -> Partition:
    """Run one election of ``kind``; raise _RefusalError when it cannot succeed."""
    where = f"{p.topic}-{p.index}"
    if kind == "preferred":
        preferred = p.replicas[0]
        if p.leader == preferred:
            return p
        if preferred not in p.isr or not active(preferred):
            _refuse(
                RefusalCode.PREFERRED_LEADER_NOT_AVAILABLE,
                f"{where}: preferred replica {preferred} is not an active member of the "
                f"ISR {list(p.isr)}",
            )
        return _changed(p, leader=preferred)
    if p.leader is not None:
        return p
    leader = _first_active(p.replicas, p.isr, active)
    if leader is not None:
        return _changed(p, leader=leader)
    if kind == "isr":
        _refuse(
            RefusalCode.LEADER_NOT_AVAILABLE,
            f"{where}: no member of the ISR {list(p.isr)} is active",
        )
    for r in p.replicas:
        if active(r):
            return _changed(p, isr=(r,), leader=r, recovering=True)
    _refuse(
        RefusalCode.LEADER_NOT_AVAILABLE,
        f"{where}: none of the replicas {list(p.replicas)} is active",
    )


# --------------------------------------------------------------------------
# Checks shared by the handlers


def _normalize(name: str) -> str:
    return name.replace(".", "_")


def _check_topic_name(name: str) -> None:
    if name in (".", "..") or not _TOPIC_NAME.fullmatch(name):
        _refuse(
            RefusalCode.INVALID_TOPIC_NAME,
            f"topic name {name!r} must be 1-249 characters of [a-zA-Z0-9._-] and not "
            f"'.' or '..'",
        )


def _check_uuid(value: str, code: RefusalCode, what: str) -> None:
    if not _UUID.fullmatch(value) or value == _NIL_UUID:
        _refuse(code, f"{what} {value!r} must be a non-nil UUID in canonical lowercase text")


def _check_endpoint(endpoint: str) -> None:
    match = _ENDPOINT.fullmatch(endpoint)
    if match is None or not 1 <= int(match.group(1)) <= 65535:
        _refuse(
            RefusalCode.INVALID_ENDPOINT,
            f"endpoint {endpoint!r} must be 'host:port' ('[v6]:port' for IPv6), port 1-65535",
        )


def _config(
    base: TopicConfig,
    set_configs: Mapping[str, str | int],
    delete_configs: Iterable[str],
    replication_factor: int,
) -> TopicConfig:
    try:
        config = base.updated(set_configs, delete_configs)
    except ConfigError as exc:
        _refuse(RefusalCode.INVALID_CONFIG, str(exc))
    if config.min_insync_replicas > replication_factor:
        _refuse(
            RefusalCode.INVALID_CONFIG,
            f"min.insync.replicas {config.min_insync_replicas} exceeds the replication "
            f"factor {replication_factor}",
        )
    return config


class _Delta:
    """What one command changes, gathered before anything is committed."""

    __slots__ = ("brokers", "changes", "image", "metadata_version", "partitions",
                 "replicas_changed", "topics")

    def __init__(self, image: MetadataImage) -> None:
        self.image = image
        self.brokers: dict[int, Broker | None] = {}
        self.topics: dict[str, Topic | None] = {}
        self.partitions: dict[str, tuple[Partition, ...] | None] = {}
        self.replicas_changed: dict[str, frozenset[int] | None] = {}
        """Topics whose replica sets changed, each with the brokers that host
        it when that is known without looking (a new topic), else ``None``."""
        self.changes: list[Change] = []
        self.metadata_version = image.metadata_version

    def broker(self, broker_id: int) -> Broker | None:
        if broker_id in self.brokers:
            return self.brokers[broker_id]
        return self.image.brokers.get(broker_id)

    def is_active(self, broker_id: int) -> bool:
        broker = self.broker(broker_id)
        return broker is not None and broker.state is BrokerState.ACTIVE

    def partitions_of(self, name: str) -> tuple[Partition, ...]:
        if name in self.partitions:
            return self.partitions[name] or ()
        return self.image.partitions.get(name, ())

    def set_broker(self, broker: Broker, kind: ChangeKind) -> None:
        self.brokers[broker.broker_id] = broker
        self.changes.append(Change(kind, broker.broker_id, broker))

    def set_partition(self, p: Partition) -> None:
        parts = list(self.partitions_of(p.topic))
        parts[p.index] = p
        self.partitions[p.topic] = tuple(parts)
        self.changes.append(Change(ChangeKind.PARTITION_CHANGED, (p.topic, p.index), p))


_Placed = tuple[tuple[tuple[int, ...], ...], frozenset[int]]
"""A placement: the replicas of each partition, and every broker among them."""


class _Placements:
    """The placements computed for one set of brokers (a cache, not state).

    A placement is a pure function of the active brokers by rack, the
    partition count, the replication factor and the pick where it starts,
    modulo :func:`~.placement._pick_period`: topics of the same shape share
    the few placements a cluster's stream of picks allows, each computed once.
    """

    __slots__ = ("active", "brokers", "period", "placed", "racks", "size")

    MAX_PARTITIONS: Final = 100_000
    """Partitions kept in all; past that the cache starts again."""

    def __init__(self, brokers: _PersistentMap[int, Broker]) -> None:
        self.brokers = brokers
        """The broker map the cache was computed for."""
        self.racks = rack_groups(sorted(brokers.values(), key=lambda b: b.broker_id))
        """The active broker ids by rack (:func:`~.placement.rack_groups`)."""
        self.active = sum(len(rack) for rack in self.racks)
        """How many brokers are active."""
        self.period = _pick_period(self.racks)
        """After how many picks the stream of picks repeats."""
        self.placed: dict[tuple[int, int, int], _Placed] = {}
        """Placements by (partitions, replication factor, start pick mod period)."""
        self.size = 0
        """Partitions held in ``placed``."""

    def keep(self, key: tuple[int, int, int], placed: _Placed) -> None:
        """Remember one placement, within :attr:`MAX_PARTITIONS` in all."""
        count = len(placed[0])
        if count > self.MAX_PARTITIONS:
            return
        self.size += count
        if self.size > self.MAX_PARTITIONS:
            self.placed.clear()
            self.size = count
        self.placed[key] = placed


_Handler = Callable[[Any, int, _Delta], tuple[str, Any]]
_EXTENSIONS: dict[type[Any], Callable[..., tuple[str, Any]]] = {}


def register_handler(cls: type[Any], handler: Callable[..., tuple[str, Any]]) -> None:
    """Handle commands of a kind added with :func:`~.commands.register_command`:
    ``handler(state_machine, command, index, delta)``, for machines built afterwards."""
    _EXTENSIONS[cls] = handler


# --------------------------------------------------------------------------
# The state machine


class MetadataStateMachine:
    """The replicated cluster metadata; implements the ``StateMachine`` and
    ``ConsistentSnapshotter`` protocols of :mod:`streambus_consensus.interfaces`.

    Only one thread may apply or restore; any thread may call :meth:`image`
    and run the function returned by :meth:`prepare_snapshot`.

    Args:
        max_results_per_client: results remembered per client for retries.
        max_clients: clients whose results are remembered. A client evicted
            from them keeps only its highest seq (its id and two integers), so
            that a late retry of its requests is refused as ``request_expired``
            instead of being applied a second time. Both limits must be the
            same on every replica (they decide what is evicted, which is
            replicated state).
    """

    _image: MetadataImage
    _brokers: _PersistentMap[int, Broker]
    _topics: _PersistentMap[str, Topic]
    _partitions: _PersistentMap[str, tuple[Partition, ...]]
    _sessions: _PersistentMap[str, _Session]
    _normalized: dict[str, str]
    _topic_ids: dict[str, str]
    _broker_topics: dict[int, set[str]]
    _lru: OrderedDict[str, None]
    _placements: _Placements
    """Placements computed for the current brokers (a cache: not state)."""
    _replica_sets: dict[tuple[int, ...], tuple[int, ...]]
    """One shared copy of each replica tuple placed (a cache: not state)."""

    def __init__(self, *, max_results_per_client: int = 1024, max_clients: int = 10_000) -> None:
        if type(max_results_per_client) is not int or max_results_per_client < 1:
            raise ConfigError("max_results_per_client", max_results_per_client, "must be >= 1")
        if type(max_clients) is not int or max_clients < 1:
            raise ConfigError("max_clients", max_clients, "must be >= 1")
        self._max_results = max_results_per_client
        self._max_clients = max_clients
        self._handlers: dict[type[Any], _Handler] = {
            RegisterBroker: self._register_broker,
            UnregisterBroker: self._unregister_broker,
            FenceBroker: self._fence_broker,
            UnfenceBroker: self._unfence_broker,
            BeginControlledShutdown: self._begin_controlled_shutdown,
            CreateTopic: self._create_topic,
            CreateTopics: self._create_topics,
            DeleteTopic: self._delete_topic,
            AlterTopicConfig: self._alter_topic_config,
            AddPartitions: self._add_partitions,
            ElectLeaders: self._elect_leaders,
            AlterIsr: self._alter_isr,
            ReassignReplicas: self._reassign_replicas,
            SetMetadataVersion: self._set_metadata_version,
            Read: self._read,
            NoOp: self._no_op,
        }
        for cls, handler in _EXTENSIONS.items():
            self._handlers[cls] = functools.partial(handler, self)
        empty: _PersistentMap[Any, Any] = _PersistentMap()
        self._install(0, empty, empty, empty, empty, 1)

    # -- reading ----------------------------------------------------------

    def image(self) -> MetadataImage:
        """The current state: consistent and immutable; safe from any thread."""
        return self._image

    @property
    def offset(self) -> int:
        """Log index of the last entry applied (0 before any)."""
        return self._image.offset

    # -- applying ---------------------------------------------------------

    def apply(self, command: bytes) -> ApplyResult:
        """Apply the entry after the last applied one (``apply_at(offset + 1, ...)``)."""
        return self.apply_at(self._image.offset + 1, command)

    def apply_at(self, index: int, command: bytes) -> ApplyResult:
        """Apply the committed log entry at ``index``.

        ``index`` must be above :attr:`offset` (gaps are fine: not every log
        entry reaches the state machine); otherwise the entry is ignored and
        refused as ``already_applied``. A command of a metadata version above
        the finalized one is refused as ``feature_not_enabled`` (whether or
        not this software could decode it: every replica answers alike).

        Raises :class:`~streambus_consensus.errors.ReplicaHaltError`, leaving
        the state and offset as they were, when the entry cannot be decoded
        at a version the cluster has finalized, or finalizes a version this
        software does not read: the node must stop, not diverge.
        """
        current = self._image.offset
        if type(index) is not int or index <= current:
            return _refusal(
                RefusalCode.ALREADY_APPLIED,
                f"entry {index!r} is at or below the applied offset {current}; ignored",
                current,
            )
        return self._apply_entry(index, command)

    def bootstrap_command(self, config: NodeConfig) -> bytes | None:
        """A new cluster's first command (see
        :class:`~streambus_consensus.interfaces.Bootstrapper`): finalize
        ``config.bootstrap_metadata_version``, by default the newest version
        this software reads. ``None`` for version 1 (:data:`~.commands.FORMAT_VERSION`),
        which a log without such a command already means (and which every
        release reads)."""
        level = config.bootstrap_metadata_version
        if level is None:
            level = supported_metadata_versions()[1]
        if level == FORMAT_VERSION:
            return None
        return encode_command(SetMetadataVersion(request_id=BOOTSTRAP_REQUEST_ID, level=level))

    def batching_allowed(self) -> bool:
        """Whether commands may share a log entry: the finalized metadata
        version is at least :data:`~.commands.BATCHED_ENTRIES_VERSION`, so
        every voter reads batch entries (``features upgrade`` checked)."""
        return self._image.metadata_version >= BATCHED_ENTRIES_VERSION

    def apply_batch(self, index: int, commands: Sequence[bytes]) -> list[ApplyResult]:
        """Apply the commands of the batch entry at ``index``, in order.

        Each gets exactly what :meth:`apply_at` would have answered had it
        been alone in an entry at ``index`` (its refusal, its request id
        remembered for retries, its changes); results carry ``index`` as
        their offset. Commands whose result depends on having a log index
        of their own (:class:`~.commands.RegisterBroker`: the index is the
        broker epoch) are proposed alone by the store. Raises
        :class:`~streambus_consensus.errors.ReplicaHaltError` as
        :meth:`apply_at` does.
        """
        current = self._image.offset
        if type(index) is not int or index <= current:
            refused = _refusal(
                RefusalCode.ALREADY_APPLIED,
                f"entry {index!r} is at or below the applied offset {current}; ignored",
                current,
            )
            return [refused] * len(commands)
        return [self._apply_entry(index, command) for command in commands]

    def _apply_entry(self, index: int, command: bytes) -> ApplyResult:
        finalized = self._image.metadata_version
        try:
            cmd = decode_command(command)
        except UnsupportedMetadataVersionError as exc:
            if exc.required > finalized:
                return self._not_enabled(index, exc.required)
            raise ReplicaHaltError(index, str(exc)) from exc
        except Exception as exc:  # CodecError, or anything odd in the bytes
            raise ReplicaHaltError(index, f"undecodable command at metadata version "
                                   f"{finalized}: {type(exc).__name__}: {exc}") from exc
        level = command_level(cmd)
        if level > finalized:
            return self._not_enabled(index, level)
        if isinstance(cmd, SetMetadataVersion) and cmd.level > supported_metadata_versions()[1]:
            raise ReplicaHaltError(index, str(UnsupportedMetadataVersionError(
                "the cluster", cmd.level, supported_metadata_versions())))
        try:
            return self._apply_command(index, cmd)
        except Exception as exc:  # a bug: answer it, keep replicas alive and in step
            self._advance(index)
            return _refusal(
                RefusalCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", index
            )

    def _not_enabled(self, index: int, level: int) -> ApplyResult:
        # Not remembered for retries: replicas that cannot decode the command
        # do not know its request id, and all must hold the same results.
        self._advance(index)
        return _refusal(
            RefusalCode.FEATURE_NOT_ENABLED,
            f"the command needs metadata version {level}; the cluster's is "
            f"{self._image.metadata_version} (raise it with 'features upgrade')", index)

    def _advance(self, index: int) -> None:
        image = self._image
        self._image = MetadataImage(index, image.brokers, image.topics, image.partitions,
                                    image.metadata_version)

    def _apply_command(self, index: int, cmd: Command) -> ApplyResult:
        rid = cmd.request_id
        remember = not cmd.read_only
        if remember:
            session = self._sessions.get(rid.client_id)
            if session is not None:
                prior = session.get(rid.seq)
                if prior is not None:
                    self._advance(index)
                    return prior
                if rid.seq <= session.max_evicted_seq:
                    self._advance(index)
                    return _refusal(
                        RefusalCode.REQUEST_EXPIRED,
                        f"request {rid.client_id}#{rid.seq} is too old: results up to seq "
                        f"{session.max_evicted_seq} of this client are forgotten",
                        index,
                    )
        delta = _Delta(self._image)
        try:
            message, value = self._handlers[type(cmd)](cmd, index, delta)
            result = ApplyResult(True, OK, message, value, tuple(delta.changes), index)
        except _RefusalError as refused:
            delta = _Delta(self._image)
            result = _refusal(refused.code, refused.message, index)
        self._commit(delta, index)
        if isinstance(cmd, Read) and cmd.name is None:
            result = replace(result, value=self._image)
        if remember:
            self._remember(rid, result, index)
        return result

    def _commit(self, delta: _Delta, index: int) -> None:
        brokers, topics, partitions = self._brokers, self._topics, self._partitions
        if delta.brokers:
            ev_b = brokers.evolver()
            for broker_id, broker in delta.brokers.items():
                if broker is None:
                    ev_b.delete(broker_id)
                else:
                    ev_b[broker_id] = broker
            brokers = ev_b.persistent()
        if delta.topics:
            ev_t = topics.evolver()
            normalized, topic_ids = self._normalized, self._topic_ids
            for name, topic in delta.topics.items():
                before = ev_t.delete(name) if topic is None else ev_t.put(name, topic)
                if before is not None:
                    normalized.pop(_normalize(name), None)
                    topic_ids.pop(before.topic_id, None)
                if topic is not None:
                    normalized[_normalize(name)] = name
                    topic_ids[topic.topic_id] = name
            topics = ev_t.persistent()
        if delta.partitions:
            ev_p = partitions.evolver()
            replicas_changed = delta.replicas_changed
            # Topics by the brokers they newly have replicas on: new topics
            # share a few placements, so the index grows a set at a time.
            gained: defaultdict[frozenset[int], list[str]] = defaultdict(list)
            for name, parts in delta.partitions.items():
                had = ev_p.delete(name) if parts is None else ev_p.put(name, parts)
                if name in replicas_changed:
                    hosts = replicas_changed[name]
                    if hosts is None or had is not None:
                        hosts = self._unindex(name, had or (), parts or ())
                    gained[hosts].append(name)
            for hosts, names in gained.items():
                for r in hosts:
                    self._broker_topics.setdefault(r, set()).update(names)
            partitions = ev_p.persistent()
        self._brokers, self._topics, self._partitions = brokers, topics, partitions
        self._image = MetadataImage(index, brokers, topics, partitions, delta.metadata_version)

    def _unindex(
        self, name: str, before: Sequence[Partition], after: Sequence[Partition]
    ) -> frozenset[int]:
        """Take topic ``name`` off the brokers that host none of ``after``;
        return those that host some of ``after`` and none of ``before`` (the
        caller adds it to them)."""
        has = {r for p in after for r in p.replicas}
        had = {r for p in before for r in p.replicas}
        for r in had - has:
            names = self._broker_topics.get(r)
            if names is not None:
                names.discard(name)
                if not names:
                    del self._broker_topics[r]
        return frozenset(has - had)

    def _remember(self, rid: RequestId, result: ApplyResult, index: int) -> None:
        session = self._sessions.get(rid.client_id, _NO_SESSION)
        stored = ApplyResult(
            result.ok, result.code, result.message, result.value, (), result.offset, True
        )
        sessions = self._sessions.evolver()
        sessions[rid.client_id] = session.added(rid.seq, stored, index, self._max_results)
        self._lru.pop(rid.client_id, None)
        self._lru[rid.client_id] = None
        while len(self._lru) > self._max_clients:
            victim, _ = self._lru.popitem(last=False)
            # Forget the results but not the seqs: a late retry of one of the
            # victim's requests must be refused, not applied a second time.
            sessions[victim] = self._sessions[victim].forgotten()
        self._sessions = sessions.persistent()

    # -- placement and elections helpers -----------------------------------

    def _place(
        self, count: int, replication_factor: int, offset: int, first: int
    ) -> _Placed:
        """:func:`~.placement.place_on_racks` on the active brokers, replica
        tuples shared; refuses when there are too few active brokers."""
        cache = self._placements
        if cache.brokers is not self._brokers:
            cache = self._placements = _Placements(self._brokers)
        if replication_factor > cache.active:
            _refuse(
                RefusalCode.NOT_ENOUGH_BROKERS,
                f"replication factor {replication_factor} needs as many active brokers; "
                f"only {cache.active} broker(s) are active",
            )
        key = (count, replication_factor, (offset + first * replication_factor) % cache.period)
        placed = cache.placed.get(key) if offset >= 0 and first >= 0 else None
        if placed is None:
            try:
                assignment = place_on_racks(cache.racks, count, replication_factor, offset, first)
            except PlacementError as exc:
                _refuse(RefusalCode.NOT_ENOUGH_BROKERS, str(exc))
            intern = self._replica_sets.setdefault
            replica_sets = tuple([intern(replicas, replicas) for replicas in assignment])
            placed = (replica_sets, frozenset(r for replicas in assignment for r in replicas))
            cache.keep(key, placed)
        return placed

    def _update_hosted(
        self, delta: _Delta, broker_id: int, step: Callable[[Partition], Partition]
    ) -> None:
        """Run ``step`` on every partition that has ``broker_id`` as a replica.

        ``step`` depends only on a partition's replicas, ISR and leader (and on
        who is active, fixed for the command), so its outcome is computed once
        per distinct ``(replicas, isr, leader)``: a million partitions over a
        few brokers share a few dozen, and the new ISR tuples are shared too.
        Each changed partition is then built directly, without ``replace``.
        """
        memo: dict[tuple[tuple[int, ...], tuple[int, ...], int | None],
                   tuple[tuple[int, ...], int | None, int] | None] = {}
        by_id: dict[tuple[int, int, int | None], Any] = {}
        append = delta.changes.append
        changed_kind = ChangeKind.PARTITION_CHANGED
        new = _NEW
        s_topic, s_index, s_replicas, s_isr, s_leader, s_le, s_pe, s_rec = _P_SLOTS
        c_kind, c_key, c_record = _C_SLOTS
        for name in sorted(self._broker_topics.get(broker_id, ())):
            parts = delta.partitions_of(name)
            updated: list[Partition] | None = None
            for i, p in enumerate(parts):
                # Keyed by identity first (tuples do not cache their hash, and
                # the replica and ISR tuples are shared: interned on create and
                # restore), by value when this exact pair was not seen yet.
                fast = (id(p.replicas), id(p.isr), p.leader)
                outcome = by_id.get(fast, _UNSEEN)
                if outcome is _UNSEEN:
                    key = (p.replicas, p.isr, p.leader)
                    if key in memo:
                        outcome = memo[key]
                    else:
                        outcome = None
                        if broker_id in p.replicas:
                            q = step(p)
                            if q is not p:
                                outcome = (q.isr, q.leader, q.leader_epoch - p.leader_epoch)
                        memo[key] = outcome
                    by_id[fast] = outcome
                if outcome is None:
                    continue
                # _partition and _change, inlined: this loop runs a million times.
                q = new(Partition)
                s_topic(q, name)
                s_index(q, i)
                s_replicas(q, p.replicas)
                s_isr(q, outcome[0])
                s_leader(q, outcome[1])
                s_le(q, p.leader_epoch + outcome[2])
                s_pe(q, p.partition_epoch + 1)
                s_rec(q, p.recovering)
                if updated is None:
                    updated = list(parts)
                updated[i] = q
                c = new(Change)
                c_kind(c, changed_kind)
                c_key(c, (name, i))
                c_record(c, q)
                append(c)
            if updated is not None:
                delta.partitions[name] = tuple(updated)

    def _leave_partitions(self, delta: _Delta, broker_id: int) -> None:
        self._update_hosted(
            delta, broker_id, lambda p: _without_broker(p, broker_id, delta.is_active)
        )

    def _lead_offline(self, delta: _Delta, broker_id: int) -> None:
        self._update_hosted(delta, broker_id, lambda p: _elect_offline(p, delta.is_active))

    def _known_broker(self, broker_id: int, epoch: int | None) -> Broker:
        broker = self._brokers.get(broker_id)
        if broker is None:
            _refuse(RefusalCode.UNKNOWN_BROKER, f"broker {broker_id} is not registered")
        if epoch is not None and epoch != broker.broker_epoch:
            _refuse(
                RefusalCode.STALE_BROKER_EPOCH,
                f"broker {broker_id} has epoch {broker.broker_epoch}, not {epoch}",
            )
        return broker

    def _known_topic(self, name: str) -> Topic:
        topic = self._topics.get(name)
        if topic is None:
            _refuse(RefusalCode.UNKNOWN_TOPIC, f"topic {name!r} does not exist")
        return topic

    def _known_partition(self, name: str, index: int) -> Partition:
        topic = self._known_topic(name)
        if not 0 <= index < topic.partition_count:
            _refuse(
                RefusalCode.UNKNOWN_PARTITION,
                f"topic {name!r} has partitions 0..{topic.partition_count - 1}, not {index}",
            )
        return self._partitions[name][index]

    # -- handlers: each returns (message, value) or raises _RefusalError ---------

    def _register_broker(self, cmd: RegisterBroker, index: int, delta: _Delta) -> tuple[str, Any]:
        _check_endpoint(cmd.endpoint)
        if cmd.rack is not None and not (cmd.rack and cmd.rack.isprintable()):
            _refuse(RefusalCode.INVALID_RACK, f"rack {cmd.rack!r} must be printable, 1-255 chars")
        _check_uuid(cmd.incarnation_id, RefusalCode.INVALID_INCARNATION_ID, "incarnation id")
        old = self._brokers.get(cmd.broker_id)
        if old is not None and old.incarnation_id == cmd.incarnation_id:
            if (old.endpoint, old.rack) != (cmd.endpoint, cmd.rack):
                _refuse(
                    RefusalCode.INCARNATION_CONFLICT,
                    f"incarnation {cmd.incarnation_id} of broker {cmd.broker_id} registered "
                    f"with endpoint {old.endpoint!r} rack {old.rack!r}",
                )
            return "", old
        state = BrokerState.FENCED if cmd.fenced else BrokerState.ACTIVE
        broker = Broker(cmd.broker_id, cmd.endpoint, cmd.rack, cmd.incarnation_id, index, state)
        delta.set_broker(broker, ChangeKind.BROKER_REGISTERED)
        if old is not None:
            # A new incarnation is a restart: the old one's places are gone.
            self._leave_partitions(delta, cmd.broker_id)
        if state is BrokerState.ACTIVE:
            self._lead_offline(delta, cmd.broker_id)
        return "", broker

    def _unregister_broker(
        self, cmd: UnregisterBroker, index: int, delta: _Delta
    ) -> tuple[str, Any]:
        broker = self._known_broker(cmd.broker_id, None)
        delta.brokers[cmd.broker_id] = None
        delta.changes.append(Change(ChangeKind.BROKER_UNREGISTERED, cmd.broker_id, broker))
        self._leave_partitions(delta, cmd.broker_id)
        return "", broker

    def _fence_broker(self, cmd: FenceBroker, index: int, delta: _Delta) -> tuple[str, Any]:
        broker = self._known_broker(cmd.broker_id, cmd.broker_epoch)
        if broker.state is BrokerState.FENCED:
            return "already fenced", broker
        broker = replace(broker, state=BrokerState.FENCED)
        delta.set_broker(broker, ChangeKind.BROKER_FENCED)
        self._leave_partitions(delta, cmd.broker_id)
        return "", broker

    def _unfence_broker(self, cmd: UnfenceBroker, index: int, delta: _Delta) -> tuple[str, Any]:
        broker = self._known_broker(cmd.broker_id, cmd.broker_epoch)
        if broker.state is BrokerState.ACTIVE:
            return "already active", broker
        broker = replace(broker, state=BrokerState.ACTIVE)
        delta.set_broker(broker, ChangeKind.BROKER_UNFENCED)
        self._lead_offline(delta, cmd.broker_id)
        return "", broker

    def _begin_controlled_shutdown(
        self, cmd: BeginControlledShutdown, index: int, delta: _Delta
    ) -> tuple[str, Any]:
        broker = self._known_broker(cmd.broker_id, cmd.broker_epoch)
        if broker.state is not BrokerState.ACTIVE:
            return f"already {broker.state}", broker
        broker = replace(broker, state=BrokerState.SHUTTING_DOWN)
        delta.set_broker(broker, ChangeKind.BROKER_SHUTTING_DOWN)
        self._leave_partitions(delta, cmd.broker_id)
        return "", broker

    def _create_topic(self, cmd: CreateTopic, index: int, delta: _Delta) -> tuple[str, Any]:
        return "", self._new_topic(cmd, delta, {}, set())

    def _new_topic(
        self, cmd: CreateTopic | TopicSpec, delta: _Delta, batch_names: dict[str, str],
        batch_ids: set[str],
    ) -> Topic:
        """Check one new topic and add it (and its partitions) to ``delta``.

        ``batch_names`` (normalized name -> name) and ``batch_ids`` hold the
        topics created earlier in the same batch, which the committed indexes
        do not know yet; this topic is added to them.
        """
        name = cmd.name
        _check_topic_name(name)
        normalized = _normalize(name)
        # The committed index names every topic: it holds ``name`` exactly
        # when the topic exists.
        committed = self._normalized.get(normalized)
        batched = batch_names.get(normalized)
        if committed == name or batched == name:
            _refuse(RefusalCode.TOPIC_EXISTS, f"topic {name!r} already exists")
        other = committed or batched
        if other is not None:
            _refuse(
                RefusalCode.TOPIC_NAME_COLLISION,
                f"topic {name!r} collides with existing topic {other!r} ('.' and '_' "
                f"are interchangeable)",
            )
        _check_uuid(cmd.topic_id, RefusalCode.INVALID_TOPIC_ID, "topic id")
        if cmd.topic_id in self._topic_ids or cmd.topic_id in batch_ids:
            taken = self._topic_ids.get(cmd.topic_id, "another topic of the batch")
            _refuse(
                RefusalCode.TOPIC_ID_EXISTS,
                f"topic id {cmd.topic_id} is taken by {taken!r}",
            )
        if not 1 <= cmd.partitions <= MAX_PARTITIONS_PER_TOPIC:
            _refuse(
                RefusalCode.INVALID_PARTITIONS,
                f"partitions must be in 1..{MAX_PARTITIONS_PER_TOPIC}, got {cmd.partitions}",
            )
        rf = cmd.replication_factor
        if not 1 <= rf <= MAX_REPLICATION_FACTOR:
            _refuse(
                RefusalCode.INVALID_REPLICATION_FACTOR,
                f"replication factor must be in 1..{MAX_REPLICATION_FACTOR}, got {rf}",
            )
        # No settings: the defaults, whose min.insync.replicas (1) fits any factor.
        config = _config(_DEFAULT_CONFIG, cmd.config, (), rf) if cmd.config else _DEFAULT_CONFIG
        assignment, hosts = self._place(cmd.partitions, rf, cmd.placement_offset, 0)
        topic = _topic(name, cmd.topic_id, config, cmd.partitions, rf)
        delta.topics[name] = topic
        delta.replicas_changed[name] = hosts
        delta.changes.append(_change(ChangeKind.TOPIC_CREATED, name, topic))
        delta.partitions[name] = _new_partitions(name, 0, assignment, delta.changes)
        batch_names[normalized] = name
        batch_ids.add(cmd.topic_id)
        return topic

    def _create_topics(self, cmd: CreateTopics, index: int, delta: _Delta) -> tuple[str, Any]:
        if not cmd.topics:
            _refuse(RefusalCode.INVALID_PARTITIONS, "a batched create needs at least one topic")
        counts = [spec.partitions for spec in cmd.topics]
        if min(counts) >= 0 and max(counts) <= MAX_PARTITIONS_PER_TOPIC:
            total = sum(counts)
        else:  # a count out of range weighs 0 (below) or the limit + 1 (above)
            total = sum(min(max(count, 0), MAX_PARTITIONS_PER_TOPIC + 1) for count in counts)
        if total > MAX_PARTITIONS_PER_TOPIC:
            _refuse(
                RefusalCode.INVALID_PARTITIONS,
                f"a batched create may hold at most {MAX_PARTITIONS_PER_TOPIC} partitions in "
                f"all, got {total}",
            )
        batch_names: dict[str, str] = {}
        batch_ids: set[str] = set()
        outcomes: list[TopicOutcome] = []
        created = 0
        new_topic, add = self._new_topic, outcomes.append
        for spec in cmd.topics:
            try:
                topic = new_topic(spec, delta, batch_names, batch_ids)
            except _RefusalError as refused:
                add(_outcome(spec.name, str(refused.code), refused.message, None))
            else:
                add(_outcome(spec.name, OK, "", topic))
                created += 1
        return f"{created} of {len(cmd.topics)} topics created", tuple(outcomes)

    def _delete_topic(self, cmd: DeleteTopic, index: int, delta: _Delta) -> tuple[str, Any]:
        topic = self._known_topic(cmd.name)
        if cmd.topic_id is not None and cmd.topic_id != topic.topic_id:
            _refuse(
                RefusalCode.TOPIC_ID_MISMATCH,
                f"topic {cmd.name!r} has id {topic.topic_id}, not {cmd.topic_id}",
            )
        delta.topics[cmd.name] = None
        delta.partitions[cmd.name] = None
        delta.replicas_changed[cmd.name] = None
        delta.changes.append(Change(ChangeKind.TOPIC_DELETED, cmd.name, topic))
        return "", topic

    def _alter_topic_config(
        self, cmd: AlterTopicConfig, index: int, delta: _Delta
    ) -> tuple[str, Any]:
        topic = self._known_topic(cmd.name)
        config = _config(
            topic.config, cmd.set_configs, cmd.delete_configs, topic.replication_factor
        )
        if config == topic.config:
            return "unchanged", topic
        topic = replace(topic, config=config)
        delta.topics[cmd.name] = topic
        delta.changes.append(Change(ChangeKind.CONFIG_CHANGED, cmd.name, topic))
        return "", topic

    def _add_partitions(self, cmd: AddPartitions, index: int, delta: _Delta) -> tuple[str, Any]:
        topic = self._known_topic(cmd.name)
        current = topic.partition_count
        if cmd.new_total <= current:
            _refuse(
                RefusalCode.INVALID_PARTITIONS,
                f"topic {cmd.name!r} has {current} partitions; the new total must be more, "
                f"got {cmd.new_total}",
            )
        if cmd.new_total > MAX_PARTITIONS_PER_TOPIC:
            _refuse(
                RefusalCode.INVALID_PARTITIONS,
                f"partitions must be in 1..{MAX_PARTITIONS_PER_TOPIC}, got {cmd.new_total}",
            )
        rf = topic.replication_factor
        assignment, _hosts = self._place(
            cmd.new_total - current, rf, cmd.placement_offset, current)
        topic = replace(topic, partition_count=cmd.new_total)
        delta.topics[cmd.name] = topic
        delta.replicas_changed[cmd.name] = None
        delta.changes.append(Change(ChangeKind.TOPIC_CHANGED, cmd.name, topic))
        new = _new_partitions(cmd.name, current, assignment, delta.changes)
        delta.partitions[cmd.name] = self._partitions[cmd.name] + new
        return "", topic

    def _elect_leaders(self, cmd: ElectLeaders, index: int, delta: _Delta) -> tuple[str, Any]:
        if cmd.partition is not None:
            p = self._known_partition(cmd.topic, cmd.partition)
            q = _elect(p, cmd.kind, delta.is_active)
            if q is p:
                return "election not needed", ()
            delta.set_partition(q)
            return "", (q,)
        self._known_topic(cmd.topic)
        parts = self._partitions[cmd.topic]
        updated: list[Partition] | None = None
        elected: list[Partition] = []
        for i, p in enumerate(parts):
            try:
                q = _elect(p, cmd.kind, delta.is_active)
            except _RefusalError:
                continue
            if q is not p:
                if updated is None:
                    updated = list(parts)
                updated[i] = q
                elected.append(q)
                delta.changes.append(Change(ChangeKind.PARTITION_CHANGED, (cmd.topic, i), q))
        if updated is not None:
            delta.partitions[cmd.topic] = tuple(updated)
        return "", tuple(elected)

    def _alter_isr(self, cmd: AlterIsr, index: int, delta: _Delta) -> tuple[str, Any]:
        p = self._known_partition(cmd.topic, cmd.partition)
        where = f"{cmd.topic}-{cmd.partition}"
        if cmd.leader_epoch < p.leader_epoch:
            _refuse(
                RefusalCode.STALE_LEADER_EPOCH,
                f"{where}: leader epoch {cmd.leader_epoch} is older than {p.leader_epoch}",
            )
        if cmd.leader_epoch > p.leader_epoch:
            _refuse(
                RefusalCode.INVALID_LEADER_EPOCH,
                f"{where}: leader epoch {cmd.leader_epoch} is newer than {p.leader_epoch}",
            )
        if cmd.leader != p.leader:
            _refuse(
                RefusalCode.NOT_LEADER,
                f"{where}: broker {cmd.leader} is not the leader (leader: {p.leader})",
            )
        if cmd.partition_epoch < p.partition_epoch:
            _refuse(
                RefusalCode.STALE_PARTITION_EPOCH,
                f"{where}: partition epoch {cmd.partition_epoch} is older than "
                f"{p.partition_epoch}",
            )
        if cmd.partition_epoch > p.partition_epoch:
            _refuse(
                RefusalCode.INVALID_PARTITION_EPOCH,
                f"{where}: partition epoch {cmd.partition_epoch} is newer than "
                f"{p.partition_epoch}",
            )
        wanted = set(cmd.new_isr)
        if (
            len(wanted) != len(cmd.new_isr)
            or cmd.leader not in wanted
            or not wanted <= set(p.replicas)
        ):
            _refuse(
                RefusalCode.INVALID_ISR,
                f"{where}: ISR {list(cmd.new_isr)} must be distinct replicas of "
                f"{list(p.replicas)} including the leader {cmd.leader}",
            )
        ineligible = [r for r in cmd.new_isr if r not in p.isr and not delta.is_active(r)]
        if ineligible:
            _refuse(
                RefusalCode.INELIGIBLE_REPLICA,
                f"{where}: brokers {ineligible} are not active and cannot join the ISR",
            )
        isr = tuple(r for r in p.replicas if r in wanted)
        if isr == p.isr and not p.recovering:
            return "unchanged", p
        q = _changed(p, isr=isr, leader=p.leader, recovering=False)
        delta.set_partition(q)
        return "", q

    def _reassign_replicas(
        self, cmd: ReassignReplicas, index: int, delta: _Delta
    ) -> tuple[str, Any]:
        p = self._known_partition(cmd.topic, cmd.partition)
        topic = self._topics[cmd.topic]
        where = f"{cmd.topic}-{cmd.partition}"
        replicas = cmd.replicas
        if not replicas or len(set(replicas)) != len(replicas):
            _refuse(
                RefusalCode.INVALID_REPLICAS,
                f"{where}: replicas {list(replicas)} must be non-empty and distinct",
            )
        if len(replicas) != topic.replication_factor:
            _refuse(
                RefusalCode.INVALID_REPLICATION_FACTOR,
                f"{where}: {len(replicas)} replicas given; topic {cmd.topic!r} has "
                f"replication factor {topic.replication_factor}",
            )
        unknown = [r for r in replicas if r not in self._brokers]
        if unknown:
            _refuse(RefusalCode.UNKNOWN_BROKER, f"{where}: brokers {unknown} are not registered")
        if replicas == p.replicas:
            return "unchanged", p
        isr = tuple(r for r in replicas if r in p.isr)
        if not isr:
            _refuse(
                RefusalCode.INVALID_REPLICAS,
                f"{where}: none of the ISR {list(p.isr)} is among the new replicas "
                f"{list(replicas)}",
            )
        leader = p.leader if p.leader in isr else _first_active(replicas, isr, delta.is_active)
        q = _changed(p, replicas=replicas, isr=isr, leader=leader)
        delta.set_partition(q)
        delta.replicas_changed[cmd.topic] = None
        return "", q

    def _read(self, cmd: Read, index: int, delta: _Delta) -> tuple[str, Any]:
        if cmd.name is None:
            return "", None  # replaced by the image once the offset has moved
        topic = self._topics.get(cmd.name)
        if topic is None:
            return "", None
        return "", (topic, self._partitions[cmd.name])

    def _no_op(self, cmd: NoOp, index: int, delta: _Delta) -> tuple[str, Any]:
        return "", None

    def _set_metadata_version(
        self, cmd: SetMetadataVersion, index: int, delta: _Delta
    ) -> tuple[str, Any]:
        current = delta.metadata_version
        if cmd.level < current:
            _refuse(RefusalCode.INVALID_METADATA_VERSION,
                    f"metadata version {cmd.level} is below the finalized {current}; "
                    "downgrades are not supported")
        delta.metadata_version = cmd.level
        return "", None

    # -- snapshots --------------------------------------------------------

    def snapshot(self) -> bytes:
        """The whole state (records, offset, remembered results) as bytes."""
        return self.prepare_snapshot()()

    def prepare_snapshot(self) -> Callable[[], bytes]:
        """Capture the state in O(1); the returned function encodes it, on any thread."""
        image, sessions = self._image, self._sessions
        return lambda: _encode_snapshot(image, sessions)

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's.

        Raises :class:`~streambus_consensus.errors.CodecError` when the bytes
        are damaged (checksum), of an unknown version, or not a valid state;
        the current state is then left as it was.
        """
        try:
            offset, brokers, topics, partitions, sessions, level = _decode_snapshot(data)
        except CodecError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise CodecError(f"invalid snapshot: {type(exc).__name__}: {exc}") from None
        self._install(offset, brokers, topics, partitions, sessions, level)

    def _install(
        self,
        offset: int,
        brokers: _PersistentMap[int, Broker],
        topics: _PersistentMap[str, Topic],
        partitions: _PersistentMap[str, tuple[Partition, ...]],
        sessions: _PersistentMap[str, _Session],
        metadata_version: int,
    ) -> None:
        # Derived, writer-only indexes; everything is built before anything is replaced.
        normalized: dict[str, str] = {}
        topic_ids: dict[str, str] = {}
        broker_topics: dict[int, set[str]] = {}
        for name, topic in topics.items():
            if _normalize(name) in normalized or topic.topic_id in topic_ids:
                raise CodecError(f"invalid snapshot: topic {name!r} collides with another")
            normalized[_normalize(name)] = name
            topic_ids[topic.topic_id] = name
            for r in {r for p in partitions[name] for r in p.replicas}:
                broker_topics.setdefault(r, set()).add(name)
        # Clients evicted earlier (no results left, only their highest seq) are
        # not candidates for eviction again.
        lru: OrderedDict[str, None] = OrderedDict(
            (client, None)
            for client, session in sorted(sessions.items(), key=lambda item: item[1].last_offset)
            if session.count
        )
        self._brokers, self._topics, self._partitions = brokers, topics, partitions
        self._sessions = sessions
        self._normalized, self._topic_ids = normalized, topic_ids
        self._broker_topics, self._lru = broker_topics, lru
        self._placements = _Placements(brokers)
        self._replica_sets = {}
        self._image = MetadataImage(offset, brokers, topics, partitions, metadata_version)


# --------------------------------------------------------------------------
# Snapshot encoding. Layout (codec):
#   (magic, metadata version, crc32(payload), payload)
#   payload = encode((offset, brokers, topics, sessions)), each list sorted by key;
#   a topic is (topic fields, partitions blob). A partitions blob is big-endian
#   int64s, per partition: n, replicas..., m, isr..., leader (-1: none),
#   leader epoch, partition epoch, recovering (0/1). Packing partitions keeps a
#   million of them from becoming ten million codec items.


def _broker_wire(b: Broker) -> tuple[Any, ...]:
    return (b.broker_id, b.endpoint, b.rack, b.incarnation_id, b.broker_epoch, b.state.value)


def _topic_wire(t: Topic) -> tuple[Any, ...]:
    c = t.config
    config = (c.retention_ms, c.segment_bytes, c.min_insync_replicas, c.cleanup_policy,
              c.compression)
    return (t.name, t.topic_id, config, t.partition_count, t.replication_factor)


def _partitions_blob(parts: Iterable[Partition]) -> bytes:
    flat: list[int] = []
    for p in parts:
        flat.append(len(p.replicas))
        flat.extend(p.replicas)
        flat.append(len(p.isr))
        flat.extend(p.isr)
        flat.append(-1 if p.leader is None else p.leader)
        flat.append(p.leader_epoch)
        flat.append(p.partition_epoch)
        flat.append(1 if p.recovering else 0)
    return struct.pack(f">{len(flat)}q", *flat)


def _value_wire(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, Broker):
        return ("broker", _broker_wire(value))
    if isinstance(value, Topic):
        return ("topic", _topic_wire(value))
    if isinstance(value, Partition):
        return ("partition", value.topic, value.index, _partitions_blob((value,)))
    if isinstance(value, tuple) and all(isinstance(p, Partition) for p in value):
        return ("partitions", tuple((p.topic, p.index, _partitions_blob((p,))) for p in value))
    if isinstance(value, tuple) and all(isinstance(o, TopicOutcome) for o in value):
        return ("topic_outcomes", tuple(
            (o.name, o.code, o.message, None if o.topic is None else _topic_wire(o.topic))
            for o in value))
    raise CodecError(f"cannot snapshot a result value of type {type(value).__name__}")


def _encode_snapshot(image: MetadataImage, sessions: Mapping[str, _Session]) -> bytes:
    brokers = [_broker_wire(image.brokers[i]) for i in sorted(image.brokers)]
    topics = [
        (_topic_wire(image.topics[name]), _partitions_blob(image.partitions[name]))
        for name in sorted(image.topics)
    ]
    clients = []
    for client in sorted(sessions):
        s = sessions[client]
        results = [
            (seq, r.ok, r.code, r.message, _value_wire(r.value), r.offset)
            for seq, r in s.items()
        ]
        clients.append((client, s.last_offset, s.max_evicted_seq, results))
    payload = codec.encode((image.offset, brokers, topics, clients))
    return codec.encode((_SNAPSHOT_MAGIC, image.metadata_version, zlib.crc32(payload), payload))


def _want(
    value: Any, kind: type[Any] | tuple[type[Any], ...], what: str, size: int | None = None
) -> Any:
    if type(value) not in (kind if isinstance(kind, tuple) else (kind,)):
        raise CodecError(f"invalid snapshot: {what} is a {type(value).__name__}")
    if size is not None and len(value) != size:
        raise CodecError(f"invalid snapshot: {what} has {len(value)} items, not {size}")
    return value


def _int(value: Any, what: str, lo: int = 0) -> int:
    _want(value, int, what)
    if value < lo:
        raise CodecError(f"invalid snapshot: {what} {value} is below {lo}")
    result: int = value
    return result


def _broker_from(w: Any) -> Broker:
    _want(w, tuple, "broker", 6)
    return Broker(
        _int(w[0], "broker id"),
        _want(w[1], str, "endpoint"),
        _want(w[2], (str, type(None)), "rack"),
        _want(w[3], str, "incarnation id"),
        _int(w[4], "broker epoch"),
        BrokerState(_want(w[5], str, "broker state")),
    )


def _topic_from(w: Any, configs: dict[tuple[Any, ...], TopicConfig]) -> Topic:
    _want(w, tuple, "topic", 5)
    c = _want(w[2], tuple, "topic config", 5)
    key = (
        _int(c[0], "retention.ms", -1),
        _int(c[1], "segment.bytes"),
        _int(c[2], "min.insync.replicas", 1),
        _want(c[3], str, "cleanup.policy"),
        _want(c[4], str, "compression.type"),
    )
    config = configs.get(key)
    if config is None:  # topics mostly share a few configs: build and validate each once
        config = TopicConfig(*key)
        configs[key] = config
    return Topic(
        _want(w[0], str, "topic name"),
        _want(w[1], str, "topic id"),
        config,
        _int(w[3], "partition count", 1),
        _int(w[4], "replication factor", 1),
    )


class _Interned:
    """Canonical copies of the replica and ISR tuples seen during one restore."""

    __slots__ = ("isrs", "replicas")

    def __init__(self) -> None:
        self.replicas: dict[tuple[int, ...], tuple[tuple[int, ...], frozenset[int]]] = {}
        """Replica tuples that passed the checks, with their set."""
        self.isrs: dict[tuple[int, ...], tuple[int, ...]] = {}
        """ISR tuples that differ from their partition's replicas."""


def _partitions_from(
    topic: str, first_index: int, blob: Any, interned: _Interned | None = None
) -> list[Partition]:
    """Decode and check one topic's partitions blob.

    ``interned`` (shared across a restore) holds one canonical, already
    checked copy of each replica tuple and of each ISR tuple seen: a million
    partitions over a hundred brokers use a few hundred distinct tuples, so
    the restored state holds those instead of two new tuples per partition
    (less memory, fewer objects for the garbage collector), and each distinct
    replica tuple is checked once.
    """
    _want(blob, bytes, "partitions")
    if len(blob) % 8:
        raise CodecError(f"invalid snapshot: partitions of {topic!r} are truncated")
    n = len(blob) // 8
    vals = struct.unpack(f">{n}q", blob)
    tables = _Interned() if interned is None else interned
    checked, isrs = tables.replicas, tables.isrs
    parts: list[Partition] = []
    append = parts.append
    pos = 0
    try:
        while pos < n:
            end = pos + 1 + vals[pos]
            replicas = vals[pos + 1 : end]
            pos = end + 1 + vals[end]
            isr = vals[end + 1 : pos]
            leader, leader_epoch, partition_epoch, recovering = vals[pos : pos + 4]
            pos += 4
            known = checked.get(replicas)
            if known is None and (
                replicas and min(replicas) >= 0 and len(set(replicas)) == len(replicas)
            ):
                known = checked[replicas] = (replicas, frozenset(replicas))
            if (
                known is None
                or not isr
                or pos > n
                or not known[1].issuperset(isr)
                or not (leader == -1 or leader in isr)
                or leader_epoch < 0
                or partition_epoch < 0
                or recovering not in (0, 1)
            ):
                raise CodecError(
                    f"invalid snapshot: partition {topic}-{first_index + len(parts)} "
                    "breaks an invariant"
                )
            replicas = known[0]
            isr = replicas if isr == replicas else isrs.setdefault(isr, isr)
            append(
                _partition(
                    topic, first_index + len(parts), replicas, isr,
                    None if leader == -1 else leader, leader_epoch, partition_epoch,
                    recovering == 1,
                )
            )
    except (IndexError, ValueError) as exc:
        raise CodecError(f"invalid snapshot: partitions of {topic!r}: {exc}") from None
    return parts


def _value_from(w: Any, configs: dict[tuple[Any, ...], TopicConfig]) -> Any:
    if w is None:
        return None
    _want(w, tuple, "result value")
    tag = w[0] if w else None
    if tag == "broker" and len(w) == 2:
        return _broker_from(w[1])
    if tag == "topic" and len(w) == 2:
        return _topic_from(w[1], configs)
    if tag == "partition" and len(w) == 4:
        return _one_partition(w[1:])
    if tag == "partitions" and len(w) == 2:
        return tuple(_one_partition(item) for item in _want(w[1], tuple, "partitions"))
    if tag == "topic_outcomes" and len(w) == 2:
        outcomes = []
        for item in _want(w[1], tuple, "topic outcomes"):
            _want(item, tuple, "topic outcome", 4)
            outcomes.append(TopicOutcome(
                _want(item[0], str, "topic outcome name"),
                _want(item[1], str, "topic outcome code"),
                _want(item[2], str, "topic outcome message"),
                None if item[3] is None else _topic_from(item[3], configs)))
        return tuple(outcomes)
    raise CodecError(f"invalid snapshot: unknown result value {tag!r}")


def _one_partition(w: Any) -> Partition:
    _want(w, tuple, "partition", 3)
    parts = _partitions_from(_want(w[0], str, "topic"), _int(w[1], "index"), w[2])
    if len(parts) != 1:
        raise CodecError("invalid snapshot: expected one partition")
    return parts[0]


def _decode_snapshot(
    data: bytes,
) -> tuple[
    int,
    _PersistentMap[int, Broker],
    _PersistentMap[str, Topic],
    _PersistentMap[str, tuple[Partition, ...]],
    _PersistentMap[str, _Session],
    int,
]:
    outer = codec.decode(data)
    if type(outer) is not tuple or len(outer) != 4 or outer[0] != _SNAPSHOT_MAGIC:
        raise CodecError("not a metadata snapshot")
    _magic, version, checksum, payload = outer
    if type(version) is not int or version < SNAPSHOT_VERSION:
        raise CodecError(f"unknown snapshot version {version!r}")
    if version > supported_metadata_versions()[1]:
        raise UnsupportedMetadataVersionError("the snapshot", version,
                                              supported_metadata_versions())
    if type(payload) is not bytes or type(checksum) is not int:
        raise CodecError("invalid snapshot envelope")
    if zlib.crc32(payload) != checksum:
        raise CodecError("snapshot checksum mismatch: the data is damaged")
    body = _want(codec.decode(payload), tuple, "snapshot body", 4)
    offset = _int(body[0], "offset")
    configs: dict[tuple[Any, ...], TopicConfig] = {}
    ev_b: _Evolver[int, Broker] = _PersistentMap().evolver()
    broker_ids: set[int] = set()
    for w in _want(body[1], list, "brokers"):
        broker = _broker_from(w)
        if broker.broker_id in broker_ids:
            raise CodecError(f"invalid snapshot: broker {broker.broker_id} appears twice")
        broker_ids.add(broker.broker_id)
        ev_b[broker.broker_id] = broker
    ev_t: _Evolver[str, Topic] = _PersistentMap().evolver()
    ev_p: _Evolver[str, tuple[Partition, ...]] = _PersistentMap().evolver()
    names: set[str] = set()
    interned = _Interned()
    for w in _want(body[2], list, "topics"):
        _want(w, tuple, "topic entry", 2)
        topic = _topic_from(w[0], configs)
        parts = tuple(_partitions_from(topic.name, 0, w[1], interned))
        if topic.name in names or len(parts) != topic.partition_count:
            raise CodecError(f"invalid snapshot: topic {topic.name!r} is inconsistent")
        names.add(topic.name)
        ev_t[topic.name] = topic
        ev_p[topic.name] = parts
    ev_s: _Evolver[str, _Session] = _PersistentMap().evolver()
    clients: set[str] = set()
    for w in _want(body[3], list, "sessions"):
        _want(w, tuple, "session", 4)
        client = _want(w[0], str, "client id")
        results: dict[int, ApplyResult] = {}
        for r in _want(w[3], list, "results"):
            _want(r, tuple, "result", 6)
            results[_int(r[0], "seq")] = ApplyResult(
                _want(r[1], bool, "ok"),
                _want(r[2], str, "code"),
                _want(r[3], str, "message"),
                _value_from(r[4], configs),
                (),
                _int(r[5], "result offset"),
                True,
            )
        if client in clients:
            raise CodecError(f"invalid snapshot: client {client!r} appears twice")
        clients.add(client)
        pairs = list(results.items())
        chunks = tuple(dict(pairs[i : i + _CHUNK]) for i in range(0, len(pairs), _CHUNK))
        ev_s[client] = _Session(
            _int(w[1], "last offset"), chunks, len(pairs), _int(w[2], "evicted seq", -1)
        )
    return (offset, ev_b.persistent(), ev_t.persistent(), ev_p.persistent(), ev_s.persistent(),
            version)
