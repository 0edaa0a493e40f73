"""Presets and the start-up compatibility check, on real config.json files."""

from __future__ import annotations

import json
import pathlib

import pytest

from serve_app.app import build_from_config, resolve
from serve_app.cli import main as cli
from serve_app.compat import check_model
from serve_app.config import ConfigError, ModelConfig, parse_app_config


def model_dir(tmp_path: pathlib.Path, **config) -> str:
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def test_qwen3_reranker_preset_fills_overrides_and_templates_but_config_wins():
    cfg = parse_app_config({"models": [{"name": "q", "kind": "rerank", "engine": "vllm", "source": "Qwen/Qwen3-Reranker-0.6B",
                                        "engine_kwargs": {"gpu_memory_utilization": 0.5}}]})
    m = resolve(cfg).models[0]
    assert m.engine_kwargs["hf_overrides"]["classifier_from_token"] == ["no", "yes"]
    assert m.engine_kwargs["gpu_memory_utilization"] == 0.5
    assert "{query}" in m.query_template and m.document_template.endswith("</think>\n\n")
    mine = parse_app_config({"models": [{"name": "q", "kind": "rerank", "engine": "vllm", "source": "Qwen/Qwen3-Reranker-8B",
                                         "query_template": "Q: {query}"}]})
    assert resolve(mine).models[0].query_template == "Q: {query}"


def test_qwen3_reranker_on_transformers_is_scored_from_yes_no_logits():
    cfg = parse_app_config({"models": [{"name": "q", "kind": "rerank", "engine": "transformers", "source": "Qwen/Qwen3-Reranker-8B"}]})
    m = resolve(cfg).models[0]
    assert m.rerank_mode.value == "yes_no_logits" and "hf_overrides" not in m.engine_kwargs
    assert check_model(m, pathlib.Path("/nowhere")) == []
    wrong = ModelConfig.model_validate({**m.model_dump(mode="json"), "rerank_mode": "cross_encoder"})
    assert any("need rerank_mode 'yes_no_logits'" in p for p in check_model(wrong, pathlib.Path("/nowhere")))


def test_trained_length_presets():
    cfg = parse_app_config({"models": [
        {"name": "b", "kind": "rerank", "engine": "transformers", "source": "BAAI/bge-reranker-v2-m3"},
        {"name": "e", "kind": "embed", "engine": "transformers", "source": "sentence-transformers/all-MiniLM-L6-v2",
         "max_input_tokens": 128},
    ]})
    assert [m.max_input_tokens for m in resolve(cfg).models] == [512, 128]


def test_length_over_position_limit(tmp_path):
    src = model_dir(tmp_path, architectures=["LlamaForCausalLM"], max_position_embeddings=2048, num_attention_heads=8, num_key_value_heads=2)
    m = ModelConfig.model_validate({"name": "l", "kind": "llm", "engine": "vllm", "source": src, "max_input_tokens": 4096})
    assert any("exceeds the model's max_position_embeddings 2048" in p for p in check_model(m, tmp_path))


def test_tp_must_divide_heads(tmp_path):
    src = model_dir(tmp_path, architectures=["LlamaForCausalLM"], num_attention_heads=9, num_key_value_heads=3)
    m = ModelConfig.model_validate({"name": "l", "kind": "llm", "engine": "vllm", "source": src, "tensor_parallel_size": 2})
    problems = check_model(m, tmp_path)
    assert any("does not divide num_attention_heads=9" in p and "e.g. 1" in p for p in problems)
    ok = ModelConfig.model_validate({"name": "l", "kind": "llm", "engine": "vllm", "source": src, "tensor_parallel_size": 3})
    assert check_model(ok, tmp_path) == []


def test_cross_encoder_needs_a_classification_head(tmp_path):
    src = model_dir(tmp_path, architectures=["BertModel"], max_position_embeddings=512)
    m = ModelConfig.model_validate({"name": "r", "kind": "rerank", "engine": "transformers", "source": src})
    assert any("rerank_mode: bi_encoder" in p for p in check_model(m, tmp_path))
    bi = m.model_copy(update={"rerank_mode": "bi_encoder"})
    assert check_model(ModelConfig.model_validate(bi.model_dump()), tmp_path) == []


def test_builder_and_check_refuse_a_missing_prepared_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SERVE_APP_MODELS_DIR", str(tmp_path))
    cfg = parse_app_config({"models": [{"name": "s", "kind": "llm", "engine": "vllm", "source": "prepared:smollm2-135m-instruct"}]})
    with pytest.raises(ConfigError, match="prepare-models"):
        build_from_config(cfg)
    root = pathlib.Path(__file__).resolve().parents[1]
    assert cli(["check", str(root / "serve_config.yaml")]) == 2
    assert "no model at" in capsys.readouterr().err




def test_check_notes_a_tool_parser_whose_template_never_renders_tools(tmp_path):
    import json as _json

    from serve_app.compat import check_tool_template
    from serve_app.presets import apply_preset

    (tmp_path / "tokenizer_config.json").write_text(_json.dumps({"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}))
    cfg = parse_app_config({"models": [{"name": "smol", "kind": "llm", "engine": "vllm", "source": str(tmp_path / "smollm2")}]})
    model = apply_preset(cfg.models[0]).model_copy(update={"source": str(tmp_path)})
    assert model.serving.tool_call_parser == "hermes"  # the preset, no flags
    assert "never renders `tools`" in check_tool_template(model, tmp_path)[0]
    (tmp_path / "tokenizer_config.json").write_text(_json.dumps({"chat_template": "{% if tools %}{{ tools }}{% endif %}"}))
    assert check_tool_template(model, tmp_path) == []
