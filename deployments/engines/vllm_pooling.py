"""vLLM engine for encoders (pooling runner): large rerankers and embedders.

Uses vLLM's offline `LLM` in the replica: the replica's `@serve.batch` already gathers
requests, and one `LLM.score`/`LLM.embed` call per batch lets vLLM schedule it whole.
Documents are truncated by tokens here, before vLLM sees them, because vLLM rejects an
over-long input instead of cutting it.

`LLM` is not thread-safe, and the replica calls in from two threads (the batch and the health
probe, each through `asyncio.to_thread`), so every call holds one lock: the probe waits behind
the batch it shares the engine with, and times out if the engine is wedged. The lock also
covers our own use of vLLM's tokenizer (TokenBudget), which `LLM.score` uses inside. Moving to
`AsyncLLM` would need vLLM's score-prompt building (pair tokenization, templates, token type
ids) rebuilt over its `encode`, and an async engine call where the `Encoder` interface is
synchronous; one lock gives the same safety without a second copy of that code.
"""

from __future__ import annotations

import threading

from deployments.engines.base import Scored, TokenBudget


class VLLMPoolingEncoder(TokenBudget):
    def __init__(self, cfg, path: str) -> None:
        from vllm import LLM
        from vllm.platforms import current_platform

        kwargs = dict(cfg.engine_kwargs)  # eager mode only where the config asks (the CPU profile does)
        if cfg.max_input_tokens:
            kwargs["max_model_len"] = cfg.max_input_tokens
        self.llm = LLM(model=path, runner="pooling", trust_remote_code=cfg.trust_remote_code, **kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.tokenizer_lock = threading.Lock()  # one lock for the engine and its tokenizer
        model_config = self.llm.llm_engine.model_config
        self.max_input_tokens = model_config.max_model_len
        self.cross_encoder = model_config.score_type == "cross-encoder"
        self.device = current_platform.device_type
        self.dtype = str(model_config.dtype).removeprefix("torch.")

    def score_pairs(self, pairs: list[tuple[str, str]]) -> list[Scored]:
        with self.tokenizer_lock:
            fitted = [self._fit_pair(q, d) for q, d in pairs]
            outs = self.llm.score([f[0] for f in fitted], [f[1] for f in fitted], use_tqdm=False)
        return [Scored(float(o.outputs.score), f[2], f[3]) for o, f in zip(outs, fitted)]

    def embed(self, texts: list[str]) -> list[Scored]:
        with self.tokenizer_lock:
            fitted = [self._fit(t, self.max_input_tokens) for t in texts]
            outs = self.llm.embed([f[0] for f in fitted], use_tqdm=False)
        return [Scored(list(o.outputs.embedding), f[1], f[2]) for o, f in zip(outs, fitted)]

    def _fit(self, text: str, budget: int) -> tuple[str, int, bool]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) + 2 <= budget:  # 2: [CLS]/[SEP]-style specials
            return text, len(ids) + 2, False
        keep = max(1, budget - 2)
        return self.tokenizer.decode(ids[:keep]), keep + 2, True

    def _fit_pair(self, query: str, doc: str) -> tuple[str, str, int, bool]:
        if not self.cross_encoder:  # bi-encoder scoring embeds each side on its own
            q, qn, qt = self._fit(query, self.max_input_tokens)
            d, dn, dt = self._fit(doc, self.max_input_tokens)
            return q, d, qn + dn, qt or dt
        q_ids = self.tokenizer(query, add_special_tokens=False)["input_ids"]
        budget = self.max_input_tokens - 4  # [CLS] q [SEP] d [SEP] and slack for templates
        if len(q_ids) > budget // 2:
            q_ids = q_ids[: budget // 2]
            query = self.tokenizer.decode(q_ids)
        d, dn, dt = self._fit(doc, budget - len(q_ids) + 2)
        return query, d, len(q_ids) + dn + 2, dt
