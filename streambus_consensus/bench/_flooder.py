"""Hold many client connections open against one node's API (run by :mod:`.flood`).

``python -m streambus_consensus.bench._flooder --address HOST:PORT --count N
--seconds S [--ping P] --out FILE``

One thread, non-blocking sockets and a selector: it opens ``count`` TCP
connections at once (a burst, as a fleet of clients restarting together
would), sends one ``GET /healthz`` on each as soon as it is connected (a real
HTTP/1.1 keep-alive client, not a half-open socket), then keeps every
connection open: with ``ping`` > 0 each sends another ``GET /healthz`` every
``ping`` seconds (staggered), as a kept-alive client polling would, so that a
server's idle timeout does not cut it; with ``ping`` 0 they stay silent. A
connection the server closes or resets is counted
as cut (with how long it had been open: a cut at the server's idle timeout is
policy, an early one is not) and opened again a second later, so the pressure
stays at ``count`` for the whole window. After ``seconds`` it closes everything and writes its
counts as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import errno
import json
import resource
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: keep-alive\r\n\r\n"
RECONNECT_AFTER = 1.0
CONNECT_TIMEOUT = 10.0


@dataclass
class _Counts:
    connects_started: int = 0
    connected: int = 0
    connect_failed: int = 0
    connect_timeouts: int = 0
    responses: int = 0
    cut: int = 0
    peak_open: int = 0
    pings: int = 0
    cut_ages: list[float] = field(default_factory=list)
    first_all_open_s: float | None = None
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, exc: BaseException) -> None:
        name = errno.errorcode.get(getattr(exc, "errno", 0) or 0, type(exc).__name__)
        self.errors[name] = self.errors.get(name, 0) + 1


def _raise_nofile(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = count + 64
    if soft < want:
        limit = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def flood(host: str, port: int, count: int, seconds: float,
          ping: float = 0.0) -> dict[str, Any]:
    """Hold ``count`` connections for ``seconds`` (a request every ``ping`` s); the counts."""
    _raise_nofile(count)
    counts = _Counts()
    sel = selectors.DefaultSelector()
    # socket -> (state, since): "connecting" or "open"
    state: dict[socket.socket, tuple[str, float]] = {}
    pending: list[float] = []  # reconnect times
    next_ping: dict[socket.socket, float] = {}
    opened_now = 0
    start = time.monotonic()
    wall_start = time.time()
    end = start + seconds

    def connect() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        counts.connects_started += 1
        code = sock.connect_ex((host, port))
        if code not in (0, errno.EINPROGRESS):
            counts.connect_failed += 1
            counts.error(OSError(code, "connect"))
            sock.close()
            pending.append(time.monotonic() + RECONNECT_AFTER)
            return
        state[sock] = ("connecting", time.monotonic())
        sel.register(sock, selectors.EVENT_WRITE)

    def drop(sock: socket.socket, *, was_open: bool, failed: bool = False) -> None:
        nonlocal opened_now
        sel.unregister(sock)
        _kind, since = state.pop(sock)
        next_ping.pop(sock, None)
        sock.close()
        if was_open:
            opened_now -= 1
            counts.cut += 1
            counts.cut_ages.append(time.monotonic() - since)
        elif failed:
            counts.connect_failed += 1
        pending.append(time.monotonic() + RECONNECT_AFTER)

    for _ in range(count):
        connect()
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = [t for t in pending if t <= now]
        if due:
            pending[:] = [t for t in pending if t > now]
            for _ in due:
                connect()
        for key, events in sel.select(timeout=0.1):
            sock = cast(socket.socket, key.fileobj)
            kind, _since = state[sock]
            if kind == "connecting" and events & selectors.EVENT_WRITE:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    counts.error(OSError(code, "connect"))
                    drop(sock, was_open=False, failed=True)
                    continue
                counts.connected += 1
                opened_now += 1
                counts.peak_open = max(counts.peak_open, opened_now)
                if opened_now >= count and counts.first_all_open_s is None:
                    counts.first_all_open_s = round(time.monotonic() - start, 3)
                state[sock] = ("open", time.monotonic())
                try:
                    sock.send(REQUEST)
                except OSError as exc:
                    counts.error(exc)
                    drop(sock, was_open=True)
                    continue
                sel.modify(sock, selectors.EVENT_READ)
                if ping > 0:  # staggered: the burst of first requests is not repeated
                    next_ping[sock] = time.monotonic() + ping * (
                        0.5 + (counts.connected % 997) / 997)
            elif kind == "open" and events & selectors.EVENT_READ:
                try:
                    data = sock.recv(65536)
                except OSError as exc:
                    counts.error(exc)
                    drop(sock, was_open=True)
                    continue
                if not data:
                    drop(sock, was_open=True)
                elif b"HTTP/1." in data:
                    counts.responses += data.count(b"HTTP/1.")
        now = time.monotonic()
        for sock, due_at in list(next_ping.items()):
            if due_at <= now:
                next_ping[sock] = now + ping
                try:
                    sock.send(REQUEST)
                    counts.pings += 1
                except OSError as exc:
                    counts.error(exc)
                    drop(sock, was_open=True)
        for sock, (kind, since) in list(state.items()):
            if kind == "connecting" and now - since > CONNECT_TIMEOUT:
                counts.connect_timeouts += 1
                drop(sock, was_open=False)
    held = sum(1 for kind, _ in state.values() if kind == "open")
    wall_end = time.time()  # before closing: [wall_start, wall_end] is the hold
    for sock in list(state):
        sel.unregister(sock)
        sock.close()
    sel.close()
    ages = sorted(counts.cut_ages)
    figures = {k: v for k, v in counts.__dict__.items() if k != "cut_ages"}
    return {"count": count, "seconds": seconds, "ping": ping, "open_at_end": held, **figures,
            "wall_start": wall_start, "wall_end": wall_end,
            "cut_age_min_s": round(ages[0], 3) if ages else None,
            "cut_age_median_s": round(ages[len(ages) // 2], 3) if ages else None}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--ping", type=float, default=0.0,
                        help="seconds between requests on each connection (0: silent)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    host, _, port = args.address.rpartition(":")
    result = flood(host, int(port), args.count, args.seconds, args.ping)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
