"""How a StreamBus broker uses the metadata cluster: register, heartbeat, create a
topic, watch the changes, and react when a broker is fenced.

Run it inside the environment with ``python examples/broker_integration.py``.
It starts three metadata node processes on loopback and plays three brokers
against their HTTP API, the way the broker's own code does:

1. each broker registers (``POST /v1/brokers``) and comes up *fenced*;
2. it heartbeats (``POST /v1/brokers/{id}/heartbeat``) and the leader's
   controller unfences it;
3. an admin creates a topic; a watcher long-polls ``GET /v1/watch`` from an
   offset and sees every change in log order;
4. one broker stops heartbeating: after its session it is fenced, leaves
   every ISR, and its partitions get new leaders; when it heartbeats again it
   is unfenced.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from streambus_consensus.client import ApiClient
from streambus_consensus.errors import ConsensusError
from streambus_consensus.testing.harness import LocalCluster, wait_until

SESSION = 3.0
"""Broker session timeout for the demo (KRaft's default is 9 s); brokers beat every 0.5 s."""


def say(message: str) -> None:
    print(message, flush=True)


class Broker:
    """One StreamBus broker's side of the conversation: its registration and heartbeats."""

    def __init__(self, client: ApiClient, broker_id: int, rack: str) -> None:
        self.client = client
        self.broker_id = broker_id
        registration = client.request("POST", "/v1/brokers", {
            "broker_id": broker_id, "endpoint": f"broker{broker_id}.local:9092", "rack": rack})
        self.epoch: int = registration["broker_epoch"]
        self.state: str = registration["state"]
        self.beating = threading.Event()
        self.beating.set()

    def heartbeat(self) -> None:
        """One heartbeat; the answer tells the broker how the cluster sees it."""
        if not self.beating.is_set():
            return
        answer = self.client.request("POST", f"/v1/brokers/{self.broker_id}/heartbeat",
                                     {"broker_epoch": self.epoch})
        if answer and answer["state"] != self.state:
            say(f"    [broker {self.broker_id}] the cluster now has me {answer['state']}")
            self.state = answer["state"]


def heartbeat_forever(brokers: list[Broker], stop: threading.Event) -> None:
    while not stop.wait(0.5):
        for broker in brokers:
            # No leader for a moment? Try again at the next beat.
            with contextlib.suppress(ConsensusError, OSError):
                broker.heartbeat()


def describe(change: dict[str, Any]) -> str:
    """A change from the watch feed, in words."""
    record, kind = change["record"], change["kind"]
    if kind.startswith("broker_"):
        return f"broker {record['broker_id']} {kind.removeprefix('broker_').replace('_', ' ')}"
    if kind.startswith("partition_"):
        return (f"{record['topic']}-{record['index']}: leader {record['leader']} "
                f"(epoch {record['leader_epoch']}), isr {record['isr']}")
    return f"topic {record['name']} {kind.removeprefix('topic_')}"


class Watcher:
    """Long-polls the change feed from an offset, as a broker's metadata cache does."""

    def __init__(self, client: ApiClient, after: int) -> None:
        self.client = client
        self.offset = after
        """The last offset seen: where to resume after a restart."""

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                events = self.client.request(
                    "GET", f"/v1/watch?after={self.offset}&wait=2")["events"]
            except (ConsensusError, OSError):
                stop.wait(0.2)
                continue
            for event in events:
                if event["reset"]:
                    say(f"    [watch @{event['offset']}] too far behind: full image received")
                for change in event["changes"]:
                    say(f"    [watch @{event['offset']}] {describe(change)}")
                self.offset = event["offset"]


def leaders(client: ApiClient, topic: str) -> dict[int, dict[str, Any]]:
    partitions = client.request("GET", f"/v1/topics/{topic}")["partitions"]
    return {p["index"]: p for p in partitions}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="keep configs, data and logs here (default: a temp dir)")
    args = parser.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="streambus-brokers-"))
    stop = threading.Event()
    threads: list[threading.Thread] = []

    with LocalCluster(3, base, app="metadata",
                      settings={"broker_session_timeout": SESSION}) as cluster:
        say(f"Starting three metadata nodes (logs under {base})")
        cluster.start()
        say(f"  {cluster.wait_for_leader()} leads; every node serves the API and forwards "
            "writes to the leader")
        client = cluster.client()

        say("\nThree brokers register; each comes up fenced, as in KRaft")
        brokers = [Broker(client, broker_id, rack=f"rack-{broker_id}") for broker_id in range(3)]
        for b in brokers:
            say(f"  broker {b.broker_id}: epoch {b.epoch}, {b.state}")
        say("They heartbeat every 0.5 s; the leader's controller unfences them")
        threads.append(threading.Thread(target=heartbeat_forever, args=(brokers, stop)))
        threads[-1].start()
        wait_until(lambda: all(b.state == "active" for b in brokers), 10, "unfencing")

        offset = client.request("GET", "/v1/topics")["offset"]
        say(f"\nA watcher follows the change feed from offset {offset}")
        watcher = Watcher(client, offset)
        threads.append(threading.Thread(target=watcher.run, args=(stop,)))
        threads[-1].start()

        say("An admin creates topic 'orders': 6 partitions, 3 replicas each")
        client.request("POST", "/v1/topics", {
            "name": "orders", "partitions": 6, "replication_factor": 3,
            "config": {"min.insync.replicas": 2},
            "request_id": {"client_id": "admin-1", "seq": 1}})  # safe to retry: applies once
        before = leaders(client, "orders")
        created_at = client.request("GET", "/v1/topics")["offset"]
        wait_until(lambda: watcher.offset >= created_at, 10, "the watcher to see the topic")
        led = sorted(i for i, p in before.items() if p["leader"] == 2)
        say(f"  broker 2 leads partitions {led}")

        say(f"\nBroker 2 stops heartbeating (its session is {SESSION:.0f} s)")
        brokers[2].beating.clear()
        silenced = time.monotonic()
        wait_until(lambda: client.request("GET", "/v1/brokers/2")["state"] == "fenced",
                   SESSION * 4, "broker 2 to be fenced")
        say(f"  fenced {time.monotonic() - silenced:.1f}s later. Where its partitions went:")
        after = leaders(client, "orders")
        for i in sorted(after):
            b, a = before[i], after[i]
            moved = (f"leader {b['leader']} -> {a['leader']}, leader epoch "
                     f"{b['leader_epoch']} -> {a['leader_epoch']}" if b["leader"] != a["leader"]
                     else f"leader {a['leader']} stays")
            say(f"    orders-{i}: {moved}; isr {b['isr']} -> {a['isr']}")

        say("\nBroker 2 comes back and heartbeats again")
        brokers[2].beating.set()
        wait_until(lambda: client.request("GET", "/v1/brokers/2")["state"] == "active",
                   SESSION * 4, "broker 2 to be unfenced")
        wait_until(lambda: brokers[2].state == "active", 5, "broker 2 to hear it is unfenced")
        say("  unfenced: it may lead again once it rejoins the ISRs (the partition leaders' "
            "AlterIsr requests)")

        say("\nStopping the brokers and the nodes")
        stop.set()
        for thread in threads:
            thread.join(5)
    say("Done: registration, heartbeats, one create applied once, every change watched in "
        "order, and a silent broker fenced with its partitions moved to live leaders.")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConsensusError, TimeoutError, RuntimeError) as exc:
        print(f"example failed: {exc}", file=sys.stderr)
        sys.exit(1)
