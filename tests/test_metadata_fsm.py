"""Example-based tests of the metadata state machine: commands, KRaft rules,
refusals (every code, with its message), idempotency, snapshots."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streambus_consensus import codec
from streambus_consensus.errors import (
    CodecError,
    CommandRefusedError,
    ConfigError,
    ReplicaHaltError,
)
from streambus_consensus.interfaces import ConsistentSnapshotter, StateMachine
from streambus_consensus.metadata import (
    OK,
    AddPartitions,
    AlterIsr,
    AlterTopicConfig,
    ApplyResult,
    BeginControlledShutdown,
    BrokerState,
    ChangeKind,
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
    SetMetadataVersion,
    TopicConfig,
    UnfenceBroker,
    UnregisterBroker,
    encode_command,
    supported_metadata_versions,
)


def uid(n: int) -> str:
    """A canonical UUID text, deterministic."""
    return str(uuid.UUID(int=n + 1))


class Harness:
    """Builds commands with fresh request ids and applies them in log order."""

    def __init__(self, **kwargs: int) -> None:
        self.fsm = MetadataStateMachine(**kwargs)
        self.seq = 0
        self.ids = 1000
        self.log: list[tuple[int, bytes]] = []

    def rid(self, client: str = "test") -> RequestId:
        self.seq += 1
        return RequestId(client, self.seq)

    def run(self, cmd: Command) -> ApplyResult:
        data = encode_command(cmd)
        index = self.fsm.offset + 1
        self.log.append((index, data))
        return self.fsm.apply_at(index, data)

    def ok(self, cmd: Command) -> ApplyResult:
        result = self.run(cmd)
        assert result.ok, result
        assert result.code == OK
        return result

    def refused(self, cmd: Command, code: RefusalCode) -> ApplyResult:
        before = self.fsm.image()
        result = self.run(cmd)
        assert not result.ok, result
        assert result.code == code, result
        assert result.message, "every refusal explains itself"
        assert result.changes == ()
        after = self.fsm.image()
        assert (after.brokers, after.topics, after.partitions) == (
            before.brokers,
            before.topics,
            before.partitions,
        )
        return result

    # -- command builders --------------------------------------------------

    def register(
        self, broker_id: int, *, rack: str | None = None, active: bool = True,
        incarnation: int | None = None, endpoint: str | None = None,
    ) -> RegisterBroker:
        return RegisterBroker(
            request_id=self.rid(), broker_id=broker_id,
            endpoint=endpoint or f"broker{broker_id}.example:9092", rack=rack,
            incarnation_id=uid(broker_id if incarnation is None else incarnation),
            fenced=not active,
        )

    def create(
        self, name: str, partitions: int = 1, rf: int = 1, *, offset: int = 0,
        config: dict[str, str | int] | None = None, topic_id: str | None = None,
    ) -> CreateTopic:
        self.ids += 1
        return CreateTopic(
            request_id=self.rid(), name=name, topic_id=topic_id or uid(self.ids),
            partitions=partitions, replication_factor=rf, config=config or {},
            placement_offset=offset,
        )

    def brokers(self, n: int, racks: int = 0) -> None:
        for b in range(n):
            self.ok(self.register(b, rack=f"rack{b % racks}" if racks else None))

    def part(self, topic: str, index: int = 0) -> Partition:
        p = self.fsm.image().partition(topic, index)
        assert p is not None
        return p


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
            assert list(p.isr) == [r for r in p.replicas if r in p.isr], "ISR in replica order"
            active_isr = [
                r for r in p.isr if r in image.brokers and image.brokers[r].is_active
            ]
            if p.leader is not None:
                assert p.leader in p.isr
                assert image.brokers[p.leader].is_active, "only active brokers lead"
            else:
                assert not active_isr, "offline only when no ISR member is active"
            if len(p.isr) > 1:
                assert active_isr == list(p.isr), "a multi-member ISR is all active"


# --------------------------------------------------------------------------
# Protocols and basics


def test_implements_the_state_machine_protocols() -> None:
    fsm = MetadataStateMachine()
    assert isinstance(fsm, StateMachine)
    assert isinstance(fsm, ConsistentSnapshotter)


def test_empty_state() -> None:
    image = MetadataStateMachine().image()
    assert image.offset == 0
    assert dict(image.brokers) == {} and dict(image.topics) == {}
    assert image.active_broker_ids() == ()
    assert image.partition("t", 0) is None


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_clients"):
        MetadataStateMachine(max_clients=0)
    with pytest.raises(ConfigError, match="max_results_per_client"):
        MetadataStateMachine(max_results_per_client=0)


def test_apply_uses_next_offset_and_apply_at_accepts_gaps() -> None:
    h = Harness()
    assert h.fsm.apply(encode_command(NoOp(request_id=h.rid()))).offset == 1
    assert h.fsm.apply_at(10, encode_command(NoOp(request_id=h.rid()))).offset == 10
    assert h.fsm.offset == 10


# --------------------------------------------------------------------------
# Brokers


def test_register_starts_fenced_by_default_and_epoch_is_the_offset() -> None:
    h = Harness()
    result = h.ok(h.register(1, active=False))
    broker = result.value
    assert broker.state is BrokerState.FENCED and str(broker.state) == "fenced"
    assert broker.broker_epoch == result.offset
    assert result.changes[0].kind == ChangeKind.BROKER_REGISTERED
    assert str(result.changes[0].kind) == "broker_registered"
    unfenced = h.ok(UnfenceBroker(request_id=h.rid(), broker_id=1, broker_epoch=result.offset))
    assert unfenced.value.state is BrokerState.ACTIVE
    assert h.fsm.image().active_broker_ids() == (1,)


def test_same_incarnation_is_idempotent_and_new_incarnation_bumps_epoch() -> None:
    h = Harness()
    first = h.ok(h.register(1)).value
    again = h.ok(h.register(1))
    assert again.value == first and again.changes == ()
    second = h.ok(h.register(1, incarnation=77)).value
    assert second.broker_epoch > first.broker_epoch
    assert second.incarnation_id == uid(77)


def test_restart_with_new_incarnation_leaves_isrs_and_leadership() -> None:
    h = Harness()
    h.brokers(3)
    h.ok(h.create("t", 1, 3))
    leader = h.part("t").leader
    assert leader is not None
    h.ok(h.register(leader, incarnation=99, active=False))
    p = h.part("t")
    assert p.leader != leader and leader not in p.isr
    assert p.leader_epoch == 1 and p.partition_epoch == 1
    check_invariants(h.fsm.image())


def test_fencing_moves_leaders_shrinks_isr_and_bumps_epochs() -> None:
    h = Harness()
    h.brokers(3)
    h.ok(h.create("t", 3, 3))
    image = h.fsm.image()
    led_by_0 = [p for p in image.partitions["t"] if p.leader == 0]
    assert led_by_0
    result = h.ok(FenceBroker(request_id=h.rid(), broker_id=0))
    assert result.changes[0].kind == ChangeKind.BROKER_FENCED
    changed = [c.record for c in result.changes[1:]]
    assert all(c.kind == ChangeKind.PARTITION_CHANGED for c in result.changes[1:])
    assert len(changed) == 3  # broker 0 is in every ISR
    for p in h.fsm.image().partitions["t"]:
        assert 0 not in p.isr and p.leader != 0
        assert p.partition_epoch == 1
        before = image.partitions["t"][p.index]
        assert p.leader_epoch == before.leader_epoch + (1 if before.leader == 0 else 0)
    check_invariants(h.fsm.image())
    again = h.ok(FenceBroker(request_id=h.rid(), broker_id=0))
    assert again.changes == () and again.message == "already fenced"


def test_last_isr_member_is_kept_and_partition_goes_offline() -> None:
    h = Harness()
    h.brokers(2)
    h.ok(h.create("t", 1, 2))
    p = h.part("t")
    first, second = p.replicas
    h.ok(FenceBroker(request_id=h.rid(), broker_id=first))
    assert h.part("t").isr == (second,) and h.part("t").leader == second
    h.ok(FenceBroker(request_id=h.rid(), broker_id=second))
    p = h.part("t")
    assert p.leader is None and p.is_offline and p.isr == (second,)
    check_invariants(h.fsm.image())
    # The first broker coming back cannot lead: it is not in the ISR.
    h.ok(UnfenceBroker(request_id=h.rid(), broker_id=first))
    assert h.part("t").leader is None
    # The last ISR member coming back leads again, with a new epoch.
    epoch = h.part("t").leader_epoch
    h.ok(UnfenceBroker(request_id=h.rid(), broker_id=second))
    assert h.part("t").leader == second and h.part("t").leader_epoch == epoch + 1
    check_invariants(h.fsm.image())


def test_controlled_shutdown_moves_leadership_away() -> None:
    h = Harness()
    h.brokers(2)
    h.ok(h.create("t", 2, 2))
    result = h.ok(BeginControlledShutdown(request_id=h.rid(), broker_id=0))
    assert result.value.state is BrokerState.SHUTTING_DOWN
    assert all(p.leader == 1 and p.isr == (1,) for p in h.fsm.image().partitions["t"])
    assert h.ok(BeginControlledShutdown(request_id=h.rid(), broker_id=0)).changes == ()
    h.ok(UnfenceBroker(request_id=h.rid(), broker_id=0))
    assert h.fsm.image().brokers[0].is_active
    check_invariants(h.fsm.image())


def test_unregister_removes_broker_and_its_leaderships() -> None:
    h = Harness()
    h.brokers(2)
    h.ok(h.create("t", 2, 2))
    result = h.ok(UnregisterBroker(request_id=h.rid(), broker_id=1))
    assert result.changes[0].kind == ChangeKind.BROKER_UNREGISTERED
    assert 1 not in h.fsm.image().brokers
    assert all(p.leader == 0 and p.isr == (0,) for p in h.fsm.image().partitions["t"])
    check_invariants(h.fsm.image())


def test_registering_active_broker_that_is_last_isr_member_makes_it_lead() -> None:
    h = Harness()
    h.brokers(1)
    h.ok(h.create("t", 1, 1))
    h.ok(UnregisterBroker(request_id=h.rid(), broker_id=0))
    assert h.part("t").leader is None and h.part("t").isr == (0,)
    h.ok(h.register(0, incarnation=5))
    assert h.part("t").leader == 0
    check_invariants(h.fsm.image())


# --------------------------------------------------------------------------
# Topics


def test_create_topic_places_partitions_and_reports_changes() -> None:
    h = Harness()
    h.brokers(3, racks=3)
    result = h.ok(h.create("orders", 6, 3, offset=4, config={"retention.ms": "1000"}))
    topic = result.value
    assert topic.name == "orders" and topic.partition_count == 6
    assert topic.config == TopicConfig(retention_ms=1000)
    kinds = [c.kind for c in result.changes]
    assert kinds == [ChangeKind.TOPIC_CREATED] + [ChangeKind.PARTITION_CREATED] * 6
    for p in h.fsm.image().partitions["orders"]:
        assert p.isr == p.replicas and p.leader == p.replicas[0]
        assert (p.leader_epoch, p.partition_epoch, p.recovering) == (0, 0, False)
    check_invariants(h.fsm.image())


def test_create_topic_only_uses_active_brokers() -> None:
    h = Harness()
    h.brokers(3)
    h.ok(FenceBroker(request_id=h.rid(), broker_id=1))
    h.ok(h.create("t", 8, 2))
    assert all(1 not in p.replicas for p in h.fsm.image().partitions["t"])


def test_create_topic_does_not_copy_other_topics_partitions() -> None:
    h = Harness()
    h.brokers(1)
    h.ok(h.create("a", 5))
    before = h.fsm.image()
    h.ok(h.create("b", 5))
    after = h.fsm.image()
    assert after.partitions["a"] is before.partitions["a"]
    assert after.topics["a"] is before.topics["a"]
    assert "b" not in before.topics, "an image taken earlier never changes"


def test_delete_topic_frees_its_name() -> None:
    h = Harness()
    h.brokers(1)
    topic = h.ok(h.create("a.b")).value
    result = h.ok(DeleteTopic(request_id=h.rid(), name="a.b", topic_id=topic.topic_id))
    assert result.changes[0].kind == ChangeKind.TOPIC_DELETED and result.value == topic
    assert "a.b" not in h.fsm.image().topics
    h.ok(h.create("a_b"))  # no longer collides
    h.ok(h.create("x", topic_id=topic.topic_id))  # the id is free again too


def test_alter_topic_config_sets_and_resets() -> None:
    h = Harness()
    h.brokers(3)
    h.ok(h.create("t", 1, 3, config={"cleanup.policy": "compact"}))
    result = h.ok(AlterTopicConfig(
        request_id=h.rid(), name="t", set_configs={"min.insync.replicas": 2},
        delete_configs=("cleanup.policy",),
    ))
    config = result.value.config
    assert config.min_insync_replicas == 2 and config.cleanup_policy == "delete"
    assert result.changes[0].kind == ChangeKind.CONFIG_CHANGED
    again = h.ok(AlterTopicConfig(
        request_id=h.rid(), name="t", set_configs={"min.insync.replicas": "2"}
    ))
    assert again.changes == () and again.message == "unchanged"


def test_add_partitions_continues_placement() -> None:
    h = Harness()
    h.brokers(4)
    h.ok(h.create("t", 2, 2))
    result = h.ok(AddPartitions(request_id=h.rid(), name="t", new_total=5, placement_offset=3))
    assert result.value.partition_count == 5
    kinds = [c.kind for c in result.changes]
    assert kinds == [ChangeKind.TOPIC_CHANGED] + [ChangeKind.PARTITION_CREATED] * 3
    assert [p.index for p in h.fsm.image().partitions["t"]] == [0, 1, 2, 3, 4]
    check_invariants(h.fsm.image())


# --------------------------------------------------------------------------
# Elections, ISR changes, reassignment


def _offline_partition(h: Harness) -> None:
    """Topic t, replicas (0, 1), ISR (1,), broker 1 fenced: offline."""
    h.brokers(2)
    h.ok(h.create("t", 1, 2))
    assert h.part("t").replicas == (0, 1)
    h.ok(FenceBroker(request_id=h.rid(), broker_id=0))
    h.ok(FenceBroker(request_id=h.rid(), broker_id=1))
    h.ok(UnfenceBroker(request_id=h.rid(), broker_id=0))
    assert h.part("t").leader is None and h.part("t").isr == (1,)


def test_unclean_election_only_when_asked() -> None:
    h = Harness()
    _offline_partition(h)
    h.refused(
        ElectLeaders(request_id=h.rid(), topic="t", partition=0, kind="isr"),
        RefusalCode.LEADER_NOT_AVAILABLE,
    )
    result = h.ok(ElectLeaders(request_id=h.rid(), topic="t", partition=0, kind="unclean"))
    (p,) = result.value
    assert p.leader == 0 and p.isr == (0,) and p.recovering
    check_invariants(h.fsm.image())
    # The leader's next ISR change ends recovery.
    p2 = h.ok(AlterIsr(
        request_id=h.rid(), topic="t", partition=0, leader=0, leader_epoch=p.leader_epoch,
        new_isr=(0,), partition_epoch=p.partition_epoch,
    )).value
    assert not p2.recovering and p2.partition_epoch == p.partition_epoch + 1


def test_preferred_election_moves_leader_back() -> None:
    h = Harness()
    h.brokers(2)
    h.ok(h.create("t", 1, 2))
    h.ok(FenceBroker(request_id=h.rid(), broker_id=0))
    h.ok(UnfenceBroker(request_id=h.rid(), broker_id=0))
    p = h.part("t")
    assert p.leader == 1 and p.isr == (1,)
    h.refused(
        ElectLeaders(request_id=h.rid(), topic="t", partition=0, kind="preferred"),
        RefusalCode.PREFERRED_LEADER_NOT_AVAILABLE,
    )
    h.ok(AlterIsr(
        request_id=h.rid(), topic="t", partition=0, leader=1, leader_epoch=p.leader_epoch,
        new_isr=(0, 1), partition_epoch=p.partition_epoch,
    ))
    result = h.ok(ElectLeaders(request_id=h.rid(), topic="t", partition=None, kind="preferred"))
    assert [q.leader for q in result.value] == [0]
    assert h.part("t").leader_epoch == p.leader_epoch + 1
    again = h.ok(ElectLeaders(request_id=h.rid(), topic="t", partition=0, kind="preferred"))
    assert again.value == () and again.message == "election not needed"


def test_batch_election_skips_partitions_that_cannot_elect() -> None:
    h = Harness()
    _offline_partition(h)
    result = h.ok(ElectLeaders(request_id=h.rid(), topic="t", kind="isr"))
    assert result.value == () and result.changes == ()


def test_alter_isr_orders_isr_by_replicas_and_bumps_partition_epoch_only() -> None:
    h = Harness()
    h.brokers(3)
    h.ok(h.create("t", 1, 3))
    p = h.part("t")
    shrink = tuple(reversed([r for r in p.replicas if r != p.replicas[2]]))
    q = h.ok(AlterIsr(
        request_id=h.rid(), topic="t", partition=0, leader=p.leader or 0,
        leader_epoch=p.leader_epoch, new_isr=shrink, partition_epoch=p.partition_epoch,
    )).value
    assert q.isr == p.replicas[:2]
    assert (q.leader_epoch, q.partition_epoch) == (p.leader_epoch, p.partition_epoch + 1)


def test_reassign_replicas_keeps_isr_overlap_and_moves_leader_if_needed() -> None:
    h = Harness()
    h.brokers(4)
    h.ok(h.create("t", 1, 2))
    p = h.part("t")
    assert p.replicas == (0, 1)
    q = h.ok(ReassignReplicas(request_id=h.rid(), topic="t", partition=0, replicas=(2, 1))).value
    assert q.replicas == (2, 1) and q.isr == (1,) and q.leader == 1
    assert q.leader_epoch == p.leader_epoch + 1
    check_invariants(h.fsm.image())
    # New replicas join the ISR through the leader.
    h.ok(AlterIsr(
        request_id=h.rid(), topic="t", partition=0, leader=1, leader_epoch=q.leader_epoch,
        new_isr=(1, 2), partition_epoch=q.partition_epoch,
    ))
    assert h.part("t").isr == (2, 1)
    unchanged = h.ok(ReassignReplicas(request_id=h.rid(), topic="t", partition=0,
                                      replicas=(2, 1)))
    assert unchanged.changes == ()


# --------------------------------------------------------------------------
# Reads and barriers


def test_read_changes_nothing_and_answers_at_its_offset() -> None:
    h = Harness()
    h.brokers(1)
    topic = h.ok(h.create("t", 2)).value
    before = h.fsm.image()
    whole = h.ok(Read(request_id=h.rid()))
    assert isinstance(whole.value, MetadataImage) and whole.value.offset == whole.offset
    assert whole.value.topics == before.topics and whole.changes == ()
    one = h.ok(Read(request_id=h.rid(), name="t"))
    assert one.value == (topic, h.fsm.image().partitions["t"])
    assert h.ok(Read(request_id=h.rid(), name="nope")).value is None
    assert h.ok(NoOp(request_id=h.rid())).value is None


# --------------------------------------------------------------------------
# Every refusal code, with its message


def _setup_topic(h: Harness, partitions: int = 1, rf: int = 1) -> None:
    h.brokers(max(rf, 1))
    h.ok(h.create("t", partitions, rf))


def _alter_isr(h: Harness, **changes: Any) -> AlterIsr:
    p = h.part("t")
    fields: dict[str, Any] = {
        "topic": "t", "partition": 0, "leader": p.leader, "leader_epoch": p.leader_epoch,
        "new_isr": p.isr, "partition_epoch": p.partition_epoch,
    }
    fields.update(changes)
    return AlterIsr(request_id=h.rid(), **fields)


def _with_epochs_bumped(h: Harness) -> None:
    """t-0 on (0, 1) with leader 1 (leader epoch 1, partition epoch 1) after 0 was fenced."""
    _setup_topic(h, 1, 2)
    h.ok(FenceBroker(request_id=h.rid(), broker_id=0))


SCENARIOS: dict[RefusalCode, Callable[[Harness], ApplyResult]] = {}


def scenario(
    code: RefusalCode,
) -> Callable[[Callable[[Harness], ApplyResult]], Callable[[Harness], ApplyResult]]:
    """Register the function that provokes refusal ``code``."""

    def register(fn: Callable[[Harness], ApplyResult]) -> Callable[[Harness], ApplyResult]:
        SCENARIOS[code] = fn
        return fn

    return register


@scenario(RefusalCode.ALREADY_APPLIED)
def _already_applied(h: Harness) -> ApplyResult:
    h.ok(NoOp(request_id=h.rid()))
    result = h.fsm.apply_at(h.fsm.offset, encode_command(NoOp(request_id=h.rid())))
    assert result.offset == h.fsm.offset == 1
    return result


@scenario(RefusalCode.FEATURE_NOT_ENABLED)
def _feature_not_enabled(h: Harness) -> ApplyResult:
    # A command of the next metadata version, as a newer release would write it.
    data = codec.encode((supported_metadata_versions()[1] + 1, "some_future_command",
                         ("c", 1), "field"))
    return h.fsm.apply(data)


@scenario(RefusalCode.INVALID_METADATA_VERSION)
def _invalid_metadata_version(h: Harness) -> ApplyResult:
    h.fsm._image = dataclasses.replace(h.fsm.image(),
                                       metadata_version=supported_metadata_versions()[1])
    return h.refused(SetMetadataVersion(request_id=h.rid(), level=1),
                     RefusalCode.INVALID_METADATA_VERSION)


@scenario(RefusalCode.INTERNAL_ERROR)
def _internal(h: Harness) -> ApplyResult:
    return _internal_error()


@scenario(RefusalCode.REQUEST_EXPIRED)
def _expired(h: Harness) -> ApplyResult:
    return _request_expired()


@scenario(RefusalCode.INVALID_ENDPOINT)
def _invalid_endpoint(h: Harness) -> ApplyResult:
    return h.refused(h.register(1, endpoint="no-port"), RefusalCode.INVALID_ENDPOINT)


@scenario(RefusalCode.INVALID_RACK)
def _invalid_rack(h: Harness) -> ApplyResult:
    return h.refused(h.register(1, rack="bad\nrack"), RefusalCode.INVALID_RACK)


@scenario(RefusalCode.INVALID_INCARNATION_ID)
def _invalid_incarnation(h: Harness) -> ApplyResult:
    return h.refused(
        RegisterBroker(request_id=h.rid(), broker_id=1, endpoint="h:1", incarnation_id="x"),
        RefusalCode.INVALID_INCARNATION_ID,
    )


@scenario(RefusalCode.INCARNATION_CONFLICT)
def _incarnation_conflict(h: Harness) -> ApplyResult:
    h.ok(h.register(1))
    return h.refused(h.register(1, endpoint="elsewhere:1"), RefusalCode.INCARNATION_CONFLICT)


@scenario(RefusalCode.UNKNOWN_BROKER)
def _unknown_broker(h: Harness) -> ApplyResult:
    return h.refused(FenceBroker(request_id=h.rid(), broker_id=9), RefusalCode.UNKNOWN_BROKER)


@scenario(RefusalCode.STALE_BROKER_EPOCH)
def _stale_broker_epoch(h: Harness) -> ApplyResult:
    h.ok(h.register(1))
    return h.refused(
        FenceBroker(request_id=h.rid(), broker_id=1, broker_epoch=999),
        RefusalCode.STALE_BROKER_EPOCH,
    )


@scenario(RefusalCode.INVALID_TOPIC_NAME)
def _invalid_topic_name(h: Harness) -> ApplyResult:
    return h.refused(h.create("no spaces"), RefusalCode.INVALID_TOPIC_NAME)


@scenario(RefusalCode.TOPIC_EXISTS)
def _topic_exists(h: Harness) -> ApplyResult:
    _setup_topic(h)
    return h.refused(h.create("t"), RefusalCode.TOPIC_EXISTS)


@scenario(RefusalCode.TOPIC_NAME_COLLISION)
def _topic_name_collision(h: Harness) -> ApplyResult:
    h.brokers(1)
    h.ok(h.create("a.b"))
    return h.refused(h.create("a_b"), RefusalCode.TOPIC_NAME_COLLISION)


@scenario(RefusalCode.INVALID_TOPIC_ID)
def _invalid_topic_id(h: Harness) -> ApplyResult:
    return h.refused(
        h.create("t", topic_id="00000000-0000-0000-0000-000000000000"),
        RefusalCode.INVALID_TOPIC_ID,
    )


@scenario(RefusalCode.TOPIC_ID_EXISTS)
def _topic_id_exists(h: Harness) -> ApplyResult:
    h.brokers(1)
    h.ok(h.create("a", topic_id=uid(5)))
    return h.refused(h.create("b", topic_id=uid(5)), RefusalCode.TOPIC_ID_EXISTS)


@scenario(RefusalCode.TOPIC_ID_MISMATCH)
def _topic_id_mismatch(h: Harness) -> ApplyResult:
    _setup_topic(h)
    return h.refused(
        DeleteTopic(request_id=h.rid(), name="t", topic_id=uid(12345)),
        RefusalCode.TOPIC_ID_MISMATCH,
    )


@scenario(RefusalCode.INVALID_PARTITIONS)
def _invalid_partitions(h: Harness) -> ApplyResult:
    return h.refused(h.create("t", partitions=0), RefusalCode.INVALID_PARTITIONS)


@scenario(RefusalCode.INVALID_REPLICATION_FACTOR)
def _invalid_replication_factor(h: Harness) -> ApplyResult:
    return h.refused(h.create("t", rf=0), RefusalCode.INVALID_REPLICATION_FACTOR)


@scenario(RefusalCode.INVALID_CONFIG)
def _invalid_config(h: Harness) -> ApplyResult:
    return h.refused(h.create("t", config={"no.such.key": 1}), RefusalCode.INVALID_CONFIG)


@scenario(RefusalCode.NOT_ENOUGH_BROKERS)
def _not_enough_brokers(h: Harness) -> ApplyResult:
    h.brokers(2)
    return h.refused(h.create("t", rf=3), RefusalCode.NOT_ENOUGH_BROKERS)


@scenario(RefusalCode.UNKNOWN_TOPIC)
def _unknown_topic(h: Harness) -> ApplyResult:
    return h.refused(DeleteTopic(request_id=h.rid(), name="t"), RefusalCode.UNKNOWN_TOPIC)


@scenario(RefusalCode.UNKNOWN_PARTITION)
def _unknown_partition(h: Harness) -> ApplyResult:
    _setup_topic(h)
    return h.refused(
        ElectLeaders(request_id=h.rid(), topic="t", partition=5), RefusalCode.UNKNOWN_PARTITION
    )


@scenario(RefusalCode.PREFERRED_LEADER_NOT_AVAILABLE)
def _preferred_not_available(h: Harness) -> ApplyResult:
    _with_epochs_bumped(h)
    return h.refused(
        ElectLeaders(request_id=h.rid(), topic="t", partition=0, kind="preferred"),
        RefusalCode.PREFERRED_LEADER_NOT_AVAILABLE,
    )


@scenario(RefusalCode.LEADER_NOT_AVAILABLE)
def _leader_not_available(h: Harness) -> ApplyResult:
    _offline_partition(h)
    return h.refused(
        ElectLeaders(request_id=h.rid(), topic="t", partition=0, kind="isr"),
        RefusalCode.LEADER_NOT_AVAILABLE,
    )


@scenario(RefusalCode.NOT_LEADER)
def _not_leader(h: Harness) -> ApplyResult:
    _setup_topic(h, 1, 2)
    return h.refused(_alter_isr(h, leader=1), RefusalCode.NOT_LEADER)


@scenario(RefusalCode.STALE_LEADER_EPOCH)
def _stale_leader_epoch(h: Harness) -> ApplyResult:
    _with_epochs_bumped(h)
    return h.refused(_alter_isr(h, leader_epoch=0), RefusalCode.STALE_LEADER_EPOCH)


@scenario(RefusalCode.INVALID_LEADER_EPOCH)
def _invalid_leader_epoch(h: Harness) -> ApplyResult:
    _setup_topic(h)
    return h.refused(_alter_isr(h, leader_epoch=7), RefusalCode.INVALID_LEADER_EPOCH)


@scenario(RefusalCode.STALE_PARTITION_EPOCH)
def _stale_partition_epoch(h: Harness) -> ApplyResult:
    _with_epochs_bumped(h)
    return h.refused(_alter_isr(h, partition_epoch=0), RefusalCode.STALE_PARTITION_EPOCH)


@scenario(RefusalCode.INVALID_PARTITION_EPOCH)
def _invalid_partition_epoch(h: Harness) -> ApplyResult:
    _setup_topic(h)
    return h.refused(_alter_isr(h, partition_epoch=3), RefusalCode.INVALID_PARTITION_EPOCH)


@scenario(RefusalCode.INVALID_ISR)
def _invalid_isr(h: Harness) -> ApplyResult:
    _setup_topic(h, 1, 2)
    return h.refused(_alter_isr(h, new_isr=(1,)), RefusalCode.INVALID_ISR)


@scenario(RefusalCode.INELIGIBLE_REPLICA)
def _ineligible_replica(h: Harness) -> ApplyResult:
    _with_epochs_bumped(h)
    return h.refused(_alter_isr(h, new_isr=(0, 1)), RefusalCode.INELIGIBLE_REPLICA)


@scenario(RefusalCode.INVALID_REPLICAS)
def _invalid_replicas(h: Harness) -> ApplyResult:
    _setup_topic(h, 1, 2)
    return h.refused(
        ReassignReplicas(request_id=h.rid(), topic="t", partition=0, replicas=(1, 1)),
        RefusalCode.INVALID_REPLICAS,
    )


def _internal_error() -> ApplyResult:
    class Broken(MetadataStateMachine):
        """A state machine with a bug in one handler (a real subclass, not a mock)."""

        def _no_op(self, cmd: Any, index: int, delta: Any) -> tuple[str, Any]:
            raise RuntimeError("boom")

    fsm = Broken()
    before = fsm.image()
    result = fsm.apply(encode_command(NoOp(request_id=RequestId("c", 1))))
    assert fsm.image().topics == before.topics and fsm.offset == 1
    return result


def _request_expired() -> ApplyResult:
    h = Harness(max_results_per_client=2)
    for seq in (1, 2, 3):
        h.run(DeleteTopic(request_id=RequestId("c", seq), name="x"))
    return h.refused(DeleteTopic(request_id=RequestId("c", 1), name="x"),
                     RefusalCode.REQUEST_EXPIRED)


@pytest.mark.parametrize("code", list(RefusalCode), ids=str)
def test_every_refusal_code(code: RefusalCode) -> None:
    h = Harness()
    result = SCENARIOS[code](h)
    assert not result.ok
    assert result.code == code
    assert result.message
    with pytest.raises(CommandRefusedError) as info:
        result.raise_for_refusal()
    assert info.value.code == code and result.message in str(info.value)
    check_invariants(h.fsm.image())


def test_scenarios_cover_every_code() -> None:
    assert set(SCENARIOS) == set(RefusalCode)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("a", True), ("A-z_0.9", True), ("x" * 249, True), ("x" * 250, False),
        ("", False), (".", False), ("..", False), ("...", True), ("a/b", False),
        ("caf\u00e9", False), ("a\n", False),
    ],
)
def test_topic_name_rules(name: str, ok: bool) -> None:
    h = Harness()
    h.brokers(1)
    result = h.run(h.create(name))
    assert result.ok is ok, result
    if not ok:
        assert result.code == RefusalCode.INVALID_TOPIC_NAME


@pytest.mark.parametrize(
    ("config", "rf", "fragment"),
    [
        ({"min.insync.replicas": 3}, 2, "exceeds the replication factor 2"),
        ({"retention.ms": "soon"}, 1, "must be an integer"),
        ({"segment.bytes": 1}, 1, "must be in 14.."),
        ({"cleanup.policy": "erase"}, 1, "must be one of"),
        ({"compression.type": 5}, 1, "must be a string"),
    ],
)
def test_invalid_configs_are_refused_with_the_reason(
    config: dict[str, str | int], rf: int, fragment: str
) -> None:
    h = Harness()
    h.brokers(rf)
    result = h.refused(h.create("t", rf=rf, config=config), RefusalCode.INVALID_CONFIG)
    assert fragment in result.message


def test_add_partitions_never_fewer() -> None:
    h = Harness()
    _setup_topic(h, 3)
    result = h.refused(
        AddPartitions(request_id=h.rid(), name="t", new_total=3, placement_offset=0),
        RefusalCode.INVALID_PARTITIONS,
    )
    assert "has 3 partitions" in result.message


def test_not_enough_brokers_counts_only_active_ones() -> None:
    h = Harness()
    h.brokers(3)
    h.ok(FenceBroker(request_id=h.rid(), broker_id=2))
    result = h.refused(h.create("t", rf=3), RefusalCode.NOT_ENOUGH_BROKERS)
    assert "only 2 broker(s) are active" in result.message


# --------------------------------------------------------------------------
# Idempotency


def test_retry_returns_the_original_result_without_applying_twice() -> None:
    h = Harness()
    h.brokers(1)
    cmd = h.create("t")
    first = h.ok(cmd)
    retry = h.run(cmd)
    assert retry.duplicate and retry.ok and retry.code == OK
    assert retry.value == first.value and retry.offset == first.offset
    assert retry.changes == ()
    again = h.create("t")
    refused = h.run(again)
    assert refused.code == RefusalCode.TOPIC_EXISTS
    retry_refused = h.run(again)
    assert retry_refused.duplicate and retry_refused.code == RefusalCode.TOPIC_EXISTS
    assert retry_refused.offset == refused.offset


def test_results_are_forgotten_oldest_first_per_client() -> None:
    h = Harness(max_results_per_client=3)
    h.brokers(1)
    for seq in range(1, 6):
        h.ok(CreateTopic(
            request_id=RequestId("c", seq), name=f"t{seq}", topic_id=uid(500 + seq),
            partitions=1, replication_factor=1, placement_offset=0,
        ))
    for seq in (3, 4, 5):
        again = h.run(CreateTopic(
            request_id=RequestId("c", seq), name=f"t{seq}", topic_id=uid(500 + seq),
            partitions=1, replication_factor=1, placement_offset=0,
        ))
        assert again.duplicate and again.ok
    for seq in (1, 2):
        expired = h.run(CreateTopic(
            request_id=RequestId("c", seq), name=f"t{seq}", topic_id=uid(500 + seq),
            partitions=1, replication_factor=1, placement_offset=0,
        ))
        assert expired.code == RefusalCode.REQUEST_EXPIRED


def test_least_recently_used_client_is_forgotten() -> None:
    h = Harness(max_clients=2)
    h.brokers(1)  # client "test"
    results = {}
    for client in ("a", "b", "c"):
        cmd = CreateTopic(request_id=RequestId(client, 1), name=f"topic-{client}",
                          topic_id=uid(ord(client)), partitions=1, replication_factor=1,
                          placement_offset=0)
        results[client] = (cmd, h.ok(cmd))
    # "test" and "a" were used least recently and their results are forgotten:
    # a retry of "a" is refused as expired (never applied again); "c" is remembered.
    cmd_a, _ = results["a"]
    expired = h.refused(cmd_a, RefusalCode.REQUEST_EXPIRED)
    assert "a#1" in expired.message
    cmd_c, first_c = results["c"]
    assert h.run(cmd_c).duplicate
    assert h.run(cmd_c).offset == first_c.offset
    # A new request of a forgotten client is applied, and it is remembered again.
    cmd = CreateTopic(request_id=RequestId("a", 2), name="topic-a2", topic_id=uid(1),
                      partitions=1, replication_factor=1, placement_offset=0)
    first = h.ok(cmd)
    again = h.run(cmd)
    assert again.duplicate and again.offset == first.offset
    h.refused(cmd_a, RefusalCode.REQUEST_EXPIRED)


def test_retried_create_of_an_evicted_client_does_not_resurrect_a_deleted_topic() -> None:
    """Regression (shrunk from test_metadata_stateful): client c1's session was
    evicted (least recently used), the topic it created was deleted, and its
    retried CreateTopic was applied again: the topic came back under its old
    id with its epochs restarted at 0 (leader epoch 1 -> 0)."""
    h = Harness(max_results_per_client=6, max_clients=3)
    for b in range(3):
        h.ok(RegisterBroker(request_id=RequestId("c0", b + 1), broker_id=b,
                            endpoint=f"b{b}.home:9092", rack=f"rack{b % 2}",
                            incarnation_id=uid(b), fenced=False))
    creates = [
        CreateTopic(request_id=RequestId("c1", i + 1), name=name, topic_id=uid(100 + i),
                    partitions=1, replication_factor=1, placement_offset=7)
        for i, name in enumerate(["a", "c-1"])
    ]
    for cmd in creates:
        h.ok(cmd)
    assert h.part("c-1").replicas == (1,)
    h.ok(FenceBroker(request_id=RequestId("c0", 4), broker_id=1))
    before = h.part("c-1")
    assert before.leader is None and before.leader_epoch == 1  # offline, epoch moved on
    for client in ("c2", "c3"):  # two more clients: c1 is evicted (max_clients=3)
        h.refused(ReassignReplicas(request_id=RequestId(client, 1), topic="a", partition=0,
                                   replicas=()), RefusalCode.INVALID_REPLICAS)
    h.ok(DeleteTopic(request_id=RequestId("c0", 5), name="c-1"))

    retried = h.refused(creates[1], RefusalCode.REQUEST_EXPIRED)
    assert not retried.duplicate
    assert "c-1" not in h.fsm.image().topics, "a retried create must not resurrect the topic"
    h.refused(creates[0], RefusalCode.REQUEST_EXPIRED)  # "a" exists; refused all the same

    # The evicted client's high-water mark survives a snapshot and a replay.
    restored = MetadataStateMachine(max_results_per_client=6, max_clients=3)
    restored.restore(h.fsm.snapshot())
    assert restored.snapshot() == h.fsm.snapshot()
    assert restored.apply(encode_command(creates[1])).code == RefusalCode.REQUEST_EXPIRED
    replay = MetadataStateMachine(max_results_per_client=6, max_clients=3)
    for index, data in h.log:
        replay.apply_at(index, data)
    assert replay.snapshot() == h.fsm.snapshot()

    # A real re-creation is a new request with a new topic id, and starts at epoch 0.
    recreate = CreateTopic(request_id=RequestId("c1", 3), name="c-1", topic_id=uid(102),
                           partitions=1, replication_factor=1, placement_offset=7)
    h.ok(recreate)
    topic = h.fsm.image().topics["c-1"]
    assert topic.topic_id == uid(102) != creates[1].topic_id
    assert h.part("c-1").leader_epoch == 0
    check_invariants(h.fsm.image())


def test_read_only_commands_are_not_remembered() -> None:
    h = Harness()
    rid = h.rid()
    first = h.fsm.apply(encode_command(Read(request_id=rid)))
    second = h.fsm.apply(encode_command(Read(request_id=rid)))
    assert not second.duplicate and second.offset == first.offset + 1


# --------------------------------------------------------------------------
# Snapshots


def _busy(h: Harness) -> None:
    h.brokers(4, racks=2)
    h.ok(h.create("t", 4, 3, config={"compression.type": "zstd"}))
    h.ok(h.create("u.v", 2, 2))
    h.ok(FenceBroker(request_id=h.rid(), broker_id=1))
    _ = h.run(ElectLeaders(request_id=h.rid(), topic="t", kind="unclean"))
    h.run(h.create("t"))  # a remembered refusal
    h.ok(ElectLeaders(request_id=h.rid(), topic="t", kind="preferred"))


def test_snapshot_restore_gives_an_equal_state_and_keeps_retries_idempotent() -> None:
    h = Harness()
    _busy(h)
    data = h.fsm.snapshot()
    other = MetadataStateMachine()
    other.restore(data)
    assert other.image() == h.fsm.image()
    assert other.snapshot() == data, "snapshots are deterministic"
    index, last = h.log[-1]
    again = other.apply(last)
    assert again.duplicate and again.offset == index


def test_replaying_the_log_gives_an_equal_state() -> None:
    h = Harness()
    _busy(h)
    replay = MetadataStateMachine()
    for index, data in h.log:
        replay.apply_at(index, data)
    assert replay.image() == h.fsm.image()
    assert replay.snapshot() == h.fsm.snapshot()


def test_prepare_snapshot_captures_the_moment_of_the_call() -> None:
    h = Harness()
    _busy(h)
    expected = h.fsm.snapshot()
    encode_later = h.fsm.prepare_snapshot()
    h.ok(h.create("later", 3, 2))
    h.ok(FenceBroker(request_id=h.rid(), broker_id=0))
    assert encode_later() == expected


def test_restore_rejects_damage_and_leaves_state_unchanged() -> None:
    h = Harness()
    _busy(h)
    good = h.fsm.snapshot()
    target = Harness()
    target.brokers(1)
    before = target.fsm.image()
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x40
    magic, version, crc, payload = codec.decode(good)
    bad_inputs = [
        bytes(flipped),
        good[:-3],
        b"",
        codec.encode((magic, supported_metadata_versions()[1] + 1, crc, payload)),
        codec.encode(("something else", version, crc, payload)),
        codec.encode((magic, version, crc ^ 1, payload)),
        codec.encode((magic, version, 0, codec.encode((1, [], [("x",)], [])))),
    ]
    for bad in bad_inputs:
        with pytest.raises(CodecError):
            target.fsm.restore(bad)
        assert target.fsm.image() == before


def test_restore_rejects_a_well_checksummed_but_invalid_state() -> None:
    import zlib

    def envelope(body: Any) -> bytes:
        payload = codec.encode(body)
        return codec.encode(("streambus.metadata.snapshot", 1, zlib.crc32(payload), payload))

    fsm = MetadataStateMachine()
    for body in [
        (0, [(1, "h:1", None, uid(1), 1, "sleeping")], [], []),
        (0, [(1, "h:1", None, uid(1), 1, "active")] * 2, [], []),
        (-1, [], [], []),
        (0, [], [(("t", uid(1), (1, 14, 1, "delete", "none"), 1, 1), b"\x00" * 7)], []),
        (0, [], [(("t", uid(1), (1, 14, 9, "bad", "none"), 1, 1), b"")], []),
        (0, [], [], [("c", 1, -1, [(1, True, "ok", "", ("mystery",), 1)])]),
    ]:
        with pytest.raises(CodecError):
            fsm.restore(envelope(body))
        assert fsm.image().offset == 0


# --------------------------------------------------------------------------
# Untrusted bytes never raise and never change state


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_halt_the_replica_without_a_state_change(data: bytes) -> None:
    h = Harness()
    h.brokers(1)
    before = h.fsm.image()
    with pytest.raises(ReplicaHaltError) as info:
        h.fsm.apply(data)
    assert info.value.index == before.offset + 1
    assert h.fsm.image() is before


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_valid_commands_never_raise(data: st.DataObject) -> None:
    h = Harness()
    h.brokers(2)
    h.ok(h.create("t", 2, 2))
    raw = bytearray(encode_command(
        AlterIsr(request_id=h.rid(), topic="t", partition=0, leader=0, leader_epoch=0,
                 new_isr=(0, 1), partition_epoch=0)
    ))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    before = h.fsm.image()
    try:
        result = h.fsm.apply(bytes(raw))
    except ReplicaHaltError:
        assert h.fsm.image() is before  # stops without touching the state
    else:
        assert isinstance(result, ApplyResult)
    check_invariants(h.fsm.image())
