"""bench/gpu_rerank.py's whole main path on the CPU with a tiny model, so a counting or ratio bug
shows here, not first on the lent GPU (the "forward only" row once counted a BatchEncoding's keys
as its pairs and printed 238 pairs/s on an H200). Each row's claimed pairs are checked against the
rows the model itself produced while that row was measured."""

from __future__ import annotations

import dataclasses
import json
import math
import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sentence_transformers")

from bench import gpu_rerank  # noqa: E402

TINY = dataclasses.replace(
    gpu_rerank.CPU, hidden=32, layers=1, heads=2, positions=128, pairs=16, runs=3, raw_batches=(4, 8),
    st_batches=(8,), ours_batches=(8,), query_tokens=4, doc_tokens=24, doc_range=(4, 60), pipeline_items=4,
    thread_batches=2,
)


@pytest.fixture
def model_rows(monkeypatch):
    """Rows the BERT encoder ran, per measured row."""
    from transformers import BertModel

    lock, seen, per_row = threading.Lock(), [0], {}

    def count(module, _args, output):
        if isinstance(module, BertModel):  # sentence-transformers calls the head model's .forward directly, past hooks
            with lock:
                seen[0] += output.last_hidden_state.shape[0]

    real = gpu_rerank.measure

    def observed(name, *args, **kwargs):
        before = seen[0]
        row = real(name, *args, **kwargs)
        per_row[name] = seen[0] - before
        return row

    monkeypatch.setattr(gpu_rerank, "measure", observed)
    handle = torch.nn.modules.module.register_module_forward_hook(count)
    yield per_row
    handle.remove()


def test_every_row_counts_the_pairs_it_scored(model_rows, capsys):
    result = gpu_rerank.main([], cfg=TINY)
    printed = capsys.readouterr().out
    out = json.loads(printed.strip().splitlines()[-1])
    assert out == json.loads(json.dumps(result))
    assert set(out["versions"]) >= {"python", "torch", "transformers", "sentence-transformers", "device"}

    assert len(out["workloads"]) == 2
    for name, res in out["workloads"].items():
        rows = res["rows"]
        assert res["baseline"] in rows and res["baseline"].startswith("raw ")
        assert res["ceiling"] in rows and res["ceiling"].startswith("forward only")
        assert "padded tensors" in res["old baseline"] and rows[res["old baseline"]]["vs_baseline"] <= 1.0
        assert f"baseline: {res['baseline']}" in printed
        assert rows[res["baseline"]]["vs_baseline"] == 1.0
        assert any("padded tensors" in r for r in rows) and any("lists + numpy" in r for r in rows)
        assert sum("overlap" in r for r in rows) == 2
        for label, r in rows.items():
            assert r["pairs"] == TINY.pairs, (name, label)
            expected = r["warmup_pairs"] + TINY.runs * r["pairs"] if r["forward"] else 0
            assert model_rows[label] == expected, (name, label, model_rows[label], r)
            for key in ("median", "min", "max", "vs_baseline", "vs_forward"):
                assert math.isfinite(r[key]) and r[key] > 0, (name, label, key, r[key])
            assert r["min"] <= r["median"] <= r["max"]

    varied = next(res for name, res in out["workloads"].items() if name.startswith("varied"))
    fixed = next(res for name, res in out["workloads"].items() if name.startswith("fixed"))
    assert fixed["pair tokens (min/median/max)"] == [TINY.query_tokens + TINY.doc_tokens + 3] * 3
    lo, _, hi = varied["pair tokens (min/median/max)"]
    assert hi - lo > 20  # the varied workload really varies


def test_a_pass_that_misses_pairs_stops_the_bench():
    calls = iter([2, 2, 2, 1])
    with pytest.raises(RuntimeError, match="counted"):
        gpu_rerank.measure("row", lambda _b: next(calls), [[0, 0]], expected=2, runs=3, device="cpu")
