"""Immutable typed records of the cluster metadata: brokers, topics, partitions.

Every record is a frozen dataclass with slots. Records are never changed in
place: the state machine builds a new record and swaps it in, so a reader that
holds a record (or a whole :class:`~streambus_consensus.metadata.fsm.MetadataImage`)
always sees a consistent value.

Topic configuration uses Kafka's key names (``retention.ms``, ``segment.bytes``,
``min.insync.replicas``, ``cleanup.policy``, ``compression.type``); the
:class:`TopicConfig` fields are their typed, validated form.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from ..errors import ConfigError

__all__ = [
    "CLEANUP_POLICIES",
    "COMPRESSION_TYPES",
    "TOPIC_CONFIG_KEYS",
    "Broker",
    "BrokerState",
    "Partition",
    "Topic",
    "TopicConfig",
]

CLEANUP_POLICIES: Final = ("compact", "compact,delete", "delete")
"""Accepted ``cleanup.policy`` values (``"delete,compact"`` is normalised to
``"compact,delete"``)."""

COMPRESSION_TYPES: Final = ("gzip", "lz4", "none", "producer", "snappy", "zstd")
"""Accepted ``compression.type`` values."""

TOPIC_CONFIG_KEYS: Final = (
    "cleanup.policy",
    "compression.type",
    "min.insync.replicas",
    "retention.ms",
    "segment.bytes",
)
"""The topic configuration keys this package knows, sorted."""

_INTEGER_TEXT: Final = re.compile(r"-?[0-9]{1,19}")
_INT32_MAX: Final = 2**31 - 1
_INT64_MAX: Final = 2**63 - 1
_MIN_SEGMENT_BYTES: Final = 14  # Kafka's LegacyRecord.RECORD_OVERHEAD_V0
_MAX_REPLICATION_FACTOR: Final = 32767  # Kafka's replication factor is an int16

# Kafka key -> (field name, kind, minimum, maximum); kind "int" or "str".
_UNKNOWN_KEY: Final = f"unknown topic config key; known: {list(TOPIC_CONFIG_KEYS)}"

_KEYS: Final[Mapping[str, tuple[str, str, int, int]]] = {
    "retention.ms": ("retention_ms", "int", -1, _INT64_MAX),
    "segment.bytes": ("segment_bytes", "int", _MIN_SEGMENT_BYTES, _INT32_MAX),
    "min.insync.replicas": ("min_insync_replicas", "int", 1, _MAX_REPLICATION_FACTOR),
    "cleanup.policy": ("cleanup_policy", "str", 0, 0),
    "compression.type": ("compression", "str", 0, 0),
}


class BrokerState(enum.Enum):
    """Where a broker stands, with readable names (``str(BrokerState.ACTIVE) == "active"``).

    Only ``ACTIVE`` brokers lead partitions, join ISRs and receive new replicas.
    """

    ACTIVE = "active"
    """Registered, heartbeating, eligible for leadership and placement."""
    FENCED = "fenced"
    """Registered but not trusted: just registered, or missed its session
    timeout. Leads nothing; removed from every ISR it is not the last member of."""
    SHUTTING_DOWN = "shutting_down"
    """In controlled shutdown: leadership and ISR membership moved away as for
    ``FENCED``, but the broker is still up and finishing its work."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Broker:
    """A registered broker."""

    broker_id: int
    """Cluster-unique id, ``0 <= broker_id < 2**31``."""
    endpoint: str
    """Where clients reach it, ``"host:port"`` (``"[v6]:port"`` for IPv6)."""
    rack: str | None
    """Failure domain used to spread replicas, or ``None`` when unknown."""
    incarnation_id: str
    """UUID (canonical lowercase text) of the broker process that registered.
    A restart registers a new incarnation."""
    broker_epoch: int
    """The log offset of the registration, as in KRaft: it grows with every
    new incarnation, so requests from an older incarnation can be refused."""
    state: BrokerState
    """Active, fenced or in controlled shutdown."""

    @property
    def is_active(self) -> bool:
        """Whether the broker may lead, join ISRs and receive new replicas."""
        return self.state is BrokerState.ACTIVE


@dataclass(frozen=True, slots=True)
class TopicConfig:
    """A topic's validated configuration. Defaults follow Kafka's.

    Build one from Kafka-style string settings with :meth:`updated`. Direct
    construction validates every field and raises
    :class:`~streambus_consensus.errors.ConfigError` quoting the bad value.
    """

    retention_ms: int = 7 * 24 * 3600 * 1000
    """``retention.ms``: how long records are kept; default 7 days
    (604800000); ``-1`` keeps them forever."""
    segment_bytes: int = 1 << 30
    """``segment.bytes``: size of one log segment file; default 1 GiB, at least 14."""
    min_insync_replicas: int = 1
    """``min.insync.replicas``: ISR size below which ``acks=all`` writes are
    refused; default 1; never more than the topic's replication factor."""
    cleanup_policy: str = "delete"
    """``cleanup.policy``: ``"delete"`` (default), ``"compact"`` or ``"compact,delete"``."""
    compression: str = "producer"
    """``compression.type``: ``"producer"`` (default: keep what the producer
    sent), ``"none"``, ``"gzip"``, ``"snappy"``, ``"lz4"`` or ``"zstd"``."""

    def __post_init__(self) -> None:
        for key, (name, _kind, _lo, _hi) in _KEYS.items():
            value = getattr(self, name)
            if _parse(key, value) != value:
                raise ConfigError(key, value, "must be given in its normalised form")

    def get(self, key: str) -> int | str:
        """The value of a Kafka key, e.g. ``config.get("retention.ms")``.

        Raises :class:`~streambus_consensus.errors.ConfigError` for an unknown key.
        """
        spec = _KEYS.get(key)
        if spec is None:
            raise ConfigError(key, None, _UNKNOWN_KEY)
        value: int | str = getattr(self, spec[0])
        return value

    def to_dict(self) -> dict[str, int | str]:
        """Every setting under its Kafka key, in sorted key order."""
        return {key: self.get(key) for key in TOPIC_CONFIG_KEYS}

    def overrides(self) -> dict[str, int | str]:
        """Only the settings that differ from the defaults, under their Kafka keys."""
        default = _DEFAULT.to_dict()
        return {k: v for k, v in self.to_dict().items() if default[k] != v}

    def updated(
        self, set_configs: Mapping[str, str | int], delete_configs: Iterable[str] = ()
    ) -> TopicConfig:
        """A copy with ``set_configs`` applied and ``delete_configs`` reset to defaults.

        Values may be typed (``7``) or Kafka-style text (``"7"``). Raises
        :class:`~streambus_consensus.errors.ConfigError` for an unknown key, a
        badly typed or out-of-range value, or a key both set and deleted.
        """
        changes: dict[str, Any] = {}
        deleted = list(delete_configs)
        for key in deleted:
            if key not in _KEYS:
                raise ConfigError(key, None, _UNKNOWN_KEY)
            if key in set_configs:
                raise ConfigError(key, set_configs[key], "is both set and deleted")
            changes[_KEYS[key][0]] = getattr(_DEFAULT, _KEYS[key][0])
        for key, value in set_configs.items():
            parsed = _parse(key, value)
            changes[_KEYS[key][0]] = parsed
        return replace(self, **changes) if changes else self


def _parse(key: str, value: object) -> int | str:
    """Validate and normalise one setting; raise ConfigError quoting it."""
    spec = _KEYS.get(key)
    if spec is None:
        raise ConfigError(key, value, _UNKNOWN_KEY)
    _name, kind, lo, hi = spec
    if kind == "int":
        number: int
        if type(value) is int:
            number = value
        elif isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):
            number = int(value.strip())
        else:
            raise ConfigError(key, value, "must be an integer")
        if not lo <= number <= hi:
            raise ConfigError(key, value, f"must be in {lo}..{hi}")
        return number
    if not isinstance(value, str):
        raise ConfigError(key, value, "must be a string")
    text = value.strip().lower()
    if key == "cleanup.policy":
        parts = sorted({part.strip() for part in text.split(",")})
        text = ",".join(parts)
        if text not in CLEANUP_POLICIES:
            raise ConfigError(key, value, f"must be one of {list(CLEANUP_POLICIES)}")
    elif text not in COMPRESSION_TYPES:
        raise ConfigError(key, value, f"must be one of {list(COMPRESSION_TYPES)}")
    return text


_DEFAULT: Final = TopicConfig()


@dataclass(frozen=True, slots=True)
class Topic:
    """A topic. Its partitions are kept beside it, as a tuple per topic."""

    name: str
    """1-249 characters of ``[a-zA-Z0-9._-]``, not ``"."`` or ``".."``."""
    topic_id: str
    """UUID (canonical lowercase text) chosen by the proposer; a topic deleted
    and created again under the same name gets a new id."""
    config: TopicConfig
    """The topic's configuration."""
    partition_count: int
    """Number of partitions, numbered ``0..partition_count - 1``. Only grows."""
    replication_factor: int
    """Number of replicas of every partition."""


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition of a topic: where its replicas live and who leads it."""

    topic: str
    """Name of the topic it belongs to."""
    index: int
    """Partition number within the topic, from 0."""
    replicas: tuple[int, ...]
    """Broker ids holding a copy, distinct; the first is the preferred leader."""
    isr: tuple[int, ...]
    """In-sync replicas: a non-empty subset of ``replicas``, in replica order."""
    leader: int | None
    """The broker that leads it, a member of ``isr``; ``None`` when offline."""
    leader_epoch: int
    """Grows by one (or more) each time the leader changes; never decreases."""
    partition_epoch: int
    """Grows with every change of this partition; never decreases."""
    recovering: bool = False
    """``True`` after an unclean election (the ISR was reset to the new leader,
    which may lack acknowledged records) until the leader next changes the ISR."""

    @property
    def is_offline(self) -> bool:
        """Whether the partition has no leader."""
        return self.leader is None
