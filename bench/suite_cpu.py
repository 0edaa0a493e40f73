"""Where a long command's time goes on this machine: run it, sample /proc every 2 s, and print the
wall time, how busy the cores were, and CPU seconds by process name. Made for `make test`, whose
length on 2 cores is set by CPU work, not by waiting (README, "How long, and why"):

    .venv/bin/python -m bench.suite_cpu -- make test

A process that starts and ends between two samples is not seen, and one that ends loses its time
since the last sample: the names' sum is a lower bound; the busy share (from /proc/stat) is exact.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time

from bench.rooms import process_cpu

PERIOD_S = 2.0


def machine_ticks() -> tuple[int, int]:
    """(all ticks, idle ticks) of every core since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]  # idle + iowait


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    command = [c for c in parser.parse_args().command if c != "--"]
    if not command:
        parser.error("name a command after --")
    start, (total0, idle0) = time.time(), machine_ticks()
    seen, by_name = process_cpu(), collections.Counter()
    child = subprocess.Popen(command)
    while child.poll() is None:
        time.sleep(PERIOD_S)
        now = process_cpu()
        for pid, (name, cpu) in now.items():  # a new process counts from its birth; a renamed one
            by_name[name] += max(0.0, cpu - seen[pid][1]) if pid in seen else cpu  # (vLLM's workers) under its new name
        seen.update(now)
    total1, idle1 = machine_ticks()
    wall = time.time() - start
    busy = 1 - (idle1 - idle0) / max(1, total1 - total0)
    cores = os.cpu_count() or 1
    print(f"\n[suite_cpu] {wall:.0f} s wall, {cores} cores {busy:.0%} busy: {busy * cores * wall:.0f} CPU-s, "
          f"at least {busy * wall:.0f} s even if packed perfectly", file=sys.stderr)
    for name, cpu in [(n, c) for n, c in by_name.most_common(12) if c >= 0.5]:
        print(f"[suite_cpu]   {name:<20} {cpu:7.0f} CPU-s", file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    raise SystemExit(main())
