"""Network partitions between real node processes: one TCP proxy per directed link.

Every node dials each peer on its own *outgoing* connection and sends its
messages only there (:mod:`streambus_consensus.raft.transport`). So the
messages from ``a`` to ``b`` travel on exactly one kind of connection, the one
``a`` dials to ``b``. :class:`LinkProxy` gives each such directed link
``a>b`` a port of its own on 127.0.0.1 that forwards to ``b``'s real cluster
port; :class:`~.harness.LocalCluster` (``proxied=True``) writes each node's
config so that it reaches every peer through that node's links.

Cutting link ``a>b`` **freezes** it: nothing more is read from or written to
any connection of that link, in either direction, and new connections are
accepted but not forwarded. To both nodes this looks like a real partition:
silence, no reset, bytes stuck in buffers until the connection times out
(our transport closes a silent link after ``election_timeout_max``) or the
link heals, when what was held is delivered late, as TCP retransmission
would. ``a>b`` cut and ``b>a`` open is a one-way cut: ``a``'s messages never
reach ``b``, ``b``'s reach ``a``.

The proxy runs in a process of its own (``python -m
streambus_consensus.testing.faults``), so a busy test process cannot delay
the cluster's traffic, and it exits when its controller goes away (end of
its stdin). It needs no privileges, no packages and no host network state;
see ``docs/testing.md`` for why we chose it over network namespaces or
iptables.

Control protocol (one JSON object per line on stdin, one answer per line on
stdout): ``{"op": "cut" | "heal", "links": ["n1>n2", ...]}``,
``{"op": "heal_all"}``, ``{"op": "stats"}``, ``{"op": "exit"}``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

__all__ = ["LinkProxy", "LinkProxyError", "Partitioner", "link_name"]

_BUFFER_LIMIT = 4 << 20
"""Bytes held per direction of one connection before the proxy stops reading."""
_READ_SIZE = 1 << 16


def link_name(source: str, target: str) -> str:
    """The name of the directed link carrying ``source``'s messages to ``target``."""
    return f"{source}>{target}"


class LinkProxyError(RuntimeError):
    """The proxy process failed to start, answer or carry out a command."""


# --------------------------------------------------------------------------- the controller


class LinkProxy:
    """Starts and controls the proxy process for a set of directed links.

    Args:
        targets: ``{link name: "host:port"}``, where each link forwards to.
        python: the interpreter to run the proxy with.

    Thread-safe: commands from several threads are serialized.
    """

    def __init__(self, targets: dict[str, str], *, python: str = sys.executable) -> None:
        self.targets = dict(targets)
        self._python = python
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        self.ports: dict[str, int] = {}
        self.cut_links: set[str] = set()

    @property
    def pid(self) -> int | None:
        """The proxy process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def process(self) -> subprocess.Popen[str] | None:
        """The proxy process (for cleanup by its owner)."""
        return self._proc

    def start(self, timeout: float = 20.0) -> dict[str, int]:
        """Start the proxy; return the port it listens on for each link."""
        if self._proc is not None:
            return self.ports
        spec = json.dumps(self.targets)
        self._proc = subprocess.Popen(
            [self._python, "-m", "streambus_consensus.testing.faults", "--links", spec],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True,
            bufsize=1, start_new_session=True,
        )
        answer = self._read_answer(timeout)
        ports = answer.get("ports")
        if not isinstance(ports, dict) or set(ports) != set(self.targets):
            self.close()
            raise LinkProxyError(f"proxy did not report its ports: {answer!r}")
        self.ports = {str(k): int(v) for k, v in ports.items()}
        return self.ports

    def _read_answer(self, timeout: float) -> dict[str, Any]:
        proc = self._proc
        if proc is None or proc.stdout is None:
            raise LinkProxyError("proxy is not running")
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()
                                                               if proc.stdout else ""),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if not result or not result[0]:
            raise LinkProxyError(f"proxy gave no answer within {timeout}s "
                                 f"(exit code {proc.poll()})")
        try:
            answer: dict[str, Any] = json.loads(result[0])
        except ValueError:
            raise LinkProxyError(f"proxy answered {result[0]!r}") from None
        if not answer.get("ok", False):
            raise LinkProxyError(f"proxy refused: {answer.get('error')}")
        return answer

    def command(self, op: str, links: Iterable[str] = (), timeout: float = 10.0) -> dict[str, Any]:
        """Send one command and wait for its answer."""
        names = sorted(set(links))
        unknown = [n for n in names if n not in self.targets]
        if unknown:
            raise LinkProxyError(f"unknown links {unknown}")
        with self._lock:
            proc = self._proc
            if proc is None or proc.stdin is None or proc.poll() is not None:
                raise LinkProxyError("proxy is not running")
            try:
                proc.stdin.write(json.dumps({"op": op, "links": names}) + "\n")
                proc.stdin.flush()
            except OSError as exc:
                raise LinkProxyError(f"proxy is gone: {exc}") from None
            answer = self._read_answer(timeout)
            if op == "cut":
                self.cut_links.update(names)
            elif op == "heal":
                self.cut_links.difference_update(names)
            elif op == "heal_all":
                self.cut_links.clear()
            return answer

    def cut(self, links: Iterable[str]) -> None:
        """Freeze the given links (see the module docstring)."""
        self.command("cut", links)

    def heal(self, links: Iterable[str]) -> None:
        """Let the given links carry traffic again."""
        self.command("heal", links)

    def heal_all(self) -> None:
        """Heal every link."""
        self.command("heal_all")

    def stats(self) -> dict[str, Any]:
        """Per link: whether cut, connections open, bytes forwarded."""
        links: dict[str, Any] = self.command("stats")["links"]
        return links

    def close(self) -> None:
        """Stop the proxy process. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
        self._proc = None


class Partitioner:
    """Partitions expressed over node ids, on top of a :class:`LinkProxy`.

    Args:
        proxy: the running proxy of the cluster.
        nodes: every node id of the cluster.
    """

    def __init__(self, proxy: LinkProxy, nodes: Sequence[str]) -> None:
        self.proxy = proxy
        self.nodes = list(nodes)

    def links_between(self, side_a: Iterable[str], side_b: Iterable[str], *,
                      both_ways: bool = True) -> list[str]:
        """The links from every node of ``side_a`` to every node of ``side_b``
        (and back, with ``both_ways``)."""
        a, b = list(side_a), list(side_b)
        names = [link_name(x, y) for x in a for y in b if x != y]
        if both_ways:
            names += [link_name(y, x) for x in a for y in b if x != y]
        return names

    def isolate(self, node: str) -> list[str]:
        """Cut every link to and from ``node``; returns the links cut."""
        return self.split([node], [n for n in self.nodes if n != node])

    def split(self, side_a: Iterable[str], side_b: Iterable[str]) -> list[str]:
        """Cut every link between the two sides, both ways; returns the links cut."""
        links = self.links_between(side_a, side_b)
        self.proxy.cut(links)
        return links

    def cut_one_way(self, source: str, target: str) -> list[str]:
        """``source``'s messages stop reaching ``target``; the other way still works."""
        links = [link_name(source, target)]
        self.proxy.cut(links)
        return links

    def heal(self, links: Iterable[str] | None = None) -> None:
        """Heal the given links, or all of them."""
        if links is None:
            self.proxy.heal_all()
        else:
            self.proxy.heal(links)


# --------------------------------------------------------------------------- the proxy process


@dataclass(eq=False)
class _Link:
    name: str
    target: tuple[str, int]
    listener: socket.socket
    cut: bool = False
    pairs: set[_Pair] = field(default_factory=set)
    connections: int = 0
    bytes_forwarded: int = 0


@dataclass(eq=False)
class _Pair:
    link: _Link
    client: socket.socket
    upstream: socket.socket | None = None
    connecting: bool = False
    to_upstream: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    client_eof: bool = False
    upstream_eof: bool = False
    closed: bool = False
    serial: int = 0


class _ProxyServer:
    """The proxy's event loop: one thread, one selector, every link."""

    def __init__(self, targets: dict[str, str], control_in: IO[bytes],
                 control_out: IO[str]) -> None:
        self._sel = selectors.DefaultSelector()
        self._links: dict[str, _Link] = {}
        self._serial = itertools.count()
        self._in = control_in
        self._out = control_out
        self._inbuf = b""
        self._running = True
        for name, address in targets.items():
            host, _, port = address.rpartition(":")
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            listener.setblocking(False)
            link = _Link(name, (host, int(port)), listener)
            self._links[name] = link
            self._sel.register(listener, selectors.EVENT_READ, ("listen", link))
        os.set_blocking(self._in.fileno(), False)
        self._sel.register(self._in.fileno(), selectors.EVENT_READ, ("control", None))

    def ports(self) -> dict[str, int]:
        return {name: link.listener.getsockname()[1] for name, link in self._links.items()}

    def serve(self) -> None:
        while self._running:
            for key, events in self._sel.select(1.0):
                kind, obj = key.data
                if kind == "control":
                    self._on_control()
                elif kind == "listen":
                    self._accept(obj)
                elif kind in ("client", "upstream"):
                    self._on_socket(obj, kind, events)
        for link in self._links.values():
            for pair in list(link.pairs):
                self._close(pair)
            link.listener.close()

    # -- control -------------------------------------------------------------------

    def _on_control(self) -> None:
        try:
            chunk = os.read(self._in.fileno(), 65536)
        except BlockingIOError:
            return
        if not chunk:
            self._running = False  # the controller is gone
            return
        self._inbuf += chunk
        while b"\n" in self._inbuf:
            line, self._inbuf = self._inbuf.split(b"\n", 1)
            if line.strip():
                self._answer(self._execute(line))

    def _answer(self, answer: dict[str, Any]) -> None:
        self._out.write(json.dumps(answer) + "\n")
        self._out.flush()

    def _execute(self, line: bytes) -> dict[str, Any]:
        try:
            command = json.loads(line)
            op = command["op"]
            names = [str(n) for n in command.get("links", [])]
        except (ValueError, KeyError, TypeError) as exc:
            return {"ok": False, "error": f"bad command {line!r}: {exc}"}
        unknown = [n for n in names if n not in self._links]
        if unknown:
            return {"ok": False, "error": f"unknown links {unknown}"}
        if op == "cut":
            for name in names:
                self._set_cut(self._links[name], True)
        elif op == "heal":
            for name in names:
                self._set_cut(self._links[name], False)
        elif op == "heal_all":
            for link in self._links.values():
                self._set_cut(link, False)
        elif op == "stats":
            return {"ok": True, "links": {
                name: {"cut": link.cut, "open": len(link.pairs),
                       "connections": link.connections, "bytes": link.bytes_forwarded}
                for name, link in self._links.items()}}
        elif op == "exit":
            self._running = False
        else:
            return {"ok": False, "error": f"unknown op {op!r}"}
        return {"ok": True}

    def _set_cut(self, link: _Link, cut: bool) -> None:
        if link.cut == cut:
            return
        link.cut = cut
        for pair in list(link.pairs):
            if not cut and pair.upstream is None:
                self._dial(pair)
            self._update(pair)

    # -- connections -----------------------------------------------------------------

    def _accept(self, link: _Link) -> None:
        while True:
            try:
                sock, _ = link.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(link, sock, serial=next(self._serial))
            link.pairs.add(pair)
            link.connections += 1
            if not link.cut:
                self._dial(pair)
            self._update(pair)

    def _dial(self, pair: _Pair) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(pair.link.target)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._close(pair)  # nothing listens there: the dialer sees its connection close
            return
        pair.upstream = sock
        pair.connecting = True

    def _update(self, pair: _Pair) -> None:
        """Register exactly the events the pair can act on now (none while cut)."""
        if pair.closed:
            return
        frozen = pair.link.cut
        client_events = 0
        upstream_events = 0
        if not frozen:
            if not pair.client_eof and len(pair.to_upstream) < _BUFFER_LIMIT:
                client_events |= selectors.EVENT_READ
            if pair.to_client:
                client_events |= selectors.EVENT_WRITE
            if pair.upstream is not None:
                if pair.connecting:
                    upstream_events = selectors.EVENT_WRITE
                else:
                    if not pair.upstream_eof and len(pair.to_client) < _BUFFER_LIMIT:
                        upstream_events |= selectors.EVENT_READ
                    if pair.to_upstream:
                        upstream_events |= selectors.EVENT_WRITE
        self._register(pair.client, client_events, ("client", pair))
        if pair.upstream is not None:
            self._register(pair.upstream, upstream_events, ("upstream", pair))

    def _register(self, sock: socket.socket, events: int, data: tuple[str, _Pair]) -> None:
        try:
            self._sel.get_key(sock)
            registered = True
        except KeyError:
            registered = False
        if events and registered:
            self._sel.modify(sock, events, data)
        elif events:
            self._sel.register(sock, events, data)
        elif registered:
            self._sel.unregister(sock)

    def _on_socket(self, pair: _Pair, side: str, events: int) -> None:
        if pair.closed or pair.link.cut:
            return
        if side == "upstream" and pair.connecting:
            upstream = pair.upstream
            if upstream is None:
                return
            err = upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._close(pair)
                return
            pair.connecting = False
            self._update(pair)
            return
        sock = pair.client if side == "client" else pair.upstream
        if sock is None:
            return
        outbuf = pair.to_client if side == "client" else pair.to_upstream
        inbuf = pair.to_upstream if side == "client" else pair.to_client
        try:
            if events & selectors.EVENT_WRITE and outbuf:
                sent = sock.send(outbuf)
                del outbuf[:sent]
                pair.link.bytes_forwarded += sent
            if events & selectors.EVENT_READ:
                data = sock.recv(_READ_SIZE)
                if data:
                    inbuf += data
                elif side == "client":
                    pair.client_eof = True
                else:
                    pair.upstream_eof = True
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(pair)
            return
        # A side that finished and whose bytes were all passed on ends the pair:
        # the transport never half-closes, so either end closing means the link is gone.
        if (pair.client_eof and not pair.to_upstream) or (pair.upstream_eof
                                                          and not pair.to_client):
            self._close(pair)
            return
        self._update(pair)

    def _close(self, pair: _Pair) -> None:
        if pair.closed:
            return
        pair.closed = True
        pair.link.pairs.discard(pair)
        for sock in (pair.client, pair.upstream):
            if sock is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the proxy process (see the module docstring)."""
    parser = argparse.ArgumentParser(description="per-link TCP proxy for partition tests")
    parser.add_argument("--links", required=True,
                        help='JSON object {"a>b": "host:port", ...}')
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller decides when we stop
    targets = json.loads(args.links)
    server = _ProxyServer({str(k): str(v) for k, v in targets.items()}, sys.stdin.buffer,
                          sys.stdout)
    print(json.dumps({"ok": True, "ports": server.ports()}), flush=True)
    server.serve()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
