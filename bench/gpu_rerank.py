"""Rerank pairs/s on one GPU, same run, same model, same pairs: the raw fp16 model (two ways of
feeding it), sentence-transformers' CrossEncoder, and our TransformersEncoder (the call a rerank
replica makes).

    python bench/gpu_rerank.py [--runs N] [--pairs N]
    (needs only torch, transformers, sentence-transformers and numpy: the GPU test machine has no
    Ray, vLLM or pydantic, and deployments/engines imports none of them)

A BERT-base-size cross-encoder (12 layers, hidden 768, random weights, tokenizer built offline
from tests/tiny_models.py). Two seeded workloads, each scored whole by every row:
- fixed: query 16 + document 200 tokens, every pair 219 tokens with specials, so length sorting
  can do nothing there;
- varied: query 16 + documents of 20-500 tokens drawn log-uniform (median ~100), pairs cut to
  the model's 512 positions.
Rows, per workload:
- raw, padded tensors: tokenizer(padding, return_tensors="pt") -> .to(cuda) -> model, at batch
  32/128/512 (transformers' own padding and tensor building are slow: this is the old baseline);
- raw, lists + numpy: the fast tokenizer to lists (truncation, no padding), padded with numpy to
  the batch's longest, torch.from_numpy -> .to(cuda) -> model, the same batches. The fastest raw
  row is the baseline every ratio is against; the output names it;
- forward only at the baseline's batch, on inputs tokenized beforehand, in arrival order and
  length-sorted; the faster is the ceiling;
- tokenizer only, both ways, at the baseline's batch;
- sentence-transformers CrossEncoder `predict` at batch 32/128;
- ours: `score_pairs` over lists of a batch's size as shipped (one tokenization step per call),
  and two opt-in ways to overlap tokenization with the forward pass: `pipeline_items` (the next
  step is tokenized while the GPU runs the current one) and two threads each calling
  `score_pairs` (what a replica running two batches at once would do).
Every row runs one warm-up batch, then `--runs` timed passes over the whole workload (default 3);
its rate is the median pass, min and max beside it. Each row counts the pairs it scored from what
the model gave back, and a pass that did not score every pair of its workload stops the script
(an earlier version counted a BatchEncoding's keys as pairs). Without CUDA it runs a small model
in fp32 with small counts, to check the script itself; tests/test_gpu_rerank_smoke.py runs it
tinier still.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import math
import os
import pathlib
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deployments.engines.transformers_encoder import TransformersEncoder  # noqa: E402
from tests.tiny_models import WORDS, build_tiny_cross_encoder  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    device: str
    dtype: str  # a torch dtype's name
    hidden: int
    layers: int
    heads: int
    positions: int  # the model's position table; pairs are cut to it
    pairs: int  # per workload, scored once per timed pass
    runs: int
    raw_batches: tuple[int, ...]
    st_batches: tuple[int, ...]
    ours_batches: tuple[int, ...]
    query_tokens: int = 16
    doc_tokens: int = 200  # the fixed workload
    doc_range: tuple[int, int] = (20, 500)  # the varied workload, log-uniform
    pipeline_items: int = 64
    thread_batches: int = 8  # batches handed to the two threads per timed call
    seed: int = 0


# GPU: BERT-base, ~1.5 min in all on an H200 (estimated from the 2026-11-28 rates). CPU: a check
# that the script runs.
GPU = Config("cuda", "float16", 768, 12, 12, 512, pairs=2048, runs=3,
             raw_batches=(32, 128, 512), st_batches=(32, 128), ours_batches=(128, 512))
CPU = Config("cpu", "float32", 128, 2, 2, 512, pairs=64, runs=3,
             raw_batches=(8, 32), st_batches=(32,), ours_batches=(32,), pipeline_items=16, thread_batches=2)


@dataclasses.dataclass
class Row:
    name: str
    rates: list[float]  # pairs/s of each timed pass
    pairs: int  # pairs scored per pass, counted from the outputs
    warmup_pairs: int
    forward: bool  # False: tokenization only, the model never runs

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def workloads(cfg: Config) -> dict[str, list[tuple[str, str]]]:
    rnd = random.Random(cfg.seed)
    text = lambda k: " ".join(rnd.choice(WORDS) for _ in range(k))  # noqa: E731 - one token per word
    lo, hi = cfg.doc_range
    fixed = [(text(cfg.query_tokens), text(cfg.doc_tokens)) for _ in range(cfg.pairs)]
    varied = [(text(cfg.query_tokens), text(round(math.exp(rnd.uniform(math.log(lo), math.log(hi))))))
              for _ in range(cfg.pairs)]
    return {f"fixed: query {cfg.query_tokens} + document {cfg.doc_tokens} tokens": fixed,
            f"varied: query {cfg.query_tokens} + document {lo}-{hi} tokens, log-uniform": varied}


def split(items: Sequence, size: int) -> list:
    return [items[i : i + size] for i in range(0, len(items), size)]


def pad_numpy(enc, pad_id: int) -> dict[str, np.ndarray]:
    """A tokenizer's unpadded lists as int64 arrays padded to the longest row, plus the attention
    mask: what a user who skips the tokenizer's own padding writes. Kept apart from the engine's
    `_pad` on purpose: the baseline must not run our code."""
    ids = enc["input_ids"]
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    mask = np.arange(lens.max())[None, :] < lens[:, None]
    out = {"attention_mask": mask.astype(np.int64)}
    for key, fill in (("input_ids", pad_id), ("token_type_ids", 0)):
        if key in enc:
            arr = np.full(mask.shape, fill, dtype=np.int64)
            arr[mask] = np.fromiter(itertools.chain.from_iterable(enc[key]), dtype=np.int64, count=int(lens.sum()))
            out[key] = arr
    return out


def measure(name: str, run: Callable[[object], int], batches: Sequence, *, expected: int, runs: int,
            device: str, forward: bool = True) -> Row:
    """`run(batch)` scores one batch and returns how many pairs it scored, counted from what came
    back (rows of logits, scores); every timed pass must add up to `expected`."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    warm = run(batches[0])
    sync()
    rates, counts = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        n = 0
        for b in batches:
            n += run(b)
        sync()
        rates.append(n / (time.perf_counter() - t0))
        counts.append(n)
    if any(n != expected for n in counts):
        raise RuntimeError(f"{name}: counted {counts} pairs in its passes, the workload has {expected}")
    return Row(name, rates, expected, warm, forward)


def versions(cfg: Config) -> dict[str, object]:
    import sentence_transformers
    import tokenizers
    import transformers

    on_cuda = cfg.device.startswith("cuda")
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "sentence-transformers": sentence_transformers.__version__,
            "tokenizers": tokenizers.__version__, "numpy": np.__version__,
            "device": torch.cuda.get_device_name(cfg.device) if on_cuda else platform.processor() or "cpu",
            "cpus": os.cpu_count()}


def run_bench(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """Every row on every workload; the result is what main() prints as JSON."""
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    dtype, dt = getattr(torch, cfg.dtype), {"float16": "fp16", "bfloat16": "bf16"}.get(cfg.dtype, "fp32")
    loads = workloads(cfg)
    rows: dict[str, list[Row]] = {w: [] for w in loads}
    info: dict[str, dict] = {w: {} for w in loads}

    def meas(w: str, name: str, run: Callable[[object], int], batches: Sequence, forward: bool = True) -> None:
        row = measure(name, run, batches, expected=len(loads[w]), runs=cfg.runs, device=cfg.device, forward=forward)
        rows[w].append(row)
        log(f"[bench] {w.split(':')[0]}, {name}: {row.median:.0f} pairs/s")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = build_tiny_cross_encoder(pathlib.Path(tmp) / "ce", hidden=cfg.hidden, layers=cfg.layers,
                                        heads=cfg.heads, positions=cfg.positions)
        log(f"[bench] model built in {time.perf_counter() - t0:.1f}s")

        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(cfg.device).eval()
        cut = dict(truncation=True, max_length=cfg.positions)

        def as_lists(batch):
            return tok([q for q, _ in batch], [d for _, d in batch], return_attention_mask=False, **cut)

        def to_device(arrays):
            return {k: torch.from_numpy(v).to(cfg.device) for k, v in arrays.items()}

        def raw_tensors(batch) -> int:
            enc = tok([q for q, _ in batch], [d for _, d in batch], padding=True, return_tensors="pt", **cut)
            with torch.inference_mode():
                return len(model(**enc.to(cfg.device)).logits.float().cpu())

        def raw_lists(batch) -> int:
            feats = to_device(pad_numpy(as_lists(batch), tok.pad_token_id))
            with torch.inference_mode():
                return len(model(**feats).logits.float().cpu())

        def forward_only(feats) -> int:
            with torch.inference_mode():
                return model(**feats).logits.shape[0]

        for w, pairs in loads.items():
            lengths = [len(r) for r in as_lists(pairs)["input_ids"]]
            info[w]["pair tokens (min/median/max)"] = [min(lengths), statistics.median(lengths), max(lengths)]
            raw_batch: dict[str, int] = {}
            for label, fn in (("padded tensors", raw_tensors), ("lists + numpy padding", raw_lists)):
                for b in cfg.raw_batches:
                    meas(w, f"raw {dt} model, batch {b}, {label}", fn, split(pairs, b))
                    raw_batch[rows[w][-1].name] = b
            best = max(rows[w], key=lambda r: r.median)
            info[w]["baseline"], b = best.name, raw_batch[best.name]
            info[w]["old baseline"] = max((r for r in rows[w] if "padded tensors" in r.name), key=lambda r: r.median).name
            order = sorted(range(len(pairs)), key=lambda i: -lengths[i])
            for label, batch_pairs in (("arrival order", split(pairs, b)),
                                       ("length-sorted", split([pairs[i] for i in order], b))):
                ready = [to_device(pad_numpy(as_lists(chunk), tok.pad_token_id)) for chunk in batch_pairs]
                meas(w, f"forward only, batch {b}, {label} (tokenized beforehand)", forward_only, ready)
                del ready
            meas(w, f"tokenizer only, batch {b}, padded tensors",
                 lambda c: len(tok([q for q, _ in c], [d for _, d in c], padding=True, return_tensors="pt", **cut)
                               ["input_ids"]), split(pairs, b), forward=False)
            meas(w, f"tokenizer only, batch {b}, lists + numpy padding",
                 lambda c: len(pad_numpy(as_lists(c), tok.pad_token_id)["input_ids"]), split(pairs, b), forward=False)
        del model

        ce = CrossEncoder(str(path), device=cfg.device, model_kwargs={"dtype": dtype})
        ce.max_seq_length = cfg.positions
        for w, pairs in loads.items():
            for b in cfg.st_batches:
                meas(w, f"sentence-transformers CrossEncoder {dt}, batch {b}",
                     lambda chunk, b=b: len(ce.predict(chunk, batch_size=b, show_progress_bar=False)), split(pairs, 1024))
        del ce

        for label, kwargs in (("as shipped", {}),
                              (f"overlap: pipeline_items={cfg.pipeline_items} (opt-in)",
                               {"pipeline_items": cfg.pipeline_items})):
            enc = TransformersEncoder(str(path), device=cfg.device, dtype=cfg.dtype, **kwargs)
            for w, pairs in loads.items():
                for b in cfg.ours_batches:
                    meas(w, f"ours, score_pairs x {b}, {label}", lambda c: len(enc.score_pairs(c)), split(pairs, b))
                if kwargs:
                    continue
                b = cfg.ours_batches[0]
                meas(w, f"ours, tokenize only x {b}", lambda c: len(enc._tokenize(c).ids), split(pairs, b), forward=False)
                with concurrent.futures.ThreadPoolExecutor(2) as pool:
                    meas(w, f"ours, score_pairs x {b}, overlap: 2 threads (opt-in)",
                         lambda chunk: sum(map(len, pool.map(enc.score_pairs, split(chunk, b)))),
                         split(pairs, cfg.thread_batches * b))
            del enc

    out: dict = {"versions": versions(cfg), "config": dataclasses.asdict(cfg), "workloads": {}}
    for w, found in rows.items():
        baseline = next(r for r in found if r.name == info[w]["baseline"])
        ceiling = max((r for r in found if r.name.startswith("forward only")), key=lambda r: r.median)
        out["workloads"][w] = {**info[w], "ceiling": ceiling.name, "rows": {
            r.name: {"median": r.median, "min": min(r.rates), "max": max(r.rates), "pairs": r.pairs,
                     "warmup_pairs": r.warmup_pairs, "forward": r.forward,
                     "vs_baseline": r.median / baseline.median, "vs_forward": r.median / ceiling.median}
            for r in found}}
    return out


def report(out: dict) -> str:
    v, cfg = out["versions"], out["config"]
    lines = [f"rerank pairs/s on {v['device']} ({cfg['dtype']}), model hidden {cfg['hidden']} x {cfg['layers']} "
             f"layers, {cfg['pairs']} pairs per workload, median of {cfg['runs']} passes (min-max)",
             "versions: " + ", ".join(f"{k} {v[k]}" for k in v if k != "device")]
    for w, res in out["workloads"].items():
        lo, mid, hi = res["pair tokens (min/median/max)"]
        lines += ["", f"{w} (pair tokens with specials: {lo}/{mid:g}/{hi} min/median/max)",
                  f"  baseline: {res['baseline']} (the fastest raw row); ceiling: {res['ceiling']}",
                  f"  the old baseline, the fastest padded-tensor row, is {res['rows'][res['old baseline']]['vs_baseline']:.2f}x"
                  " of it"]
        width = max(map(len, res["rows"]))
        for name, r in res["rows"].items():
            spread = f"({r['min']:.0f}-{r['max']:.0f})"
            lines.append(f"  {name:<{width}}  {r['median']:9.0f} {spread:>15}  {r['vs_baseline']:5.2f}x baseline"
                         f"  {r['vs_forward']:5.2f}x forward")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, cfg: Config | None = None) -> dict:
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--runs", type=int, help="timed passes per row (default 3)")
    args.add_argument("--pairs", type=int, help="pairs per workload")
    opts = args.parse_args(argv)
    cfg = cfg or (GPU if torch.cuda.is_available() else CPU)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("runs", opts.runs), ("pairs", opts.pairs)) if v})
    if cfg.runs < 3:
        raise SystemExit("--runs: at least 3, a row's rate is the median pass")
    out = run_bench(cfg, log=lambda s: print(s, flush=True))
    print("\n" + report(out) + "\n\n" + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
