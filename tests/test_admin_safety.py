"""Bad admin input never stops a node, and a node that does stop exits non-zero.

An operator's typo in ``members add`` (a port forgotten, a space in an id)
used to be committed to the log and stop every node that applied it. These
tests try such input at every door (the CLI, ``POST /v1/members``,
``RaftNode.add_member``), fuzz every admin route on a live cluster, and check
that a node whose Raft thread does stop leaves its process with a non-zero
status, so that a supervisor restarts it.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streambus_consensus import (
    ConfigError,
    MemoryStorage,
    NodeConfig,
    NodeState,
    RaftNode,
    TcpTransport,
)
from streambus_consensus.config import validate_member
from streambus_consensus.errors import ConsensusError
from streambus_consensus.kv import KeyValueStateMachine
from streambus_consensus.server import NodeServer
from streambus_consensus.testing.harness import LocalCluster, free_ports, wait_until
from tests.conftest import ClusterFactory
from tests.test_cli import ENV, fails
from tests.test_membership import add_node_process, members_of

BAD_MEMBERS = [
    ("n7", "10.0.0.7"),          # the port forgotten
    ("bad id", "nohost"),        # a space in the id, no port
    ("n7", "127.0.0.1:0"),       # port out of range
    ("n7", "127.0.0.1:99999"),
    ("n7", "127.0.0.1:x"),
    ("n7", ":7001"),             # no host
    ("n7", "a b:7001"),          # a space in the host
    ("", "127.0.0.1:7001"),
    ("-n7", "127.0.0.1:7001"),
    ("n" * 65, "127.0.0.1:7001"),
    ("n7\n", "127.0.0.1:7001"),
]


@pytest.mark.parametrize(("node_id", "address"), BAD_MEMBERS)
def test_validate_member_refuses_bad_ids_and_addresses(node_id: str, address: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_member(node_id, address)
    assert repr(node_id if caught.value.field == "node_id" else address) in str(caught.value)


def test_validate_member_refuses_a_taken_address_and_accepts_a_good_one() -> None:
    members = {"n1": "127.0.0.1:7001"}
    with pytest.raises(ConfigError, match="is the address of member 'n1'"):
        validate_member("n2", "127.0.0.1:7001", members)
    assert validate_member("n2", "127.0.0.1:7002", members) == ("n2", "127.0.0.1:7002")
    with pytest.raises(ConfigError):
        validate_member(["n2"], "127.0.0.1:7002")
    with pytest.raises(ConfigError):
        validate_member("n2", 7002)


def test_raft_node_add_member_refuses_bad_input_and_keeps_running() -> None:
    config = NodeConfig(node_id="n1", cluster={"n1": "127.0.0.1:1"}, tick_interval=0.01,
                        cluster_secret="s" * 32, data_dir=None)
    with RaftNode(config, KeyValueStateMachine(), storage=MemoryStorage()) as node:
        node.wait_for_leader(5)
        for node_id, address in BAD_MEMBERS:
            with pytest.raises(ConfigError):
                node.add_member(node_id, address)
        assert node.is_leader and node.fatal_error is None
        assert node.members() == {"n1": "127.0.0.1:1"}


# -- on real processes --------------------------------------------------------------------


def _health(local: LocalCluster) -> tuple[set[str], set[tuple[str, int]]]:
    """(ids of live node processes, {(leader, term)} as the nodes report it)."""
    alive = {n for n, p in local.nodes.items() if p.alive}
    seen = set()
    for node_id in alive:
        status = local.status(node_id)
        if status is not None:
            seen.add((status["leader_id"], status["term"]))
    return alive, seen


def _settled_health(local: LocalCluster) -> tuple[set[str], set[tuple[str, int]]]:
    """:func:`_health` once every node runs and names the same leader and term (a
    node that has not heard from a new leader yet reports none)."""

    def settled() -> tuple[set[str], set[tuple[str, int]]] | None:
        alive, seen = _health(local)
        agreed = len(alive) == len(local.nodes) and len(seen) == 1
        return (alive, seen) if agreed and next(iter(seen))[0] is not None else None

    return wait_until(settled, 20, "every node to report the same leader and term")


@pytest.mark.cluster
def test_bad_members_add_is_refused_at_cli_and_api_and_no_node_stops(
        make_cluster: ClusterFactory) -> None:
    local = make_cluster(3)
    local.start()
    leader = local.wait_for_leader()
    before = _settled_health(local)
    env = {"STREAMBUS_CONSENSUS_SECRET": local.secret or ""}
    api = ",".join(p.api_address for p in local.nodes.values())
    for node_id, address in BAD_MEMBERS[:3]:
        fails(2, "invalid config", "members", "add", node_id, address, "--api", api, env=env)
    client = local.client(leader)
    for node_id, address in BAD_MEMBERS:
        with pytest.raises(ConsensusError, match="invalid_argument"):
            client.request("POST", "/v1/members", {"node_id": node_id, "address": address})
    for body in ({"node_id": 7, "address": "127.0.0.1:7001"}, {"node_id": "n7"},
                 {"node_id": "n7", "address": ["127.0.0.1:7001"]}, ["n7"]):
        with pytest.raises(ConsensusError, match="invalid_argument"):
            client.request("POST", "/v1/members", body)
    taken = local.nodes[leader].raft_address
    with pytest.raises(ConsensusError, match=r"invalid_argument.*address"):
        client.request("POST", "/v1/members", {"node_id": "n7", "address": taken})
    time.sleep(1.0)  # a window in which a stopped Raft thread or an election would show
    assert _health(local) == before
    assert set(client.request("GET", "/v1/members")["members"]) == {"n1", "n2", "n3"}


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=6)
_BAD_TEXT = st.one_of(
    st.sampled_from(["10.0.0.7", "bad id", "nohost", "", " ", "n1 ", "..", "%00", "n\u00e9",
                     "127.0.0.1:0", "x" * 300, "-1", "9" * 30]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12))
_BODY_FIELDS = ["node_id", "address", "name", "partitions", "replication_factor", "config",
                "set", "delete", "broker_id", "endpoint", "rack", "incarnation_id",
                "broker_epoch", "replicas", "isr", "leader", "count", "assignments"]
_BODY = st.one_of(_JSON, st.dictionaries(st.sampled_from(_BODY_FIELDS),
                                         _BAD_TEXT | _JSON, max_size=4))
_ROUTES = [
    ("POST", "/v1/members"), ("DELETE", "/v1/members/{x}"), ("POST", "/v1/leader/transfer"),
    ("POST", "/v1/snapshot"), ("GET", "/v1/status"), ("GET", "/v1/members"),
    ("GET", "/v1/topics"), ("POST", "/v1/topics"), ("GET", "/v1/topics/{x}"),
    ("DELETE", "/v1/topics/{x}"), ("PUT", "/v1/topics/{x}/config"),
    ("POST", "/v1/topics/{x}/partitions"), ("POST", "/v1/topics/{x}/elect"),
    ("POST", "/v1/topics/{x}/partitions/{x}/isr"),
    ("POST", "/v1/topics/{x}/partitions/{x}/reassign"),
    ("GET", "/v1/brokers"), ("POST", "/v1/brokers"), ("GET", "/v1/brokers/{x}"),
    ("DELETE", "/v1/brokers/{x}"), ("POST", "/v1/brokers/{x}/heartbeat"),
    ("POST", "/v1/brokers/{x}/{x}"),
]
FUZZ_EXAMPLES = 1500


@pytest.mark.cluster
def test_fuzz_every_admin_route_no_node_dies_no_election(tmp_path: Path) -> None:
    """Hypothesis sends bad values to every admin route of a live 3-node
    metadata cluster: every answer is a typed error or a result (never a 500),
    no node process dies, and leader and term never change."""
    local = LocalCluster(3, tmp_path / "fuzz", app="metadata")
    try:
        local.start()
        leader = local.wait_for_leader()
        clients = {n: local.client(n, timeout=10.0) for n in local.nodes}
        before = _settled_health(local)
        members = set(local.nodes)
        answers: dict[str, int] = {}
        closed_port = free_ports(1)[0]

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(route=st.sampled_from(_ROUTES), arg=_BAD_TEXT, body=_BODY,
               node=st.sampled_from(sorted(local.nodes)))
        def one_request(route: tuple[str, str], arg: str, body: Any, node: str) -> None:
            method, pattern = route
            if arg in members or "/" in arg or "?" in arg or "#" in arg:
                arg = "zz" + arg.replace("/", "").replace("?", "").replace("#", "")
            if pattern == "/v1/leader/transfer" and (body is None or (isinstance(body, dict) and (
                    body.get("node_id") is None or body.get("node_id") in sorted(members)))):
                body = {**(body or {}), "node_id": "n9"}  # a good transfer is no bad input
            if pattern == "/v1/members" and isinstance(body, dict) and isinstance(
                    body.get("address"), str) and ":" in body["address"]:
                # A valid address would be dialled (strict reconfiguration): keep
                # every dial on loopback, at a port where nothing listens.
                body = {**body, "address": f"127.0.0.1:{closed_port}"}
            path = pattern.replace("{x}", _quote(arg))
            try:
                clients[node].request(method, path, body, address=local.nodes[node].api_address)
                kind = "ok"
            except ConsensusError as exc:
                assert not str(exc).startswith("internal:"), (method, path, body, exc)
                kind = type(exc).__name__
            answers[kind] = answers.get(kind, 0) + 1

        started = time.monotonic()
        one_request()
        elapsed = time.monotonic() - started
        print(f"fuzz: {FUZZ_EXAMPLES} requests in {elapsed:.1f}s, answers {answers}")
        after = _health(local)
        assert after == before, (before, after)
        assert len(after[1]) == 1 and next(iter(after[1]))[0] == leader
        for node_id in local.nodes:
            log = local.nodes[node_id].log_path.read_text(errors="replace")
            assert "CRITICAL" not in log and " ERROR " not in log, local.tail(node_id)
    finally:
        local.close()


def _quote(text: str) -> str:
    from urllib.parse import quote
    return quote(text, safe="") or "empty"


@pytest.mark.cluster
def test_a_node_whose_raft_thread_stops_exits_non_zero(make_cluster: ClusterFactory) -> None:
    """A disk that refuses writes (RLIMIT_FSIZE: EFBIG past 1 MiB) stops the
    node's Raft thread (fail-stop); the process must exit 1, not linger."""
    local = make_cluster(3, settings={"snapshot_interval_entries": 1_000_000})
    local.start()
    leader = local.wait_for_leader()
    victim = next(n for n in local.nodes if n != leader)
    local.stop(victim)
    node = local.nodes[victim]
    limit = 1 << 20

    def limit_file_size() -> None:
        os.setsid()
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    log_path = node.directory / "limited.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streambus_consensus", "node", "run",
             "--config", str(node.config_path), "--app", "kv"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=node.directory, env={**ENV, "PYTHONUNBUFFERED": "1"},
            preexec_fn=limit_file_size)
    try:
        def answers() -> bool:
            try:
                local.client(victim, timeout=2.0).request("GET", "/v1/status")
            except ConsensusError:
                return False
            return True

        wait_until(answers, 20, f"{victim} to answer")
        client = local.client(leader)
        value = "v" * 60_000
        for i in range(40):  # 2.4 MB through the log: past the victim's limit
            client.request("PUT", f"/v1/kv/k{i}", {"value": value})
            if proc.poll() is not None:
                break
        code = proc.wait(timeout=30)
        assert code == 1, log_path.read_text(errors="replace")
        text = log_path.read_text(errors="replace")
        assert "storage failed, stopping the node" in text
        assert "exiting 1 so that its supervisor restarts it" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The other two nodes keep serving.
    assert local.wait_for_leader() == leader


class _FailingTransport(TcpTransport):
    """A real transport that raises from ``poll`` once told to: an exception
    escaping on the Raft thread, as the bad membership change once did."""

    fail = False

    def poll(self, timeout: float) -> None:
        if self.fail:
            raise RuntimeError("injected crash on the Raft thread")
        super().poll(timeout)


def test_a_raft_thread_crash_wakes_node_server_wait_with_the_error() -> None:
    port = free_ports(1)[0]
    config = NodeConfig(node_id="n1", cluster={"n1": f"127.0.0.1:{port}"}, tick_interval=0.01,
                        cluster_secret="s" * 32, data_dir=None)
    server = NodeServer(config)
    transport = _FailingTransport("n1", f"127.0.0.1:{port}", config.cluster,
                                  secret=config.secret)
    server.node = RaftNode(config, server.application.state_machine, transport=transport)
    server.node.on_fatal(lambda _error: server._done.set())
    server.start()
    try:
        server.node.wait_for_leader(5)
        assert server.fatal_error is None
        transport.fail = True
        transport.wake()
        waiter = threading.Thread(target=server.wait, daemon=True)
        waiter.start()
        waiter.join(5)
        assert not waiter.is_alive(), "wait() must return when the Raft thread crashes"
        assert isinstance(server.fatal_error, RuntimeError)
        assert server.node.state is NodeState.STOPPED
    finally:
        server.stop()


@pytest.mark.cluster
def test_with_quorum_lost_the_cli_says_no_leader(make_cluster: ClusterFactory) -> None:
    local = make_cluster(3, app="metadata")
    local.start()
    leader = local.wait_for_leader()
    survivor = next(n for n in local.nodes if n != leader)
    for node_id in local.nodes:
        if node_id != survivor:
            local.stop(node_id)
    env = {"STREAMBUS_CONSENSUS_SECRET": local.secret or ""}
    line = fails(4, "no leader: .*know no leader with a quorum", "topics", "create", "t1",
                 "--partitions", "1", "--replication-factor", "1", "--timeout", "3",
                 "--api", local.nodes[survivor].api_address, env=env)
    assert survivor in line


@pytest.mark.cluster
def test_a_member_that_does_not_answer_the_handshake_is_refused(
        make_cluster: ClusterFactory) -> None:
    """Strict reconfiguration: adding a member nobody can reach only makes the
    quorum larger, so it is refused; with --no-check it joins as a learner,
    which never answers, so the add is refused after learner_catchup_timeout
    without an election and with the quorum as before."""
    local = make_cluster(3, settings={"learner_catchup_timeout": 2.0})
    local.start()
    leader = local.wait_for_leader()
    env = {"STREAMBUS_CONSENSUS_SECRET": local.secret or ""}
    api = ",".join(p.api_address for p in local.nodes.values())
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    fails(4, f"not adding n4: nothing answers at {dead}", "members", "add", "n4", dead,
          "--timeout", "1", "--api", api, env=env)

    # A node that does not list the current members refuses their handshake.
    stranger = add_node_process(local, "n5", {})
    local.start("n5")
    fails(4, f"{stranger.raft_address} hung up during the handshake", "members", "add", "n5",
          stranger.raft_address, "--timeout", "1", "--api", api, env=env)
    local.stop("n5")
    del local.nodes["n5"]
    assert set(members_of(local, leader)) == {"n1", "n2", "n3"}

    # --no-check proposes it anyway, as a learner: it never answers, so after
    # learner_catchup_timeout the leader removes it and the add fails.
    leader = local.wait_for_leader()
    term = local.status(leader)["term"]  # type: ignore[index]
    started = time.monotonic()
    fails(4, "member_not_caught_up: not adding n4: it did not catch up as a learner within",
          "members", "add", "n4", dead, "--no-check", "--timeout", "3", "--api", api, env=env)
    took = time.monotonic() - started
    assert 2.0 <= took < 10, took
    for node_id in ("n1", "n2", "n3"):
        listed = local.client(node_id).request("GET", "/v1/members")
        assert set(listed["members"]) == {"n1", "n2", "n3"} and listed["learners"] == {}
        status = local.status(node_id)
        assert status is not None and status["leader_id"] == leader and status["term"] == term
