#!/usr/bin/env bash
# What the GPU test machine runs, from the repository root, with its own python3 (no venv, no
# registry; it has torch, transformers, sentence-transformers and pytest, and no Ray, vLLM or
# pydantic): the engine layer of the GPU suite, then the GPU rerank rows. Logs go to $OUT.
#   bash scripts/gpu_check.sh
# Without CUDA it still runs end to end: the GPU tests skip and the bench checks itself on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1

{
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import platform, torch, transformers, sentence_transformers as st
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      "transformers", transformers.__version__, "sentence-transformers", st.__version__)'
} 2>&1 | tee "$OUT/env.txt"

echo "[gpu-check] engine layer: $PY -m pytest -m gpu tests/gpu" | tee "$OUT/gpu-tests.txt"
"$PY" -m pytest -m gpu tests/gpu -p no:cacheprovider -q -rs 2>&1 | tee -a "$OUT/gpu-tests.txt"
tests=${PIPESTATUS[0]}

echo "[gpu-check] rerank rows: $PY bench/gpu_rerank.py" | tee "$OUT/gpu-rerank.txt"
"$PY" bench/gpu_rerank.py 2>&1 | tee -a "$OUT/gpu-rerank.txt"
bench=${PIPESTATUS[0]}

echo "[gpu-check] tests rc=$tests, bench rc=$bench; logs in $OUT/"
exit $(( tests != 0 || bench != 0 ))
