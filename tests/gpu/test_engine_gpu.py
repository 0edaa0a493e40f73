"""The GPU suite's engine layer: encoders on CUDA in the configured dtype, matching
sentence-transformers run directly on the same model, cutting long inputs without breaking the
CUDA context, batching by tokens in the caller's order.

Needs only torch, transformers and sentence-transformers (the GPU test machine has those and no
Ray, vLLM or pydantic): the engine is built from plain arguments and the models on the fly from
configs and offline tokenizers (tests/tiny_models.py). Skipped where CUDA is absent;
ENGINE_SUITE_DEVICE=cpu runs the same checks on the CPU (a dry run of the suite itself).

    python3 -m pytest -m gpu tests/gpu      (or: python3 tests/gpu/test_engine_gpu.py)
"""

from __future__ import annotations

import os
import pathlib
import random
import sys

import pytest

torch = pytest.importorskip("torch")
DEVICE = os.environ.get("ENGINE_SUITE_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")]

if __name__ == "__main__":  # run as a script: the repository root is not on sys.path yet
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from deployments.engines.transformers_encoder import TransformersEncoder, select_dtype  # noqa: E402
from tests.tiny_models import WORDS  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
MINILM = ROOT / "models" / "all-minilm-l6-v2"
TOL = 1e-2  # float16 against float32, and against differently padded batches


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.tiny_models import (
        build_tiny_cross_encoder, build_tiny_qwen3_reranker, build_tiny_st_bi_encoder, build_tiny_xlmr_cross_encoder,
    )

    root = tmp_path_factory.mktemp("gpu-models")
    return {
        # mid-size, so float16 is exercised on real matrix shapes without BERT-base build time
        "ce": build_tiny_cross_encoder(root / "ce", hidden=256, layers=4, heads=4, positions=512),
        "xlmr": build_tiny_xlmr_cross_encoder(root / "xlmr"),
        "bi": build_tiny_st_bi_encoder(root / "bi"),
        "bi_mean": build_tiny_st_bi_encoder(root / "bi-mean", pooling="mean", dense=False, normalize=True),
        "qwen3": build_tiny_qwen3_reranker(root / "tiny-qwen3-reranker"),
    }


def words(n: int, seed: int) -> str:
    rnd = random.Random(seed)
    return " ".join(rnd.choice(WORDS) for _ in range(n))


def pairs(n: int) -> list[tuple[str, str]]:
    return [(words(8, i), words(5 + (37 * i) % 180, 1000 + i)) for i in range(n)]


@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "float32"])
def test_parameters_on_the_device_in_the_configured_dtype(models, dtype):
    expected = select_dtype(dtype, DEVICE)  # auto: float16 on CUDA
    for path, mode in ((models["ce"], "cross_encoder"), (models["bi"], "bi_encoder"), (models["qwen3"], "yes_no_logits")):
        enc = TransformersEncoder(str(path), mode=mode, dtype=dtype)  # device auto: CUDA wherever it is visible
        assert (enc.device, enc.dtype) == (DEVICE, expected)
        params = list(enc.model.parameters())
        assert {p.device.type for p in params} == {DEVICE}, mode
        assert {p.dtype for p in params} == {getattr(torch, expected)}, mode  # Dense and Pooling modules too


def test_a_replica_without_gpus_stays_on_the_cpu(models):
    enc = TransformersEncoder(str(models["ce"]), gpu_ids=())  # Ray gave it none, though CUDA is visible
    assert enc.device == "cpu" and {p.device.type for p in enc.model.parameters()} == {"cpu"}


def test_rerank_matches_sentence_transformers_cross_encoder(models):
    from sentence_transformers import CrossEncoder

    batch = pairs(48)
    ours = [s.value for s in TransformersEncoder(str(models["ce"])).score_pairs(batch)]
    for dtype in (torch.float16, torch.float32):
        ref = CrossEncoder(str(models["ce"]), device=DEVICE, model_kwargs={"dtype": dtype}).predict(batch, batch_size=16)
        assert ours == pytest.approx(ref.tolist(), abs=TOL), dtype


@pytest.mark.parametrize("name", ["bi", "bi_mean"])
def test_embeddings_match_sentence_transformers(models, name):
    """Last-token pooling + Dense + no Normalize, and mean + Normalize: the model's modules decide."""
    from sentence_transformers import SentenceTransformer

    texts = [words(1 + (13 * i) % 120, i) for i in range(40)]
    enc = TransformersEncoder(str(models[name]), mode="bi_encoder")
    ours = torch.tensor([s.value for s in enc.embed(texts)])
    ref = SentenceTransformer(str(models[name]), device=DEVICE).encode(texts, convert_to_tensor=True).float().cpu()
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < TOL
    cos = torch.nn.functional.cosine_similarity(ref[:1], ref[1:], dim=1)
    scores = [s.value for s in enc.score_pairs([(texts[0], t) for t in texts[1:]])]
    assert scores == pytest.approx(cos.tolist(), abs=TOL)


@pytest.mark.skipif(not (MINILM / "config.json").exists(), reason="models/all-minilm-l6-v2 not prepared here")
def test_minilm_embeddings_match_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    texts = ["A cat sits on the mat.", "Stock prices fell sharply. " * 60, "Paris is the capital of France."]
    ours = torch.tensor([s.value for s in TransformersEncoder(str(MINILM), mode="bi_encoder").embed(texts)])
    ref = SentenceTransformer(str(MINILM), device=DEVICE).encode(texts, convert_to_tensor=True).float().cpu()
    assert (ours - ref).abs().max().item() < TOL


def test_long_input_is_cut_and_the_cuda_context_survives(models):
    """XLM-R: 514 positions, 512 usable. A 600-token document used to hit a device-side assert that
    broke every later request in the process."""
    enc = TransformersEncoder(str(models["xlmr"]))
    short = ("capital of france", "paris is the capital")
    alone = enc.score_pairs([short])[0].value
    long, beside = enc.score_pairs([("capital of france", "paris " * 600), short])
    assert long.truncated and long.tokens == 512 and not beside.truncated
    assert beside.value == pytest.approx(alone, abs=TOL)
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # a device-side assert would surface here
    assert enc.score_pairs([short])[0].value == pytest.approx(alone, abs=TOL)


def test_token_batches_come_back_in_the_callers_order(models):
    enc = TransformersEncoder(str(models["ce"]), max_batch_tokens=1024, pipeline_items=5)
    batch = pairs(30)
    widths = []
    forward = enc._forward
    enc._forward = lambda feats: widths.append(feats["input_ids"].shape[1]) or forward(feats)
    together = [s.value for s in enc.score_pairs(batch)]
    assert len(widths) > 6  # five-input steps, each split by length
    alone = [enc.score_pairs([p])[0].value for p in batch]
    assert together == pytest.approx(alone, abs=TOL)


def test_yes_no_reranker_on_cuda_matches_the_unpadded_model(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batch = [("what is the capital ", words(n, n)) for n in (3, 40, 1, 90)]
    ours = [s.value for s in TransformersEncoder(str(models["qwen3"]), mode="yes_no_logits").score_pairs(batch)]
    tok = AutoTokenizer.from_pretrained(models["qwen3"])
    model = AutoModelForCausalLM.from_pretrained(models["qwen3"]).eval()
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    ref = []
    for q, d in batch:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([tok(q + d, add_special_tokens=False)["input_ids"]])).logits[0, -1]
        ref.append(torch.softmax(logits[[no, yes]], -1)[1].item())
    assert ours == pytest.approx(ref, abs=TOL)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "gpu", "-q", "-p", "no:cacheprovider"]))
