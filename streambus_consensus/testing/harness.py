"""Run a cluster of real node processes on loopback, and break it on purpose.

:class:`LocalCluster` writes one TOML config per node, starts each node as its
own OS process (``python -m streambus_consensus node run``), finds the
leader through the nodes' HTTP APIs and injects faults: SIGKILL, SIGSTOP /
SIGCONT pauses, graceful stops and restarts from the same data directory.
Everything it starts it stops, on :meth:`LocalCluster.close`, on leaving the
``with`` block, and at interpreter exit as a last resort.

With ``proxied=True`` every directed link between two nodes runs through a
TCP proxy process (:mod:`.faults`), and :attr:`LocalCluster.network` cuts and
heals links: isolate a node, split the cluster, cut one direction only.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..client import ApiClient, ClusterUnreachableError
from ..errors import ConsensusError
from ..provision import (
    ADMIN_NAME,
    TlsFiles,
    generate_secret,
    render_node_config,
    write_private,
    write_tls_material,
)
from ..tls import client_context
from .faults import LinkProxy, Partitioner, link_name

__all__ = ["LocalCluster", "NodeProcess", "free_ports", "rss_bytes", "wait_until"]

T = TypeVar("T")

_LIVE: set[subprocess.Popen[Any]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _exit_on_sigterm() -> None:
    """Make SIGTERM run the ``atexit`` functions (the one above stops every node
    process this process started) before it ends the process, which by default
    it does at once, leaving them running. Only while SIGTERM has its default
    action and only from the main thread (where Python runs signal handlers): a
    program that handles SIGTERM itself keeps its handler."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _clean_up_then_die)


def _clean_up_then_die(signum: int, _frame: object) -> None:
    # Not SystemExit: code that catches it (pytest fails the running test and
    # goes on) would outlive the signal. The process still dies of SIGTERM.
    atexit._run_exitfuncs()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


_PICK_FLOOR = 10_000
"""Lowest port :func:`free_ports` hands out."""


def _ephemeral_floor() -> int:
    """The first port the kernel picks for outgoing connections (Linux's
    ``ip_local_port_range``; 32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(count: int) -> list[int]:
    """Distinct ports on 127.0.0.1 that were free a moment ago.

    Picked below the kernel's ephemeral range when there is room: a port
    from ``bind(0)`` comes from that range, and between picking it and a node
    binding it, any outgoing connection (a node dialling a peer) may take it
    as its source port ("Address already in use" at start-up). All are held
    until all are picked, so they are distinct.
    """
    socks: list[socket.socket] = []
    top = _ephemeral_floor()
    try:
        candidates = (random.sample(range(_PICK_FLOOR, top), min(top - _PICK_FLOOR, 64 + count))
                      if top - _PICK_FLOOR >= count else [])
        for port in [*candidates, *[0] * count]:
            if len(socks) == count:
                break
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(check: Callable[[], T | None], timeout: float, what: str,
               interval: float = 0.05) -> T:
    """Call ``check`` until it returns something truthy; raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except (ConsensusError, OSError) as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}{detail}")
        time.sleep(interval)


@dataclass
class NodeProcess:
    """One node of a :class:`LocalCluster`."""

    node_id: str
    raft_port: int
    api_port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    starts: int = 0
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of this node's process (over the cluster's), from its next start."""

    @property
    def raft_address(self) -> str:
        """Cluster (Raft) address."""
        return f"127.0.0.1:{self.raft_port}"

    @property
    def api_address(self) -> str:
        """HTTP API address."""
        return f"127.0.0.1:{self.api_port}"

    @property
    def config_path(self) -> Path:
        """The node's TOML config."""
        return self.directory / "node.toml"

    @property
    def log_path(self) -> Path:
        """Where the node's stderr goes (appended across restarts)."""
        return self.directory / "node.log"

    @property
    def alive(self) -> bool:
        """Whether the process is running (paused counts as running)."""
        return self.proc is not None and self.proc.poll() is None


@dataclass
class LocalCluster:
    """A cluster of node processes on loopback. Use as a context manager.

    Args:
        size: number of voting members.
        base_dir: where configs, data dirs and logs go (one subdirectory each).
        app: ``"kv"`` or ``"metadata"``.
        secret: the cluster secret; by default a new random one, written to
            ``cluster.secret`` (0600) as ``cluster init`` does.
        tls: run peers and APIs over mutual TLS with a throwaway CA (``tls/``).
        api_tls: with ``tls``, ``False`` keeps the APIs on plain HTTP (for
            clients that speak only that, such as the chaos history recorder).
        settings: extra config fields for every node (e.g. snapshot interval).
        env: extra environment variables for the node processes.
        proxied: route every directed node-to-node link through the link
            proxy, so that :attr:`network` can partition the cluster.
    """

    size: int
    base_dir: Path
    app: str = "kv"
    secret: str = field(default_factory=generate_secret)
    tls: bool = False
    api_tls: bool = True
    settings: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, NodeProcess] = field(default_factory=dict)
    proxied: bool = False
    network: Partitioner | None = field(default=None, init=False)
    """Cuts and heals links (``proxied=True`` only)."""

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir)
        ports = free_ports(2 * self.size)
        for i in range(self.size):
            node_id = f"n{i + 1}"
            self.nodes[node_id] = NodeProcess(node_id, ports[2 * i], ports[2 * i + 1],
                                              self.base_dir / node_id)
        self._peer_address: dict[tuple[str, str], str] = {
            (a, b): self.nodes[b].raft_address for a in self.nodes for b in self.nodes if a != b
        }
        if self.proxied:
            proxy = LinkProxy({link_name(a, b): address
                               for (a, b), address in self._peer_address.items()})
            proxy.start()
            if proxy.process is not None:
                _LIVE.add(proxy.process)
            self.network = Partitioner(proxy, list(self.nodes))
            for a, b in self._peer_address:
                self._peer_address[a, b] = f"127.0.0.1:{proxy.ports[link_name(a, b)]}"
        self.secret_file = self.base_dir / "cluster.secret"
        write_private(self.secret_file, self.secret + "\n")
        self.tls_files: dict[str, TlsFiles] = {}
        if self.tls:
            self.tls_files = write_tls_material(self.base_dir / "tls", {
                **{n: ["127.0.0.1", "localhost"] for n in self.nodes}, ADMIN_NAME: []})
        for node in self.nodes.values():
            self._write_config(node)

    # -- set-up ------------------------------------------------------------------

    def _write_config(self, node: NodeProcess) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        # Each node reaches its peers through its own links (the proxy, when proxied).
        cluster = {n: self._address_of(n, seen_from=node.node_id) for n in self.nodes}
        node.config_path.write_text(render_node_config(
            node.node_id, cluster, data_dir="data", secret_file=str(self.secret_file),
            api_address=node.api_address, tls=self.tls_files.get(node.node_id),
            api_tls=self.api_tls,
            settings=self.settings), encoding="utf-8")

    def _address_of(self, node_id: str, *, seen_from: str) -> str:
        if node_id == seen_from:
            return self.nodes[node_id].raft_address
        return self._peer_address[seen_from, node_id]

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def client(self, *node_ids: str, timeout: float = 10.0) -> ApiClient:
        """An API client for the given nodes (default: all)."""
        chosen = node_ids or tuple(self.nodes)
        return ApiClient([self.nodes[n].api_address for n in chosen], secret=self.secret,
                         timeout=timeout, tls=self.client_tls())

    def client_tls(self) -> ssl.SSLContext | None:
        """The admin client's TLS context (APIs served over TLS only)."""
        if not (self.tls and self.api_tls):
            return None
        admin = self.tls_files[ADMIN_NAME]
        return client_context(str(admin.ca_file), str(admin.cert_file), str(admin.key_file))

    # -- processes ---------------------------------------------------------------

    def start(self, *node_ids: str, wait: bool = True) -> None:
        """Start the given nodes (default: all) and wait until their APIs answer."""
        for node_id in node_ids or tuple(self.nodes):
            node = self.nodes[node_id]
            if node.alive:
                continue
            log = open(node.log_path, "ab")  # noqa: SIM115 - owned by the child
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **node.env}
            node.proc = subprocess.Popen(
                [sys.executable, "-m", "streambus_consensus", "node", "run",
                 "--config", str(node.config_path), "--app", self.app],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=node.directory, env=env, start_new_session=True,
            )
            log.close()
            node.paused = False
            node.starts += 1
            _LIVE.add(node.proc)
            _exit_on_sigterm()
        if wait:
            for node_id in node_ids or tuple(self.nodes):
                self.wait_api(node_id)

    def wait_api(self, node_id: str, timeout: float = 20.0) -> None:
        """Wait until a node's API answers."""
        node = self.nodes[node_id]

        def answers() -> bool:
            if not node.alive:
                raise RuntimeError(f"{node_id} exited with {node.proc and node.proc.poll()}; "
                                   f"log: {node.log_path}\n{self.tail(node_id)}")
            return self.status(node_id) is not None

        wait_until(answers, timeout, f"{node_id}'s API")

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (default SIGKILL) and, for fatal signals, reap the process."""
        node = self.nodes[node_id]
        if node.proc is None or not node.alive:
            return
        if node.paused:
            os.killpg(node.proc.pid, signal.SIGCONT)
        os.killpg(node.proc.pid, sig)
        try:
            node.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait(5)
        _LIVE.discard(node.proc)
        node.paused = False

    def stop(self, node_id: str) -> None:
        """Graceful stop (SIGTERM), escalating to SIGKILL after 15 s."""
        self.kill(node_id, signal.SIGTERM)

    def pause(self, node_id: str) -> None:
        """SIGSTOP the node: it stays connected but says nothing."""
        node = self.nodes[node_id]
        if node.proc is not None and node.alive and not node.paused:
            os.killpg(node.proc.pid, signal.SIGSTOP)
            node.paused = True

    def resume(self, node_id: str) -> None:
        """SIGCONT a paused node."""
        node = self.nodes[node_id]
        if node.proc is not None and node.alive and node.paused:
            os.killpg(node.proc.pid, signal.SIGCONT)
            node.paused = False

    def restart(self, node_id: str) -> None:
        """SIGKILL (if running) and start again from the same data directory."""
        self.kill(node_id)
        self.start(node_id)

    def close(self) -> None:
        """Stop every process this cluster started (the link proxy too). Idempotent."""
        for node in self.nodes.values():
            if node.proc is not None and node.alive:
                with contextlib.suppress(ProcessLookupError):
                    if node.paused:
                        os.killpg(node.proc.pid, signal.SIGCONT)
                    os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait(10)
            if node.proc is not None:
                _LIVE.discard(node.proc)
        if self.network is not None:
            proxy = self.network.proxy
            process = proxy.process
            proxy.close()
            if process is not None:
                _LIVE.discard(process)

    def pid(self, node_id: str) -> int | None:
        """The process id of a running node."""
        node = self.nodes[node_id]
        return node.proc.pid if node.proc is not None and node.alive else None

    def rss_bytes(self, node_id: str) -> int:
        """Resident memory of a running node's process (``VmRSS`` in /proc/PID/status)."""
        pid = self.pid(node_id)
        if pid is None:
            raise RuntimeError(f"{node_id} is not running")
        return rss_bytes(pid)

    # -- observing ---------------------------------------------------------------

    def status(self, node_id: str, timeout: float = 2.0) -> dict[str, Any] | None:
        """A node's ``/v1/status``, or ``None`` if it does not answer."""
        node = self.nodes[node_id]
        if not node.alive or node.paused:
            return None
        try:
            return self.client(node_id, timeout=timeout).status(node.api_address)
        except (ClusterUnreachableError, ConsensusError, OSError):
            return None

    def running(self) -> list[str]:
        """Ids of nodes running and not paused."""
        return [n for n, node in self.nodes.items() if node.alive and not node.paused]

    def leader(self) -> str | None:
        """The leader that every running node agrees on, or ``None``."""
        statuses = [self.status(n) for n in self.running()]
        leaders = {s["node_id"] for s in statuses if s and s["state"] == "leader"}
        if len(leaders) != 1:
            return None
        leader = leaders.pop()
        agree = sum(1 for s in statuses if s and s["leader_id"] == leader)
        return leader if agree > self.size // 2 else None

    def wait_for_leader(self, timeout: float = 15.0, exclude: str | None = None) -> str:
        """Wait until a majority agrees on a leader (other than ``exclude``)."""
        def found() -> str | None:
            leader = self.leader()
            return leader if leader is not None and leader != exclude else None

        return wait_until(found, timeout, "an agreed leader")

    def followers(self) -> list[str]:
        """Running nodes that are not the current leader."""
        leader = self.leader()
        return [n for n in self.running() if n != leader]

    def tail(self, node_id: str, lines: int = 30) -> str:
        """The end of a node's log."""
        try:
            text = self.nodes[node_id].log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def logs(self) -> Iterator[tuple[str, Path]]:
        """Each node's log file."""
        for node_id, node in self.nodes.items():
            yield node_id, node.log_path


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from ``VmRSS`` in ``/proc/PID/status``."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")
