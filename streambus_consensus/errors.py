"""The one exception tree of streambus_consensus.

Every error raised by this package derives from :class:`ConsensusError`. Each
carries a ``retriable`` flag: ``True`` means the same call may succeed if made
again (after a short wait, or on the node named by ``leader_hint``), ``False``
means that repeating it unchanged will fail the same way.

Proposal failures are split by what the caller knows about the outcome:

- :class:`ProposalRejectedError` and its subclasses: the command was **not**
  applied. Retrying is safe even for non-idempotent commands.
- :class:`OutcomeUnknownError` and its subclasses: the command may or may not
  have been applied. Retry only with an idempotent command (the metadata
  commands carry a request id for exactly this).

Refusals by the state machine itself (for example "topic already exists") are
:class:`CommandRefusedError`: the command *was* committed and applied, and the
state machine answered no.
"""

from __future__ import annotations

__all__ = [
    "CodecError",
    "CommandRefusedError",
    "CommandTooLargeError",
    "ConfigError",
    "ConsensusError",
    "CorruptStorageError",
    "EngineCompatibilityError",
    "LeadershipLostError",
    "MemberNotCaughtUpError",
    "NoLeaderError",
    "NodeStoppedError",
    "NotLeaderError",
    "OutcomeUnknownError",
    "ProposalDiscardedError",
    "ProposalRejectedError",
    "ProposalTimeoutError",
    "QueueFullError",
    "ReplicaHaltError",
    "RequestDeniedError",
    "StorageError",
    "TransportError",
    "UnsupportedMetadataVersionError",
]


class ConsensusError(Exception):
    """Base of every error raised by streambus_consensus.

    Attributes:
        retriable: whether the same call may succeed if repeated.
        node_id: the node that raised it, when known.
    """

    retriable: bool = False

    def __init__(self, message: str, *, node_id: str | None = None) -> None:
        super().__init__(message)
        self.node_id = node_id


class ConfigError(ConsensusError, ValueError):
    """A configuration value, or a combination of values, is invalid.

    Attributes:
        field: the offending field name (``"a + b"`` for a cross-field rule).
        value: the offending value, quoted in the message.
    """

    def __init__(self, field: str, value: object, rule: str) -> None:
        super().__init__(f"invalid config {field}={value!r}: {rule}")
        self.field = field
        self.value = value
        self.rule = rule


class CodecError(ConsensusError, ValueError):
    """Bytes could not be decoded (malformed, truncated, too large, unknown version)."""


class UnsupportedMetadataVersionError(CodecError):
    """Data needs a metadata version (feature level) this software cannot read.

    A log entry, snapshot or upgrade request written for a newer release.
    On a running replica it stops the node (see :class:`ReplicaHaltError`);
    in a data dir it keeps the node from starting. Run a release whose
    supported range includes ``required``.

    Attributes:
        required: the metadata version the data needs.
        supported: ``(lowest, highest)`` metadata version this software reads.
    """

    def __init__(self, what: str, required: int, supported: tuple[int, int]) -> None:
        super().__init__(
            f"{what} needs metadata version {required}; this software supports "
            f"{supported[0]}..{supported[1]} (run a release that supports {required})")
        self.required = required
        self.supported = supported


class ReplicaHaltError(ConsensusError):
    """This replica cannot apply a committed log entry, so its node stops.

    Applying something else (or nothing) in its place would let this replica
    diverge from the others without a word; stopping is the safe answer
    (fail-stop). The entry is undecodable by this software: written at a
    metadata version it does not know, or damaged. The node's process exits
    non-zero; fix the software (or the data) and restart it.

    Attributes:
        index: the log index of the entry.
    """

    def __init__(self, index: int, reason: str, *, node_id: str | None = None) -> None:
        super().__init__(f"cannot apply log entry {index}: {reason}; stopping this replica "
                         "rather than diverge", node_id=node_id)
        self.index = index


class StorageError(ConsensusError):
    """The data directory could not be read or written."""


class CorruptStorageError(StorageError):
    """A file in the data directory is damaged. The node refuses to start.

    Attributes:
        path: the damaged file.
        offset: byte offset of the damage, when known.
    """

    def __init__(self, path: str, detail: str, *, offset: int | None = None) -> None:
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{path}: {detail}{where}; refusing to start on a damaged data dir")
        self.path = path
        self.offset = offset
        self.detail = detail


class EngineCompatibilityError(ConsensusError, ImportError):
    """The installed PySyncObj lacks an internal the adapter relies on.

    Raised when :mod:`streambus_consensus.raft.engine` is imported; the message
    names the first missing attribute, method, message field or option and
    the feature that needs it.
    """


class TransportError(ConsensusError):
    """The cluster transport could not bind, or was misconfigured."""


class NodeStoppedError(ConsensusError):
    """The node is not running (never started, or already stopped)."""


class ProposalRejectedError(ConsensusError):
    """The proposal was not applied. Retrying is safe."""

    retriable = True


class NotLeaderError(ProposalRejectedError):
    """This node is not the leader and could not forward the proposal.

    Attributes:
        leader_hint: id of the node believed to lead, or ``None``.
    """

    def __init__(
        self, message: str, *, leader_hint: str | None = None, node_id: str | None = None
    ) -> None:
        super().__init__(message, node_id=node_id)
        self.leader_hint = leader_hint


class NoLeaderError(ProposalRejectedError):
    """No leader is known (an election is in progress or the quorum is lost)."""


class QueueFullError(ProposalRejectedError):
    """The node's proposal queue is full; back off and retry."""


class ProposalDiscardedError(ProposalRejectedError):
    """The entry was overwritten by a new leader before it committed."""


class CommandTooLargeError(ProposalRejectedError):
    """The command is larger than ``max_command_bytes``; it was not proposed.
    Retrying the same command cannot succeed."""

    retriable = False


class RequestDeniedError(ConsensusError):
    """The engine refused the request (for example a second membership change
    while one is in flight, or removing the node itself)."""

    retriable = True


class OutcomeUnknownError(ConsensusError):
    """The proposal may or may not have been applied.

    Retry only with an idempotent command (same request id).
    """

    retriable = True


class ProposalTimeoutError(OutcomeUnknownError):
    """No outcome arrived within the timeout."""


class LeadershipLostError(OutcomeUnknownError):
    """Leadership changed while the proposal was in flight."""


class CommandRefusedError(ConsensusError):
    """The state machine applied the command and refused it.

    Attributes:
        code: a stable machine-readable reason, e.g. ``"topic_exists"``.
    """

    def __init__(self, code: str, message: str, *, node_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}", node_id=node_id)
        self.code = code


class MemberNotCaughtUpError(CommandRefusedError):
    """A node added with ``add_member`` did not catch up as a learner.

    New members join as non-voting learners; the leader promotes one to voter
    once it has nearly all of the log, and removes it again when it has not
    caught up within ``learner_catchup_timeout`` (nothing answers at its
    address, its process stopped, or it is too slow). The cluster's voters and
    quorum are as before the call (the learner's entries were committed, and
    so was its removal: a refusal, with the code ``member_not_caught_up``).
    Start the node (with the cluster secret and the current members plus
    itself in its ``[cluster]``) and add it again.

    Attributes:
        member: the id of the node that was not added.
        reason: why, as the leader saw it.
    """

    def __init__(self, member: str, reason: str, *, node_id: str | None = None) -> None:
        super().__init__("member_not_caught_up", f"not adding {member}: {reason}; it was "
                         "removed again and the voters are unchanged", node_id=node_id)
        self.member = member
        self.reason = reason
