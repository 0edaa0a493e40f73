"""transformers engine for encoders, on the device the replica holds, in the configured dtype.

- cross_encoder: sentence-transformers' `CrossEncoder` loads the model and owns its activation (a
  model's saved one, else sigmoid for a one-label head); two-label heads score softmax[:, -1].
- bi_encoder: sentence-transformers' `SentenceTransformer`: the model's own modules.json (Pooling
  cls / mean / last-token, Dense, Normalize) makes the vector; folders without one get its default
  (mean pooling). Rerank scores are the cosine of query and document vectors.
- yes_no_logits: a causal LM (Qwen3-Reranker) scored P(yes) / (P(yes) + P(no)) at the last
  position of query + document, as vLLM's converted Qwen3ForSequenceClassification does. Our own
  path: the replica writes the template around one text, not a (query, document) pair.

Each call is tokenized once, without padding: the untruncated lengths give token counts and
truncation flags; over-long inputs are tokenized again with truncation, to the real limit (see
limits.py), so a long document is cut, never an IndexError or a CUDA device-side assert. Inputs
are then sorted by length and split into forward passes of at most `max_batch_tokens` padded
tokens that never mix lengths more than 2x apart, so one long document pads only its own pass.
Results come back in the caller's order, on the CPU.

Two stages, each with its own lock (the health probe calls in beside the batch thread): the
tokenizer runs in this engine's tokenizer thread, the device under `_device_lock`. On CUDA a call
can be tokenized in steps of `pipeline_items` inputs, so the next step is tokenized while the GPU
runs the current one (Infinity overlaps the same way). Off by default: on an H200 it made no
robust difference (one run -15%, the next +4%; docs/benchmarks.md), and it cuts a call into smaller
forward passes. Tensors go up pinned and non-blocking, and the call waits for the device once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import itertools
import threading
from collections.abc import Sequence
from typing import Any

from deployments.engines.base import Scored, TokenBudget
from deployments.engines.limits import input_limit, usable_positions

DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_MAX_BATCH_TOKENS = 32768  # e.g. 128 inputs of 256 tokens in one forward pass
_LENGTH_SPREAD = 2.0  # a forward pass never pads an input to more than twice its length


def select_device(requested: str, *, cuda_available: bool, gpu_ids: Sequence[str] | None) -> str:
    """'auto': CUDA when this process may use a GPU, else CPU. `gpu_ids` are the GPUs Ray assigned
    the replica (an empty tuple: it holds none; since Ray 2.4x a replica without GPUs still sees
    every GPU of its node, so CUDA being visible is not enough); None outside Ray: any visible GPU."""
    if requested == "cpu":
        return "cpu"
    if requested.startswith("cuda"):
        if not cuda_available:
            raise ValueError(f"device {requested!r} was asked for, but CUDA is not available in this process")
        return requested
    if requested != "auto":
        raise ValueError(f"device must be one of {DEVICES} (or cuda:N), not {requested!r}")
    holds_gpu = gpu_ids is None or len(gpu_ids) > 0
    return "cuda" if cuda_available and holds_gpu else "cpu"


def select_dtype(requested: str, device: str) -> str:
    """'auto': float16 on CUDA (the tensor cores' speed), float32 on CPU (no fast half kernels)."""
    if requested == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    if requested not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {DTYPES}, not {requested!r}")
    return requested


def plan_batches(lengths: Sequence[int], max_tokens: int, spread: float = _LENGTH_SPREAD) -> list[list[int]]:
    """Indices grouped into forward passes, longest first. A pass pads every input to its first
    (longest) one; it holds at most `max_tokens` padded tokens and no input shorter than
    1/`spread` of that width. An input longer than `max_tokens` runs alone."""
    groups: list[list[int]] = []
    width = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        current = groups[-1] if groups else None
        if current is None or (len(current) + 1) * width > max_tokens or n * spread < width:
            groups.append([i])
            width = n
        else:
            current.append(i)
    return groups


@dataclasses.dataclass
class _Tokens:
    ids: list[list[int]]  # what the model sees: cut to the limit, special tokens included
    type_ids: list[list[int]] | None  # BERT-style segment ids, when the tokenizer makes them
    lengths: list[int]  # before cutting: token counts and truncation flags come from these


class TransformersEncoder(TokenBudget):
    def __init__(
        self,
        path: str,
        *,
        mode: str = "cross_encoder",
        device: str = "auto",
        dtype: str = "auto",
        gpu_ids: Sequence[str] | None = None,
        max_input_tokens: int | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        pipeline_items: int | None = None,
        trust_remote_code: bool = False,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """`pipeline_items`: inputs per tokenization step, overlapped with the device (default: the
        whole call as one step). `model_kwargs` go to `from_pretrained`."""
        import torch

        self._torch = torch
        self.mode = getattr(mode, "value", mode)
        if self.mode not in ("cross_encoder", "bi_encoder", "yes_no_logits"):
            raise ValueError(f"unknown mode {self.mode!r}")
        self.cross_encoder = self.mode != "bi_encoder"  # both pair scorers see query and document together
        self.device = select_device(device, cuda_available=torch.cuda.is_available(), gpu_ids=gpu_ids)
        self.dtype = select_dtype(dtype, self.device)
        self.max_batch_tokens = max_batch_tokens
        on_cuda = self.device.startswith("cuda")
        self.pipeline_items = pipeline_items
        self._pad_multiple = 8 if on_cuda else 1  # fp16 tensor cores like widths in multiples of 8
        kwargs = {**(model_kwargs or {}), "dtype": getattr(torch, self.dtype)}

        self._prompt: str | None = None
        self._st_inputs = False  # True: sentence-transformers builds the model's inputs itself
        if self.mode == "yes_no_logits":
            network, tokenizer_max = self._load_causal_lm(path, trust_remote_code, kwargs)
        else:
            network, tokenizer_max = self._load_sentence_transformers(path, trust_remote_code, kwargs)
        self.max_input_tokens = input_limit(
            positions=_position_table(network), tokenizer_max=tokenizer_max, configured=max_input_tokens
        )
        if self.mode != "yes_no_logits":
            self.model.max_seq_length = self.max_input_tokens  # sentence-transformers cuts there too
        self._pad_id = self.tokenizer.pad_token_id or 0
        self._left_pad = self.mode == "yes_no_logits" or self.tokenizer.padding_side == "left"
        self.tokenizer_lock = threading.Lock()
        self._device_lock = threading.Lock()
        self._tokenizer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenizer")

    def _load_causal_lm(self, path: str, trust_remote_code: bool, kwargs: dict[str, Any]) -> tuple[Any, int]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        self.model.to(self.device).eval()
        self._yes_no = [self.tokenizer.convert_tokens_to_ids(t) for t in ("no", "yes")]
        # Only the last position's logits are read: without this a long batch would hold
        # batch x length x vocabulary logits (gigabytes for a 150k vocabulary).
        self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        return self.model, self.tokenizer.model_max_length

    def _load_sentence_transformers(self, path: str, trust_remote_code: bool, kwargs: dict[str, Any]) -> tuple[Any, int]:
        from sentence_transformers import CrossEncoder, SentenceTransformer

        cls = CrossEncoder if self.mode == "cross_encoder" else SentenceTransformer
        self.model = cls(path, device=self.device, trust_remote_code=trust_remote_code, model_kwargs=kwargs)
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        if getattr(self.model, "default_prompt_name", None):
            self._prompt = self.model.prompts.get(self.model.default_prompt_name)
        modalities = getattr(self.model[0], "modality_config", None) or {"text": None}
        # Chat-template backbones and default prompts: let sentence-transformers write the inputs.
        self._st_inputs = bool(self._prompt) or "message" in modalities or "text" not in modalities
        return self.model.transformers_model, self.model.max_seq_length

    # --- rerank ---
    def score_pairs(self, pairs: list[tuple[str, str]]) -> list[Scored]:
        if not pairs:
            return []
        if self.mode == "bi_encoder":
            return self._cosine_pairs(pairs)
        values, lengths = self._run(pairs)
        limit = self.max_input_tokens
        return [Scored(float(v), min(n, limit), n > limit) for v, n in zip(values.tolist(), lengths)]

    def _cosine_pairs(self, pairs: list[tuple[str, str]]) -> list[Scored]:
        normalize = self._torch.nn.functional.normalize
        queries = list(dict.fromkeys(p[0] for p in pairs))
        vecs, lengths = self._run(queries + [p[1] for p in pairs])
        q_vecs, d_vecs = normalize(vecs[: len(queries)], dim=1), normalize(vecs[len(queries):], dim=1)
        row = {q: i for i, q in enumerate(queries)}
        q_idx = [row[p[0]] for p in pairs]
        scores = (q_vecs[q_idx] * d_vecs).sum(-1).tolist()
        limit, q_lens, d_lens = self.max_input_tokens, lengths[: len(queries)], lengths[len(queries):]
        return [
            Scored(s, min(q_lens[qi], limit) + min(dl, limit), q_lens[qi] > limit or dl > limit)
            for s, qi, dl in zip(scores, q_idx, d_lens)
        ]

    # --- embeddings ---
    def embed(self, texts: list[str]) -> list[Scored]:
        if not texts:
            return []
        vecs, lengths = self._run(texts)
        limit = self.max_input_tokens
        return [Scored(v, min(n, limit), n > limit) for v, n in zip(vecs.tolist(), lengths)]

    # --- the two stages ---
    def _run(self, items: Sequence[Any]) -> tuple[Any, list[int]]:
        """One row per item (a score or a vector) as a CPU float32 tensor in the caller's order,
        and each item's untruncated token count."""
        torch = self._torch
        step = self.pipeline_items or len(items)
        chunks = [items[i : i + step] for i in range(0, len(items), step)]
        pending = [self._tokenizer_thread.submit(self._tokenize, c) for c in chunks]
        outputs, order, lengths = [], [], []
        try:
            pending[0].result()  # hold the device only once there is work for it
            with self._device_lock, torch.inference_mode():
                offset = 0
                for chunk, future in zip(chunks, pending):
                    tokens = future.result()
                    for group in plan_batches([len(r) for r in tokens.ids], self.max_batch_tokens):
                        outputs.append(self._forward(self._features(tokens, group, chunk)))
                        order.extend(offset + i for i in group)
                    lengths.extend(tokens.lengths)
                    offset += len(chunk)
                done = torch.cat(outputs).float().cpu()  # the one wait for the device
        finally:
            for future in pending:
                future.cancel()
        result = torch.empty_like(done)
        result[torch.tensor(order)] = done
        return result, lengths

    def _tokenize(self, items: Sequence[Any]) -> _Tokens:
        limit, tok = self.max_input_tokens, self.tokenizer
        with self.tokenizer_lock:
            if self.mode == "yes_no_logits":
                full = tok([q + d for q, d in items], add_special_tokens=False, verbose=False)["input_ids"]
                # The replica fitted templated documents already; a cut here drops the template's tail.
                return _Tokens([ids[:limit] for ids in full], None, [len(ids) for ids in full])
            args = ([p[0] for p in items], [p[1] for p in items]) if self.cross_encoder else (list(items),)
            enc = tok(*args, truncation=False, return_attention_mask=False, verbose=False)  # long ones are cut below
            ids, type_ids = enc["input_ids"], enc.get("token_type_ids")
            lengths = [len(r) for r in ids]
            over = [i for i, n in enumerate(lengths) if n > limit]
            if over:
                cut_args = [[a[i] for i in over] for a in args]
                cut = tok(*cut_args, truncation="longest_first" if self.cross_encoder else True,
                          max_length=limit, return_attention_mask=False)
                for j, i in enumerate(over):
                    ids[i] = cut["input_ids"][j]
                    if type_ids is not None:
                        type_ids[i] = cut["token_type_ids"][j]
            return _Tokens(ids, type_ids, lengths)

    def _features(self, tokens: _Tokens, group: list[int], chunk: Sequence[Any]) -> dict[str, Any]:
        torch = self._torch
        if self._st_inputs:
            with self.tokenizer_lock:
                feats = self.model.preprocess([chunk[i] for i in group], prompt=self._prompt)
            return {k: self._to_device(v) if isinstance(v, torch.Tensor) else v for k, v in feats.items()}
        shape = (self._left_pad, self._pad_multiple, self.max_input_tokens)
        ids, mask = _pad([tokens.ids[i] for i in group], self._pad_id, *shape)
        feats = {"input_ids": ids, "attention_mask": mask}
        if tokens.type_ids is not None:
            feats["token_type_ids"], _ = _pad([tokens.type_ids[i] for i in group], 0, *shape)
        return {k: self._to_device(torch.from_numpy(v)) for k, v in feats.items()}

    def _to_device(self, t: Any) -> Any:
        if self.device == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)  # pageable memory would sync the stream

    def _forward(self, feats: dict[str, Any]) -> Any:
        torch = self._torch
        if self.mode == "yes_no_logits":
            mask = feats["attention_mask"]
            # Left padding: real positions count from each row's first token, as without padding.
            extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
            logits = self.model(input_ids=feats["input_ids"], attention_mask=mask,
                                position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **extra).logits[:, -1, :]
            return torch.softmax(logits[:, self._yes_no].float(), dim=-1)[:, 1]
        out = self.model(feats)
        if self.mode == "bi_encoder":
            return out["sentence_embedding"][:, : self.model.truncate_dim].float()  # a Matryoshka model's saved width
        logits = out["scores"].float()
        if logits.ndim == 2 and logits.shape[1] > 1:
            return torch.softmax(logits, dim=-1)[:, -1]
        return self.model.activation_fn(logits).reshape(-1)


def _pad(rows: list[list[int]], value: int, left: bool, multiple: int, limit: int):
    """Rows as one (n, width) int64 array plus its attention mask, built in numpy: the tokenizer's
    own padding and tensor conversion cost nearly as much as tokenizing (docs/ARCHITECTURE.md).
    The width rounds up to `multiple` but never past `limit`: absolute positions end there."""
    import numpy as np

    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    longest = int(lens.max())
    width = max(longest, min(-(-longest // multiple) * multiple, limit))
    cols = np.arange(width)[None, :]
    mask = cols >= (width - lens)[:, None] if left else cols < lens[:, None]
    out = np.full((len(rows), width), value, dtype=np.int64)
    out[mask] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lens.sum()))
    return out, mask.astype(np.int64)


def _position_table(network: Any) -> int | None:
    """Positions the loaded model accepts: a learned position table, less RoBERTa's padding_idx
    offset where the embedding module has one; else (rotary models) the config's count."""
    import torch

    for module in network.modules():
        table = getattr(module, "position_embeddings", None)
        if isinstance(table, torch.nn.Embedding):
            pad = getattr(module, "padding_idx", None)
            return table.num_embeddings - (pad + 1 if isinstance(pad, int) else 0)
    cfg = network.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return usable_positions(cfg.model_type, getattr(cfg, "max_position_embeddings", None), getattr(cfg, "pad_token_id", None))
