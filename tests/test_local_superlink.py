"""The private simulation SuperLink behind `fedlowrank run --runtime flower` (Flower's supported
`flower-superlink --simulation` + `flwr run` path): the app it submits declares every run config
key, a log stream that ends before the run does is followed again (each line once), a failed
run is an error with its last lines, and nothing it started outlives it."""

import os
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from fedlowrank.flower.common import FlowerRunOptions
from fedlowrank.flower.local_superlink import FlowerEngineError, LocalSuperLink, write_app

REPO = Path(__file__).resolve().parents[1]


def _keys() -> dict:
    return {f.name.replace("_", "-"): f.default for f in fields(FlowerRunOptions)}


def test_the_submitted_app_and_the_repository_app_declare_every_run_config_key(tmp_path):
    """Flower drops run config overrides for keys an app does not declare: both apps declare all
    of FlowerRunOptions with its defaults, and name components that exist."""
    import importlib

    made = tomllib.loads((write_app(tmp_path / "app") / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    repo = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    for app in (made, repo):
        assert app["config"] == _keys()
        assert app["components"] == made["components"]
    for ref in made["components"].values():
        module, name = ref.split(":")
        assert getattr(importlib.import_module(module), name) is not None
    assert made["fab-include"] == ["pyproject.toml"]  # the code is the installed package


FAKE_FLWR = r"""#!{python}
# a stand-in for the `flwr` CLI: `run` streams two log lines and stops early, `ls` says running
# once and then finished, `log` streams the whole log from its start
import json, pathlib, sys
state = pathlib.Path({state!r})
log = ["INFO fedlowrank.flower: line 1", "INFO fedlowrank.flower: line 2", "INFO fedlowrank.flower: line 3"]
cmd = sys.argv[1]
if cmd == "run":
    print("Successfully started run 42")
    print("INFO :      Starting logstream for run_id `42`")
    print("\n".join(log[:2]), flush=True)
    if {final!r} == "hang":  # the ServerApp said it is done; Flower takes its time to shut down
        print("DONE", flush=True)
        import time
        time.sleep(60)
elif cmd == "ls":
    n = int(state.read_text()) if state.exists() else 0
    state.write_text(str(n + 1))
    status = {final!r} if n >= 1 else "running"
    print(json.dumps({{"success": True, "runs": [{{"run-id": "42", "status": status}}]}}))
elif cmd == "log":
    print("INFO :      Starting logstream for run_id `42`")
    print("\n".join(log))
"""


def _fake_link(tmp_path, monkeypatch, final: str) -> LocalSuperLink:
    import fedlowrank.flower.local_superlink as ls

    flwr = tmp_path / "flwr"
    flwr.write_text(FAKE_FLWR.format(python=sys.executable, state=str(tmp_path / "ls-calls"), final=final))
    flwr.chmod(0o755)
    link = tmp_path / "flower-superlink"
    link.write_text("#!/bin/sh\nexec sleep 60\n")
    link.chmod(0o755)
    monkeypatch.setattr(ls, "_executable", lambda name: str(tmp_path / name))
    return LocalSuperLink()


def test_a_log_stream_that_ends_before_the_run_is_followed_again_and_each_line_echoed_once(tmp_path, monkeypatch):
    with _fake_link(tmp_path, monkeypatch, "finished:completed") as link:
        link._up = True  # the fake SuperLink has no HTTP API
        echoed: list[str] = []
        lines = link.submit({"config": "digits-all"}, {"num-supernodes": 2}, echoed.append)
        sleeper = link._proc
    assert echoed == [f"INFO fedlowrank.flower: line {i}" for i in (1, 2, 3)]
    assert lines[0] == "Successfully started run 42" and lines.count("INFO fedlowrank.flower: line 1") == 1
    assert (tmp_path / "ls-calls").read_text() == "2"  # asked until it said finished
    assert sleeper.poll() is not None  # the SuperLink was stopped on leaving the block


def test_a_run_that_finished_failed_is_an_error_with_its_last_lines(tmp_path, monkeypatch):
    with _fake_link(tmp_path, monkeypatch, "finished:failed") as link:
        link._up = True
        with pytest.raises(FlowerEngineError, match=r"(?s)run 42 ended finished:failed.*line 3"):
            link.submit({"config": "digits-all"}, {"num-supernodes": 2}, lambda line: None)


def test_a_done_line_returns_at_once_without_waiting_for_flower_to_shut_down(tmp_path, monkeypatch):
    import time

    with _fake_link(tmp_path, monkeypatch, "hang") as link:
        link._up = True
        t0 = time.monotonic()
        lines = link.submit({"config": "digits-all"}, {"num-supernodes": 2}, lambda line: None, done=lambda l: l == "DONE")
        assert time.monotonic() - t0 < 20 and lines[-1] == "DONE"
    assert not (tmp_path / "ls-calls").exists()  # no status asked: the ServerApp said it finished


@pytest.mark.slow
def test_a_server_app_that_fails_on_the_real_superlink_is_an_error_and_leaves_no_process(tmp_path):
    """A run config the ServerApp refuses (checked there, as on a real deployment): the run
    finishes failed, the error carries the ServerApp's message, and every Flower and Ray
    process started for it is gone when the block is left."""
    from test_flower_deployment import alive, descendants

    before = descendants(os.getpid())
    with LocalSuperLink() as link:
        with pytest.raises(FlowerEngineError, match="no-such-preset"):
            link.submit({"config": "no-such-preset", "out-dir": str(tmp_path / "run")}, {"num-supernodes": 2},
                        lambda line: None)  # fmt: skip
        started = descendants(os.getpid()) - before
        home = link.home
    assert started, "the SuperLink ran in a child process"
    assert not [p for p in started if alive(p)], "processes of the SuperLink outlived it"
    assert not home.exists()  # its FLWR_HOME was a temporary folder
    assert not (tmp_path / "run").exists()


SPAWNER = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ignores the polite stop, like a busy Ray worker
log = open(sys.argv[1], "a")
if os.fork() == 0:  # a child in a session of its own, which keeps starting sessions of their own
    os.setsid()
    while True:
        c = subprocess.Popen(["sleep", "60"], start_new_session=True)
        log.write(f"{c.pid}\\n"); log.flush()
        time.sleep(0.01)
time.sleep(60)
"""


def test_stop_process_tree_leaves_nothing_running_even_what_was_started_while_it_stopped(tmp_path):
    """A tree that ignores SIGTERM and keeps starting processes in new sessions (which neither
    the process group nor a walk taken before the stop would see): every process it ever
    started is gone when stop_process_tree returns."""
    import subprocess
    import time

    from test_flower_deployment import alive

    from fedlowrank.flower.local_superlink import stop_process_tree

    pids = tmp_path / "pids"
    p = subprocess.Popen([sys.executable, "-c", SPAWNER, str(pids)], start_new_session=True)
    deadline = time.monotonic() + 30
    while not pids.exists() or len(pids.read_text().split()) < 5:
        assert time.monotonic() < deadline, "the spawner did not start"
        time.sleep(0.05)
    t0 = time.monotonic()
    stop_process_tree(p, grace=0.3)
    assert time.monotonic() - t0 < 10
    started = [int(x) for x in pids.read_text().split()]
    assert len(started) >= 5 and p.poll() is not None
    assert not [pid for pid in started if alive(pid)], "a process it started is still running"
