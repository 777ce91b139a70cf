"""Replica placement: a pure function of the brokers and a start offset.

The scheme follows Kafka's ``StripedReplicaPlacer``: only ``ACTIVE`` brokers
are used; racks take turns, and within a rack its brokers take turns. Think of
an endless stream of picks: pick ``g`` takes rack ``g mod k`` (of ``k``
racks, sorted by name) and, in that rack, broker ``(g div k) mod size``.
Partition after partition takes the next ``replication_factor`` picks, from
``start_offset`` on (a pick that would repeat a broker already in the
partition is passed over). So:

- replicas of a partition are distinct and on as many racks as possible
  (``min(replication_factor, racks)``);
- when every rack has the same number of active brokers (always true without
  rack information), each broker receives the same number of replicas, within
  one;
- the leader (first replica) is the member of its partition's picks that has
  led the fewest partitions so far (first pick on ties), which keeps leaders
  balanced within one as well.

The caller chooses ``start_offset`` (at random, before proposing) so that
topics do not all start on the same broker. :func:`check_placement` checks
these properties and is what the tests use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..errors import ConsensusError
from .records import Broker, BrokerState

__all__ = [
    "PlacementError",
    "check_placement",
    "place_on_racks",
    "place_replicas",
    "rack_groups",
]


class PlacementError(ConsensusError, ValueError):
    """Replicas cannot be placed as asked (too few active brokers, bad arguments)."""


def rack_groups(
    brokers: Sequence[Broker], existing_load: Mapping[int, int] | None = None
) -> list[list[int]]:
    """The ``ACTIVE`` broker ids grouped by rack: racks sorted by name (``None``
    first); within a rack, least loaded first (``existing_load``), then by id.

    This is the input of :func:`place_on_racks`; callers that place often can
    compute it once per broker set. Raises :class:`PlacementError` when a
    broker id is listed twice.
    """
    load = existing_load or {}
    by_rack: dict[str, list[int]] = {}
    seen: set[int] = set()
    for broker in brokers:
        if broker.broker_id in seen:
            raise PlacementError(f"broker {broker.broker_id} is listed twice")
        seen.add(broker.broker_id)
        if broker.state is BrokerState.ACTIVE:
            by_rack.setdefault(_rack_key(broker.rack), []).append(broker.broker_id)
    return [
        sorted(ids, key=lambda b: (load.get(b, 0), b))
        for _rack, ids in sorted(by_rack.items())
    ]


def _rack_key(rack: str | None) -> str:
    # None sorts before every real rack name, and cannot collide with one.
    return "" if rack is None else "r:" + rack


def place_replicas(
    brokers: Sequence[Broker],
    partitions: int,
    replication_factor: int,
    start_offset: int,
    first_partition: int = 0,
    existing_load: Mapping[int, int] | None = None,
) -> list[tuple[int, ...]]:
    """Choose replicas for ``partitions`` new partitions; leader first.

    Args:
        brokers: every registered broker; only ``ACTIVE`` ones receive replicas.
        partitions: how many partitions to place (``>= 0``).
        replication_factor: replicas per partition, ``1..active brokers``.
        start_offset: where the stream of picks starts (``>= 0``), chosen by
            the proposer.
        first_partition: index of the first partition placed; the stream
            starts ``first_partition * replication_factor`` picks later, so
            partitions added to a topic continue its pattern.
        existing_load: replicas each broker already holds; within a rack the
            least loaded brokers come first.

    Returns:
        One tuple of broker ids per partition, in partition order.

    Raises:
        PlacementError: bad arguments, or fewer active brokers than
            ``replication_factor``.
    """
    return place_on_racks(
        rack_groups(brokers, existing_load),
        partitions,
        replication_factor,
        start_offset,
        first_partition,
    )


def place_on_racks(
    racks: Sequence[Sequence[int]],
    partitions: int,
    replication_factor: int,
    start_offset: int,
    first_partition: int = 0,
) -> list[tuple[int, ...]]:
    """:func:`place_replicas` on brokers already grouped by :func:`rack_groups`.

    ``racks`` must hold distinct broker ids; empty racks are ignored.
    """
    if partitions < 0:
        raise PlacementError(f"partitions must be >= 0, got {partitions}")
    if replication_factor < 1:
        raise PlacementError(f"replication factor must be >= 1, got {replication_factor}")
    if start_offset < 0 or first_partition < 0:
        raise PlacementError(
            f"start_offset and first_partition must be >= 0, got {start_offset}, "
            f"{first_partition}"
        )
    racks = [rack for rack in racks if rack]
    active = sum(len(rack) for rack in racks)
    if replication_factor > active:
        raise PlacementError(
            f"replication factor {replication_factor} needs as many active brokers; "
            f"only {active} broker(s) are active"
        )
    k = len(racks)
    pick = start_offset + first_partition * replication_factor
    leader_counts: dict[int, int] = {}
    result: list[tuple[int, ...]] = []
    for _p in range(partitions):
        chosen: list[int] = []
        while len(chosen) < replication_factor:
            rack = racks[pick % k]
            broker = rack[(pick // k) % len(rack)]
            pick += 1
            if broker not in chosen:
                chosen.append(broker)
        leader = chosen[0]
        fewest = leader_counts.get(leader, 0)
        for candidate in chosen:
            count = leader_counts.get(candidate, 0)
            if count < fewest:
                leader, fewest = candidate, count
        leader_counts[leader] = fewest + 1
        if leader != chosen[0]:
            chosen.remove(leader)
            chosen.insert(0, leader)
        result.append(tuple(chosen))
    return result


def _pick_period(racks: Sequence[Sequence[int]]) -> int:
    """After how many picks the stream of picks over ``racks`` repeats itself.

    Pick ``g`` and pick ``g + period`` take the same broker, so
    :func:`place_on_racks` depends on ``start_offset`` and ``first_partition``
    only through ``(start_offset + first_partition * replication_factor) mod
    period``: a caller may keep the placements it computed under that key.
    """
    sizes = [len(rack) for rack in racks if rack]
    return len(sizes) * math.lcm(*sizes) if sizes else 1


def check_placement(
    brokers: Sequence[Broker],
    assignment: Sequence[Sequence[int]],
    replication_factor: int,
    *,
    check_balance: bool = True,
) -> list[str]:
    """Check an assignment made by :func:`place_replicas`; return the violations.

    Always checked: every partition has ``replication_factor`` distinct
    replicas, all ``ACTIVE`` brokers, on ``min(replication_factor, racks)``
    racks. With ``check_balance`` and when every rack has the same number of
    active brokers (balance is then possible): leaders, and replicas, per
    active broker differ by at most one.

    Returns an empty list when the assignment is sound.
    """
    violations: list[str] = []
    active = {b.broker_id: _rack_key(b.rack) for b in brokers if b.state is BrokerState.ACTIVE}
    rack_sizes: dict[str, int] = {}
    for rack in active.values():
        rack_sizes[rack] = rack_sizes.get(rack, 0) + 1
    want_racks = min(replication_factor, len(rack_sizes))
    leaders = dict.fromkeys(active, 0)
    replicas = dict.fromkeys(active, 0)
    for index, members in enumerate(assignment):
        if len(members) != replication_factor:
            violations.append(
                f"partition {index}: {len(members)} replicas, expected {replication_factor}"
            )
        if len(set(members)) != len(members):
            violations.append(f"partition {index}: replicas {tuple(members)} are not distinct")
        inactive = [b for b in members if b not in active]
        if inactive:
            violations.append(f"partition {index}: brokers {inactive} are not active")
        racks = {active[b] for b in members if b in active}
        if not inactive and len(racks) < want_racks:
            violations.append(
                f"partition {index}: replicas {tuple(members)} span {len(racks)} rack(s), "
                f"{want_racks} possible"
            )
        if members and members[0] in leaders:
            leaders[members[0]] += 1
        for b in members:
            if b in replicas:
                replicas[b] += 1
    balanced_possible = len(set(rack_sizes.values())) <= 1
    if check_balance and balanced_possible and active:
        for what, counts in (("leaders", leaders), ("replicas", replicas)):
            if max(counts.values()) - min(counts.values()) > 1:
                violations.append(f"{what} per broker differ by more than one: {counts}")
    return violations
