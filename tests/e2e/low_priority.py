"""Some Serve apps' processes in a CPU cgroup of low weight while other tests run.

The e2e session deploys the apps several modules share when it starts, beside the modules that use
none of them (tests/e2e/conftest.py). Their start-up is ~200 s of CPU on the 2-core machine (four
vLLM engines, each three processes that import vLLM), and once up their idle loops take ~0.35 of a
core. In a cgroup of weight 64 (against 1,024 for the session's own) all of them together get ~6%
of the cores while the running tests want both, and what those leave idle.

Not niceness: Ray starts every worker at nice 15 already (its driver and daemons stay at 0), and a
weight per thread cannot hold back twenty processes that import vLLM at once. The cgroup is the
cgroup-v1 `cpu` controller's (this machine's and CI's, as root); where it cannot be made, nothing is
moved: the apps start at Ray's usual priority, sharing the cores with the first modules' tests (the
suite takes longer, and those tests run on a busier machine). The group is named after this process
(`serve-e2e-background-<pid>`); a session killed outright leaves it behind, empty.

A replica's process is found among this process's descendants (the Ray cluster the session
started; another session's are not) by the title Ray gives it (`ray::ServeReplica:<app>:<deployment>`),
and with it every process it spawned (vLLM's engine core and workers); a process forked later stays
in its parent's cgroup.
"""

from __future__ import annotations

import os
import pathlib
import threading

from bench.rooms import descendants, process_table, title

CPU_CGROUP = pathlib.Path("/sys/fs/cgroup/cpu")  # cgroup v1's cpu controller
SHARES = 64  # of the 1,024 the session's autogroup weighs


def cpu_cgroup_of(pid: int | str = "self") -> str:
    """A process's group under the cpu controller (mounted alone or as cpu,cpuacct), as a path from
    its root; `pid` may be "self" or "<pid>/task/<tid>" for one thread."""
    with open(f"/proc/{pid}/cgroup") as f:
        return next((line.rstrip("\n").split(":", 2)[2] for line in f if "cpu" in line.split(":")[1].split(",")), "/")


def _app_of(pid: int) -> str | None:
    parts = title(pid).split(" ", 1)[0].split(":")  # ray::ServeReplica:<app>:<deployment>
    return parts[3] if len(parts) >= 5 and parts[2] == "ServeReplica" else None


def _move(group: pathlib.Path, pid: int) -> None:
    """Every thread of `pid` into `group` (cgroup.procs moves the whole process)."""
    try:
        (group / "cgroup.procs").write_text(str(pid))
    except OSError:
        pass  # it ended


class LowPriority:
    """Sweeps every `period_s` until `restore()`, which puts the processes back into this
    process's own group (where they came from: Ray's processes descend from the session's) and
    removes the cgroup, made inside that group. `group` is None where no cgroup could be made
    (nothing is moved)."""

    def __init__(self, apps: set[str], period_s: float = 2.0) -> None:
        self.apps, self.period_s, self.root = set(apps), period_s, CPU_CGROUP / cpu_cgroup_of().lstrip("/")
        self.group = self._make_group()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="low-priority-apps", daemon=True)
        if self.group is not None:
            self._thread.start()

    def _make_group(self) -> pathlib.Path | None:
        group = self.root / f"serve-e2e-background-{os.getpid()}"
        try:
            group.mkdir(exist_ok=True)
        except OSError:
            return None
        try:
            (group / "cpu.shares").write_text(str(SHARES))
        except OSError:
            group.rmdir()
            return None
        return group

    def pids(self) -> list[int]:
        table = process_table()
        ours = descendants(os.getpid(), table)
        roots = [pid for pid in ours if table[pid][1].startswith("ray::ServeRepl") and _app_of(pid) in self.apps]
        return sorted({p for root in roots for p in (root, *descendants(root, table))})

    def _run(self) -> None:
        while not self._stop.is_set():
            moved = set(self.members())
            for pid in self.pids():
                if pid not in moved:
                    _move(self.group, pid)
            self._stop.wait(self.period_s)

    def members(self) -> list[int]:
        if self.group is None:
            return []
        try:
            return [int(p) for p in (self.group / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def restore(self) -> None:
        if self.group is None or self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        for pid in self.members():
            _move(self.root, pid)
        try:
            self.group.rmdir()
        except OSError:
            pass
