"""The CLI covers the API: brokers, partitions, elections, reassignment; --version; pipes."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import time

import pytest

from streambus_consensus.testing.harness import LocalCluster
from tests.test_cli import ENV, SCRIPT, fails, ok, rows


def test_version() -> None:
    out = ok("--version")
    assert out.startswith("streambus-consensus ") and out.split()[1][0].isdigit()


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["topics", "--help"]])
def test_a_closed_pipe_is_quiet(args: list[str]) -> None:
    """``streambus-consensus ... | head`` once head has gone: no traceback, exit 0."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        result = subprocess.run([SCRIPT, *args], stdout=write_end, stderr=subprocess.PIPE,
                                text=True, timeout=30, env=ENV, check=False)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 0


def test_bad_durations_and_broker_lists_exit_2() -> None:
    fails(2, "must be > 0", "brokers", "heartbeat", "1", "--every", "0s", "--api", "x:1")
    fails(2, "not a number", "brokers", "heartbeat", "1", "--every", "soon", "--api", "x:1")
    fails(2, "not a list of broker ids", "brokers", "heartbeat", "1,b", "--api", "x:1")
    fails(2, "not a list of broker ids", "topics", "reassign", "t", "0", "--replicas", "1;2",
          "--api", "x:1")
    fails(2, "give a topic name, or --under-replicated", "topics", "describe",
          "--api", "x:1")


@pytest.fixture
def env(metadata_cluster: LocalCluster) -> dict[str, str]:
    return {"STREAMBUS_CONSENSUS_API": ",".join(
                n.api_address for n in metadata_cluster.nodes.values()),
            "STREAMBUS_CONSENSUS_SECRET_FILE": str(metadata_cluster.secret_file)}


@pytest.mark.cluster
def test_brokers_register_heartbeat_fence_unfence_unregister(env: dict[str, str]) -> None:
    for broker in (1, 2, 3, 4):
        out = ok("brokers", "register", str(broker), f"127.0.0.1:{9091 + broker}",
                 "--rack", f"r{broker}", env=env)
        assert out.startswith(f"registered broker {broker}\n") and "state:" in out
        assert "fenced" in out
    beat = rows(ok("brokers", "heartbeat", "1,2,3,4", env=env))
    assert [(b[0], b[1]) for b in beat] == [("1", "active"), ("2", "active"), ("3", "active"),
                                            ("4", "active")]
    # A fence holds while the broker is silent; one that still heartbeats is
    # unfenced again by the leader's next check.
    assert "state:       fenced" in ok("brokers", "fence", "4", env=env)
    assert "state:       active" in ok("brokers", "unfence", "4", env=env)
    fails(4, "stale|epoch", "brokers", "fence", "4", "--epoch", "999999", env=env)
    assert ok("brokers", "unregister", "4", env=env).strip() == "unregistered broker 4"
    assert [b[0] for b in rows(ok("brokers", "list", env=env))] == ["1", "2", "3"]
    fails(4, "unknown", "brokers", "unregister", "4", env=env)


@pytest.mark.cluster
def test_heartbeat_every_loops_until_interrupted(env: dict[str, str]) -> None:
    ok("brokers", "register", "7", "127.0.0.1:9107", env=env)
    proc = subprocess.Popen([SCRIPT, "brokers", "heartbeat", "7", "--every", "200ms"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, **env})
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        # The leader unfences it at its next check (once a second): within
        # 10 s of rounds it must be active, and stay so for two more rounds.
        while len(lines) < 50 and lines[-3:] != ["7:active"] * 3:
            lines.append(proc.stdout.readline().strip())
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert lines[-3:] == ["7:active"] * 3, lines
    assert set(lines) <= {"7:fenced", "7:active"}, lines
    ok("brokers", "unregister", "7", env=env)


@pytest.mark.cluster
def test_heartbeat_every_keeps_beating_the_others_when_one_is_refused(
        env: dict[str, str]) -> None:
    """Found in the operations.md walkthrough: after ``brokers unregister 2``
    a running ``heartbeat 1,2,3 --every 2s`` stopped at broker 2 every round,
    so broker 3 was fenced. A refusal for one broker must not starve the rest."""
    for broker in (8, 9):
        ok("brokers", "register", str(broker), f"127.0.0.1:{9100 + broker}", env=env)
    proc = subprocess.Popen([SCRIPT, "brokers", "heartbeat", "8,404,9", "--every", "200ms"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, **env})
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        ready = selectors.DefaultSelector()
        ready.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 15
        want = "8:active 404:unknown_broker 9:active"
        while lines[-2:] != [want] * 2 and time.monotonic() < deadline:
            if ready.select(timeout=max(0.0, deadline - time.monotonic())):
                lines.append(proc.stdout.readline().strip())
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert lines[-2:] == [want] * 2, (lines, err[-2000:])
    assert "broker 404" in err and "unknown_broker" in err, err
    for broker in (8, 9):
        ok("brokers", "unregister", str(broker), env=env)


@pytest.mark.cluster
def test_topics_add_partitions_elect_reassign_under_replicated(env: dict[str, str]) -> None:
    ok("brokers", "heartbeat", "1,2,3", env=env)
    ok("topics", "create", "events", "--partitions", "3", "--replication-factor", "2", env=env)
    assert ok("topics", "add-partitions", "events", "--total", "5", env=env).strip() == (
        "topic events has 5 partitions")
    fails(4, "partition", "topics", "add-partitions", "events", "--total", "2", env=env)
    described = json.loads(ok("topics", "describe", "events", "--json", env=env))
    assert len(described["partitions"]) == 5
    assert rows(ok("topics", "describe", "--under-replicated", env=env)) == []

    part0 = described["partitions"][0]
    new_replicas = sorted({1, 2, 3} - set(part0["replicas"]))[:1] + part0["replicas"][:1]
    out = ok("topics", "reassign", "events", "0", "--replicas",
             ",".join(map(str, new_replicas)), env=env)
    assert out.startswith("reassigned events/0")
    after = json.loads(ok("topics", "describe", "events", "--json", env=env))["partitions"][0]
    assert after["replicas"] == new_replicas
    # The new replica is not in sync until its broker says so: partition 0 is
    # under-replicated, and its preferred leader cannot be elected yet.
    short = json.loads(ok("topics", "describe", "events", "--under-replicated", "--json",
                          env=env))["under_replicated"]
    assert [p["index"] for p in short] == [0]
    fails(4, "preferred_leader_not_available", "topics", "elect", "events", "--partition",
          "0", env=env)
    out = ok("topics", "elect", "events", "--partition", "1", env=env)
    assert out.startswith("0 partition leader(s) changed")  # already the preferred one
    fails(4, "unknown_topic", "topics", "elect", "nope", env=env)

    # Fencing a broker takes it out of every ISR: its partitions are under-replicated.
    ok("brokers", "fence", "3", env=env)
    short = json.loads(ok("topics", "describe", "--under-replicated", "--json", env=env))
    assert any(3 in p["replicas"] for p in short["under_replicated"]), short
    assert all(len(p["isr"]) < len(p["replicas"]) for p in short["under_replicated"])
    assert any(3 not in p["isr"] for p in short["under_replicated"]), short
    one = rows(ok("topics", "describe", "events", "--under-replicated", env=env))
    assert {r[0] for r in one} == {"events"}
    ok("brokers", "heartbeat", "3", env=env)
    ok("topics", "delete", "events", env=env)
