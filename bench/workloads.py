"""What every step sends, in one place, so a baseline and the stack always get the same work."""

from __future__ import annotations

import os
import pathlib

import yaml

RERANK_DOCS = 32
RERANK_CONCURRENCY = 8
RERANK_MAX_BATCH = 64  # the largest forward pass, ours and Infinity's alike
QUERY = "What is the capital of France?"


# The config the LLM and gateway steps run (`make bench-gpu` points it at a GPU config).
CONFIG = pathlib.Path(os.environ.get("BENCH_CONFIG", "serve_config.yaml"))

def rerank_pairs(n: int) -> list[tuple[str, str]]:
    return [(QUERY, f"Document {i} talks about the capital city of a European country.") for i in range(n)]


# The trivial backend's request: the gateway steps measure the stack around it.
NULL_BODY = {"model": "null", "query": "q", "documents": ["a"]}
RERANK_BODY = {"model": "minilm-ce", "query": QUERY, "documents": [d for _, d in rerank_pairs(RERANK_DOCS)],
               "return_documents": False}


def llm_body() -> dict:
    """Greedy, so the stack and bare vLLM generate the same tokens; 64 of them per request."""
    return {
        "model": llm_model()[0].name,
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Tell me about Paris: its history, its food and its museums."}],
        "max_tokens": 64, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }


def default_models() -> list[dict]:
    """The models section of serve_config.yaml: the benchmarks run what `make up` runs."""
    return yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]["models"]


def llm_entry() -> dict:
    """serve_config.yaml's LLM entry, as the stack deploys it."""
    return next(m for m in default_models() if m["kind"] == "llm")


def llm_model():
    """serve_config.yaml's LLM as a validated ModelConfig with its preset (as the stack runs it),
    and its prepared path."""
    from serve_app.config import ModelConfig
    from serve_app.presets import apply_preset

    model = apply_preset(ModelConfig.model_validate(llm_entry()))
    return model, model.resolved_source(pathlib.Path("models"))


def app_args(models: list[dict]) -> dict:
    """serve_config.yaml's gateway with the given models: the router as `make up` runs it."""
    args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    return {**args, "models": models}


def cross_encoder_model(path: str, *, replicas: int = 1, cpus: float = 1, **deployment) -> dict:
    """The bench cross-encoder as a rerank model of ours."""
    return {"name": "minilm-ce", "kind": "rerank", "engine": "transformers", "rerank_mode": "cross_encoder",
            "source": path, "batching": {"max_batch_size": RERANK_MAX_BATCH, "batch_wait_timeout_s": 0.005},
            "deployment": {"num_replicas": replicas, "max_ongoing_requests": 32, "max_queued_requests": 128,
                           "ray_actor_options": {"num_cpus": cpus}, **deployment}}


def llm_load(url: str, seconds: float, meter=None) -> dict:  # meter: bench.rooms.Meter
    import asyncio

    from bench.load import run, summarize

    return summarize({f"c{c}": asyncio.run(run(url, llm_body(), c, seconds, warmup_s=3, stream=True, meter=meter))
                      for c in (1, 8)}, meter)
