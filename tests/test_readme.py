"""The README's metadata snippet and admin CLI examples, and the admin CLI
examples of docs/operations.md, run as written."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from streambus_consensus.testing.harness import LocalCluster, free_ports
from tests.test_cli import ENV, SCRIPT, ok

README = Path(__file__).resolve().parent.parent / "README.md"
OPERATIONS = README.parent / "docs" / "operations.md"


def _block(after_heading: str, language: str, doc: Path = README) -> str:
    """The first fenced ``language`` block after the heading ``after_heading``."""
    text = doc.read_text(encoding="utf-8")
    section = text[text.index(f"## {after_heading}\n"):]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match, f"no {language} block under {after_heading!r}"
    return match.group(1)


def _commands(block: str) -> list[str]:
    """The shell block's commands, continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = line.split("  #", 1)[0].strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


@pytest.mark.cluster
def test_the_metadata_snippet_runs_as_written(tmp_path: Path) -> None:
    raft, api = free_ports(2)
    ok("cluster", "init", "--nodes", f"n1=127.0.0.1:{raft}", "--api", f"n1=127.0.0.1:{api}",
       "--dir", str(tmp_path))
    snippet = _block("The metadata API the broker imports", "python")
    # The names the snippet leaves to the reader, and what it must have done.
    script = textwrap.dedent("""\
        rebuild_from = apply_locally = lambda *args: None
        last_seen_offset = None
        {snippet}
        assert topic.replication_factor == 3 and len(partitions) == 12
        assert len({{p.leader for p in partitions}}) == 3
        print("snippet ok")
        """).format(snippet=snippet)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env=ENV, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "snippet ok"


@pytest.mark.cluster
def test_the_admin_cli_examples_run_as_written(tmp_path: Path) -> None:
    block = _block("The admin CLI", "sh")
    commands = _commands(block)
    exports = [c for c in commands if c.startswith("export ")]
    assert [e.split("=")[0] for e in exports] == ["export STREAMBUS_CONSENSUS_API",
                                                  "export STREAMBUS_CONSENSUS_SECRET_FILE"]
    local = LocalCluster(3, tmp_path / "cluster", app="metadata")
    try:
        local.start()
        local.wait_for_leader()
        secret = local.base_dir / "cluster.secret"
        # The example cluster's addresses and secret, swapped for this cluster's.
        env = {**ENV, "STREAMBUS_CONSENSUS_API": ",".join(
                   n.api_address for n in local.nodes.values()),
               "STREAMBUS_CONSENSUS_SECRET_FILE": str(secret)}
        assert secret.exists()
        ran = 0
        for command in commands:
            if command.startswith("export "):
                continue
            assert command.startswith("streambus-consensus "), command
            argv = shlex.split(command.replace("streambus-consensus", shlex.quote(SCRIPT), 1))
            if "|" in argv:  # a pipe, as a shell runs it
                result = subprocess.run(command.replace("streambus-consensus", SCRIPT, 1),
                                        shell=True, capture_output=True, text=True,
                                        timeout=60, env=env, check=False)
            else:
                result = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                        env=env, check=False)
            assert result.returncode == 0, (command, result.stderr)
            assert result.stderr == "", (command, result.stderr)
            ran += 1
        assert ran >= 10
    finally:
        local.close()


@pytest.mark.cluster
def test_the_operations_admin_cli_examples_run_in_order(tmp_path: Path) -> None:
    """docs/operations.md's admin CLI block, top to bottom, on a three-node
    cluster: the plain form of each ``[--option]``, the ``--every`` loop in the
    background, as the guide says. (It used to create topics before any broker
    was active, and delete ``orders`` before growing, electing and
    reassigning it.)"""
    commands = _commands(_block("The admin CLI", "sh", OPERATIONS))
    local = LocalCluster(3, tmp_path / "cluster", app="metadata")
    loop: subprocess.Popen[str] | None = None
    try:
        local.start()
        local.wait_for_leader()
        env = {**ENV, "STREAMBUS_CONSENSUS_API": ",".join(
                   n.api_address for n in local.nodes.values()),
               "STREAMBUS_CONSENSUS_SECRET_FILE": str(local.secret_file)}
        (tmp_path / "names.txt").write_text("d\n# comment\ne\nf\n", encoding="utf-8")
        ran = []
        for command in commands:
            if command.startswith("export "):
                continue
            assert command.startswith("streambus-consensus "), command
            if command.startswith("streambus-consensus members add n4 10.0.0.4"):
                continue  # a placeholder host (tests/test_membership.py adds real nodes)
            plain = re.sub(r"\s*\[[^]]*\]", "", command)
            argv = [SCRIPT, *shlex.split(plain)[1:]]
            if "--every" in argv:
                loop = subprocess.Popen(argv, cwd=tmp_path, env=env, text=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                continue
            result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True,
                                    timeout=60, env=env, check=False)
            assert (result.returncode, result.stderr) == (0, ""), (plain, result.stderr)
            ran.append(plain)
            if plain.endswith("members remove n2"):
                local.stop("n2")  # as the guide says: stop the removed node
        assert loop is not None and loop.poll() is None, "the --every loop stopped"
        assert len(ran) >= 20, ran
    finally:
        if loop is not None:
            loop.send_signal(signal.SIGINT)
            loop.communicate(timeout=10)
        local.close()
