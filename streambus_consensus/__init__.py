"""streambus_consensus: replicated metadata for the StreamBus broker, agreed through Raft.

The public surface is re-exported here; everything else is internal.
"""

from .config import NodeConfig
from .errors import (
    CodecError,
    CommandRefusedError,
    CommandTooLargeError,
    ConfigError,
    ConsensusError,
    CorruptStorageError,
    LeadershipLostError,
    NodeStoppedError,
    NoLeaderError,
    NotLeaderError,
    OutcomeUnknownError,
    ProposalDiscardedError,
    ProposalRejectedError,
    ProposalTimeoutError,
    QueueFullError,
    RequestDeniedError,
    StorageError,
    TransportError,
)
from .interfaces import (
    ConsistentSnapshotter,
    LogEntry,
    Node,
    NodeState,
    NodeStatus,
    PeerStatus,
    StateMachine,
    Storage,
    Transport,
)
from .raft import DiskStorage, MemoryStorage, RaftNode, TcpTransport

__all__ = [
    "CodecError",
    "CommandRefusedError",
    "CommandTooLargeError",
    "ConfigError",
    "ConsensusError",
    "ConsistentSnapshotter",
    "CorruptStorageError",
    "DiskStorage",
    "LeadershipLostError",
    "LogEntry",
    "MemoryStorage",
    "NoLeaderError",
    "Node",
    "NodeConfig",
    "NodeState",
    "NodeStatus",
    "NodeStoppedError",
    "NotLeaderError",
    "OutcomeUnknownError",
    "PeerStatus",
    "ProposalDiscardedError",
    "ProposalRejectedError",
    "ProposalTimeoutError",
    "QueueFullError",
    "RaftNode",
    "RequestDeniedError",
    "StateMachine",
    "Storage",
    "StorageError",
    "TcpTransport",
    "Transport",
    "TransportError",
]
