"""Ray's processes must not outlive `fedlowrank run --runtime flower`, however it ends.

Ray starts its own processes (raylet, GCS, the dashboard and runtime-env agents, the ClientApp
actors); when the driver is killed with SIGKILL some of them (the agents) stay alive. The reaper
is a small watchdog process, started once per driver process: every half second it records the
driver's Ray descendants (by pid and start time), and when the driver is gone it SIGKILLs those
that are still the same processes. Only processes whose command line names Ray are touched.
"""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["start_reaper"]

_WATCH = r"""
import os, signal, sys, time

driver, me = int(sys.argv[1]), os.getpid()


def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), fields[19]  # state, ppid, start time
    except (OSError, IndexError, ValueError):
        return None


def is_ray(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return b"ray::" in cmd or b"/ray/" in cmd or b"raylet" in cmd or b"gcs_server" in cmd


seen = {}
while True:
    s = stat(driver)
    if s is None or s[0] in "ZX":
        break
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = stat(int(d))
            if st is not None:
                parents[int(d)] = st
    family, todo = set(), [driver]
    while todo:
        p = todo.pop()
        for c, st in parents.items():
            if st[1] == p and c not in family and c != me:
                family.add(c)
                todo.append(c)
    for c in family:
        if c not in seen and is_ray(c):
            seen[c] = parents[c][2]
    time.sleep(0.5)
time.sleep(1.0)  # a normal exit: Ray's own shutdown goes first
for pid, start in seen.items():
    st = stat(pid)
    if st is not None and st[2] == start and st[0] not in "ZX":
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""

_started: subprocess.Popen | None = None


def start_reaper() -> None:
    """Start this process's reaper (once; later calls do nothing). Linux only (/proc)."""
    global _started
    if _started is not None and _started.poll() is None:
        return
    if not os.path.isdir("/proc"):
        return
    _started = subprocess.Popen([sys.executable, "-c", _WATCH, str(os.getpid())], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
