"""The GPU suite's full-stack layer: the stack deployed on this node's GPUs, driven over HTTP.

Needs the project installed with its GPU profile (Ray, vLLM, CUDA): `make gpu-test` on a GPU
node. Skipped elsewhere, the GPU test machine included (it has no Ray or vLLM; its layer is
test_engine_gpu.py). Random-weight tiny models under cluster/gpu_serve_config.yaml's engine
settings: encoders on transformers holding a share of a GPU (device and dtype auto), an LLM on
vLLM without enforce_eager (CUDA graphs), and a TP=2 LLM where two GPUs are present.

Not yet run on a GPU node: no session that wrote it had one with Ray and vLLM.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from tests.local_servers import free_port

torch = pytest.importorskip("torch")
if not torch.cuda.is_available() or not all(importlib.util.find_spec(m) for m in ("ray", "vllm")):
    pytest.skip("needs CUDA, Ray and vLLM (the project's GPU profile)", allow_module_level=True)
pytestmark = pytest.mark.gpu

TOL = 1e-2
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, pathlib.Path]:
    from tests.tiny_models import build_tiny_cross_encoder, build_tiny_llama, build_tiny_st_bi_encoder

    root = tmp_path_factory.mktemp("gpu-stack-models")
    return {"ce": build_tiny_cross_encoder(root / "ce", hidden=256, layers=4, heads=4, positions=512),
            "bi": build_tiny_st_bi_encoder(root / "bi", pooling="mean", dense=False, normalize=True),
            "llama": build_tiny_llama(root / "llama")}


def gpu_args(models: dict[str, pathlib.Path]) -> dict:
    share = {"num_cpus": 1, "num_gpus": 0.25}
    vllm_kwargs = {"gpu_memory_utilization": 0.15, "max_num_seqs": 8}  # no enforce_eager: CUDA graphs
    entries = [
        {"name": "gpu-ce", "kind": "rerank", "engine": "transformers", "source": str(models["ce"]),
         "batching": {"max_batch_size": 64}, "deployment": {"max_ongoing_requests": 64, "ray_actor_options": share}},
        {"name": "gpu-embed", "kind": "embed", "engine": "transformers", "source": str(models["bi"]),
         "deployment": {"ray_actor_options": share}},
        {"name": "gpu-llm", "kind": "llm", "engine": "vllm", "source": str(models["llama"]), "max_input_tokens": 256,
         "engine_kwargs": vllm_kwargs, "deployment": {"ray_actor_options": share}},
    ]
    if GPUS >= 2:
        entries.append({"name": "gpu-llm-tp2", "kind": "llm", "engine": "vllm", "source": str(models["llama"]),
                        "max_input_tokens": 256, "tensor_parallel_size": 2, "engine_kwargs": vllm_kwargs,
                        "deployment": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 1}}})
    return {"gateway": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}}, "models": entries}


@pytest.fixture(scope="module")
def stack(models):
    import httpx
    import ray
    from ray import serve

    from serve_app.app import build_app

    ray.init(num_cpus=8, num_gpus=GPUS, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(gpu_args(models)), name="gpu", route_prefix="/")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def _card(deployment: str):
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name="gpu").card.remote().result()


def test_encoders_run_on_cuda_in_half_precision(stack):
    for deployment in ("rerank-gpu-ce", "embed-gpu-embed"):
        card = _card(deployment)
        assert (card.device, card.dtype) == ("cuda", "float16"), deployment
        assert card.replica.gpu_ids


def test_rerank_over_http_matches_the_model_run_directly(stack, models):
    from deployments.engines.transformers_encoder import TransformersEncoder
    from tests.tiny_models import WORDS

    docs = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(5 + i % 150)) for i in range(1000)]
    r = stack.post("/v1/rerank", json={"model": "gpu-ce", "query": "capital of france", "documents": docs})
    assert r.status_code == 200, r.text
    served = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    assert len(served) == 1000  # a long list, fanned out and batched by tokens
    direct = TransformersEncoder(str(models["ce"])).score_pairs([("capital of france", d) for d in docs])
    assert [served[i] for i in range(1000)] == pytest.approx([s.value for s in direct], abs=TOL)


def test_embeddings_over_http_match_sentence_transformers(stack, models):
    from sentence_transformers import SentenceTransformer

    texts = ["paris is the capital", "green apple", "blue sky sea " * 30]
    r = stack.post("/v1/embeddings", json={"model": "gpu-embed", "input": texts})
    assert r.status_code == 200, r.text
    served = torch.tensor([d["embedding"] for d in r.json()["data"]])
    ref = SentenceTransformer(str(models["bi"]), device="cuda").encode(texts, convert_to_tensor=True).float().cpu()
    assert (served - ref).abs().max().item() < TOL


def test_vllm_streams_with_cuda_graphs(stack):
    r = stack.post("/v1/chat/completions", json={
        "model": "gpu-llm", "messages": [{"role": "user", "content": "the capital of france"}],
        "max_tokens": 8, "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    logs = pathlib.Path("/tmp/ray/session_latest/logs")
    captured = any("Graph capturing finished" in p.read_text(errors="ignore") for p in logs.rglob("*.log")
                   if p.is_file() and p.stat().st_size < 50_000_000)
    assert captured, "vLLM logged no CUDA graph capture: is eager mode on?"


@pytest.mark.skipif(GPUS < 2, reason="needs two GPUs")
def test_tp2_replica_holds_two_gpus_and_serves(stack):
    assert len(_card("llm-gpu-llm-tp2").replica.gpu_ids) == 2
    r = stack.post("/v1/completions", json={"model": "gpu-llm-tp2", "prompt": "paris is", "max_tokens": 4})
    assert r.status_code == 200, r.text
