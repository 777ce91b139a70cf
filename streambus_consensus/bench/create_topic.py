"""create_topic latency and throughput on a three-node loopback cluster (a script, not a test).

Every create is a topic of 3 partitions with replication factor 3, placed on
3 registered, heartbeating (so unfenced) brokers, and committed through the
Raft log on a majority. Measured:

1. **latency**: one caller, one create at a time (``--latency-ops``);
2. **throughput**: 1, 8 and 32 concurrent callers (``--callers``) for
   ``--seconds`` each: creates per second, and latency under that load.

Two ways in (``--mode``):

- ``http`` (default): three node processes; each caller is a thread that
  sends signed ``POST /v1/topics`` to one node's HTTP API, on a new
  connection per request as :class:`~streambus_consensus.client.ApiClient`
  does (``--keep-alive``: one connection per caller, kept open).
- ``embedded``: two node processes, and the bench process itself opens a
  :class:`~streambus_consensus.metadata.store.MetadataStore` as the third
  voting node; callers call ``store.create_topic`` directly, without HTTP.

``--role`` chooses whether callers talk to the leader (default) or a follower
(which forwards to the leader). ``--no-fsync`` runs the nodes with
``fsync = false`` (durable against a process crash, not a power loss).

Targets (issue 3): p50 <= 1.0 ms and p99 <= 3 ms with one caller;
>= 10,000 creates/s with 32 callers.

Run: ``python -m streambus_consensus.bench.create_topic [--mode http|embedded]
[--no-fsync] [--role leader|follower] [--keep-alive] [--quick] [--json PATH]``
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..api import sign_request
from ..client import ApiClient
from ..config import NodeConfig
from ..errors import ConsensusError
from ..metadata.store import MetadataStore
from ..testing.harness import LocalCluster, wait_until

__all__ = ["main", "measure"]

TARGET_P50_MS = 1.0
TARGET_P99_MS = 3.0
TARGET_OPS_32 = 10_000.0
BROKERS = 3
HEARTBEAT_INTERVAL = 1.0

Create = Callable[[str], None]
"""One caller's way to create a topic of the given name (raises on failure)."""


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(kind: str, callers: int, latencies: list[float], elapsed: float,
             errors: int) -> dict[str, Any]:
    ordered = sorted(latencies)
    return {
        "kind": kind, "callers": callers, "ops": len(ordered), "errors": errors,
        "seconds": round(elapsed, 3),
        "ops_per_s": round(len(ordered) / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": round(_quantile(ordered, 0.50) * 1e3, 3) if ordered else None,
        "p99_ms": round(_quantile(ordered, 0.99) * 1e3, 3) if ordered else None,
        "max_ms": round(ordered[-1] * 1e3, 3) if ordered else None,
    }


class _HttpCaller:
    """One caller of one node's API: signed requests, on a new connection each
    (as :class:`~streambus_consensus.client.ApiClient` does) or on one kept alive."""

    def __init__(self, address: str, secret: str | None, *, keep_alive: bool) -> None:
        host, _, port = address.rpartition(":")
        self._host, self._port = host, int(port)
        self._secret = secret
        self._keep_alive = keep_alive
        self._conn: http.client.HTTPConnection | None = None

    def create(self, name: str) -> None:
        body = json.dumps({"name": name, "partitions": 3, "replication_factor": 3}).encode()
        status, payload = self._post("/v1/topics", body)
        if status != 200:
            raise RuntimeError(f"create {name}: HTTP {status}: {payload[:200]!r}")

    def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        if self._secret is not None:
            stamp = f"{time.time():.3f}"
            headers["X-SBC-Timestamp"] = stamp
            headers["X-SBC-Signature"] = sign_request(self._secret, "POST", path, stamp, body)
        for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect once
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=30)
            try:
                self._conn.request("POST", path, body=body, headers=headers)
                response = self._conn.getresponse()
                answer = response.status, response.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
            else:
                if not self._keep_alive:
                    self.close()
                return answer
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _run_level(make_create: Callable[[], tuple[Create, Callable[[], None]]], label: str,
               kind: str, callers: int, *, ops: int | None = None,
               seconds: float | None = None) -> dict[str, Any]:
    """Run ``callers`` threads until ``ops`` creates each or ``seconds`` pass."""
    made = [make_create() for _ in range(callers)]
    latencies: list[list[float]] = [[] for _ in range(callers)]
    errors = [0] * callers
    first_errors: list[str] = []
    barrier = threading.Barrier(callers + 1)
    deadline = [0.0]

    def caller(n: int) -> None:
        create, _ = made[n]
        own = latencies[n]
        barrier.wait()
        i = 0
        while (ops is None or i < ops) and (seconds is None or time.monotonic() < deadline[0]):
            name = f"{label}-{callers}c-{n}-{i}"
            started = time.perf_counter()
            try:
                create(name)
            except (ConsensusError, RuntimeError, OSError, http.client.HTTPException) as exc:
                errors[n] += 1
                if len(first_errors) < 3:
                    first_errors.append(f"{type(exc).__name__}: {exc}"[:160])
            else:
                own.append(time.perf_counter() - started)
            i += 1

    threads = [threading.Thread(target=caller, args=(n,), name=f"caller-{n}")
               for n in range(callers)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + (seconds or 0.0)
    started = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    for _, close in made:
        close()
    row = _summary(kind, callers, [x for own in latencies for x in own], elapsed, sum(errors))
    if first_errors:
        row["first_errors"] = first_errors
    return row


def _heartbeats(beat: Callable[[int, int], Any], epochs: dict[int, int],
                stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_INTERVAL):
        for broker_id, epoch in epochs.items():
            with contextlib.suppress(ConsensusError, OSError):
                beat(broker_id, epoch)


@contextlib.contextmanager
def _heartbeating(beat: Callable[[int, int], Any], epochs: dict[int, int]) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=_heartbeats, args=(beat, epochs, stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def _register(client: ApiClient) -> dict[int, int]:
    epochs = {}
    for broker_id in range(BROKERS):
        broker = client.request("POST", "/v1/brokers", {
            "broker_id": broker_id, "endpoint": f"bench-broker{broker_id}:9092",
            "rack": f"rack-{broker_id}"})
        epochs[broker_id] = int(broker["broker_epoch"])
    return epochs


def _wait_active(read_states: Callable[[], list[str]]) -> None:
    wait_until(lambda: read_states().count("active") == BROKERS, 30,
               "the brokers to be unfenced")


def _levels(create_factory: Callable[[], tuple[Create, Callable[[], None]]], label: str,
            args: argparse.Namespace, report: Callable[[dict[str, Any]], None]) -> None:
    _run_level(create_factory, f"{label}-warm", "warmup", 1, ops=args.warmup)
    report(_run_level(create_factory, f"{label}-lat", "latency", 1, ops=args.latency_ops))
    for callers in args.callers:
        report(_run_level(create_factory, f"{label}-tput", "throughput", callers,
                          seconds=args.seconds))


def _measure_http(base: Path, args: argparse.Namespace,
                  report: Callable[[dict[str, Any]], None]) -> None:
    with LocalCluster(3, base, app="metadata", settings={"fsync": args.fsync}) as cluster:
        cluster.start()
        leader = cluster.wait_for_leader(30)
        target = leader if args.role == "leader" else next(
            n for n in cluster.nodes if n != leader)
        client = cluster.client(target)
        epochs = _register(client)
        beat_client = cluster.client(target)
        with _heartbeating(lambda b, e: beat_client.request(
                "POST", f"/v1/brokers/{b}/heartbeat", {"broker_epoch": e}), epochs):
            _wait_active(lambda: [b["state"] for b in
                                  client.request("GET", "/v1/brokers")["brokers"]])
            address = cluster.nodes[target].api_address

            def factory() -> tuple[Create, Callable[[], None]]:
                caller = _HttpCaller(address, cluster.secret, keep_alive=args.keep_alive)
                return caller.create, caller.close

            _levels(factory, "http", args, report)
            if args.profile_dir:
                _profile_nodes(cluster, factory, args, report)


def _profile_nodes(cluster: LocalCluster, factory: Callable[[], tuple[Create, Callable[[],
                   None]]], args: argparse.Namespace,
                   report: Callable[[dict[str, Any]], None]) -> None:
    """Run the largest level again under ``py-spy record`` attached to every node."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = Path(args.profile_dir)
    out.mkdir(parents=True, exist_ok=True)
    spies = []
    for node_id, node in cluster.nodes.items():
        if node.proc is None:
            continue
        spies.append(subprocess.Popen(
            [py_spy, "record", "--pid", str(node.proc.pid), "--rate", "200", "--threads",
             "--format", "raw", "--output", str(out / f"{node_id}.txt"),
             "--duration", str(int(args.seconds) + 2)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # let py-spy attach before the load starts
    callers = max(args.callers)
    report(_run_level(factory, "http-prof", "profiled", callers, seconds=args.seconds))
    for spy in spies:
        spy.wait(60)


def _measure_embedded(base: Path, args: argparse.Namespace,
                      report: Callable[[dict[str, Any]], None]) -> None:
    with LocalCluster(3, base, app="metadata", settings={"fsync": args.fsync}) as cluster:
        config = NodeConfig.from_toml(cluster.nodes["n1"].config_path)
        cluster.start("n2", "n3")
        store = MetadataStore.open(config)
        try:
            leader = wait_until(lambda: store.node.leader_id, 30, "a leader")
            want = "n1" if args.role == "leader" else "n2"
            if leader != want:
                _transfer(cluster, store, want)
            epochs = {b.broker_id: b.broker_epoch for b in (
                store.register_broker(i, f"bench-broker{i}:9092", rack=f"rack-{i}")
                for i in range(BROKERS))}
            with _heartbeating(store.heartbeat, epochs):
                _wait_active(lambda: [str(b.state) for b in store.image().brokers.values()])

                def create(name: str) -> None:
                    store.create_topic(name, 3, 3)

                def factory() -> tuple[Create, Callable[[], None]]:
                    return create, _nothing

                _levels(factory, "embedded", args, report)
                if args.profile_dir:
                    _profile_embedded(factory, args, report)
        finally:
            store.close()


def _profile_embedded(factory: Callable[[], tuple[Create, Callable[[], None]]],
                      args: argparse.Namespace,
                      report: Callable[[dict[str, Any]], None]) -> None:
    """The one-caller latency run again under py-spy attached to this process."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = Path(args.profile_dir)
    out.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        [py_spy, "record", "--pid", str(os.getpid()), "--rate", "500", "--threads",
         "--format", "raw", "--output", str(out / "embedded.txt"),
         "--duration", str(int(args.seconds) + 2)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    report(_run_level(factory, "emb-prof", "profiled", 1, seconds=args.seconds))
    spy.wait(60)


def _nothing() -> None:
    pass


def _transfer(cluster: LocalCluster, store: MetadataStore, want: str) -> None:
    """Move leadership to ``want`` and wait until the in-process node sees it."""
    def moved() -> bool:
        current = store.node.leader_id
        if current == want:
            return True
        if current is not None and current != store.node.node_id:
            with contextlib.suppress(ConsensusError, OSError):
                cluster.client(current).request("POST", "/v1/leader/transfer",
                                                {"node_id": want})
        elif current == store.node.node_id:
            with contextlib.suppress(ConsensusError):
                store.node.transfer_leadership(want)
        return False

    wait_until(moved, 30, f"leadership to move to {want}", interval=0.5)


def measure(base: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen mode; return the figures."""
    results: list[dict[str, Any]] = []

    def report(row: dict[str, Any]) -> None:
        row = {"mode": args.mode, "role": args.role, "fsync": args.fsync,
               "keep_alive": args.keep_alive if args.mode == "http" else None, **row}
        results.append(row)
        print(_row(row), flush=True)
        for error in row.get("first_errors", ()):
            print(f"    error: {error}", flush=True)

    load_before = [round(x, 2) for x in os.getloadavg()]
    print(_header(), flush=True)
    if args.mode == "http":
        _measure_http(base, args, report)
    else:
        _measure_embedded(base, args, report)
    latency = next(r for r in results if r["kind"] == "latency")
    top = [r for r in results if r["kind"] == "throughput" and r["callers"] == 32]
    met = {
        "p50_1_caller": latency["p50_ms"] is not None and latency["p50_ms"] <= TARGET_P50_MS,
        "p99_1_caller": latency["p99_ms"] is not None and latency["p99_ms"] <= TARGET_P99_MS,
        "ops_32_callers": bool(top) and top[0]["ops_per_s"] >= TARGET_OPS_32,
    }
    return {
        "benchmark": "create_topic", "partitions": 3, "replication_factor": 3,
        "brokers": BROKERS, "mode": args.mode, "role": args.role, "fsync": args.fsync,
        "keep_alive": args.keep_alive if args.mode == "http" else None,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "loadavg_before": load_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "targets": {"p50_ms_1_caller": TARGET_P50_MS, "p99_ms_1_caller": TARGET_P99_MS,
                    "ops_per_s_32_callers": TARGET_OPS_32},
        "met": met, "results": results,
    }


def _header() -> str:
    return (f"{'mode':<9} {'role':<8} {'fsync':<5} {'kind':<10} {'callers':>7} {'ops':>7} "
            f"{'errors':>6} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")


def _row(r: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    return (f"{r['mode']:<9} {r['role']:<8} {str(r['fsync']).lower():<5} {r['kind']:<10} "
            f"{r['callers']:>7} {r['ops']:>7} {r['errors']:>6} {r['ops_per_s']:>9.1f} "
            f"{ms(r['p50_ms']):>8} {ms(r['p99_ms']):>8} {ms(r['max_ms']):>8}")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("http", "embedded"), default="http",
                        help="callers use the HTTP API (default) or an in-process store")
    parser.add_argument("--role", choices=("leader", "follower"), default="leader",
                        help="callers talk to the leader (default) or a follower")
    parser.add_argument("--keep-alive", action="store_true",
                        help="http mode: one kept-alive connection per caller (default: a new "
                        "connection per request, as ApiClient does)")
    parser.add_argument("--no-fsync", dest="fsync", action="store_false",
                        help="run the nodes with fsync = false (default: fsync on)")
    parser.add_argument("--latency-ops", type=int, default=1000,
                        help="creates in the one-caller latency run (default 1000)")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up creates (default 100)")
    parser.add_argument("--callers", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 8, 32], help="throughput levels (default 1,8,32)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="length of each throughput level (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 200 latency ops, 2 s per level")
    parser.add_argument("--profile-dir", help="also run once more under py-spy (http: the "
                        "largest level, every node; embedded: one caller, this process)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.latency_ops, args.warmup, args.seconds = 200, 20, 2.0
    with tempfile.TemporaryDirectory(prefix="streambus-bench-create-") as tmp:
        try:
            results = measure(Path(tmp), args)
        except (ConsensusError, TimeoutError, RuntimeError) as exc:
            print(f"create_topic benchmark failed: {exc}", file=sys.stderr)
            return 1
    print(f"targets: p50 <= {TARGET_P50_MS} ms and p99 <= {TARGET_P99_MS} ms with one caller "
          f"(latency row); >= {TARGET_OPS_32:,.0f} creates/s with 32 callers")
    print("met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in results["met"].items()))
    print(f"load average (1 min) before/after: {results['loadavg_before'][0]} / "
          f"{results['loadavg_after'][0]} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
