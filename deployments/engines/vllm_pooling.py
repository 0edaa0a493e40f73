"""vLLM engine for encoders (pooling runner): large rerankers and embedders.

Uses vLLM's offline `LLM` in the replica: the replica's `@serve.batch` already gathers
requests, and one `LLM.score`/`LLM.embed` call per batch lets vLLM schedule it whole.
Documents are truncated by tokens here, before vLLM sees them, because vLLM rejects an
over-long input instead of cutting it.
"""

from __future__ import annotations

from deployments.engines import Scored, TokenBudget


class VLLMPoolingEncoder(TokenBudget):
    def __init__(self, cfg, path: str) -> None:
        from vllm import LLM

        kwargs = {"enforce_eager": True, **cfg.engine_kwargs}
        if cfg.max_input_tokens:
            kwargs["max_model_len"] = cfg.max_input_tokens
        self.llm = LLM(model=path, runner="pooling", trust_remote_code=cfg.trust_remote_code, **kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_input_tokens = self.llm.llm_engine.model_config.max_model_len
        self.cross_encoder = self.llm.llm_engine.model_config.score_type == "cross-encoder"

    def score_pairs(self, pairs: list[tuple[str, str]]) -> list[Scored]:
        fitted = [self._fit_pair(q, d) for q, d in pairs]
        outs = self.llm.score(
            [f[0] for f in fitted], [f[1] for f in fitted], use_tqdm=False,
        )
        return [Scored(float(o.outputs.score), f[2], f[3]) for o, f in zip(outs, fitted)]

    def embed(self, texts: list[str]) -> list[Scored]:
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
