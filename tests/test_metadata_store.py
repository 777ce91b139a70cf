"""MetadataStore, the API the broker imports, on in-process nodes over real loopback TCP.

Single-node and three-node clusters of ``MetadataStore.open(NodeConfig(...))``
in this process: registration and unfencing through heartbeats, topic
operations and their refusals, request-id idempotency, local versus
linearizable reads, watches, the asyncio twin and the leader-only controller.
Every store is closed by its fixture, whatever the test does.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from streambus_consensus.config import NodeConfig
from streambus_consensus.errors import CommandRefusedError, ConsensusError
from streambus_consensus.metadata import (
    Broker,
    BrokerState,
    ChangeKind,
    MetadataImage,
    Partition,
    RequestId,
    Topic,
)
from streambus_consensus.metadata.controller import Controller
from streambus_consensus.metadata.feed import MetadataEvent, WatchedStateMachine
from streambus_consensus.metadata.store import AsyncMetadataStore, MetadataStore
from streambus_consensus.provision import generate_secret
from streambus_consensus.raft.node import RaftNode
from streambus_consensus.testing.harness import free_ports, wait_until

SECRET = generate_secret()

FAST = {"election_timeout_min": 0.4, "election_timeout_max": 0.8, "heartbeat_interval": 0.05}
"""Default election timeouts (no spurious elections on two busy cores), quicker heartbeats."""

FAST_SINGLE = {"election_timeout_min": 0.1, "election_timeout_max": 0.15,
               "heartbeat_interval": 0.03, "tick_interval": 0.03}
"""A single node has nobody to disagree with: it may elect itself sooner."""

LONG_SESSION = 60.0
"""A broker session no test outlives: the controller fences nobody."""


def configs(size: int, data_root: Path | None = None, **settings: Any) -> list[NodeConfig]:
    """Configs of a ``size``-node loopback cluster (memory storage unless ``data_root``)."""
    ports = free_ports(size)
    cluster = {f"n{i + 1}": f"127.0.0.1:{port}" for i, port in enumerate(ports)}
    return [
        NodeConfig(node_id=node_id, cluster=cluster, cluster_secret=SECRET,
                   data_dir=None if data_root is None else str(data_root / node_id),
                   **{**(FAST_SINGLE if size == 1 else FAST), **settings})
        for node_id in cluster
    ]


def leader_of(stores: list[MetadataStore], timeout: float = 10.0) -> MetadataStore:
    """The store whose node leads, once every running store agrees on it."""
    def agreed() -> MetadataStore | None:
        running = [s for s in stores if s.node.state.value != "stopped"]
        leaders = [s for s in running if s.node.is_leader]
        if len(leaders) != 1:
            return None
        leader_id = leaders[0].node.node_id
        return leaders[0] if all(s.node.leader_id == leader_id for s in running) else None

    return wait_until(agreed, timeout, "an agreed leader", interval=0.01)


@pytest.fixture
def open_cluster() -> Iterator[Callable[..., list[MetadataStore]]]:
    """Open clusters of stores; every store is closed when the test ends."""
    opened: list[MetadataStore] = []

    def factory(size: int = 1, data_root: Path | None = None,
                **settings: Any) -> list[MetadataStore]:
        stores = []
        for config in configs(size, data_root, **settings):
            store = MetadataStore.open(config)
            opened.append(store)
            stores.append(store)
        leader_of(stores)
        return stores

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(open_cluster: Callable[..., list[MetadataStore]]) -> MetadataStore:
    """A single-node store with three active brokers (registered unfenced) and a
    session timeout no test outlives."""
    (single,) = open_cluster(1, broker_session_timeout=LONG_SESSION)
    for broker_id in range(3):
        single.register_broker(broker_id, f"127.0.0.1:{9092 + broker_id}", fenced=False)
    return single


class Brokers:
    """Brokers that heartbeat through a store every ``interval`` on a thread of
    their own, as real brokers do; :meth:`silence` one to make it miss its session.

    ``via`` picks the store each heartbeat goes through (any running one
    forwards to the leader); errors while there is no leader are ignored.
    """

    def __init__(self, via: Callable[[], MetadataStore], interval: float) -> None:
        self._via = via
        self._interval = interval
        self.epochs: dict[int, int] = {}
        self._silent: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-brokers", daemon=True)
        self._thread.start()

    def register(self, store: MetadataStore, broker_id: int, rack: str | None = None) -> Broker:
        broker = store.register_broker(broker_id, f"127.0.0.1:{19092 + broker_id}", rack=rack)
        with self._lock:
            self.epochs[broker_id] = broker.broker_epoch
        return broker

    def silence(self, broker_id: int) -> None:
        with self._lock:
            self._silent.add(broker_id)

    def resume(self, broker_id: int) -> None:
        with self._lock:
            self._silent.discard(broker_id)

    def silence_all(self) -> None:
        with self._lock:
            self._silent.update(self.epochs)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                beating = [(b, e) for b, e in self.epochs.items() if b not in self._silent]
            for broker_id, epoch in beating:
                # No leader right now: a real broker retries at its next interval.
                with contextlib.suppress(ConsensusError):
                    self._via().heartbeat(broker_id, epoch)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def make_brokers() -> Iterator[Callable[..., Brokers]]:
    """Build :class:`Brokers`; their threads are stopped when the test ends."""
    made: list[Brokers] = []

    def factory(via: Callable[[], MetadataStore], interval: float) -> Brokers:
        brokers = Brokers(via, interval)
        made.append(brokers)
        return brokers

    yield factory
    for brokers in made:
        brokers.close()


def state_of(image: MetadataImage) -> tuple[dict[int, Broker], dict[str, Topic],
                                            dict[tuple[str, int], Partition]]:
    """An image's records as plain dicts (equal when the records are)."""
    partitions = {(p.topic, p.index): p for parts in image.partitions.values() for p in parts}
    return dict(image.brokers), dict(image.topics), partitions


class Recorder:
    """A watch listener that keeps every event and the thread it ran on."""

    def __init__(self) -> None:
        self.events: list[MetadataEvent] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, event: MetadataEvent) -> None:
        with self._lock:
            self.events.append(event)
            self.threads.add(threading.current_thread().name)

    def snapshot(self) -> list[MetadataEvent]:
        with self._lock:
            return list(self.events)

    def wait_for(self, offset: int, timeout: float = 5.0) -> list[MetadataEvent]:
        """Every event, once one at ``offset`` or beyond has arrived."""
        return wait_until(lambda: (events := self.snapshot()) and events[-1].offset >= offset
                          and events, timeout, f"an event at offset {offset}")


def replay(events: list[MetadataEvent]) -> tuple[dict[int, Broker], dict[str, Topic],
                                                  dict[tuple[str, int], Partition]]:
    """Rebuild the metadata from a watcher's events, as a broker would."""
    brokers: dict[int, Broker] = {}
    topics: dict[str, Topic] = {}
    partitions: dict[tuple[str, int], Partition] = {}
    for event in events:
        if event.image is not None:
            brokers, topics, partitions = state_of(event.image)
            continue
        for change in event.changes:
            record = change.record
            if change.kind is ChangeKind.BROKER_UNREGISTERED:
                del brokers[change.key]  # type: ignore[arg-type]
            elif change.kind is ChangeKind.TOPIC_DELETED:
                del topics[change.key]  # type: ignore[arg-type]
                partitions = {k: p for k, p in partitions.items() if k[0] != change.key}
            elif isinstance(record, Broker):
                brokers[record.broker_id] = record
            elif isinstance(record, Topic):
                topics[record.name] = record
            else:
                partitions[(record.topic, record.index)] = record
    return brokers, topics, partitions


def assert_unchanged(before: MetadataImage, after: MetadataImage) -> None:
    assert state_of(after) == state_of(before)


# --------------------------------------------------------------------------
# Brokers: registration and unfencing through heartbeats


def test_registered_broker_is_fenced_until_it_heartbeats(
        open_cluster: Callable[..., list[MetadataStore]]) -> None:
    (store,) = open_cluster(1, broker_session_timeout=0.5)
    broker = store.register_broker(7, "127.0.0.1:9092", rack="r1")
    assert broker.state is BrokerState.FENCED
    assert broker.broker_epoch == store.image().offset, "the epoch is the registration offset"
    time.sleep(0.6)  # a full session passes with no heartbeat: the controller must not unfence
    assert store.image().brokers[7].state is BrokerState.FENCED
    assert store.controller.unfenced_by_controller == 0

    seen = store.heartbeat(7, broker.broker_epoch)
    assert seen == broker, "heartbeat answers the registration as this node knows it"
    wait_until(lambda: store.image().brokers[7].state is BrokerState.ACTIVE, 5,
               "the controller to unfence broker 7")
    # Counted once the controller's proposal returns, just after the image changed.
    wait_until(lambda: store.controller.unfenced_by_controller == 1, 5, "the count")
    assert store.image().brokers[7].broker_epoch == broker.broker_epoch


def test_heartbeat_with_a_stale_epoch_does_not_unfence(
        open_cluster: Callable[..., list[MetadataStore]]) -> None:
    (store,) = open_cluster(1, broker_session_timeout=0.5)
    old = store.register_broker(1, "127.0.0.1:9092", incarnation_id=_uuid(1))
    new = store.register_broker(1, "127.0.0.1:9092", incarnation_id=_uuid(2))
    assert new.broker_epoch > old.broker_epoch, "a new incarnation bumps the epoch"
    again = store.register_broker(1, "127.0.0.1:9092", incarnation_id=_uuid(2))
    assert again == new, "the same incarnation again is a no-op"
    deadline = time.monotonic() + 0.75
    while time.monotonic() < deadline:  # heartbeats of the old incarnation only
        store.heartbeat(1, old.broker_epoch)
        time.sleep(0.05)
    assert store.image().brokers[1].state is BrokerState.FENCED
    store.heartbeat(1, new.broker_epoch)
    wait_until(lambda: store.image().brokers[1].is_active, 5, "the new incarnation's unfencing")


def test_heartbeats_of_an_older_incarnation_do_not_keep_the_new_one_alive(
        open_cluster: Callable[..., list[MetadataStore]]) -> None:
    session = 0.5
    (store,) = open_cluster(1, broker_session_timeout=session)
    old = store.register_broker(1, "127.0.0.1:9092", incarnation_id=_uuid(1), fenced=False)
    new = store.register_broker(1, "127.0.0.1:9092", incarnation_id=_uuid(2), fenced=False)
    assert new.is_active and new.broker_epoch > old.broker_epoch
    # Only the old process (a zombie) keeps heartbeating, every 50 ms.
    wait_until(lambda: store.heartbeat(1, old.broker_epoch) and (
        store.image().brokers[1].state is BrokerState.FENCED), session * 6,
        "the silent new incarnation to be fenced")
    wait_until(lambda: store.controller.fenced_by_controller == 1, 5, "the count")
    wait_until(lambda: store.heartbeat(1, new.broker_epoch) and store.image().brokers[1].is_active,
               session * 6, "the new incarnation's own heartbeats to unfence it")


def _uuid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


# --------------------------------------------------------------------------
# Topics


def test_create_describe_list_and_delete_a_topic(store: MetadataStore) -> None:
    topic = store.create_topic("orders", 3, 3, config={"retention.ms": 3600_000})
    assert (topic.name, topic.partition_count, topic.replication_factor) == ("orders", 3, 3)
    assert topic.config.retention_ms == 3600_000
    found = store.describe_topic("orders")
    assert found is not None
    described, partitions = found
    assert described == topic
    assert [p.index for p in partitions] == [0, 1, 2]
    for p in partitions:
        assert sorted(p.replicas) == [0, 1, 2]
        assert p.isr == p.replicas and p.leader == p.replicas[0]
        assert (p.leader_epoch, p.partition_epoch) == (0, 0)
    assert len({p.leader for p in partitions}) == 3, "leaders are spread over the brokers"
    assert store.list_topics() == ["orders"]

    store.delete_topic("orders")
    assert store.describe_topic("orders") is None
    assert store.list_topics() == []
    recreated = store.create_topic("orders", 1, 1)
    assert recreated.topic_id != topic.topic_id, "a new topic gets a new id"


def test_alter_config_and_add_partitions(store: MetadataStore) -> None:
    store.create_topic("events", 2, 2)
    changed = store.alter_topic_config("events", {"cleanup.policy": "compact",
                                                  "min.insync.replicas": "2"})
    assert changed.config.cleanup_policy == "compact"
    assert changed.config.min_insync_replicas == 2
    reset = store.alter_topic_config("events", delete_configs=("cleanup.policy",))
    assert reset.config.cleanup_policy == "delete"
    assert reset.config.min_insync_replicas == 2

    grown = store.add_partitions("events", 5)
    assert grown.partition_count == 5
    found = store.describe_topic("events")
    assert found is not None
    assert [p.index for p in found[1]] == [0, 1, 2, 3, 4]
    assert all(len(p.replicas) == 2 for p in found[1])


REFUSALS: list[tuple[str, Callable[[MetadataStore], object], str]] = [
    ("create existing", lambda s: s.create_topic("taken", 1, 1), "topic_exists"),
    ("collision", lambda s: s.create_topic("a.b", 1, 1), "topic_name_collision"),
    ("invalid name", lambda s: s.create_topic("no spaces", 1, 1), "invalid_topic_name"),
    ("dot name", lambda s: s.create_topic("..", 1, 1), "invalid_topic_name"),
    ("zero partitions", lambda s: s.create_topic("t", 0, 1), "invalid_partitions"),
    ("rf zero", lambda s: s.create_topic("t", 1, 0), "invalid_replication_factor"),
    ("rf above brokers", lambda s: s.create_topic("t", 1, 4), "not_enough_brokers"),
    ("unknown config", lambda s: s.create_topic("t", 1, 1, config={"x": 1}), "invalid_config"),
    ("min isr above rf", lambda s: s.create_topic("t", 1, 2,
                                                  config={"min.insync.replicas": 3}),
     "invalid_config"),
    ("delete unknown", lambda s: s.delete_topic("nope"), "unknown_topic"),
    ("alter unknown", lambda s: s.alter_topic_config("nope", {"retention.ms": 1}),
     "unknown_topic"),
    ("bad config value", lambda s: s.alter_topic_config("taken", {"retention.ms": "soon"}),
     "invalid_config"),
    ("fewer partitions", lambda s: s.add_partitions("taken", 1), "invalid_partitions"),
    ("unknown broker", lambda s: s.fence_broker(99), "unknown_broker"),
    ("stale broker epoch", lambda s: s.fence_broker(0, 1_000_000), "stale_broker_epoch"),
]


@pytest.mark.parametrize(("what", "call", "code"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_raise_a_typed_error_and_change_nothing(
        store: MetadataStore, what: str, call: Callable[[MetadataStore], object],
        code: str) -> None:
    store.create_topic("taken", 2, 1)
    store.create_topic("a_b", 1, 1)
    before = store.image()
    with pytest.raises(CommandRefusedError) as refused:
        call(store)
    assert refused.value.code == code, refused.value
    assert not refused.value.retriable, "a refusal repeats the same way"
    assert str(refused.value).startswith(code + ": ") and len(str(refused.value)) > len(code) + 2
    after = store.image()
    assert_unchanged(before, after)
    assert after.offset > before.offset, "the refusal went through the log"


# --------------------------------------------------------------------------
# Request ids: a retry returns the original result and applies once


def test_a_retried_request_returns_the_original_result_and_applies_once(
        store: MetadataStore) -> None:
    recorder = Recorder()
    start = store.image().offset
    store.watch(recorder, from_offset=start)
    rid = store.next_request_id()
    first = store.create_topic("once", 3, 3, request_id=rid)
    applied_at = store.image().offset
    # The retry chooses a new topic id and placement offset, as a caller
    # retrying after a timeout would: the original result still comes back.
    again = store.create_topic("once", 3, 3, request_id=rid)
    assert again == first
    assert store.list_topics() == ["once"]
    found = store.describe_topic("once")
    assert found is not None and found[0].topic_id == first.topic_id

    store.delete_topic("once")
    after_delete = store.create_topic("once", 3, 3, request_id=rid)
    assert after_delete == first, "the remembered result, not a new topic"
    assert store.describe_topic("once") is None, "the retry did not create it again"

    store.create_topic("taken-twice", 1, 1)
    last_change = store.image().offset
    refused_rid = store.next_request_id()
    for _ in range(2):  # a refusal is remembered too
        with pytest.raises(CommandRefusedError, match="topic_exists"):
            store.create_topic("taken-twice", 1, 1, request_id=refused_rid)

    events = recorder.wait_for(last_change)
    created = [e.offset for e in events for c in e.changes
               if c.kind is ChangeKind.TOPIC_CREATED and c.key == "once"]
    assert created == [applied_at], "created exactly once"


def test_request_ids_are_unique_per_store_and_increase(
        open_cluster: Callable[..., list[MetadataStore]]) -> None:
    (store,) = open_cluster(1)
    ids = [store.next_request_id() for _ in range(3)]
    assert [r.seq for r in ids] == sorted({r.seq for r in ids})
    assert {r.client_id for r in ids} == {store.client_id}
    other = MetadataStore(store.node, store.state_machine)
    assert other.client_id != store.client_id


# --------------------------------------------------------------------------
# Reads: local with their offset, or linearizable through the log


def test_local_reads_carry_their_offset_and_linearizable_reads_see_every_write(
        open_cluster: Callable[..., list[MetadataStore]], tmp_path: Path) -> None:
    stores = open_cluster(3, tmp_path, broker_session_timeout=LONG_SESSION)
    leader = leader_of(stores)
    followers = [s for s in stores if s is not leader]
    for broker_id in range(3):
        leader.register_broker(broker_id, f"127.0.0.1:{9092 + broker_id}", fenced=False)
    for i in range(30):
        name = f"lin-{i}"
        leader.create_topic(name, 1, 3)
        written_at = leader.image().offset
        reader = followers[i % 2]
        image = reader.image()  # local: may trail, and says how far it got
        assert (name in image.topics) == (image.offset >= written_at), (
            f"a local image at offset {image.offset} must hold exactly the writes up to it "
            f"(topic written at {written_at})")
        found = reader.describe_topic(name, linearizable=True)
        assert found is not None, "a linearizable read sees every acknowledged write"
        assert found[0].name == name
        assert reader.image().offset >= written_at
    last_written = leader.image().offset
    whole = followers[0].read_image()
    assert set(whole.topics) == {f"lin-{i}" for i in range(30)}
    # ReadIndex: the read reflects every write before it and writes no entry.
    assert whole.offset == last_written == leader.image().offset


def test_topics_created_on_any_store_are_seen_by_every_store(
        open_cluster: Callable[..., list[MetadataStore]]) -> None:
    stores = open_cluster(3, broker_session_timeout=LONG_SESSION)
    leader = leader_of(stores)
    follower = next(s for s in stores if s is not leader)
    for broker_id in range(3):
        follower.register_broker(broker_id, f"127.0.0.1:{9092 + broker_id}", fenced=False)
    on_leader = leader.create_topic("from-leader", 3, 3)
    on_follower = follower.create_topic("from-follower", 3, 3)
    assert follower.describe_topic("from-follower") is not None, (
        "the proposer's own replica has applied its write when the call returns")
    for s in stores:
        wait_until(lambda s=s: {"from-leader", "from-follower"} <= set(s.list_topics()),
                   5, f"{s.node.node_id} to apply both")
        assert s.image().topics["from-leader"] == on_leader
        assert s.image().topics["from-follower"] == on_follower
    wait_until(lambda: len({s.image().offset for s in stores}) == 1, 5, "equal offsets")
    images = [s.image() for s in stores]
    assert all(state_of(image) == state_of(images[0]) for image in images)


def test_a_request_id_retried_on_another_node_applies_once(
        open_cluster: Callable[..., list[MetadataStore]]) -> None:
    stores = open_cluster(3, broker_session_timeout=LONG_SESSION)
    leader = leader_of(stores)
    follower = next(s for s in stores if s is not leader)
    for broker_id in range(3):
        leader.register_broker(broker_id, f"127.0.0.1:{9092 + broker_id}", fenced=False)
    rid = RequestId("broker-7-admin", 41)
    via_follower = follower.create_topic("moved", 3, 3, request_id=rid)
    via_leader = leader.create_topic("moved", 3, 3, request_id=rid)
    assert via_leader == via_follower
    with pytest.raises(CommandRefusedError) as refused:
        leader.create_topic("moved", 3, 3, request_id=RequestId("broker-7-admin", 42))
    assert refused.value.code == "topic_exists"


# --------------------------------------------------------------------------
# Watches


def test_watch_delivers_every_change_once_in_log_order_with_offsets(
        store: MetadataStore) -> None:
    recorder = Recorder()
    watch = store.watch(recorder, from_offset=0)
    registered = sorted(b.broker_epoch for b in store.image().brokers.values())
    offsets = []
    for step in (
        lambda: store.create_topic("a", 2, 3),
        lambda: store.create_topic("b", 1, 1),
        lambda: store.alter_topic_config("a", {"retention.ms": 1000}),
        lambda: store.add_partitions("b", 3),
        lambda: store.fence_broker(1),
        lambda: store.unfence_broker(1),
        lambda: store.delete_topic("a"),
        lambda: store.begin_controlled_shutdown(2),
        lambda: store.unregister_broker(2),
    ):
        step()
        offsets.append(store.image().offset)
    events = recorder.wait_for(offsets[-1])
    got = [e.offset for e in events]
    assert got == sorted(set(got)), "strictly increasing: in log order, none twice"
    assert got == registered + offsets, "one event per entry that changed something"
    assert all(not e.is_reset for e in events)
    kinds = [[str(c.kind) for c in e.changes] for e in events]
    assert kinds[3] == ["topic_created"] + ["partition_created"] * 2
    assert kinds[5] == ["config_changed"]
    assert kinds[6] == ["topic_changed"] + ["partition_created"] * 2
    assert kinds[7][0] == "broker_fenced" and set(kinds[7][1:]) <= {"partition_changed"}
    assert replay(events) == state_of(store.image()), "the changes rebuild the metadata"
    # The watch moves its cursor just after the listener returns.
    wait_until(lambda: watch.offset == offsets[-1], 5, "the watch's cursor")
    assert watch.delivered == len(events)
    assert not any(name.startswith("raft-") for name in recorder.threads), (
        "listeners run off the Raft thread")


def test_watch_resumes_after_an_offset(store: MetadataStore) -> None:
    for i in range(5):
        store.create_topic(f"before-{i}", 1, 1)
    resume_at = store.image().offset
    for i in range(5):
        store.create_topic(f"after-{i}", 1, 1)
    recorder = Recorder()
    store.watch(recorder, from_offset=resume_at)
    events = recorder.wait_for(store.image().offset)
    assert all(e.offset > resume_at and not e.is_reset for e in events)
    created = [c.key for e in events for c in e.changes if c.kind is ChangeKind.TOPIC_CREATED]
    assert created == [f"after-{i}" for i in range(5)]


def test_watch_without_an_offset_starts_from_a_full_image(store: MetadataStore) -> None:
    store.create_topic("existing", 2, 2)
    recorder = Recorder()
    store.watch(recorder)
    first = recorder.wait_for(store.image().offset)[0]
    assert first.is_reset and first.changes == ()
    assert first.image is not None and first.offset == first.image.offset
    assert state_of(first.image) == state_of(store.image())
    store.create_topic("later", 1, 1)
    events = recorder.wait_for(store.image().offset)
    assert [e.is_reset for e in events] == [True, False]
    assert replay(events) == state_of(store.image())


def test_a_watcher_that_raises_keeps_receiving(
        store: MetadataStore, caplog: pytest.LogCaptureFixture) -> None:
    received: list[int] = []

    def flaky(event: MetadataEvent) -> None:
        received.append(event.offset)
        if len(received) % 2:
            raise RuntimeError(f"listener bug at {event.offset}")

    watch = store.watch(flaky, from_offset=store.image().offset)
    for i in range(4):
        store.create_topic(f"t{i}", 1, 1)
    wait_until(lambda: received and received[-1] == store.image().offset, 5, "every event")
    assert len(received) == 4 and received == sorted(received)
    wait_until(lambda: watch.delivered == 4, 5, "the watch to count the last delivery")
    logged = [r for r in caplog.records
              if r.name == "streambus_consensus.metadata.feed" and r.exc_info]
    assert len(logged) == 2, "each exception is logged, with its traceback"


def test_a_watcher_behind_the_retained_window_gets_a_reset(
        open_cluster: Callable[..., list[MetadataStore]]) -> None:
    (config,) = configs(1, broker_session_timeout=LONG_SESSION)
    machine = WatchedStateMachine(retain=4)
    store = MetadataStore(RaftNode(config, machine), machine, owns_node=True)
    store.start()
    try:
        store.node.wait_for_leader(5)
        store.register_broker(0, "127.0.0.1:9092", fenced=False)
        release = threading.Event()
        recorder = Recorder()

        def slow(event: MetadataEvent) -> None:
            recorder(event)
            release.wait(10)

        store.watch(slow, from_offset=store.image().offset)
        store.create_topic("first", 1, 1)
        wait_until(lambda: recorder.snapshot(), 5, "the first event")
        for i in range(10):  # the window holds 4: the watcher falls out of it
            store.create_topic(f"t{i}", 1, 1)
        release.set()
        events = recorder.wait_for(store.image().offset)
        resets = [e for e in events if e.is_reset]
        assert len(resets) == 1 and machine.feed.resets == 1
        assert events[0].changes[0].key == "first"
        assert resets[0] is events[1], "the reset follows the last event delivered"
        assert [e.offset for e in events] == sorted({e.offset for e in events})
        assert replay(events) == state_of(store.image())

        late = Recorder()
        store.watch(late, from_offset=1)  # older than the window: a reset first
        late_events = late.wait_for(store.image().offset)
        assert late_events[0].is_reset and machine.feed.resets == 2
        assert replay(late_events) == state_of(store.image())
    finally:
        store.close()


# --------------------------------------------------------------------------
# The asyncio twin


def test_async_store_awaits_every_operation() -> None:
    (config,) = configs(1, broker_session_timeout=LONG_SESSION)

    async def scenario() -> None:
        store = await AsyncMetadataStore.open(config)
        try:
            await asyncio.to_thread(store.sync.node.wait_for_leader, 5)
            for broker_id in range(3):
                broker = await store.register_broker(broker_id, f"127.0.0.1:{9092 + broker_id}",
                                                     fenced=False)
                assert broker.state is BrokerState.ACTIVE
            topics = await asyncio.gather(*(store.create_topic(f"t{i}", 3, 3)
                                             for i in range(10)))
            assert sorted(t.name for t in topics) == [f"t{i}" for i in range(10)]
            assert store.list_topics() == sorted(f"t{i}" for i in range(10)), "local: no await"
            found = await store.describe_topic("t3", linearizable=True)
            assert found is not None and found[0] == topics[3]
            grown = await store.add_partitions("t3", 4)
            assert grown.partition_count == 4
            altered = await store.alter_topic_config("t3", {"retention.ms": 5})
            assert altered.config.retention_ms == 5
            await store.delete_topic("t0")
            with pytest.raises(CommandRefusedError) as refused:
                await store.create_topic("t1", 1, 1)
            assert refused.value.code == "topic_exists"
            image = await store.read_image()
            assert "t0" not in image.topics and "t1" in image.topics
            assert image.offset <= store.image().offset
        finally:
            await store.close()

    asyncio.run(scenario())


# --------------------------------------------------------------------------
# The controller: leader-only fencing and unfencing


class FakeNode:
    """The little of a RaftNode the controller reads: role and term."""

    node_id = "fake"

    def __init__(self) -> None:
        self.is_leader = True
        self.term = 1

    def on_app_message(self, handler: Callable[[str, Any], None]) -> None:
        self.app_handler = handler


class FakeStore:
    """A store whose image the test sets and whose fence/unfence calls it records."""

    def __init__(self, *brokers: Broker) -> None:
        self.node = FakeNode()
        self.brokers = {b.broker_id: b for b in brokers}
        self.calls: list[tuple[str, int, int]] = []

    def image(self) -> MetadataImage:
        return MetadataImage(len(self.calls), dict(self.brokers), {}, {})

    def fence_broker(self, broker_id: int, epoch: int, *, timeout: float) -> None:
        self.calls.append(("fence", broker_id, epoch))
        self.brokers[broker_id] = replace(self.brokers[broker_id], state=BrokerState.FENCED)

    def unfence_broker(self, broker_id: int, epoch: int, *, timeout: float) -> None:
        self.calls.append(("unfence", broker_id, epoch))
        self.brokers[broker_id] = replace(self.brokers[broker_id], state=BrokerState.ACTIVE)


class Clock:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def a_broker(broker_id: int, epoch: int, state: BrokerState = BrokerState.ACTIVE) -> Broker:
    return Broker(broker_id, f"b{broker_id}:9092", None, _uuid(broker_id), epoch, state)


def stepped_controller(*brokers: Broker) -> tuple[Controller, FakeStore, Clock]:
    store, clock = FakeStore(*brokers), Clock()
    return Controller(store, session_timeout=10.0, clock=clock), store, clock  # type: ignore[arg-type]


def test_controller_session_rules_with_a_stepped_clock() -> None:
    controller, store, clock = stepped_controller(
        a_broker(1, 5), a_broker(2, 6), a_broker(3, 7, BrokerState.FENCED))
    controller.check()  # becomes leader at t=100: everyone's session starts now
    controller.record_heartbeat(1, 5)
    controller.record_heartbeat(2, 4)  # an older incarnation of broker 2
    controller.record_heartbeat(3, 7)  # the fenced broker is back
    controller.check()
    assert store.calls == [("unfence", 3, 7)], "a heartbeat with the current epoch unfences"
    clock.now = 109.9
    controller.check()
    assert len(store.calls) == 1, "nobody is fenced within the first session"
    controller.record_heartbeat(1, 5)  # broker 1 keeps beating; the others fall silent
    clock.now = 110.1
    controller.check()
    assert ("fence", 2, 6) in store.calls, "a stale-epoch heartbeat does not keep broker 2"
    assert ("fence", 1, 5) not in store.calls and ("fence", 3, 7) in store.calls
    controller.record_heartbeat(1, 5)
    clock.now = 119.0
    controller.check()
    assert ("fence", 1, 5) not in store.calls
    assert (controller.fenced_by_controller, controller.unfenced_by_controller) == (2, 1)


def test_controller_does_nothing_while_a_follower_and_starts_afresh_as_leader() -> None:
    controller, store, clock = stepped_controller(a_broker(1, 5))
    store.node.is_leader = False
    controller.record_heartbeat(1, 5)
    clock.now = 1000.0
    controller.check()
    assert store.calls == [], "a follower fences nobody"
    store.node.is_leader, store.node.term = True, 2
    controller.check()
    clock.now = 1009.0
    controller.check()
    assert store.calls == [], "a full session from the start of leadership"
    clock.now = 1010.5
    controller.check()
    assert store.calls == [("fence", 1, 5)]


def test_controller_gives_a_fresh_session_when_leadership_came_back_unseen() -> None:
    """Leadership lost and won again between two passes (a new term) must not
    count the time another leader was in charge against the brokers."""
    controller, store, clock = stepped_controller(a_broker(1, 5))
    controller.check()
    controller.record_heartbeat(1, 5)  # last heartbeat to this node, t=100
    clock.now = 109.0
    controller.check()
    store.node.term = 3  # meanwhile: another leader for a while, then this node again
    clock.now = 109.5
    controller.check()
    clock.now = 111.0  # 11 s since the last heartbeat here, 1.5 s into this term
    controller.check()
    assert store.calls == [], "the broker heartbeat to the other leader meanwhile"
    clock.now = 119.6
    controller.check()
    assert store.calls == [("fence", 1, 5)]


def test_controller_fences_a_silent_broker_and_unfences_it_when_it_returns(
        open_cluster: Callable[..., list[MetadataStore]],
        make_brokers: Callable[..., Brokers]) -> None:
    session = 1.0
    stores = open_cluster(3, broker_session_timeout=session)
    leader = leader_of(stores)
    followers = [s for s in stores if s is not leader]
    # Every heartbeat goes through a follower: it must reach the leader's controller.
    brokers = make_brokers(lambda: followers[0], interval=session / 5)
    for broker_id in range(4):
        brokers.register(followers[1], broker_id, rack=f"r{broker_id % 2}")
    wait_until(lambda: len(leader.image().active_broker_ids()) == 4, 5,
               "heartbeats through a follower to unfence every broker")
    leader.create_topic("load", 8, 3)
    before = {p.index: p for p in leader.image().partitions["load"]}
    victim = 0
    assert any(p.leader == victim for p in before.values())
    recorder = Recorder()
    leader.watch(recorder, from_offset=leader.image().offset)

    brokers.silence(victim)
    silenced = time.monotonic()
    wait_until(lambda: leader.image().brokers[victim].state is BrokerState.FENCED,
               session * 4, "the silent broker to be fenced")
    # Its last heartbeat was at most one interval before it went silent.
    assert time.monotonic() - silenced >= session * 0.8 - 0.05, "fenced before its session ended"
    image = leader.image()
    for p in image.partitions["load"]:
        old = before[p.index]
        assert p.leader != victim and victim not in p.isr
        if victim in old.replicas:
            assert p.partition_epoch > old.partition_epoch
        if old.leader == victim:
            assert p.leader is not None and image.brokers[p.leader].is_active
            assert p.leader_epoch == old.leader_epoch + 1
        else:
            assert (p.leader, p.leader_epoch) == (old.leader, old.leader_epoch)
    assert image.active_broker_ids() == (1, 2, 3), "the others kept their sessions"

    brokers.resume(victim)
    wait_until(lambda: leader.image().brokers[victim].is_active, session * 4,
               "the returning broker to be unfenced")

    def broker_changes() -> list[tuple[str, object]]:
        return [(str(c.kind), c.key) for e in recorder.snapshot() for c in e.changes
                if isinstance(c.record, Broker)]

    wait_until(lambda: len(broker_changes()) >= 2, 5, "the watch to deliver both")
    assert broker_changes() == [("broker_fenced", victim), ("broker_unfenced", victim)], (
        "fenced once, unfenced once, nobody else touched")
    wait_until(lambda: (leader.controller.fenced_by_controller,
                        leader.controller.unfenced_by_controller) == (1, 5), 5,
               "the leader's controller to count one fencing and five unfencings")
    for follower in followers:  # nothing of this ran on a follower
        assert (follower.controller.fenced_by_controller,
                follower.controller.unfenced_by_controller) == (0, 0)
        wait_until(lambda f=follower: f.image().brokers[victim].is_active, 5,
                   "followers to apply the unfencing")


def test_controller_on_a_follower_does_nothing(
        open_cluster: Callable[..., list[MetadataStore]]) -> None:
    session = 0.2
    stores = open_cluster(3, broker_session_timeout=session)
    leader = leader_of(stores)
    followers = [s for s in stores if s is not leader]
    broker = leader.register_broker(1, "127.0.0.1:9092", fenced=False)  # never heartbeats

    def fenced_on(s: MetadataStore) -> bool:
        b = s.image().brokers.get(1)  # a follower may not have applied the registration yet
        return b is not None and b.state is BrokerState.FENCED

    for store in stores:
        wait_until(lambda s=store: fenced_on(s), 5,
                   "the leader's controller to fence the silent broker")
    # A follower that hears from the broker (a stale forward, say) must not act on it.
    for follower in followers:
        follower.controller.record_heartbeat(1, broker.broker_epoch)
        follower.controller.check()
    time.sleep(4 * session)  # a negative check: several controller passes, nothing happens
    for store in stores:
        assert store.image().brokers[1].state is BrokerState.FENCED
    for follower in followers:
        assert (follower.controller.fenced_by_controller,
                follower.controller.unfenced_by_controller) == (0, 0)
    assert (leader.controller.fenced_by_controller,
            leader.controller.unfenced_by_controller) == (1, 0)


def test_controller_gives_every_broker_a_full_session_after_failover(
        open_cluster: Callable[..., list[MetadataStore]],
        make_brokers: Callable[..., Brokers]) -> None:
    session = 1.0
    stores = open_cluster(3, broker_session_timeout=session)
    old_leader = leader_of(stores)
    survivors = [s for s in stores if s is not old_leader]
    current = [old_leader]
    brokers = make_brokers(lambda: current[0], interval=session / 5)
    for broker_id in range(3):
        brokers.register(old_leader, broker_id)
    wait_until(lambda: len(old_leader.image().active_broker_ids()) == 3, 5, "unfencing")
    recorder = Recorder()
    survivors[0].watch(recorder, from_offset=survivors[0].image().offset)

    brokers.silence(2)  # broker 2 dies with the old leader; 0 and 1 live on
    current[0] = survivors[0]  # heartbeats now go through a survivor, to whoever leads
    old_leader.close()
    wait_until(lambda: any(s.node.is_leader for s in survivors), 10, "a new leader",
               interval=0.005)
    elected = time.monotonic()  # leadership may still move once more; that only delays fencing
    wait_until(lambda: survivors[0].image().brokers[2].state is BrokerState.FENCED,
               session * 4, "the silent broker to be fenced by the new leader")
    fenced_after = time.monotonic() - elected
    assert fenced_after >= session - 0.1, (
        f"fenced {fenced_after:.2f}s after the failover: the new leader must first give "
        f"it a full session of {session}s")
    wait_until(lambda: any(c.kind is ChangeKind.BROKER_FENCED for e in recorder.snapshot()
                           for c in e.changes), 5, "the watch to deliver the fencing")
    time.sleep(session)  # live brokers heartbeat on: another full session and nobody else goes
    fenced = [c.key for e in recorder.snapshot() for c in e.changes
              if c.kind is ChangeKind.BROKER_FENCED]
    assert fenced == [2], "live brokers were never fenced across the failover"
    new_leader = leader_of(survivors)
    assert new_leader.image().active_broker_ids() == (0, 1)
    assert sum(s.controller.fenced_by_controller for s in survivors) == 1, "counted by then"


def test_controller_and_the_node_stop_with_the_store(
        open_cluster: Callable[..., list[MetadataStore]]) -> None:
    (store,) = open_cluster(1)
    watch = store.watch(Recorder())
    store.close()
    store.close()
    assert store.node.state.value == "stopped"
    with pytest.raises(ConsensusError):
        store.create_topic("after-close", 1, 1, timeout=1)
    watch.close()

