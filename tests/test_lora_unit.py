"""LoRA adapters (serve_app/config/lora.py) without an engine: the config and its names, `check`
against the adapter's files, vLLM's flags, the router's handling (fake handles: which replicas,
which name is counted, allow-lists, the model list) and the cost of an adapter a replica lacks."""

from __future__ import annotations

import json
import pathlib
import random
import time

import pytest
from starlette.testclient import TestClient

from deployments.engines.vllm_openai import serving_args
from serve_app.compat import check_model
from serve_app.config import AppConfig, ConfigError, ModelConfig, hash_key, parse_app_config
from serve_app.llm_routing.config import RoutingConfig
from serve_app.llm_routing.cost import CostModel, ReplicaLoad
from serve_app.router import Router
from tests.fakes import FakeModel
from tests.test_router_unit import assert_error

BASE = {"name": "chat", "kind": "llm", "engine": "vllm", "source": "org/chat", "serving": {"aliases": ["gpt"]},
        "lora": {"adapters": [{"name": "sql", "source": "org/sql-lora"}, {"name": "legal", "source": "org/legal-lora"}]},
        "fallbacks": ["other"]}
OTHER = {"name": "other", "kind": "llm", "engine": "vllm", "source": "org/other"}


def app(keys: list[dict] | None = None) -> tuple[TestClient, dict[str, FakeModel], Router]:
    cfg = AppConfig.model_validate({"gateway": {"api_keys": keys or []}, "models": [BASE, OTHER]})
    handles = {"chat": FakeModel("chat", "llm"), "other": FakeModel("other", "llm")}
    router = Router(cfg.gateway, cfg.models, handles)
    return TestClient(router.__serve_build_asgi_app__(), raise_server_exceptions=False), handles, router


def chat(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "select all rows"}], "max_tokens": 4}


# --- config ---
def test_every_name_of_an_adapter_resolves_to_it():
    m = ModelConfig.model_validate(BASE)
    assert m.adapter_names() == {"sql": "sql", "chat:sql": "sql", "gpt:sql": "sql",
                                 "legal": "legal", "chat:legal": "legal", "gpt:legal": "legal"}


@pytest.mark.parametrize("change, message", [
    ({"lora": {"adapters": [{"name": "other", "source": "x"}]}}, "'other' (as 'other') is already"),
    ({"lora": {"adapters": [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}]}}, "'a' is named twice"),
    ({"lora": {"adapters": [{"name": "a:b", "source": "x"}]}}, "lora.adapters.0.name"),
    ({"lora": {"adapters": [{"name": "a", "source": "x"}], "max_lora_rank": 12}}, "lora.max_lora_rank"),
    ({"lora": {"adapters": [{"name": "a", "source": "x"}], "max_loras": 4, "max_cpu_loras": 2}}, "max_cpu_loras (2)"),
    ({"lora": {"adapters": []}}, "lora.adapters"),
    ({"engine_kwargs": {"enable_lora": True}}, "set by the model's lora section"),
    ({"kind": "embed", "engine": "transformers", "serving": {}, "fallbacks": []}, "lora applies to llm models only"),
])
def test_bad_lora_configs_name_their_field(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_app_config({"models": [{**BASE, **change}, OTHER]})


def test_an_alias_form_clashing_with_a_model_name_is_refused():
    with pytest.raises(ConfigError, match="'gpt:sql'"):
        parse_app_config({"models": [BASE, {**OTHER, "name": "gpt:sql"}]})


def test_allow_lists_may_name_adapters_and_a_typo_is_refused():
    parse_app_config({"gateway": {"api_keys": [{"name": "k", "sha256": hash_key("s"), "models": ["sql", "chat:legal"]}]},
                      "models": [BASE, OTHER]})
    with pytest.raises(ConfigError, match="not models of this app"):
        parse_app_config({"gateway": {"api_keys": [{"name": "k", "sha256": hash_key("s"), "models": ["chat:nope"]}]},
                          "models": [BASE, OTHER]})


# --- check: the adapter's files against the base model ---
def _base_dir(root: pathlib.Path) -> pathlib.Path:
    d = root / "base"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 2,
        "vocab_size": 100, "max_position_embeddings": 512}))
    return d


def _adapter_dir(root: pathlib.Path, name: str, rank: int = 8, hidden: int = 64, layer: int = 0,
                 peft_type: str = "LORA") -> pathlib.Path:
    import torch
    from safetensors.torch import save_file

    d = root / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": rank, "lora_alpha": 16,
                                                       "target_modules": ["q_proj"]}))
    prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(rank, hidden), f"{prefix}.lora_B.weight": torch.zeros(hidden, rank)},
              str(d / "adapter_model.safetensors"))
    return d


def test_check_holds_each_adapter_to_the_rank_limit_and_the_base_models_shapes(tmp_path):
    base = _base_dir(tmp_path)
    adapters = {"ok": _adapter_dir(tmp_path, "ok"), "big": _adapter_dir(tmp_path, "big", rank=24),
                "wide": _adapter_dir(tmp_path, "wide", hidden=96), "deep": _adapter_dir(tmp_path, "deep", layer=5),
                "ia3": _adapter_dir(tmp_path, "ia3", peft_type="IA3"), "none": tmp_path / "missing"}
    model = ModelConfig.model_validate({**OTHER, "source": str(base), "lora": {
        "adapters": [{"name": n, "source": str(p)} for n, p in adapters.items()], "max_lora_rank": 16}})
    problems = "\n".join(check_model(model, tmp_path))
    assert "'ok'" not in problems
    assert "'big'" in problems and "rank 24 exceeds lora.max_lora_rank 16; set it to 32" in problems
    assert "'wide'" in problems and "adapts a size-96 matrix" in problems
    assert "'deep'" in problems and "for layer 5; the base model has 2 layers" in problems
    assert "'ia3'" in problems and "is not LORA" in problems
    assert "'none'" in problems and "no adapter_config.json" in problems


def test_vllm_gets_its_lora_flags_and_each_adapter_under_its_name():
    model = ModelConfig.model_validate({**BASE, "fallbacks": []})
    args = serving_args(model, "/m/chat", {"sql": "/a/sql", "legal": "/a/legal"})
    assert (args["enable_lora"], args["max_loras"], args["max_lora_rank"], args["max_cpu_loras"]) == (True, 4, 16, 4)
    assert args["lora_modules"] == [{"name": "sql", "path": "/a/sql", "base_model_name": "chat"},
                                    {"name": "legal", "path": "/a/legal", "base_model_name": "chat"}]
    assert "enable_lora" not in serving_args(ModelConfig.model_validate(OTHER), "/m/other")


def test_the_replica_hands_vllm_the_adapters_own_name():
    from deployments.llm import LLMServer

    server = LLMServer.__new__(LLMServer)
    server.cfg = ModelConfig.model_validate({**BASE, "fallbacks": []})
    server.adapter_names = server.cfg.adapter_names()
    assert server._own({"model": "gpt:sql"})["model"] == "sql"
    assert server._own({"model": "legal"})["model"] == "legal"
    assert server._own({"model": "gpt"})["model"] == "chat"
    assert server._own({"model": "other"})["model"] == "chat"  # a fallback answers under its own name
    assert server._own({"model": ["sql"]})["model"] == "chat"


# --- the router ---
@pytest.mark.parametrize("name", ["sql", "chat:sql", "gpt:sql"])
def test_an_adapters_request_goes_to_its_base_models_replicas_as_sent(name):
    c, handles, _ = app()
    r = c.post("/v1/chat/completions", json=chat(name))
    assert r.status_code == 200, r.text
    method, (api, body, _) = handles["chat"].calls[-1]
    assert (method, api, body["model"]) == ("create", "chat", name)  # the replica maps the name (tested above)


@pytest.mark.parametrize("name", ["chat:nope", "nope:sql", "sql:chat", "other:sql", "chat:", ":sql"])
def test_an_unknown_adapter_is_a_404_naming_the_model(name):
    c, handles, _ = app()
    assert_error(c.post("/v1/chat/completions", json=chat(name)), 404, param="model")
    assert not handles["chat"].calls


def test_an_adapter_never_falls_back_to_another_model():
    """Another model's answer would pass for the fine-tune's: an adapter's request fails instead."""
    from serve_app.errors import ReplicaFailed

    c, handles, _ = app()
    handles["chat"].fail = ReplicaFailed("down")
    assert c.post("/v1/chat/completions", json=chat("sql")).status_code >= 500
    assert not handles["other"].calls
    assert c.post("/v1/chat/completions", json=chat("chat")).status_code == 200  # the base itself falls back
    assert handles["other"].calls


def test_allow_lists_quota_and_usage_see_the_adapter_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVE_APP_DATA_DIR", str(tmp_path))
    keys = [{"name": "sql-team", "sha256": hash_key("sk-sql"), "models": ["chat:sql"]},
            {"name": "base-team", "sha256": hash_key("sk-base"), "models": ["chat"]}]
    c, _, router = app(keys)
    sql, base = {"authorization": "Bearer sk-sql"}, {"authorization": "Bearer sk-base"}
    assert c.post("/v1/chat/completions", json=chat("sql"), headers=sql).status_code == 200
    assert_error(c.post("/v1/chat/completions", json=chat("chat"), headers=sql), 404, param="model")
    assert_error(c.post("/v1/chat/completions", json=chat("legal"), headers=sql), 404, param="model")
    assert_error(c.post("/v1/chat/completions", json=chat("sql"), headers=base), 404, param="model")  # not implied by the base
    assert [m["id"] for m in c.get("/v1/models", headers=sql).json()["data"]] == ["sql"]
    router.tenancy.usage.flush()
    rows = router.tenancy.usage.query(0, time.time() + 60, "sql-team")
    assert [r["model"] for r in rows] == ["sql"], rows


def test_the_model_list_shows_adapters_with_their_base():
    c, _, _ = app()
    listed = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert set(listed) == {"chat", "other", "sql", "legal"}
    assert listed["sql"]["parent"] == "chat" and listed["sql"]["adapter"] is True and "aliases" not in listed["sql"]
    assert listed["chat"]["aliases"] == ["gpt"] and "parent" not in listed["chat"]
    assert c.get("/v1/models/gpt:legal").json()["id"] == "legal"


def test_batch_lines_for_an_adapter_take_the_base_models_slots():
    _, _, router = app()
    assert router._serving_model("gpt:sql") == "chat" and router._serving_model("gpt") == "chat"
    assert router._serving_model("nope") == "nope"


# --- the cost of an adapter a replica does not hold ---
def _model(**cfg) -> CostModel:
    m = CostModel(RoutingConfig(**cfg), rng=random.Random(0), adapter_names={"sql": "sql", "chat:sql": "sql", "legal": "legal"},
                  adapters_resident=1)
    m.update({"r0": ReplicaLoad(), "r1": ReplicaLoad()})
    return m


def test_an_adapters_requests_go_where_it_is_loaded_until_that_replica_is_busier_than_a_load():
    m = _model(adapter_load_tokens=512)
    first = m.prompt("chat", chat("sql"))
    assert first.adapter == "sql" and m.prompt("chat", chat("chat:sql")).adapter == "sql" and m.prompt("chat", chat("chat")).adapter is None
    home = m.rank(first, ["r0", "r1"])[0].replica
    m.routed("h0", None, home, first, None)
    other = "r1" if home == "r0" else "r0"
    costs = {c.replica: c for c in m.costs(m.prompt("chat", chat("sql")), ["r0", "r1"])}
    assert not costs[home].adapter_cold and costs[other].adapter_cold
    m.completed("h0")
    for i in range(3):  # short requests, each done before the next: all stay home
        p = m.prompt("chat", {**chat("sql"), "messages": [{"role": "user", "content": f"query {i}"}]})
        assert m.rank(p, ["r0", "r1"])[0].replica == home
    for i in range(8):  # a hot adapter: work piles up at home and the other replica loads it too
        p = m.prompt("chat", {**chat("sql"), "max_tokens": 256, "messages": [{"role": "user", "content": f"q{i}"}]})
        best = m.rank(p, ["r0", "r1"])[0]
        m.routed(f"hot{i}", None, best.replica, p, best)
    assert m.holds_adapter(other, "sql")


def test_a_replicas_report_of_its_loaded_adapters_counts_and_least_recent_go_first():
    m = _model()
    m.observe({"r1": ReplicaLoad(adapters=frozenset({"legal"}), reported_at=1.0)})
    assert m.rank(m.prompt("chat", chat("legal")), ["r0", "r1"])[0].replica == "r1"
    sql = m.prompt("chat", chat("sql"))
    m.routed("a", None, "r0", sql, None)
    m.routed("b", None, "r0", m.prompt("chat", chat("legal")), None)  # one resident: sql is out on r0
    assert not m.holds_adapter("r0", "sql") and m.holds_adapter("r0", "legal")
    assert ReplicaLoad.from_stats({"adapters": ["sql", 3, None]}).adapters == frozenset({"sql"})
    assert ReplicaLoad.from_stats({"adapters": "sql"}).adapters == frozenset()


def test_any_model_name_is_served_or_a_404_never_a_5xx():
    """Names built from the served ones (adapter forms, separators, case, unicode, NUL) and any text."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    c, handles, _ = app()
    known = {"chat", "gpt", "other", "sql", "legal", "chat:sql", "gpt:sql", "chat:legal", "gpt:legal"}
    parts = st.sampled_from(["chat", "gpt", "other", "sql", "legal", "", ":", "SQL", "chat ", "\x00", "ü"])

    @settings(max_examples=150, deadline=None)
    @given(name=st.lists(parts, max_size=4).map("".join) | st.text(max_size=40))
    def run(name):
        r = c.post("/v1/chat/completions", json=chat(name))
        assert r.status_code == (200 if name in known else 404), (name, r.text)

    run()


def test_check_prints_each_models_adapters_and_fails_on_a_missing_one(tmp_path, capsys):
    from serve_app.cli import main as cli

    base = _base_dir(tmp_path)
    good = _adapter_dir(tmp_path, "good")
    config = tmp_path / "serve.yaml"
    model = {**OTHER, "source": str(base), "lora": {"adapters": [{"name": "good", "source": str(good)}]}}
    config.write_text(json.dumps({"applications": [{"name": "a", "import_path": "serve_app.app:build_app",
                                                    "args": {"models": [model]}}]}))
    assert cli(["check", str(config)]) == 0
    assert "adapters=good" in capsys.readouterr().out
    model["lora"]["adapters"].append({"name": "gone", "source": str(tmp_path / "gone")})
    config.write_text(json.dumps({"applications": [{"name": "a", "import_path": "serve_app.app:build_app",
                                                    "args": {"models": [model]}}]}))
    assert cli(["check", str(config)]) == 2
    assert "adapter 'gone'" in capsys.readouterr().err
