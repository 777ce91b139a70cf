"""The ``streambus-consensus`` console script, run as a subprocess.

Against real node processes: status, members, leadership, topics and brokers,
with their output and exit codes (0 ok, 2 usage or config, 3 unreachable,
4 refused or failed), authentication with the cluster secret, and the
example cluster of ``examples/cluster`` started by its ``run.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streambus_consensus import cli
from streambus_consensus.errors import CommandRefusedError, ConsensusError
from streambus_consensus.testing.harness import LocalCluster, free_ports, wait_until
from tests.conftest import ClusterFactory
from tests.test_membership import add_node_process, members_of

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = shutil.which("streambus-consensus", path=str(Path(sys.executable).parent)) or ""
ENV = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBUS_CONSENSUS_")}


def run(*args: str, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    assert SCRIPT, "the streambus-consensus console script is not installed beside python"
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})}, check=False)


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    result = run(*args, env=env)
    assert result.returncode == 0, (args, result.returncode, result.stderr)
    assert result.stderr == ""
    return result.stdout


def fails(code: int, pattern: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run, expect exit ``code``, nothing on stdout and one error line matching ``pattern``."""
    result = run(*args, env=env)
    assert result.returncode == code, (args, result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("streambus-consensus: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def rows(table: str) -> list[list[str]]:
    """A printed table's data rows, split on runs of two or more spaces."""
    return [re.split(r"\s{2,}", line.strip()) for line in table.strip().splitlines()[1:]]


# -- without a cluster ----------------------------------------------------------------


def _all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _all_parsers(child)


def test_every_command_and_option_is_documented() -> None:
    parsers = list(_all_parsers(cli._build_parser()))
    names = {p.prog.removeprefix("streambus-consensus").strip() for p in parsers}
    assert {"node run", "status", "members list", "members add", "members remove",
            "leader transfer", "topics create", "topics list", "topics describe",
            "topics delete", "topics alter", "brokers list", "brokers describe"} <= names
    for parser in parsers:
        assert parser.description, parser.prog
        for action in parser._actions:
            assert action.help, f"{parser.prog}: {action.option_strings or action.dest}"


def test_help_of_every_command_exits_zero() -> None:
    for command in (["--help"], ["topics", "create", "--help"], ["members", "add", "--help"],
                    ["leader", "transfer", "--help"], ["node", "run", "--help"]):
        result = run(*command)
        assert result.returncode == 0, command
        assert result.stdout.startswith("usage: streambus-consensus"), command
    top = run("--help").stdout
    for text in ("exit codes", "STREAMBUS_CONSENSUS_API", "--secret-file", "topics", "brokers"):
        assert text in top


def test_tables_and_fields_are_aligned() -> None:
    table = cli.format_table(["A", "LONGER"], [[1, None], ["wide cell", [1, 2]], [True, []]])
    assert table.splitlines() == ["A          LONGER", "1          -",
                                  "wide cell  1,2", "yes        -"]
    assert cli.format_fields([("a", 1), ("long name", None)]).splitlines() == [
        "a:         1", "long name: -"]


def test_bad_arguments_exit_2_with_one_line(tmp_path: Path) -> None:
    fails(2, "invalid choice", "frobnicate")
    fails(2, r"required: --partitions, --replication-factor", "topics", "create", "t",
          "--api", "127.0.0.1:1")
    fails(2, "KEY=VALUE", "topics", "create", "t", "--partitions", "1",
          "--replication-factor", "1", "--config", "retention.ms", "--api", "127.0.0.1:1")
    fails(2, "at least one --set", "topics", "alter", "t", "--api", "127.0.0.1:1")
    fails(2, "must be > 0", "status", "--api", "127.0.0.1:1", "--timeout", "-1")
    fails(2, "invalid int value", "brokers", "describe", "one", "--api", "127.0.0.1:1")
    fails(2, "no node API address", "status")
    fails(2, "port must be", "status", "--api", "127.0.0.1:99999")
    fails(2, "cannot be read", "status", "--config", str(tmp_path / "missing.toml"))
    fails(2, "cannot be read", "node", "run", "--config", str(tmp_path / "missing.toml"))
    empty = tmp_path / "empty.secret"
    empty.write_text("\n")
    fails(2, "is empty", "status", "--api", "127.0.0.1:1", "--secret-file", str(empty))


def test_an_unreachable_cluster_exits_3() -> None:
    a, b = free_ports(2)
    env = {"STREAMBUS_CONSENSUS_SECRET": "s" * 32}
    fails(3, "cluster unreachable", "status", "--api", f"127.0.0.1:{a},127.0.0.1:{b}", env=env)
    fails(3, "cluster unreachable", "members", "list", "--api", f"127.0.0.1:{a}", env=env)
    fails(3, "cluster unreachable", "topics", "list", "--json", "--api", f"127.0.0.1:{a}",
          env=env)
    env["STREAMBUS_CONSENSUS_API"] = f"127.0.0.1:{a}"
    fails(3, "cluster unreachable", "leader", "transfer", env=env)


def test_no_secret_exits_2_saying_where_one_comes_from() -> None:
    (a,) = free_ports(1)
    fails(2, "no cluster secret: .*cluster init", "status", "--api", f"127.0.0.1:{a}")


# -- against a metadata cluster of three processes --------------------------------------


@pytest.fixture(scope="module")
def cluster(metadata_cluster: LocalCluster) -> LocalCluster:
    return metadata_cluster


@pytest.fixture(scope="module")
def secret_file(cluster: LocalCluster) -> str:
    path = cluster.base_dir / "secret"
    path.write_text((cluster.secret or "") + "\n", encoding="utf-8")
    return str(path)


def apis(cluster: LocalCluster, *node_ids: str) -> str:
    return ",".join(cluster.nodes[n].api_address for n in node_ids or cluster.nodes)


@pytest.mark.cluster
def test_status_as_table_and_json(cluster: LocalCluster, secret_file: str) -> None:
    leader = cluster.wait_for_leader()
    table = ok("status", "--api", apis(cluster), "--secret-file", secret_file)
    assert table.splitlines()[0].split() == ["NODE", "API", "STATE", "LEADER", "TERM", "COMMIT",
                                             "APPLIED", "LOG", "PEERS"]
    found = {r[0]: r for r in rows(table)}
    assert set(found) == {"n1", "n2", "n3"}
    assert [r[2] for r in found.values()].count("leader") == 1
    assert {r[3] for r in found.values()} == {leader}
    assert all("down" not in r[8] for r in found.values())
    report = json.loads(ok("status", "--json", "--api", apis(cluster),
                           "--secret-file", secret_file))
    assert {s["node_id"] for s in report} == {"n1", "n2", "n3"}
    assert all(p["connected"] for s in report for p in s["peers"])
    # One node down: still a report (exit 0), that node marked unreachable.
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    table = ok("status", "--api", apis(cluster, "n1") + "," + dead, "--secret-file", secret_file)
    assert [r[1:3] for r in rows(table)][1] == [dead, "unreachable"]


@pytest.mark.cluster
def test_admin_requests_need_the_cluster_secret(cluster: LocalCluster, tmp_path: Path) -> None:
    node_config = str(cluster.nodes["n1"].config_path)  # holds api_address and the secret
    out = ok("members", "list", "--config", node_config)
    assert {r[0] for r in rows(out)} == {"n1", "n2", "n3"}
    fails(2, "no cluster secret", "members", "list", "--api", apis(cluster, "n1"))
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not-the-cluster-secret-at-all\n")
    fails(4, "unauthenticated.*wrong cluster secret", "topics", "list", "--api",
          apis(cluster, "n1"), "--secret-file", str(wrong))
    env = {"STREAMBUS_CONSENSUS_API": apis(cluster),
           "STREAMBUS_CONSENSUS_SECRET": cluster.secret}
    assert json.loads(ok("members", "list", "--json", env=env))["leader_id"]


@pytest.mark.cluster
def test_topics_and_brokers(cluster: LocalCluster, secret_file: str) -> None:
    env = {"STREAMBUS_CONSENSUS_API": apis(cluster),
           "STREAMBUS_CONSENSUS_SECRET_FILE": secret_file}
    client = cluster.client()
    for broker in (1, 2, 3):
        client.request("POST", "/v1/brokers", {"broker_id": broker, "fenced": False,
                                               "endpoint": f"10.0.0.{broker}:9092",
                                               "rack": f"r{broker}"})
    brokers = rows(ok("brokers", "list", env=env))
    assert [b[:4] for b in brokers] == [["1", "active", "10.0.0.1:9092", "r1"],
                                        ["2", "active", "10.0.0.2:9092", "r2"],
                                        ["3", "active", "10.0.0.3:9092", "r3"]]
    assert "endpoint:    10.0.0.2:9092" in ok("brokers", "describe", "2", env=env)
    fails(4, "broker 9 is unknown", "brokers", "describe", "9", env=env)

    out = ok("topics", "create", "orders", "--partitions", "3", "--replication-factor", "2",
             "--config", "retention.ms=3600000", "--config", "cleanup.policy=compact", env=env)
    assert out.startswith("created topic orders")
    assert "retention.ms=3600000" in out and "cleanup.policy=compact" in out
    fails(4, "topic_exists", "topics", "create", "orders", "--partitions", "1",
          "--replication-factor", "1", env=env)
    fails(4, "replication", "topics", "create", "wide", "--partitions", "1",
          "--replication-factor", "5", env=env)
    fails(4, "unknown topic config key", "topics", "create", "odd", "--partitions", "1",
          "--replication-factor", "1", "--config", "colour=blue", env=env)
    assert rows(ok("topics", "list", "--linearizable", env=env)) == [["orders"]]
    described: dict[str, Any] = json.loads(ok("topics", "describe", "orders", "--json",
                                              env=env))
    assert described["partition_count"] == 3 and len(described["partitions"]) == 3
    assert all(len(p["replicas"]) == 2 for p in described["partitions"])
    table = ok("topics", "describe", "orders", env=env).split("\n\n")[1]
    assert [r[0] for r in rows(table)] == ["0", "1", "2"]

    out = ok("topics", "alter", "orders", "--set", "min.insync.replicas=2",
             "--delete", "retention.ms", env=env)
    assert "min.insync.replicas=2" in out and "retention.ms=604800000" in out
    fails(4, "unknown_topic", "topics", "alter", "nope", "--set", "retention.ms=1", env=env)
    assert ok("topics", "delete", "orders", env=env).strip() == "deleted topic orders"
    fails(4, "unknown_topic", "topics", "describe", "orders", env=env)
    assert rows(ok("topics", "list", "--linearizable", env=env)) == []


@pytest.mark.cluster
def test_batched_topic_create(make_cluster: ClusterFactory, tmp_path: Path) -> None:
    # A cluster started below metadata version 2 (a new one starts at the newest).
    cluster = make_cluster(3, app="metadata", settings={"broker_session_timeout": 600.0,
                                                        "bootstrap_metadata_version": 1})
    cluster.start()
    cluster.wait_for_leader()
    env = {"STREAMBUS_CONSENSUS_API": apis(cluster),
           "STREAMBUS_CONSENSUS_SECRET_FILE": str(cluster.secret_file)}
    client = cluster.client()
    for broker in (1, 2, 3):
        client.request("POST", "/v1/brokers", {"broker_id": broker, "fenced": False,
                                               "endpoint": f"10.0.0.{broker}:9092"})
    client.request("POST", "/v1/topics", {"name": "taken", "partitions": 1,
                                          "replication_factor": 1})
    batch = {"topics": [{"name": "b1", "partitions": 2, "replication_factor": 3},
                        {"name": "taken", "partitions": 1, "replication_factor": 1},
                        {"name": "b2", "partitions": 0, "replication_factor": 1}]}
    # Below metadata version 2: one create per topic, the same per-topic answers...
    before = client.request("POST", "/v1/topics:batch", batch)
    assert [(r["name"], r["code"]) for r in before["results"]] == [
        ("b1", "ok"), ("taken", "topic_exists"), ("b2", "invalid_partitions")]
    assert before["created"] == 1 and before["results"][0]["topic"]["partition_count"] == 2
    # ...but a request id names one entry, which this version cannot write.
    rid = {"client_id": "batch-test", "seq": 1}
    with pytest.raises(CommandRefusedError) as refused:
        client.request("POST", "/v1/topics:batch", {"topics": [
            {"name": "b3", "partitions": 1, "replication_factor": 1}], "request_id": rid})
    assert refused.value.code == "feature_not_enabled"
    assert client.request("POST", "/v1/features", {"metadata_version": 2})["finalized"] == 2

    # One entry, per-topic outcomes, and a retry answered from the remembered result.
    body = {"topics": [{"name": f"m{i}", "partitions": 3, "replication_factor": 3,
                        "config": {"retention.ms": 1000}} for i in range(50)]
            + [{"name": "taken", "partitions": 1, "replication_factor": 1}],
            "request_id": rid}
    offset = client.request("GET", "/v1/topics")["offset"]
    first = client.request("POST", "/v1/topics:batch", body)
    assert first["created"] == 50 and first["results"][-1]["code"] == "topic_exists"
    assert first["results"][0]["topic"]["config"]["retention.ms"] == 1000
    again = client.request("POST", "/v1/topics:batch", body)
    assert again == first
    after = client.request("GET", "/v1/topics?linearizable=1")
    assert after["offset"] <= offset + 3  # the batch, its retry and the read
    assert {f"m{i}" for i in range(50)} <= set(after["topics"])
    for bad, message in ((["x"], "JSON body must be an object"),
                         ({"topics": ["x"]}, "topics\\[0\\] must be an object"),
                         ({"topics": [{"name": "x", "partitions": "3",
                                       "replication_factor": 1}]},
                          "topics\\[0\\]: 'partitions' must be an integer")):
        with pytest.raises(ConsensusError, match="invalid_argument: " + message):
            client.request("POST", "/v1/topics:batch", bad)

    # The CLI: several names, or a file of names; exit 4 when any is refused.
    out = ok("topics", "create", "c1", "c2", "--partitions", "1", "--replication-factor", "2",
             env=env)
    assert out.startswith("created 2 of 2 topics")
    assert rows(out.split("\n", 1)[1]) == [["c1", "created", "-"], ["c2", "created", "-"]]
    names = tmp_path / "names.txt"
    names.write_text("# topics\nf1\n\nc1\nf2\n", encoding="utf-8")
    partial = run("topics", "create", "--from-file", str(names), "--partitions", "1",
                  "--replication-factor", "1", env=env)
    assert partial.returncode == 4 and partial.stdout.startswith("created 2 of 3 topics")
    assert rows(partial.stdout.split("\n", 1)[1])[1][:2] == ["c1", "topic_exists"]
    listed = rows(ok("topics", "list", "--linearizable", env=env))
    assert ["f1"] in listed and ["f2"] in listed
    report = run("topics", "create", "--json", "--from-file", str(names), "--partitions", "1",
                 "--replication-factor", "1", env=env)
    assert report.returncode == 4
    assert [r["code"] for r in json.loads(report.stdout)["results"]] == ["topic_exists"] * 3
    fails(2, "give a topic name", "topics", "create", "--partitions", "1",
          "--replication-factor", "1", env=env)


@pytest.mark.cluster
def test_leader_transfer(cluster: LocalCluster, secret_file: str) -> None:
    auth = ["--secret-file", secret_file]
    leader = cluster.wait_for_leader()
    target = next(n for n in ("n1", "n2", "n3") if n != leader)
    out = ok("leader", "transfer", target, "--api", apis(cluster), *auth)
    match = re.fullmatch(rf"leadership moved from {leader} to {target} in ([0-9.]+)s\n", out)
    assert match, out
    assert float(match.group(1)) < 0.8  # one election timeout
    assert cluster.wait_for_leader() == target
    assert ok("leader", "transfer", target, "--api", apis(cluster), *auth) == (
        f"{target} already leads\n")
    moved = json.loads(ok("leader", "transfer", "--json", "--api", apis(cluster), *auth))
    assert moved["from"] == target and moved["to"] != target
    new_leader = cluster.wait_for_leader()
    fails(4, "n9 is not a member", "leader", "transfer", "n9", "--api", apis(cluster), *auth)
    follower = next(n for n in ("n1", "n2", "n3") if n != new_leader)
    fails(4, f"the leader {new_leader} is not among the given API addresses", "leader",
          "transfer", "--api", apis(cluster, follower), *auth)


@pytest.mark.cluster
def test_members_add_and_remove_the_leader(make_cluster: ClusterFactory) -> None:
    local = make_cluster(3)  # the key-value app
    local.start()
    leader = local.wait_for_leader()
    env = {"STREAMBUS_CONSENSUS_SECRET": local.secret or ""}
    new = add_node_process(local, "n4", members_of(local, leader))
    local.start("n4")
    out = ok("members", "add", "n4", new.raft_address, "--api", apis(local, leader), env=env)
    assert out.startswith(f"added n4 at {new.raft_address}")
    assert {r[0] for r in rows(out.split("\n", 1)[1])} == {"n1", "n2", "n3", "n4"}
    fails(4, "n4 is already a member", "members", "add", "n4", new.raft_address,
          "--api", apis(local), env=env)
    local.size = 4

    # Removing the leader moves leadership away first.
    out = ok("members", "remove", leader, "--api", apis(local), env=env)
    assert out.splitlines()[0].startswith(f"moved leadership from {leader} to ")
    assert f"removed {leader}" in out
    local.stop(leader)
    local.size = 3
    remaining = {"n1", "n2", "n3", "n4"} - {leader}
    listed = json.loads(ok("members", "list", "--json", "--api", apis(local, *remaining),
                           env=env))
    assert set(listed["members"]) == remaining
    wait_until(lambda: all(set(members_of(local, n)) == remaining for n in remaining), 10,
               "the remaining members to agree")
    fails(4, "n9 is not a member", "members", "remove", "n9", "--api", apis(local, *remaining),
          env=env)
    # A key-value node serves no metadata routes: say so.
    fails(4, "another app", "topics", "list", "--api", apis(local, *remaining), env=env)


@pytest.mark.cluster
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_the_example_cluster_starts_with_run_sh(tmp_path: Path, tls: bool) -> None:
    """examples/cluster as shipped, its configs made by 'cluster init' on free ports."""
    example = tmp_path / "cluster"
    shutil.copytree(ROOT / "examples" / "cluster", example,
                    ignore=shutil.ignore_patterns("data", "logs", "*.toml", "tls",
                                                  "cluster.secret"))
    ports = free_ports(6)
    nodes = ",".join(f"n{i}=127.0.0.1:{ports[i - 1]}" for i in (1, 2, 3))
    apis = ",".join(f"n{i}=127.0.0.1:{ports[i + 2]}" for i in (1, 2, 3))
    made = ok("cluster", "init", "--nodes", nodes, "--api", apis, "--dir", str(example),
              *(["--tls"] if tls else []))
    assert "cluster.secret (the cluster secret, mode 0600)" in made
    env = {**ENV, "PATH": f"{Path(SCRIPT).parent}{os.pathsep}{ENV.get('PATH', '')}"}
    proc = subprocess.Popen([str(example / "run.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    configs = [arg for n in (1, 2, 3) for arg in ("--config", str(example / f"n{n}.toml"))]
    try:
        def has_leader() -> bool:
            result = run("status", "--json", *configs)
            return result.returncode == 0 and sum(
                s.get("state") == "leader" for s in json.loads(result.stdout)) == 1
        wait_until(has_leader, 20, "the example cluster to elect a leader", interval=0.2)
        assert ok("leader", "transfer", *configs).startswith("leadership moved from")
        assert sorted((example / "data").iterdir()) == [example / "data" / f"n{n}"
                                                       for n in (1, 2, 3)]
        if tls:  # without the CA the CLI cannot talk to a TLS API, and says why
            api = f"127.0.0.1:{ports[3]}"
            secret = ["--secret-file", str(example / "cluster.secret")]
            fails(3, "give its CA file", "status", "--api", api, *secret)
            fails(3, "TLS handshake failed: .*requires? a client certificate",
                  "status", "--api", api, *secret, "--ca-file", str(example / "tls/ca.pem"))
            table = ok("status", "--api", api, *secret, "--ca-file", str(example / "tls/ca.pem"),
                       "--cert-file", str(example / "tls/admin.pem"), "--key-file",
                       str(example / "tls/admin.key"))
            assert "n2:up n3:up" in table
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # run.sh stops its three nodes
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
    assert "three nodes running" in output and "stopped" in output
    time.sleep(0.2)
    fails(3, "cluster unreachable", "status", *configs)


def test_node_run_on_an_address_it_cannot_bind_is_a_config_error_exit_2(tmp_path: Path) -> None:
    raft_port, api_port = free_ports(2)
    taken = socket.socket()
    taken.bind(("127.0.0.1", raft_port))
    taken.listen(1)
    try:
        ok("cluster", "init", "--dir", str(tmp_path), "--nodes", f"n1=127.0.0.1:{raft_port}",
           "--api", f"n1=127.0.0.1:{api_port}")
        result = run("node", "run", "--config", str(tmp_path / "n1.toml"))
    finally:
        taken.close()
    assert result.returncode == 2, (result.returncode, result.stderr)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("streambus-consensus: error: invalid config bind_address="), last
    assert "Address already in use" in last
