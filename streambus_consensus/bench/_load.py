"""Closed-loop load from worker processes, the same machinery for etcd and for our API.

One Python process sending HTTP requests from 32 threads can be the
bottleneck of a benchmark on its own (the GIL, http.client's parsing), which
would flatten the figures of the faster system (on the 2-core bench machine
one process of 32 threads used 86 % of a core for etcd's ~5,400 linearizable
reads/s; two processes of 16 used about 30 % each). :meth:`LoadPool.run` therefore
spreads the callers over ``procs`` worker processes (spawned once, kept for
the whole section), each running ``threads`` closed-loop callers with their
own kept-alive connection, all starting at the same wall-clock instant. Each
worker reports its latencies, errors and its own CPU time, so the report can
show whether the client side was saturated.

A :class:`Target` says what a caller calls: ``etcd`` (an
:class:`~.etcd.EtcdCaller`: ``create`` = put-if-absent txn, ``read`` =
linearizable range) or ``http`` (an :class:`~streambus_consensus.client.ApiClient`:
``create`` = ``POST /v1/topics``, ``read`` = ``GET /v1/topics/NAME?linearizable=1``).
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..client import ApiClient
from .common import LoadResult, closed_loop
from .etcd import EtcdCaller
from .latency import READ_TOPIC

__all__ = ["LoadPool", "Target", "topic_value"]


def topic_value(name: str, partitions: int = 3, replication_factor: int = 3,
                brokers: int = 6) -> bytes:
    """The etcd value standing for a topic: the JSON record our node stores for one."""
    return json.dumps({
        "name": name, "topic_id": str(uuid.uuid4()), "config": {},
        "partitions": [{"partition": p, "leader": p % brokers, "leader_epoch": 0,
                        "replicas": [(p + r) % brokers for r in range(replication_factor)],
                        "isr": [(p + r) % brokers for r in range(replication_factor)]}
                       for p in range(partitions)],
    }, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Target:
    """What the callers of one load point call (picklable: it crosses to the workers)."""

    system: str
    """``etcd`` or ``http``."""
    address: str
    """``host:port`` of the member / node the callers talk to (the leader)."""
    op: str
    """``create`` or ``read``."""
    tag: str
    """Prefix of created names: unique per point, so every create is a new topic."""
    secret: str = ""
    """The cluster secret (``http`` only)."""


def _calls(target: Target, threads: int, worker: int) -> tuple[Callable[[int, int], object],
                                                                Callable[[], None]]:
    """The call each thread makes, and how to close the connections afterwards."""
    prefix = f"{target.tag}-w{worker}"
    if target.system == "etcd":
        etcd = [EtcdCaller(target.address) for _ in range(threads)]
        value = topic_value(prefix)
        read_key = f"topics/{READ_TOPIC}"

        def etcd_call(thread: int, i: int) -> object:
            if target.op == "create":
                if not etcd[thread].create(f"topics/{prefix}-{thread}-{i}", value):
                    raise RuntimeError("etcd key existed")
                return None
            return etcd[thread].get(read_key)

        def close_etcd() -> None:
            for caller in etcd:
                caller.close()

        return etcd_call, close_etcd
    ours = [ApiClient([target.address], secret=target.secret, pool_size=1)
            for _ in range(threads)]
    read_path = f"/v1/topics/{READ_TOPIC}?linearizable=1"

    def http_call(thread: int, i: int) -> object:
        if target.op == "create":
            return ours[thread].request("POST", "/v1/topics", {
                "name": f"{prefix}-{thread}-{i}", "partitions": 3, "replication_factor": 3})
        return ours[thread].request("GET", read_path)

    def close_ours() -> None:
        for client in ours:
            client.close()

    return http_call, close_ours


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _work(target: Target, threads: int, seconds: float, start_at: float, worker: int,
          warmup: float) -> dict[str, Any]:
    """One worker's share of a point (runs in the worker process)."""
    call, close = _calls(target, threads, worker)
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    cpu0, wall0 = _cpu(), time.monotonic()
    try:
        result = closed_loop(call, threads, seconds, warmup=warmup)
    finally:
        close()
    cpu, wall = _cpu() - cpu0, time.monotonic() - wall0
    return {"latencies": result.latencies, "errors": dict(result.errors),
            "cpu_fraction": round(cpu / wall, 3) if wall else None}


def _noop() -> int:
    return 0


class LoadPool:
    """``procs`` spawned worker processes for the section's HTTP load. A context manager."""

    def __init__(self, procs: int) -> None:
        self.procs = procs
        self._pool = ProcessPoolExecutor(max_workers=procs,
                                         mp_context=multiprocessing.get_context("spawn"))
        # Start every worker now, so that no measured point pays for a spawn.
        for future in [self._pool.submit(_noop) for _ in range(procs * 2)]:
            future.result(timeout=120)

    def run(self, target: Target, callers: int, seconds: float,
            warmup: float = 0.3) -> tuple[LoadResult, list[float | None]]:
        """``callers`` callers of ``target`` for ``seconds``; the merged result and each
        worker's CPU fraction (1.0 = one core busy all the time)."""
        procs = max(1, min(self.procs, callers))
        shares = [callers // procs + (1 if w < callers % procs else 0) for w in range(procs)]
        start_at = time.time() + 0.5
        futures = [self._pool.submit(_work, target, n, seconds, start_at, w, warmup)
                   for w, n in enumerate(shares)]
        merged = LoadResult(callers, seconds)
        merged.errors = Counter()
        cpu: list[float | None] = []
        for future in futures:
            part = future.result(timeout=seconds + warmup + 120)
            merged.latencies.extend(part["latencies"])
            merged.errors.update(part["errors"])
            cpu.append(part["cpu_fraction"])
        return merged, cpu

    def close(self) -> None:
        """Stop the workers."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> LoadPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
