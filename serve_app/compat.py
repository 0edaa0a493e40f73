"""Start-up compatibility: will this engine serve this model as configured?

Run by `python -m serve_app check` and by the builder, before any replica starts, so a wrong
config fails in seconds with a message saying what to change, not minutes later in a replica's
traceback. Reads only the model's `config.json`; hub ids (no local files) are not inspected.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import pathlib
import re

from deployments.engines.limits import usable_positions
from serve_app.config import EngineKind, ModelConfig, ModelKind, RerankMode
from serve_app.config.lora import LORA_RANKS
from serve_app.presets import find_preset

_GENERATIVE = ("ForCausalLM", "ForConditionalGeneration")


def check_model(model: ModelConfig, models_dir: pathlib.Path) -> list[str]:
    """Problems with `model` (after its preset is applied); empty when it looks servable."""
    problems: list[str] = []
    preset = find_preset(model)
    wanted = preset.transformers_rerank_mode if preset else None
    if wanted and model.engine is EngineKind.transformers and model.rerank_mode is not wanted:
        problems.append(f"{model.name}: {preset.name} models need rerank_mode '{wanted.value}' ({preset.why})")
    source = model.resolved_source(models_dir)
    path = pathlib.Path(source)
    if not path.is_absolute():
        return problems + _tp_problems(model, {})  # a hub id: its files are not here to inspect
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        hint = " (run `make up` or `python -m serve_app prepare-models CONFIG`)" if model.source.startswith("prepared:") else ""
        return problems + [f"{model.name}: no model at {path}{hint}"] + _tp_problems(model, {})
    hf = json.loads(cfg_file.read_text())
    text = hf.get("text_config", hf)  # multimodal configs nest the language model's
    archs = hf.get("architectures") or []
    positions = text.get("max_position_embeddings")
    usable = usable_positions(text.get("model_type"), positions, text.get("pad_token_id"))
    if model.max_input_tokens and usable and model.max_input_tokens > usable:
        offset = f" less {positions - usable} for RoBERTa-style padding offsets" if usable != positions else ""
        problems.append(
            f"{model.name}: max_input_tokens {model.max_input_tokens} exceeds the model's "
            f"max_position_embeddings {positions}{offset}; lower it to at most {usable}"
        )
    if model.kind is ModelKind.llm and archs and not any(a.endswith(_GENERATIVE) for a in archs):
        problems.append(f"{model.name}: architecture {archs} is not a generative model; use kind 'rerank' or 'embed'")
    if model.kind is ModelKind.rerank and model.engine is EngineKind.transformers:
        mode = model.rerank_mode or RerankMode.cross_encoder
        if mode is RerankMode.yes_no_logits and archs and not any(a.endswith("ForCausalLM") for a in archs):
            problems.append(f"{model.name}: rerank_mode yes_no_logits needs a causal LM, not {archs}")
        if mode is RerankMode.cross_encoder and archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            problems.append(
                f"{model.name}: architecture {archs} has no classification head, so as a cross-encoder its "
                "scores would be random; set rerank_mode: bi_encoder (embedding models) or engine: vllm"
            )
    return problems + _tp_problems(model, text) + lora_problems(model, text, models_dir)


def lora_problems(model: ModelConfig, text: dict, models_dir: pathlib.Path) -> list[str]:
    """Each local LoRA adapter: a PEFT LoRA folder, of rank within `lora.max_lora_rank`, whose
    weights fit this base model (layer count and the sizes its matrices adapt). vLLM would
    refuse the first two at start and fail the third on its first request."""
    problems: list[str] = []
    for name, source in model.resolved_adapters(models_dir).items():
        path = pathlib.Path(source)
        if not path.is_absolute():
            continue  # a hub id: not here to inspect
        where = f"{model.name}: adapter {name!r} at {path}"
        cfg_file = path / "adapter_config.json"
        if not cfg_file.exists():
            problems.append(f"{where}: no adapter_config.json (a PEFT LoRA folder holds it and adapter_model.safetensors)")
            continue
        peft = json.loads(cfg_file.read_text())
        if str(peft.get("peft_type", "LORA")).upper() != "LORA":
            problems.append(f"{where}: peft_type {peft.get('peft_type')!r} is not LORA")
            continue
        rank = peft.get("r")
        if isinstance(rank, int) and rank > model.lora.max_lora_rank:
            fits = min((r for r in LORA_RANKS if r >= rank), default=None)
            problems.append(f"{where}: rank {rank} exceeds lora.max_lora_rank {model.lora.max_lora_rank}"
                            + (f"; set it to {fits}" if fits else f"; vLLM serves ranks up to {LORA_RANKS[-1]}"))
        problems += [f"{where}: {p}" for p in _adapter_shape_problems(path / "adapter_model.safetensors", text)]
    return problems


def _adapter_shape_problems(weights: pathlib.Path, text: dict) -> list[str]:
    """The adapter's matrices against the base's sizes, from the safetensors header alone."""
    if not weights.exists() or not text:
        return []
    with weights.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= 100_000_000:
            return [f"{weights.name} is not a safetensors file"]
        header = json.loads(f.read(size))
    heads, hidden = text.get("num_attention_heads"), text.get("hidden_size")
    head_dim = text.get("head_dim") or (hidden // heads if hidden and heads else None)
    dims = {hidden, text.get("intermediate_size"), text.get("vocab_size")}
    if head_dim:
        dims |= {heads * head_dim, (text.get("num_key_value_heads") or heads) * head_dim}
    dims.discard(None)
    layers = text.get("num_hidden_layers")
    for tensor, meta in header.items():
        if tensor == "__metadata__" or not isinstance(meta, dict):
            continue
        shape = meta.get("shape") or []
        outer = shape[1] if ".lora_A." in tensor and len(shape) == 2 else shape[0] if ".lora_B." in tensor and shape else None
        if outer is not None and dims and outer not in dims:
            return [f"{tensor} adapts a size-{outer} matrix; the base model's sizes are {sorted(dims)}: "
                    "it was trained for another model"]
        layer = re.search(r"layers\.(\d+)\.", tensor)
        if layer and layers and int(layer.group(1)) >= layers:
            return [f"{tensor} is for layer {layer.group(1)}; the base model has {layers} layers: "
                    "it was trained for another model"]
    return []


def _tp_problems(model: ModelConfig, text: dict) -> list[str]:
    """Tensor parallelism that vLLM will refuse, or that gets fewer GPUs than workers."""
    tp = model.tensor_parallel_size
    if tp == 1:
        return []
    problems = []
    per_worker = model.deployment.ray_actor_options.num_gpus
    if per_worker and per_worker != int(per_worker):
        problems.append(
            f"{model.name}: tensor_parallel_size {tp} with num_gpus {per_worker:g} per worker: the replica would hold "
            f"{per_worker * tp:g} GPUs for {tp} workers that each need a whole one; use num_gpus: 1"
        )
    heads, kv_heads = text.get("num_attention_heads"), text.get("num_key_value_heads")
    if isinstance(heads, int) and heads % tp:
        problems.append(
            f"{model.name}: tensor_parallel_size {tp} does not divide num_attention_heads={heads}; "
            f"use a divisor of {heads} (e.g. {_largest_divisor(heads, tp)})"
        )
    # vLLM splits KV heads across ranks, or replicates them when there are fewer than ranks.
    if isinstance(kv_heads, int) and kv_heads % tp and tp % kv_heads:
        problems.append(
            f"{model.name}: tensor_parallel_size {tp} and num_key_value_heads={kv_heads}: one must divide the "
            f"other (e.g. tensor_parallel_size {_largest_divisor(kv_heads, tp)})"
        )
    return problems


def check_tool_template(model: ModelConfig, models_dir: pathlib.Path) -> list[str]:
    """Notes: a tool-call parser is configured but the model's chat template never renders `tools`,
    so the model is not shown the tools. Named and `required` tool_choice still work (vLLM decodes
    the arguments under the function's schema); `auto` depends on the model guessing the format."""
    if model.kind is not ModelKind.llm or not model.serving.tool_call_parser:
        return []
    path = pathlib.Path(model.resolved_source(models_dir))
    template = model.serving.chat_template
    if template and pathlib.Path(template).is_file():
        template = pathlib.Path(template).read_text()
    if template is None and path.is_absolute():
        jinja, tok = path / "chat_template.jinja", path / "tokenizer_config.json"
        if jinja.exists():
            template = jinja.read_text()
        elif tok.exists():
            template = json.loads(tok.read_text()).get("chat_template")
    if not isinstance(template, str) or "tools" in template:
        return []  # a hub id, a template list, or one that renders tools
    return [f"{model.name}: tool_call_parser '{model.serving.tool_call_parser}' is set but the chat template never "
            "renders `tools`: the model is not shown them. Named and required tool_choice still return "
            "schema-valid calls; for auto, give it a template that renders tools (serving.chat_template)"]


def check_engine_kwargs(model: ModelConfig) -> tuple[list[str], list[str]]:
    """(problems, notes): engine_kwargs keys a vLLM model sets that vLLM's AsyncEngineArgs does not
    have. Imports vllm, so only `python -m serve_app check` runs it, never the builder (the
    router's process stays free of vllm); without vllm installed it is a note, not a problem."""
    if model.engine is not EngineKind.vllm or not model.engine_kwargs:
        return [], []
    try:
        from vllm import AsyncEngineArgs
    except Exception as e:  # noqa: BLE001 - not installed, or a build that cannot import here
        return [], [f"{model.name}: engine_kwargs not checked against vLLM ({type(e).__name__}: {e})"]
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    problems = []
    for key in sorted(set(model.engine_kwargs) - known):
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(f"{model.name}: engine_kwargs.{key} is not an argument of vLLM's AsyncEngineArgs{hint}")
    return problems, []


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if n % d == 0)


def check_fit(models: list[ModelConfig], node_gpus: list[float]) -> list[str]:
    """Will each replica fit the cluster's nodes? A TP replica needs all its GPUs on one node;
    a PP replica's workers may span nodes. Without this, Serve waits forever for resources."""
    if not node_gpus:
        return []
    problems = []
    largest, total = max(node_gpus), sum(node_gpus)
    for m in models:
        need = m.gpus_per_replica
        if not need:
            continue
        if m.pipeline_parallel_size == 1 and need > largest:
            problems.append(
                f"{m.name}: one replica needs {need:g} GPUs on one node (tensor_parallel_size "
                f"{m.tensor_parallel_size} x {m.deployment.ray_actor_options.num_gpus:g}), but the largest node has "
                f"{largest:g}; lower tensor_parallel_size, or use pipeline_parallel_size to span nodes"
            )
        elif need > total:
            problems.append(f"{m.name}: one replica needs {need:g} GPUs; the whole cluster has {total:g}")
    return problems
