"""transformers engine for encoders: cross-encoder scoring, or bi-encoder embeddings + cosine.

Inputs are truncated by tokens to the model's limit (from the query side never: the document
is cut), so a long document can never crash the model; callers get per-input flags.
"""

from __future__ import annotations

import json
import pathlib

from deployments.engines import Scored, TokenBudget


class TransformersEncoder(TokenBudget):
    def __init__(self, cfg, path: str, *, cross_encoder: bool) -> None:
        import torch
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        self._torch = torch
        self.cross_encoder = cross_encoder
        kwargs = {"trust_remote_code": cfg.trust_remote_code, **cfg.engine_kwargs}
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        cls = AutoModelForSequenceClassification if cross_encoder else AutoModel
        self.model = cls.from_pretrained(path, **kwargs).eval()
        self.max_input_tokens = _model_limit(self.model.config, path, cfg.max_input_tokens)
        self._pooling = _pooling_mode(path)

    # --- rerank ---
    def score_pairs(self, pairs: list[tuple[str, str]]) -> list[Scored]:
        if not self.cross_encoder:
            return self._cosine_pairs(pairs)
        torch = self._torch
        queries, docs = [p[0] for p in pairs], [p[1] for p in pairs]
        full = self.tokenizer(queries, docs, truncation=False, add_special_tokens=True)["input_ids"]
        enc = self.tokenizer(
            queries, docs, truncation="longest_first", max_length=self.max_input_tokens,
            padding=True, return_tensors="pt",
        )
        with torch.inference_mode():
            logits = self.model(**enc).logits.float()
        scores = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, -1)[:, -1]
        return [
            Scored(float(s), min(len(ids), self.max_input_tokens), len(ids) > self.max_input_tokens)
            for s, ids in zip(scores.tolist(), full)
        ]

    def _cosine_pairs(self, pairs: list[tuple[str, str]]) -> list[Scored]:
        queries = list(dict.fromkeys(p[0] for p in pairs))
        q_vecs, q_lens = self._encode_tensor(queries)
        d_vecs, d_lens = self._encode_tensor([p[1] for p in pairs])
        row = {q: i for i, q in enumerate(queries)}
        q_idx = [row[p[0]] for p in pairs]
        scores = (q_vecs[q_idx] * d_vecs).sum(-1).tolist()  # both unit-norm: dot = cosine
        limit = self.max_input_tokens
        return [
            Scored(s, min(q_lens[qi], limit) + min(dl, limit), q_lens[qi] > limit or dl > limit)
            for s, qi, dl in zip(scores, q_idx, d_lens)
        ]

    # --- embeddings ---
    def embed(self, texts: list[str]) -> list[Scored]:
        vecs, lengths = self._encode_tensor(texts)
        limit = self.max_input_tokens
        return [Scored(v, min(n, limit), n > limit) for v, n in zip(vecs.tolist(), lengths)]

    def _encode_tensor(self, texts: list[str]):
        """Unit-norm pooled embeddings (as sentence-transformers computes them) and untruncated lengths."""
        torch = self._torch
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        enc = self.tokenizer(
            texts, truncation=True, max_length=self.max_input_tokens, padding=True, return_tensors="pt"
        )
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
        if self._pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled.float(), p=2, dim=1), lengths


def _model_limit(model_config, path: str, configured: int | None) -> int:
    """The real limit: position embeddings, sentence-transformers' max_seq_length, then config."""
    limits = [getattr(model_config, "max_position_embeddings", None)]
    st = pathlib.Path(path) / "sentence_bert_config.json"
    if st.exists():
        limits.append(json.loads(st.read_text()).get("max_seq_length"))
    known = [n for n in limits if isinstance(n, int) and n > 0]
    model_max = min(known) if known else 512
    if configured is not None and configured > model_max:
        raise ValueError(f"max_input_tokens {configured} exceeds the model's limit {model_max}")
    return configured or model_max


def _pooling_mode(path: str) -> str:
    cfg = pathlib.Path(path) / "1_Pooling" / "config.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("pooling_mode_cls_token"):
        return "cls"
    return "mean"
