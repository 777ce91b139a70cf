"""The test harness leaves no node process behind when the script that runs it is
told to stop (SIGTERM: a CI timeout, ``kill``, ``timeout(1)``), as it already did
for a normal exit (atexit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from streambus_consensus.testing.harness import wait_until

pytestmark = pytest.mark.cluster

SCRIPT = textwrap.dedent("""
    import sys, time
    from streambus_consensus.testing.harness import LocalCluster
    cluster = LocalCluster(1, sys.argv[1])
    cluster.start()
    print(cluster.pid("n1"), flush=True)
    time.sleep(60)
""")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose; it waits for its (dead) parent's reaper.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_sigterm_to_the_script_stops_its_nodes(tmp_path: Path) -> None:
    script = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    node_pid = 0
    try:
        assert script.stdout is not None
        node_pid = int(script.stdout.readline())
        assert _running(node_pid)
        script.send_signal(signal.SIGTERM)
        assert script.wait(10) != 0
        wait_until(lambda: not _running(node_pid), 10,
                   "the node process to stop with the script that started it")
    finally:
        script.kill()
        script.wait()
        if script.stdout is not None:
            script.stdout.close()
        if node_pid and _running(node_pid):
            os.killpg(node_pid, signal.SIGKILL)
