"""tests/e2e/low_priority.py on real processes: a process titled as Ray titles a Serve replica of
a listed app, with its child, goes into the low-weight CPU cgroup and back out; another app's does
not; the cgroup is removed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.e2e.low_priority import CPU_CGROUP, SHARES, LowPriority, cpu_cgroup_of

# Titled like a replica (argv[0] as Ray's setproctitle leaves it, comm truncated to 15 bytes as the
# kernel keeps it), with a second thread and a child process. (Under another argv[0] Python does
# not know its own executable: the child's is passed in.)
REPLICA = """
import subprocess, sys, threading, time
open('/proc/self/comm', 'w').write('ray::ServeReplica')
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
child = subprocess.Popen([PYTHON, '-c', 'import time; time.sleep(60)'])
print(child.pid, flush=True)
time.sleep(60)
"""


def _replica(app: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(["bash", "-c", f'exec -a "ray::ServeReplica:{app}:router" "$0" -c "$1"', sys.executable,
                             f"PYTHON = {sys.executable!r}\n{REPLICA}"],
                            stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


@pytest.mark.skipif(not os.access(CPU_CGROUP, os.W_OK), reason="no writable cgroup-v1 cpu controller here")
def test_a_listed_apps_replica_and_its_child_go_into_the_low_weight_cgroup_and_back():
    (ours, child), (theirs, other_child) = _replica("shared-app"), _replica("other")
    home = cpu_cgroup_of("self")
    low = LowPriority({"shared-app"}, period_s=0.1)
    try:
        name = f"{home.rstrip('/')}/{low.group.name}"
        assert (low.group / "cpu.shares").read_text().strip() == str(SHARES)
        deadline = time.time() + 10
        while time.time() < deadline and not (cpu_cgroup_of(ours.pid) == cpu_cgroup_of(child) == name):
            time.sleep(0.1)
        assert cpu_cgroup_of(ours.pid) == cpu_cgroup_of(child) == name
        threads = os.listdir(f"/proc/{ours.pid}/task")
        assert len(threads) >= 2 and {cpu_cgroup_of(f"{ours.pid}/task/{t}") for t in threads} == {name}
        assert cpu_cgroup_of(theirs.pid) == cpu_cgroup_of(other_child) == home
        low.restore()
        assert cpu_cgroup_of(ours.pid) == cpu_cgroup_of(child) == home and not low.group.exists()
    finally:
        low.restore()
        for proc, kid in ((ours, child), (theirs, other_child)):
            os.kill(kid, 9)
            proc.kill()
            proc.wait()
