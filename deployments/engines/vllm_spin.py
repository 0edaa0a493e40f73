"""How long vLLM's processes busy-poll after a message before they sleep (`engine_idle_spin_s`).

vLLM 0.32's multiprocessing executor (the only one vLLM allows on CPU, and TP > 1 on GPU) hands
each engine step to its worker through a shared-memory ring, and the reader of that ring spins
for 1 s after every message (shm_broadcast.SpinCondition, `busy_loop_s=1`, no setting) before it
waits on a socket. Measured on a 2-core CPU (docs/benchmarks.md, bench/vllm_spin.py): a
one-token request every 2 s, a replica's deep health probe, kept its worker at ~55% of a core
idle; capped at 0.02 s it drops to ~5%, and eight streams of 64 tokens take the same time (SmolLM2's
steps come far closer than 0.02 s). Every core-second spun is taken from the forward passes of
the node's other replicas.

vLLM spawns its engine core and workers, so a patch in the replica's process would not reach
them; vLLM loads the `vllm.general_plugins` entry points (pyproject.toml) in each process it
starts, and this plugin caps the spin there when the replica's environment names a value
(serve_app/app.py puts the model's `engine_idle_spin_s` there). Without the variable it does
nothing: vLLM's own 1 s.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os

ENV = "SERVE_APP_VLLM_IDLE_SPIN_S"
logger = logging.getLogger(__name__)


def register() -> None:
    """vLLM's general-plugin hook: cap the readers' spin in this process (idempotent)."""
    raw = os.environ.get(ENV)
    if not raw:
        return
    try:
        seconds = float(raw)
    except ValueError:
        logger.warning("%s=%r is not a number of seconds; vLLM keeps its own spin", ENV, raw)
        return
    try:  # vLLM calls plugins unguarded: a failure here would stop every engine from starting
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        shm_broadcast = None
    cap_spin(getattr(shm_broadcast, "SpinCondition", None), seconds)


def cap_spin(cls: type | None, seconds: float) -> bool:
    """Readers made by `cls` spin at most `seconds` (and never more than vLLM asks). False, with a
    warning, where this vLLM has no such knob: a version that changed it keeps its own behaviour."""
    if cls is None or "busy_loop_s" not in inspect.signature(cls.__init__).parameters:
        logger.warning("this vLLM has no SpinCondition(busy_loop_s); %s is ignored", ENV)
        return False
    original = getattr(cls.__init__, "__serve_app_original__", cls.__init__)
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(*args, **kwargs) -> None:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        bound.arguments["busy_loop_s"] = min(bound.arguments["busy_loop_s"], seconds)
        original(*bound.args, **bound.kwargs)

    __init__.__serve_app_original__ = original  # type: ignore[attr-defined]
    cls.__init__ = __init__
    return True
