"""transformers engine for encoders: cross-encoder scoring, bi-encoder embeddings + cosine, or a
causal LM reranker scored from its "yes"/"no" logits (Qwen3-Reranker).

Inputs are truncated by tokens to the model's limit (from the query side never: the document
is cut), so a long document can never crash the model; callers get per-input flags.
"""

from __future__ import annotations

import json
import pathlib

from deployments.engines import Scored, TokenBudget


class TransformersEncoder(TokenBudget):
    def __init__(self, cfg, path: str, *, mode) -> None:  # mode: serve_app.config.RerankMode
        import torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        self._torch = torch
        self.mode = mode.value
        self.cross_encoder = self.mode != "bi_encoder"  # both pair scorers see query and document together
        kwargs = {"trust_remote_code": cfg.trust_remote_code, **cfg.engine_kwargs}
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        cls = {"cross_encoder": AutoModelForSequenceClassification, "bi_encoder": AutoModel,
               "yes_no_logits": AutoModelForCausalLM}[self.mode]
        self.model = cls.from_pretrained(path, **kwargs).eval()
        if self.mode == "yes_no_logits":
            self._yes_no = [self.tokenizer.convert_tokens_to_ids(t) for t in ("no", "yes")]
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_input_tokens = _model_limit(self.model.config, path, cfg.max_input_tokens)
        self._pooling = _pooling_mode(path)

    # --- rerank ---
    def score_pairs(self, pairs: list[tuple[str, str]]) -> list[Scored]:
        if self.mode == "bi_encoder":
            return self._cosine_pairs(pairs)
        if self.mode == "yes_no_logits":
            return self._yes_no_pairs(pairs)
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

    def _yes_no_pairs(self, pairs: list[tuple[str, str]]) -> list[Scored]:
        """P(yes) / (P(yes) + P(no)) at the last position of query + document (templates applied
        by the replica), as vLLM's converted Qwen3ForSequenceClassification computes it."""
        torch = self._torch
        texts = [q + d for q, d in pairs]
        full = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        keep = [ids[: self.max_input_tokens] for ids in full]  # the replica already fitted templated docs
        width = max(len(ids) for ids in keep)
        pad = self.tokenizer.pad_token_id
        # Left padding: the last position is every row's last real token.
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in keep])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in keep])
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits[:, -1, :].float()
        scores = torch.softmax(logits[:, self._yes_no], dim=-1)[:, 1]
        return [Scored(float(s), len(k), len(f) > len(k)) for s, k, f in zip(scores.tolist(), keep, full)]

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
