"""The load generator's own ceiling: a server that answers every request at once.

A benchmark's figure is the smaller of what the server can do and what its
clients can ask for. On the 2-core bench machine the callers (Python worker
processes, :class:`~._load.LoadPool`) share the cores with the servers, so
part of every figure may be the client's own limit. :class:`CannedServer`
measures that limit: in a process of its own, it answers each request with
the bytes a real server sent for the same kind of request (captured once by
:func:`capture`: status line, headers and body, so the same size and the
same parsing work for the caller), without doing anything else. The same
callers pointed at it give the most ops/s they could drive on this machine
while a server also runs (its CPU time is reported beside the figures).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import multiprocessing
import os
import re
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any, cast

from ..api import sign_request

__all__ = ["CannedServer", "capture"]

_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:[ \t]*(\d+)")


def capture(address: str, method: str, path: str, body: Any = None, *,
            secret: str | None = None) -> bytes:
    """One real answer of the server at ``address``, as the bytes it sent: status
    line, headers, body. With ``secret`` the request is signed as
    :class:`~streambus_consensus.client.ApiClient` signs it."""
    host, _, port = address.rpartition(":")
    raw = b"" if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(raw))}
    if secret is not None:
        timestamp = f"{time.time():.3f}"
        headers["X-SBC-Timestamp"] = timestamp
        headers["X-SBC-Signature"] = sign_request(secret, method, path, timestamp, raw)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=raw, headers=headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"{method} {path} on {address}: HTTP {response.status}: {data[:200]!r}")
    head = [f"HTTP/1.1 {response.status} {response.reason}"]
    head += [f"{name}: {value}" for name, value in response.getheaders()
             if name.lower() != "connection"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data


class _Answerer(asyncio.Protocol):
    """Reads requests off one connection; writes the canned answer for each."""

    def __init__(self, answers: Sequence[tuple[bytes, bytes]]) -> None:
        self._answers = answers
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self._buffer[:end]
            length = _CONTENT_LENGTH.search(head)
            total = end + 4 + (int(length.group(1)) if length else 0)
            if len(self._buffer) < total:
                return
            self._buffer = self._buffer[total:]
            answer = next((a for prefix, a in self._answers if head.startswith(prefix)),
                          self._answers[0][1])
            if self._transport is not None:
                self._transport.write(answer)


def _serve(answers: Sequence[tuple[bytes, bytes]], reply: Connection) -> None:
    """The server process: bind a free loopback port, say which, answer forever."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Answerer(answers), "127.0.0.1", 0,
                                          backlog=1024)
        reply.send(server.sockets[0].getsockname()[1])
        reply.close()
        await server.serve_forever()

    asyncio.run(main())


class CannedServer:
    """The server process. A context manager.

    Args:
        answers: ``{request line prefix: answer bytes}``, e.g.
            ``{b"GET /v1/topics/": ...}``; a request matching none gets the
            first answer.
    """

    def __init__(self, answers: Mapping[bytes, bytes]) -> None:
        if not answers:
            raise ValueError("a canned server needs at least one answer")
        self.answer_bytes = {prefix.decode(): len(a) for prefix, a in answers.items()}
        """Size of each canned answer (headers included), by request prefix."""
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe(duplex=False)
        self._process = context.Process(target=_serve, args=(list(answers.items()), theirs),
                                        name="canned-server", daemon=True)
        self._process.start()
        theirs.close()
        try:
            if not ours.poll(60):
                raise RuntimeError("the canned server did not start within 60 s")
            self.port: int = ours.recv()
        except BaseException:
            self.close()
            raise
        finally:
            ours.close()
        self.address = f"127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float | None:
        """CPU time the server process has used (Linux ``/proc``; else ``None``)."""
        pid = self._process.pid
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        """Stop the process."""
        if self._process.is_alive():
            self._process.terminate()
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)

    def __enter__(self) -> CannedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
