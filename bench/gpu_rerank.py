"""Rerank pairs/s on one GPU, same run, same model, same pairs: the raw fp16 model vs
sentence-transformers' CrossEncoder vs our TransformersEncoder (the call a rerank replica makes).

    python bench/gpu_rerank.py            (needs only torch, transformers, sentence-transformers)

A BERT-base-size cross-encoder (12 layers, hidden 768, random weights, tokenizer built offline
from tests/tiny_models.py), query 16 + document 200 tokens. Rows:
- raw: tokenizer(padding, tensors) -> .to(cuda) -> model(**enc) in fp16, at batch 32/128/512,
  tokenization included; the best of these is the baseline every ratio is against;
- forward only: the same model at the best batch on inputs tokenized beforehand (the ceiling);
- sentence-transformers CrossEncoder fp16 `predict` at batch 32/128;
- ours: `score_pairs` over lists of a batch's size as shipped (one tokenization step per call),
  with tokenization pipelined in 64-input steps, and from two threads at once (what a replica
  running two batches at once would do).
Without CUDA it runs a small model in fp32 with small counts, to check the script itself.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import platform
import random
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from deployments.engines.transformers_encoder import TransformersEncoder  # noqa: E402
from tests.tiny_models import WORDS, build_tiny_cross_encoder  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float16 if CUDA else torch.float32
DT = "fp16" if CUDA else "fp32"
# GPU: BERT-base and enough pairs for steady rates (~1 min in all). CPU: a check that it runs.
SIZE = dict(hidden=768, layers=12, heads=12) if CUDA else dict(hidden=128, layers=2, heads=2)
PAIRS = 4096 if CUDA else 128
RAW_BATCHES = (32, 128, 512) if CUDA else (8, 32)
ST_BATCHES = (32, 128) if CUDA else (8, 32)
OURS_BATCHES = (128, 512) if CUDA else (32,)
QUERY_TOKENS, DOC_TOKENS = 16, 200


def workload(n: int) -> list[tuple[str, str]]:
    rnd = random.Random(0)
    text = lambda k: " ".join(rnd.choice(WORDS) for _ in range(k))  # noqa: E731 - one token per word
    return [(text(QUERY_TOKENS), text(DOC_TOKENS)) for _ in range(n)]


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def rate(run, batches, pairs_per_batch=len) -> float:
    """Pairs per second over every batch, after one warm-up batch."""
    run(batches[0])
    sync()
    t0 = time.perf_counter()
    for b in batches:
        run(b)
    sync()
    return sum(pairs_per_batch(b) for b in batches) / (time.perf_counter() - t0)


def split(pairs: list, size: int) -> list[list]:
    return [pairs[i : i + size] for i in range(0, len(pairs), size)]


def main() -> None:
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out: dict = {"device": torch.cuda.get_device_name() if CUDA else platform.processor() or "cpu",
                 "dtype": str(DTYPE).removeprefix("torch."), "model": SIZE, "pairs": PAIRS,
                 "torch": torch.__version__, "cpus": os.cpu_count(), "rows": {}}
    rows = out["rows"]
    pairs = workload(PAIRS)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = build_tiny_cross_encoder(pathlib.Path(tmp) / "ce", positions=512, **SIZE)
        print(f"[bench] model built in {time.perf_counter() - t0:.1f}s on {out['device']}", flush=True)

        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=DTYPE).to(DEVICE).eval()

        def raw(batch):
            enc = tok([q for q, _ in batch], [d for _, d in batch], padding=True, truncation=True,
                      max_length=512, return_tensors="pt").to(DEVICE)
            with torch.inference_mode():
                return model(**enc).logits.float().cpu()

        raw_rows: dict[int, float] = {}
        for b in RAW_BATCHES:
            rows[f"raw {DT} model, batch {b} (tokenization included)"] = raw_rows[b] = rate(raw, split(pairs, b))
            print(f"[bench] raw batch {b}: {raw_rows[b]:.0f} pairs/s", flush=True)
        best_batch = max(raw_rows, key=raw_rows.get)
        best = raw_rows[best_batch]

        ready = [tok([q for q, _ in b], [d for _, d in b], padding=True, return_tensors="pt").to(DEVICE)
                 for b in split(pairs, best_batch)]
        with torch.inference_mode():
            rows[f"forward only, batch {best_batch} (tokenized beforehand)"] = rate(
                lambda enc: model(**enc).logits, ready, lambda enc: enc["input_ids"].shape[0])  # len(enc) counts keys
        tokenize_only = lambda b: tok([q for q, _ in b], [d for _, d in b], padding=True, return_tensors="pt")  # noqa: E731
        rows[f"tokenizer only, batch {best_batch} (padded tensors)"] = rate(tokenize_only, split(pairs, best_batch))
        del model, ready

        ce = CrossEncoder(str(path), device=DEVICE, model_kwargs={"dtype": DTYPE})
        for b in ST_BATCHES:
            rows[f"sentence-transformers CrossEncoder {DT}, batch {b}"] = rate(
                lambda chunk, b=b: ce.predict(chunk, batch_size=b, show_progress_bar=False), split(pairs, 1024))
        del ce

        for label, kwargs in (("as shipped", {}), ("tokenization pipelined in 64-input steps", {"pipeline_items": 64})):
            enc = TransformersEncoder(str(path), **kwargs)
            for b in OURS_BATCHES:
                rows[f"ours, score_pairs x {b}, {label}"] = rate(enc.score_pairs, split(pairs, b))
            if not kwargs:  # as shipped
                rows[f"ours, tokenize only x {OURS_BATCHES[0]}"] = rate(enc._tokenize, split(pairs, OURS_BATCHES[0]))
                with concurrent.futures.ThreadPoolExecutor(2) as pool:
                    b = OURS_BATCHES[0]
                    rows[f"ours, score_pairs x {b} from 2 threads"] = rate(
                        lambda chunk: list(pool.map(enc.score_pairs, split(chunk, b))), split(pairs, 8 * b))
            del enc

    width = max(len(k) for k in rows)
    ceiling = next(v for k, v in rows.items() if k.startswith("forward only"))
    print(f"\nrerank pairs/s on {out['device']} ({out['dtype']}), query {QUERY_TOKENS} + document "
          f"{DOC_TOKENS} tokens, {PAIRS} pairs per row; ratios against the raw model at batch {best_batch} "
          "and against the forward pass alone")
    for name, value in rows.items():
        print(f"  {name:<{width}}  {value:9.0f}  {value / best:5.2f}x raw  {value / ceiling:5.2f}x forward")
    out["raw_best_batch"], out["ratios"] = best_batch, {k: round(v / best, 3) for k, v in rows.items()}
    print("\n" + json.dumps(out))


if __name__ == "__main__":
    main()
