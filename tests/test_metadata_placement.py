"""Replica placement: property tests of its invariants, through check_placement."""

from __future__ import annotations

import re
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streambus_consensus.errors import ConsensusError
from streambus_consensus.metadata import (
    Broker,
    BrokerState,
    PlacementError,
    check_placement,
    place_on_racks,
    place_replicas,
    rack_groups,
)
from streambus_consensus.metadata.placement import _pick_period


def broker(broker_id: int, rack: str | None = None,
           state: BrokerState = BrokerState.ACTIVE) -> Broker:
    return Broker(broker_id, f"b{broker_id}:9092", rack, str(uuid.UUID(int=broker_id + 1)),
                  1, state)


@st.composite
def clusters(draw: st.DrawFn, *, equal_racks: bool | None = None) -> list[Broker]:
    """Active brokers on 0..5 racks (0 = no rack information), plus some that are not active."""
    racks = draw(st.integers(0, 5))
    equal = draw(st.booleans()) if equal_racks is None else equal_racks
    sizes = (
        [draw(st.integers(1, 5))] * max(racks, 1) if equal
        else [draw(st.integers(1, 5)) for _ in range(max(racks, 1))]
    )
    brokers: list[Broker] = []
    ids = iter(draw(st.permutations(range(60))))
    for r, size in enumerate(sizes):
        for _ in range(size):
            brokers.append(broker(next(ids), f"rack-{r}" if racks else None))
    for _ in range(draw(st.integers(0, 3))):
        state = draw(st.sampled_from([BrokerState.FENCED, BrokerState.SHUTTING_DOWN]))
        rack = f"rack-{draw(st.integers(0, 6))}" if racks else None
        brokers.append(broker(next(ids), rack, state))
    return draw(st.permutations(brokers))


def active_count(brokers: list[Broker]) -> int:
    return sum(1 for b in brokers if b.is_active)


@settings(max_examples=300, deadline=None)
@given(st.data(), clusters())
def test_placement_invariants(data: st.DataObject, brokers: list[Broker]) -> None:
    n = active_count(brokers)
    rf = data.draw(st.integers(1, n), label="rf")
    partitions = data.draw(st.integers(0, 4 * n + 3), label="partitions")
    start = data.draw(st.integers(0, 2**40), label="start")
    first = data.draw(st.integers(0, 100), label="first_partition")
    assignment = place_replicas(brokers, partitions, rf, start, first)
    assert len(assignment) == partitions
    # Distinct replicas, only active brokers, rack spread; balance within one
    # for leaders and replicas whenever racks are equal (always without racks).
    assert check_placement(brokers, assignment, rf) == []


@settings(max_examples=100, deadline=None)
@given(st.data(), clusters(equal_racks=True))
def test_existing_load_reorders_within_racks_but_keeps_invariants(
    data: st.DataObject, brokers: list[Broker]
) -> None:
    n = active_count(brokers)
    rf = data.draw(st.integers(1, n))
    load = {b.broker_id: data.draw(st.integers(0, 9)) for b in brokers}
    assignment = place_replicas(brokers, 2 * n, rf, data.draw(st.integers(0, 99)), 0, load)
    assert check_placement(brokers, assignment, rf) == []
    # Within each rack, the least loaded brokers come first in the stream.
    groups = rack_groups(brokers, load)
    for group in groups:
        assert [load[b] for b in group] == sorted(load[b] for b in group)


@settings(max_examples=100, deadline=None)
@given(st.data(), clusters())
def test_placement_is_a_pure_function(data: st.DataObject, brokers: list[Broker]) -> None:
    n = active_count(brokers)
    rf = data.draw(st.integers(1, n))
    start = data.draw(st.integers(0, 1000))
    one = place_replicas(brokers, 7, rf, start)
    two = place_replicas(list(reversed(brokers)), 7, rf, start)
    assert one == two, "input order does not matter"
    assert place_on_racks(rack_groups(brokers), 7, rf, start) == one


@settings(max_examples=200, deadline=None)
@given(st.data(), clusters())
def test_placement_depends_on_where_the_stream_starts_modulo_its_period(
    data: st.DataObject, brokers: list[Broker]
) -> None:
    # What lets the state machine keep the placements it computed.
    racks = rack_groups(brokers)
    period = _pick_period(racks)
    rf = data.draw(st.integers(1, active_count(brokers)), label="rf")
    partitions = data.draw(st.integers(0, 20), label="partitions")
    start = data.draw(st.integers(0, 2**40), label="start")
    first = data.draw(st.integers(0, 50), label="first_partition")
    one = place_on_racks(racks, partitions, rf, start, first)
    laps = data.draw(st.integers(1, 5), label="laps")
    assert place_on_racks(racks, partitions, rf, start + laps * period, first) == one
    assert place_on_racks(racks, partitions, rf, (start + first * rf) % period) == one


def test_pick_period() -> None:
    assert _pick_period([]) == 1
    assert _pick_period([[1, 2, 3]]) == 3
    assert _pick_period([[1, 2], [3, 4], [5, 6]]) == 6
    assert _pick_period([[1, 2], [3, 4, 5], [], [6]]) == 18


def test_start_offset_rotates_leaders() -> None:
    brokers = [broker(i) for i in range(4)]
    leaders = {place_replicas(brokers, 1, 1, start)[0][0] for start in range(4)}
    assert leaders == {0, 1, 2, 3}


def test_racks_alternate() -> None:
    brokers = [broker(i, rack) for i, rack in enumerate("aabbcc")]
    assignment = place_replicas(brokers, 6, 3, 0)
    for replicas in assignment:
        assert sorted(brokers[b].rack or "" for b in replicas) == ["a", "b", "c"]
    assert check_placement(brokers, assignment, 3) == []


def test_unequal_racks_still_spread_across_racks() -> None:
    brokers = [broker(0, "small")] + [broker(i, "big") for i in range(1, 5)]
    assignment = place_replicas(brokers, 10, 2, 3)
    assert all({brokers[b].rack for b in replicas} == {"small", "big"} for replicas in assignment)
    assert check_placement(brokers, assignment, 2) == []


def test_only_active_brokers_receive_replicas() -> None:
    brokers = [broker(0), broker(1, state=BrokerState.FENCED),
               broker(2, state=BrokerState.SHUTTING_DOWN), broker(3)]
    assignment = place_replicas(brokers, 10, 2, 0)
    assert {b for replicas in assignment for b in replicas} == {0, 3}


@pytest.mark.parametrize(
    ("partitions", "rf", "start", "fragment"),
    [
        (1, 3, 0, "only 2 broker(s) are active"),
        (1, 0, 0, "replication factor must be >= 1"),
        (-1, 1, 0, "partitions must be >= 0"),
        (1, 1, -1, "must be >= 0"),
    ],
)
def test_placement_errors(partitions: int, rf: int, start: int, fragment: str) -> None:
    brokers = [broker(0), broker(1), broker(2, state=BrokerState.FENCED)]
    with pytest.raises(PlacementError, match=re.escape(fragment)) as info:
        place_replicas(brokers, partitions, rf, start)
    assert isinstance(info.value, ConsensusError)


def test_duplicate_broker_ids_are_refused() -> None:
    with pytest.raises(PlacementError, match="listed twice"):
        place_replicas([broker(1), broker(1)], 1, 1, 0)


def test_no_active_broker_at_all() -> None:
    with pytest.raises(PlacementError, match="only 0 broker"):
        place_replicas([broker(1, state=BrokerState.FENCED)], 1, 1, 0)


def test_checker_finds_every_kind_of_violation() -> None:
    brokers = [broker(0, "a"), broker(1, "a"), broker(2, "b"), broker(3, "b"),
               broker(4, "b", BrokerState.FENCED)]
    assert check_placement(brokers, [(0, 2), (3, 1)], 2) == []
    found = "\n".join(check_placement(brokers, [(0,), (1, 1), (4, 0), (0, 1)], 2))
    assert "1 replicas, expected 2" in found
    assert "are not distinct" in found
    assert "brokers [4] are not active" in found
    assert "span 1 rack(s), 2 possible" in found
    unbalanced = check_placement(brokers, [(0, 2), (0, 3), (0, 2)], 2)
    assert any(v.startswith("leaders per broker") for v in unbalanced)
    assert any(v.startswith("replicas per broker") for v in unbalanced)
    assert check_placement(brokers, [(0, 2), (0, 3), (0, 2)], 2, check_balance=False) == []


# --------------------------------------------------------------------------
# Golden placements: the exact answer for fixed inputs. The pattern is part of
# the replicated behaviour (every replica computes it), so a change to it must
# be deliberate: it changes where new partitions of existing topics go.


def test_golden_placement_without_racks() -> None:
    brokers = [broker(b) for b in range(4)]
    assert place_replicas(brokers, 6, 3, 0) == [
        (0, 1, 2), (3, 0, 1), (2, 3, 0), (1, 2, 3), (0, 1, 2), (3, 0, 1)]
    assert place_replicas(brokers, 2, 3, 5) == [(1, 2, 3), (0, 1, 2)]
    assert place_replicas(brokers, 2, 3, 0, first_partition=2) == [(2, 3, 0), (1, 2, 3)]


def test_golden_placement_over_two_racks() -> None:
    brokers = [broker(0, "a"), broker(1, "a"), broker(2, "b"), broker(3, "b")]
    assert place_replicas(brokers, 4, 2, 0) == [(0, 2), (1, 3), (2, 0), (3, 1)]
    assert place_replicas(brokers, 4, 3, 1) == [(2, 1, 3), (0, 2, 1), (3, 0, 2), (1, 3, 0)]
    # Added partitions continue the replica sets; leaders are balanced per call.
    added = place_replicas(brokers, 2, 2, 0, first_partition=2)
    assert added == [(0, 2), (1, 3)]
    assert [set(p) for p in added] == [set(p) for p in place_replicas(brokers, 4, 2, 0)[2:]]


def test_golden_placement_with_existing_load() -> None:
    brokers = [broker(0, "a"), broker(1, "a"), broker(2, "b"), broker(3, "b")]
    loaded = place_replicas(brokers, 2, 2, 0, existing_load={0: 5, 2: 5})
    assert loaded == [(1, 3), (0, 2)]


def test_rack_groups_order_racks_and_brokers() -> None:
    brokers = [broker(5, "b"), broker(1, None), broker(3, "a"), broker(2, "b"),
               broker(4, "a", BrokerState.FENCED)]
    assert rack_groups(brokers) == [[1], [3], [2, 5]]
    assert rack_groups(brokers, {5: 0, 2: 9}) == [[1], [3], [5, 2]]


def test_checker_boundaries() -> None:
    rackless = [broker(b) for b in range(3)]
    # Balance: a difference of exactly one is fine, two is not.
    assert check_placement(rackless, [(0, 1), (1, 2), (2, 0), (0, 1)], 2) == []
    assert check_placement(rackless, [(0, 1), (0, 2), (0, 1), (1, 2)], 2) == [
        "leaders per broker differ by more than one: {0: 3, 1: 1, 2: 0}"]
    # Racks of unequal size: balance is not asked for.
    uneven = [broker(0, "a"), broker(1, "a"), broker(2, "b")]
    assert check_placement(uneven, [(0, 2), (0, 2), (0, 2)], 2) == []
    # A replication factor above the rack count only asks for every rack.
    two_racks = [broker(0, "a"), broker(1, "a"), broker(2, "b"), broker(3, "b")]
    assert check_placement(two_racks, [(0, 1, 2)], 3, check_balance=False) == []
    assert check_placement(two_racks, [(0, 1)], 2, check_balance=False) == [
        "partition 0: replicas (0, 1) span 1 rack(s), 2 possible"]
    # No active broker, no assignment: nothing to say.
    assert check_placement([broker(0, None, BrokerState.FENCED)], [], 1) == []
    assert check_placement([], [(7,)], 1) == ["partition 0: brokers [7] are not active"]
    # Exact wording of each violation.
    assert check_placement(two_racks, [(0, 0, 2)], 3, check_balance=False) == [
        "partition 0: replicas (0, 0, 2) are not distinct"]
    assert check_placement(two_racks, [(0, 2)], 3, check_balance=False) == [
        "partition 0: 2 replicas, expected 3"]
    assert check_placement(two_racks, [()], 1, check_balance=False) == [
        "partition 0: 0 replicas, expected 1",
        "partition 0: replicas () span 0 rack(s), 1 possible"]
