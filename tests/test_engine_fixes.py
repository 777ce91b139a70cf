"""Regression tests for the PySyncObj defects we correct (docs/engine-issues.md).

Each scenario runs once with the fixes disabled, to show that it really
reproduces the engine's defect on this machine, and once with them, to show
the fix.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
from typing import Any

import pytest

from streambus_consensus.cli import UNSAFE_NO_ENGINE_FIXES
from streambus_consensus.errors import ConsensusError
from streambus_consensus.testing.harness import LocalCluster, wait_until
from tests.conftest import ClusterFactory

pytestmark = pytest.mark.cluster

# Stepping down takes longer than noticing dead links, which leaves a window in
# which the leader still accepts writes it can no longer replicate.
SETTINGS = {
    "election_timeout_min": 0.4,
    "election_timeout_max": 0.8,
    "leader_stepdown_timeout": 1.6,
    "snapshot_interval_entries": 50,
    "proposal_timeout": 20.0,
    # A snapshot sent in many small chunks arrives over many ticks; the engine
    # runs its commit update after each chunk.
    "snapshot_chunk_bytes": 1024,
}
FILLER = "f" * 4000


def deposed_leader_scenario(cluster: LocalCluster) -> tuple[str, Any]:
    """E1: a leader cut off with an uncommitted entry, resumed after the new
    leader compacted past it. Returns (outcome of that write, its final value)."""
    cluster.start()
    old = cluster.wait_for_leader()
    followers = [n for n in cluster.nodes if n != old]
    cluster.client().request("PUT", "/v1/kv/marker", {"value": "before"})

    for node_id in followers:
        cluster.pause(node_id)
    wait_until(lambda: (s := cluster.status(old)) and s["state"] == "leader"
               and not any(p["connected"] for p in s["peers"]), 5,
               "the old leader to lose its links while still leading")
    before = cluster.status(old)
    assert before is not None
    outcome: dict[str, Any] = {}

    def doomed_write() -> None:
        try:
            cluster.client(old, timeout=60).request("PUT", "/v1/kv/doomed", {"value": "x"})
            outcome["result"] = "acknowledged"
        except (ConsensusError, OSError) as exc:
            outcome["result"] = f"failed: {type(exc).__name__}: {exc}"

    writer = threading.Thread(target=doomed_write)
    writer.start()
    wait_until(lambda: (s := cluster.status(old)) and
               s["last_log_index"] > before["last_log_index"], 5,
               "the old leader to append the write")
    cluster.pause(old)
    for node_id in followers:
        cluster.resume(node_id)
    new = cluster.wait_for_leader(15)
    assert new != old
    survivors = cluster.client(*followers)
    for i in range(200):
        survivors.request("PUT", f"/v1/kv/filler-{i}", {"value": FILLER})
    cluster.resume(old)
    writer.join(90)
    assert not writer.is_alive()
    wait_until(lambda: (s := cluster.status(old)) and s["leader_id"] not in (None, old)
               and s["applied_index"] > 200, 30, "the old leader to catch up")
    final = survivors.request("GET", "/v1/kv/doomed?linearizable=1")["value"]
    return outcome["result"], final


def test_deposed_leader_acknowledges_a_lost_write_without_the_fix(
        make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(3, settings=SETTINGS, env={UNSAFE_NO_ENGINE_FIXES: "1"})
    result, final = deposed_leader_scenario(cluster)
    assert (result, final) == ("acknowledged", None), (
        "the scenario no longer reproduces PySyncObj's defect E1; re-check the engine version")


def test_deposed_leader_never_acknowledges_a_lost_write(make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(3, settings=SETTINGS)
    result, final = deposed_leader_scenario(cluster)
    if result == "acknowledged":
        assert final == "x", "an acknowledged write was lost"
    else:
        assert final is None


# -- E22: a conflicting suffix walked back one entry per round trip -----------------------

DIVERGENT = 100
# No compaction: past it the leader would send a snapshot instead of walking back.
NO_COMPACTION = {**SETTINGS, "snapshot_interval_entries": 100_000}


def _counter(cluster: LocalCluster, node_id: str, name: str) -> float:
    host, _, port = cluster.nodes[node_id].api_address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith(f"streambus_consensus_{name}{{"))


def conflicting_suffix_scenario(cluster: LocalCluster) -> float:
    """E22: a leader cut off takes ``DIVERGENT`` writes it cannot commit; the
    others elect a new leader and commit more than that many entries. Then
    that leader stops as the deposed node's links heal, so the next write
    needs both remaining nodes, and the remaining follower wins an election
    with the deposed node as a voter: its view of the deposed node's log
    starts at its own end. Returns the seconds from the heal until a write
    commits."""
    cluster.start()
    network = cluster.network
    assert network is not None
    old = cluster.wait_for_leader()
    followers = [n for n in cluster.nodes if n != old]
    cluster.client().request("PUT", "/v1/kv/marker", {"value": "before"})
    before = cluster.status(old)
    assert before is not None
    links = network.isolate(old)

    def doomed_write(i: int) -> None:
        with contextlib.suppress(ConsensusError, OSError):
            cluster.client(old, timeout=30).request("PUT", f"/v1/kv/doomed-{i}", {"value": "x"})

    writers = [threading.Thread(target=doomed_write, args=(i,)) for i in range(DIVERGENT)]
    for writer in writers:
        writer.start()
    wait_until(lambda: (s := cluster.status(old)) and
               s["last_log_index"] >= before["last_log_index"] + DIVERGENT, 10,
               "the old leader to append the writes it cannot commit")
    new = cluster.wait_for_leader(15, exclude=old)
    survivors = cluster.client(*followers)
    for i in range(DIVERGENT + 10):
        survivors.request("PUT", f"/v1/kv/filler-{i}", {"value": "f"})
    wait_until(lambda: (s := cluster.status(old)) and s["state"] != "leader", 10,
               "the old leader to step down")
    other = next(n for n in followers if n != new)
    cluster.pause(new)
    network.heal(links)
    healed = time.monotonic()
    client = cluster.client(other, old, timeout=5)
    while True:
        try:
            client.request("PUT", "/v1/kv/after", {"value": "y"})
            break
        except ConsensusError:
            if time.monotonic() - healed > 60:
                raise
            time.sleep(0.01)
    took = time.monotonic() - healed
    cluster.resume(new)
    for writer in writers:
        writer.join(60)
    assert cluster.client(old).request("GET", "/v1/kv/after?linearizable=1")["value"] == "y"
    return took


def test_a_conflicting_suffix_is_walked_back_one_entry_per_round_trip_without_the_fix(
        make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(3, settings=NO_COMPACTION, proxied=True,
                           env={UNSAFE_NO_ENGINE_FIXES: "1"})
    took = conflicting_suffix_scenario(cluster)
    assert took > 5.0, (
        f"a write committed {took:.2f}s after the heal: the scenario no longer reproduces "
        "PySyncObj's defect E22; re-check the engine version")


def test_a_deposed_leaders_conflicting_suffix_is_skipped_in_one_round_trip(
        make_cluster: ClusterFactory) -> None:
    cluster = make_cluster(3, settings=NO_COMPACTION, proxied=True)
    took = conflicting_suffix_scenario(cluster)
    assert took < 3.0, f"a write committed {took:.2f}s after the heal"
    old = next(n for n in cluster.nodes if _counter(cluster, n, "engine_conflict_skips_total"))
    assert all(cluster.client(old).request("GET", f"/v1/kv/doomed-{i}?linearizable=1")
               ["value"] is None for i in range(DIVERGENT))
