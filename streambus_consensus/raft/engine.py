"""The one module that talks to PySyncObj.

Everything PySyncObj-shaped (camelCase, integer failure codes, ``Node``
objects, its ``Journal`` and ``Transport`` base classes) stays in here; the
rest of the package sees :class:`Engine`, a small snake_case wrapper.

How we plug into PySyncObj 0.3.17 without forking it:

- **No tick thread of its own.** ``SyncObj`` is built with ``autoTick=False``
  and :class:`Engine.tick` is driven by :class:`~.node.RaftNode`'s thread, so
  the state machine and journal exist before the first tick (trap 5) and
  every call into the engine happens on that one thread.
- **Journal.** ``SyncObj.__init__`` creates its journal through the module
  function ``pysyncobj.syncobj.createJournal``; during construction (under a
  lock) we point it at :class:`_Journal`, which writes through our
  :class:`~streambus_consensus.interfaces.Storage`. Storage buffers the writes
  and the node syncs once per pass of its loop (group commit); nothing that
  asserts this node's disk leaves before that sync. A leader's
  ``append_entries`` asserts nothing about its disk and goes first, so the
  leader's write overlaps replication (see :meth:`Engine.tick` for why the
  leader still never counts an entry it has not synced).
- **Transport.** :class:`_EngineTransport` adapts our
  :class:`~streambus_consensus.interfaces.Transport`; it is where incoming
  messages pass through :class:`~.safety.MessageGuard` before the engine
  sees them.
- **Snapshots.** A custom ``serializer`` / ``deserializer`` /
  ``serializeChecker`` write our checksummed snapshot format (no pickle) on a
  background thread, so compaction never stalls heartbeats.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import pysyncobj.syncobj as _syncobj_module
from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.config import FAIL_REASON, SERIALIZER_STATE
from pysyncobj.journal import Journal
from pysyncobj.node import Node as _PsoNode
from pysyncobj.transport import Transport as _PsoTransport

from ..config import NodeConfig
from ..errors import (
    ConfigError,
    ConsensusError,
    CorruptStorageError,
    EngineCompatibilityError,
    LeadershipLostError,
    NoLeaderError,
    NotLeaderError,
    OutcomeUnknownError,
    ProposalDiscardedError,
    QueueFullError,
    RequestDeniedError,
)
from ..interfaces import LogEntry, NodeState, RecoveredState, Storage, Transport
from ..logutil import audit
from .prevote import PRE_VOTE, PRE_VOTE_RESPONSE, ElectionGate
from .readindex import READ_INDEX_MESSAGES, ReadIndex
from .safety import MessageGuard
from .snapshot import SnapshotHeader, pack_snapshot, unpack_snapshot

__all__ = ["APP_MESSAGE_PREFIX", "Engine", "Member", "check_engine_seam", "error_for",
           "learner_verdict"]

APP_MESSAGE_PREFIX = "app:"
"""Messages whose type starts with this travel beside Raft on the same
authenticated links and never reach the engine."""

logger = logging.getLogger(__name__)

_CONSTRUCT_LOCK = threading.Lock()
# A snapshot file's prefix holds its length and CRC: enough to tell two apart.
_SNAPSHOT_ID_BYTES = 24
_STATES = {0: NodeState.FOLLOWER, 1: NodeState.CANDIDATE, 2: NodeState.LEADER}
_VOTE_REQUESTS = frozenset(("request_vote", PRE_VOTE))
# Membership entries of our own, beside PySyncObj's "add" and "rem"; the
# names are part of the log format.
LEARNER_ADD, LEARNER_PROMOTE, LEARNER_REMOVE = "add_learner", "promote_learner", "remove_learner"
_LEARNER_CHANGES = frozenset((LEARNER_ADD, LEARNER_PROMOTE, LEARNER_REMOVE))


class Member(_PsoNode):  # type: ignore[misc]
    """A cluster member as PySyncObj sees it: id plus ``address``."""

    def __init__(self, node_id: str, address: str) -> None:
        super().__init__(node_id, address=address)


def error_for(code: int, *, node_id: str, leader_hint: str | None) -> ConsensusError:
    """Translate a PySyncObj ``FAIL_REASON`` into our error. The only place that does."""
    if code == FAIL_REASON.QUEUE_FULL:
        return QueueFullError("proposal queue is full", node_id=node_id)
    if code == FAIL_REASON.MISSING_LEADER:
        return NoLeaderError("no leader is known; election in progress?", node_id=node_id)
    if code == FAIL_REASON.DISCARDED:
        return ProposalDiscardedError(
            "entry was overwritten by a new leader before it committed", node_id=node_id
        )
    if code == FAIL_REASON.NOT_LEADER:
        return NotLeaderError(
            f"not the leader (leader: {leader_hint or 'unknown'})",
            leader_hint=leader_hint, node_id=node_id,
        )
    if code == FAIL_REASON.LEADER_CHANGED:
        return LeadershipLostError(
            "leadership changed while the proposal was in flight; outcome unknown",
            node_id=node_id,
        )
    if code == FAIL_REASON.REQUEST_DENIED:
        return RequestDeniedError("request denied by the Raft engine", node_id=node_id)
    return OutcomeUnknownError(f"outcome unknown (engine code {code})", node_id=node_id)


def learner_verdict(config: NodeConfig, *, match: int, commit: int, waited: float,
                    silent_for: float | None) -> tuple[str | None, str | None]:
    """What the leader does with a learner: ``(LEARNER_PROMOTE, None)``,
    ``(LEARNER_REMOVE, reason)`` or ``(None, None)`` (wait).

    ``match`` is the last entry it acknowledged (0: none), ``commit`` the
    leader's commit index, ``waited`` how long this leader has known it,
    ``silent_for`` how long since it last answered (``None``: never).
    Promoted when it acknowledged an entry within ``learner_max_lag`` of
    the commit index and answered within an election timeout; removed once
    ``learner_catchup_timeout`` has passed without that.
    """
    if (match > 0 and commit - match <= config.learner_max_lag
            and silent_for is not None and silent_for <= config.election_timeout_max):
        return LEARNER_PROMOTE, None
    if waited < config.learner_catchup_timeout:
        return None, None
    if silent_for is None:
        progress = "it never answered"
    elif match == 0:
        progress = "it acknowledged no entry"
    elif silent_for > config.election_timeout_max:
        progress = f"it has not answered for {silent_for:.3g}s"
    else:
        progress = (f"it had index {match}, {commit - match} entries behind the commit index "
                    f"{commit}; learner_max_lag is {config.learner_max_lag}")
    return LEARNER_REMOVE, f"it did not catch up as a learner within {waited:.3g}s ({progress})"


class _Journal(Journal):  # type: ignore[misc]
    """PySyncObj's journal interface over our Storage. Entries are (command, index, term)."""

    def __init__(self, storage: Storage, recovered: RecoveredState) -> None:
        self._storage = storage
        self._entries: list[tuple[bytes, int, int]] = [
            (e.data, e.index, e.term) for e in recovered.entries
        ]
        self._term = recovered.term
        self._voted_for = recovered.voted_for
        self._commit = recovered.commit_index
        self.durable_index = self._entries[-1][1] if self._entries else 0
        """The last log index known to be on disk (the log holds no later
        entry that a crash could not lose): the log's end at the last
        :meth:`mark_durable`, lowered by truncations since."""

    @property
    def undurable(self) -> bool:
        """Whether the log holds entries written since the last sync."""
        return bool(self._entries) and self._entries[-1][1] > self.durable_index

    def mark_durable(self) -> None:
        """Storage has just synced: everything in the log is on disk."""
        self.durable_index = self._entries[-1][1] if self._entries else 0

    def align_with_snapshot(self, header: SnapshotHeader) -> None:
        """Drop entries the snapshot covers, as compaction would have.

        A crash between writing a snapshot and compacting the log leaves a log
        that starts before the snapshot. PySyncObj then finds a first entry
        that differs from the snapshot's and clears the whole journal, losing
        the entries *after* the snapshot. Compacting here first avoids that.
        """
        prev_index = header.prev_entry[1]
        if self._entries and self._entries[0][1] < prev_index <= self._entries[-1][1]:
            drop = prev_index - self._entries[0][1]
            if self._entries[drop][2] == header.prev_entry[2]:
                del self._entries[:drop]
                self._storage.compact(prev_index)

    def add(self, command: bytes, idx: int, term: int) -> None:
        command = bytes(command)
        self._entries.append((command, idx, term))
        self._storage.append(LogEntry(idx, term, command))

    def clear(self) -> None:
        self._entries = []
        self.durable_index = 0
        self._storage.truncate_suffix(0)

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        if entryFrom < len(self._entries):
            index = self._entries[entryFrom][1]
            del self._entries[entryFrom:]
            self.durable_index = min(self.durable_index, index - 1)
            self._storage.truncate_suffix(index)

    def deleteEntriesTo(self, entryTo: int) -> None:
        if 0 < entryTo <= len(self._entries):
            first = (self._entries[entryTo][1] if entryTo < len(self._entries)
                     else self._entries[-1][1] + 1)
            del self._entries[:entryTo]
            self._storage.compact(first)

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        pass  # the node closes storage itself, after its last sync

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        if raftCommitIndex != self._commit:
            self._commit = raftCommitIndex
            self._storage.set_commit_index(raftCommitIndex)

    def getRaftCommitIndex(self) -> int:
        return max(self._commit, 1)

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        self._term, self._voted_for = term, votedForNodeId
        self._storage.set_term(term, votedForNodeId)

    def getCurrentTerm(self) -> int:
        return self._term

    def getVotedForNodeId(self) -> str | None:
        return self._voted_for

    def onOneSecondTimer(self) -> None:
        pass


class _EngineTransport(_PsoTransport):  # type: ignore[misc]
    """PySyncObj's transport interface over ours, with the message guard in front."""

    def __init__(self, transport: Transport, members: dict[str, Member], guard: MessageGuard,
                 app_handler: Callable[[str, Mapping[str, Any]], None] | None,
                 forward_wait: float):
        super().__init__(None, None, [])
        self._transport = transport
        self._members = members
        self._guard = guard
        self._app_handler = app_handler
        self._forward_wait = forward_wait
        self._unsent: list[tuple[str, dict[str, Any], float]] = []
        """Forwarded commands whose link to the leader was down (E20):
        (leader id, message, give-up time)."""
        self.gate: ElectionGate | None = None
        self.reads: ReadIndex | None = None
        self.engine: Engine | None = None

    def deliver(self, peer_id: str, message: Mapping[str, Any]) -> None:
        node = self._members.get(peer_id)
        if node is None:
            return
        kind = str(message.get("type", ""))
        if kind in _VOTE_REQUESTS and self._is_learner(peer_id):
            # A learner never campaigns; one whose log has not yet told it
            # that it is one is not heard.
            return
        if kind in READ_INDEX_MESSAGES:
            if self.reads is not None and self.engine is not None:
                self.reads.on_message(self.engine, peer_id, message)
            return
        if kind.startswith(APP_MESSAGE_PREFIX):
            if self._app_handler is not None:
                self._app_handler(peer_id, message)
            return
        gate, engine = self.gate, self.engine
        if gate is not None and engine is not None:
            if kind in (PRE_VOTE, PRE_VOTE_RESPONSE):
                gate.on_message(engine, peer_id, message)
                return
            term = message.get("term")
            if kind == "timeout_now" and isinstance(term, int):
                gate.allow_transfer(engine, peer_id, term)
            elif kind == "append_entries" and isinstance(term, int) and term < engine.term:
                gate.lower_term_leader(engine, peer_id, term)
        filtered = self._guard.inspect(node, dict(message))
        if filtered is not None:
            try:
                self._onMessageReceived(node, filtered)
            except Exception:
                logger.exception("engine failed on a %r message from %s; message dropped",
                                 message.get("type"), peer_id)
            if (gate is not None and engine is not None and kind == "append_entries"
                    and engine.leader_id == peer_id and engine.state is NodeState.FOLLOWER):
                gate.note_leader_contact(peer_id)

    def _is_learner(self, peer_id: str) -> bool:
        engine = self.engine
        return engine is not None and peer_id in engine._obj.learners

    def connected(self, peer_id: str) -> None:
        node = self._members.get(peer_id)
        if node is None:
            return
        # PySyncObj's read-only nodes are the ones its leader replicates to
        # without counting them for commit or elections: a learner is one.
        if self._is_learner(peer_id):
            self._onReadonlyNodeConnected(node)
        else:
            self._onNodeConnected(node)

    def disconnected(self, peer_id: str) -> None:
        node = self._members.get(peer_id)
        if node is None:
            return
        if self._is_learner(peer_id) and self.engine is not None:
            self._onReadonlyNodeDisconnected(node)
            self.engine._obj.cancel_transmission(node)
        else:
            self._onNodeDisconnected(node)

    @property
    def ready(self) -> bool:
        return True

    def tryGetReady(self) -> None:
        pass

    def waitReady(self) -> None:
        pass

    def addNode(self, node: Member) -> None:
        self._members[node.id] = node
        try:
            self._transport.add_peer(node.id, node.address)
        except ConfigError as exc:
            # A committed change with a bad address (written before members
            # were validated) must not stop every node that applies it: the
            # member counts as unreachable until an operator removes it.
            logger.error("member %s has an unusable address, not dialling it: %s", node.id, exc)

    def dropNode(self, node: Member) -> None:
        self._members.pop(node.id, None)
        self._transport.remove_peer(node.id)

    def send(self, node: Member, message: Any) -> bool:
        # Only a leader sends append_entries; they assert nothing about its
        # disk and may leave before its sync (write ordering, Engine.tick).
        ahead = message.get("type") == "append_entries"
        if self._transport.send(node.id, message, ahead=ahead):
            return True
        if message.get("type") == "apply_command":
            # Engine issue E20: the engine ignores a failed send of a command
            # it forwards to the leader; held here until the link is up.
            self._unsent.append((str(node.id), message,
                                 time.monotonic() + self._forward_wait))
        return False

    def resend_forwards(self, leader_id: str | None) -> None:
        """Send the held forwards (E20) once the link to their leader is up.

        A forward whose leader is no longer the leader, or whose link stayed
        down for ``forward_wait``, was never delivered, so never applied: its
        caller is told so (``NOT_LEADER``, retriable) through a response
        forged as if from that leader. The engine has already failed it with
        ``LEADER_CHANGED`` when it saw the leader change; then the forged
        response finds no caller and does nothing.
        """
        if not self._unsent:
            return
        now = time.monotonic()
        held, self._unsent = self._unsent, []
        for peer_id, message, give_up in held:
            if peer_id == leader_id and now < give_up:
                if self._unsent or not self._transport.send(peer_id, message):
                    self._unsent.append((peer_id, message, give_up))  # keep their order
            elif "request_id" in message:
                node = self._members.get(peer_id) or Member(peer_id, "")
                self._onMessageReceived(node, {
                    "type": "apply_command_response", "request_id": message["request_id"],
                    "error": FAIL_REASON.NOT_LEADER})

    def destroy(self) -> None:
        pass  # the node closes the transport itself


class _Consumer(SyncObjConsumer):  # type: ignore[misc]
    """Holds the one replicated method; method names are part of the log format."""

    def __init__(self, apply: Callable[[bytes], Any]) -> None:
        self._apply = apply
        super().__init__()

    @replicated  # type: ignore[untyped-decorator]
    def apply(self, command: bytes) -> Any:
        return self._apply(command)


class _SyncObj(SyncObj):  # type: ignore[misc]
    """``SyncObj`` with membership changes really limited to one at a time.

    Engine issue (PySyncObj 0.3.17): the leader's ``__changeCluster`` refuses
    a change while ``__changeClusterIDx`` (the previous change's index) is not
    yet applied, but nothing ever sets that field, so any number of
    membership entries can be uncommitted at once. Two concurrent
    ``members add`` calls took a 3-node cluster to 5 members in one step;
    configurations two changes apart can have disjoint majorities (``{1,2}``
    of ``{1,2,3}`` against ``{3,4,5}`` of ``{1..5}``), so two leaders could
    commit in the same term. Single-server changes are safe only one at a
    time (Ongaro's thesis, §4.1).

    Fix: remember ``(term, index)`` of the change this leader appended and
    refuse another (REQUEST_DENIED) until that index is applied. A change left
    by an earlier term needs no tracking: a new leader already waits for its
    no-op to be applied, which applies every earlier entry.

    Leadership transfer fix: after sending ``timeout_now`` PySyncObj keeps
    appending new commands, so under write load the target campaigns with a
    log shorter than the old leader's and the other nodes' and loses the vote
    (seen: 3 nodes under sequential writes, the old leader won the next term).
    The Raft thesis (§3.10) has the leader stop accepting new commands during
    a transfer; here they stay queued (not refused) from the first transfer
    request, so that a target refused for lagging catches up on the next
    round trip, until this node is no longer the leader or one maximum
    election timeout has passed; then PySyncObj forwards them to the new
    leader or appends them itself.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set before SyncObj.__init__ so PySyncObj counts them among its own fields.
        self._pending_change: tuple[int, int] | None = None
        self._transfer_deadline: float | None = None
        self._bootstrap_entry: bytes | None = None
        self._captured: list[bytes] | None = None
        self.learners: dict[str, Member] = {}
        """The other nodes that are learners (configuration, not connections)."""
        self.self_learner = False
        """Whether this node is a learner (or a learner that was removed): it
        never campaigns."""
        self.learner_refusals: dict[str, str] = {}
        """Why each learner removed for not catching up was removed."""
        self.sync_before_counting: Callable[[], None] | None = None
        """Makes the log durable; called when a lone voter has just become
        leader, before the same tick counts its log (see Engine.tick)."""
        super().__init__(*args, **kwargs)

    def encode_entry(self, propose: Callable[[], None]) -> bytes:
        """The log entry that ``propose()`` would queue, as PySyncObj encodes
        it (kind byte and call), without queueing it."""
        self._captured = []
        try:
            propose()
            [entry] = self._captured
        finally:
            self._captured = None
        return entry

    def _applyCommand(self, command: Any, callback: Any, commandType: Any = None) -> None:
        if self._captured is not None:
            self._captured.append(bytes(command) if commandType is None
                                  else bytes([commandType]) + bytes(command))
            return
        super()._applyCommand(command, callback, commandType)

    def _SyncObj__onBecomeLeader(self) -> None:  # overrides the private method
        """A new cluster's first command (the state machine's bootstrap
        command, :class:`~streambus_consensus.interfaces.Bootstrapper`) goes
        in right after the election no-op, in the same call: no proposal can
        be appended between them. Only on a pristine log (no command, no
        snapshot): a leader's log holds every committed entry, so then the
        cluster has committed nothing. A leader that finds an earlier
        leader's bootstrap command in its log commits that one instead.

        A lone voter wins its election inside _onTick, just before the commit
        computation of that same tick counts what was appended here: its log
        is synced first (write ordering, see Engine.tick).

        Engine issue E23: snapshot transmissions left from an earlier term of
        leadership start over. PySyncObj keeps how far it got sending its
        snapshot to each follower until that follower's link drops; a leader
        deposed mid-send and elected again resumed at the old position, into
        a file the follower had meanwhile restarted for another leader."""
        for node in self._SyncObj__otherNodes | self._SyncObj__readonlyNodes:
            self.cancel_transmission(node)
        SyncObj._SyncObj__onBecomeLeader(self)
        self._append_bootstrap()
        if not self.otherNodes and self.sync_before_counting is not None:
            self.sync_before_counting()

    def _append_bootstrap(self) -> None:
        entry = self._bootstrap_entry
        log = self._SyncObj__raftLog
        if entry is None or not len(log) or log[0][1] != 1:  # compacted: there is a snapshot
            return
        no_op = bytes([_syncobj_module._COMMAND_TYPE.NO_OP])
        if any(log[i][0][:1] != no_op for i in range(len(log))):
            return
        index = log[-1][1] + 1
        log.add(entry, index, self.raftCurrentTerm)
        logger.info("%s: new cluster: bootstrap command appended at index %d (term %d)",
                    self.selfNode.id, index, self.raftCurrentTerm)

    def transferLeadership(self, node: Any = None, callback: Any = None) -> None:
        started_hold = self._transfer_deadline is None and self._isLeader()
        if started_hold:
            self._transfer_deadline = time.monotonic() + self.conf.raftMaxTimeout

        def answered(result: Any, code: int) -> None:
            # Denied (the target lags): keep holding, the caller retries.
            if started_hold and code not in (FAIL_REASON.SUCCESS, FAIL_REASON.REQUEST_DENIED):
                self._transfer_deadline = None
            if callback is not None:
                callback(result, code)

        super().transferLeadership(node, callback=answered)

    def _checkCommandsToApply(self) -> None:
        if self._transfer_deadline is not None:
            if self._isLeader() and time.monotonic() < self._transfer_deadline:
                return  # hold new commands while the target campaigns
            self._transfer_deadline = None
        super()._checkCommandsToApply()

    # -- learners ------------------------------------------------------------------
    #
    # A learner is a member the leader replicates to (log and snapshots) that
    # counts for neither commit nor elections, and never campaigns. PySyncObj
    # has the replication half: its "read-only nodes", which its leader sends
    # entries to without counting them (``__readonlyNodes``), but that set
    # holds whichever read-only nodes are *connected*, and nothing replicates
    # it. Here the learner set is configuration, changed by membership log
    # entries of our own kinds (``LEARNER_ADD``, ``LEARNER_PROMOTE``,
    # ``LEARNER_REMOVE``). Like PySyncObj's own changes they take effect when
    # appended, are undone when a new leader truncates them, are replayed
    # from the log on restart and are kept in every snapshot's header; the
    # transport then reports a learner's link as a read-only node's.

    def _SyncObj__doChangeCluster(self, request: Any, reverse: bool = False) -> bool:
        kind = request[0]
        if kind not in _LEARNER_CHANGES:
            if kind == "add" and not reverse:
                self.learners.pop(str(request[1]), None)  # a voter is no learner
            return bool(SyncObj._SyncObj__doChangeCluster(self, request, reverse))
        node = request[2] if isinstance(request[2], Member) else Member(
            str(request[1]), str(getattr(request[2], "address", "")))
        if kind == LEARNER_ADD:
            return self._learner_leave(node) if reverse else self._learner_join(node)
        if kind == LEARNER_PROMOTE:
            return self._learner_demote(node) if reverse else self._learner_promote(node)
        if reverse:
            return self._learner_join(node)
        removed = self._learner_leave(node)
        if removed and len(request) > 3 and request[3]:
            self.learner_refusals[str(node.id)] = str(request[3])
        return removed

    def _is_self(self, node: Member) -> bool:
        return bool(node == self._SyncObj__selfNode)

    def _learner_join(self, node: Member) -> bool:
        if self._is_self(node):
            changed = not self.self_learner
            self.self_learner = True
            return changed
        if node.id in self.learners:
            return False
        if node in self._SyncObj__otherNodes:
            # Only a voter from this node's own config file, which lists the
            # members it was started with: the log says it is a learner.
            return self._learner_demote(node)
        self.learners[str(node.id)] = node
        self.learner_refusals.pop(str(node.id), None)
        self._SyncObj__transport.addNode(node)
        return True

    def _learner_leave(self, node: Member) -> bool:
        if self._is_self(node):
            return True  # removed: still no voter, so still never campaigns
        if self.learners.pop(str(node.id), None) is None:
            return False
        self._forget_progress(node)
        self._SyncObj__connectedNodes.discard(node)
        self._SyncObj__transport.dropNode(node)
        return True

    def _learner_promote(self, node: Member) -> bool:
        if self._is_self(node):
            if not self.self_learner:
                return False
            self.self_learner = False
            self._SyncObj__raftElectionDeadline = (time.monotonic()
                                                   + self._SyncObj__generateRaftTimeout())
            return True
        if self.learners.pop(str(node.id), None) is None:
            return False
        # Keep what the leader knows of its progress: counting it from zero
        # would hold back commits for a round trip.
        match = self._SyncObj__raftMatchIndex.get(node)
        next_index = self._SyncObj__raftNextIndex.get(node)
        self._SyncObj__readonlyNodes.discard(node)
        added = bool(SyncObj._SyncObj__doChangeCluster(self, ["add", node.id, node]))
        if match is not None and next_index is not None:
            self._SyncObj__raftMatchIndex[node] = match
            self._SyncObj__raftNextIndex[node] = next_index
        return added

    def _learner_demote(self, node: Member) -> bool:
        if self._is_self(node):
            self.self_learner = True
            return True
        if node not in self._SyncObj__otherNodes:
            return False
        self._SyncObj__otherNodes.discard(node)
        self.learners[str(node.id)] = node
        if node in self._SyncObj__connectedNodes:
            self._SyncObj__readonlyNodes.add(node)
        return True

    def _forget_progress(self, node: Member) -> None:
        self._SyncObj__readonlyNodes.discard(node)
        self._SyncObj__raftMatchIndex.pop(node, None)
        self._SyncObj__raftNextIndex.pop(node, None)
        self.cancel_transmission(node)

    def cancel_transmission(self, node: Member) -> None:
        """Forget a snapshot half sent to a learner that went away.

        PySyncObj cancels a voter's transmission at the next send after its
        link drops, but a read-only node leaves the set the leader sends to
        as soon as it disconnects, so its transmission would stay and, after
        a reconnect, resume mid-file: the learner, still holding the first
        half, would write a snapshot with a hole in it."""
        self._SyncObj__serializer.cancelTransmisstion(node)

    def set_learners(self, learners: Mapping[str, str], voters: Mapping[str, str]) -> None:
        """Take the learner set from a snapshot being loaded (its voters are
        set by PySyncObj right after)."""
        self_id = str(self._SyncObj__selfNode.id)
        if self_id in learners:
            self.self_learner = True
        elif self_id in voters:
            self.self_learner = False
        for node_id in [n for n in self.learners if n not in learners]:
            node = self.learners.pop(node_id)
            self._forget_progress(node)
            if node_id not in voters:
                self._SyncObj__connectedNodes.discard(node)
                self._SyncObj__transport.dropNode(node)
        for node_id, address in learners.items():
            if node_id != self_id:
                # A voter here (from the config file) leaves the voters now,
                # so PySyncObj, setting the snapshot's voters next, keeps its link.
                self._learner_join(Member(node_id, address))

    def propose_learner_change(self, kind: str, node: Member, reason: str | None,
                               callback: Callable[[Any, int], None]) -> None:
        """Queue a learner change; it is appended like PySyncObj's own
        membership changes, one at a time (see ``__changeCluster`` below)."""
        request: list[Any] = [kind, node.id, node]
        if reason is not None:
            request.append(reason)
        # PySyncObj's own format for membership entries, as its
        # addNodeToCluster writes them: every membership entry is a pickle the
        # engine loads itself when it applies one. We only ever write one here
        # (never load); entries arrive only over HMAC-authenticated member links.
        self._applyCommand(pickle.dumps(request), callback,
                           _syncobj_module._COMMAND_TYPE.MEMBERSHIP)

    def _SyncObj__changeCluster(self, request: Any) -> bool:  # overrides the private method
        pending = self._pending_change
        if (pending is not None and pending[0] == self.raftCurrentTerm
                and self.raftLastApplied < pending[1]):
            return False
        # The caller appends the entry right after us, at the next log index.
        index = self._SyncObj__raftLog[-1][1] + 1
        accepted = bool(SyncObj._SyncObj__changeCluster(self, request))
        if accepted:
            self._pending_change = (self.raftCurrentTerm, index)
        return accepted


class Engine:
    """A PySyncObj node, wired to our storage, transport and state machine.

    Every method must be called on the node's Raft thread, except the
    read-only properties, which read single attributes.
    """

    def __init__(
        self,
        config: NodeConfig,
        storage: Storage,
        transport: Transport,
        apply: Callable[[int, bytes], Any],
        snapshot_capture: Callable[[], Callable[[], bytes]],
        restore: Callable[[bytes], None],
        guard: MessageGuard,
        on_snapshot: Callable[[float, int], None] | None = None,
        app_handler: Callable[[str, Mapping[str, Any]], None] | None = None,
        on_restored: Callable[[], None] | None = None,
        gate: ElectionGate | None = None,
        send_now: Callable[[], None] | None = None,
        reads: ReadIndex | None = None,
        bootstrap: bytes | None = None,
    ) -> None:
        self._config = config
        self._learner_clock: dict[str, float] = {}
        """On the leader: when it first saw each learner (monotonic seconds)."""
        self._learner_change_term: int | None = None
        """The term in which this leader proposed a learner change whose
        outcome it awaits (a callback can be lost to a snapshot install, E10:
        a later term starts afresh)."""
        self._send_now = send_now
        self._announced_commit = 0
        self.long_applies = 0
        """Applies that took long enough to need the E19 measures."""
        self._storage = storage
        self._transport = transport
        self._apply_at = apply
        self._capture = snapshot_capture
        self._restore = restore
        self._on_snapshot = on_snapshot
        self._on_restored = on_restored
        self._snapshot_status = SERIALIZER_STATE.NOT_SERIALIZING
        self._snapshot_lock = threading.Lock()
        self.snapshot_error: BaseException | None = None
        self._load_failure: BaseException | None = None

        recovered = storage.open()
        journal = _Journal(storage, recovered)
        existing = storage.load_snapshot()
        if existing is None and recovered.entries and recovered.entries[0].index > 1:
            # The node compacts its log only behind a durable snapshot.
            raise CorruptStorageError(
                storage.snapshot_path, "missing, but the log was compacted to start at index "
                f"{recovered.entries[0].index}")
        self._stored_snapshot_id = b"" if existing is None else existing[:_SNAPSHOT_ID_BYTES]
        if existing is not None:
            header, _ = unpack_snapshot(existing, storage.snapshot_path)
            journal.align_with_snapshot(header)
            storage.sync()
        self._journal = journal

        members = {m: Member(m, a) for m, a in config.cluster.items()}
        self._self = members.pop(config.node_id)
        self._members = members
        self.guard = guard
        self._pso_transport = _EngineTransport(transport, members, guard, app_handler,
                                               forward_wait=config.election_timeout_max)
        self.gate = gate
        self._consumer = _Consumer(self._apply_entry)
        conf = SyncObjConf(
            autoTick=False,
            raftMinTimeout=config.election_timeout_min,
            raftMaxTimeout=config.election_timeout_max,
            appendEntriesPeriod=config.heartbeat_interval,
            leaderFallbackTimeout=config.effective_stepdown_timeout,
            connectionTimeout=max(config.election_timeout_max, 1.0),
            connectionRetryTime=config.connect_retry_interval,
            commandsQueueSize=config.max_pending_proposals,
            appendEntriesUseBatch=config.batch_appends,
            appendEntriesBatchSizeBytes=config.max_append_bytes,
            logCompactionMinEntries=config.snapshot_interval_entries,
            logCompactionMinTime=config.snapshot_interval_seconds,
            logCompactionBatchSize=config.snapshot_chunk_bytes,
            fullDumpFile=storage.snapshot_path,
            journalFile=None,
            dynamicMembershipChange=True,
            useFork=False,
            serializer=self._serialize,
            deserializer=self._deserialize,
            serializeChecker=self._serialize_checker,
            tcp_keepalive=None,
        )
        with _CONSTRUCT_LOCK:
            original = _syncobj_module.createJournal
            _syncobj_module.createJournal = lambda _path: journal
            try:
                self._obj = _SyncObj(
                    self._self, list(members.values()), conf,
                    consumers=[self._consumer], transport=self._pso_transport,
                )
            finally:
                _syncobj_module.createJournal = original
        if bootstrap is not None:
            self._obj._bootstrap_entry = self._obj.encode_entry(
                lambda: self._consumer.apply(bootstrap))
        self._obj.sync_before_counting = self.sync
        guard.attach(self)
        self._pso_transport.gate, self._pso_transport.engine = gate, self
        self._pso_transport.reads = reads

    # -- driving ----------------------------------------------------------------

    def tick(self) -> None:
        """Run one engine tick without waiting (network waits happen in the transport).

        Raises what a snapshot load raised (see :meth:`_deserialize`), and
        :class:`~streambus_consensus.errors.StorageError` from a sync.

        Write ordering: PySyncObj's leader computes its commit index at the
        top of its tick, counting itself for every entry in its log (``count
        = 1`` before it looks at the followers' match indexes). A leader
        sends ``append_entries`` before its own sync (Raft thesis §10.2.1),
        so its log may hold entries that are not durable; they must not be
        counted. So a tick starts from a durable log: the node syncs at the
        end of every pass, and if anything written since is still buffered,
        it is synced here first. Match indexes change only when a follower's
        acknowledgement is received, during the node's poll, after that
        sync; the leader appends during a tick only after the commit
        computation, or when a lone voter wins its election just before it
        (synced at once, see ``_SyncObj``). Hence the leader never counts an
        entry of its own that a crash could lose.
        """
        self._pso_transport.resend_forwards(self.leader_id)
        if self._journal.undurable:
            self.sync()
        self._obj.doTick(0.0)
        if self._load_failure is not None:
            raise self._load_failure

    def deliver(self, peer_id: str, message: Mapping[str, Any]) -> None:
        """Hand an incoming message to the engine (through the guard)."""
        self._pso_transport.deliver(peer_id, message)

    def peer_connected(self, peer_id: str) -> None:
        """Tell the engine a peer is reachable."""
        self._pso_transport.connected(peer_id)

    def peer_disconnected(self, peer_id: str) -> None:
        """Tell the engine a peer is unreachable."""
        if self.gate is not None:
            self.gate.leader_link_lost(peer_id)
        self._pso_transport.disconnected(peer_id)

    def before_tick(self) -> None:
        """Let the election gate (pre-vote) hold or release the election timer.

        A learner never campaigns: its timer is held a full election timeout
        ahead for as long as it is one."""
        if self._obj.self_learner:
            self.election_deadline = time.monotonic() + self._config.election_timeout_max
            return
        if self.gate is not None:
            self.gate.before_tick(self)

    def leader_unreachable(self, peer_id: str) -> bool:
        """``fast_failover``: ``peer_id``'s address refuses connections.

        If it is our leader, the gate starts a pre-vote at once instead of
        waiting for the election timer; the engine campaigns only if a
        majority agrees. Returns whether a pre-vote was started.
        """
        if self.gate is None or self._obj.self_learner:
            return False
        return self.gate.leader_unreachable(self, peer_id)

    def sync(self) -> None:
        """Make everything the engine wrote durable (:meth:`Storage.sync`).
        Raises :class:`~streambus_consensus.errors.StorageError`."""
        self._storage.sync()
        self._journal.mark_durable()

    def propose(self, command: bytes, callback: Callable[[Any, int], None]) -> None:
        """Queue a command (Raft thread: see E17 in docs/engine-issues.md).
        ``callback(result, fail_code)`` runs on the Raft thread."""
        self._consumer.apply(command, callback=callback)

    def destroy(self) -> None:
        """Release the engine (Raft thread, after the last tick)."""
        self._obj.destroy()

    # -- membership and leadership (Raft thread) ---------------------------------

    def add_learner(self, node_id: str, address: str, callback: Callable[[Any, int], None]) -> None:
        """Propose adding a learner: a member that receives the log but does
        not vote; :meth:`manage_learners` on the leader promotes or removes it."""
        self._obj.propose_learner_change(LEARNER_ADD, Member(node_id, address), None, callback)

    def remove_member(self, node_id: str, callback: Callable[[Any, int], None]) -> None:
        """Propose removing a voting member or a learner."""
        learner = self._obj.learners.get(node_id)
        if learner is not None:
            self._obj.propose_learner_change(LEARNER_REMOVE, learner, None, callback)
            return
        node = self._members.get(node_id)
        if node is None or node_id == self._self.id:
            callback(None, FAIL_REASON.REQUEST_DENIED)
            return
        self._obj.removeNodeFromCluster(node, callback=callback)

    def manage_learners(self) -> None:
        """The leader's duty (Raft thread, every pass): promote each learner
        whose last acknowledged entry is within ``learner_max_lag`` of the
        commit index and that answered within an election timeout; remove one
        that has not caught up ``learner_catchup_timeout`` after this leader
        first saw it, with the reason in the entry. One change at a time."""
        obj = self._obj
        if not obj.learners or not obj._isLeader():
            self._learner_clock.clear()
            return
        pending = obj._pending_change
        if (self._learner_change_term == self.term or not self.committed_in_term
                or (pending is not None and pending[0] == self.term
                    and self.applied_index < pending[1])):
            return
        now = time.monotonic()
        for node_id in [n for n in self._learner_clock if n not in obj.learners]:
            del self._learner_clock[node_id]
        for node_id, node in sorted(obj.learners.items()):
            since = self._learner_clock.setdefault(node_id, now)
            answered = obj._SyncObj__lastResponseTime.get(node)
            kind, reason = learner_verdict(
                self._config, match=int(obj._SyncObj__raftMatchIndex.get(node) or 0),
                commit=self.commit_index, waited=now - since,
                silent_for=None if answered is None else now - answered)
            if kind is not None:
                self._propose_learner_change(kind, node, reason)
                return

    def _propose_learner_change(self, kind: str, node: Member, reason: str | None) -> None:
        term = self._learner_change_term = self.term

        def done(_result: Any, code: int) -> None:
            if self._learner_change_term == term:
                self._learner_change_term = None
            if code != FAIL_REASON.SUCCESS:
                logger.info("%s: %s of %s not committed (engine code %d); will retry",
                            self.node_id, kind, node.id, code)
            elif kind == LEARNER_PROMOTE:
                audit(self.node_id, "promoted learner %s to voter", node.id)
            else:
                audit(self.node_id, "removed learner %s: %s", node.id, reason)

        self._obj.propose_learner_change(kind, node, reason, done)

    def learners(self) -> dict[str, str]:
        """Current learners ``{node_id: address}``, this node included if it is one
        (Raft thread)."""
        result = {node_id: str(node.address) for node_id, node in self._obj.learners.items()}
        if self._obj.self_learner:
            result[self.node_id] = str(self._self.address)
        return result

    def member_role(self, node_id: str) -> str | None:
        """``"voter"``, ``"learner"`` or ``None`` (not a member), as this node's
        configuration says (Raft thread)."""
        if node_id in self.learners():
            return "learner"
        return "voter" if node_id in self.members() else None

    def learner_refusal(self, node_id: str) -> str | None:
        """Why the leader removed learner ``node_id`` for not catching up, if it did."""
        return self._obj.learner_refusals.get(node_id)

    def transfer_leadership(
        self, node_id: str | None, callback: Callable[[Any, int], None]
    ) -> None:
        """Ask a caught-up follower to start an election now."""
        target = self._members.get(node_id) if node_id is not None else None
        if node_id is not None and target is None:
            callback(None, FAIL_REASON.REQUEST_DENIED)
            return
        self._obj.transferLeadership(target, callback=callback)

    def force_snapshot(self) -> None:
        """Take a snapshot and compact at the next opportunity."""
        self._obj.forceLogCompaction()

    def send(self, peer_id: str, message: dict[str, Any]) -> bool:
        """Queue a message to a peer (used by the guard to answer on the engine's behalf)."""
        return self._transport.send(peer_id, message)

    # -- reading state -----------------------------------------------------------

    @property
    def journal(self) -> _Journal:
        """The engine's log view (Raft thread)."""
        return self._journal

    @property
    def node_id(self) -> str:
        return str(self._self.id)

    @property
    def state(self) -> NodeState:
        # PySyncObj exposes its role only through getStatus(), which builds a
        # dict over every peer; this single attribute read is safe from any thread.
        return _STATES[self._obj._SyncObj__raftState]

    @property
    def leader_id(self) -> str | None:
        leader = self._obj._getLeader()
        return None if leader is None else str(leader.id)

    @property
    def term(self) -> int:
        return int(self._obj.raftCurrentTerm)

    @property
    def commit_index(self) -> int:
        return int(self._obj.raftCommitIndex)

    @property
    def applied_index(self) -> int:
        return int(self._obj.raftLastApplied)

    @property
    def last_log_index(self) -> int:
        return int(self._journal[-1][1]) if len(self._journal) else 0

    @property
    def last_log_term(self) -> int:
        return int(self._journal[-1][2]) if len(self._journal) else 0

    @property
    def log_entries(self) -> int:
        return len(self._journal)

    @property
    def committed_in_term(self) -> bool:
        """Whether the entry at the commit index is of the current term (Raft
        thread). A new leader knows its commit index only from then on (thesis
        §6.4); PySyncObj appends a no-op on election, so this comes within a
        round trip."""
        journal = self._journal
        if not len(journal):
            return False
        position = self.commit_index - int(journal[0][1])
        return 0 <= position < len(journal) and int(journal[position][2]) == self.term

    @property
    def election_deadline(self) -> float:
        """When the engine's election timer runs out (monotonic seconds).

        PySyncObj keeps it in a private field and has no call to read or move
        it; the election gate (pre-vote, :mod:`.prevote`) and E11 move it.
        """
        return float(self._obj._SyncObj__raftElectionDeadline)

    @election_deadline.setter
    def election_deadline(self, value: float) -> None:
        self._obj._SyncObj__raftElectionDeadline = value

    def forget_leader(self) -> None:
        """Drop the known leader, as PySyncObj does when it starts an election:
        forwarded proposals waiting for that leader's answer fail at once
        (``LEADER_CHANGED``) and new ones fail with ``MISSING_LEADER``."""
        self._obj._SyncObj__raftLeader = None
        self._obj._SyncObj__onLeaderChanged()

    def voters(self) -> list[str]:
        """The other voting members (Raft thread)."""
        return [str(n.id) for n in self._obj.otherNodes]

    @property
    def single_voter(self) -> bool:
        """Whether this node is the only voting member."""
        return not self._obj.otherNodes

    @property
    def has_quorum(self) -> bool:
        return bool(self._obj.hasQuorum)

    def members(self) -> dict[str, str]:
        """Current voting members, self included unless it is a learner (Raft thread)."""
        result = {str(n.id): str(n.address) for n in self._obj.otherNodes}
        if not self._obj.self_learner:
            result[self.node_id] = str(self._self.address)
        return result

    def replication(self) -> dict[str, tuple[int | None, int | None]]:
        """``{peer: (match_index, next_index)}`` as this node knows them, for
        voters and learners (Raft thread)."""
        status = self._obj.getStatus()
        out: dict[str, tuple[int | None, int | None]] = {}
        for node in [*self._obj.otherNodes, *self._obj.learners.values()]:
            out[str(node.id)] = (status.get(f"match_idx_server_{node.id}"),
                                 status.get(f"next_node_idx_server_{node.id}"))
        return out

    # -- state machine plumbing (Raft thread) -----------------------------------

    def _apply_entry(self, command: bytes) -> Any:
        """Engine issue E19: PySyncObj applies committed entries on the Raft
        thread before it sends the heartbeats that carry the new commit index.
        An entry whose apply takes longer than an election timeout (a broker
        fenced in a million partitions: seconds) therefore silences the leader
        for that long while the followers, who have not heard of the commit,
        sit idle: their timers run out and they elect a new leader. Then each
        follower applies it in turn, answers nothing meanwhile, and the leader
        steps down for lack of answers (check-quorum), or a follower campaigns
        the moment its apply ends. Here, (1) before the leader applies what a
        tick committed, it announces the new commit index and puts it on the
        wire, so every replica applies the entry at the same time instead of
        one after the other; (2) after an apply that took ``d`` seconds
        (longer than a quarter of the minimum election timeout), the node
        gives its peers ``d`` seconds of grace, as they are applying the same
        entry: a leader counts its followers as having answered ``d`` from
        now (check-quorum), a follower restarts its election timer ``d`` past
        a fresh timeout and counts the entry as contact from its leader
        (pre-vote stickiness). PySyncObj has no hook for either; the adapter
        moves its private deadline and response times, as for E11.
        """
        obj = self._obj
        index = obj.raftLastApplied + 1
        if (self._send_now is not None and obj._isLeader()
                and obj.raftCommitIndex > self._announced_commit):
            self._announced_commit = obj.raftCommitIndex
            obj._SyncObj__sendAppendEntries()
            self._send_now()
        started = time.monotonic()
        result = self._apply_at(index, command)
        took = time.monotonic() - started
        if took > self._config.election_timeout_min / 4:
            self._after_long_apply(took)
        return result

    def _after_long_apply(self, took: float) -> None:
        self.long_applies += 1
        obj = self._obj
        now = time.monotonic()
        if obj._isLeader():
            answered = obj._SyncObj__lastResponseTime
            for node in list(answered):
                answered[node] = max(answered[node], now + took)
            return
        self.election_deadline = max(self.election_deadline,
                                     now + took + obj._SyncObj__generateRaftTimeout())
        leader = self.leader_id
        if self.gate is not None and leader is not None:
            self.gate.note_leader_contact(leader, grace=took)

    def _serialize(self, _tmp_path: str, data: Any) -> None:
        last, prev, cluster = data
        learners = self.learners()
        header = SnapshotHeader(
            last_entry=(bytes(last[0]), int(last[1]), int(last[2])),
            prev_entry=(bytes(prev[0]), int(prev[1]), int(prev[2])),
            members=tuple(sorted((str(n.id), str(n.address)) for n in cluster
                                 if str(n.id) not in learners)),
            learners=tuple(sorted(learners.items())),
        )
        encode_later = self._capture()
        with self._snapshot_lock:
            self._snapshot_status = SERIALIZER_STATE.SERIALIZING
        threading.Thread(
            target=self._write_snapshot, args=(header, encode_later),
            name=f"snapshot-{self.node_id}", daemon=True,
        ).start()

    def _write_snapshot(self, header: SnapshotHeader, encode_later: Callable[[], bytes]) -> None:
        started = time.perf_counter()
        try:
            blob = pack_snapshot(header, encode_later())
            self._storage.save_snapshot(blob)
            self._stored_snapshot_id = blob[:_SNAPSHOT_ID_BYTES]
        except Exception as exc:
            logger.exception("%s: snapshot at index %d failed", self.node_id, header.last_index)
            self.snapshot_error = exc
            status = SERIALIZER_STATE.FAILED
        else:
            status = SERIALIZER_STATE.SUCCESS
            if self._on_snapshot is not None:
                self._on_snapshot(time.perf_counter() - started, len(blob))
            logger.info("%s: snapshot at index %d written (%d bytes)",
                        self.node_id, header.last_index, len(blob))
        with self._snapshot_lock:
            self._snapshot_status = status
        self._transport.wake()

    def _serialize_checker(self) -> int:
        with self._snapshot_lock:
            status = self._snapshot_status
            if status in (SERIALIZER_STATE.SUCCESS, SERIALIZER_STATE.FAILED):
                self._snapshot_status = SERIALIZER_STATE.NOT_SERIALIZING
            return int(status)

    def _restart_election_timer(self) -> None:
        """Engine issue E11: a snapshot load blocks the Raft thread for as long
        as the state takes to restore (seconds at a million partitions) while
        PySyncObj's election deadline, set before the load, runs out. With no
        pre-vote, the node then campaigns at the next tick and its higher term
        deposes a healthy leader. The snapshot came from the leader (or, at
        start, from our own disk, before any peer was heard), so the load
        counts as hearing from it: start a fresh randomized timeout.
        PySyncObj has no call for this; the adapter sets the deadline itself.
        """
        obj = getattr(self, "_obj", None)
        if obj is not None:
            self.election_deadline = time.monotonic() + obj._SyncObj__generateRaftTimeout()

    def _deserialize(self, path: str) -> tuple[Any, Any, Any]:
        """Engine issue E18: PySyncObj logs and swallows an exception from a
        snapshot load, then goes on with the state machine as it was and the
        log positioned after the snapshot (an install from the leader clears
        the log first): the replica silently diverges. A load that fails here
        (damaged bytes, a snapshot of a newer metadata version) therefore
        stops the node at the end of the tick instead (fail-stop)."""
        try:
            return self._load_snapshot(path)
        except Exception as exc:
            logger.critical("%s: cannot load snapshot %s, stopping the node: %s",
                            self.node_id, path, exc)
            self._load_failure = exc
            raise

    def _load_snapshot(self, path: str) -> tuple[Any, Any, Any]:
        with open(path, "rb") as f:
            blob = f.read()
        header, state = unpack_snapshot(blob, path)
        if blob[:_SNAPSHOT_ID_BYTES] != self._stored_snapshot_id:
            self._storage.save_snapshot(blob)  # an install: make it durable before using it
            self._stored_snapshot_id = blob[:_SNAPSHOT_ID_BYTES]
        self._restore(state)
        self._restart_election_timer()
        if self._on_restored is not None:
            self._on_restored()
        self._obj.set_learners(dict(header.learners), dict(header.members))
        cluster = [Member(node_id, address) for node_id, address in header.members]
        # Membership fix: a snapshot's member list is the one at the time it
        # was taken, and a leader may send an older snapshot than its own
        # membership: a node added after that snapshot, then elected, sends a
        # member list without itself. PySyncObj replaces the receiver's members
        # with that list; the receiver then drops the leader, whose connection
        # and messages our transport refuses from non-members, so it never
        # receives the entries after the snapshot that would add the leader
        # back (seen: a node added during a 3 -> 5 grow wedged for good).
        # The sender of an install is the current leader, which is in the
        # latest configuration (PySyncObj never lets a leader remove itself),
        # so keep it; the entries after the snapshot settle the rest.
        leader = self._obj._getLeader() if hasattr(self, "_obj") else None
        if leader is not None and leader != self._self and leader not in cluster:
            cluster.append(Member(str(leader.id), str(leader.address)))
        return header.last_entry, header.prev_entry, cluster


# -- the engine seam, checked at import ----------------------------------------------
#
# The adapter relies on PySyncObj internals that no API promises: name-mangled
# private fields and methods, the module global it builds its journal with,
# the fields of the messages it forges or rewrites, getStatus() keys, and the
# options SyncObjConf silently ignores when misspelled. pyproject.toml pins
# the version these were read from; if another version is installed anyway,
# a renamed internal must stop the import, not quietly disable a fix.

_TESTED_PYSYNCOBJ = "0.3.17"

_SEAM_METHODS = {
    # attribute of SyncObj: what relies on it
    "_SyncObj__changeCluster": "one membership change at a time (_SyncObj override)",
    "_SyncObj__doChangeCluster": "learners: our membership entries (_SyncObj override)",
    "_SyncObj__generateRaftTimeout": "election timer restart after a snapshot load (E11) "
                                     "and a long apply (E19)",
    "_SyncObj__sendAppendEntries": "the commit index announced before a long apply (E19)",
    "_SyncObj__onMessageReceived": "message handling the guard and campaign_now feed",
    "_SyncObj__onLeaderChanged": "forget_leader, when the election gate starts a pre-vote (E15)",
    "_SyncObj__onBecomeLeader": "the bootstrap command after a new leader's no-op, and a lone "
                                "voter's sync before it counts its election entries",
    "_checkCommandsToApply": "holding commands during a leadership transfer",
    "_isLeader": "holding commands during a leadership transfer",
    "_getLeader": "leader_id and the snapshot-install membership fix",
    "transferLeadership": "leadership transfer",
    "doTick": "driving the engine from the node's Raft thread",
    "addNodeToCluster": "membership changes",
    "removeNodeFromCluster": "membership changes",
    "forceLogCompaction": "snapshot_now",
    "destroy": "node shutdown",
    "getStatus": "replication progress (match and next indexes)",
    "raftCurrentTerm": "term",
    "raftCommitIndex": "commit_index",
    "raftLastApplied": "applied_index and the index passed to apply",
    "otherNodes": "members and single_voter",
    "hasQuorum": "has_quorum",
    "conf": "transfer hold deadline (conf.raftMaxTimeout)",
    "_applyCommand": "learners: proposing our membership entries; encoding the bootstrap "
                     "command as a log entry",
    "selfNode": "the node id in log lines",
}
_SEAM_SOURCE = {
    # (function, text that must appear in its source): what relies on it
    ("__init__", "self.__raftLog = createJournal("):
        "our journal, swapped in through pysyncobj.syncobj.createJournal",
    ("_onTick", "if self.__raftMatchIndex[node] >= commitIdx:"):
        "write ordering: the leader's commit computation runs in its tick (Engine.tick)",
    ("__init__", "self.__raftState ="): "the state property (_SyncObj__raftState)",
    ("__init__", "self.__raftElectionDeadline ="):
        "the election gate (pre-vote, E15) and the timer restart (E11)",
    ("__init__", "self.__raftLeader ="): "forget_leader, when the election gate starts a "
                                         "pre-vote (E15)",
    ("__init__", "self.__lastResponseTime ="): "check-quorum grace after a long apply (E19) "
                                               "and learner promotion",
    ("__init__", "self.__selfNode ="): "learners: telling this node's own entries apart",
    ("__init__", "self.__otherNodes ="): "learners: promotion and demotion",
    ("__init__", "self.__readonlyNodes ="): "learners: the nodes replicated to, uncounted",
    ("__init__", "self.__connectedNodes ="): "learners: links of removed learners",
    ("__init__", "self.__raftMatchIndex ="): "learners: catch-up progress",
    ("__init__", "self.__raftNextIndex ="): "learners: progress kept across promotion",
    ("__init__", "self.__transport ="): "learners: adding and dropping their links",
    ("__doChangeCluster", "requestType == 'add'"): "learners: promotion reuses the 'add' change",
    ("__sendAppendEntries", "self.__otherNodes | self.__readonlyNodes"):
        "learners: the leader replicates to read-only nodes",
    ("__sendAppendEntries", "self.__serializer.cancelTransmisstion(node)"):
        "learners: a half-sent snapshot is cancelled when a learner leaves",
    ("_checkCommandsToApply", "self.__changeCluster(changeClusterRequest)"):
        "learners: our membership entries go through the one-at-a-time check",
    ("__onMessageReceived", "message['type'] == 'timeout_now'"): "campaign_now",
    ("__onMessageReceived", "message['term']"): "campaign_now and the guard",
    ("__onMessageReceived", "message['type'] == 'append_entries'"): "the message guard",
    ("__onMessageReceived", "'prevLogIdx' in message"): "the message guard (rule 1)",
    ("__onMessageReceived", "message['commit_index']"): "the message guard (rule 1)",
    ("__onMessageReceived", "message.get('entries'"): "the message guard (rule 2)",
    ("__onMessageReceived", "message.get('transmission'"): "the message guard (rule 2)",
    ("__onMessageReceived", "message['type'] == 'next_node_idx'"): "the guard's answer",
    ("__onMessageReceived", "message['next_node_idx']"): "the guard's answer",
    ("__onMessageReceived", "message['reset']"): "the guard's answer",
    ("__onMessageReceived", "message['success']"): "the guard's answer",
    ("__onBecomeLeader", "self.__raftLog.add(_bchr(_COMMAND_TYPE.NO_OP)"):
        "the bootstrap command, appended right after the election no-op",
    ("getStatus", "'next_node_idx_server_'"): "replication(): next indexes",
    ("getStatus", "'match_idx_server_'"): "replication(): match indexes",
}
_SEAM_BASES: dict[str, tuple[type, tuple[str, ...]]] = {
    # our subclass: (PySyncObj base, the methods we override or call on it)
    "_Journal": (Journal, (
        "add", "clear", "deleteEntriesFrom", "deleteEntriesTo", "__getitem__", "__len__",
        "_destroy", "setRaftCommitIndex", "getRaftCommitIndex", "setCurrentTerm",
        "getCurrentTerm", "getVotedForNodeId", "onOneSecondTimer")),
    "_EngineTransport": (_PsoTransport, (
        "_onMessageReceived", "_onNodeConnected", "_onNodeDisconnected",
        "_onReadonlyNodeConnected", "_onReadonlyNodeDisconnected", "ready",
        "tryGetReady", "waitReady", "addNode", "dropNode", "send", "destroy")),
}
_CONF_OPTIONS = (
    "autoTick", "raftMinTimeout", "raftMaxTimeout", "appendEntriesPeriod",
    "leaderFallbackTimeout", "connectionTimeout", "connectionRetryTime", "commandsQueueSize",
    "appendEntriesUseBatch", "appendEntriesBatchSizeBytes", "logCompactionMinEntries",
    "logCompactionMinTime", "logCompactionBatchSize", "fullDumpFile", "journalFile",
    "dynamicMembershipChange", "useFork", "serializer", "deserializer", "serializeChecker",
    "tcp_keepalive",
)
_CODES = {
    FAIL_REASON: ("SUCCESS", "QUEUE_FULL", "MISSING_LEADER", "DISCARDED", "NOT_LEADER",
                  "LEADER_CHANGED", "REQUEST_DENIED"),
    SERIALIZER_STATE: ("NOT_SERIALIZING", "SERIALIZING", "SUCCESS", "FAILED"),
}


def _installed_pysyncobj() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pysyncobj")
    except PackageNotFoundError:
        return "unknown"


def check_engine_seam() -> None:
    """Verify every PySyncObj internal this module relies on; raise
    :class:`~streambus_consensus.errors.EngineCompatibilityError` naming the
    first one missing. Runs once at import."""
    import inspect

    def missing(what: str, needed_for: str) -> EngineCompatibilityError:
        return EngineCompatibilityError(
            f"PySyncObj {_installed_pysyncobj()} lacks {what}, which streambus_consensus "
            f"needs for {needed_for}; install pysyncobj=={_TESTED_PYSYNCOBJ} (the version "
            "this adapter was checked against)")

    if not callable(getattr(_syncobj_module, "createJournal", None)):
        raise missing("pysyncobj.syncobj.createJournal", "our journal")
    if not isinstance(getattr(getattr(_syncobj_module, "_COMMAND_TYPE", None), "NO_OP", None),
                      int):
        raise missing("pysyncobj.syncobj._COMMAND_TYPE.NO_OP", "telling a pristine log")
    command_types = getattr(_syncobj_module, "_COMMAND_TYPE", None)
    if not isinstance(getattr(command_types, "MEMBERSHIP", None), int):
        raise missing("pysyncobj.syncobj._COMMAND_TYPE.MEMBERSHIP",
                      "learners: proposing our membership entries")
    for name, needed_for in _SEAM_METHODS.items():
        if not hasattr(SyncObj, name):
            raise missing(f"SyncObj.{name}", needed_for)
    sources: dict[str, str] = {}
    for (function, text), needed_for in _SEAM_SOURCE.items():
        if function not in sources:
            private = function.startswith("__") and not function.endswith("__")
            attr = f"_SyncObj{function}" if private else function
            try:
                sources[function] = inspect.getsource(getattr(SyncObj, attr))
            except (AttributeError, OSError, TypeError):
                raise missing(f"SyncObj.{attr} (source)", needed_for) from None
        if text not in sources[function]:
            raise missing(f"{text!r} in SyncObj.{function}", needed_for)
    for ours, (base, names) in _SEAM_BASES.items():
        for name in names:
            if not hasattr(base, name):
                raise missing(f"{base.__name__}.{name}", f"{ours}, which overrides or calls it")
    defaults = SyncObjConf()
    for option in _CONF_OPTIONS:
        if not hasattr(defaults, option):
            raise missing(f"the SyncObjConf option {option!r}", "the engine's configuration")
    for holder, names in _CODES.items():
        for name in names:
            if not isinstance(getattr(holder, name, None), int):
                raise missing(f"{holder.__name__}.{name}", "translating the engine's codes")


check_engine_seam()
