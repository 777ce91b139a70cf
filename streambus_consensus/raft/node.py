"""RaftNode: a consensus node over PySyncObj, with our storage and transport.

Threads:

- the **Raft thread** (``raft-<id>``) runs the loop: engine tick, storage
  sync, release of held messages, wait for network events, sync, release.
  A leader's ``append_entries`` leave just before each sync rather than after
  it, so its disk write overlaps replication (Raft thesis §10.2.1).
  Nothing else touches the engine; other threads hand it work through an
  inbox.
- the **worker thread** (``raft-<id>-worker``) resolves proposal futures and
  runs listeners, so user code never runs on the Raft thread; it logs and
  survives their exceptions.

Durability: a vote, an append acknowledgement or a commit is never sent or
reported before :meth:`Storage.sync` has returned for the state it reflects
(see ``README.md``, "Durability"), and a leader never counts its own entry
towards a commit before it is durable (see :meth:`Engine.tick`).
"""

from __future__ import annotations

import collections
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from .. import tls
from ..config import NodeConfig, validate_member
from ..errors import (
    CommandRefusedError,
    CommandTooLargeError,
    MemberNotCaughtUpError,
    NodeStoppedError,
    NoLeaderError,
    NotLeaderError,
    ProposalTimeoutError,
    ReplicaHaltError,
    RequestDeniedError,
    StorageError,
    TransportError,
)
from ..interfaces import (
    Bootstrapper,
    ConsistentSnapshotter,
    NodeState,
    NodeStatus,
    PeerStatus,
    StateMachine,
    Storage,
)
from ..logutil import audit
from .batch import BATCH_OVERHEAD, COMMAND_OVERHEAD, pack_batch, unpack_batch
from .engine import APP_MESSAGE_PREFIX, Engine, error_for
from .prevote import ElectionGate
from .readindex import ReadIndex
from .safety import MessageGuard
from .snapshot import unpack_snapshot
from .storage import DiskStorage, MemoryStorage
from .transport import TcpTransport

__all__ = ["RaftNode"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Every entry we propose starts with one kind byte, so the adapter can carry
# its own no-op entries (barriers) beside the state machine's commands.
_USER = b"\x00"
_BARRIER = b"\x01"
_BATCH = b"\x02"  # several commands, see .batch

LeaderListener = Callable[[str | None, int], None]
AppHandler = Callable[[str, Mapping[str, Any]], None]


def _fail(future: Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class _BatchResults(list[Any]):
    """The results of a batch entry's commands, in order."""


class _ApplyFailed:
    """Apply raised; every replica raises the same way, so all return this."""

    def __init__(self, error: BaseException) -> None:
        self.message = f"{type(error).__name__}: {error}"


class RaftNode:
    """A Raft node driving ``state_machine``. Implements the :class:`Node` protocol.

    Args:
        config: validated by the constructor.
        state_machine: the replicated state (see :class:`StateMachine`).
        storage: defaults to :class:`DiskStorage` in ``config.data_dir``, or
            :class:`MemoryStorage` when it is ``None``.
        transport: defaults to :class:`TcpTransport` on ``config``'s addresses.
        guard: the engine fixes (see :mod:`.safety`); tests pass a disabled
            one to show what they prevent.

    Proposals made on a follower are forwarded to the leader by the engine;
    the caller gets the result of its own node's apply. When no leader is
    known the proposal waits for one until its timeout.
    """

    def __init__(
        self,
        config: NodeConfig,
        state_machine: StateMachine,
        *,
        storage: Storage | None = None,
        transport: TcpTransport | None = None,
        guard: MessageGuard | None = None,
    ) -> None:
        self.config = config.clone().validate()
        self._sm = state_machine
        self._storage_arg = storage
        self._transport_arg = transport
        self.guard = guard or MessageGuard()
        self._engine: Engine | None = None
        self._transport: TcpTransport | None = None
        self._storage: Storage | None = None
        self._thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._inbox: collections.deque[Callable[[], None]] = collections.deque()
        self._coalescing: list[tuple[bytes, Future[Any]]] = []
        """Commands queued on the Raft thread in this pass (Raft thread only)."""
        self._completed: collections.deque[tuple[Future[Any], Any, int]] = collections.deque()
        self._submitted_at: dict[Future[Any], float] = {}
        self._pending: set[Future[Any]] = set()
        self._pending_lock = threading.Lock()
        self._leader_listeners: list[LeaderListener] = []
        self._app_handlers: list[AppHandler] = []
        self._stopping = threading.Event()
        self._started = False
        self._stopped = False
        self._lifecycle = threading.Lock()
        self._last_leader: str | None = None
        self.gate = ElectionGate(
            min_timeout=self.config.election_timeout_min, retry=self.config.heartbeat_interval,
            patience=self.config.effective_stepdown_timeout + self.config.election_timeout_max)
        """Pre-vote and leader stickiness in front of the engine's election timer."""
        self.reads = ReadIndex(node_id=self.config.node_id, barrier=_BARRIER,
                               settle=self._settle_reads, retry=self.config.election_timeout_min)
        """Linearizable reads by ReadIndex (see :mod:`.readindex`)."""
        self.fast_elections = 0
        self._fatal: BaseException | None = None
        self._fatal_listeners: list[Callable[[BaseException], None]] = []
        # Counters read by the metrics collector (single-writer: the Raft thread).
        self.leader_changes = 0
        self.proposals_committed = 0
        self.batches_proposed = 0
        """Batch entries this node proposed (each carries several commands)."""
        self.batched_commands = 0
        """Commands this node proposed inside batch entries."""
        self.proposals_failed: collections.Counter[str] = collections.Counter()
        self.apply_seconds_total = 0.0
        self.applied_entries = 0
        self.snapshots_taken = 0
        self.last_snapshot_seconds = 0.0
        self.last_snapshot_bytes = 0
        self.replication_lag: Mapping[str, int] = {}
        """On the leader: entries each peer is behind its log, sampled every second."""
        self.member_count = len(self.config.cluster)
        """Voting members, sampled every second."""
        self.learner_count = 0
        """Learners (members catching up before they vote), sampled every second."""
        self._sampled_at = 0.0
        self.fsync_observer: Callable[[float], None] | None = None
        self.apply_observer: Callable[[float], None] | None = None
        self.proposal_observer: Callable[[float], None] | None = None
        self.restore_observer: Callable[[], None] | None = None
        """Called on the Raft thread after a snapshot is restored."""

    # -- lifecycle ---------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This node's id."""
        return self.config.node_id

    def start(self) -> None:
        """Open storage, bind the transport and start the Raft thread.

        Raises CorruptStorageError (damaged data dir), TransportError (cannot
        bind) or NodeStoppedError (already stopped; nodes are not restartable).
        """
        with self._lifecycle:
            if self._stopped:
                raise NodeStoppedError("a stopped node cannot be restarted; build a new one",
                                       node_id=self.node_id)
            if self._started:
                return
            cfg = self.config
            transport = self._transport_arg or _tcp_transport(cfg)  # TLS files load first
            storage = self._storage_arg
            if storage is None:
                try:
                    storage = (DiskStorage(cfg.data_dir, fsync=cfg.fsync,
                                           on_fsync=self._observe_fsync)
                               if cfg.data_dir is not None else MemoryStorage())
                except BaseException:
                    transport.close()
                    raise
            try:
                self._engine = Engine(
                    cfg, storage, transport, apply=self._apply,
                    snapshot_capture=self._capture_snapshot, restore=self._sm.restore,
                    guard=self.guard, on_snapshot=self._snapshot_done,
                    app_handler=self._on_app_message,
                    on_restored=self._on_restored, gate=self.gate, reads=self.reads,
                    send_now=self._send_now,
                    bootstrap=self._bootstrap_entry(),
                )
                transport.start(self._engine.deliver, self._engine.peer_connected,
                                self._engine.peer_disconnected, self._on_peer_refused)
            except BaseException:
                storage.close()
                transport.close()
                raise
            self._storage, self._transport = storage, transport
            self._worker = threading.Thread(target=self._work, name=f"raft-{cfg.node_id}-worker",
                                            daemon=True)
            self._worker.start()
            self._thread = threading.Thread(target=self._run, name=f"raft-{cfg.node_id}",
                                            daemon=True)
            self._thread.start()
            self._started = True
            logger.info("%s: started on %s", cfg.node_id, cfg.effective_bind_address)

    def _bootstrap_entry(self) -> bytes | None:
        """The state machine's command for a new cluster, as an entry (see
        :class:`~streambus_consensus.interfaces.Bootstrapper`)."""
        if not isinstance(self._sm, Bootstrapper):
            return None
        command = self._sm.bootstrap_command(self.config)
        return None if command is None else _USER + bytes(command)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully: finish the tick, sync, close files and sockets. Idempotent.

        Proposals still in flight fail with :class:`NodeStoppedError`.
        """
        with self._lifecycle:
            if self._stopped:
                return
            self._stopped = True
            self._stopping.set()
            if self._transport is not None:
                self._transport.wake()
            if self._thread is not None:
                self._thread.join(timeout)
            with self._pending_lock:
                pending, self._pending = self._pending, set()
                self._submitted_at.clear()
            for future in pending:
                if not future.done():
                    future.set_exception(NodeStoppedError("node stopped", node_id=self.node_id))
            self._jobs.put(None)
            if self._worker is not None:
                self._worker.join(timeout)
            logger.info("%s: stopped", self.node_id)

    def __enter__(self) -> RaftNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the Raft thread -----------------------------------------------------------

    def _run(self) -> None:
        engine, transport, storage = self._engine, self._transport, self._storage
        if engine is None or transport is None or storage is None:
            return
        tick = self.config.tick_interval
        stalled = self.config.heartbeat_interval
        polled_at = time.monotonic()
        try:
            while not self._stopping.is_set():
                # Only the jobs queued when the pass began: callers that keep
                # queueing must not keep the engine from ticking.
                for _ in range(len(self._inbox)):
                    self._inbox.popleft()()
                if self._coalescing:
                    self._propose_coalesced(engine)
                if time.monotonic() - polled_at > stalled:
                    # This thread stalled since it last took in messages (a
                    # slow fsync, a busy machine): take in what arrived
                    # meanwhile before the timers are looked at, or a
                    # heartbeat waiting in the socket is taken for a dead
                    # leader (a pre-vote) or a silent follower (check-quorum).
                    transport.poll(0.0)
                engine.before_tick()
                engine.tick()
                engine.manage_learners()
                self.reads.pump(engine)
                self._flush(engine, transport)
                self._watch_leader(engine)
                # A lone voter commits its own entries at the next tick: do
                # not wait for network events that will never come.
                lone_work = (engine.single_voter
                             and engine.commit_index < engine.last_log_index)
                transport.poll(0.0 if lone_work else tick)
                polled_at = time.monotonic()
                self.reads.pump(engine)
                self._flush(engine, transport)
                self._sample(engine)
        except StorageError as exc:
            # After a failed write or fsync the kernel may have dropped data:
            # stop rather than acknowledge anything more (fail-stop).
            logger.critical("%s: storage failed, stopping the node: %s", self.node_id, exc)
            self._fatal = exc
        except Exception as exc:
            logger.critical("%s: Raft thread crashed, stopping the node", self.node_id,
                            exc_info=True)
            self._fatal = exc
        finally:
            self._release(engine, storage, transport)

    def _release(self, engine: Engine, storage: Storage, transport: TcpTransport) -> None:
        """The Raft thread's last act: sync, close everything, tell the fatal
        listeners. Every step runs even if one before it fails, so a node
        never lingers half-stopped."""
        if not isinstance(self._fatal, StorageError):  # after a failed write, sync fails too
            try:
                storage.sync()
            except StorageError:
                logger.exception("%s: final sync failed", self.node_id)
        for step in (engine.destroy, storage.close, transport.close):
            try:
                step()
            except Exception as exc:
                level = logging.WARNING if self._fatal is not None else logging.ERROR
                logger.log(level, "%s: while stopping: %s", self.node_id, exc)
        self._stopping.set()
        self.reads.fail_all(NodeStoppedError("node stopped", node_id=self.node_id))
        self._deliver_completed()
        if self._fatal is not None:
            for listener in list(self._fatal_listeners):
                listener(self._fatal)

    def _flush(self, engine: Engine, transport: TcpTransport) -> None:
        # A leader's append_entries first, so its disk write overlaps the
        # round trip; everything else (acknowledgements, votes, results)
        # waits for the sync. See "write ordering" in docs/engine-issues.md.
        transport.release_ahead()
        engine.sync()
        transport.release()
        self._deliver_completed()

    def _send_now(self) -> None:
        """Put what the engine queued on the wire now (Raft thread; E19)."""
        engine, transport = self._engine, self._transport
        if engine is not None and transport is not None:
            self._flush(engine, transport)

    def _deliver_completed(self) -> None:
        if not self._completed:
            return
        batch = []
        while self._completed:
            batch.append(self._completed.popleft())
        self._jobs.put(functools.partial(self._resolve, batch))

    def _watch_leader(self, engine: Engine) -> None:
        leader = engine.leader_id
        if leader != self._last_leader:
            self._last_leader = leader
            if leader is not None:
                self.leader_changes += 1
                logger.info("%s: leader is now %s (term %d)", self.node_id, leader, engine.term)
            term = engine.term
            for listener in list(self._leader_listeners):
                self._jobs.put(functools.partial(listener, leader, term))

    def _sample(self, engine: Engine) -> None:
        """Once a second, copy what the metrics show of replication (copy-then-swap:
        the scraping thread reads whole dicts, never the engine)."""
        now = time.monotonic()
        if now - self._sampled_at < 1.0:
            return
        self._sampled_at = now
        members = engine.members()
        self.member_count = len(members)
        self.learner_count = len(engine.learners())
        if engine.state is not NodeState.LEADER:
            self.replication_lag = {}
            return
        last = engine.last_log_index
        self.replication_lag = {
            peer: max(0, last - (match or 0))
            for peer, (match, _next) in engine.replication().items()}

    def _on_peer_refused(self, peer_id: str) -> None:
        # Raft thread (called from the transport's poll). The leader's process
        # is gone: ask for pre-votes now rather than at the election timeout.
        # The gate orders concurrent candidates, so one survivor campaigns.
        engine = self._engine
        if (engine is not None and self.config.fast_failover
                and engine.leader_unreachable(peer_id)):
            self.fast_elections += 1
            logger.info("%s: leader %s is down (connection refused): asking for pre-votes now",
                        self.node_id, peer_id)

    def _apply(self, index: int, entry: bytes) -> Any:
        kind, command = entry[:1], entry[1:]
        if kind == _BARRIER:
            return None
        started = time.perf_counter()
        result: Any
        try:
            if kind == _BATCH:
                result = self._apply_batch(index, command)
            else:
                apply_at = getattr(self._sm, "apply_at", None)
                result = (apply_at(index, command) if apply_at is not None
                          else self._sm.apply(command))
        except ReplicaHaltError as exc:  # fail-stop: stopping beats diverging
            logger.critical("%s: %s", self.node_id, exc)
            raise
        except Exception as exc:
            logger.error("%s: state machine raised applying index %d; returning the error",
                         self.node_id, index, exc_info=True)
            result = _ApplyFailed(exc)
        elapsed = time.perf_counter() - started
        self.apply_seconds_total += elapsed
        self.applied_entries += 1
        if self.apply_observer is not None:
            self.apply_observer(elapsed)
        return result

    def _apply_batch(self, index: int, data: bytes) -> _BatchResults:
        # A malformed envelope (CodecError) fails alike on every replica:
        # each command of it is answered apply_failed.
        commands = unpack_batch(data)
        apply_batch = getattr(self._sm, "apply_batch", None)
        if apply_batch is not None:
            return _BatchResults(apply_batch(index, commands))
        results = _BatchResults()
        for command in commands:
            try:
                results.append(self._sm.apply(command))
            except ReplicaHaltError:
                raise
            except Exception as exc:
                logger.error("%s: state machine raised applying a command at index %d; "
                             "returning the error", self.node_id, index, exc_info=True)
                results.append(_ApplyFailed(exc))
        return results

    def _capture_snapshot(self) -> Callable[[], bytes]:
        if isinstance(self._sm, ConsistentSnapshotter):
            return self._sm.prepare_snapshot()
        data = self._sm.snapshot()
        return lambda: data

    def _on_restored(self) -> None:
        if self.restore_observer is not None:
            self.restore_observer()

    def _snapshot_done(self, seconds: float, size: int) -> None:
        self.snapshots_taken += 1
        self.last_snapshot_seconds, self.last_snapshot_bytes = seconds, size

    def _observe_fsync(self, seconds: float) -> None:
        if self.fsync_observer is not None:
            self.fsync_observer(seconds)

    # -- the worker thread ---------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:
                logger.exception("%s: listener or callback raised; continuing", self.node_id)

    def _resolve(self, batch: list[tuple[Future[Any], Any, int]]) -> None:
        for future, result, code in batch:
            with self._pending_lock:
                self._pending.discard(future)
                started = self._submitted_at.pop(future, None)
            if started is not None and self.proposal_observer is not None:
                self.proposal_observer(time.monotonic() - started)
            if future.done():
                continue
            if code == 0:
                self.proposals_committed += 1
                if isinstance(result, _ApplyFailed):
                    future.set_exception(
                        CommandRefusedError("apply_failed", result.message, node_id=self.node_id)
                    )
                else:
                    future.set_result(result)
            else:
                error = error_for(code, node_id=self.node_id, leader_hint=self.leader_id)
                self.proposals_failed[type(error).__name__] += 1
                future.set_exception(error)

    # -- proposing -----------------------------------------------------------------

    def propose_async(self, command: bytes, *, alone: bool = False) -> Future[Any]:
        """Replicate ``command``; the future resolves to the state machine's result.

        Commands proposed at the same moment share one log entry when the
        state machine allows it (:class:`~streambus_consensus.interfaces.BatchApplier`);
        each still gets its own result. ``alone`` keeps this one in an entry
        of its own (for a command whose result depends on its log index
        being its own, such as a broker registration's epoch).

        The future fails with a :class:`ConsensusError`: a
        :class:`ProposalRejectedError` subclass when the command was not
        applied, :class:`OutcomeUnknownError` when it may have been.
        Raises :class:`CommandTooLargeError` at once for a command over
        ``max_command_bytes``.
        """
        if len(command) > self.config.max_command_bytes:
            raise CommandTooLargeError(
                f"command of {len(command)} bytes is over max_command_bytes "
                f"({self.config.max_command_bytes})", node_id=self.node_id)
        return self._submit(_USER + bytes(command), coalesce=not alone)

    def propose(self, command: bytes, timeout: float | None = None, *,
                alone: bool = False) -> Any:
        """Replicate ``command`` and return the state machine's result.

        Raises :class:`ProposalTimeoutError` after ``timeout`` (default
        ``config.proposal_timeout``); the command may still be applied later.
        See :meth:`propose_async` for ``alone``.
        """
        return self._wait(self.propose_async(command, alone=alone), timeout)

    def read_index_async(self, timeout: float | None = None) -> Future[int]:
        """Start a linearizable read (ReadIndex, see :mod:`.readindex`).

        The future resolves to a log index once this node's applied index
        has reached it: a read of the local state machine made after that
        sees every write that completed before this call. No log entry is
        written; one leadership confirmation serves every read waiting at
        that moment. Works on any node (a follower asks the leader).

        The future fails with :class:`NotLeaderError` (retriable: leadership
        was lost while confirming), :class:`NoLeaderError` (none was known
        before the deadline) or :class:`ProposalTimeoutError` after
        ``timeout`` (default ``config.proposal_timeout``); with
        :class:`NodeStoppedError` when the node stops. Cancelling the future
        drops the read.
        """
        _, transport = self._running()
        limit = self.config.proposal_timeout if timeout is None else timeout
        future: Future[int] = Future()
        with self._pending_lock:
            self._pending.add(future)
        self._inbox.append(functools.partial(self.reads.submit, future,
                                             time.monotonic() + limit))
        transport.wake()
        return future

    def read_index(self, timeout: float | None = None) -> int:
        """Block until a linearizable read may run here; return the read index.

        See :meth:`read_index_async`. Leadership moving while the read is
        confirmed (:class:`NotLeaderError`, :class:`NoLeaderError`) is retried
        until ``timeout`` (default ``config.proposal_timeout``), then
        :class:`ProposalTimeoutError` (retriable) is raised.
        """
        limit = self.config.proposal_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            remaining = deadline - time.monotonic()
            future = self.read_index_async(max(remaining, 0.0) + 1.0)
            try:
                return future.result(max(remaining, 0.0))
            except (NotLeaderError, NoLeaderError) as exc:
                if time.monotonic() + 0.01 >= deadline:
                    raise ProposalTimeoutError(f"no read index within {limit:.3g}s: {exc}",
                                               node_id=self.node_id) from None
                time.sleep(0.01)
            except FutureTimeout:
                future.cancel()
                with self._pending_lock:
                    self._pending.discard(future)
                raise ProposalTimeoutError(f"no read index within {limit:.3g}s",
                                           node_id=self.node_id) from None

    def _settle_reads(self, done: list[tuple[Future[int], int | BaseException]]) -> None:
        # Raft thread: settle on the worker, so callers' callbacks never run here.
        self._jobs.put(functools.partial(self._settle_reads_now, done))

    def _settle_reads_now(self, done: list[tuple[Future[int], int | BaseException]]) -> None:
        with self._pending_lock:
            for future, _ in done:
                self._pending.discard(future)
        for future, outcome in done:
            try:
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            except InvalidStateError:
                pass  # the caller cancelled it

    def barrier(self, timeout: float | None = None) -> int:
        """Commit a no-op through the log and wait for it.

        On return every entry committed before the call has been applied on
        this node. Returns the applied index.
        """
        self._wait(self._submit(_BARRIER), timeout)
        return self.applied_index

    def _submit(self, entry: bytes, *, coalesce: bool = False) -> Future[Any]:
        future: Future[Any] = Future()
        engine, transport = self._running()
        with self._pending_lock:
            self._pending.add(future)
            self._submitted_at[future] = time.monotonic()
        # Engine issue E17: PySyncObj looks the replicated method up in a table
        # that a snapshot load rebuilds on the Raft thread (emptied, then
        # refilled); a proposal from another thread in between failed with
        # KeyError. The command is handed to the engine on the Raft thread,
        # at the top of its next pass (the wake ends the current wait).
        if coalesce:
            # Looked up when the job runs: _propose_coalesced swaps the list.
            self._inbox.append(functools.partial(self._coalesce, entry, future))
        else:
            self._inbox.append(functools.partial(self._propose_now, engine, entry, future))
        transport.wake()
        return future

    def _coalesce(self, entry: bytes, future: Future[Any]) -> None:
        self._coalescing.append((entry, future))

    def _propose_now(self, engine: Engine, entry: bytes, future: Future[Any]) -> None:
        self._propose_entry(engine, entry, [future],
                            functools.partial(self._on_engine_result, future))

    def _propose_entry(self, engine: Engine, entry: bytes, futures: list[Future[Any]],
                       callback: Callable[[Any, int], None]) -> None:
        try:
            engine.propose(entry, callback)
        except Exception as exc:  # never let one proposal stop the Raft thread
            with self._pending_lock:
                for future in futures:
                    self._pending.discard(future)
                    self._submitted_at.pop(future, None)
            for future in futures:
                self._jobs.put(functools.partial(_fail, future, exc))

    def _propose_coalesced(self, engine: Engine) -> None:
        """Propose the commands queued in this pass: one entry per batch, each
        batch capped at ``max_batch_commands`` commands and ``max_command_bytes``
        bytes (so it fits wherever one command fits; see ``max_frame_bytes``)."""
        queued, self._coalescing = self._coalescing, []
        allowed = getattr(self._sm, "batching_allowed", None)
        if len(queued) == 1 or allowed is None or not allowed():
            for entry, future in queued:
                self._propose_now(engine, entry, future)
            return
        max_count, max_bytes = self.config.max_batch_commands, self.config.max_command_bytes
        group: list[tuple[bytes, Future[Any]]] = []
        size = 1 + BATCH_OVERHEAD
        for entry, future in queued:
            cost = COMMAND_OVERHEAD + len(entry) - 1
            if group and (len(group) >= max_count or size + cost > max_bytes):
                self._propose_group(engine, group)
                group, size = [], 1 + BATCH_OVERHEAD
            group.append((entry, future))
            size += cost
        self._propose_group(engine, group)

    def _propose_group(self, engine: Engine, group: list[tuple[bytes, Future[Any]]]) -> None:
        if len(group) == 1:
            self._propose_now(engine, *group[0])
            return
        futures = [future for _, future in group]
        entry = _BATCH + pack_batch([entry[1:] for entry, _ in group])
        self.batches_proposed += 1
        self.batched_commands += len(group)
        self._propose_entry(engine, entry, futures,
                            functools.partial(self._on_batch_result, futures))

    def _on_batch_result(self, futures: list[Future[Any]], result: Any, code: int) -> None:
        if code == 0 and isinstance(result, _BatchResults) and len(result) == len(futures):
            self._completed.extend((f, r, 0) for f, r in zip(futures, result, strict=True))
        else:  # one failure for all: not committed, or the whole entry failed to apply
            self._completed.extend((f, result, code) for f in futures)

    def _on_engine_result(self, future: Future[Any], result: Any, code: int) -> None:
        self._completed.append((future, result, code))

    def _wait(self, future: Future[T], timeout: float | None) -> T:
        limit = self.config.proposal_timeout if timeout is None else timeout
        try:
            return future.result(limit)
        except FutureTimeout:
            with self._pending_lock:
                self._pending.discard(future)
                self._submitted_at.pop(future, None)
            self.proposals_failed["ProposalTimeoutError"] += 1
            raise ProposalTimeoutError(
                f"no outcome within {limit:.3g}s; the command may still be applied",
                node_id=self.node_id,
            ) from None

    def _running(self) -> tuple[Engine, TcpTransport]:
        engine, transport = self._engine, self._transport
        if engine is None or transport is None or not self._started:
            raise NodeStoppedError("node is not started", node_id=self.node_id)
        if self._stopping.is_set():
            reason = f": {self._fatal}" if self._fatal else ""
            raise NodeStoppedError(f"node is stopped{reason}", node_id=self.node_id)
        return engine, transport

    # -- work on the Raft thread from other threads ----------------------------------

    def _call(self, fn: Callable[[Engine], T], timeout: float = 5.0) -> T:
        engine, transport = self._running()
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn(engine))
            except BaseException as exc:
                future.set_exception(exc)

        self._inbox.append(run)
        transport.wake()
        try:
            return future.result(timeout)
        except FutureTimeout:
            raise ProposalTimeoutError("Raft thread did not answer in time",
                                       node_id=self.node_id) from None

    def _engine_request(
        self, start: Callable[[Engine, Callable[[Any, int], None]], None], timeout: float | None
    ) -> Any:
        future: Future[Any] = Future()
        with self._pending_lock:
            self._pending.add(future)
        self._call(lambda engine: start(engine, functools.partial(self._on_engine_result, future)))
        return self._wait(future, timeout)

    def add_member(self, node_id: str, address: str, timeout: float | None = None, *,
                   check: bool = True) -> None:
        """Add a member: first as a non-voting learner, then, once it has
        caught up, as a voter. Returns when it votes. (One change at a time;
        the new node must be started with a ``cluster`` that includes itself
        and the current members.)

        The learner receives the log and snapshots from the leader but counts
        for neither commit nor elections, and never campaigns. The leader
        promotes it once its last acknowledged entry is within
        ``learner_max_lag`` of the commit index; if that has not happened
        within ``learner_catchup_timeout`` the leader removes it again and this
        raises :class:`MemberNotCaughtUpError` with the reason: the voters and
        the quorum are then as before. Calling this again for a learner (same
        address) waits for the same outcome.

        Raises :class:`ConfigError` for an invalid id or address, or an
        address another member has (see :func:`validate_member`): such a
        change would stop every node that applies it.
        Raises :class:`RequestDeniedError` (retriable) while another change or
        a new leader's first entry is uncommitted, when ``node_id`` is
        already a voter, or (with ``check``, the default) when nothing at
        ``address`` completes the cluster handshake with this node (etcd's
        strict reconfiguration: a member that cannot be reached only makes
        the quorum larger). ``timeout`` bounds each proposal; waiting for the
        promotion is bounded by ``learner_catchup_timeout`` plus
        ``proposal_timeout`` (then :class:`ProposalTimeoutError`: the node is
        still a learner, and the leader will promote or remove it).
        """
        members, learners = self._call(lambda e: (e.members(), e.learners()))
        if node_id in members:
            # The engine would deny it too, without saying why.
            raise RequestDeniedError(f"{node_id} is already a member", node_id=self.node_id)
        if node_id in learners:
            if learners[node_id] != address:
                raise RequestDeniedError(f"{node_id} is already a learner at "
                                         f"{learners[node_id]}", node_id=self.node_id)
        else:
            validate_member(node_id, address, {**members, **learners})
            if check and self._transport is not None:
                try:
                    self._transport.probe(address, timeout=self.config.election_timeout_max)
                except TransportError as exc:
                    raise RequestDeniedError(
                        f"not adding {node_id}: {exc}. Start it first, with the cluster secret "
                        f"and the current members plus itself in its [cluster]",
                        node_id=self.node_id) from None
            self._engine_request(lambda e, cb: e.add_learner(node_id, address, cb), timeout)
            audit(self.node_id, "added %s at %s as a learner", node_id, address)
        self._await_promotion(node_id, timeout)
        audit(self.node_id, "added member %s at %s", node_id, address)

    def _await_promotion(self, node_id: str, timeout: float | None) -> None:
        """Wait until the leader has promoted learner ``node_id`` (return) or
        removed it (:class:`MemberNotCaughtUpError`), as committed entries say."""
        limit = self.config.learner_catchup_timeout + self.config.proposal_timeout
        deadline = time.monotonic() + limit
        while True:
            role = self._call(lambda e: e.member_role(node_id))
            if role != "learner":
                # The change took effect when appended; it is final once committed.
                self.barrier(timeout)
                role, reason = self._call(
                    lambda e: (e.member_role(node_id), e.learner_refusal(node_id)))
                if role == "voter":
                    return
                if role is None:
                    raise MemberNotCaughtUpError(
                        node_id, reason or "it was removed while still a learner",
                        node_id=self.node_id)
            if time.monotonic() >= deadline:
                raise ProposalTimeoutError(
                    f"{node_id} is still a learner after {limit:.3g}s; the leader promotes "
                    "it once it catches up, or removes it after learner_catchup_timeout",
                    node_id=self.node_id)
            self._running()
            time.sleep(min(self.config.tick_interval, 0.05))

    def remove_member(self, node_id: str, timeout: float | None = None) -> None:
        """Remove a voting member or a learner (not this node; transfer
        leadership away first).

        Raises :class:`RequestDeniedError` (retriable) while another change is
        uncommitted, when ``node_id`` is not a member, is this node, or leads.
        """
        members, learners = self._call(lambda e: (e.members(), e.learners()))
        members.update(learners)
        if node_id not in members or node_id == self.node_id:
            # The engine would deny these too, without saying why.
            reason = "is not a member" if node_id not in members else (
                "is this node: ask another member")
            raise RequestDeniedError(f"{node_id} {reason}", node_id=self.node_id)
        self._engine_request(lambda e, cb: e.remove_member(node_id, cb), timeout)
        audit(self.node_id, "removed member %s", node_id)

    def transfer_leadership(self, node_id: str | None = None, timeout: float | None = None) -> None:
        """Ask ``node_id`` (or the most caught-up follower) to take over leadership.

        Must be called on the leader (else :class:`NotLeaderError`). Returns
        once the target has been told to campaign; watch :attr:`leader_id`
        for the result.

        PySyncObj refuses a target that has not yet acknowledged the leader's
        last entry, which under write load is most of the time. The leader
        holds new commands from the first request (see ``_SyncObj`` in
        :mod:`.engine`), so the target catches up within a round trip; the
        request is retried every 10 ms (at most ``tick_interval``) for up to
        ``timeout`` (default ``election_timeout_max``) before
        :class:`RequestDeniedError`.
        """
        if not self.is_leader:
            leader = self.leader_id
            raise NotLeaderError(f"not the leader (leader: {leader or 'unknown'}); transfers "
                                 "are asked of the leader", leader_hint=leader,
                                 node_id=self.node_id)
        if node_id == self.node_id:
            return
        if node_id is not None and node_id not in self.members():
            raise RequestDeniedError(f"{node_id} is not a member", node_id=self.node_id)
        limit = self.config.election_timeout_max if timeout is None else timeout
        deadline = time.monotonic() + limit

        def attempt(engine: Engine) -> int:
            # The engine answers a transfer request at once, on this thread.
            codes: list[int] = []
            engine.transfer_leadership(node_id, lambda _result, code: codes.append(code))
            return codes[0] if codes else -1

        while True:
            code = self._call(attempt)
            if code == 0:
                audit(self.node_id, "leadership transfer to %s started (term %d)",
                      node_id or "the most caught-up follower", self.term)
                return
            error = error_for(code, node_id=self.node_id, leader_hint=self.leader_id)
            if not isinstance(error, RequestDeniedError):
                raise error
            if time.monotonic() + self.config.tick_interval > deadline:
                raise RequestDeniedError(
                    f"{node_id or 'no follower'} did not catch up with the leader's log "
                    f"within {limit:.3g}s; leadership stays", node_id=self.node_id)
            time.sleep(min(self.config.tick_interval, 0.01))

    def snapshot_now(self) -> None:
        """Take a snapshot and compact the log at the next opportunity."""
        self._call(lambda engine: engine.force_snapshot())

    def export_snapshot(self, timeout: float | None = None) -> bytes:
        """Take a snapshot now and return its file's bytes (checksummed; see
        :mod:`.snapshot`): everything applied on this node when called, cut at
        one log index. Call :meth:`read_index` first to include everything the
        cluster committed. Raises :class:`ProposalTimeoutError` if no such
        snapshot is written within ``timeout`` (default ``proposal_timeout``).
        """
        storage = self._storage
        if storage is None:
            raise NodeStoppedError("node is not started", node_id=self.node_id)
        wanted = self.applied_index
        limit = self.config.proposal_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        self.snapshot_now()
        while True:
            blob = storage.load_snapshot()
            if blob is not None and unpack_snapshot(blob, storage.snapshot_path)[
                    0].last_index >= wanted:
                return blob
            if time.monotonic() >= deadline:
                raise ProposalTimeoutError(f"no snapshot covering index {wanted} within "
                                           f"{limit:.3g}s", node_id=self.node_id)
            self._running()
            time.sleep(0.02)

    def members(self) -> dict[str, str]:
        """Current voting members ``{node_id: address}``, this node included
        unless it is a learner."""
        return self._call(lambda engine: engine.members())

    def learners(self) -> dict[str, str]:
        """Current learners ``{node_id: address}``: members that receive the
        log but do not vote yet (see :meth:`add_member`)."""
        return self._call(lambda engine: engine.learners())

    def send_app_message(self, peer_id: str, message: Mapping[str, Any]) -> None:
        """Send ``message`` (plain data, ``type`` starting with ``"app:"``) to a
        peer over the cluster's authenticated links; fire and forget."""
        if not str(message.get("type", "")).startswith(APP_MESSAGE_PREFIX):
            raise ValueError(f"application message types start with {APP_MESSAGE_PREFIX!r}")
        engine, transport = self._running()
        payload = dict(message)

        def send() -> None:
            engine.send(peer_id, payload)

        self._inbox.append(send)
        transport.wake()

    def on_app_message(self, handler: AppHandler) -> None:
        """Call ``handler(peer_id, message)`` on the worker thread for each
        application message received."""
        self._app_handlers.append(handler)

    def _on_app_message(self, peer_id: str, message: Mapping[str, Any]) -> None:
        for handler in list(self._app_handlers):
            self._jobs.put(functools.partial(handler, peer_id, message))

    def on_fatal(self, listener: Callable[[BaseException], None]) -> None:
        """Call ``listener(error)`` once if the Raft thread stops on an error
        (a storage failure or a crash) rather than by :meth:`stop`.

        It runs on the Raft thread as it exits: it must only record the error
        or wake someone (a node process exits non-zero so that its
        supervisor restarts it).
        """
        self._fatal_listeners.append(listener)

    @property
    def fatal_error(self) -> BaseException | None:
        """Why the Raft thread stopped on its own (storage failure, an entry or snapshot
        it cannot apply, a crash), or ``None``."""
        return self._fatal

    def on_leader_change(self, listener: LeaderListener) -> None:
        """Call ``listener(leader_id_or_None, term)`` on the worker thread at each change."""
        self._leader_listeners.append(listener)

    # -- observing -----------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """Whether this node believes it leads (another may already have replaced it)."""
        return self.state is NodeState.LEADER

    @property
    def leader_id(self) -> str | None:
        """The node this node believes leads, or ``None``."""
        engine = self._engine
        return engine.leader_id if engine is not None and not self._stopping.is_set() else None

    @property
    def state(self) -> NodeState:
        """This node's role; :attr:`NodeState.STOPPED` when not running."""
        engine = self._engine
        if engine is None or not self._started or self._stopping.is_set():
            return NodeState.STOPPED
        return engine.state

    @property
    def term(self) -> int:
        """Current term (0 before start)."""
        return self._engine.term if self._engine is not None else 0

    @property
    def commit_index(self) -> int:
        """Highest index known committed."""
        return self._engine.commit_index if self._engine is not None else 0

    @property
    def applied_index(self) -> int:
        """Highest index applied to the state machine."""
        return self._engine.applied_index if self._engine is not None else 0

    @property
    def pending_proposals(self) -> int:
        """Proposals submitted here and still waiting for an outcome."""
        return len(self._pending)

    @property
    def connected_peers(self) -> frozenset[str]:
        """Peers with a live authenticated connection from this node."""
        transport = self._transport
        return transport.connected_peers() if transport is not None else frozenset()

    def wait_for_leader(self, timeout: float) -> str:
        """Block until a leader is known; return its id. Raises NoLeaderError."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader_id
            if leader is not None:
                return leader
            if time.monotonic() >= deadline:
                raise NoLeaderError(f"no leader within {timeout:.3g}s", node_id=self.node_id)
            self._running()
            time.sleep(0.01)

    def status(self) -> NodeStatus:
        """A picture of this node's Raft state, taken on the Raft thread."""
        if self.state is NodeState.STOPPED:
            return NodeStatus(node_id=self.node_id, state=NodeState.STOPPED, leader_id=None,
                              term=self.term, commit_index=self.commit_index,
                              applied_index=self.applied_index, last_log_index=0,
                              log_entries=0, has_quorum=False)
        return self._call(self._status_on_raft_thread)

    def _status_on_raft_thread(self, engine: Engine) -> NodeStatus:
        members, learners = engine.members(), engine.learners()
        replication: Mapping[str, tuple[int | None, int | None]] = engine.replication()
        connected = self.connected_peers
        leader = engine.state is NodeState.LEADER
        peers = tuple(
            PeerStatus(node_id=peer, address=address, connected=peer in connected,
                       match_index=replication.get(peer, (None, None))[0] if leader else None,
                       next_index=replication.get(peer, (None, None))[1] if leader else None,
                       role="learner" if peer in learners else "voter")
            for peer, address in sorted({**members, **learners}.items()) if peer != self.node_id
        )
        return NodeStatus(
            node_id=self.node_id, state=engine.state, leader_id=engine.leader_id,
            term=engine.term, commit_index=engine.commit_index,
            applied_index=engine.applied_index, last_log_index=engine.last_log_index,
            log_entries=engine.log_entries, has_quorum=engine.has_quorum,
            peers=peers, members=tuple(sorted(members)), learners=tuple(sorted(learners)),
        )



def _tcp_transport(cfg: NodeConfig) -> TcpTransport:
    """The cluster transport a config asks for (TLS contexts loaded here, so a
    bad certificate stops the node at start with a :class:`ConfigError`)."""
    server_tls = client_tls = None
    if cfg.peer_tls:
        server_tls, client_tls = tls.peer_server_context(cfg), tls.peer_client_context(cfg)
    return TcpTransport(
        cfg.node_id, cfg.effective_bind_address, cfg.cluster,
        secret=cfg.secret, max_frame_bytes=cfg.max_frame_bytes,
        frame_timeout=cfg.peer_frame_timeout, ping_interval=cfg.heartbeat_interval,
        dead_timeout=max(cfg.election_timeout_max, 4 * cfg.heartbeat_interval),
        retry_interval=cfg.connect_retry_interval,
        server_tls=server_tls, client_tls=client_tls,
    )
