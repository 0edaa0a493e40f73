"""Known models' quirks, applied automatically so configs need not rediscover them.

A preset matches a model's `source` and fills in what the config left unset: engine kwargs
(the user's own keys win), the input length the model was trained at, and rerank prompt
templates. `python -m serve_app check` prints which preset applied.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from serve_app.config import EngineKind, ModelConfig, ModelKind, RerankMode

# Qwen3-Reranker is a causal LM scored from the "yes"/"no" logits of its last token. vLLM serves
# it as a sequence classifier only with these overrides, and only with its instruction template
# (see vLLM's examples for Qwen3-Reranker).
_QWEN3_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
    'the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
_QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
_QWEN3_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


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
    return model.model_copy(update=update)
