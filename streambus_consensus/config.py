"""Node configuration: one dataclass, documented defaults, explicit validation.

Validation never uses ``assert`` (``python -O`` strips it): every rule raises
:class:`~streambus_consensus.errors.ConfigError` naming the field, quoting the
bad value and stating the rule, cross-field rules included.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["NodeConfig", "parse_address", "validate_member"]

_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MIN_SECRET_LENGTH = 16
FRAME_ENVELOPE_BYTES = 64 * 1024
"""Room in a frame for the message's own fields around its entries or chunk."""
INIT_HINT = "run 'streambus-consensus cluster init' to make a secret and every node's config"
_PATH_FIELDS = ("data_dir", "tls_cert_file", "tls_key_file", "tls_ca_file")


def parse_address(address: str, *, field_name: str = "address") -> tuple[str, int]:
    """Split ``"host:port"`` (``"[v6]:port"`` for IPv6) into host and port.

    Raises :class:`ConfigError` when it is not of that form or the port is not
    in 1..65535.
    """
    if not isinstance(address, str) or ":" not in address:
        raise ConfigError(field_name, address, "must be 'host:port'")
    host, _, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ConfigError(field_name, address, "host part is empty")
    if not port_text.isascii() or not port_text.isdigit():
        raise ConfigError(field_name, address, "port must be an integer")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ConfigError(field_name, address, "port must be in 1..65535")
    return host, port


def validate_member(node_id: object, address: object,
                    members: dict[str, str] | None = None) -> tuple[str, str]:
    """Check a new member's id and cluster address before it goes near the log.

    ``node_id`` must be a valid node id (see :attr:`NodeConfig.node_id`),
    ``address`` ``host:port`` with the port in 1..65535, and, when the
    current ``members`` are given, no member may already have that id or
    that address. Returns ``(node_id, address)``; raises :class:`ConfigError`
    naming the bad value. A membership change is applied on every node's
    Raft thread, so a bad one must be refused here, where it is typed.
    """
    if not isinstance(node_id, str) or not _NODE_ID.fullmatch(node_id):
        raise ConfigError("node_id", node_id, "must be 1-64 characters of [A-Za-z0-9_.-], "
                                              "starting with a letter or digit")
    if not isinstance(address, str):
        raise ConfigError("address", address, "must be 'host:port'")
    host, port = parse_address(address, field_name="address")
    if any(c.isspace() for c in host) or "," in host or "=" in host:
        raise ConfigError("address", address, "host part has spaces, ',' or '='")
    for member, existing in (members or {}).items():
        if member == node_id:
            raise ConfigError("node_id", node_id, f"is already a member (at {existing})")
        try:
            same = parse_address(existing) == (host, port)
        except ConfigError:
            same = False  # a member's own address is checked where it was added
        if same:
            raise ConfigError("address", address, f"is the address of member {member!r}")
    return node_id, address


@dataclass(kw_only=True)
class NodeConfig:
    """Everything a consensus node needs to know. Build it with keywords,
    from a TOML file (:meth:`from_toml`), or from a dict (:meth:`from_dict`),
    then call :meth:`validate` (nodes call it for you).

    Times are in seconds.
    """

    node_id: str
    """This node's id: 1-64 characters of ``[A-Za-z0-9_.-]``, starting with a
    letter or digit. Must be a key of ``cluster``."""

    cluster: dict[str, str]
    """Every voting member at first start, ``{node_id: "host:port"}``, this
    node included. After a membership change the log is authoritative."""

    bind_address: str | None = None
    """Where to listen for cluster traffic. ``None`` (default) binds this
    node's own address from ``cluster``; never an implicit ``0.0.0.0``."""

    data_dir: str | None = None
    """Directory for the log, term/vote and snapshots. ``None`` (default)
    keeps everything in memory: state is lost when the process exits."""

    cluster_secret: str | None = None
    """Shared secret that authenticates all cluster traffic and every API
    request (HMAC-SHA256), at least 16 characters. Required: there is no
    unauthenticated mode, on loopback either. ``streambus-consensus cluster
    init`` makes one (and every node's config file)."""

    election_timeout_min: float = 0.4
    """Lower bound of the randomized election timeout."""

    election_timeout_max: float = 0.8
    """Upper bound of the randomized election timeout."""

    heartbeat_interval: float = 0.1
    """How often a leader sends heartbeats; also the transport ping interval."""

    leader_stepdown_timeout: float | None = None
    """A leader that has heard from no majority for this long steps down.
    ``None`` (default) means ``election_timeout_max``."""

    tick_interval: float = 0.05
    """Longest the Raft thread waits for network events between ticks."""

    batch_appends: bool = False
    """``False`` (default): send each proposal to followers at once (lowest
    latency). ``True``: wait for the next heartbeat and send them together."""

    max_append_bytes: int = 1 << 20
    """Most bytes of entries sent in one append message."""

    max_pending_proposals: int = 100_000
    """Proposals queued on this node before new ones fail with QueueFullError."""

    max_batch_commands: int = 256
    """Most commands coalesced into one log entry. Proposals queued at the same
    moment share an entry (one fsync, one round trip) when the state machine
    allows it; a batch also stays under ``max_command_bytes``. ``1`` turns
    coalescing off."""

    proposal_timeout: float = 5.0
    """Default timeout of a blocking proposal."""

    learner_catchup_timeout: float = 30.0
    """How long a node added with ``members add`` may take, as a non-voting
    learner, to catch up with the leader before the add is refused and the
    learner removed (leader side; give every node the same value). A
    learner that answers and keeps up is promoted to voter at once."""

    learner_max_lag: int = 1000
    """A learner is promoted to voter once its last acknowledged entry is at
    most this many entries behind the leader's commit index (about one
    heartbeat of writes at this engine's peak rate; etcd promotes at 90 % of
    the log). ``0`` waits for a learner that has everything committed."""

    snapshot_interval_entries: int = 10_000
    """Take a snapshot and compact the log after this many entries."""

    snapshot_interval_seconds: float = 3600.0
    """...or after this long, whichever comes first."""

    snapshot_chunk_bytes: int = 1 << 20
    """Size of the pieces a snapshot is sent to a lagging follower in."""

    max_command_bytes: int = 1 << 20
    """Largest command a proposal may carry; larger ones are refused with
    :class:`~streambus_consensus.errors.CommandTooLargeError` before they
    reach the log. Also bounds what a peer may send (see
    :attr:`max_frame_bytes`)."""

    peer_frame_timeout: float = 5.0
    """Once the first byte of a frame from a peer has arrived, the whole frame
    must arrive within this long, or the connection is dropped: a peer that
    trickles cannot hold a buffer open."""

    connect_retry_interval: float = 0.2
    """Wait between attempts to (re)connect to a peer."""

    fast_failover: bool = True
    """When a follower finds its leader's address refusing connections (the
    leader's process is gone), ask for pre-votes at once instead of waiting
    out the election timeout; it campaigns only if a majority agrees. Safe: it
    only starts an election."""

    fsync: bool = True
    """Make the log durable before acknowledging (default). ``False`` keeps
    writes in the page cache: survives a process crash, not a power loss."""

    broker_session_timeout: float = 9.0
    """Metadata: a broker that has not heartbeated for this long is fenced by
    the leader (KRaft's default). Brokers should heartbeat every ~2 s."""

    bootstrap_metadata_version: int | None = None
    """Metadata: the metadata version (feature level) a new cluster starts
    at. The first leader of a pristine cluster (empty log, no snapshot)
    writes it as the log's first command, so every node finalizes the same
    version from the replicated log. An existing cluster never reads it
    again: its version changes only with ``features upgrade``. ``None``
    (default) means the newest version this software reads; ``cluster
    init`` writes the number (``--metadata-version`` sets a lower one, for a
    cluster some of whose nodes will run an older release). Must be a
    version this software reads."""

    api_address: str | None = None
    """Where this node serves its HTTP API (JSON, every request signed with
    the cluster secret) and Prometheus ``/metrics``, e.g.
    ``"127.0.0.1:9101"``. ``None`` (default) serves nothing."""

    tls_cert_file: str | None = None
    """PEM certificate chain of this node, presented to peers (both when it
    dials and when it is dialled) and to API clients. Needed by
    ``peer_tls`` and ``api_tls``."""

    tls_key_file: str | None = None
    """PEM private key of ``tls_cert_file``."""

    tls_ca_file: str | None = None
    """PEM bundle of the CA(s) that peers' certificates, and API clients'
    certificates when ``api_client_cert_required``, must chain to."""

    peer_tls: bool = False
    """Encrypt cluster traffic with mutual TLS (1.2 or newer): each side
    presents ``tls_cert_file`` and verifies the other's against
    ``tls_ca_file``, the dialler also checks the certificate names the
    peer's host. The cluster-secret handshake still runs inside TLS as the
    membership check. Every member must agree."""

    api_tls: bool = False
    """Serve the HTTP API (and ``/metrics``) over TLS with ``tls_cert_file``."""

    api_client_cert_required: bool = True
    """With ``api_tls``: refuse API clients (``/metrics`` scrapers included)
    that present no certificate signed by ``tls_ca_file``."""

    api_max_connections: int = 1024
    """API connections served at once. Past it a new connection is answered
    ``503`` with ``Retry-After`` and closed. Keep it well under the process's
    open-file limit (``ulimit -n``), which peers and storage share."""

    api_max_in_flight: int = 256
    """API requests handled at once (waiting for Raft included). Past it a
    request is answered ``503`` with ``Retry-After``; its connection stays open."""

    api_handler_threads: int = 8
    """Threads that run the API routes that block (membership changes,
    snapshots, status) and build large ``/v1/watch`` answers. The hot routes
    and the long polls of ``/v1/watch`` never occupy one while they wait:
    they run on the API's event loop and await Raft or the change feed."""

    api_request_timeout: float = 10.0
    """Longest a client may take to send one whole request (line, headers and
    body), and a TLS handshake: a client sending a byte at a time is cut off.
    Handling the request is not bounded by it."""

    api_idle_timeout: float = 10.0
    """A kept-alive API connection idle for longer is closed."""

    def __post_init__(self) -> None:
        if isinstance(self.cluster, dict):
            self.cluster = dict(self.cluster)

    @property
    def effective_stepdown_timeout(self) -> float:
        """``leader_stepdown_timeout``, with its default resolved."""
        if self.leader_stepdown_timeout is None:
            return self.election_timeout_max
        return self.leader_stepdown_timeout

    @property
    def secret(self) -> str:
        """``cluster_secret``, which :meth:`validate` requires; a
        :class:`ConfigError` saying how to make one when it is missing."""
        if not self.cluster_secret:
            raise ConfigError("cluster_secret", None, f"is required; {INIT_HINT}")
        return self.cluster_secret

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame accepted from a peer, derived from what a peer may
        legitimately send: an append of ``max_append_bytes`` plus one
        command that overshoots it, or one snapshot chunk, plus envelope.
        Larger frames are refused from their length header, before any of
        their bytes are buffered."""
        return (max(self.max_append_bytes + self.max_command_bytes, self.snapshot_chunk_bytes)
                + FRAME_ENVELOPE_BYTES)

    @property
    def effective_bind_address(self) -> str:
        """``bind_address``, with its default resolved."""
        return self.bind_address or self.cluster[self.node_id]

    def clone(self, **changes: Any) -> NodeConfig:
        """A deep copy, with ``changes`` applied."""
        twin = copy.deepcopy(self)
        for name, value in changes.items():
            if name not in _FIELD_NAMES:
                raise ConfigError(name, value, "unknown config field")
            setattr(twin, name, copy.deepcopy(value))
        return twin

    def validate(self) -> NodeConfig:
        """Check every rule; raise :class:`ConfigError` on the first broken one."""
        if not isinstance(self.node_id, str) or not _NODE_ID.fullmatch(self.node_id):
            raise ConfigError(
                "node_id", self.node_id,
                "must be 1-64 characters of [A-Za-z0-9_.-], starting with a letter or digit",
            )
        if not isinstance(self.cluster, dict) or not self.cluster:
            raise ConfigError("cluster", self.cluster, "must map at least one node id to host:port")
        seen: dict[tuple[str, int], str] = {}
        for member, address in self.cluster.items():
            if not isinstance(member, str) or not _NODE_ID.fullmatch(member):
                raise ConfigError(f"cluster[{member!r}]", member,
                                  "member id is not a valid node id")
            key = parse_address(address, field_name=f"cluster[{member!r}]")
            if key in seen:
                raise ConfigError(
                    f"cluster[{member!r}]", address, f"same address as member {seen[key]!r}"
                )
            seen[key] = member
        if self.node_id not in self.cluster:
            raise ConfigError(
                "node_id + cluster", self.node_id,
                f"node_id must be one of the cluster members {sorted(self.cluster)}",
            )
        parse_address(self.effective_bind_address, field_name="bind_address")
        if self.cluster_secret is None:
            raise ConfigError("cluster_secret", None, f"is required; {INIT_HINT}")
        if not isinstance(self.cluster_secret, str) or len(self.cluster_secret) < MIN_SECRET_LENGTH:
            raise ConfigError(
                "cluster_secret", "<redacted>",
                f"must be a string of at least {MIN_SECRET_LENGTH} characters; {INIT_HINT}",
            )
        self._check_positive("election_timeout_min", "election_timeout_max",
                             "heartbeat_interval", "tick_interval", "proposal_timeout",
                             "snapshot_interval_seconds", "connect_retry_interval",
                             "broker_session_timeout", "peer_frame_timeout",
                             "api_request_timeout", "api_idle_timeout",
                             "learner_catchup_timeout")
        if self.election_timeout_min <= 3 * self.heartbeat_interval:
            raise ConfigError(
                "election_timeout_min + heartbeat_interval",
                (self.election_timeout_min, self.heartbeat_interval),
                "election_timeout_min must exceed 3 x heartbeat_interval",
            )
        if self.election_timeout_max <= self.election_timeout_min:
            raise ConfigError(
                "election_timeout_max + election_timeout_min",
                (self.election_timeout_max, self.election_timeout_min),
                "election_timeout_max must exceed election_timeout_min",
            )
        if self.tick_interval > self.heartbeat_interval:
            raise ConfigError(
                "tick_interval + heartbeat_interval", (self.tick_interval, self.heartbeat_interval),
                "tick_interval must not exceed heartbeat_interval",
            )
        stepdown_value = self.leader_stepdown_timeout
        if stepdown_value is not None and (isinstance(stepdown_value, bool)
                                           or not isinstance(stepdown_value, int | float)):
            raise ConfigError("leader_stepdown_timeout", stepdown_value, "must be a number")
        for name in ("fsync", "batch_appends", "fast_failover", "peer_tls", "api_tls",
                     "api_client_cert_required"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name), "must be true or false")
        stepdown = self.effective_stepdown_timeout
        if not (2 * self.heartbeat_interval <= stepdown <= 2 * self.election_timeout_max):
            raise ConfigError(
                "leader_stepdown_timeout", stepdown,
                "must be between 2 x heartbeat_interval and 2 x election_timeout_max",
            )
        for name, low in (("max_append_bytes", 1024), ("max_pending_proposals", 1),
                          ("learner_max_lag", 0),
                          ("max_batch_commands", 1),
                          ("snapshot_interval_entries", 2), ("snapshot_chunk_bytes", 1024),
                          ("max_command_bytes", 1024), ("api_max_connections", 1),
                          ("api_max_in_flight", 1), ("api_handler_threads", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(name, value, f"must be an integer >= {low}")
        if self.api_address is not None:
            parse_address(self.api_address, field_name="api_address")
        self._check_bootstrap_metadata_version()
        self._check_tls()
        return self

    def _check_bootstrap_metadata_version(self) -> None:
        level = self.bootstrap_metadata_version
        if level is None:
            return
        # Imported here: the metadata package builds on this module.
        from .metadata.commands import supported_metadata_versions

        low, high = supported_metadata_versions()
        if isinstance(level, bool) or not isinstance(level, int) or not low <= level <= high:
            raise ConfigError("bootstrap_metadata_version", level,
                              f"must be a metadata version this software reads ({low}..{high})")

    def _check_tls(self) -> None:
        for name in ("tls_cert_file", "tls_key_file", "tls_ca_file"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(name, value, "must be a non-empty path")
        users = [name for name in ("peer_tls", "api_tls") if getattr(self, name)]
        if self.api_tls and self.api_address is None:
            raise ConfigError("api_tls + api_address", None,
                              "api_tls needs an api_address to serve")
        for name in ("tls_cert_file", "tls_key_file", "tls_ca_file"):
            if users and getattr(self, name) is None:
                raise ConfigError(f"{users[0]} + {name}", None,
                                  f"{users[0]} needs {name}; 'streambus-consensus cluster "
                                  "init --tls' makes a CA and certificates for a local cluster")

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not 0 < value < math.inf):
                raise ConfigError(name, value, "must be a finite number > 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeConfig:
        """Build from a mapping with the field names as keys; unknown keys are refused."""
        unknown = sorted(set(data) - _FIELD_NAMES)
        if unknown:
            raise ConfigError(unknown[0], data[unknown[0]], "unknown config field")
        for required in ("node_id", "cluster"):
            if required not in data:
                raise ConfigError(required, None, "is required")
        if not isinstance(data["cluster"], dict):
            raise ConfigError("cluster", data["cluster"], "must map node ids to host:port")
        return cls(**data)

    @classmethod
    def from_toml(cls, path: str | Path) -> NodeConfig:
        """Load from a TOML file: top-level keys are field names, ``[cluster]``
        is a table of ``node_id = "host:port"``. Relative ``data_dir`` and
        ``tls_*_file`` paths are resolved against the file's directory. Also accepts
        ``cluster_secret_file`` (a path whose stripped contents are the secret).
        """
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError("config file", str(path), f"cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError("config file", str(path), "is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config file", str(path), f"is not valid TOML: {exc}") from None
        secret_file = data.pop("cluster_secret_file", None)
        if secret_file is not None:
            if not isinstance(secret_file, str):
                raise ConfigError("cluster_secret_file", secret_file, "must be a path string")
            secret_path = path.parent / secret_file
            try:
                data["cluster_secret"] = secret_path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    "cluster_secret_file", str(secret_path), f"cannot be read: {exc.strerror}"
                ) from None
            except UnicodeDecodeError:
                raise ConfigError("cluster_secret_file", str(secret_path),
                                  "is not UTF-8 text") from None
        for name in _PATH_FIELDS:
            if isinstance(data.get(name), str) and data[name]:
                data[name] = str((path.parent / data[name]).resolve())
        return cls.from_dict(data)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(NodeConfig))
