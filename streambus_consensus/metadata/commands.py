"""The metadata commands that travel through the Raft log, and their codec.

Each command is a frozen, keyword-only dataclass. Everything the state machine
needs to decide is inside the command (ids, placement offsets): the state
machine reads no clock and draws no random numbers.

Wire format, encoded with :mod:`streambus_consensus.codec`::

    (metadata_version: int, command_type: str, request_id, field, field, ...)

a flat tuple: ``request_id`` is ``(client_id, seq)`` and the other fields
follow in the order of the command's dataclass fields (positional, to keep
the hot decode path short). :func:`decode_command` checks the version, the
type, the number of fields, each field's type and range, and raises
:class:`~streambus_consensus.errors.CodecError` on any mismatch. Whether a
well-formed command makes sense (does the topic exist, is the name valid) is
the state machine's business: it answers with a refusal code, not an exception.

**Metadata versions** (feature levels, as Kafka's ``metadata.version``). Each
command kind belongs to the metadata version that introduced it, and its
entries carry that number first. Every kind of the first release is version
1 (:data:`FORMAT_VERSION`), so logs written before feature levels existed
decode unchanged; version 2 (:data:`BATCH_CREATE_VERSION`) adds
:class:`CreateTopics`, the batched create. A release that adds a kind, or
changes one's fields, adds a version; this software decodes every version
from 1 up to :func:`supported_metadata_versions`'s highest and raises
:class:`~streambus_consensus.errors.UnsupportedMetadataVersionError` above
it. The cluster's *finalized* version (:class:`SetMetadataVersion`, kept in
the state machine) says which versions may be written: a command above it is
never proposed, and is refused the same way on every replica if it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, ClassVar, Final, Literal, TypeAlias

from .. import codec
from ..errors import CodecError, UnsupportedMetadataVersionError

__all__ = [
    "BATCHED_ENTRIES_VERSION",
    "BATCH_CREATE_VERSION",
    "BOOTSTRAP_REQUEST_ID",
    "ELECTION_KINDS",
    "FORMAT_VERSION",
    "MAX_METADATA_VERSION",
    "MAX_TOPICS_PER_BATCH",
    "AddPartitions",
    "AlterIsr",
    "AlterTopicConfig",
    "BeginControlledShutdown",
    "Command",
    "CreateTopic",
    "CreateTopics",
    "DeleteTopic",
    "ElectLeaders",
    "ElectionKind",
    "FenceBroker",
    "NoOp",
    "Read",
    "ReassignReplicas",
    "RegisterBroker",
    "RequestId",
    "SetMetadataVersion",
    "TopicSpec",
    "UnfenceBroker",
    "UnregisterBroker",
    "command_level",
    "command_type",
    "decode_command",
    "encode_command",
    "register_command",
    "supported_metadata_versions",
]

FORMAT_VERSION: Final = 1
"""The metadata version of every command kind of this release (the first
element of their encoding); also the version of a cluster that never set one."""

BATCH_CREATE_VERSION: Final = 2
"""The metadata version that introduced :class:`CreateTopics` (the batched create).
A cluster finalized below it is never sent one (the store falls back to
single creates, see :meth:`~.store.MetadataStore.create_topics`)."""

MAX_TOPICS_PER_BATCH: Final = 1000
"""Most topics one :class:`CreateTopics` may carry."""
BATCHED_ENTRIES_VERSION: Final = 2
"""The metadata version (the release of :data:`BATCH_CREATE_VERSION`) from which
a log entry may carry several commands (coalesced proposals,
:mod:`streambus_consensus.raft.batch`); a release that reads it unpacks batch
entries, one that does not would stop on them, so none is written below it."""

MAX_METADATA_VERSION: Final = 32767
"""Largest metadata version a command may name (Kafka's feature levels are int16)."""

ElectionKind: TypeAlias = Literal["preferred", "isr", "unclean"]
"""How :class:`ElectLeaders` chooses a leader."""

ELECTION_KINDS: Final = ("isr", "preferred", "unclean")
"""Every :data:`ElectionKind`, sorted."""

_INT32_MAX: Final = 2**31 - 1
_INT64_MAX: Final = 2**63 - 1
_MAX_TEXT: Final = 4096  # longest accepted string field, in characters
_MAX_ITEMS: Final = 4096  # longest accepted tuple or mapping


@dataclass(frozen=True, slots=True)
class RequestId:
    """Identifies one request of one client, to make retries idempotent.

    A client uses a new ``seq`` for every new request, increasing, and the same
    ``RequestId`` when it retries. The state machine remembers the results of
    recent requests per client and answers a retry with the original result;
    a retry whose result it has forgotten is refused as ``request_expired``,
    never applied a second time.
    """

    client_id: str
    """Who sends it: 1-256 characters, stable across the client's retries."""
    seq: int
    """The request's sequence number within the client, ``0 <= seq < 2**63``."""


BOOTSTRAP_REQUEST_ID: Final = RequestId("bootstrap", 1)
"""The request id of a new cluster's first command, the :class:`SetMetadataVersion`
its first leader writes (:meth:`.fsm.MetadataStateMachine.bootstrap_command`)."""


# --------------------------------------------------------------------------
# Commands


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisterBroker:
    """Register a broker, or a new incarnation of it.

    A new incarnation gets a new ``broker_epoch`` (the entry's log offset) and
    is treated as a restart: it leaves every ISR it is not the last member of
    and leads nothing until elected again. The same incarnation again is an
    idempotent no-op (a conflicting endpoint or rack is refused).
    """

    read_only: ClassVar[bool] = False
    request_id: RequestId
    """Idempotency key."""
    broker_id: int
    """The broker's id, ``0 <= broker_id < 2**31``."""
    endpoint: str
    """``"host:port"``."""
    rack: str | None = None
    """Failure domain, or ``None``."""
    incarnation_id: str
    """UUID text of the registering process."""
    fenced: bool = True
    """Register as ``FENCED`` (default, as KRaft does: the controller unfences
    the broker once it has caught up) or directly as ``ACTIVE``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UnregisterBroker:
    """Remove a broker's registration (it leaves ISRs and leadership as when fenced)."""

    read_only: ClassVar[bool] = False
    request_id: RequestId
    """Idempotency key."""
    broker_id: int
    """The broker to remove."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FenceBroker:
    """Fence a broker: it leaves every ISR (unless last member) and leads nothing."""

    read_only: ClassVar[bool] = False
    request_id: RequestId
    """Idempotency key."""
    broker_id: int
    """The broker to fence."""
    broker_epoch: int | None = None
    """When set, refuse unless it is the broker's current epoch (so a decision
    about an older incarnation cannot fence a newer one)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UnfenceBroker:
    """Make a broker ``ACTIVE``; offline partitions it can lead get a leader."""

    read_only: ClassVar[bool] = False
    request_id: RequestId
    """Idempotency key."""
    broker_id: int
    """The broker to unfence."""
    broker_epoch: int | None = None
    """When set, refuse unless it is the broker's current epoch."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BeginControlledShutdown:
    """Start a broker's controlled shutdown: leadership and ISR membership move away."""

    read_only: ClassVar[bool] = False
    request_id: RequestId
    """Idempotency key."""
    broker_id: int
    """The broker shutting down."""
    broker_epoch: int | None = None
    """When set, refuse unless it is the broker's current epoch."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateTopic:
    """Create a topic and place its partitions on the active brokers."""

    read_only: ClassVar[bool] = False
    request_id: RequestId
    """Idempotency key."""
    name: str
    """Topic name (validated by the state machine)."""
    topic_id: str
    """UUID text chosen by the proposer."""
    partitions: int
    """Number of partitions, at least 1."""
    replication_factor: int
    """Replicas per partition, at least 1 and at most the active brokers."""
    config: Mapping[str, str | int] = field(default_factory=dict)
    """Overrides of the default :class:`~.records.TopicConfig`, by Kafka key."""
    placement_offset: int
    """Where the striped placement starts, ``>= 0``. The proposer picks it at
    random before proposing, so topics do not all start on the same broker."""

    def __post_init__(self) -> None:
        _freeze_mapping(self, "config")


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicSpec:
    """One topic of a :class:`CreateTopics`: the fields of a :class:`CreateTopic`
    without the request id."""

    name: str
    """1-249 characters of ``[a-zA-Z0-9._-]``, not ``"."`` or ``".."``."""
    topic_id: str
    """The new topic's id, a UUID chosen by the proposer."""
    partitions: int
    """Number of partitions, ``1..MAX_PARTITIONS_PER_TOPIC``."""
    replication_factor: int
    """Replicas per partition; at most the number of active brokers."""
    config: Mapping[str, str | int] = field(default_factory=dict)
    """Topic settings under Kafka's keys; unset keys take the defaults."""
    placement_offset: int = 0
    """Where the round-robin placement starts, chosen by the proposer."""

    def __post_init__(self) -> None:
        _freeze_mapping(self, "config")


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateTopics:
    """Create many topics in one entry, each on its own (Kafka's CreateTopics).

    Each topic is created or refused independently: one that already exists
    is refused with ``topic_exists`` while the others are created. The answer
    is one :class:`~.fsm.TopicOutcome` per topic, in order, remembered under
    the one request id, so a retried batch gets the same outcomes back and
    creates nothing twice. At most :data:`MAX_TOPICS_PER_BATCH` topics, and at
    most ``MAX_PARTITIONS_PER_TOPIC`` partitions in all (one apply must stay
    short); a batch past either limit is refused as a whole. Introduced at
    metadata version :data:`BATCH_CREATE_VERSION`.
    """

    read_only: ClassVar[bool] = False
    request_id: RequestId
    """Idempotency key of the whole batch."""
    topics: tuple[TopicSpec, ...]
    """The topics, in order; the names must be distinct."""

    def __post_init__(self) -> None:
        _freeze_tuple(self, "topics")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeleteTopic:
    """Delete a topic and all its partitions."""

    read_only: ClassVar[bool] = False
    request_id: RequestId
    """Idempotency key."""
    name: str
    """The topic to delete."""
    topic_id: str | None = None
    """When set, refuse unless the topic still has this id (guards against
    deleting a topic re-created under the same name)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AlterTopicConfig:
    """Change some of a topic's settings; deleted keys return to their defaults."""

    read_only: ClassVar[bool] = False
    request_id: RequestId
    """Idempotency key."""
    name: str
    """The topic to change."""
    set_configs: Mapping[str, str | int] = field(default_factory=dict)
    """Settings to set, by Kafka key."""
    delete_configs: tuple[str, ...] = ()
    """Kafka keys to reset to their defaults."""

    def __post_init__(self) -> None:
        _freeze_mapping(self, "set_configs")
        _freeze_tuple(self, "delete_configs")


@dataclass(frozen=True, slots=True, kw_only=True)
class AddPartitions:
    """Grow a topic to ``new_total`` partitions (never fewer)."""

    read_only: ClassVar[bool] = False
    request_id: RequestId
    """Idempotency key."""
    name: str
    """The topic to grow."""
    new_total: int
    """The partition count afterwards; more than the current count."""
    placement_offset: int
    """Where the striped placement of the new partitions starts (picked at
    random by the proposer, ``>= 0``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ElectLeaders:
    """Elect leaders for one partition or all partitions of a topic.

    - ``"preferred"``: move leadership to the first replica when it is active
      and in the ISR.
    - ``"isr"``: give an offline partition a leader from its ISR.
    - ``"unclean"``: like ``"isr"``, and when no ISR member is active, elect
      any active replica (ISR becomes ``[leader]``, marked recovering; records
      may be lost). Only ever done when asked.
    """

    read_only: ClassVar[bool] = False
    request_id: RequestId
    """Idempotency key."""
    topic: str
    """The topic."""
    partition: int | None = None
    """One partition, or ``None`` for every partition of the topic."""
    kind: ElectionKind = "preferred"
    """The kind of election."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AlterIsr:
    """A partition leader's request to change its ISR (KRaft's AlterPartition).

    Refused when ``leader_epoch`` or ``partition_epoch`` is not current, so a
    deposed leader or a stale request cannot undo a newer change.
    """

    read_only: ClassVar[bool] = False
    request_id: RequestId
    """Idempotency key."""
    topic: str
    """The topic."""
    partition: int
    """The partition index."""
    leader: int
    """The broker sending the request; must be the current leader."""
    leader_epoch: int
    """The leader epoch the sender leads in."""
    new_isr: tuple[int, ...]
    """The ISR wanted: replicas only, the leader included."""
    partition_epoch: int
    """The partition epoch the sender last saw."""

    def __post_init__(self) -> None:
        _freeze_tuple(self, "new_isr")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReassignReplicas:
    """Replace a partition's replica set at once.

    The new ISR is the old ISR restricted to the new replicas (refused when
    that is empty); new replicas join the ISR through :class:`AlterIsr` once
    caught up. The leader moves only when it is no longer a replica.
    """

    read_only: ClassVar[bool] = False
    request_id: RequestId
    """Idempotency key."""
    topic: str
    """The topic."""
    partition: int
    """The partition index."""
    replicas: tuple[int, ...]
    """The new replicas, preferred leader first; as many as the topic's
    replication factor."""

    def __post_init__(self) -> None:
        _freeze_tuple(self, "replicas")


@dataclass(frozen=True, slots=True, kw_only=True)
class SetMetadataVersion:
    """Finalize the cluster's metadata version (Kafka's ``FeatureLevelRecord``).

    From the entry on, commands up to ``level`` may be written. Proposed by
    ``features upgrade`` only after every voter reported that its software
    reads ``level``. Lowering it is refused (a command already written at a
    higher version could not be read back by the software a downgrade is
    for); the same level again is an idempotent no-op. A replica whose
    software does not read ``level`` stops rather than apply it.
    """

    read_only: ClassVar[bool] = False
    request_id: RequestId
    """Idempotency key."""
    level: int
    """The new metadata version, ``1 <= level <= 32767``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Read:
    """A linearizable read through the log: changes nothing, answers the
    state as of its own log position. Not remembered for retries (re-reading
    is itself idempotent)."""

    read_only: ClassVar[bool] = True
    request_id: RequestId
    """Request id (not remembered)."""
    name: str | None = None
    """A topic, answered as ``(Topic, partitions)`` or ``None``; ``None``
    answers the whole :class:`~.fsm.MetadataImage`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NoOp:
    """A barrier: once applied, every earlier entry is applied too."""

    read_only: ClassVar[bool] = True
    request_id: RequestId
    """Request id (not remembered)."""


Command: TypeAlias = (
    RegisterBroker
    | UnregisterBroker
    | FenceBroker
    | UnfenceBroker
    | BeginControlledShutdown
    | CreateTopic
    | CreateTopics
    | DeleteTopic
    | AlterTopicConfig
    | AddPartitions
    | ElectLeaders
    | AlterIsr
    | ReassignReplicas
    | SetMetadataVersion
    | Read
    | NoOp
)
"""Any metadata command."""


def _freeze_mapping(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if type(value) is MappingProxyType:  # decoded commands: already frozen
        return
    if type(value) is dict or isinstance(value, Mapping):  # dict first: ABC checks are slow
        object.__setattr__(obj, name, MappingProxyType(dict(value)))


def _freeze_tuple(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if isinstance(value, list):
        object.__setattr__(obj, name, tuple(value))


# --------------------------------------------------------------------------
# Field kinds: each checks a value in its wire form and converts both ways.


class _Kind:
    """A field kind: validates plain data and converts to and from the wire."""

    def check(self, value: Any, where: str) -> Any:
        """Return ``value`` in wire form, or raise CodecError."""
        raise NotImplementedError

    def to_wire(self, value: Any, where: str) -> Any:
        """Turn an attribute into plain data."""
        return self.check(value, where)

    def from_wire(self, value: Any, where: str) -> Any:
        """Turn plain data into an attribute."""
        return self.check(value, where)


class _Int(_Kind):
    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def check(self, value: Any, where: str) -> Any:
        if type(value) is not int:
            raise CodecError(f"{where}: expected an integer, got {type(value).__name__}")
        if not self.lo <= value <= self.hi:
            raise CodecError(f"{where}: {value} is out of range {self.lo}..{self.hi}")
        return value


class _Str(_Kind):
    def __init__(self, min_len: int = 0, max_len: int = _MAX_TEXT) -> None:
        self.min_len, self.max_len = min_len, max_len

    def check(self, value: Any, where: str) -> Any:
        if type(value) is not str:
            raise CodecError(f"{where}: expected a string, got {type(value).__name__}")
        if not self.min_len <= len(value) <= self.max_len:
            raise CodecError(
                f"{where}: length {len(value)} is out of range {self.min_len}..{self.max_len}"
            )
        return value


class _Bool(_Kind):
    def check(self, value: Any, where: str) -> Any:
        if type(value) is not bool:
            raise CodecError(f"{where}: expected a bool, got {type(value).__name__}")
        return value


class _Choice(_Kind):
    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices

    def check(self, value: Any, where: str) -> Any:
        if type(value) is not str or value not in self.choices:
            raise CodecError(f"{where}: {value!r} is not one of {list(self.choices)}")
        return value


class _Optional(_Kind):
    def __init__(self, inner: _Kind) -> None:
        self.inner = inner

    def check(self, value: Any, where: str) -> Any:
        return None if value is None else self.inner.check(value, where)

    def to_wire(self, value: Any, where: str) -> Any:
        return None if value is None else self.inner.to_wire(value, where)

    def from_wire(self, value: Any, where: str) -> Any:
        return None if value is None else self.inner.from_wire(value, where)


class _Tuple(_Kind):
    def __init__(self, item: _Kind, max_items: int = _MAX_ITEMS) -> None:
        self.item, self.max_items = item, max_items

    def _each(self, value: Any, where: str, convert: Callable[[Any, str], Any]) -> Any:
        if type(value) is not tuple:
            raise CodecError(f"{where}: expected a tuple, got {type(value).__name__}")
        if len(value) > self.max_items:
            raise CodecError(f"{where}: {len(value)} items, at most {self.max_items} allowed")
        try:  # the common case, without formatting a position per item
            return tuple([convert(item, where) for item in value])
        except CodecError:  # again, to name the item at fault
            return tuple(convert(item, f"{where}[{i}]") for i, item in enumerate(value))

    def check(self, value: Any, where: str) -> Any:
        return self._each(value, where, self.item.check)

    def to_wire(self, value: Any, where: str) -> Any:
        return self._each(value, where, self.item.to_wire)

    def from_wire(self, value: Any, where: str) -> Any:
        return self._each(value, where, self.item.from_wire)


class _ConfigMap(_Kind):
    """``{key: str | int}``; sorted by key on the wire so equal maps encode equally."""

    _key = _Str(1, 255)
    _text = _Str(0, _MAX_TEXT)
    _number = _Int(-_INT64_MAX - 1, _INT64_MAX)

    def check(self, value: Any, where: str) -> Any:
        if type(value) not in (dict, MappingProxyType) and not isinstance(value, Mapping):
            raise CodecError(f"{where}: expected a mapping, got {type(value).__name__}")
        if len(value) > _MAX_ITEMS:
            raise CodecError(f"{where}: {len(value)} items, at most {_MAX_ITEMS} allowed")
        out: dict[str, str | int] = {}
        for key in value:
            self._key.check(key, f"{where} key")
        for key in sorted(value):
            item = value[key]
            kind = self._number if type(item) is int else self._text
            out[key] = kind.check(item, f"{where}[{key!r}]")
        return out

    def from_wire(self, value: Any, where: str) -> Any:
        if type(value) is not dict:
            raise CodecError(f"{where}: expected a dict, got {type(value).__name__}")
        return MappingProxyType(self.check(value, where))


class _RequestIdKind(_Kind):
    _client = _Str(1, 256)
    _seq = _Int(0, _INT64_MAX)

    def check(self, value: Any, where: str) -> Any:
        if type(value) is not tuple or len(value) != 2:
            raise CodecError(f"{where}: expected (client_id, seq)")
        return (self._client.check(value[0], f"{where}.client_id"),
                self._seq.check(value[1], f"{where}.seq"))

    def to_wire(self, value: Any, where: str) -> Any:
        if type(value) is not RequestId:
            raise CodecError(f"{where}: expected a RequestId, got {type(value).__name__}")
        return self.check((value.client_id, value.seq), where)

    def from_wire(self, value: Any, where: str) -> Any:
        client_id, seq = self.check(value, where)
        return RequestId(client_id, seq)


class _SpecKind(_Kind):
    """A :class:`TopicSpec`: ``(name, topic_id, partitions, replication_factor,
    config, placement_offset)`` on the wire."""

    _fields: tuple[tuple[str, _Kind], ...] = ()

    def check(self, value: Any, where: str) -> Any:
        if type(value) is not tuple or len(value) != len(self._fields):
            raise CodecError(f"{where}: expected a topic of {len(self._fields)} fields")
        return tuple(kind.check(item, f"{where}.{name}")
                     for (name, kind), item in zip(self._fields, value, strict=True))

    def to_wire(self, value: Any, where: str) -> Any:
        if type(value) is not TopicSpec:
            raise CodecError(f"{where}: expected a TopicSpec, got {type(value).__name__}")
        wire: tuple[Any, ...] = (value.name, value.topic_id, value.partitions,
                                 value.replication_factor, {}, value.placement_offset)
        if not value.config and _plain_spec(wire):
            return wire
        return tuple(kind.to_wire(getattr(value, name), f"{where}.{name}")
                     for name, kind in self._fields)

    def from_wire(self, value: Any, where: str) -> Any:
        if type(value) is not tuple or len(value) != len(self._fields):
            raise CodecError(f"{where}: expected a topic of {len(self._fields)} fields")
        if _plain_spec(value):
            # The common case (no settings), checked without naming every field.
            return _spec_from_plain(value)
        return TopicSpec(**{name: kind.from_wire(item, f"{where}.{name}")
                            for (name, kind), item in zip(self._fields, value, strict=True)})


class _SpecsKind(_Tuple):
    """The topics of a :class:`CreateTopics`: a tuple of :class:`_SpecKind`.
    When every topic is plain (no settings: the common case), they are
    checked and built in one loop; otherwise as any tuple is."""

    def from_wire(self, value: Any, where: str) -> Any:
        if type(value) is tuple and len(value) <= self.max_items:
            specs = []
            for item in value:  # (name, topic_id, partitions, factor, config, offset)
                if type(item) is not tuple or len(item) != 6 or not _plain_spec(item):
                    break
                specs.append(_spec_from_plain(item))
            else:
                return tuple(specs)
        return super().from_wire(value, where)


_NO_CONFIG: Final[Mapping[str, str | int]] = MappingProxyType({})
_SPEC_SLOTS: Final = tuple(TopicSpec.__dict__[name].__set__ for name in (
    "name", "topic_id", "partitions", "replication_factor", "config", "placement_offset"))


def _spec_from_plain(wire: tuple[Any, ...]) -> TopicSpec:
    """The :class:`TopicSpec` of a wire tuple that passed :func:`_plain_spec`,
    built through its slots (``TopicSpec(...)`` takes three times as long)."""
    spec: TopicSpec = object.__new__(TopicSpec)
    s_name, s_topic_id, s_partitions, s_factor, s_config, s_offset = _SPEC_SLOTS
    name, topic_id, partitions, factor, _config, offset = wire
    s_name(spec, name)
    s_topic_id(spec, topic_id)
    s_partitions(spec, partitions)
    s_factor(spec, factor)
    s_config(spec, _NO_CONFIG)
    s_offset(spec, offset)
    return spec


def _plain_spec(wire: tuple[Any, ...]) -> bool:
    """Whether a topic's wire tuple is valid and has no settings (the fast path)."""
    name, topic_id, partitions, factor, config, offset = wire
    return (type(name) is str and len(name) <= _MAX_TEXT and type(topic_id) is str
            and len(topic_id) <= 64 and type(partitions) is int and type(factor) is int
            and -_INT32_MAX - 1 <= partitions <= _INT32_MAX
            and -_INT32_MAX - 1 <= factor <= _INT32_MAX
            and type(config) is dict and not config
            and type(offset) is int and 0 <= offset <= _INT64_MAX)


_BROKER_ID = _Int(0, _INT32_MAX)
_EPOCH = _Int(0, _INT64_MAX)
_INDEX = _Int(0, _INT32_MAX)
_COUNT = _Int(-_INT32_MAX - 1, _INT32_MAX)  # range judged by the state machine
_OFFSET = _Int(0, _INT64_MAX)
_NAME = _Str(0, _MAX_TEXT)
_REQUEST_ID = _RequestIdKind()
_BROKER_IDS = _Tuple(_BROKER_ID, 32767)

_SPEC = _SpecKind()
_SPEC._fields = (
    ("name", _NAME), ("topic_id", _Str(0, 64)), ("partitions", _COUNT),
    ("replication_factor", _COUNT), ("config", _ConfigMap()), ("placement_offset", _OFFSET),
)

_SCHEMA: Final[dict[type[Any], tuple[str, dict[str, _Kind]]]] = {
    RegisterBroker: ("register_broker", {
        "request_id": _REQUEST_ID, "broker_id": _BROKER_ID, "endpoint": _Str(0, 1024),
        "rack": _Optional(_Str(0, 255)), "incarnation_id": _Str(0, 64), "fenced": _Bool(),
    }),
    UnregisterBroker: ("unregister_broker", {"request_id": _REQUEST_ID, "broker_id": _BROKER_ID}),
    FenceBroker: ("fence_broker", {
        "request_id": _REQUEST_ID, "broker_id": _BROKER_ID, "broker_epoch": _Optional(_EPOCH),
    }),
    UnfenceBroker: ("unfence_broker", {
        "request_id": _REQUEST_ID, "broker_id": _BROKER_ID, "broker_epoch": _Optional(_EPOCH),
    }),
    BeginControlledShutdown: ("begin_controlled_shutdown", {
        "request_id": _REQUEST_ID, "broker_id": _BROKER_ID, "broker_epoch": _Optional(_EPOCH),
    }),
    CreateTopic: ("create_topic", {
        "request_id": _REQUEST_ID, "name": _NAME, "topic_id": _Str(0, 64),
        "partitions": _COUNT, "replication_factor": _COUNT, "config": _ConfigMap(),
        "placement_offset": _OFFSET,
    }),
    CreateTopics: ("create_topics", {
        "request_id": _REQUEST_ID, "topics": _SpecsKind(_SPEC, MAX_TOPICS_PER_BATCH),
    }),
    DeleteTopic: ("delete_topic", {
        "request_id": _REQUEST_ID, "name": _NAME, "topic_id": _Optional(_Str(0, 64)),
    }),
    AlterTopicConfig: ("alter_topic_config", {
        "request_id": _REQUEST_ID, "name": _NAME, "set_configs": _ConfigMap(),
        "delete_configs": _Tuple(_Str(1, 255)),
    }),
    AddPartitions: ("add_partitions", {
        "request_id": _REQUEST_ID, "name": _NAME, "new_total": _COUNT,
        "placement_offset": _OFFSET,
    }),
    ElectLeaders: ("elect_leaders", {
        "request_id": _REQUEST_ID, "topic": _NAME, "partition": _Optional(_INDEX),
        "kind": _Choice(ELECTION_KINDS),
    }),
    AlterIsr: ("alter_isr", {
        "request_id": _REQUEST_ID, "topic": _NAME, "partition": _INDEX, "leader": _BROKER_ID,
        "leader_epoch": _EPOCH, "new_isr": _BROKER_IDS, "partition_epoch": _EPOCH,
    }),
    ReassignReplicas: ("reassign_replicas", {
        "request_id": _REQUEST_ID, "topic": _NAME, "partition": _INDEX,
        "replicas": _BROKER_IDS,
    }),
    SetMetadataVersion: ("set_metadata_version", {
        "request_id": _REQUEST_ID, "level": _Int(1, MAX_METADATA_VERSION),
    }),
    Read: ("read", {"request_id": _REQUEST_ID, "name": _Optional(_NAME)}),
    NoOp: ("no_op", {"request_id": _REQUEST_ID}),
}

_BY_NAME: Final[dict[str, type[Any]]] = {name: cls for cls, (name, _) in _SCHEMA.items()}
_LEVEL: Final[dict[type[Any], int]] = dict.fromkeys(_SCHEMA, FORMAT_VERSION)
_LEVEL[CreateTopics] = BATCH_CREATE_VERSION
# [lowest, highest] decodable: level 2 brings both CreateTopics and batch entries.
_SUPPORTED: list[int] = [FORMAT_VERSION, max(BATCH_CREATE_VERSION, BATCHED_ENTRIES_VERSION)]


def supported_metadata_versions() -> tuple[int, int]:
    """``(lowest, highest)`` metadata version this software decodes."""
    return _SUPPORTED[0], _SUPPORTED[1]


def register_command(cls: type[Any], name: str, kinds: dict[str, Any], *, level: int) -> None:
    """Add a command kind introduced at metadata version ``level`` (the next one).

    The extension point a release uses for a new kind; the version-skew tests
    use it to build "the next release" (:mod:`streambus_consensus.testing.next_level`).
    ``kinds`` maps each dataclass field, in order, to its field kind.
    """
    if name in _BY_NAME or cls in _SCHEMA:
        raise ValueError(f"command {name!r} is already registered")
    if level != _SUPPORTED[1] + 1 and level > _SUPPORTED[1]:
        raise ValueError(f"metadata version {level} skips {_SUPPORTED[1] + 1}")
    _SCHEMA[cls] = (name, kinds)
    _check_schema_matches_classes()
    _BY_NAME[name] = cls
    _LEVEL[cls] = level
    _SUPPORTED[1] = max(_SUPPORTED[1], level)


def command_level(command: Command) -> int:
    """The metadata version a command needs: that of its kind."""
    level = _LEVEL.get(type(command))
    if level is None:
        raise CodecError(f"not a metadata command: {type(command).__name__}")
    return level


def _check_schema_matches_classes() -> None:
    # Keeps the schema table and the dataclasses from drifting apart. The
    # order of the fields is the wire order: changing it needs a new FORMAT_VERSION.
    for cls, (name, kinds) in _SCHEMA.items():
        names = [f.name for f in fields(cls)]
        if names != list(kinds):
            raise TypeError(f"schema of {name} lists {list(kinds)}, class has {names}")


_check_schema_matches_classes()


def command_type(command: Command) -> str:
    """The wire name of a command's type, e.g. ``"create_topic"``."""
    spec = _SCHEMA.get(type(command))
    if spec is None:
        raise CodecError(f"not a metadata command: {type(command).__name__}")
    return spec[0]


def encode_command(command: Command) -> bytes:
    """Encode a command for the log.

    Raises :class:`~streambus_consensus.errors.CodecError` when it is not a
    command or a field has the wrong type or is out of range, so a command
    that could not be decoded is never proposed.
    """
    spec = _SCHEMA.get(type(command))
    if spec is None:
        raise CodecError(f"not a metadata command: {type(command).__name__}")
    name, kinds = spec
    body = [kind.to_wire(getattr(command, key), f"{name}.{key}") for key, kind in kinds.items()]
    return codec.encode((_LEVEL[type(command)], name, *body))


def decode_command(data: bytes) -> Command:
    """Decode bytes made by :func:`encode_command`.

    Raises :class:`~streambus_consensus.errors.UnsupportedMetadataVersionError`
    (a :class:`~streambus_consensus.errors.CodecError`) when the command is of
    a metadata version above this software's, and CodecError for malformed
    bytes, an unknown command type or one not of the version it claims, a
    missing, extra or mistyped field, or an out-of-range value.
    """
    value = codec.decode(data)
    if type(value) is not tuple or len(value) < 2:
        raise CodecError("a command is a (version, type, fields...) tuple")
    version, name = value[0], value[1]
    if type(version) is not int or not 1 <= version <= MAX_METADATA_VERSION:
        raise CodecError(f"invalid command metadata version {version!r}")
    if version > _SUPPORTED[1]:
        raise UnsupportedMetadataVersionError(
            f"command {name!r}" if type(name) is str else "a command", version,
            supported_metadata_versions())
    if type(name) is not str or name not in _BY_NAME:
        raise CodecError(f"unknown command type {name!r}")
    cls = _BY_NAME[name]
    if _LEVEL[cls] != version:
        raise CodecError(f"{name} is a metadata version {_LEVEL[cls]} command, "
                         f"not version {version}")
    kinds = _SCHEMA[cls][1]
    if len(value) != 2 + len(kinds):
        raise CodecError(
            f"{name}: expected {len(kinds)} fields ({', '.join(kinds)}), got {len(value) - 2}"
        )
    kwargs = {
        key: kind.from_wire(item, f"{name}.{key}")
        for (key, kind), item in zip(kinds.items(), value[2:], strict=True)
    }
    command: Command = cls(**kwargs)
    return command

