"""etcd for the side-by-side benchmark: find or install it, run 3 members, talk to them.

The benchmark compares the node with etcd 3.4 on the same machine in the same
run (:mod:`.versus_etcd`). This module is etcd's half of the machinery:

- :func:`ensure_etcd` finds the ``etcd`` binary or installs the
  distribution's ``etcd-server`` package with ``apt-get`` (root only), with a
  ``policy-rc.d`` in place so the package's own service is never started;
  when neither works it says why in one line and the section is skipped.
- :class:`EtcdCluster` runs three members on 127.0.0.1 (free ports, its own
  data directories, etcd's defaults otherwise: fsync on), each in its own
  process group, all killed on :meth:`EtcdCluster.close`, on leaving the
  ``with`` block and at interpreter exit.
- :class:`EtcdCaller` is one caller's kept-alive HTTP/1.1 connection to
  etcd's v3 JSON gateway (``/v3/kv/put``, ``/v3/kv/range``, ``/v3/kv/txn``,
  keys and values base64), the same stdlib ``http.client`` the node's
  :class:`~streambus_consensus.client.ApiClient` uses.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..testing.harness import free_ports

__all__ = ["ENV", "EtcdCaller", "EtcdCluster", "EtcdError", "create_body", "ensure_etcd",
           "etcd_version", "range_body"]

PACKAGE = "etcd-server"
"""The Debian/Ubuntu package that ships the ``etcd`` server binary (3.4.x on bookworm)."""

_POLICY = Path("/usr/sbin/policy-rc.d")
_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


class EtcdError(RuntimeError):
    """etcd answered with an error, or a cluster could not be started."""


ENV = "STREAMBUS_BENCH_ETCD"
"""Environment variable: the etcd binary to use, or ``off`` to skip the comparison."""


def _find(candidates: Sequence[str | None] | None = None) -> str | None:
    if candidates is None:
        candidates = (shutil.which("etcd"), "/usr/bin/etcd", "/usr/local/bin/etcd")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def etcd_version(binary: str) -> str:
    """``etcd --version``'s first line (``etcd Version: 3.4.23``), or ``?``."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


def _apt_install(log: Any) -> str | None:
    """Install :data:`PACKAGE` without starting its service; the reason it failed, or None."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "not root, cannot apt-get install"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    own_policy = not _POLICY.exists()
    try:
        if own_policy:
            # The package's postinst would start (and enable) an etcd service:
            # "exit 101" is the documented way to forbid that during the install.
            _POLICY.write_text("#!/bin/sh\n# streambus bench: no service starts\nexit 101\n",
                               encoding="ascii")
            _POLICY.chmod(0o755)
        reason = "no attempt"
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", PACKAGE]
        for attempt in ("install", "update", "install"):
            command = install if attempt == "install" else ["apt-get", "update", "-q"]
            log(f"  etcd: {' '.join(command)}")
            try:
                done = subprocess.run(command, env=env, capture_output=True, text=True,
                                      timeout=600, check=False, stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"{' '.join(command)}: {exc}"
            if attempt == "install" and done.returncode == 0:
                return None
            last = (done.stderr or done.stdout).strip().splitlines()
            reason = f"{' '.join(command)} exited {done.returncode}: " + (last[-1] if last
                                                                          else "no output")
        return reason
    finally:
        if own_policy:
            _POLICY.unlink(missing_ok=True)
        # Should the package's service have started after all, stop it through its
        # own init system (never by killing processes by name).
        for stop in (["systemctl", "stop", "etcd"], ["service", "etcd", "stop"]):
            if shutil.which(stop[0]):
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    subprocess.run(stop, capture_output=True, timeout=30, check=False)


def ensure_etcd(log: Any = print, *, install: bool = True,
                candidates: Sequence[str | None] | None = None,
                installer: Callable[[Any], str | None] = _apt_install) -> tuple[str | None, str]:
    """``(path to etcd, how it was found)``, or ``(None, why not)`` in one line.

    :data:`ENV` set to a path uses that binary; set to ``off`` skips. Otherwise
    ``candidates`` (default: ``etcd`` on PATH, ``/usr/bin``, ``/usr/local/bin``)
    are tried, then, with ``install``, ``installer`` (apt-get) and the candidates again.
    """
    chosen = os.environ.get(ENV, "").strip()
    if chosen.lower() == "off":
        return None, f"the etcd comparison is turned off ({ENV}=off)"
    if chosen:
        if _find([chosen]):
            return chosen, f"given by {ENV}"
        return None, f"{ENV} names no executable etcd"
    found = _find(candidates)
    if found:
        return found, "found on PATH"
    if not install:
        return None, "etcd is not installed (install the distribution package etcd-server)"
    reason = installer(log)
    found = _find(candidates)
    if found:
        return found, f"installed the distribution package {PACKAGE} with apt-get"
    return None, f"etcd is not installed and installing {PACKAGE} failed: {reason}"


def create_body(key: str, value: bytes) -> dict[str, Any]:
    """The ``/v3/kv/txn`` body that puts ``key`` only if it does not exist."""
    return {
        "compare": [{"key": _b64(key), "result": "EQUAL", "target": "CREATE",
                     "create_revision": "0"}],
        "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
    }


def range_body(key: str) -> dict[str, Any]:
    """The ``/v3/kv/range`` body of a linearizable read of ``key``."""
    return {"key": _b64(key), "serializable": False}


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


class EtcdCaller:
    """One caller of etcd's v3 JSON gateway over one kept-alive connection.

    Every call raises :class:`EtcdError` for an answer other than 200, and
    lets ``OSError``/``http.client.HTTPException`` through once a fresh
    connection has failed too.
    """

    def __init__(self, address: str, timeout: float = 10.0) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port, self.timeout = host, int(port), timeout
        self._conn: http.client.HTTPConnection | None = None

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` as JSON to ``path``; the decoded answer."""
        raw = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(raw))}
        for attempt in (0, 1):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port,
                                                        timeout=self.timeout)
            try:
                self._conn.request("POST", path, body=raw, headers=headers)
                response = self._conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt or not reused:
                    raise
                continue
            if response.will_close:
                self.close()
            if response.status != 200:
                raise EtcdError(f"etcd {path}: HTTP {response.status}: {data[:200]!r}")
            answer: dict[str, Any] = json.loads(data) if data else {}
            return answer
        raise EtcdError("unreachable")

    def put(self, key: str, value: bytes) -> dict[str, Any]:
        """``/v3/kv/put``."""
        return self.call("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})

    def create(self, key: str, value: bytes) -> bool:
        """Put ``key`` only if it does not exist (a txn on create_revision == 0).

        The etcd counterpart of create_topic, which must not overwrite a topic;
        ``False`` when the key existed.
        """
        answer = self.call("/v3/kv/txn", create_body(key, value))
        return bool(answer.get("succeeded"))

    def get(self, key: str) -> bytes | None:
        """``/v3/kv/range`` of one key, linearizable (etcd's default); its value or None."""
        answer = self.call("/v3/kv/range", range_body(key))
        kvs = answer.get("kvs") or []
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def close(self) -> None:
        """Drop the connection."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None


class EtcdCluster:
    """Three (``size``) etcd members on 127.0.0.1 under ``base``. Use as a context manager."""

    def __init__(self, binary: str, base: Path, size: int = 3) -> None:
        self.binary, self.base, self.size = binary, Path(base), size
        ports = free_ports(2 * size)
        self.names = [f"e{i + 1}" for i in range(size)]
        self.client_urls = {n: f"http://127.0.0.1:{ports[2 * i]}"
                            for i, n in enumerate(self.names)}
        self.peer_urls = {n: f"http://127.0.0.1:{ports[2 * i + 1]}"
                          for i, n in enumerate(self.names)}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def address(self, name: str) -> str:
        """``host:port`` of a member's client URL."""
        return self.client_urls[name].removeprefix("http://")

    def log_path(self, name: str) -> Path:
        """Where a member's output goes."""
        return self.base / f"{name}.log"

    def start(self, timeout: float = 30.0) -> None:
        """Start every member and wait until a put commits."""
        self.base.mkdir(parents=True, exist_ok=True)
        initial = ",".join(f"{n}={self.peer_urls[n]}" for n in self.names)
        token = f"streambus-bench-{os.getpid()}-{time.monotonic_ns()}"
        for name in self.names:
            log = open(self.log_path(name), "ab")  # noqa: SIM115 - owned by the child
            proc = subprocess.Popen(
                [self.binary, "--name", name, "--data-dir", str(self.base / name),
                 "--listen-client-urls", self.client_urls[name],
                 "--advertise-client-urls", self.client_urls[name],
                 "--listen-peer-urls", self.peer_urls[name],
                 "--initial-advertise-peer-urls", self.peer_urls[name],
                 "--initial-cluster", initial, "--initial-cluster-state", "new",
                 "--initial-cluster-token", token, "--log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.base, start_new_session=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("ETCD")})
            log.close()
            self.procs[name] = proc
            _LIVE.add(proc)
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise EtcdError(f"etcd member {name} exited with {proc.returncode}: "
                                    + self._tail(name))
            try:
                caller = EtcdCaller(self.address(self.names[0]), timeout=2)
                caller.put("streambus-bench/ready", b"1")
                caller.close()
                return
            except (OSError, http.client.HTTPException, EtcdError) as exc:
                last = exc
                time.sleep(0.1)
        raise EtcdError(f"etcd cluster not ready within {timeout:.0f}s: {last}")

    def _tail(self, name: str, lines: int = 5) -> str:
        try:
            text = self.log_path(name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def leader(self) -> str:
        """The name of the member that leads (asked of every member's status)."""
        ids: dict[str, str] = {}
        leaders = set()
        for name in self.names:
            answer = EtcdCaller(self.address(name), timeout=2).call(
                "/v3/maintenance/status", {})
            ids[str(answer["header"]["member_id"])] = name
            leaders.add(str(answer.get("leader")))
        if len(leaders) != 1 or (leader := leaders.pop()) not in ids:
            raise EtcdError(f"etcd members disagree on the leader: {sorted(leaders)}")
        return ids[leader]

    def raft_term(self) -> int:
        """The highest raft term any member reports (elections raise it)."""
        terms = []
        for name in self.names:
            with contextlib.suppress(OSError, http.client.HTTPException, EtcdError):
                answer = EtcdCaller(self.address(name), timeout=2).call(
                    "/v3/maintenance/status", {})
                terms.append(int(answer.get("raftTerm", 0)))
        return max(terms, default=0)

    def pids(self) -> dict[str, int]:
        """Process id of each running member."""
        return {n: p.pid for n, p in self.procs.items() if p.poll() is None}

    def close(self) -> None:
        """Kill every member (idempotent); the data directories stay under ``base``."""
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            _LIVE.discard(proc)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
