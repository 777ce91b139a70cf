"""The pluggable parts of a consensus node, as small ``typing.Protocol`` s.

- :class:`StateMachine`: what the Raft log drives. Deterministic.
- :class:`Storage`: where the Raft log, term/vote and snapshots live.
- :class:`Transport`: how nodes reach each other.
- :class:`Node`: what an application holds to propose and observe.

Optional capabilities are separate small protocols
(:class:`BatchApplier`, :class:`Bootstrapper`, :class:`ConsistentSnapshotter`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .config import NodeConfig

__all__ = [
    "BatchApplier",
    "Bootstrapper",
    "ConsistentSnapshotter",
    "LogEntry",
    "Node",
    "NodeState",
    "NodeStatus",
    "PeerStatus",
    "RecoveredState",
    "StateMachine",
    "Storage",
    "Transport",
]


class NodeState(enum.Enum):
    """The Raft role of a node, with readable names (``str(NodeState.LEADER) == "leader"``)."""

    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    LEADER = "leader"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value


@runtime_checkable
class StateMachine(Protocol):
    """The replicated state, driven by committed log entries.

    ``apply`` must be deterministic: the same commands in the same order give
    the same state and results on every node. It runs on the Raft thread and
    must be quick; it must not raise for a command it refuses (return the
    refusal as a value instead). The node that proposed a command receives
    ``apply``'s return value as the proposal's result.
    """

    def apply(self, command: bytes) -> Any:
        """Apply one committed command and return its result."""
        ...

    def snapshot(self) -> bytes:
        """Serialize the whole state."""
        ...

    def restore(self, data: bytes) -> None:
        """Replace the whole state with one produced by :meth:`snapshot`."""
        ...


@runtime_checkable
class BatchApplier(Protocol):
    """Optional: a state machine whose commands may share one log entry.

    The node coalesces proposals queued at the same moment into one entry
    (see :mod:`streambus_consensus.raft.batch`) only while
    ``batching_allowed()`` is true, which must mean that every replica, now
    and later, reads the envelope (a release without it cannot). Each
    command is applied in order by ``apply_batch``, with the same guarantees
    as ``apply``, and gets its own result.
    """

    def batching_allowed(self) -> bool:
        """Whether a batch entry may be written now (read on the Raft thread)."""
        ...

    def apply_batch(self, index: int, commands: Sequence[bytes]) -> list[Any]:
        """Apply the commands of the entry at ``index`` in order; one result each."""
        ...


@runtime_checkable
class Bootstrapper(Protocol):
    """Optional: a state machine whose new cluster starts with a command of its own.

    When a node becomes leader of a pristine cluster (its log holds no
    command and it has no snapshot: since a leader's log holds every
    committed entry, nothing was ever committed), it appends this command
    right after its election no-op, before any other proposal can reach the
    log. So the first command every replica applies is this one (as
    Kafka's first controller writes its bootstrap records). A node that
    restarts on existing data never appends it: what it set is in the log.
    """

    def bootstrap_command(self, config: NodeConfig) -> bytes | None:
        """The command for a new cluster of nodes configured as ``config``
        (``None``: none). Called once, when the node starts."""
        ...


@runtime_checkable
class ConsistentSnapshotter(Protocol):
    """Optional: a state machine that can capture its state cheaply.

    ``prepare_snapshot`` runs on the Raft thread and must be fast (for example
    grab references to immutable maps); the returned function runs on a
    background thread and produces the same bytes ``snapshot()`` would have
    produced at the moment of the capture. Large states implement this so that
    snapshots never stall heartbeats.
    """

    def prepare_snapshot(self) -> Callable[[], bytes]:
        """Capture the current state; return a function that serializes it."""
        ...


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One Raft log entry: its position, the term it was created in, and its bytes."""

    index: int
    term: int
    data: bytes


@dataclass(frozen=True, slots=True)
class RecoveredState:
    """What a :class:`Storage` holds when it is opened."""

    entries: list[LogEntry]
    """The log, in index order (empty for a new node)."""
    term: int
    """The latest term this node has seen."""
    voted_for: str | None
    """Who this node voted for in ``term``."""
    commit_index: int
    """The highest index known committed when last persisted (a hint; may lag)."""


class Storage(Protocol):
    """Durable home of the Raft log, term/vote and the latest snapshot.

    Mutations may be buffered; :meth:`sync` makes every earlier mutation
    durable, and the node calls it before it reports anything that depends on
    them (a vote, an append acknowledgement, a commit). One ``sync`` covers
    all mutations since the previous one, so fsyncs are grouped.
    """

    snapshot_path: str
    """File through which the engine stages snapshot transfers."""

    def open(self) -> RecoveredState:
        """Load and verify what is stored. Raises ``CorruptStorageError``."""
        ...

    def append(self, entry: LogEntry) -> None:
        """Append one entry after the current last entry."""
        ...

    def truncate_suffix(self, from_index: int) -> None:
        """Remove every entry with ``index >= from_index``."""
        ...

    def compact(self, first_index: int) -> None:
        """Remove every entry with ``index < first_index`` (covered by a snapshot)."""
        ...

    def set_term(self, term: int, voted_for: str | None) -> None:
        """Record the current term and vote."""
        ...

    def set_commit_index(self, index: int) -> None:
        """Record the commit index (a restart hint; may be persisted lazily)."""
        ...

    def sync(self) -> None:
        """Make every earlier mutation durable."""
        ...

    def save_snapshot(self, data: bytes) -> None:
        """Atomically and durably replace the snapshot file with ``data``."""
        ...

    def load_snapshot(self) -> bytes | None:
        """The snapshot file's bytes, or ``None`` when there is none."""
        ...

    def close(self) -> None:
        """Flush and release files. Idempotent."""
        ...


class Transport(Protocol):
    """How a node reaches its peers.

    Messages are plain data (see :mod:`streambus_consensus.codec`). Messages
    passed to :meth:`send` are held until :meth:`release`, which the node calls
    after :meth:`Storage.sync`, so no peer ever sees a vote or acknowledgement
    that is not yet durable. The one exception is a message sent with
    ``ahead=True`` (a leader's ``append_entries``, which asserts nothing about
    the sender's disk): :meth:`release_ahead`, called before the sync, lets it
    out if nothing else is held before it for that peer.
    """

    def start(
        self,
        on_message: Callable[[str, Mapping[str, Any]], None],
        on_connected: Callable[[str], None],
        on_disconnected: Callable[[str], None],
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        """Bind and begin connecting; deliver events through the callbacks.

        ``on_refused`` (optional) reports a peer whose address refused a
        connection outright: its process is not running.
        """
        ...

    def add_peer(self, node_id: str, address: str) -> None:
        """Start talking to a new peer."""
        ...

    def remove_peer(self, node_id: str) -> None:
        """Stop talking to a peer and drop its connections."""
        ...

    def send(self, node_id: str, message: Mapping[str, Any], *, ahead: bool = False) -> bool:
        """Queue a message; ``False`` when the peer is not connected."""
        ...

    def release(self) -> None:
        """Let every queued message go out."""
        ...

    def release_ahead(self) -> None:
        """Let out, per peer, the queued ``ahead`` messages that no other
        queued message precedes."""
        ...

    def connected_peers(self) -> frozenset[str]:
        """Peers with a live outgoing connection."""
        ...

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` for network events and deliver them (Raft thread)."""
        ...

    def wake(self) -> None:
        """Make a :meth:`poll` in progress return early (any thread)."""
        ...

    def close(self) -> None:
        """Close every socket. Idempotent."""
        ...


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """What a node knows about one peer."""

    node_id: str
    address: str
    connected: bool
    match_index: int | None
    """Highest entry known replicated there (leader only)."""
    next_index: int | None
    """Next entry the leader will send there (leader only)."""
    role: str = "voter"
    """``"voter"``, or ``"learner"`` for a member still catching up (it
    receives the log but does not vote)."""


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """A consistent-enough picture of a node, for status pages and tests."""

    node_id: str
    state: NodeState
    leader_id: str | None
    term: int
    commit_index: int
    applied_index: int
    last_log_index: int
    log_entries: int
    has_quorum: bool
    peers: tuple[PeerStatus, ...] = field(default=())
    members: tuple[str, ...] = field(default=())
    """Voting members, this node included unless it is a learner."""
    learners: tuple[str, ...] = field(default=())
    """Members that receive the log but do not vote yet (see ``add_member``)."""


class Node(Protocol):
    """A consensus node as the application sees it."""

    @property
    def node_id(self) -> str:
        """This node's id."""
        ...

    def start(self) -> None:
        """Open storage, bind the transport and start the Raft thread."""
        ...

    def stop(self) -> None:
        """Stop gracefully: finish the current tick, sync, close. Idempotent."""
        ...

    def propose(self, command: bytes, timeout: float | None = None) -> Any:
        """Replicate ``command`` and return the state machine's result."""
        ...

    def propose_async(self, command: bytes) -> Future[Any]:
        """Like :meth:`propose`, returning a future instead of blocking."""
        ...

    @property
    def is_leader(self) -> bool:
        """Whether this node currently believes it leads."""
        ...

    @property
    def leader_id(self) -> str | None:
        """The node this node believes leads, or ``None``."""
        ...

    @property
    def state(self) -> NodeState:
        """This node's Raft role."""
        ...

    @property
    def term(self) -> int:
        """The current Raft term."""
        ...

    @property
    def commit_index(self) -> int:
        """Highest log index known committed."""
        ...

    @property
    def applied_index(self) -> int:
        """Highest log index applied to the state machine."""
        ...

    def wait_for_leader(self, timeout: float) -> str:
        """Block until a leader is known; return its id."""
        ...

    def status(self) -> NodeStatus:
        """A snapshot of this node's Raft status."""
        ...

