"""What every benchmark shares: machine description, statistics, load loops, output.

Numbers from one shared 2-core machine mean little on their own, so every
result file carries the machine (:func:`machine_info`), the versions
(:func:`versions`), the date, the exact command and the load average before
and after, and every comparison is made inside one run.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from ..api import sign_request
from ..config import parse_address

__all__ = [
    "HttpCaller",
    "LoadResult",
    "closed_loop",
    "command_in_words",
    "command_line",
    "fsync_floor",
    "loadavg",
    "machine_info",
    "quantile",
    "repo_root",
    "summarize",
    "versions",
    "write_json",
]


def repo_root() -> Path:
    """The source checkout this package runs from (where BENCHMARKS.md lives), else cwd."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").exists() else Path.cwd()


# -- machine and versions ---------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _mount_of(path: Path) -> tuple[str, str, str]:
    """(device, mount point, fs type) of the file system holding ``path``."""
    best = ("?", "/", "?")
    resolved = str(path.resolve())
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        device, mount, fstype = parts[0], parts[1], parts[2]
        if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(
                mount) >= len(best[1]):
            best = (device, mount, fstype)
    return best


def _disk_kind(device: str) -> str:
    name = Path(device).name
    for candidate in (name, name.rstrip("0123456789"), name.split("p")[0]):
        rotational = _read(f"/sys/block/{candidate}/queue/rotational").strip()
        if rotational:
            model = _read(f"/sys/block/{candidate}/device/model").strip()
            kind = "rotational" if rotational == "1" else "non-rotational"
            return f"{kind}{', ' + model if model else ''}"
    return "unknown"


def machine_info(data_dir: Path | None = None) -> dict[str, Any]:
    """nproc, CPU model, memory, the data disk, the kernel and whether a hypervisor runs it."""
    cpu_model = "?"
    virtual = False
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name") and cpu_model == "?":
            cpu_model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            virtual = virtual or "hypervisor" in line.split(":", 1)[1].split()
    mem_kib = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    where = data_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    device, _mount, fstype = _mount_of(where)
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        # In words only: no path of this machine (its temp dir, device node or mount point).
        "disk": {"device": Path(device).name, "fs": fstype, "kind": _disk_kind(device)},
        "kernel": f"{platform.system()} {platform.release()}",
        "virtual": virtual,
    }


def _dist_version(name: str) -> str:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=repo_root(), capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def versions() -> dict[str, str]:
    """Python, PySyncObj and this package (with the git commit when there is one)."""
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else False
    return {
        "python": platform.python_version(),
        "pysyncobj": _dist_version("pysyncobj"),
        "streambus_consensus": _dist_version("streambus-consensus"),
        "git_commit": (commit + ("+dirty" if dirty else "")) if commit else "unknown",
    }


def command_line() -> str:
    """The command that started this run, as a shell would take it, in words (see
    :func:`command_in_words`)."""
    if sys.argv and sys.argv[0].endswith("__main__.py"):
        return command_in_words(shlex.join([sys.executable, "-m", "streambus_consensus.bench",
                                            *sys.argv[1:]]))
    return command_in_words(shlex.join([sys.executable, *sys.argv]))


def command_in_words(command: str) -> str:
    """``command`` with no absolute path of the machine: checkout-relative, else a word
    (``python`` for the program, ``DIR`` for an argument)."""
    root = repo_root().resolve()
    words = []
    for i, word in enumerate(shlex.split(command)):
        if word.startswith("/"):
            try:
                word = str(Path(word).resolve().relative_to(root)) or "."
            except ValueError:
                word = "python" if i == 0 else "DIR"
        words.append(word)
    return shlex.join(words)


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (other work on the machine skews figures)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def now_iso() -> str:
    """The current UTC time, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


def write_json(path: Path, section: str, meta: dict[str, Any], data: dict[str, Any]) -> None:
    """Write one section's results with the run's description."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"section": section, "meta": meta, "results": data}
    path.write_text(json.dumps(body, indent=2, sort_keys=False, default=str) + "\n",
                    encoding="utf-8")


# -- statistics -------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile of ``values`` (``q`` in 0..1); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(q * len(ordered) + 0.999999)))
    return ordered[rank - 1]


def summarize(latencies: list[float], seconds: float | None = None) -> dict[str, Any]:
    """n, ops/s over ``seconds``, p50, p99, max and mean, in milliseconds."""
    out: dict[str, Any] = {"n": len(latencies)}
    if seconds:
        out["ops_per_s"] = round(len(latencies) / seconds, 1)
    if latencies:
        out.update(p50_ms=round(quantile(latencies, 0.5) * 1e3, 3),
                   p99_ms=round(quantile(latencies, 0.99) * 1e3, 3),
                   max_ms=round(max(latencies) * 1e3, 3),
                   mean_ms=round(statistics.fmean(latencies) * 1e3, 3))
    return out


# -- closed-loop load -------------------------------------------------------------


@dataclass
class LoadResult:
    """What :func:`closed_loop` measured."""

    callers: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        """The figures as plain data."""
        out = {"callers": self.callers, **summarize(self.latencies, self.seconds)}
        if self.errors:
            out["errors"] = dict(self.errors)
        return out


def closed_loop(call: Callable[[int, int], object], callers: int, seconds: float,
                warmup: float = 0.3) -> LoadResult:
    """Run ``callers`` threads, each calling ``call(thread, i)`` back to back.

    Only calls that start after ``warmup`` and end before the deadline count;
    throughput is those calls over the measured window. An exception is
    counted by type and the caller goes on.
    """
    result = LoadResult(callers, seconds)
    lock = threading.Lock()
    begin = threading.Barrier(callers + 1)
    state: dict[str, float] = {}

    def run(thread: int) -> None:
        mine: list[float] = []
        errors: Counter[str] = Counter()
        begin.wait()
        start, end = state["start"], state["end"]
        i = 0
        while True:
            t0 = time.monotonic()
            if t0 >= end:
                break
            try:
                call(thread, i)
            except Exception as exc:
                errors[type(exc).__name__] += 1
                time.sleep(0.01)
            else:
                t1 = time.monotonic()
                if t0 >= start and t1 <= end:
                    mine.append(t1 - t0)
            i += 1
        with lock:
            result.latencies.extend(mine)
            result.errors.update(errors)

    threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(callers)]
    for t in threads:
        t.start()
    state["start"] = time.monotonic() + warmup
    state["end"] = state["start"] + seconds
    begin.wait()
    for t in threads:
        t.join(seconds + warmup + 60)
    return result


# -- a keep-alive HTTP caller -------------------------------------------------------


class HttpCaller:
    """Signed HTTP/1.1 requests to one node API (one caller per thread).

    ``keep_alive=False`` (default) opens a connection per request, as
    :class:`~streambus_consensus.client.ApiClient` does; ``True`` keeps one
    connection, as a long-lived broker client would. Raises ``RuntimeError``
    for any answer other than 200.
    """

    def __init__(self, address: str, secret: str | None, timeout: float = 10.0, *,
                 keep_alive: bool = False) -> None:
        self.host, self.port = parse_address(address)
        self.secret = secret
        self.timeout = timeout
        self.keep_alive = keep_alive
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; return the ``result`` field of the answer."""
        raw = b"" if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(raw))}
        if not self.keep_alive:
            headers["Connection"] = "close"
        if self.secret is not None:
            stamp = f"{time.time():.3f}"
            headers["X-SBC-Timestamp"] = stamp
            headers["X-SBC-Signature"] = sign_request(self.secret, method, path, stamp, raw)
        for attempt in (0, 1):
            conn = self._conn or http.client.HTTPConnection(self.host, self.port,
                                                            timeout=self.timeout)
            self._conn = conn
            try:
                conn.request(method, path, body=raw, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (http.client.HTTPException, OSError):
                self.close()
                if attempt or not self.keep_alive:
                    raise
                continue
            if not self.keep_alive:
                self.close()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
            return json.loads(data)["result"] if data else None
        return None

    def close(self) -> None:
        """Drop the connection."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None


# -- the disk ---------------------------------------------------------------------


def fsync_floor(directory: Path, count: int = 200, size: int = 4096) -> dict[str, Any]:
    """Latency of append + fdatasync of ``size`` bytes in ``directory``: the disk's floor."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fsync-probe.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    latencies: list[float] = []
    try:
        block = os.urandom(size)
        for _ in range(count):
            t0 = time.perf_counter()
            os.write(fd, block)
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return {"bytes": size, **summarize(latencies)}


@contextlib.contextmanager
def section_timer(log: Callable[[str], None], name: str) -> Iterator[dict[str, Any]]:
    """Time a section and record the load average around it."""
    info: dict[str, Any] = {"loadavg_before": loadavg()}
    started = time.monotonic()
    log(f"== {name}")
    try:
        yield info
    finally:
        info["seconds"] = round(time.monotonic() - started, 1)
        info["loadavg_after"] = loadavg()
        log(f"== {name}: {info['seconds']:.1f}s")
