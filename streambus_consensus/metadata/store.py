"""MetadataStore: the API the StreamBus broker imports.

A store runs on a consensus node (it embeds one, :meth:`MetadataStore.open`,
or wraps one the caller built). Every operation works on any node: writes
made on a follower are forwarded to the leader by the Raft layer and the
caller gets its own node's result of applying them.

- **Writes** are commands proposed through the log. Ids, time and random
  placement offsets are chosen here, before proposing, so every replica
  computes the same thing. Each carries a request id (this store's client id
  plus a sequence number); a write whose outcome is unknown (timeout,
  failover) is retried with the *same* request id until its deadline, so it
  applies at most once and the caller gets the original result.
- **Refusals** ("topic exists") raise :class:`CommandRefusedError` with a
  stable ``code``; nothing changed.
- **Reads** are local (:meth:`MetadataStore.image`, with the offset they
  reflect; may trail the leader) or linearizable (``linearizable=True``:
  ReadIndex, the leader confirms it still leads and this node catches up to
  its commit index; no log entry).
- **Watches** deliver every change in log order with its offset, on their own
  thread; resume from an offset, or start from a full image.
- **Heartbeats** go to the leader's controller, in memory, never in the log
  (:mod:`.controller`).

:class:`AsyncMetadataStore` is the asyncio twin of every method.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..config import NodeConfig
from ..errors import (
    CommandRefusedError,
    NoLeaderError,
    OutcomeUnknownError,
    ProposalRejectedError,
    ProposalTimeoutError,
)
from ..logutil import audit
from ..raft.aio import wait_outcome
from ..raft.node import RaftNode
from .commands import (
    BATCH_CREATE_VERSION,
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
    ReassignReplicas,
    RegisterBroker,
    RequestId,
    SetMetadataVersion,
    TopicSpec,
    UnfenceBroker,
    UnregisterBroker,
    command_level,
    encode_command,
    supported_metadata_versions,
)
from .controller import Controller
from .features import VoterFeatures
from .feed import MetadataEvent, Watch, WatchedStateMachine
from .fsm import OK, ApplyResult, MetadataImage, TopicOutcome
from .records import Broker, Partition, Topic

__all__ = ["AsyncMetadataStore", "MetadataStore", "NewTopic"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _alone(command: Command) -> bool:
    """Whether ``command`` must have a log entry of its own: a broker's epoch is
    its registration's log index, so a registration never shares an entry."""
    return isinstance(command, RegisterBroker)


def _backoff(attempt: int, deadline: float) -> float:
    """Seconds to wait before retry ``attempt``: growing, never past ``deadline``."""
    return min(0.05 * attempt, 0.5, max(0.0, deadline - time.monotonic()))

_PLACEMENT_RANGE = 1 << 30
"""Placement offsets are drawn from [0, this)."""


@dataclass(frozen=True, slots=True)
class NewTopic:
    """One topic to create with :meth:`MetadataStore.create_topics`."""

    name: str
    """1-249 characters of ``[a-zA-Z0-9._-]``."""
    partitions: int
    """Number of partitions."""
    replication_factor: int
    """Replicas per partition."""
    config: Mapping[str, str | int] = field(default_factory=dict)
    """Topic settings under Kafka's keys."""


class MetadataStore:
    """Replicated cluster metadata on a consensus node. See the module docstring.

    Args:
        node: a node whose state machine is ``state_machine`` (not yet started
            or running).
        state_machine: the watched metadata state machine driving ``node``.
        client_id: identifies this store's requests (default: node id plus a
            random suffix, new per store).
        write_timeout: default deadline of a write, retries included.
        rng: randomness for placement offsets (inject for tests).
    """

    def __init__(
        self,
        node: RaftNode,
        state_machine: WatchedStateMachine,
        *,
        client_id: str | None = None,
        write_timeout: float | None = None,
        rng: random.Random | None = None,
        owns_node: bool = False,
    ) -> None:
        self.node = node
        self.state_machine = state_machine
        self.client_id = client_id or f"{node.node_id}-{uuid.uuid4().hex[:12]}"
        self.write_timeout = write_timeout or node.config.proposal_timeout * 3
        self._seq = itertools.count(1)
        self._seq_lock = threading.Lock()
        self._rng = rng or random.SystemRandom()
        self._owns_node = owns_node
        self._watches: list[Watch] = []
        self.controller = Controller(self, session_timeout=node.config.broker_session_timeout)
        self.features = VoterFeatures(node)

    @classmethod
    def open(cls, config: NodeConfig, **kwargs: Any) -> MetadataStore:
        """Start a consensus node for ``config`` and a store on it; :meth:`close` stops both."""
        state_machine = WatchedStateMachine()
        node = RaftNode(config, state_machine)
        store = cls(node, state_machine, owns_node=True, **kwargs)
        store.start()
        return store

    def start(self) -> None:
        """Start the node (if needed) and the controller."""
        self.node.start()
        self.controller.start()
        self.features.start()

    def close(self) -> None:
        """Stop watches and the controller (and the node, if this store started it)."""
        for watch in self._watches:
            watch.close()
        self.controller.stop()
        if self._owns_node:
            self.node.stop()

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- proposing -----------------------------------------------------------------

    def next_request_id(self) -> RequestId:
        """A fresh request id of this store."""
        with self._seq_lock:
            return RequestId(self.client_id, next(self._seq))

    def execute(self, command: Command, timeout: float | None = None) -> ApplyResult:
        """Propose ``command`` until it has an outcome or ``timeout`` passes.

        Retries with the same request id after outcome-unknown failures and
        when no leader is known. Raises CommandRefusedError for refusals,
        ProposalTimeoutError (outcome unknown) at the deadline.

        A command of a metadata version above the cluster's finalized one is
        never proposed: CommandRefusedError ``feature_not_enabled``.
        """
        self._check_level(command)
        data = encode_command(command)
        alone = _alone(command)
        deadline = time.monotonic() + (timeout or self.write_timeout)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._deadline_error(command)
            try:
                result: ApplyResult = self.node.propose(data, timeout=min(remaining, 5.0),
                                                        alone=alone)
            except (OutcomeUnknownError, ProposalRejectedError) as exc:  # incl. (no) leader
                attempt += 1
                logger.debug("retrying %s after %s", command.request_id, exc)
                time.sleep(_backoff(attempt, deadline))
                continue
            result.raise_for_refusal()
            return result

    async def execute_async(self, command: Command,
                            timeout: float | None = None) -> ApplyResult:
        """:meth:`execute` on the running event loop: the same retries, deadline
        and errors, holding no thread while the command goes through Raft."""
        self._check_level(command)
        data = encode_command(command)
        alone = _alone(command)
        deadline = time.monotonic() + (timeout or self.write_timeout)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._deadline_error(command)
            try:
                result: ApplyResult = await wait_outcome(
                    self.node, self.node.propose_async(data, alone=alone), min(remaining, 5.0))
            except (OutcomeUnknownError, ProposalRejectedError) as exc:
                attempt += 1
                logger.debug("retrying %s after %s", command.request_id, exc)
                await asyncio.sleep(_backoff(attempt, deadline))
                continue
            result.raise_for_refusal()
            return result

    async def read_index_async(self, timeout: float | None = None) -> int:
        """Wait (on the running loop) until local reads are linearizable: every
        write committed before the call is applied here. Returns the applied
        index. Retried through elections until ``timeout`` (default
        ``write_timeout``), then :class:`ProposalTimeoutError`."""
        deadline = time.monotonic() + (timeout or self.write_timeout)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProposalTimeoutError("no linearizable read point before the deadline",
                                           node_id=self.node.node_id)
            try:
                return await wait_outcome(self.node, self.node.read_index_async(),
                                          min(remaining, 5.0))
            except (OutcomeUnknownError, ProposalRejectedError):
                attempt += 1
                await asyncio.sleep(_backoff(attempt, deadline))

    def _check_level(self, command: Command) -> None:
        level = command_level(command)
        finalized = self.image().metadata_version
        if level > finalized:
            raise CommandRefusedError(
                "feature_not_enabled", f"{type(command).__name__} needs metadata version "
                f"{level}; the cluster's is {finalized} (raise it with 'features upgrade')",
                node_id=self.node.node_id)

    def _deadline_error(self, command: Command) -> ProposalTimeoutError:
        return ProposalTimeoutError(
            f"{type(command).__name__} {command.request_id.client_id}#"
            f"{command.request_id.seq}: no outcome before the deadline; it may still "
            "apply, retry with the same request id", node_id=self.node.node_id)

    def _write(self, make: Callable[[RequestId], Command], timeout: float | None,
               request_id: RequestId | None) -> Any:
        return self.execute(make(request_id or self.next_request_id()), timeout).value

    # -- brokers ---------------------------------------------------------------------

    def register_broker(self, broker_id: int, endpoint: str, *, rack: str | None = None,
                        incarnation_id: str | None = None, fenced: bool = True,
                        timeout: float | None = None,
                        request_id: RequestId | None = None) -> Broker:
        """Register a broker (a new incarnation bumps its epoch). It starts fenced
        (unless ``fenced=False``) and is unfenced by the controller once it heartbeats."""
        incarnation = incarnation_id or str(uuid.uuid4())
        broker: Broker = self._write(lambda rid: RegisterBroker(
            request_id=rid, broker_id=broker_id, endpoint=endpoint, rack=rack,
            incarnation_id=incarnation, fenced=fenced), timeout, request_id)
        return broker

    def unregister_broker(self, broker_id: int, *, timeout: float | None = None,
                          request_id: RequestId | None = None) -> None:
        """Remove a broker; its partitions get new leaders."""
        self._write(lambda rid: UnregisterBroker(request_id=rid, broker_id=broker_id),
                    timeout, request_id)
        audit(self.node.node_id, "unregistered broker %d", broker_id)

    def fence_broker(self, broker_id: int, broker_epoch: int | None = None, *,
                     timeout: float | None = None,
                     request_id: RequestId | None = None) -> None:
        """Fence a broker: out of every ISR, leads nothing."""
        self._write(lambda rid: FenceBroker(request_id=rid, broker_id=broker_id,
                                            broker_epoch=broker_epoch), timeout, request_id)

    def unfence_broker(self, broker_id: int, broker_epoch: int | None = None, *,
                       timeout: float | None = None,
                       request_id: RequestId | None = None) -> None:
        """Unfence a broker: it may lead and rejoin ISRs again."""
        self._write(lambda rid: UnfenceBroker(request_id=rid, broker_id=broker_id,
                                              broker_epoch=broker_epoch), timeout, request_id)

    def begin_controlled_shutdown(self, broker_id: int, broker_epoch: int | None = None, *,
                                  timeout: float | None = None,
                                  request_id: RequestId | None = None) -> None:
        """Move leadership off a broker that is shutting down."""
        self._write(lambda rid: BeginControlledShutdown(
            request_id=rid, broker_id=broker_id, broker_epoch=broker_epoch), timeout, request_id)

    def heartbeat(self, broker_id: int, broker_epoch: int) -> Broker | None:
        """Tell the leader's controller this broker is alive.

        Returns the broker's registration as this node knows it (``None`` if
        unknown): a broker that finds itself fenced with a current epoch is
        being unfenced; one whose epoch is stale must register again.
        """
        leader = self.node.leader_id
        if leader == self.node.node_id:
            self.controller.record_heartbeat(broker_id, broker_epoch)
        elif leader is None:
            raise NoLeaderError("no leader to heartbeat to", node_id=self.node.node_id)
        else:
            self.node.send_app_message(leader, {"type": "app:heartbeat",
                                                "broker_id": broker_id,
                                                "broker_epoch": broker_epoch})
        return self.image().brokers.get(broker_id)

    # -- topics ----------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int, replication_factor: int, *,
                     config: Mapping[str, str | int] | None = None,
                     timeout: float | None = None,
                     request_id: RequestId | None = None) -> Topic:
        """Create a topic; replicas are placed over active brokers, racks spread."""
        make = self._create_topic(name, partitions, replication_factor, config)
        topic: Topic = self.execute(make(request_id or self.next_request_id()), timeout).value
        self._created(topic)
        return topic

    async def create_topic_async(self, name: str, partitions: int, replication_factor: int,
                                 *, config: Mapping[str, str | int] | None = None,
                                 timeout: float | None = None,
                                 request_id: RequestId | None = None) -> Topic:
        """:meth:`create_topic` on the running event loop, holding no thread."""
        make = self._create_topic(name, partitions, replication_factor, config)
        result = await self.execute_async(make(request_id or self.next_request_id()), timeout)
        topic: Topic = result.value
        self._created(topic)
        return topic

    def _create_topic(self, name: str, partitions: int, replication_factor: int,
                      config: Mapping[str, str | int] | None) -> Callable[[RequestId], Command]:
        topic_id = str(uuid.uuid4())
        offset = self._rng.randrange(_PLACEMENT_RANGE)
        return lambda rid: CreateTopic(
            request_id=rid, name=name, topic_id=topic_id, partitions=partitions,
            replication_factor=replication_factor, config=dict(config or {}),
            placement_offset=offset)

    def _created(self, topic: Topic) -> None:
        audit(self.node.node_id, "created topic %s (%d partitions, replication factor %d)",
              topic.name, topic.partition_count, topic.replication_factor)

    def create_topics(self, topics: Sequence[NewTopic], *, timeout: float | None = None,
                      request_id: RequestId | None = None) -> list[TopicOutcome]:
        """Create many topics in one log entry, each on its own (Kafka's CreateTopics).

        Returns one :class:`~.fsm.TopicOutcome` per topic, in order: created,
        or refused with its own code (``topic_exists``, ``invalid_topic_name``,
        ...) while the others are created. The batch has one request id: a
        retry with the same id gets the same outcomes and creates nothing twice.

        The batched command needs metadata version
        :data:`~.commands.BATCH_CREATE_VERSION`. On a cluster still below it
        the topics are created one by one (one entry and one request id each)
        when no ``request_id`` is given; with a ``request_id`` (which names a
        single entry) it raises CommandRefusedError ``feature_not_enabled``.
        Raises CodecError for more than
        :data:`~.commands.MAX_TOPICS_PER_BATCH` topics or an argument of the
        wrong type, CommandRefusedError for a batch refused as a whole (more
        than ``MAX_PARTITIONS_PER_TOPIC`` partitions in all; none given).
        """
        if self.image().metadata_version < BATCH_CREATE_VERSION and request_id is None:
            return self._create_one_by_one(topics, timeout)
        # One draw of randomness for the batch: ids from one read of the OS's
        # random source, placement offsets from one random start (each topic
        # one step further, so their leaders still spread).
        entropy = os.urandom(16 * len(topics))
        start = self._rng.randrange(_PLACEMENT_RANGE)
        specs = tuple(TopicSpec(
            name=t.name, topic_id=str(uuid.UUID(bytes=entropy[16 * i:16 * i + 16], version=4)),
            partitions=t.partitions, replication_factor=t.replication_factor,
            config=dict(t.config), placement_offset=(start + i) % _PLACEMENT_RANGE)
            for i, t in enumerate(topics))
        outcomes: tuple[TopicOutcome, ...] = self._write(
            lambda rid: CreateTopics(request_id=rid, topics=specs), timeout, request_id)
        created = [o.name for o in outcomes if o.ok]
        audit(self.node.node_id, "created %d of %d topics in one batch%s", len(created),
              len(outcomes), f" (first {created[0]})" if created else "")
        return list(outcomes)

    def _create_one_by_one(self, topics: Sequence[NewTopic],
                           timeout: float | None) -> list[TopicOutcome]:
        outcomes = []
        for t in topics:
            try:
                topic = self.create_topic(t.name, t.partitions, t.replication_factor,
                                          config=t.config, timeout=timeout)
            except CommandRefusedError as exc:
                message = str(exc).removeprefix(f"{exc.code}: ")
                outcomes.append(TopicOutcome(t.name, exc.code, message, None))
            else:
                outcomes.append(TopicOutcome(t.name, OK, "", topic))
        return outcomes

    def delete_topic(self, name: str, *, timeout: float | None = None,
                     request_id: RequestId | None = None) -> None:
        """Delete a topic and its partitions."""
        self._write(lambda rid: DeleteTopic(request_id=rid, name=name), timeout, request_id)
        audit(self.node.node_id, "deleted topic %s", name)

    def alter_topic_config(self, name: str, set_configs: Mapping[str, str | int] | None = None,
                           delete_configs: tuple[str, ...] = (), *,
                           timeout: float | None = None,
                           request_id: RequestId | None = None) -> Topic:
        """Set and/or reset (to default) topic config keys."""
        topic: Topic = self._write(lambda rid: AlterTopicConfig(
            request_id=rid, name=name, set_configs=dict(set_configs or {}),
            delete_configs=tuple(delete_configs)), timeout, request_id)
        audit(self.node.node_id, "altered topic %s config: set %s, reset %s", name,
              sorted(set_configs or {}), sorted(delete_configs))
        return topic

    def add_partitions(self, name: str, new_total: int, *, timeout: float | None = None,
                       request_id: RequestId | None = None) -> Topic:
        """Grow a topic to ``new_total`` partitions (never fewer)."""
        offset = self._rng.randrange(_PLACEMENT_RANGE)
        topic: Topic = self._write(lambda rid: AddPartitions(
            request_id=rid, name=name, new_total=new_total, placement_offset=offset),
            timeout, request_id)
        audit(self.node.node_id, "grew topic %s to %d partitions", name, new_total)
        return topic

    # -- partitions ------------------------------------------------------------------

    def elect_leaders(self, topic: str, partition: int | None = None, *,
                      kind: str = "preferred", timeout: float | None = None,
                      request_id: RequestId | None = None) -> tuple[Partition, ...]:
        """Elect leaders: ``preferred``, from the ``isr``, or ``unclean`` (data loss)."""
        changed: tuple[Partition, ...] = self._write(lambda rid: ElectLeaders(
            request_id=rid, topic=topic, partition=partition, kind=kind),  # type: ignore[arg-type]
            timeout, request_id)
        return changed

    def alter_isr(self, topic: str, partition: int, *, leader: int, leader_epoch: int,
                  new_isr: tuple[int, ...], partition_epoch: int,
                  timeout: float | None = None,
                  request_id: RequestId | None = None) -> Partition:
        """Change a partition's ISR (sent by its leader; stale epochs are refused)."""
        result: Partition = self._write(lambda rid: AlterIsr(
            request_id=rid, topic=topic, partition=partition, leader=leader,
            leader_epoch=leader_epoch, new_isr=tuple(new_isr),
            partition_epoch=partition_epoch), timeout, request_id)
        return result

    def reassign_replicas(self, topic: str, partition: int, replicas: tuple[int, ...], *,
                          timeout: float | None = None,
                          request_id: RequestId | None = None) -> Partition:
        """Move a partition to other brokers."""
        result: Partition = self._write(lambda rid: ReassignReplicas(
            request_id=rid, topic=topic, partition=partition, replicas=tuple(replicas)),
            timeout, request_id)
        audit(self.node.node_id, "reassigned %s-%d to replicas %s", topic, partition,
              list(replicas))
        return result

    # -- reads -----------------------------------------------------------------------

    def image(self) -> MetadataImage:
        """The local replica's metadata and the offset it reflects (may trail the leader)."""
        return self.state_machine.fsm.image()

    def describe_topic(self, name: str, *, linearizable: bool = False,
                       timeout: float | None = None) -> tuple[Topic, tuple[Partition, ...]] | None:
        """A topic and its partitions, or ``None``. ``linearizable`` confirms with
        the leader first (:meth:`read_image`)."""
        image = self.read_image(timeout=timeout) if linearizable else self.image()
        topic = image.topics.get(name)
        if topic is None:
            return None
        return topic, image.partitions.get(name, ())

    # -- feature levels ------------------------------------------------------------

    def upgrade_metadata_version(self, level: int, *, timeout: float | None = None,
                                 ask_timeout: float = 3.0) -> dict[str, tuple[int, int] | None]:
        """Raise the cluster's finalized metadata version to ``level``.

        Every voter is asked which versions its software reads; unless all
        answer within ``ask_timeout`` with a range that holds ``level``, the
        upgrade is refused (CommandRefusedError ``unsupported_metadata_version``)
        and nothing is proposed. Lowering the version is refused
        (``invalid_metadata_version``); the current one again changes nothing.
        Returns what each voter answered.
        """
        current = self.read_image(timeout=timeout).metadata_version
        if level < current:
            raise CommandRefusedError(
                "invalid_metadata_version", f"metadata version {level} is below the finalized "
                f"{current}; downgrades are not supported", node_id=self.node.node_id)
        voters = self.features.ask_voters(ask_timeout)
        unable = [f"{voter} did not answer" if answer is None
                  else f"{voter} reads {answer[0]}..{answer[1]}"
                  for voter, answer in voters.items()
                  if answer is None or not answer[0] <= level <= answer[1]]
        if unable:
            raise CommandRefusedError(
                "unsupported_metadata_version", f"metadata version {level} is not readable by "
                f"every voter ({'; '.join(unable)}): upgrade their software first",
                node_id=self.node.node_id)
        if level != current:
            self.execute(SetMetadataVersion(request_id=self.next_request_id(), level=level),
                         timeout)
        return voters

    def describe_features(self) -> dict[str, Any]:
        """This node's supported metadata versions and the finalized one it has applied."""
        low, high = supported_metadata_versions()
        image = self.image()
        return {"node_id": self.node.node_id, "supported": [low, high],
                "finalized": image.metadata_version, "offset": image.offset}

    def read_image(self, *, timeout: float | None = None) -> MetadataImage:
        """The whole metadata, linearizably: it reflects every write that
        completed before the call.

        ReadIndex (:meth:`RaftNode.read_index`): the leader confirms its
        leadership with one round of messages that serves every read waiting
        at that moment, and this node waits until it has applied the leader's
        commit index; no log entry is written. Retries while no leader is
        known or leadership moves; ProposalTimeoutError at the deadline.
        """
        deadline = time.monotonic() + (timeout or self.write_timeout)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProposalTimeoutError("no linearizable read before the deadline",
                                           node_id=self.node.node_id)
            try:
                self.node.read_index(timeout=min(remaining, 5.0))
            except (OutcomeUnknownError, ProposalRejectedError) as exc:
                attempt += 1
                logger.debug("retrying a linearizable read after %s", exc)
                time.sleep(min(0.05 * attempt, 0.5, max(0.0, deadline - time.monotonic())))
                continue
            return self.image()

    def list_topics(self) -> list[str]:
        """Topic names (local read)."""
        return sorted(self.image().topics)

    # -- watching --------------------------------------------------------------------

    def watch(self, listener: Callable[[MetadataEvent], None], *,
              from_offset: int | None = None) -> Watch:
        """Deliver every change after ``from_offset`` to ``listener``, in log order, on
        a thread of its own. ``None`` (default) starts with a full image."""
        watch = Watch(self.state_machine.feed, listener, from_offset,
                      name=f"metadata-watch-{len(self._watches)}")
        self._watches.append(watch)
        return watch


class AsyncMetadataStore:
    """The asyncio twin of :class:`MetadataStore`: every method is awaitable.

    Blocking calls run in the default executor, so the event loop never
    waits on Raft.
    """

    def __init__(self, store: MetadataStore) -> None:
        self.sync = store

    @classmethod
    async def open(cls, config: NodeConfig, **kwargs: Any) -> AsyncMetadataStore:
        """Start a node and a store without blocking the loop."""
        return cls(await asyncio.to_thread(MetadataStore.open, config, **kwargs))

    async def close(self) -> None:
        """Stop the store (and its node, if it started it)."""
        await asyncio.to_thread(self.sync.close)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.sync, name)
        if name in _LOCAL or not callable(method):
            return method  # type: ignore[no-any-return]

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        call.__name__ = name
        call.__doc__ = method.__doc__
        return call


_LOCAL = frozenset({"image", "list_topics", "watch", "next_request_id"})
"""Methods that never block: the async twin returns them as they are."""
