"""The PySyncObj internals the adapter relies on are checked when it is imported."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.transport import Transport

from streambus_consensus.errors import EngineCompatibilityError
from streambus_consensus.raft import engine

ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_engine_passes_the_check() -> None:
    engine.check_engine_seam()


def test_pysyncobj_is_pinned_to_the_checked_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"pysyncobj=={engine._TESTED_PYSYNCOBJ}" in project["dependencies"]


def test_a_missing_private_method_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(SyncObj, "_SyncObj__changeCluster")
    with pytest.raises(EngineCompatibilityError, match=r"SyncObj\._SyncObj__changeCluster.*"
                       r"one membership change at a time.*pysyncobj==0\.3\.17"):
        engine.check_engine_seam()


def test_a_missing_journal_hook_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(engine._syncobj_module, "createJournal")
    with pytest.raises(EngineCompatibilityError, match="createJournal"):
        engine.check_engine_seam()


def _edit_source(monkeypatch: pytest.MonkeyPatch, function: object, old: str, new: str) -> None:
    """Make ``inspect.getsource(function)`` answer as if PySyncObj renamed ``old``."""
    real = inspect.getsource
    edited = real(function).replace(old, new)  # type: ignore[arg-type]
    assert edited != real(function)  # type: ignore[arg-type]
    monkeypatch.setattr(inspect, "getsource",
                        lambda obj: edited if obj is function else real(obj))


def test_a_renamed_message_field_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _edit_source(monkeypatch, SyncObj._SyncObj__onMessageReceived,
                 "message['reset']", "message['rewind']")
    with pytest.raises(EngineCompatibilityError, match=r"message\['reset'\]"):
        engine.check_engine_seam()


def test_a_missing_status_key_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _edit_source(monkeypatch, SyncObj.getStatus, "'match_idx_server_'", "'match_index_'")
    with pytest.raises(EngineCompatibilityError, match="match_idx_server_"):
        engine.check_engine_seam()


def test_a_missing_transport_hook_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(Transport, "_onNodeConnected")
    with pytest.raises(EngineCompatibilityError, match=r"Transport\._onNodeConnected"):
        engine.check_engine_seam()


def test_a_misspelled_conf_option_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_CONF_OPTIONS", (*engine._CONF_OPTIONS, "raftMaxTimout"))
    with pytest.raises(EngineCompatibilityError, match="raftMaxTimout"):
        engine.check_engine_seam()
    assert not hasattr(SyncObjConf(raftMaxTimout=1), "raftMaxTimout")  # silently ignored


def test_the_check_lists_every_option_the_engine_passes() -> None:
    tree = ast.parse(inspect.getsource(engine.Engine.__init__).lstrip().replace("\n    ", "\n"))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Name) and node.func.id == "SyncObjConf"]
    assert len(calls) == 1
    passed = {keyword.arg for keyword in calls[0].keywords}
    assert passed == set(engine._CONF_OPTIONS)


def test_importing_the_adapter_fails_when_an_internal_is_gone() -> None:
    code = ("import pysyncobj.syncobj as s\n"
            "del s.SyncObj._SyncObj__generateRaftTimeout\n"
            "import streambus_consensus.raft.engine\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode != 0
    assert "EngineCompatibilityError" in done.stderr
    assert "SyncObj._SyncObj__generateRaftTimeout" in done.stderr
    assert "E11" in done.stderr
