"""The batched create (CreateTopics, metadata version 2): per-topic outcomes,
exactly-once retries, whole-batch refusals, snapshots, and a property test
that a batch ends in the same state as the same topics created one by one."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streambus_consensus.config import NodeConfig
from streambus_consensus.errors import CodecError, CommandRefusedError
from streambus_consensus.metadata import (
    BATCH_CREATE_VERSION,
    MAX_PARTITIONS_PER_TOPIC,
    MAX_TOPICS_PER_BATCH,
    OK,
    ApplyResult,
    ChangeKind,
    Command,
    CreateTopic,
    CreateTopics,
    MetadataStateMachine,
    RefusalCode,
    RegisterBroker,
    RequestId,
    SetMetadataVersion,
    TopicOutcome,
    TopicSpec,
    decode_command,
    encode_command,
)
from streambus_consensus.metadata.store import AsyncMetadataStore, MetadataStore, NewTopic
from streambus_consensus.provision import generate_secret
from streambus_consensus.testing.harness import free_ports


def uid(n: int) -> str:
    return str(uuid.UUID(int=n + 1))


class Cluster:
    """A state machine with ``brokers`` active brokers, at metadata version 2."""

    def __init__(self, brokers: int = 3, *, upgrade: bool = True) -> None:
        self.fsm = MetadataStateMachine()
        self.seq = 0
        for b in range(brokers):
            self.ok(RegisterBroker(request_id=self.rid(), broker_id=b, endpoint=f"h{b}:9092",
                                   rack=None, incarnation_id=uid(b), fenced=False))
        if upgrade:
            self.ok(SetMetadataVersion(request_id=self.rid(), level=BATCH_CREATE_VERSION))

    def rid(self) -> RequestId:
        self.seq += 1
        return RequestId("test", self.seq)

    def run(self, cmd: Command) -> ApplyResult:
        return self.fsm.apply(encode_command(cmd))

    def ok(self, cmd: Command) -> ApplyResult:
        result = self.run(cmd)
        assert result.ok, result
        return result


def spec(name: str, n: int, partitions: int = 3, rf: int = 3, **config: str | int) -> TopicSpec:
    return TopicSpec(name=name, topic_id=uid(1000 + n), partitions=partitions,
                     replication_factor=rf, config=config, placement_offset=n)


def test_each_topic_succeeds_or_fails_on_its_own() -> None:
    c = Cluster()
    c.ok(CreateTopic(request_id=c.rid(), name="exists", topic_id=uid(1), partitions=1,
                     replication_factor=1, config={}, placement_offset=0))
    result = c.ok(CreateTopics(request_id=c.rid(), topics=(
        spec("a", 1), spec("exists", 2), spec("b", 3, partitions=0), spec("c", 4, rf=4),
        spec("bad name", 5), spec("d", 6, **{"min.insync.replicas": 9}), spec("a", 7),
        spec("a.x", 8), spec("a_x", 9), spec("e", 10, partitions=1, rf=1))))
    outcomes: tuple[TopicOutcome, ...] = result.value
    assert [(o.name, o.code) for o in outcomes] == [
        ("a", OK), ("exists", RefusalCode.TOPIC_EXISTS),
        ("b", RefusalCode.INVALID_PARTITIONS), ("c", RefusalCode.NOT_ENOUGH_BROKERS),
        ("bad name", RefusalCode.INVALID_TOPIC_NAME), ("d", RefusalCode.INVALID_CONFIG),
        ("a", RefusalCode.TOPIC_EXISTS), ("a.x", OK), ("a_x", RefusalCode.TOPIC_NAME_COLLISION),
        ("e", OK)]
    assert all(o.ok == (o.topic is not None) for o in outcomes)
    assert all(o.message for o in outcomes if not o.ok)
    assert result.message == "3 of 10 topics created"
    image = c.fsm.image()
    assert sorted(image.topics) == ["a", "a.x", "e", "exists"]
    assert image.topics["a"] == outcomes[0].topic
    assert len(image.partitions["a"]) == 3
    kinds = [change.kind for change in result.changes]
    assert kinds.count(ChangeKind.TOPIC_CREATED) == 3
    assert kinds.count(ChangeKind.PARTITION_CREATED) == 3 + 3 + 1


def test_a_topic_id_used_twice_in_one_batch_is_refused_the_second_time() -> None:
    c = Cluster()
    first, second = spec("x", 1), spec("y", 1)
    outcomes = c.ok(CreateTopics(request_id=c.rid(), topics=(first, second))).value
    assert [o.code for o in outcomes] == [OK, RefusalCode.TOPIC_ID_EXISTS]


def test_a_retried_batch_gets_the_same_outcomes_and_creates_nothing_twice() -> None:
    c = Cluster()
    rid = c.rid()
    batch = CreateTopics(request_id=rid, topics=(spec("a", 1), spec("b", 2)))
    first = c.ok(batch)
    offset = c.fsm.offset
    again = c.ok(batch)
    assert again.duplicate and again.changes == () and again.offset == first.offset
    assert again.value == first.value
    assert c.fsm.offset == offset + 1 and sorted(c.fsm.image().topics) == ["a", "b"]
    # Remembered across a snapshot too.
    restored = MetadataStateMachine()
    restored.restore(c.fsm.snapshot())
    assert restored.snapshot() == c.fsm.snapshot()
    replay = restored.apply(encode_command(batch))
    assert replay.duplicate and replay.value == first.value


@pytest.mark.parametrize(("topics", "message"), [
    ((), "at least one topic"),
    ((spec("a", 1, partitions=MAX_PARTITIONS_PER_TOPIC), spec("b", 2, partitions=1)),
     f"at most {MAX_PARTITIONS_PER_TOPIC} partitions in all"),
])
def test_a_batch_past_its_limits_is_refused_as_a_whole(
        topics: tuple[TopicSpec, ...], message: str) -> None:
    c = Cluster()
    result = c.run(CreateTopics(request_id=c.rid(), topics=topics))
    assert not result.ok and result.code == RefusalCode.INVALID_PARTITIONS
    assert message in result.message
    assert not c.fsm.image().topics


def test_too_many_topics_or_a_wrong_field_never_reach_the_log() -> None:
    too_many = tuple(spec(f"t{i}", i) for i in range(MAX_TOPICS_PER_BATCH + 1))
    with pytest.raises(CodecError, match="at most 1000 allowed"):
        encode_command(CreateTopics(request_id=RequestId("c", 1), topics=too_many))
    with pytest.raises(CodecError, match="expected a TopicSpec"):
        encode_command(CreateTopics(request_id=RequestId("c", 1),
                                    topics=({"name": "a"},)))  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="partitions: expected an integer"):
        encode_command(CreateTopics(request_id=RequestId("c", 1), topics=(
            TopicSpec(name="a", topic_id=uid(1), partitions="3",  # type: ignore[arg-type]
                      replication_factor=1),)))


def test_the_command_round_trips_and_carries_version_2() -> None:
    command = CreateTopics(request_id=RequestId("c", 7), topics=(
        spec("a", 1, **{"retention.ms": 5}), spec("b", 2)))
    data = encode_command(command)
    assert decode_command(data) == command


def test_below_version_2_the_batch_is_refused_on_every_replica() -> None:
    c = Cluster(upgrade=False)
    result = c.run(CreateTopics(request_id=c.rid(), topics=(spec("a", 1),)))
    assert not result.ok and result.code == RefusalCode.FEATURE_NOT_ENABLED
    assert "needs metadata version 2; the cluster's is 1" in result.message
    assert not c.fsm.image().topics


_names = st.sampled_from(["a", "b", "a.b", "a_b", "c", "", "..", "d"])
_specs = st.lists(st.tuples(_names, st.integers(-1, 4), st.integers(0, 4),
                            st.integers(0, 5), st.sampled_from([{}, {"min.insync.replicas": 3}])),
                  max_size=8)


@settings(max_examples=150, deadline=None)
@given(existing=st.lists(_names, max_size=3), entries=_specs)
def test_a_batch_ends_where_the_same_creates_one_by_one_end(
        existing: list[str], entries: list[tuple[str, int, int, int, dict[str, int]]]) -> None:
    batched, single = Cluster(), Cluster()
    for i, name in enumerate(existing):
        for c in (batched, single):
            c.run(CreateTopic(request_id=c.rid(), name=name, topic_id=uid(500 + i),
                              partitions=1, replication_factor=1, config={},
                              placement_offset=i))
    specs = tuple(TopicSpec(name=name, topic_id=uid(900 + id_), partitions=p,
                            replication_factor=rf, config=config, placement_offset=i)
                  for i, (name, p, rf, id_, config) in enumerate(entries))
    result = batched.run(CreateTopics(request_id=batched.rid(), topics=specs))
    singles = [single.run(CreateTopic(request_id=single.rid(), name=s.name,
                                      topic_id=s.topic_id, partitions=s.partitions,
                                      replication_factor=s.replication_factor,
                                      config=s.config, placement_offset=s.placement_offset))
               for s in specs]
    if not specs:
        assert result.code == RefusalCode.INVALID_PARTITIONS
        return
    assert result.ok
    assert [o.code for o in result.value] == [r.code for r in singles]
    assert [o.topic for o in result.value] == [r.value for r in singles]
    a, b = batched.fsm.image(), single.fsm.image()
    assert dict(a.topics) == dict(b.topics)
    assert dict(a.partitions) == dict(b.partitions)
    # The batch's changes are the singles' changes, in the same order.
    assert list(result.changes) == [c for r in singles for c in r.changes]


# --------------------------------------------------------------------------
# MetadataStore.create_topics on an in-process node (real loopback TCP)


def test_the_store_creates_a_batch_in_one_entry_and_falls_back_below_version_2(
        tmp_path: Path) -> None:
    (port,) = free_ports(1)
    config = NodeConfig(node_id="n1", cluster={"n1": f"127.0.0.1:{port}"},
                        cluster_secret=generate_secret(), data_dir=str(tmp_path / "n1"),
                        broker_session_timeout=86_400.0, bootstrap_metadata_version=1)
    with MetadataStore.open(config) as store:
        store.node.wait_for_leader(10)
        for broker_id in range(3):
            store.register_broker(broker_id, f"127.0.0.1:{9092 + broker_id}", fenced=False)
        # Version 1: one entry per topic, the same per-topic outcomes.
        before = store.image().offset
        outcomes = store.create_topics([NewTopic("a", 2, 3), NewTopic("a", 1, 1),
                                        NewTopic("b c", 1, 1)])
        assert [(o.name, o.code) for o in outcomes] == [
            ("a", OK), ("a", "topic_exists"), ("b c", "invalid_topic_name")]
        assert store.image().offset == before + 3
        with pytest.raises(CommandRefusedError) as refused:
            store.create_topics([NewTopic("c", 1, 1)], request_id=store.next_request_id())
        assert refused.value.code == "feature_not_enabled"
        assert "CreateTopics needs metadata version 2" in str(refused.value)

        store.upgrade_metadata_version(BATCH_CREATE_VERSION)
        rid = store.next_request_id()
        before = store.image().offset
        batch = [NewTopic(f"t{i}", 3, 3, {"retention.ms": 1000}) for i in range(100)]
        first = store.create_topics([*batch, NewTopic("a", 1, 1)], request_id=rid)
        assert store.image().offset == before + 1
        assert [o.ok for o in first] == [True] * 100 + [False]
        assert first[0].topic is not None and first[0].topic.config.retention_ms == 1000
        leaders = {store.image().partitions[f"t{i}"][0].leader for i in range(100)}
        assert leaders == {0, 1, 2}  # placement offsets differ across the batch
        again = store.create_topics(batch, request_id=rid)  # a retry: same answer
        assert again == first and store.image().offset == before + 2

        async def twin() -> list[TopicOutcome]:
            outcomes: list[TopicOutcome] = await AsyncMetadataStore(store).create_topics(
                [NewTopic("async-1", 1, 1), NewTopic("t0", 1, 1)])
            return outcomes

        assert [o.code for o in asyncio.run(twin())] == [OK, "topic_exists"]
