"""The state machine's building blocks against simple models: the persistent
map against a dict, and the change records listeners receive for each kind."""

from __future__ import annotations

import dataclasses
import functools
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streambus_consensus.metadata import (
    BATCH_CREATE_VERSION,
    AddPartitions,
    AlterTopicConfig,
    BeginControlledShutdown,
    Change,
    ChangeKind,
    CreateTopic,
    CreateTopics,
    DeleteTopic,
    FenceBroker,
    MetadataStateMachine,
    Partition,
    PlacementError,
    ReassignReplicas,
    RegisterBroker,
    RequestId,
    SetMetadataVersion,
    Topic,
    TopicConfig,
    TopicOutcome,
    TopicSpec,
    UnfenceBroker,
    UnregisterBroker,
    encode_command,
    place_replicas,
)
from streambus_consensus.metadata.fsm import (
    _change,
    _new_partitions,
    _outcome,
    _partition,
    _PersistentMap,
    _topic,
)
from tests.test_metadata_versions import built

KEYS = st.one_of(st.integers(-(2**70), 2**70), st.text(max_size=6))
OPS = st.lists(st.tuples(st.sampled_from(["set", "delete", "evolve_set", "evolve_delete"]),
                         KEYS, st.integers()), max_size=80)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_persistent_map_behaves_like_a_dict_and_keeps_old_versions(
        ops: list[tuple[str, Any, int]]) -> None:
    current: _PersistentMap[Any, int] = _PersistentMap()
    model: dict[Any, int] = {}
    versions = [(current, dict(model))]
    for op, key, value in ops:
        if op == "set":
            current = current.set(key, value)
            model[key] = value
        elif op == "delete" and key in model:
            current = current.delete(key)
            del model[key]
        elif op == "evolve_set":
            evolver = current.evolver()
            evolver[key] = value
            evolver[key] = value + 1
            current = evolver.persistent()
            model[key] = value + 1
        elif op == "evolve_delete" and key in model:
            evolver = current.evolver()
            evolver.delete(key)
            current = evolver.persistent()
            del model[key]
        versions.append((current, dict(model)))
    for version, expected in versions:
        assert len(version) == len(expected)
        assert dict(version.items()) == expected
        assert sorted(map(repr, version)) == sorted(map(repr, expected))
        for key, value in expected.items():
            assert key in version and version[key] == value and version.get(key) == value
        assert version.get("absent-key") is None and version.get("absent-key", 7) == 7
        assert "absent-key" not in version


def test_persistent_map_edges() -> None:
    empty: _PersistentMap[Any, int] = _PersistentMap()
    assert len(empty) == 0 and list(empty) == [] and 1 not in empty
    assert empty.evolver().persistent() is empty  # no change, no copy
    one = empty.set(1, 10)
    assert one[1] == 10 and len(one) == 1 and len(empty) == 0
    assert one.set(1, 11)[1] == 11 and len(one.set(1, 11)) == 1
    # Keys that share a leaf (same low 12 hash bits) stay apart.
    crowded = empty.set(1, 1).set(1 + 4096, 2).set(1 + 64, 3)
    assert (crowded[1], crowded[1 + 4096], crowded[1 + 64]) == (1, 2, 3)
    assert len(crowded.delete(1)) == 2 and 1 not in crowded.delete(1)
    for missing in (2, 1 + 8192):
        try:
            crowded[missing]
        except KeyError as exc:
            assert exc.args == (missing,)
        else:
            raise AssertionError("no KeyError")
    assert repr(one) == "PersistentMap({1: 10})"


def _changes(*commands: Any) -> list[tuple[str, Any, Any]]:
    """The changes of the last command, applied after the others to the golden state."""
    fsm = built()
    result = None
    for command in commands:
        result = fsm.apply(encode_command(command))
        assert result.ok, result
    assert result is not None
    return [(str(c.kind), c.key, c.record) for c in result.changes]


def test_each_change_kind_carries_its_record() -> None:
    rid = (RequestId("watch", n) for n in range(1, 100))
    image = built().image()
    orders = image.topics["orders"]

    registered = _changes(RegisterBroker(request_id=next(rid), broker_id=7, endpoint="h7:1",
                                         incarnation_id="00000000-0000-0000-0000-000000000077"))
    assert [(k, key) for k, key, _ in registered] == [(ChangeKind.BROKER_REGISTERED, 7)]
    assert registered[0][2].endpoint == "h7:1" and registered[0][2].broker_epoch == 12

    unfenced = _changes(UnfenceBroker(request_id=next(rid), broker_id=2))
    assert unfenced[0][:2] == (ChangeKind.BROKER_UNFENCED, 2)
    assert unfenced[0][2].is_active

    fenced = _changes(FenceBroker(request_id=next(rid), broker_id=0))
    assert fenced[0][:2] == (ChangeKind.BROKER_FENCED, 0)
    assert not fenced[0][2].is_active
    moved = [(key, rec.leader, rec.isr) for kind, key, rec in fenced[1:]]
    assert all(kind == ChangeKind.PARTITION_CHANGED for kind, _, _ in fenced[1:])
    assert moved and all(0 not in isr and leader != 0 for _, leader, isr in moved)

    shutting = _changes(BeginControlledShutdown(request_id=next(rid), broker_id=1))
    assert shutting[0][:2] == (ChangeKind.BROKER_SHUTTING_DOWN, 1)

    gone = _changes(UnregisterBroker(request_id=next(rid), broker_id=1))
    assert gone[0][:2] == (ChangeKind.BROKER_UNREGISTERED, 1)
    assert gone[0][2].broker_id == 1

    config = _changes(AlterTopicConfig(request_id=next(rid), name="orders",
                                       set_configs={"retention.ms": 77}))
    assert config == [(ChangeKind.CONFIG_CHANGED, "orders", config[0][2])]
    assert config[0][2].config.retention_ms == 77 and config[0][2].topic_id == orders.topic_id

    grown = _changes(UnfenceBroker(request_id=next(rid), broker_id=2),
                     AddPartitions(request_id=next(rid), name="orders", new_total=6,
                                   placement_offset=0))
    assert [(k, key) for k, key, _ in grown] == [
        (ChangeKind.TOPIC_CHANGED, "orders"), (ChangeKind.PARTITION_CREATED, ("orders", 4)),
        (ChangeKind.PARTITION_CREATED, ("orders", 5))]
    assert grown[0][2].partition_count == 6
    assert [p.index for _, _, p in grown[1:]] == [4, 5]

    first = image.partition("orders", 0)
    assert first is not None
    flipped = tuple(reversed(first.replicas))
    reassigned = _changes(ReassignReplicas(request_id=next(rid), topic="orders", partition=0,
                                           replicas=flipped))
    assert reassigned[0][:2] == (ChangeKind.PARTITION_CHANGED, ("orders", 0))
    assert reassigned[0][2].replicas == flipped

    deleted = _changes(DeleteTopic(request_id=next(rid), name="orders"))
    assert deleted == [(ChangeKind.TOPIC_DELETED, "orders", orders)]


def test_image_partition_lookup_edges() -> None:
    image = built().image()
    assert image.partition("orders", 3) is not None and image.partition("orders", 4) is None
    assert image.partition("nope", 0) is None and image.partition("orders", -1) is None
    assert image.active_broker_ids() == (0, 1)


def test_evolver_put_and_delete_answer_the_value_before() -> None:
    evolver = _PersistentMap[str, int]().set("a", 1).evolver()
    assert evolver.put("a", 2) == 1
    assert evolver.put("b", 3) is None
    assert evolver.delete("a") == 2
    assert evolver.delete("a") is None
    assert dict(evolver.persistent().items()) == {"b": 3}


def test_records_built_fast_are_the_records_their_constructors_build() -> None:
    p = _partition("t", 1, (1, 2), (1,), 1, 2, 3, True)
    assert type(p) is Partition and p == Partition("t", 1, (1, 2), (1,), 1, 2, 3, True)
    t = _topic("t", "id", TopicConfig(), 2, 3)
    assert type(t) is Topic and t == Topic("t", "id", TopicConfig(), 2, 3)
    o = _outcome("t", "ok", "", t)
    assert type(o) is TopicOutcome and o == TopicOutcome("t", "ok", "", t)
    c = _change(ChangeKind.TOPIC_CREATED, "t", t)
    assert type(c) is Change and c == Change(ChangeKind.TOPIC_CREATED, "t", t)
    changes: list[Change] = []
    parts = _new_partitions("t", 4, ((1, 2), (2, 3)), changes)
    assert parts == (Partition("t", 4, (1, 2), (1, 2), 1, 0, 0),
                     Partition("t", 5, (2, 3), (2, 3), 2, 0, 0))
    assert changes == [Change(ChangeKind.PARTITION_CREATED, ("t", i + 4), part)
                       for i, part in enumerate(parts)]
    for record in (p, t, o, c, *parts, *changes):
        assert hash(record) == hash(dataclasses.replace(record))
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, dataclasses.fields(record)[0].name, None)


BROKER_OPS = st.lists(st.tuples(
    st.sampled_from(["register", "fence", "unfence", "create", "batch"]),
    st.integers(0, 6),  # broker id
    st.integers(0, 40) | st.integers(0, 2**40),  # placement offset (small ones meet again)
    st.integers(1, 4),  # partitions
    st.integers(1, 3),  # replication factor
), max_size=40)


@settings(max_examples=80, deadline=None)
@given(BROKER_OPS)
def test_the_state_machine_places_as_place_replicas_does_whatever_the_brokers_do(
        ops: list[tuple[str, int, int, int, int]]) -> None:
    fsm = MetadataStateMachine()
    seq = iter(range(1, 10_000))

    def apply(cmd: Any) -> Any:
        return fsm.apply(encode_command(cmd(request_id=RequestId("t", next(seq)))))

    apply(functools.partial(SetMetadataVersion, level=BATCH_CREATE_VERSION))
    names = (f"t{n}" for n in range(10_000))
    for op, broker_id, offset, partitions, rf in ops:
        if op == "register":
            apply(functools.partial(
                RegisterBroker, broker_id=broker_id, endpoint=f"h{broker_id}:1",
                rack=f"r{broker_id % 3}", incarnation_id=str(uuid.UUID(int=broker_id + 1)),
                fenced=False))
        elif op in ("fence", "unfence"):
            apply(functools.partial(FenceBroker if op == "fence" else UnfenceBroker,
                                    broker_id=broker_id))
        else:
            specs = [TopicSpec(name=name, topic_id=str(uuid.UUID(int=int(name[1:]) + 1)),
                               partitions=partitions, replication_factor=rf,
                               placement_offset=offset + i)
                     for i, name in zip(range(1 if op == "create" else 3), names, strict=False)]
            if op == "batch":
                result = apply(functools.partial(CreateTopics, topics=tuple(specs)))
                codes = [outcome.code for outcome in result.value]
            else:
                result = apply(functools.partial(
                    CreateTopic, name=specs[0].name, topic_id=specs[0].topic_id,
                    partitions=partitions, replication_factor=rf, placement_offset=offset))
                codes = [result.code]
            image = fsm.image()
            brokers = sorted(image.brokers.values(), key=lambda b: b.broker_id)
            for spec, code in zip(specs, codes, strict=True):
                try:
                    expected = place_replicas(brokers, partitions, rf, spec.placement_offset)
                except PlacementError:
                    assert code == "not_enough_brokers" and spec.name not in image.topics
                    continue
                assert code == "ok"
                assert [p.replicas for p in image.partitions[spec.name]] == expected


@pytest.mark.parametrize("racks", [[0, 1, 2, 0, 1, 2], [0, 1, 1, 2, 2, 2], [None] * 4])
def test_topics_of_one_shape_at_every_start_get_their_own_placement(
        racks: list[int | None]) -> None:
    fsm = MetadataStateMachine()
    seq = iter(range(1, 10_000))

    def apply(cmd: Any) -> Any:
        result = fsm.apply(encode_command(cmd(request_id=RequestId("t", next(seq)))))
        assert result.ok, result
        return result

    apply(functools.partial(SetMetadataVersion, level=BATCH_CREATE_VERSION))
    for broker_id, rack in enumerate(racks):
        apply(functools.partial(
            RegisterBroker, broker_id=broker_id, endpoint=f"h{broker_id}:1",
            rack=None if rack is None else f"r{rack}",
            incarnation_id=str(uuid.UUID(int=broker_id + 1)), fenced=False))
    specs = tuple(TopicSpec(name=f"t{n}", topic_id=str(uuid.UUID(int=n + 100)), partitions=2,
                            replication_factor=2, placement_offset=n) for n in range(40))
    apply(functools.partial(CreateTopics, topics=specs))
    image = fsm.image()
    for spec in specs:
        expected = place_replicas(list(image.brokers.values()), 2, 2, spec.placement_offset)
        assert [p.replicas for p in image.partitions[spec.name]] == expected
