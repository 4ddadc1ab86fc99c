"""A private simulation SuperLink: how `fedlowrank run --runtime flower` starts Flower's
simulation engine through Flower's supported API (`flower-superlink --simulation` and `flwr run`;
the in-Python `flwr.simulation.run_simulation` is deprecated in flwr 1.41).

`LocalSuperLink` starts `flower-superlink --simulation` on a free loopback port with its own
FLWR_HOME in a temporary folder (the user's ~/.flwr is neither read nor written), its SQLite
database in that folder too (flwr 1.41's in-memory database fails runs at random: "cannot start
a transaction within a transaction"), and runtime dependency installation off (there is no
network; the ServerApp and ClientApp are the installed fedlowrank). The SuperLink starts in the
background (about 3 s) while the caller goes on; `submit` waits for it, then runs one Flower App
run on it with `flwr run ... --stream` and returns when the run has ended. Leaving the `with`
block stops the SuperLink and every process below it (`stop_process_tree`) and deletes the
folder.

The Flower App submitted is `write_app`'s: a folder holding only a pyproject.toml that names our
ServerApp and ClientApp and declares every run config key of `FlowerRunOptions` with its default
(Flower ignores run config overrides for keys the app does not declare). Its FAB is under 1 KB
and builds at once; building the repository itself as a FAB walks every file below it (12 s
here, with the virtual environment inside).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedlowrank.runconfig import dump_toml

__all__ = ["LocalSuperLink", "write_app", "FlowerEngineError", "stop_process_tree", "process_alive"]

STARTUP_TIMEOUT = 120.0  # seconds for the SuperLink's HTTP API to answer (about 3 s on 2 idle cores)


class FlowerEngineError(RuntimeError):
    """The SuperLink or `flwr run` did not start or ended badly; the message has their last lines."""


def _executable(name: str) -> str:
    """A Flower console script, from this interpreter's environment first."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        raise FlowerEngineError(f"{name!r} not found beside {sys.executable} or on PATH; is flwr installed?")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_app(folder: Path) -> Path:
    """A Flower App folder for `flwr run`: pyproject.toml only (see the module docstring)."""
    from fedlowrank.flower.common import FlowerRunOptions

    defaults = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(FlowerRunOptions)}
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedlowrank-app", "version": "0.1.0", "license": "Apache-2.0", "dependencies": [],
                    "description": "fedlowrank's Flower ServerApp and ClientApp"},  # fmt: skip
        "tool": {"flwr": {"app": {"publisher": "fedlowrank", "fab-include": ["pyproject.toml"],
                                  "components": {"serverapp": "fedlowrank.flower.server_app:app",
                                                 "clientapp": "fedlowrank.flower.client_app:app"},
                                  "config": defaults}}},  # fmt: skip
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(dump_toml(project))
    return folder


class LocalSuperLink:
    """`with LocalSuperLink() as link: link.submit(...)`; see the module docstring."""

    def __init__(self) -> None:
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._proc: subprocess.Popen | None = None
        self.address = ""

    # --- the SuperLink ------------------------------------------------------------------------
    def __enter__(self) -> "LocalSuperLink":
        self._tmp = tempfile.TemporaryDirectory(prefix="fedlowrank-flower-")
        self.home = Path(self._tmp.name) / "flwr-home"
        self.home.mkdir()
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        (self.home / "config.toml").write_text(
            dump_toml({"superlink": {"default": "local", "local": {"address": self.address, "insecure": True}}})
        )
        self.log_path = Path(self._tmp.name) / "superlink.log"
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1",  # offline: no update check
                    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # no GPUs: keep Ray's notice about them quiet
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
        command = [_executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                   "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
                   "--database", str(Path(self._tmp.name) / "state.db")]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(command, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self._up = False  # it starts while the caller goes on; `submit` waits for it
        return self

    def _wait_until_up(self) -> None:
        if self._up:
            return
        import httpx

        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise FlowerEngineError(f"flower-superlink exited with code {self._proc.returncode}:\n{self._log_tail()}")
            try:
                if httpx.get(f"http://{self.address}/health", timeout=1.0).is_success:
                    self._up = True
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise FlowerEngineError(f"flower-superlink did not answer within {STARTUP_TIMEOUT:g} s:\n{self._log_tail()}")
            time.sleep(0.1)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __exit__(self, *exc: Any) -> None:
        p, self._proc = self._proc, None
        if p is not None:  # nothing of it is kept (its state is a temporary folder): no grace needed
            stop_process_tree(p, grace=0.2)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # --- runs ---------------------------------------------------------------------------------
    def submit(self, run_config: Mapping[str, Any], federation: Mapping[str, Any], echo: Callable[[str], None],
               done: Callable[[str], bool] | None = None) -> list[str]:  # fmt: skip
        """Run our Flower App with `run_config` (Flower run config keys) on `federation` (Flower
        simulation config keys, e.g. num-supernodes) and wait until the run has finished; each
        line of its log goes to `echo` as it comes. Returns every line printed.
        FlowerEngineError (with the last lines) unless the run finished as completed. A log line
        for which `done` is true says the ServerApp's work is complete: `submit` returns at once,
        without waiting for Flower to shut its simulation down (the caller then stops it).

        The end of `flwr run --stream` is not taken for the end of the run: the log stream has
        been seen to end seconds into a run, so the run's status is asked (`flwr ls`) and the
        log followed again (`flwr log --stream`) until it says finished."""
        if self._proc is None:
            raise RuntimeError("the SuperLink is not running: use `with LocalSuperLink() as link`")
        self._wait_until_up()
        tmp = Path(self._tmp.name)
        app = write_app(tmp / "app")
        config = tmp / "run-config.toml"  # a TOML file: values keep their types, strings need no quoting
        config.write_text(dump_toml(dict(run_config)))
        fed = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in federation.items())
        flwr = _executable("flwr")
        lines: list[str] = []
        seen = 0  # lines of the run's log echoed so far (a new log stream starts from the first)
        complete = False  # a line said `done`

        def follow(command: list[str]) -> int:
            nonlocal seen, complete
            run = subprocess.Popen(command, env=self.env, cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)  # fmt: skip
            in_log = 0  # lines of the run's log in this stream
            in_stream = False  # past the CLI's own lines
            try:
                for line in run.stdout:
                    line = line.rstrip("\n")
                    if not in_stream:
                        in_stream = "Starting logstream" in line
                        lines.append(line)
                        continue
                    in_log += 1
                    if in_log > seen:
                        seen = in_log
                        lines.append(line)
                        echo(line)
                        if done is not None and done(line):
                            complete = True
                            return 0
                run.wait()
            finally:
                stop_process_tree(run)
            return run.returncode

        rc = follow([flwr, "run", str(app), "local", "--stream", "--run-config", str(config), "--federation-config", fed])
        started = [m for line in lines if (m := re.search(r"started run (\d+)", line))]
        if rc != 0 or not started:
            raise FlowerEngineError(f"`flwr run` exited with code {rc}:\n{self._tail(lines)}")
        run_id = started[0].group(1)
        while not complete and (status := self._status(run_id)) is not None and not status.startswith("finished"):
            time.sleep(1.0)  # the log stream ended before the run did: follow it again
            follow([flwr, "log", run_id, "local", "--stream"])
        if complete:
            return lines
        if status != "finished:completed":
            raise FlowerEngineError(f"Flower run {run_id} ended {status or 'with the SuperLink gone'}:\n{self._tail(lines)}")
        return lines

    def _status(self, run_id: str) -> str | None:
        """The run's status as `flwr ls` says it ("running", "finished:completed", ...); None
        when the SuperLink is gone."""
        for _ in range(3):
            if self._proc is None or self._proc.poll() is not None:
                return None
            got = subprocess.run([_executable("flwr"), "ls", "local", "--run-id", run_id, "--format", "json"], env=self.env,
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")  # fmt: skip
            try:
                return json.loads(got.stdout)["runs"][0]["status"]
            except (ValueError, KeyError, IndexError, TypeError):
                time.sleep(1.0)
        raise FlowerEngineError(f"`flwr ls` could not say the status of run {run_id}:\n{got.stdout[-2000:]}{got.stderr[-2000:]}")

    def _tail(self, lines: list[str]) -> str:
        return "\n".join(lines[-30:]) + f"\n(the SuperLink's last lines:)\n{self._log_tail()}"


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process, None if there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[1]), fields[19]) if fields[0] not in "ZX" else None


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not); from /proc, or by signal 0 without it."""
    if os.path.isdir("/proc"):
        return _stat(pid) is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _descendants(*roots: int) -> dict[int, str]:
    """{pid: start time} of every process below the `roots` (Linux /proc; empty elsewhere).
    Flower's SuperExec starts its own session, so a process group does not hold all of a
    SuperLink's processes."""
    stats = {}
    for d in Path("/proc").iterdir() if os.path.isdir("/proc") else ():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None:
            stats[int(d.name)] = st
    found: dict[int, str] = {}
    todo = list(roots)
    while todo:
        parent = todo.pop()
        for c, (pp, start) in stats.items():
            if pp == parent and c not in found:
                found[c] = start
                todo.append(c)
    return found


def stop_process_tree(p: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop `p`, its process group and every process below it: SIGTERM to the group, `grace` s,
    then SIGKILL to whatever is left. Returns once none of them runs (at most about 5 s after the
    SIGKILL), so a caller that checks finds none.

    Before the SIGKILL every process left is frozen (SIGSTOP) and the tree is walked again below
    each, until a walk finds nothing new: a frozen process cannot start another one, so none
    started late (Ray and Flower start theirs in sessions of their own) escapes. A process is
    signalled only while it is the same one (its start time is checked)."""
    own = _stat(p.pid)
    family = {**({p.pid: own[1]} if own else {}), **_descendants(p.pid)}  # listed first: p's orphans belong to init
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass

    def live() -> list[int]:
        return [pid for pid, start in family.items() if (st := _stat(pid)) is not None and st[1] == start]

    while True:
        left = live()
        for pid in left:
            _signal(pid, signal.SIGSTOP)
        late = {pid: start for pid, start in _descendants(*left).items() if pid not in family}
        if not late:
            break
        family.update(late)
    for pid in left:
        _signal(pid, signal.SIGKILL)
    try:  # whatever else is left in its group
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 5.0
    while (p.poll() is None or live()) and time.monotonic() < deadline:  # p reaped here, the others by their parents
        time.sleep(0.02)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
