"""Every check of snapshot restore, one damaged field at a time.

A snapshot comes from disk or from the leader; each field that is the wrong
type, size or range must be refused with a message naming it, and the state
must stay as it was. (Mutation testing found these checks unexercised.)
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import pytest

from streambus_consensus import codec
from streambus_consensus.errors import CodecError
from streambus_consensus.metadata import (
    ElectLeaders,
    MetadataStateMachine,
    ReassignReplicas,
    RequestId,
    encode_command,
)
from tests.test_metadata_versions import golden_commands

_MAGIC = "streambus.metadata.snapshot"


def _rich() -> MetadataStateMachine:
    fsm = MetadataStateMachine()
    rid = RequestId
    commands = [*golden_commands(),
                ElectLeaders(request_id=rid("rich", 1), topic="orders", kind="preferred"),
                ReassignReplicas(request_id=rid("rich", 2), topic="orders", partition=0,
                                 replicas=(1, 0, 2))]
    for command in commands:
        assert fsm.apply(encode_command(command)).ok
    return fsm


RICH = _rich()
BODY: Any = codec.decode(codec.decode(RICH.snapshot())[3])  # type: ignore[index]
"""(offset, brokers, topics, sessions); session 0 is "golden", 1 is "rich"."""


def _pack(body: Any, version: Any = 1) -> bytes:
    payload = codec.encode(body)
    return codec.encode((_MAGIC, version, zlib.crc32(payload), payload))


def _set(value: Any, path: tuple[int, ...], new: Any) -> Any:
    if not path:
        return new
    items = list(value)
    items[path[0]] = _set(items[path[0]], path[1:], new)
    return type(value)(items)


def _blob(*partitions: tuple[Any, ...]) -> bytes:
    flat: list[int] = []
    for replicas, isr, leader, leader_epoch, partition_epoch, recovering in partitions:
        flat += [len(replicas), *replicas, len(isr), *isr, leader, leader_epoch,
                 partition_epoch, recovering]
    return struct.pack(f">{len(flat)}q", *flat)


GOOD_PARTITION = ((0, 1, 2), (0, 1), 0, 0, 0, 0)
TOPIC = (2, 0)  # the "orders" entry: (topic fields, partitions blob)
RESULT = (3, 0, 3, 0)  # golden's first remembered result (a broker)
TOPIC_RESULT = (3, 0, 3, 6)  # golden's CreateTopic result
PARTITIONS_RESULT = (3, 1, 3, 0)  # rich's ElectLeaders result
PARTITION_RESULT = (3, 1, 3, 1)  # rich's ReassignReplicas result

DAMAGE: list[tuple[tuple[int, ...], Any, str]] = [
    ((), (1, 2, 3), "snapshot body has 3 items, not 4"),
    ((0,), -1, "offset -1 is below 0"),
    ((0,), "1", "offset is a str"),
    ((1,), "x", "brokers is a str"),
    ((1, 0), "x", "broker is a str"),
    ((1, 0), (0,), "broker has 1 items, not 6"),
    ((1, 0, 0), -1, "broker id -1 is below 0"),
    ((1, 0, 1), 5, "endpoint is a int"),
    ((1, 0, 2), 5, "rack is a int"),
    ((1, 0, 3), 5, "incarnation id is a int"),
    ((1, 0, 4), -1, "broker epoch -1 is below 0"),
    ((1, 0, 5), 5, "broker state is a int"),
    ((1, 0, 5), "sleeping", "ValueError: 'sleeping' is not a valid BrokerState"),
    ((1, 1), BODY[1][0], "broker 0 appears twice"),
    ((2,), "x", "topics is a str"),
    (TOPIC, ("a",), "topic entry has 1 items, not 2"),
    ((*TOPIC, 0), (1, 2), "topic has 2 items, not 5"),
    ((*TOPIC, 0, 0), 5, "topic name is a int"),
    ((*TOPIC, 0, 1), 5, "topic id is a int"),
    ((*TOPIC, 0, 2), (1,), "topic config has 1 items, not 5"),
    ((*TOPIC, 0, 2, 0), -2, "retention.ms -2 is below -1"),
    ((*TOPIC, 0, 2, 1), -1, "segment.bytes -1 is below 0"),
    ((*TOPIC, 0, 2, 2), 0, "min.insync.replicas 0 is below 1"),
    ((*TOPIC, 0, 2, 3), 5, "cleanup.policy is a int"),
    ((*TOPIC, 0, 2, 4), 5, "compression.type is a int"),
    ((*TOPIC, 0, 3), 0, "partition count 0 is below 1"),
    ((*TOPIC, 0, 3), 5, "topic 'orders' is inconsistent"),
    ((*TOPIC, 0, 4), 0, "replication factor 0 is below 1"),
    ((*TOPIC, 1), "x", "partitions is a str"),
    ((*TOPIC, 1), BODY[2][0][1][:-1], "partitions of 'orders' are truncated"),
    ((*TOPIC, 1), BODY[2][0][1][:-8], "partitions of 'orders': not enough values to unpack "
                                      "(expected 4, got 3)"),
    ((3,), "x", "sessions is a str"),
    ((3, 0), (1,), "session has 1 items, not 4"),
    ((3, 0, 0), 5, "client id is a int"),
    ((3, 0, 1), -1, "last offset -1 is below 0"),
    ((3, 0, 2), -2, "evicted seq -2 is below -1"),
    ((3, 0, 3), "x", "results is a str"),
    ((3, 1), BODY[3][0], "client 'golden' appears twice"),
    (RESULT, (1,), "result has 1 items, not 6"),
    ((*RESULT, 0), -1, "seq -1 is below 0"),
    ((*RESULT, 1), 1, "ok is a int"),
    ((*RESULT, 2), 1, "code is a int"),
    ((*RESULT, 3), 1, "message is a int"),
    ((*RESULT, 4), "x", "result value is a str"),
    ((*RESULT, 4), (), "unknown result value None"),
    ((*RESULT, 4), ("nope", 1), "unknown result value 'nope'"),
    ((*RESULT, 4), ("broker",), "unknown result value 'broker'"),
    ((*RESULT, 4, 1), (1,), "broker has 1 items, not 6"),
    ((*RESULT, 5), -1, "result offset -1 is below 0"),
    ((*TOPIC_RESULT, 4), ("topic", 1, 2), "unknown result value 'topic'"),
    ((*TOPIC_RESULT, 4, 1), (1,), "topic has 1 items, not 5"),
    ((*PARTITION_RESULT, 4), ("partition", "orders", 0), "unknown result value 'partition'"),
    ((*PARTITION_RESULT, 4, 1), 5, "topic is a int"),
    ((*PARTITION_RESULT, 4, 2), -1, "index -1 is below 0"),
    ((*PARTITION_RESULT, 4, 3), _blob(GOOD_PARTITION, GOOD_PARTITION), "expected one partition"),
    ((*PARTITION_RESULT, 4, 3), b"", "expected one partition"),
    ((*PARTITIONS_RESULT, 4), ("partitions", "x"), "partitions is a str"),
    ((*PARTITIONS_RESULT, 4), ("partitions",), "unknown result value 'partitions'"),
    ((*PARTITIONS_RESULT, 4), ("partitions", (("orders", 0),)), "partition has 2 items, not 3"),
]


@pytest.mark.parametrize(("path", "value", "message"), DAMAGE,
                         ids=[m for _, _, m in DAMAGE])
def test_a_damaged_field_is_refused_by_name(path: tuple[int, ...], value: Any,
                                            message: str) -> None:
    fsm = _rich()
    before = fsm.image()
    with pytest.raises(CodecError) as info:
        fsm.restore(_pack(_set(BODY, path, value)))
    assert str(info.value) == f"invalid snapshot: {message}"
    assert fsm.image() is before


@pytest.mark.parametrize("partition", [
    ((), (0,), 0, 0, 0, 0),  # no replicas
    ((0, -1, 2), (0,), 0, 0, 0, 0),  # a negative broker id
    ((0, 0, 2), (0,), 0, 0, 0, 0),  # a replica twice
    ((0, 1, 2), (), -1, 0, 0, 0),  # empty ISR
    ((0, 1, 2), (0, 3), 0, 0, 0, 0),  # ISR member not a replica
    ((0, 1, 2), (0, 1), 2, 0, 0, 0),  # leader outside the ISR
    ((0, 1, 2), (0, 1), 0, -1, 0, 0),  # negative leader epoch
    ((0, 1, 2), (0, 1), 0, 0, -1, 0),  # negative partition epoch
    ((0, 1, 2), (0, 1), 0, 0, 0, 2),  # recovering is 0 or 1
])
def test_a_partition_that_breaks_an_invariant_is_refused(partition: tuple[Any, ...]) -> None:
    blob = _blob(partition, *[GOOD_PARTITION] * 3)
    with pytest.raises(CodecError, match=r"invalid snapshot: partition(s of)? '?orders"):
        MetadataStateMachine().restore(_pack(_set(BODY, (*TOPIC, 1), blob)))


@pytest.mark.parametrize(("path", "value"), [
    ((1, 0, 2), None),  # no rack
    ((*TOPIC, 0, 2, 0), -1),  # retention forever
    ((*TOPIC, 0, 2, 2), 1),
    ((3, 0, 2), -1),  # nothing evicted
    ((1, 0, 4), 0),
    ((*TOPIC, 1), _blob(((0, 1, 2), (0,), -1, 5, 6, 1), *[GOOD_PARTITION] * 3)),
])
def test_boundary_values_are_accepted(path: tuple[int, ...], value: Any) -> None:
    fsm = MetadataStateMachine()
    data = _pack(_set(BODY, path, value))
    fsm.restore(data)
    assert fsm.snapshot() == data  # and written back exactly


def test_an_offline_recovering_partition_restores_as_such() -> None:
    fsm = MetadataStateMachine()
    fsm.restore(_pack(_set(BODY, (*TOPIC, 1),
                           _blob(((2, 1, 0), (1,), -1, 5, 6, 1), *[GOOD_PARTITION] * 3))))
    p = fsm.image().partition("orders", 0)
    assert p is not None
    assert (p.replicas, p.isr, p.leader, p.leader_epoch, p.partition_epoch, p.recovering) == (
        (2, 1, 0), (1,), None, 5, 6, True)
    q = fsm.image().partition("orders", 1)
    assert q is not None and q.index == 1 and q.isr == (0, 1) and not q.recovering


@pytest.mark.parametrize(("outer", "message"), [
    ("x", "not a metadata snapshot"),
    ((_MAGIC, 1, 0), "not a metadata snapshot"),
    (("other", 1, 0, b""), "not a metadata snapshot"),
    ((_MAGIC, "1", 0, b""), "unknown snapshot version '1'"),
    ((_MAGIC, 0, 0, b""), "unknown snapshot version 0"),
    ((_MAGIC, 1, 0, "payload"), "invalid snapshot envelope"),
    ((_MAGIC, 1, "0", b""), "invalid snapshot envelope"),
    ((_MAGIC, 1, 1, b""), "snapshot checksum mismatch: the data is damaged"),
])
def test_a_damaged_envelope_is_refused(outer: Any, message: str) -> None:
    with pytest.raises(CodecError) as info:
        MetadataStateMachine().restore(codec.encode(outer))
    assert str(info.value) == message


def test_topics_that_collide_are_refused() -> None:
    orders = BODY[2][0]
    twin = _set(_set(orders, (0, 0), "orders_2"), (0, 1), orders[0][1])  # same topic id
    with pytest.raises(CodecError, match=r"topic 'orders(_2)?' collides with another"):
        MetadataStateMachine().restore(_pack(_set(BODY, (2,), [orders, twin])))
    dotted = _set(_set(orders, (0, 0), "a.b"), (0, 1), "00000000-0000-0000-0000-0000000000aa")
    under = _set(_set(orders, (0, 0), "a_b"), (0, 1), "00000000-0000-0000-0000-0000000000bb")
    with pytest.raises(CodecError, match=r"topic 'a[._]b' collides with another"):
        MetadataStateMachine().restore(_pack(_set(BODY, (2,), [dotted, under])))
    with pytest.raises(CodecError, match="topic 'orders' is inconsistent"):
        MetadataStateMachine().restore(_pack(_set(BODY, (2,), [orders, orders])))


def test_remembered_results_read_back_equal() -> None:
    fsm = MetadataStateMachine()
    fsm.restore(RICH.snapshot())
    for client, seq in (("golden", 1), ("golden", 7), ("rich", 1), ("rich", 2)):
        rid = RequestId(client, seq)
        original = RICH._sessions[client].get(seq)
        restored = fsm._sessions[client].get(seq)
        assert restored == original, rid
    assert fsm.image() == RICH.image()
