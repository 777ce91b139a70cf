"""Compare HTTP front ends for the node API: requests/s of one trivial signed route.

Each candidate serves ``GET /v1/echo/{x}`` in a process of its own, checking the
request's HMAC signature and answering ``{"result": ...}`` as JSON, like a node
route; a client process of its own (asyncio, raw sockets, pre-signed requests,
so the client costs little) drives it with 1 and 32 kept-alive connections.
Rounds interleave the candidates; medians are printed. Used to choose the
library behind :class:`streambus_consensus.api.ApiServer` (see docs/operations.md).

    .venv/bin/pip install aiohttp 'uvicorn[standard]'
    .venv/bin/python tools/api_frontend_compare.py --rounds 5 --seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import statistics
import subprocess
import sys
import time
from typing import Any

SECRET = "compare-secret-0123456789"
CANDIDATES = ("ours", "aiohttp-lowlevel", "aiohttp-app", "uvicorn-httptools")


def _check(method: str, target: str, timestamp: str, signature: str, body: bytes) -> bool:
    if abs(time.time() - float(timestamp)) > 60:
        return False
    message = f"{method}\n{target}\n{timestamp}\n".encode() + body
    want = hmac.new(SECRET.encode(), message, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, signature)


def serve(kind: str, port: int) -> None:
    if kind == "ours":
        from streambus_consensus.api import ApiRequest, ApiServer, Route

        async def echo(request: ApiRequest) -> Any:
            return {"echo": request.path_args[0]}

        server = ApiServer(f"127.0.0.1:{port}", [Route("GET", "/v1/echo/{x}", echo)],
                           secret=SECRET)
        server.start()
        print("ready", flush=True)
        sys.stdin.read()
        server.stop()
        return
    if kind.startswith("aiohttp"):
        from aiohttp import web

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            body = await request.read()
            if not _check(request.method, request.path_qs,
                          request.headers.get("X-SBC-Timestamp", "0"),
                          request.headers.get("X-SBC-Signature", ""), body):
                return web.Response(status=401)
            x = request.path.rsplit("/", 1)[-1]
            return web.Response(body=json.dumps({"result": {"echo": x}}).encode(),
                                content_type="application/json")

        async def main() -> None:
            loop = asyncio.get_running_loop()
            if kind == "aiohttp-lowlevel":
                srv = web.Server(handle)
                await loop.create_server(srv, "127.0.0.1", port)
            else:
                app = web.Application()
                app.router.add_get("/v1/echo/{x}", handle)
                runner = web.AppRunner(app, access_log=None)
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", port).start()
            print("ready", flush=True)
            await loop.run_in_executor(None, sys.stdin.read)

        asyncio.run(main())
        return
    if kind == "uvicorn-httptools":
        import uvicorn

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            body = b""
            more = True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
            headers = dict(scope["headers"])
            target = scope["raw_path"].decode() + (
                "?" + scope["query_string"].decode() if scope["query_string"] else "")
            ok = _check(scope["method"], target, headers.get(b"x-sbc-timestamp", b"0").decode(),
                        headers.get(b"x-sbc-signature", b"").decode(), body)
            x = scope["path"].rsplit("/", 1)[-1]
            payload = json.dumps({"result": {"echo": x}}).encode()
            await send({"type": "http.response.start", "status": 200 if ok else 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})

        config = uvicorn.Config(app, host="127.0.0.1", port=port, http="httptools",
                                loop="asyncio", log_level="warning", access_log=False,
                                lifespan="off")
        server = uvicorn.Server(config)

        async def main() -> None:
            task = asyncio.get_running_loop().create_task(server.serve())
            while not server.started:
                await asyncio.sleep(0.01)
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
            server.should_exit = True
            await task

        asyncio.run(main())
        return
    raise SystemExit(f"unknown candidate {kind}")


def _request(i: int) -> bytes:
    target = f"/v1/echo/k{i}"
    timestamp = f"{time.time():.3f}"
    signature = hmac.new(SECRET.encode(), f"GET\n{target}\n{timestamp}\n".encode(),
                         hashlib.sha256).hexdigest()
    return (f"GET {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
            f"X-SBC-Timestamp: {timestamp}\r\nX-SBC-Signature: {signature}\r\n\r\n").encode()


async def _caller(port: int, i: int, stop_at: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = _request(i)
    while time.monotonic() < stop_at:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head[:40])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        counts[i] += 1
    writer.close()


def drive(port: int, callers: int, seconds: float) -> float:
    counts = [0] * callers

    async def main() -> float:
        started = time.monotonic()
        await asyncio.gather(*(_caller(port, i, started + seconds, counts)
                               for i in range(callers)))
        return sum(counts) / (time.monotonic() - started)

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"))
    parser.add_argument("--drive", nargs=3, metavar=("PORT", "CALLERS", "SECONDS"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return 0
    if args.drive:
        print(drive(int(args.drive[0]), int(args.drive[1]), float(args.drive[2])))
        return 0
    from streambus_consensus.testing.harness import free_ports

    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for kind in args.candidates.split(","):
            port = free_ports(1)[0]
            server = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(port)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert server.stdout is not None and server.stdin is not None
                if server.stdout.readline().strip() != "ready":
                    raise SystemExit(f"{kind} did not start")
                for callers in (1, 32):
                    out = subprocess.run([sys.executable, __file__, "--drive", str(port),
                                          str(callers), str(args.seconds)],
                                         capture_output=True, text=True, check=True)
                    results.setdefault((kind, callers), []).append(float(out.stdout))
                server.stdin.close()
                server.wait(10)
            finally:
                if server.poll() is None:
                    server.kill()
                    server.wait()
    print(f"{'candidate':<20} {'1 caller ops/s':>16} {'32 callers ops/s':>17}  (median of "
          f"{args.rounds} rounds, {args.seconds:g} s each)")
    for kind in args.candidates.split(","):
        one = statistics.median(results[(kind, 1)])
        many = statistics.median(results[(kind, 32)])
        print(f"{kind:<20} {one:>16,.0f} {many:>17,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
