"""Known models' quirks, applied automatically so configs need not rediscover them.

A preset matches a model's `source` and fills in what the config left unset: engine kwargs
(the user's own keys win), the input length the model was trained at, and rerank prompt
templates. `python -m serve_app check` prints which preset applied.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from serve_app.config import EngineKind, ModelConfig, ModelKind, RerankMode, ServingSettings

# Qwen3-Reranker is a causal LM scored from the "yes"/"no" logits of its last token. vLLM serves
# it as a sequence classifier only with these overrides, and only with its instruction template
# (see vLLM's examples for Qwen3-Reranker).
_QWEN3_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
    'the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
_QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
_QWEN3_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
_SCHEMA_TOOL_CALLS = {"VLLM_ENFORCE_STRICT_TOOL_CALLING": "0"}


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    pattern: str  # regex searched in `source` (case-insensitive)
    kinds: tuple[ModelKind, ...]
    engine_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # applies to engine vllm
    max_input_tokens: int | None = None
    query_template: str | None = None
    document_template: str | None = None
    transformers_rerank_mode: RerankMode | None = None  # how the transformers engine must score it
    serving: dict[str, Any] = dataclasses.field(default_factory=dict)  # llm: ServingSettings defaults
    engine_env: dict[str, str] = dataclasses.field(default_factory=dict)  # the replica's own settings win
    why: str = ""


PRESETS: tuple[Preset, ...] = (
    Preset(
        "qwen3-reranker", r"qwen3-reranker", (ModelKind.rerank,),
        engine_kwargs={"hf_overrides": {
            "architectures": ["Qwen3ForSequenceClassification"],
            "classifier_from_token": ["no", "yes"],
            "is_original_qwen3_reranker": True,
        }},
        query_template=_QWEN3_PREFIX + "<Instruct>: " + _QWEN3_INSTRUCTION + "\n<Query>: {query}\n",
        document_template="<Document>: {document}" + _QWEN3_SUFFIX,
        transformers_rerank_mode=RerankMode.yes_no_logits,
        why="a causal LM scored from yes/no logits: vLLM needs hf_overrides, transformers the yes/no "
            "scoring, both the instruction template",
    ),
    # Tool calling with no flags for common families. vLLM constrains named / required tool_choice
    # to the function's JSON schema only for parsers whose `supports_required_and_named` holds;
    # parsers with an xgrammar structural tag (hermes among them) drop it while
    # VLLM_ENFORCE_STRICT_TOOL_CALLING is on, and a named call then came back as `"\"celsius\""`
    # (shared/ENVIRONMENT.md). Off, the schema path applies and arguments validate.
    Preset("qwen3", r"qwen3(?!-reranker|-embedding)", (ModelKind.llm,),
           serving={"tool_call_parser": "hermes", "enable_auto_tool_choice": True, "reasoning_parser": "qwen3"},
           engine_env=_SCHEMA_TOOL_CALLS, why="Qwen3 chat: hermes tool calls, qwen3 reasoning"),
    Preset("hermes-style", r"qwen2\.5|hermes|smollm2", (ModelKind.llm,),
           serving={"tool_call_parser": "hermes", "enable_auto_tool_choice": True},
           engine_env=_SCHEMA_TOOL_CALLS, why="Hermes-style <tool_call> JSON (Qwen2.5, Hermes, SmolLM2)"),
    Preset("llama3", r"llama-?3", (ModelKind.llm,),
           serving={"tool_call_parser": "llama3_json", "enable_auto_tool_choice": True},
           engine_env=_SCHEMA_TOOL_CALLS, why="Llama 3.x JSON tool calls"),
    Preset("bge-reranker", r"bge-reranker", (ModelKind.rerank,), max_input_tokens=512,
           why="BGE rerankers are trained at 512 tokens"),
    Preset("all-minilm-l6-v2", r"all-minilm-l6-v2", (ModelKind.rerank, ModelKind.embed), max_input_tokens=256,
           why="trained at 256 tokens (sentence-transformers max_seq_length)"),
)


def find_preset(model: ModelConfig) -> Preset | None:
    for p in PRESETS:
        if model.kind in p.kinds and re.search(p.pattern, model.source, re.IGNORECASE):
            return p
    return None


def apply_preset(model: ModelConfig) -> ModelConfig:
    """The model with its preset's defaults filled in (explicit config always wins)."""
    p = find_preset(model)
    if p is None:
        return model
    update: dict[str, Any] = {}
    if p.engine_kwargs and model.engine is EngineKind.vllm:
        update["engine_kwargs"] = {**p.engine_kwargs, **model.engine_kwargs}
    if p.max_input_tokens and model.max_input_tokens is None:
        update["max_input_tokens"] = p.max_input_tokens
    if p.query_template and model.query_template is None:
        update["query_template"] = p.query_template
    if p.document_template and model.document_template is None:
        update["document_template"] = p.document_template
    if p.transformers_rerank_mode and model.engine is EngineKind.transformers and model.rerank_mode is None:
        update["rerank_mode"] = p.transformers_rerank_mode
    if p.serving and model.kind is ModelKind.llm:
        given = model.serving.model_dump(exclude_unset=True)
        update["serving"] = ServingSettings.model_validate({**p.serving, **given})
    if p.engine_env:
        update["engine_env"] = {**p.engine_env, **model.engine_env}
    return model.model_copy(update=update)
