"""Flower's and Ray's processes must not outlive `fedlowrank run --runtime flower`, however it ends.

The run starts a SuperLink, which starts Flower's SuperExec and simulation process, which starts
Ray's (raylet, GCS, the dashboard and runtime-env agents, the ClientApp actors), and `flwr run`;
when the driver is killed with SIGKILL they stay alive (SuperExec starts its own session, so
not even a process group holds them all). The reaper is a small watchdog process, started once
per driver process: every half second it records the driver's Flower and Ray descendants (by pid
and start time), and when the driver is gone it SIGKILLs those that are still the same
processes. Only processes whose command line names Flower or Ray are touched.
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


MARKS = (b"ray::", b"/ray/", b"raylet", b"gcs_server", b"flower-superlink", b"flower-superexec", b"flwr-simulation",
         b"flwr-serverapp", b"flwr-clientapp", b"bin/flwr\0")


def ours(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return any(m in cmd for m in MARKS)


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
        if c not in seen and ours(c):
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
