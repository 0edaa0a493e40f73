# The README's two commands: `make up` (whole stack on the embedded default) and `make test`.
# Both install what they need themselves (scripts/install.sh is idempotent and cached).
PY     := .venv/bin/python
CONFIG ?= serve_config.yaml
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled

.PHONY: install models up down test check bench bench-gpu gpu-test

install:
	@bash scripts/install.sh

models: install
	@$(PY) -m serve_app prepare-models $(CONFIG)

check: install
	@$(PY) -m serve_app check $(CONFIG)

up: models
	@$(PY) -m serve_app up $(CONFIG)

down:
	@$(PY) -m serve_app down

# REQUIRE_TEST_TOOLS: redis-server, PostgreSQL, Chromium and promtool (installed above) are required,
# so a missing one fails instead of skipping; ENGINE_SUITE_DEVICE=cpu runs the GPU suite's engine
# layer (tests/gpu) on the CPU, so its checks cannot rot between GPU runs. Two xdist workers: the
# e2e suite is one unit of work on one (one Ray cluster), the unit tests run on the other beside it
# (tests/conftest.py).
test: models
	@REQUIRE_TEST_TOOLS=1 ENGINE_SUITE_DEVICE=cpu $(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

# Every benchmark against its baselines, same run (~10 min; docs/benchmarks.md). Not part of `make test`.
bench: models
	@$(PY) -m bench.run $(BENCH_ARGS)

# The GPU suite (tests/gpu, marker gpu; skipped without CUDA). Its engine layer needs only torch,
# transformers and sentence-transformers (the GPU test machine runs it, with the GPU rerank rows, as
# `bash scripts/gpu_check.sh`); its full-stack layer deploys the stack on this node's GPUs and needs
# the GPU profile's Ray and vLLM. `python bench/gpu_rerank.py` prints the GPU rerank rows alone.
gpu-test: install
	@$(PY) -m pytest -m gpu tests/gpu $(PYTEST_ARGS)

# The LLM rows on a GPU node with the project installed: SmolLM2 with CUDA graphs, stack vs bare vllm serve.
bench-gpu: models
	@BENCH_CONFIG=cluster/gpu_bench_serve_config.yaml $(PY) -m bench.run --only vllm-serve llm-stack $(BENCH_ARGS)
