"""A Hypothesis RuleBasedStateMachine drives the metadata state machine against
a simple model: brokers, topics and remembered results are modelled exactly;
partition-level commands are predicted from the image before each command.

After every step the KRaft invariants hold (leader in ISR and replicas, ISR a
non-empty subset of the replicas, only active brokers lead, epochs never
decrease). At the end, replaying the command log into a fresh state machine,
and snapshot-then-restore along the way, give equal state.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from streambus_consensus.errors import ReplicaHaltError
from streambus_consensus.metadata import (
    OK,
    AddPartitions,
    AlterIsr,
    AlterTopicConfig,
    ApplyResult,
    BeginControlledShutdown,
    BrokerState,
    Command,
    CreateTopic,
    DeleteTopic,
    ElectLeaders,
    FenceBroker,
    MetadataImage,
    MetadataStateMachine,
    NoOp,
    Partition,
    Read,
    ReassignReplicas,
    RefusalCode,
    RegisterBroker,
    RequestId,
    UnfenceBroker,
    UnregisterBroker,
    encode_command,
)

BROKERS = list(range(5))
NAMES = ["a", "b", "a.b", "a_b", "c-1", "bad name"]
CLIENTS = ["c0", "c1", "c2", "c3"]
MAX_RESULTS = 6
MAX_CLIENTS = 3

Expectation = tuple[str, Callable[[ApplyResult], None]]


def check_invariants(image: MetadataImage) -> None:
    """The invariants that hold after every apply."""
    assert set(image.partitions) == set(image.topics)
    for name, topic in image.topics.items():
        parts = image.partitions[name]
        assert len(parts) == topic.partition_count
        for i, p in enumerate(parts):
            assert (p.topic, p.index) == (name, i)
            assert len(p.replicas) == topic.replication_factor
            assert len(set(p.replicas)) == len(p.replicas)
            assert p.isr, "ISR never empty"
            assert set(p.isr) <= set(p.replicas)
            assert list(p.isr) == [r for r in p.replicas if r in p.isr]
            active_isr = [r for r in p.isr if r in image.brokers and image.brokers[r].is_active]
            if p.leader is not None:
                assert p.leader in p.isr
                assert image.brokers[p.leader].is_active, "only active brokers lead"
            else:
                assert not active_isr, "offline only when no ISR member is active"
            if len(p.isr) > 1:
                assert active_isr == list(p.isr), "a multi-member ISR is all active"


@dataclass
class ModelBroker:
    state: BrokerState
    incarnation: str
    endpoint: str
    rack: str | None
    epoch: int


@dataclass
class ModelTopic:
    topic_id: str
    partitions: int
    rf: int
    min_isr: int


@dataclass
class ModelSession:
    results: OrderedDict[int, ApplyResult] = field(default_factory=OrderedDict)
    max_evicted: int = -1


class MetadataMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fsm = MetadataStateMachine(
            max_results_per_client=MAX_RESULTS, max_clients=MAX_CLIENTS
        )
        self.log: list[tuple[int, bytes]] = []
        self.brokers: dict[int, ModelBroker] = {}
        self.topics: dict[str, ModelTopic] = {}
        self.sessions: OrderedDict[str, ModelSession] = OrderedDict()
        # Clients evicted from ``sessions``: only their highest seq is kept.
        self.evicted: dict[str, int] = {}
        self.seqs = dict.fromkeys(CLIENTS, 0)
        self.sent: list[Command] = []
        self.ids = 0
        self.epochs: dict[tuple[str, int], tuple[int, int]] = {}
        self.last_offset = 0

    # -- plumbing ------------------------------------------------------------

    def rid(self, client: str) -> RequestId:
        self.seqs[client] += 1
        return RequestId(client, self.seqs[client])

    def fresh_uuid(self) -> str:
        self.ids += 1
        return str(uuid.UUID(int=self.ids))

    def active(self) -> list[int]:
        return [b for b, m in self.brokers.items() if m.state is BrokerState.ACTIVE]

    def apply(self, data: bytes) -> ApplyResult:
        index = self.fsm.offset + 1
        self.log.append((index, data))
        return self.fsm.apply_at(index, data)

    def execute(self, cmd: Command) -> ApplyResult:
        rid = cmd.request_id
        session = self.sessions.get(rid.client_id)
        if not cmd.read_only and session is not None and rid.seq in session.results:
            original = session.results[rid.seq]
            result = self.apply(encode_command(cmd))
            assert result.duplicate and result.changes == ()
            assert (result.ok, result.code, result.message, result.value, result.offset) == (
                original.ok, original.code, original.message, original.value, original.offset
            )
            return result
        max_evicted = self.evicted.get(rid.client_id, -1) if session is None else (
            session.max_evicted
        )
        if not cmd.read_only and rid.seq <= max_evicted:
            # Forgotten (even the whole client): refused, never applied twice.
            result = self.apply(encode_command(cmd))
            assert result.code == RefusalCode.REQUEST_EXPIRED, result
            return result
        before = self.fsm.image()
        code, on_ok = self.expect(cmd, before)
        result = self.apply(encode_command(cmd))
        assert result.code == code, (cmd, result)
        assert not result.duplicate
        if result.ok:
            on_ok(result)
        else:
            after = self.fsm.image()
            assert (after.brokers, after.topics, after.partitions) == (
                before.brokers, before.topics, before.partitions
            )
        if not cmd.read_only:
            self.remember(rid, result)
            self.sent.append(cmd)
        return result

    def remember(self, rid: RequestId, result: ApplyResult) -> None:
        session = self.sessions.pop(rid.client_id, None) or ModelSession(
            max_evicted=self.evicted.pop(rid.client_id, -1)
        )
        self.sessions[rid.client_id] = session
        session.results[rid.seq] = result
        while len(session.results) > MAX_RESULTS:
            seq, _ = session.results.popitem(last=False)
            session.max_evicted = max(session.max_evicted, seq)
        while len(self.sessions) > MAX_CLIENTS:
            client, victim = self.sessions.popitem(last=False)
            self.evicted[client] = max([victim.max_evicted, *victim.results])

    # -- the model's predictions ----------------------------------------------

    def expect(self, cmd: Command, image: MetadataImage) -> Expectation:
        method: Callable[[Any, MetadataImage], Expectation] = getattr(
            self, "expect_" + type(cmd).__name__
        )
        return method(cmd, image)

    def expect_RegisterBroker(self, cmd: RegisterBroker, image: MetadataImage) -> Expectation:  # noqa: N802
        old = self.brokers.get(cmd.broker_id)
        if old is not None and old.incarnation == cmd.incarnation_id:
            if (old.endpoint, old.rack) != (cmd.endpoint, cmd.rack):
                return RefusalCode.INCARNATION_CONFLICT, _nothing
            return OK, _no_changes

        def registered(result: ApplyResult) -> None:
            state = BrokerState.FENCED if cmd.fenced else BrokerState.ACTIVE
            self.brokers[cmd.broker_id] = ModelBroker(
                state, cmd.incarnation_id, cmd.endpoint, cmd.rack, result.offset
            )
        return OK, registered

    def _broker_op(
        self, broker_id: int, epoch: int | None, new_state: BrokerState | None,
        only_from: tuple[BrokerState, ...],
    ) -> Expectation:
        old = self.brokers.get(broker_id)
        if old is None:
            return RefusalCode.UNKNOWN_BROKER, _nothing
        if epoch is not None and epoch != old.epoch:
            return RefusalCode.STALE_BROKER_EPOCH, _nothing
        if new_state is None:
            def unregistered(result: ApplyResult) -> None:
                del self.brokers[broker_id]
            return OK, unregistered
        if old.state not in only_from:
            return OK, _no_changes

        def changed(result: ApplyResult) -> None:
            old.state = new_state
        return OK, changed

    def expect_FenceBroker(self, cmd: FenceBroker, image: MetadataImage) -> Expectation:  # noqa: N802
        return self._broker_op(cmd.broker_id, cmd.broker_epoch, BrokerState.FENCED,
                               (BrokerState.ACTIVE, BrokerState.SHUTTING_DOWN))

    def expect_UnfenceBroker(self, cmd: UnfenceBroker, image: MetadataImage) -> Expectation:  # noqa: N802
        return self._broker_op(cmd.broker_id, cmd.broker_epoch, BrokerState.ACTIVE,
                               (BrokerState.FENCED, BrokerState.SHUTTING_DOWN))

    def expect_BeginControlledShutdown(  # noqa: N802
        self, cmd: BeginControlledShutdown, image: MetadataImage
    ) -> Expectation:
        return self._broker_op(cmd.broker_id, cmd.broker_epoch, BrokerState.SHUTTING_DOWN,
                               (BrokerState.ACTIVE,))

    def expect_UnregisterBroker(  # noqa: N802
        self, cmd: UnregisterBroker, image: MetadataImage
    ) -> Expectation:
        return self._broker_op(cmd.broker_id, None, None, ())

    def expect_CreateTopic(self, cmd: CreateTopic, image: MetadataImage) -> Expectation:  # noqa: N802
        name = cmd.name
        min_isr = int(cmd.config.get("min.insync.replicas", 1))
        if " " in name:
            return RefusalCode.INVALID_TOPIC_NAME, _nothing
        if name in self.topics:
            return RefusalCode.TOPIC_EXISTS, _nothing
        if any(n.replace(".", "_") == name.replace(".", "_") for n in self.topics):
            return RefusalCode.TOPIC_NAME_COLLISION, _nothing
        if cmd.partitions < 1:
            return RefusalCode.INVALID_PARTITIONS, _nothing
        if cmd.replication_factor < 1:
            return RefusalCode.INVALID_REPLICATION_FACTOR, _nothing
        if min_isr > cmd.replication_factor:
            return RefusalCode.INVALID_CONFIG, _nothing
        if cmd.replication_factor > len(self.active()):
            return RefusalCode.NOT_ENOUGH_BROKERS, _nothing

        def created(result: ApplyResult) -> None:
            self.topics[name] = ModelTopic(
                cmd.topic_id, cmd.partitions, cmd.replication_factor, min_isr
            )
            for p in self.fsm.image().partitions[name]:
                assert set(p.replicas) <= set(self.active())
                assert p.isr == p.replicas and p.leader == p.replicas[0]
        return OK, created

    def expect_DeleteTopic(self, cmd: DeleteTopic, image: MetadataImage) -> Expectation:  # noqa: N802
        if cmd.name not in self.topics:
            return RefusalCode.UNKNOWN_TOPIC, _nothing
        def deleted(result: ApplyResult) -> None:
            del self.topics[cmd.name]
        return OK, deleted

    def expect_AddPartitions(self, cmd: AddPartitions, image: MetadataImage) -> Expectation:  # noqa: N802
        topic = self.topics.get(cmd.name)
        if topic is None:
            return RefusalCode.UNKNOWN_TOPIC, _nothing
        if cmd.new_total <= topic.partitions:
            return RefusalCode.INVALID_PARTITIONS, _nothing
        if topic.rf > len(self.active()):
            return RefusalCode.NOT_ENOUGH_BROKERS, _nothing

        def added(result: ApplyResult) -> None:
            topic.partitions = cmd.new_total
        return OK, added

    def expect_AlterTopicConfig(  # noqa: N802
        self, cmd: AlterTopicConfig, image: MetadataImage
    ) -> Expectation:
        topic = self.topics.get(cmd.name)
        if topic is None:
            return RefusalCode.UNKNOWN_TOPIC, _nothing
        min_isr = int(cmd.set_configs.get("min.insync.replicas", 1))
        if min_isr > topic.rf:
            return RefusalCode.INVALID_CONFIG, _nothing

        def altered(result: ApplyResult) -> None:
            topic.min_isr = min_isr
        return OK, altered

    def _partition(self, topic: str, index: int | None) -> Expectation | None:
        model = self.topics.get(topic)
        if model is None:
            return RefusalCode.UNKNOWN_TOPIC, _nothing
        if index is not None and index >= model.partitions:
            return RefusalCode.UNKNOWN_PARTITION, _nothing
        return None

    def is_active(self, broker_id: int) -> bool:
        model = self.brokers.get(broker_id)
        return model is not None and model.state is BrokerState.ACTIVE

    def expect_ElectLeaders(self, cmd: ElectLeaders, image: MetadataImage) -> Expectation:  # noqa: N802
        missing = self._partition(cmd.topic, cmd.partition)
        if missing is not None:
            return missing
        if cmd.partition is None:
            return OK, _nothing
        p = image.partitions[cmd.topic][cmd.partition]
        isr_ok = any(self.is_active(r) for r in p.isr)
        if cmd.kind == "preferred":
            pref = p.replicas[0]
            if p.leader != pref and not (pref in p.isr and self.is_active(pref)):
                return RefusalCode.PREFERRED_LEADER_NOT_AVAILABLE, _nothing
        elif p.leader is None and not isr_ok and (
            cmd.kind == "isr" or not any(self.is_active(r) for r in p.replicas)
        ):
            return RefusalCode.LEADER_NOT_AVAILABLE, _nothing

        def elected(result: ApplyResult) -> None:
            q = self.fsm.image().partitions[cmd.topic][cmd.partition or 0]
            if cmd.kind == "preferred":
                assert q.leader == q.replicas[0]
            else:
                assert q.leader is not None
                assert q.recovering == (p.recovering or (p.leader is None and not isr_ok))
        return OK, elected

    def expect_AlterIsr(self, cmd: AlterIsr, image: MetadataImage) -> Expectation:  # noqa: N802
        missing = self._partition(cmd.topic, cmd.partition)
        if missing is not None:
            return missing
        p = image.partitions[cmd.topic][cmd.partition]
        if cmd.leader_epoch < p.leader_epoch:
            return RefusalCode.STALE_LEADER_EPOCH, _nothing
        if cmd.leader_epoch > p.leader_epoch:
            return RefusalCode.INVALID_LEADER_EPOCH, _nothing
        if cmd.leader != p.leader:
            return RefusalCode.NOT_LEADER, _nothing
        if cmd.partition_epoch < p.partition_epoch:
            return RefusalCode.STALE_PARTITION_EPOCH, _nothing
        if cmd.partition_epoch > p.partition_epoch:
            return RefusalCode.INVALID_PARTITION_EPOCH, _nothing
        wanted = cmd.new_isr
        if (len(set(wanted)) != len(wanted) or cmd.leader not in wanted
                or not set(wanted) <= set(p.replicas)):
            return RefusalCode.INVALID_ISR, _nothing
        if any(r not in p.isr and not self.is_active(r) for r in wanted):
            return RefusalCode.INELIGIBLE_REPLICA, _nothing

        def altered(result: ApplyResult) -> None:
            q = self.fsm.image().partitions[cmd.topic][cmd.partition]
            assert set(q.isr) == set(wanted) and q.leader == p.leader
            assert q.leader_epoch == p.leader_epoch and not q.recovering
        return OK, altered

    def expect_ReassignReplicas(  # noqa: N802
        self, cmd: ReassignReplicas, image: MetadataImage
    ) -> Expectation:
        missing = self._partition(cmd.topic, cmd.partition)
        if missing is not None:
            return missing
        p = image.partitions[cmd.topic][cmd.partition]
        replicas = cmd.replicas
        if not replicas or len(set(replicas)) != len(replicas):
            return RefusalCode.INVALID_REPLICAS, _nothing
        if len(replicas) != self.topics[cmd.topic].rf:
            return RefusalCode.INVALID_REPLICATION_FACTOR, _nothing
        if any(r not in self.brokers for r in replicas):
            return RefusalCode.UNKNOWN_BROKER, _nothing
        if replicas != p.replicas and not set(replicas) & set(p.isr):
            return RefusalCode.INVALID_REPLICAS, _nothing

        def reassigned(result: ApplyResult) -> None:
            q = self.fsm.image().partitions[cmd.topic][cmd.partition]
            assert q.replicas == replicas
            assert set(q.isr) == set(p.isr) & set(replicas)
        return OK, reassigned

    def expect_Read(self, cmd: Read, image: MetadataImage) -> Expectation:  # noqa: N802
        def read(result: ApplyResult) -> None:
            now = self.fsm.image()
            if cmd.name is None:
                assert result.value == now
            elif cmd.name in self.topics:
                assert result.value == (now.topics[cmd.name], now.partitions[cmd.name])
            else:
                assert result.value is None
        return OK, read

    def expect_NoOp(self, cmd: NoOp, image: MetadataImage) -> Expectation:  # noqa: N802
        return OK, _no_changes

    # -- rules ------------------------------------------------------------------

    clients = st.sampled_from(CLIENTS)
    broker_ids = st.sampled_from(BROKERS)

    @initialize(brokers=st.integers(0, 5), topics=st.lists(
        st.tuples(st.sampled_from(NAMES[:5]), st.integers(1, 4), st.integers(1, 3)), max_size=3))
    def start_cluster(self, brokers: int, topics: list[tuple[str, int, int]]) -> None:
        """Most runs start from a populated cluster, so partition rules have work."""
        for broker_id in range(brokers):
            self.execute(RegisterBroker(
                request_id=self.rid("c0"), broker_id=broker_id, endpoint=f"b{broker_id}.home:9092",
                rack=f"rack{broker_id % 2}", incarnation_id=self.fresh_uuid(), fenced=False,
            ))
        for name, partitions, rf in topics:
            self.execute(CreateTopic(
                request_id=self.rid("c1"), name=name, topic_id=self.fresh_uuid(),
                partitions=partitions, replication_factor=rf, placement_offset=partitions * 7,
            ))

    @rule(client=clients, broker_id=broker_ids, fresh=st.booleans(), fenced=st.booleans(),
          moved=st.booleans())
    def register(self, client: str, broker_id: int, fresh: bool, fenced: bool,
                 moved: bool) -> None:
        old = self.brokers.get(broker_id)
        incarnation = old.incarnation if old is not None and not fresh else self.fresh_uuid()
        self.execute(RegisterBroker(
            request_id=self.rid(client), broker_id=broker_id,
            endpoint=f"b{broker_id}.{'new' if moved else 'home'}:9092",
            rack=f"rack{broker_id % 2}", incarnation_id=incarnation, fenced=fenced,
        ))

    @rule(client=clients, broker_id=broker_ids, op=st.sampled_from(["fence", "unfence",
                                                                     "shutdown", "unregister"]),
          epoch=st.sampled_from(["none", "current", "stale"]))
    def broker_change(self, client: str, broker_id: int, op: str, epoch: str) -> None:
        model = self.brokers.get(broker_id)
        broker_epoch = None
        if epoch != "none" and model is not None:
            broker_epoch = model.epoch if epoch == "current" else model.epoch + 1
        rid = self.rid(client)
        cmd: Command
        if op == "fence":
            cmd = FenceBroker(request_id=rid, broker_id=broker_id, broker_epoch=broker_epoch)
        elif op == "unfence":
            cmd = UnfenceBroker(request_id=rid, broker_id=broker_id, broker_epoch=broker_epoch)
        elif op == "shutdown":
            cmd = BeginControlledShutdown(request_id=rid, broker_id=broker_id,
                                          broker_epoch=broker_epoch)
        else:
            cmd = UnregisterBroker(request_id=rid, broker_id=broker_id)
        self.execute(cmd)

    @rule(client=clients, name=st.sampled_from(NAMES), partitions=st.integers(0, 4),
          rf=st.integers(0, 4), min_isr=st.none() | st.integers(1, 3),
          offset=st.integers(0, 1000))
    def create_topic(self, client: str, name: str, partitions: int, rf: int,
                     min_isr: int | None, offset: int) -> None:
        config: dict[str, str | int] = {} if min_isr is None else {"min.insync.replicas": min_isr}
        self.execute(CreateTopic(
            request_id=self.rid(client), name=name, topic_id=self.fresh_uuid(),
            partitions=partitions, replication_factor=rf, config=config,
            placement_offset=offset,
        ))

    @rule(client=clients, name=st.sampled_from(NAMES))
    def delete_topic(self, client: str, name: str) -> None:
        self.execute(DeleteTopic(request_id=self.rid(client), name=name))

    @rule(client=clients, name=st.sampled_from(NAMES), extra=st.integers(-1, 3),
          offset=st.integers(0, 1000))
    def add_partitions(self, client: str, name: str, extra: int, offset: int) -> None:
        current = self.topics[name].partitions if name in self.topics else 1
        self.execute(AddPartitions(request_id=self.rid(client), name=name,
                                   new_total=current + extra, placement_offset=offset))

    @rule(client=clients, name=st.sampled_from(NAMES), min_isr=st.integers(1, 4))
    def alter_config(self, client: str, name: str, min_isr: int) -> None:
        self.execute(AlterTopicConfig(request_id=self.rid(client), name=name,
                                      set_configs={"min.insync.replicas": str(min_isr)}))

    def _pick_partition(self, data: st.DataObject) -> Partition | None:
        image = self.fsm.image()
        names = sorted(image.topics)
        if not names:
            return None
        parts = image.partitions[data.draw(st.sampled_from(names), label="topic")]
        return data.draw(st.sampled_from(parts), label="partition")

    @rule(client=clients, data=st.data(), kind=st.sampled_from(["preferred", "isr", "unclean"]),
          whole_topic=st.booleans())
    def elect(self, client: str, data: st.DataObject, kind: str, whole_topic: bool) -> None:
        p = self._pick_partition(data)
        topic = p.topic if p else "a"
        partition = None if whole_topic or p is None else p.index
        self.execute(ElectLeaders(request_id=self.rid(client), topic=topic,
                                  partition=partition, kind=kind))  # type: ignore[arg-type]

    @precondition(lambda self: bool(self.topics))
    @rule(client=clients, data=st.data(),
          leader_shift=st.sampled_from([0, 0, 0, 1]), le_shift=st.sampled_from([0, 0, 0, -1, 1]),
          pe_shift=st.sampled_from([0, 0, 0, -1, 1]))
    def alter_isr(self, client: str, data: st.DataObject, leader_shift: int, le_shift: int,
                  pe_shift: int) -> None:
        p = self._pick_partition(data)
        assert p is not None
        leader = p.leader if p.leader is not None and not leader_shift else p.replicas[-1]
        members = data.draw(st.lists(st.sampled_from([*p.replicas, 9]), max_size=4),
                            label="new_isr")
        if data.draw(st.booleans(), label="keep leader"):
            members = [leader, *members]
        self.execute(AlterIsr(
            request_id=self.rid(client), topic=p.topic, partition=p.index, leader=leader,
            leader_epoch=max(0, p.leader_epoch + le_shift), new_isr=tuple(members),
            partition_epoch=max(0, p.partition_epoch + pe_shift),
        ))

    @precondition(lambda self: bool(self.topics))
    @rule(client=clients, data=st.data())
    def reassign(self, client: str, data: st.DataObject) -> None:
        p = self._pick_partition(data)
        assert p is not None
        replicas = data.draw(st.lists(st.sampled_from([*BROKERS, 7]), min_size=0,
                                      max_size=len(p.replicas) + 1), label="replicas")
        self.execute(ReassignReplicas(request_id=self.rid(client), topic=p.topic,
                                      partition=p.index, replicas=tuple(replicas)))

    @rule(client=clients, name=st.none() | st.sampled_from(NAMES))
    def read(self, client: str, name: str | None) -> None:
        self.execute(Read(request_id=self.rid(client), name=name))

    @rule(client=clients)
    def barrier(self, client: str) -> None:
        self.execute(NoOp(request_id=self.rid(client)))

    @precondition(lambda self: bool(self.sent))
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        self.execute(data.draw(st.sampled_from(self.sent), label="retried"))

    @rule(data=st.binary(max_size=40))
    def garbage(self, data: bytes) -> None:
        before = self.fsm.image()
        with pytest.raises(ReplicaHaltError):
            self.fsm.apply_at(before.offset + 1, data)
        assert self.fsm.image() is before  # a halted replica changed nothing

    @rule()
    def snapshot_and_restore(self) -> None:
        data = self.fsm.snapshot()
        restored = MetadataStateMachine(
            max_results_per_client=MAX_RESULTS, max_clients=MAX_CLIENTS
        )
        restored.restore(data)
        assert restored.image() == self.fsm.image()
        assert restored.snapshot() == data
        self.fsm = restored  # carry on with the restored one: retries must still work

    # -- invariants ---------------------------------------------------------------

    @invariant()
    def kraft_invariants_hold(self) -> None:
        check_invariants(self.fsm.image())

    @invariant()
    def image_matches_the_model(self) -> None:
        image = self.fsm.image()
        assert sorted(image.brokers) == sorted(self.brokers)
        for broker_id, model in self.brokers.items():
            b = image.brokers[broker_id]
            assert (b.state, b.incarnation_id, b.broker_epoch, b.endpoint) == (
                model.state, model.incarnation, model.epoch, model.endpoint
            )
        assert sorted(image.topics) == sorted(self.topics)
        for name, model_topic in self.topics.items():
            t = image.topics[name]
            assert (t.topic_id, t.partition_count, t.replication_factor) == (
                model_topic.topic_id, model_topic.partitions, model_topic.rf
            )
            assert t.config.min_insync_replicas == model_topic.min_isr

    @invariant()
    def epochs_and_offsets_never_decrease(self) -> None:
        image = self.fsm.image()
        assert image.offset >= self.last_offset
        self.last_offset = image.offset
        for name, parts in image.partitions.items():
            topic_id = image.topics[name].topic_id
            for p in parts:
                key = (topic_id, p.index)
                old = self.epochs.get(key, (0, 0))
                assert p.leader_epoch >= old[0] and p.partition_epoch >= old[1]
                self.epochs[key] = (p.leader_epoch, p.partition_epoch)

    def teardown(self) -> None:
        replay = MetadataStateMachine(max_results_per_client=MAX_RESULTS, max_clients=MAX_CLIENTS)
        for index, data in self.log:
            replay.apply_at(index, data)
        assert replay.image() == self.fsm.image()
        assert replay.snapshot() == self.fsm.snapshot()


def _nothing(result: ApplyResult) -> None:
    """A refusal: nothing to update."""


def _no_changes(result: ApplyResult) -> None:
    assert result.changes == ()


MetadataMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestMetadataStateMachine = MetadataMachine.TestCase
