"""The engine a model's config asks for. The adapters are imported here, when one is built, so a
replica imports torch or vllm only for the engine it runs."""

from __future__ import annotations

from deployments.engines.base import Encoder
from serve_app.config import EngineKind, ModelConfig, ModelKind, RerankMode


def build_encoder(cfg: ModelConfig, path: str, *, gpu_ids: tuple[str, ...] | None = None) -> Encoder:
    """The engine for `cfg`. `gpu_ids`: the GPUs Ray assigned the replica (empty: none); None outside Ray."""
    if cfg.engine is EngineKind.vllm:
        from deployments.engines.vllm_pooling import VLLMPoolingEncoder

        return VLLMPoolingEncoder(cfg, path)
    from deployments.engines.transformers_encoder import TransformersEncoder

    mode = (cfg.rerank_mode or RerankMode.cross_encoder) if cfg.kind is ModelKind.rerank else RerankMode.bi_encoder
    return TransformersEncoder(
        path, mode=mode.value, device=cfg.device, dtype=cfg.dtype, gpu_ids=gpu_ids,
        max_input_tokens=cfg.max_input_tokens, max_batch_tokens=cfg.batch.max_batch_tokens,
        trust_remote_code=cfg.trust_remote_code, model_kwargs=cfg.engine_kwargs,
    )
