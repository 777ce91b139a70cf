"""Election and failover timings on real node processes (a script, not a test).

Measures, on loopback clusters of node processes with the default config:

1. time from process start to an agreed leader, for one node and for three;
2. failover: SIGKILL of the leader, then the time to a new agreed leader and
   to the next committed write, over ``--kills`` rounds (the killed node is
   restarted between rounds);
3. leader changes seen by every node during ``--idle`` seconds of silence.

Run: ``python -m streambus_consensus.bench.failover [--kills 10] [--idle 60] [--json F]``
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import ConsensusError
from ..testing.harness import LocalCluster, wait_until

__all__ = ["main", "measure"]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "median": statistics.median(values),
            "p99": _quantile(values, 0.99), "max": max(values), "min": min(values)}


def _time_to_leader(base: Path, size: int) -> float:
    with LocalCluster(size, base, app="kv") as cluster:
        started = time.monotonic()
        cluster.start(wait=False)
        cluster.wait_for_leader(30)
        return time.monotonic() - started


def _write(cluster: LocalCluster, key: str) -> bool:
    client = cluster.client(*cluster.running(), timeout=2)
    client.request("PUT", f"/v1/kv/{key}", {"value": key})
    return True


def measure(base: Path, kills: int, idle: float) -> dict[str, Any]:
    """Run all three measurements; return the figures."""
    results: dict[str, Any] = {
        "leader_single_node_s": _time_to_leader(base / "single", 1),
        "leader_three_nodes_s": _time_to_leader(base / "three", 3),
    }
    elected: list[float] = []
    committed: list[float] = []
    with LocalCluster(3, base / "failover", app="kv") as cluster:
        cluster.start()
        cluster.wait_for_leader(30)
        for round_no in range(kills):
            wait_until(functools.partial(_write, cluster, f"before-{round_no}"), 30, "a write")
            leader = cluster.wait_for_leader(30)
            killed = time.monotonic()
            cluster.kill(leader)
            cluster.wait_for_leader(30, exclude=leader)
            elected.append(time.monotonic() - killed)
            wait_until(functools.partial(_write, cluster, f"after-{round_no}"), 30,
                       "a write after failover", interval=0.01)
            committed.append(time.monotonic() - killed)
            cluster.start(leader)

            def rejoined(node_id: str = leader) -> bool:
                status = cluster.status(node_id)
                return bool(status and status["leader_id"])

            wait_until(rejoined, 30, "the restarted node to rejoin")
            print(f"  kill {round_no + 1}/{kills}: new leader after {elected[-1]:.3f}s, "
                  f"write committed after {committed[-1]:.3f}s", flush=True)
        results["failover_new_leader_s"] = _summary(elected)
        results["failover_next_commit_s"] = _summary(committed)
        before = {n: cluster.status(n) for n in cluster.nodes}
        time.sleep(idle)
        after = {n: cluster.status(n) for n in cluster.nodes}
        terms = {n: (before[n] or {}).get("term") == (after[n] or {}).get("term")
                 for n in cluster.nodes}
        results["idle_seconds"] = idle
        results["idle_term_changes"] = sum(1 for same in terms.values() if not same)
        results["idle_leaders"] = sorted({(s or {}).get("leader_id") or "-"
                                          for s in after.values()})
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="failover rounds (default 10)")
    parser.add_argument("--idle", type=float, default=60.0, help="idle seconds (default 60)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streambus-failover-") as tmp:
        try:
            results = measure(Path(tmp), args.kills, args.idle)
        except (ConsensusError, TimeoutError, RuntimeError) as exc:
            print(f"failover benchmark failed: {exc}", file=sys.stderr)
            return 1
    f_l, f_c = results["failover_new_leader_s"], results["failover_next_commit_s"]
    rows = [
        ("leader elected, 1 node (s)", f"{results['leader_single_node_s']:.3f}", "<= 1.0"),
        ("leader elected, 3 nodes (s)", f"{results['leader_three_nodes_s']:.3f}", "<= 2.0"),
        (f"failover to new leader, median / max over {f_l['n']} (s)",
         f"{f_l['median']:.3f} / {f_l['max']:.3f}", "-"),
        (f"failover to next commit, median / max over {f_c['n']} (s)",
         f"{f_c['median']:.3f} / {f_c['max']:.3f}", "median <= 0.6"),
        (f"term changes in {results['idle_seconds']:.0f}s idle (nodes)",
         str(results["idle_term_changes"]), "0"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'value':>15}  target")
    for name, value, target in rows:
        print(f"{name.ljust(width)}  {value:>15}  {target}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
