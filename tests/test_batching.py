"""Coalesced proposals: several commands in one log entry, each with its own
result and its own dedup record (envelope, state machines, RaftNode over
real TCP, real node processes)."""

from __future__ import annotations

import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streambus_consensus import CodecError, NodeConfig, RaftNode
from streambus_consensus.kv import KeyValueStateMachine, kv_command
from streambus_consensus.metadata import (
    BATCHED_ENTRIES_VERSION,
    AddPartitions,
    AlterTopicConfig,
    Command,
    CreateTopic,
    DeleteTopic,
    FenceBroker,
    MetadataStateMachine,
    RegisterBroker,
    RequestId,
    SetMetadataVersion,
    UnfenceBroker,
    encode_command,
)
from streambus_consensus.metadata.feed import WatchedStateMachine
from streambus_consensus.provision import generate_secret
from streambus_consensus.raft.batch import pack_batch, unpack_batch
from streambus_consensus.testing.harness import LocalCluster, free_ports, wait_until

SECRET = generate_secret()


# -- the envelope ----------------------------------------------------------------------


@given(st.lists(st.binary(max_size=64), max_size=20))
def test_the_envelope_round_trips(commands: list[bytes]) -> None:
    assert unpack_batch(pack_batch(commands)) == commands


@pytest.mark.parametrize("data", [b"", b"\x00\x00\x00\x02\x00\x00\x00\x01a",
                                  b"\x00\x00\x00\x01\x00\x00\x00\x05ab",
                                  pack_batch([b"a"]) + b"x"])
def test_a_malformed_envelope_is_a_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        unpack_batch(data)


# -- a batched log applies to the same state as the unbatched one ---------------------

KV_COMMANDS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from("abc"), st.integers(0, 9)),
    st.tuples(st.just("delete"), st.sampled_from("abc")),
    st.tuples(st.just("incr"), st.sampled_from("abc")),
    st.tuples(st.just("cas"), st.sampled_from("abc"), st.integers(0, 3), st.integers(0, 9)),
    st.tuples(st.just("bogus")),
)


def _cut(items: list[Any], cuts: list[int]) -> list[list[Any]]:
    """``items`` in consecutive groups, cut before the given positions."""
    groups, start = [], 0
    for cut in sorted({c % (len(items) + 1) for c in cuts} | {len(items)}):
        if cut > start:
            groups.append(items[start:cut])
            start = cut
    return groups


@given(st.lists(KV_COMMANDS, max_size=40), st.lists(st.integers(0, 40), max_size=10))
def test_a_batched_kv_log_applies_like_the_unbatched_one(
        ops: list[tuple[Any, ...]], cuts: list[int]) -> None:
    commands = [kv_command(*op) for op in ops]
    one, batched = KeyValueStateMachine(), KeyValueStateMachine(batching=True)
    expected = [one.apply(c) for c in commands]
    got = [r for i, group in enumerate(_cut(commands, cuts))
           for r in batched.apply_batch(i + 1, group)]
    assert got == expected
    assert batched.items() == one.items()


def _uid(n: int) -> str:
    return str(uuid.UUID(int=n + 1))


@st.composite
def metadata_commands(draw: st.DrawFn) -> list[Command]:
    """Topic and broker-state commands over three registered brokers (the
    registrations come first, each in its own entry, as the store proposes them)."""
    out: list[Command] = []
    for seq in range(draw(st.integers(1, 40))):
        rid = RequestId(draw(st.sampled_from(["a", "b"])), draw(st.integers(1, 30)))
        name = draw(st.sampled_from(["t1", "t2", "t3"]))
        kind = draw(st.sampled_from(["create", "delete", "alter", "add", "fence", "unfence"]))
        if kind == "create":
            out.append(CreateTopic(request_id=rid, name=name, topic_id=_uid(seq),
                                   partitions=draw(st.integers(1, 3)),
                                   replication_factor=draw(st.integers(1, 3)),
                                   placement_offset=draw(st.integers(0, 5))))
        elif kind == "delete":
            out.append(DeleteTopic(request_id=rid, name=name))
        elif kind == "alter":
            out.append(AlterTopicConfig(request_id=rid, name=name,
                                        set_configs={"retention.ms": draw(st.integers(1, 9))}))
        elif kind == "add":
            out.append(AddPartitions(request_id=rid, name=name,
                                     new_total=draw(st.integers(1, 5)),
                                     placement_offset=draw(st.integers(0, 5))))
        elif kind == "fence":
            out.append(FenceBroker(request_id=rid, broker_id=draw(st.integers(0, 2))))
        else:
            out.append(UnfenceBroker(request_id=rid, broker_id=draw(st.integers(0, 2))))
    return out


def _prefix() -> list[bytes]:
    return [encode_command(SetMetadataVersion(request_id=RequestId("admin", 1),
                                              level=BATCHED_ENTRIES_VERSION))] + [
        encode_command(RegisterBroker(request_id=RequestId("reg", b + 1), broker_id=b,
                                      endpoint=f"b{b}:9092", rack=None,
                                      incarnation_id=_uid(100 + b), fenced=False))
        for b in range(3)]


def _plain(result: Any) -> tuple[Any, ...]:
    """A result without its log offset (batching changes the numbering)."""
    return (result.ok, result.code, result.message, result.value, result.changes,
            result.duplicate)


@settings(max_examples=60, deadline=None)
@given(metadata_commands(), st.lists(st.integers(0, 40), max_size=12))
def test_a_batched_metadata_log_applies_like_the_unbatched_one(
        commands: list[Command], cuts: list[int]) -> None:
    data = [encode_command(c) for c in commands]
    one, batched = MetadataStateMachine(), WatchedStateMachine()
    for i, entry in enumerate(_prefix()):
        one.apply_at(i + 1, entry)
        batched.apply_at(i + 1, entry)
    assert batched.batching_allowed()
    expected = [_plain(one.apply(d)) for d in data]
    got = []
    for group in _cut(data, cuts):
        got += [_plain(r) for r in batched.apply_batch(batched.fsm.offset + 1, group)]
    assert got == expected  # each command's own result, dedup included
    a, b = one.image(), batched.fsm.image()
    assert (a.brokers, a.topics, a.partitions) == (b.brokers, b.topics, b.partitions)


def test_a_duplicate_request_id_inside_a_batch_gets_the_original_result() -> None:
    fsm = WatchedStateMachine()
    for i, entry in enumerate(_prefix()):
        fsm.apply_at(i + 1, entry)
    create = encode_command(CreateTopic(request_id=RequestId("c", 1), name="orders",
                                        topic_id=_uid(7), partitions=1, replication_factor=1,
                                        placement_offset=0))
    other = encode_command(CreateTopic(request_id=RequestId("c", 2), name="other",
                                       topic_id=_uid(8), partitions=1, replication_factor=1,
                                       placement_offset=0))
    first, second, retry = fsm.apply_batch(5, [create, other, create])
    assert first.ok and second.ok and not first.duplicate
    assert retry.duplicate and retry.value == first.value and retry.changes == ()
    # A retry in a later entry, batched or not, still finds it.
    (later,) = fsm.apply_batch(6, [create])
    assert later.duplicate and later.value == first.value
    assert fsm.fsm.apply_at(7, create).duplicate
    # One event per entry, holding every change of the batch in order.
    events = fsm.feed.read(4, timeout=0)
    assert [e.offset for e in events] == [5]
    assert [c.key for c in events[0].changes][:1] == ["orders"]


def test_batching_waits_for_the_metadata_version_that_every_voter_reads() -> None:
    fsm = MetadataStateMachine()
    assert not fsm.batching_allowed()  # a fresh cluster is at version 1
    fsm.apply_at(1, _prefix()[0])
    assert fsm.batching_allowed()


# -- RaftNode: fewer entries than commands, each caller its own result -----------------


def _config(node_id: str, cluster: dict[str, str], tmp: Path, **changes: Any) -> NodeConfig:
    return NodeConfig(node_id=node_id, cluster=cluster, cluster_secret=SECRET,
                      data_dir=str(tmp / node_id), **changes)


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[dict[str, RaftNode]]:
    ports = free_ports(3)
    cluster = {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
    nodes = {n: RaftNode(_config(n, cluster, tmp_path, max_batch_commands=16),
                         KeyValueStateMachine(batching=True)) for n in cluster}
    try:
        for n in nodes.values():
            n.start()
        nodes["n1"].wait_for_leader(10)
        yield nodes
    finally:
        for n in nodes.values():
            n.stop()


def test_concurrent_proposals_share_entries_and_each_caller_gets_its_own_result(
        trio: dict[str, RaftNode]) -> None:
    leader = trio[trio["n1"].wait_for_leader(10)]
    follower = next(n for n in trio.values() if n is not leader)
    before = leader.status().last_log_index
    futures: list[Future[Any]] = []
    start = threading.Barrier(8)

    def writer(node: RaftNode, count: int) -> None:
        start.wait()
        for _ in range(count):
            futures.append(node.propose_async(kv_command("incr", "n")))

    threads = [threading.Thread(target=writer, args=(leader if i % 2 else follower, 50))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [f.result(10) for f in futures]
    # Every caller got its own command's result: the increments, each once.
    assert sorted(results) == list(range(1, 401))
    entries = leader.status().last_log_index - before
    assert entries < len(futures), (entries, len(futures))
    assert leader.batches_proposed + follower.batches_proposed > 0
    assert max(n.batched_commands for n in trio.values()) <= 16 * max(
        1, max(n.batches_proposed for n in trio.values()))
    wait_until(lambda: all(n.applied_index >= leader.commit_index for n in trio.values()), 5,
               "every replica to apply")


def test_a_state_machine_that_does_not_allow_batches_gets_one_entry_per_command(
        tmp_path: Path) -> None:
    (port,) = free_ports(1)
    node = RaftNode(_config("n1", {"n1": f"127.0.0.1:{port}"}, tmp_path),
                    KeyValueStateMachine())
    with node:
        node.wait_for_leader(10)
        futures = [node.propose_async(kv_command("incr", "n")) for _ in range(100)]
        assert sorted(f.result(10) for f in futures) == list(range(1, 101))
        assert node.batches_proposed == 0


def test_a_batch_stays_under_max_command_bytes(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    node = RaftNode(_config("n1", {"n1": f"127.0.0.1:{port}"}, tmp_path,
                            max_command_bytes=4096), KeyValueStateMachine(batching=True))
    with node:
        node.wait_for_leader(10)
        big = "x" * 1500
        futures = [node.propose_async(kv_command("set", f"k{i}", big)) for i in range(40)]
        for f in futures:
            assert f.result(10) is None
        # At most two such commands fit one 4096-byte entry.
        assert node.batched_commands <= 2 * node.batches_proposed
        assert node.status().last_log_index >= 20


# -- real processes: the metadata store over HTTP -----------------------------------------


def test_many_writers_on_a_metadata_cluster_share_entries_once_upgraded(
        tmp_path: Path) -> None:
    with LocalCluster(3, tmp_path, app="metadata",
                      settings={"broker_session_timeout": 86_400.0,
                                "bootstrap_metadata_version": 1}) as cluster:
        cluster.start()
        leader = cluster.wait_for_leader()
        client = cluster.client(leader)
        client.request("POST", "/v1/brokers", {"broker_id": 0, "endpoint": "b0:9092",
                                               "fenced": False})
        answer = client.request("POST", "/v1/features",
                                {"metadata_version": BATCHED_ENTRIES_VERSION})
        assert answer["finalized"] == BATCHED_ENTRIES_VERSION
        before = client.request("GET", "/v1/status")["last_log_index"]
        results: dict[str, Any] = {}
        errors: list[BaseException] = []

        def writer(w: int) -> None:
            own = cluster.client(leader)
            try:
                for i in range(10):
                    name = f"w{w}-t{i}"
                    results[name] = own.request("POST", "/v1/topics", {
                        "name": name, "partitions": 1, "replication_factor": 1})
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        assert len(results) == 160
        # Each caller got its own topic back.
        assert all(topic["name"] == name for name, topic in results.items())
        after = client.request("GET", "/v1/status")["last_log_index"]
        assert after - before < len(results), (after - before, len(results))
        listed = client.request("GET", "/v1/topics?linearizable=1")["topics"]
        assert set(results) <= set(listed)


def test_no_proposal_is_lost_while_the_raft_thread_swaps_its_batch(tmp_path: Path) -> None:
    """Regression: a queued job once held the list it would append to, bound
    when it was made; a job made just before the Raft thread swapped in a new
    list appended to the old one, already proposed, and its future never
    resolved (654 of 9000 proposals in the test that found it)."""
    (port,) = free_ports(1)
    node = RaftNode(_config("n1", {"n1": f"127.0.0.1:{port}"}, tmp_path),
                    KeyValueStateMachine(batching=True))
    futures: list[Future[Any]] = []

    def propose() -> None:
        for i in range(2000):
            futures.append(node.propose_async(kv_command("set", f"k{i}", i)))

    interval = sys.getswitchinterval()
    with node:
        node.wait_for_leader(10)
        threads = [threading.Thread(target=propose) for _ in range(3)]
        sys.setswitchinterval(1e-6)  # switch threads often, so the window is hit
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        finally:
            sys.setswitchinterval(interval)
        for future in futures:
            future.result(30)
        assert node.batches_proposed > 0
