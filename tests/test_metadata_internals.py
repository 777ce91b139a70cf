"""The state machine's building blocks against simple models: the persistent
map against a dict, and the change records listeners receive for each kind."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from streambus_consensus.metadata import (
    AddPartitions,
    AlterTopicConfig,
    BeginControlledShutdown,
    ChangeKind,
    DeleteTopic,
    FenceBroker,
    ReassignReplicas,
    RegisterBroker,
    RequestId,
    UnfenceBroker,
    UnregisterBroker,
    encode_command,
)
from streambus_consensus.metadata.fsm import _PersistentMap
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
