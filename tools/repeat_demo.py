"""Run ``make demo`` (examples/three_node_cluster.py) N times in a row and count failures.

Each run gets its own directory under ``--dir``; a passing run's directory is
deleted, a failing run's is kept with its node logs. Besides failures it
counts the runs whose failover took more than one election (the demo prints
``elections since the kill: K``) and runs whose node logs hold a CRITICAL or
ERROR line.

Run: ``python tools/repeat_demo.py [-n 200] [--dir DIR]`` or ``make demo-repeat N=200``.
Exit status 0 only when every run passed with exactly one election and clean logs.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "examples" / "three_node_cluster.py"
ELECTIONS = re.compile(r"elections since the kill: (\d+)")
BAD_LOG_LINE = re.compile(r"\b(CRITICAL|ERROR)\b")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--runs", type=int, default=20, help="runs (default 20)")
    parser.add_argument("--dir", help="keep run directories here (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per run")
    args = parser.parse_args(argv)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="streambus-demos-"))
    base.mkdir(parents=True, exist_ok=True)
    failed: list[int] = []
    extra_terms: list[int] = []
    bad_logs: list[int] = []
    elections: dict[int, int] = {}
    started = time.monotonic()
    for run in range(1, args.runs + 1):
        run_dir = base / f"run-{run:04d}"
        t0 = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, str(DEMO), "--dir", str(run_dir)],
                                  capture_output=True, text=True, timeout=args.timeout)
            output, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            output, code = f"{exc.stdout or ''}{exc.stderr or ''}timed out", -1
        (base / f"run-{run:04d}.out").write_text(str(output))
        found = ELECTIONS.search(str(output))
        count = int(found.group(1)) if found else -1
        elections[count] = elections.get(count, 0) + 1
        logs = [line for log in run_dir.glob("**/*.log")
                for line in log.read_text(errors="replace").splitlines()
                if BAD_LOG_LINE.search(line)]
        verdict = "ok"
        if code != 0:
            failed.append(run)
            verdict = "FAILED"
        elif count != 1:
            extra_terms.append(run)
            verdict = f"{count} elections"
        if logs:
            bad_logs.append(run)
            verdict += f", {len(logs)} CRITICAL/ERROR log lines"
        print(f"run {run}/{args.runs}: {verdict} ({time.monotonic() - t0:.1f}s)", flush=True)
        if verdict == "ok":
            shutil.rmtree(run_dir, ignore_errors=True)
            (base / f"run-{run:04d}.out").unlink()
    print(f"\n{args.runs} runs in {time.monotonic() - started:.0f}s: {len(failed)} failed "
          f"{failed}, {len(extra_terms)} with other than one election {extra_terms}, "
          f"{len(bad_logs)} with CRITICAL/ERROR log lines {bad_logs}; "
          f"elections per failover: {dict(sorted(elections.items()))}; kept in {base}")
    return 0 if not (failed or extra_terms or bad_logs) else 1


if __name__ == "__main__":
    sys.exit(main())
