"""CPU time per room: which process does which job on the request path, and what each spends.

On 2 shared cores wall-clock ratios mix our overhead with contention for the CPUs; the CPU time
each process spends per request and per streamed token does not. Times come from /proc (utime +
stime of every thread, living or exited, in clock ticks), read only at the two ends of a measured
window, so measuring costs nothing while the load runs.

A room is a named set of processes, found again at each end of the window: a process born inside
it counts from zero; one that ended inside it is named in `exited`, its time since the last read
is lost (HAProxy reloads, a restarted replica).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
IDLE_S = 5.0  # how long the steps measure each room with no traffic, after the load (10 ms ticks: ±2 ms/s)
# ...and how long they wait first: vLLM's CPU worker keeps spinning for a few seconds after its
# last step (here ~200 ms/s in the first 5 s after a load, 6-10 ms/s after this wait).
IDLE_SETTLE_S = 5.0


def _stat(path: str) -> tuple[str, list[str]] | None:
    """(command name, the fields after it) of a /proc stat file; None once the process is gone.
    The name may hold spaces and parentheses: fields are counted after the last ')'."""
    try:
        with open(path) as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()


def _cpu(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime (fields 14 and 15 of stat)


def cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """User + system CPU seconds of a process (all its threads), or of one of its threads."""
    stat = _stat(f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat")
    return None if stat is None else _cpu(stat[1])


def _processes() -> dict[int, tuple[str, list[str]]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(f"/proc/{entry}/stat")) is not None:
            out[int(entry)] = stat
    return out


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command name) for every process now."""
    return {pid: (int(fields[1]), name) for pid, (name, fields) in _processes().items()}


def process_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (command name, CPU seconds so far) for every process now, one read of each."""
    return {pid: (name, _cpu(fields)) for pid, (name, fields) in _processes().items()}


def descendants(root: int, table: dict[int, tuple[int, str]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return sorted(out)


@dataclass
class Meter:
    """CPU seconds per room over a window: `start()`, the load, `stop()`.

    `find` names the processes of each room (pid, or (pid, tid) for one thread); it is called at
    both ends. Rooms in `background` are reported but left out of the path's sum. The meter's own
    work at the two ends is timed (`meter_ms`): it is all the split costs, and none of it falls
    inside the load's measured latencies."""

    find: Callable[[], dict[str, list[int | tuple[int, int]]]]
    background: tuple[str, ...] = ()
    _t0: float = 0.0
    _own_s: float = 0.0
    _before: dict[str, dict] = field(default_factory=dict)

    def start(self) -> None:
        began = time.perf_counter()
        self._before = _read(self.find())
        self._t0 = time.perf_counter()
        self._own_s = self._t0 - began

    def stop(self) -> dict:
        ended = time.perf_counter()
        window = ended - self._t0
        after = _read(self.find())
        cpu, exited, processes, detail = {}, [], {}, {}
        for room in sorted(set(self._before) | set(after)):
            was, now = self._before.get(room, {}), after.get(room, {})
            if not was and not now:
                continue  # e.g. no engine process under a trivial backend
            spent = {key: seconds - was.get(key, 0.0) for key, seconds in now.items()}
            cpu[room] = sum(spent.values())
            exited += [f"{room}:{key}" for key in was if key not in now]
            processes[room] = len(now)
            if len(now) > 1:  # which of a room's processes spent it (where to look first)
                detail[room] = {f"{key} {title(key)}": s for key, s in sorted(spent.items(), key=lambda kv: -kv[1]) if s}
        own_ms = 1000 * (self._own_s + time.perf_counter() - ended)
        return {"cpu_s": cpu, "window_s": window, "background": list(self.background), "exited": exited,
                "processes": processes, "detail": detail, "meter_ms": own_ms}

    def idle(self, seconds: float) -> dict[str, dict]:
        """CPU ms per second of each room (and of each process of a room of several) with no
        traffic: what it spends anyway (Serve's and vLLM's own loops, health checks, metrics),
        which every window under load includes too."""
        self.start()
        time.sleep(seconds)
        out = self.stop()
        rate = 1000 / out["window_s"]
        return {"ms_per_s": {room: s * rate for room, s in out["cpu_s"].items()},
                "detail_ms_per_s": {room: {p: round(s * rate, 1) for p, s in by.items()} for room, by in out["detail"].items()}}


def title(key: int | tuple[int, int]) -> str:
    """A process's command line as `ps` shows it (Ray and vLLM retitle theirs), cut short."""
    pid = key[0] if isinstance(key, tuple) else key
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
    except OSError:
        return "?"


def _read(rooms: dict[str, list[int | tuple[int, int]]]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for room, keys in rooms.items():
        out[room] = {}
        for key in keys:
            t = cpu_seconds(*key) if isinstance(key, tuple) else cpu_seconds(key)
            if t is not None:
                out[room][key] = t
    return out


def per_unit(measured: dict, requests: int, tokens: int, idle_ms_per_s: dict[str, float] | None = None) -> dict:
    """CPU ms per request and µs per streamed token of each room, and of the path's rooms together
    (`sum`: every room not in `background`). Given each room's CPU use with no traffic, also `net`
    of it: what the window's requests cost beyond what the room spends anyway."""
    background = measured.get("background", ())

    def rates(cpu: dict[str, float]) -> dict[str, dict[str, float]]:
        total = {**cpu, "sum": sum(s for room, s in cpu.items() if room not in background)}
        out = {"ms_per_request": {room: 1000 * s / requests for room, s in total.items()} if requests else {}}
        if tokens:
            out["us_per_token"] = {room: 1e6 * s / tokens for room, s in total.items()}
        return out

    cpu = measured["cpu_s"]
    out = {**rates(cpu), "window_s": measured["window_s"], "meter_ms": measured.get("meter_ms"),
           "processes": measured.get("processes", {}), "exited": measured.get("exited", []),
           "detail_ms": {room: {p: round(1000 * s, 1) for p, s in by.items()} for room, by in measured.get("detail", {}).items()}}
    if idle_ms_per_s:
        out["net"] = rates({room: s - idle_ms_per_s.get(room, 0.0) * measured["window_s"] / 1000 for room, s in cpu.items()})
    return out
