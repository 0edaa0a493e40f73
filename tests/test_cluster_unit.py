"""Placement, fit, autoscaling defaults and scale-from-zero: the builder's and router's logic."""

from __future__ import annotations

import pathlib

from starlette.testclient import TestClient

from serve_app.app import model_deployment
from serve_app.cli import main as cli
from serve_app.compat import check_fit
from serve_app.config import ModelConfig, parse_app_config
from serve_app.router import Router
from tests.fakes import FakeModel
from tests.test_router_unit import assert_error

ROOT = pathlib.Path(__file__).resolve().parents[1]
LLM = {"name": "m", "kind": "llm", "engine": "vllm", "source": "org/model"}


def gpu_llm(**kw) -> ModelConfig:
    return ModelConfig.model_validate({**LLM, "deployment": {"ray_actor_options": {"num_cpus": 2, "num_gpus": 1}}, **kw})


def test_pipeline_parallel_gets_a_pack_placement_group_and_the_ray_executor_budget():
    d = model_deployment(gpu_llm(tensor_parallel_size=2, pipeline_parallel_size=2))
    assert d._replica_config.placement_group_strategy == "PACK"
    assert d._replica_config.placement_group_bundles == [{"GPU": 1, "CPU": 2}, {"GPU": 1}, {"GPU": 1}, {"GPU": 1}]
    assert "num_gpus" not in d.ray_actor_options  # the replica sits in bundle 0 and holds none itself


def test_tensor_parallel_alone_needs_no_placement_group():
    d = model_deployment(gpu_llm(tensor_parallel_size=4))
    assert d.ray_actor_options["num_gpus"] == 4 and d._replica_config.placement_group_bundles is None


def test_pipeline_parallel_rules():
    import pytest

    from serve_app.config import ConfigError

    with pytest.raises(ConfigError, match="needs GPUs"):
        parse_app_config({"models": [{**LLM, "pipeline_parallel_size": 2}]})
    with pytest.raises(ConfigError, match="max_replicas_per_node"):
        parse_app_config({"models": [{**LLM, "pipeline_parallel_size": 2, "deployment": {
            "max_replicas_per_node": 1, "ray_actor_options": {"num_gpus": 1}}}]})


def test_fit_against_node_sizes():
    tp4 = gpu_llm(tensor_parallel_size=4)
    assert check_fit([tp4], [8, 8]) == []
    (msg,) = check_fit([tp4], [2, 2, 2])
    assert "needs 4 GPUs on one node" in msg and "largest node has 2" in msg
    assert check_fit([gpu_llm(tensor_parallel_size=2, pipeline_parallel_size=2)], [2, 2]) == []  # spans nodes
    assert "whole cluster has 3" in check_fit([gpu_llm(tensor_parallel_size=2, pipeline_parallel_size=2)], [2, 1])[0]


def test_check_cli_fits_the_gpu_example_to_node_sizes(capsys):
    gpu_cfg = str(ROOT / "cluster" / "gpu_serve_config.yaml")
    assert cli(["check", gpu_cfg, "--gpus-per-node", "8"]) == 0
    assert cli(["check", gpu_cfg, "--gpus-per-node", "2"]) == 2
    assert "llama-3.3-70b-instruct: one replica needs 4 GPUs on one node" in capsys.readouterr().err


def test_autoscaling_target_defaults_to_half_a_batch():
    llm = ModelConfig.model_validate({**LLM, "engine_kwargs": {"max_num_seqs": 64}, "deployment": {
        "max_ongoing_requests": 128, "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}})
    assert model_deployment(llm)._deployment_config.autoscaling_config.target_ongoing_requests == 32
    rr = ModelConfig.model_validate({"name": "r", "kind": "rerank", "engine": "transformers", "source": "org/r",
                                     "batching": {"max_batch_size": 16}, "deployment": {
                                         "autoscaling_config": {"max_replicas": 2, "target_ongoing_requests": 3}}})
    assert model_deployment(rr)._deployment_config.autoscaling_config.target_ongoing_requests == 3  # explicit wins


def _zero_client(delay: float, timeout: float):
    cfg = parse_app_config({"gateway": {"cold_start_timeout_s": timeout}, "models": [
        {"name": "rr", "kind": "rerank", "engine": "transformers", "source": "org/rr",
         "deployment": {"autoscaling_config": {"min_replicas": 0, "max_replicas": 1, "downscale_delay_s": 300}}}]})
    fake = FakeModel("rr", "rerank", delay=delay)
    return TestClient(Router(cfg.gateway, cfg.models, {"rr": fake}).__serve_build_asgi_app__(), raise_server_exceptions=False), fake


BODY = {"model": "rr", "query": "q", "documents": ["a"]}


def test_scaled_to_zero_model_that_does_not_start_in_time_is_a_clear_503():
    c, _ = _zero_client(delay=2.0, timeout=0.2)
    r = c.post("/v1/rerank", json=BODY)
    assert_error(r, 503, contains="scaled to zero")
    assert r.headers["retry-after"] == "10"


def test_scaled_to_zero_model_is_probed_once_then_served_warm():
    c, fake = _zero_client(delay=0.0, timeout=5)
    assert c.post("/v1/rerank", json=BODY).status_code == 200
    assert c.post("/v1/rerank", json=BODY).status_code == 200
    assert [name for name, _ in fake.calls].count("card") == 1
