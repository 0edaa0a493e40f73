"""Encoder engines on CPU: device and dtype choice, real input limits, parity with
sentence-transformers, token batching, and thread safety of both engines."""

from __future__ import annotations

import random
import threading
import time

import pytest

from deployments.engines.build import build_encoder
from deployments.engines.limits import input_limit, usable_positions
from deployments.engines.transformers_encoder import TransformersEncoder, plan_batches, select_device, select_dtype
from serve_app.config import REPO_ROOT, ModelConfig, load_serve_config
from tests.tiny_models import WORDS

MINILM = REPO_ROOT / "models" / "all-minilm-l6-v2"
needs_minilm = pytest.mark.skipif(not (MINILM / "config.json").exists(), reason="run `make models` first")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.tiny_models import build_tiny_cross_encoder, build_tiny_st_bi_encoder, build_tiny_xlmr_cross_encoder

    root = tmp_path_factory.mktemp("encoders")
    return {
        "ce": build_tiny_cross_encoder(root / "ce"), "xlmr": build_tiny_xlmr_cross_encoder(root / "xlmr"),
        "bi": build_tiny_st_bi_encoder(root / "bi"),
    }


def words(n: int, seed: int) -> str:
    rnd = random.Random(seed)
    return " ".join(rnd.choice(WORDS) for _ in range(n))


# --- device and dtype ---

def test_auto_device_follows_the_gpus_ray_assigned():
    assert select_device("auto", cuda_available=True, gpu_ids=("0",)) == "cuda"
    # Since Ray 2.4x a replica without GPUs still sees the node's: visible CUDA is not enough.
    assert select_device("auto", cuda_available=True, gpu_ids=()) == "cpu"
    assert select_device("auto", cuda_available=True, gpu_ids=None) == "cuda"  # outside Ray
    assert select_device("auto", cuda_available=False, gpu_ids=("0",)) == "cpu"
    assert select_device("cpu", cuda_available=True, gpu_ids=("0",)) == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        select_device("cuda", cuda_available=False, gpu_ids=("0",))


def test_auto_dtype_is_half_on_cuda_and_full_on_cpu():
    assert select_dtype("auto", "cuda") == "float16"
    assert select_dtype("auto", "cuda:1") == "float16"
    assert select_dtype("auto", "cpu") == "float32"
    assert select_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError):
        select_dtype("int8", "cuda")


def test_config_device_and_dtype_rules():
    base = {"name": "r", "kind": "rerank", "engine": "transformers", "source": "org/r"}
    assert ModelConfig.model_validate({**base, "dtype": "bfloat16"}).dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig.model_validate({**base, "engine_kwargs": {"torch_dtype": "float16"}})
    with pytest.raises(ValueError, match="num_gpus"):
        ModelConfig.model_validate({**base, "device": "cuda"})
    ModelConfig.model_validate({**base, "device": "cuda", "deployment": {"ray_actor_options": {"num_gpus": 1}}})
    with pytest.raises(ValueError, match="engine_kwargs.dtype"):
        ModelConfig.model_validate({**base, "engine": "vllm", "dtype": "float16"})


def test_configured_dtype_reaches_the_weights(models):
    import torch

    cfg = ModelConfig.model_validate({"name": "r", "kind": "rerank", "engine": "transformers",
                                      "source": str(models["ce"]), "dtype": "bfloat16"})
    enc = build_encoder(cfg, str(models["ce"]), gpu_ids=())
    assert (enc.device, enc.dtype) == ("cpu", "bfloat16")
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in enc.model.parameters()} == {"cpu"}
    assert 0.0 < enc.score_pairs([("paris", "the capital")])[0].value < 1.0


# --- input limits ---

def test_usable_positions_subtract_robertas_padding_offset():
    assert usable_positions("bert", 512, 0) == 512
    assert usable_positions("xlm-roberta", 514, 1) == 512
    assert usable_positions("roberta", 514, 1) == 512
    assert usable_positions("llama", 8192, None) == 8192
    assert usable_positions("bert", None, 0) is None


def test_input_limit_takes_the_smallest_known_and_refuses_more():
    assert input_limit(positions=512, tokenizer_max=int(1e30)) == 512  # a tokenizer without a max
    assert input_limit(positions=512, tokenizer_max=256) == 256
    assert input_limit(positions=None) == 512
    assert input_limit(positions=512, configured=128) == 128
    with pytest.raises(ValueError, match="exceeds the model's limit 512"):
        input_limit(positions=514 - 2, configured=514)


def test_engine_limits_for_bert_xlmr_and_minilm(models):
    assert TransformersEncoder(str(models["ce"])).max_input_tokens == 64  # BERT: all 64 positions
    assert TransformersEncoder(str(models["xlmr"])).max_input_tokens == 512  # 514 positions, padding offset 2
    if (MINILM / "config.json").exists():  # 512 positions, trained at 256 (sentence_bert_config)
        assert TransformersEncoder(str(MINILM), mode="bi_encoder").max_input_tokens == 256


def test_xlmr_long_document_is_cut_and_scored_beside_a_short_one(models):
    enc = TransformersEncoder(str(models["xlmr"]))
    short = ("capital of france", "paris is the capital")
    alone = enc.score_pairs([short])[0]
    long, beside = enc.score_pairs([("capital of france", "paris " * 600), short])
    assert long.truncated and long.tokens == 512
    assert not beside.truncated and beside.value == pytest.approx(alone.value, abs=1e-5)
    assert enc.score_pairs([short])[0].value == pytest.approx(alone.value, abs=1e-5)  # and the engine lives on


def test_compat_check_uses_the_usable_positions(tmp_path):
    import json

    from serve_app.compat import check_model

    src = tmp_path / "xlmr"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "architectures": ["XLMRobertaForSequenceClassification"], "model_type": "xlm-roberta",
        "max_position_embeddings": 514, "pad_token_id": 1}))
    m = lambda n: ModelConfig.model_validate(  # noqa: E731
        {"name": "x", "kind": "rerank", "engine": "transformers", "source": str(src), "max_input_tokens": n})
    assert any("lower it to at most 512" in p for p in check_model(m(514), tmp_path))
    assert check_model(m(512), tmp_path) == []


# --- parity with sentence-transformers ---

@needs_minilm
def test_minilm_embeddings_and_cosine_match_sentence_transformers():
    import torch
    from sentence_transformers import SentenceTransformer

    texts = ["A cat sits on the mat.", "Stock prices fell sharply. " * 60, "Paris is the capital of France."]
    enc = TransformersEncoder(str(MINILM), mode="bi_encoder")
    got = enc.embed(texts)
    ref = SentenceTransformer(str(MINILM), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.tensor([s.value for s in got]) == pytest.approx(ref, abs=1e-5)
    assert [s.truncated for s in got] == [False, True, False] and got[1].tokens == 256
    scores = enc.score_pairs([(texts[2], texts[0]), (texts[2], texts[1])])
    assert [s.value for s in scores] == pytest.approx([float(ref[2] @ ref[0]), float(ref[2] @ ref[1])], abs=1e-5)


def test_last_token_dense_no_normalize_vectors_come_from_the_models_modules(models):
    """modules.json says last-token pooling, a Dense layer and no Normalize: the vectors are
    sentence-transformers' own, not unit length; rerank still scores their cosine."""
    import torch
    from sentence_transformers import SentenceTransformer

    texts = [words(n, n) for n in (3, 40, 7, 150, 1)]
    enc = TransformersEncoder(str(models["bi"]), mode="bi_encoder")
    got = torch.tensor([s.value for s in enc.embed(texts)])
    ref = SentenceTransformer(str(models["bi"]), device="cpu").encode(texts, convert_to_tensor=True)
    assert got.shape == (5, 32) and got == pytest.approx(ref, abs=1e-5)
    assert not torch.allclose(got.norm(dim=1), torch.ones(5), atol=1e-2)
    cos = torch.nn.functional.cosine_similarity(ref[0:1], ref[1:], dim=1)
    scores = [s.value for s in enc.score_pairs([(texts[0], t) for t in texts[1:]])]
    assert scores == pytest.approx(cos.tolist(), abs=1e-5)


def test_cross_encoder_scores_match_sentence_transformers(models):
    from sentence_transformers import CrossEncoder

    pairs = [("capital of france", words(n, n)) for n in (5, 50, 1, 20)]
    got = [s.value for s in TransformersEncoder(str(models["ce"])).score_pairs(pairs)]
    assert got == pytest.approx(CrossEncoder(str(models["ce"]), device="cpu").predict(pairs).tolist(), abs=1e-5)


# --- token batching ---

def test_plan_batches_bounds_padding_and_keeps_every_index():
    lengths = [10, 500, 12, 11, 200, 9, 130]
    groups = plan_batches(lengths, max_tokens=1000)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert groups[0] == [1]  # the long one pads nobody else
    for g in groups:
        width = max(lengths[i] for i in g)
        assert len(g) * width <= 1000 or len(g) == 1
        assert all(lengths[i] * 2 >= width for i in g)
    assert plan_batches([5000], max_tokens=100) == [[0]]  # longer than the budget: alone
    assert plan_batches([8] * 10, max_tokens=32) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_token_batches_return_results_in_the_callers_order(models):
    enc = TransformersEncoder(str(models["ce"]), max_batch_tokens=256)
    pairs = [("paris", words(n, n)) for n in (40, 2, 25, 60, 5, 33, 1, 12)]
    widths = []
    forward = enc._forward
    enc._forward = lambda feats: widths.append(feats["input_ids"].shape[1]) or forward(feats)
    batched = enc.score_pairs(pairs)
    assert len(widths) > 2 and min(widths) < max(widths) / 2  # split, and short ones not padded to the longest
    alone = [enc.score_pairs([p])[0] for p in pairs]
    assert [s.value for s in batched] == pytest.approx([s.value for s in alone], abs=1e-5)
    assert [s.tokens for s in batched] == [s.tokens for s in alone]


def test_pipelined_tokenization_gives_the_same_results(models):
    pairs = [("sky", words(n, n)) for n in range(1, 30)]
    whole = TransformersEncoder(str(models["ce"])).score_pairs(pairs)
    stepped = TransformersEncoder(str(models["ce"]), pipeline_items=4).score_pairs(pairs)
    assert [s.value for s in stepped] == pytest.approx([s.value for s in whole], abs=1e-5)


def test_engine_calls_from_several_threads_get_their_own_results(models):
    """The replica's batch thread, its probe and its request fitting share one engine."""
    enc = TransformersEncoder(str(models["ce"]), pipeline_items=3)
    jobs = [[("paris", words(n + k, n * k)) for n in range(1, 12)] for k in range(6)]
    expected = [[s.value for s in enc.score_pairs(j)] for j in jobs]
    results: dict[int, list[float]] = {}

    def work(k: int) -> None:
        for _ in range(3):
            enc.count_tokens([words(50, k)])
            results[k] = [s.value for s in enc.score_pairs(jobs[k])]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, values in results.items():
        assert values == pytest.approx(expected[k], abs=1e-5)


# --- vLLM pooling: one caller at a time ---

class _OneAtATime:
    """A stand-in for vLLM's offline LLM that records overlapping calls instead of corrupting state."""

    def __init__(self) -> None:
        self.inside = 0
        self.overlaps = 0
        self.calls = 0
        self._count = threading.Lock()

    def _enter(self) -> None:
        with self._count:
            self.inside += 1
            self.calls += 1
            self.overlaps += self.inside > 1
        time.sleep(0.01)
        with self._count:
            self.inside -= 1

    def score(self, queries, docs, use_tqdm=False):
        self._enter()
        return [type("O", (), {"outputs": type("S", (), {"score": 0.5})()})() for _ in queries]

    def embed(self, texts, use_tqdm=False):
        self._enter()
        return [type("O", (), {"outputs": type("E", (), {"embedding": [0.0]})()})() for _ in texts]


def test_vllm_pooling_serialises_the_probe_and_the_batch(models):
    from transformers import AutoTokenizer

    from deployments.engines.vllm_pooling import VLLMPoolingEncoder

    enc = VLLMPoolingEncoder.__new__(VLLMPoolingEncoder)  # the engine's own LLM is replaced by the stand-in
    enc.llm, enc.tokenizer, enc.tokenizer_lock = _OneAtATime(), AutoTokenizer.from_pretrained(models["ce"]), threading.Lock()
    enc.max_input_tokens, enc.cross_encoder = 64, True
    calls = [lambda: enc.score_pairs([("q", "paris is the capital")] * 4), lambda: enc.embed(["ping"]),
             lambda: enc.count_tokens(["green apple"])]
    threads = [threading.Thread(target=calls[i % 3]) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert enc.llm.calls == 16 and enc.llm.overlaps == 0


# --- vLLM defaults per profile and `check` ---

class _Captured(Exception):
    """Stops an engine's constructor at the engine call, carrying what it was given."""


def test_eager_mode_is_the_configs_choice_not_the_codes(monkeypatch, models):
    import vllm
    from vllm.v1.engine.async_llm import AsyncLLM

    from deployments.engines.vllm_openai import serving_args
    from deployments.engines.vllm_pooling import VLLMPoolingEncoder

    def capture(*args, **kwargs):
        raise _Captured(args, kwargs)

    monkeypatch.setattr(vllm, "LLM", capture)
    monkeypatch.setattr(AsyncLLM, "from_engine_args", capture)
    enc = ModelConfig.model_validate({"name": "e", "kind": "rerank", "engine": "vllm", "source": str(models["ce"])})
    llm = ModelConfig.model_validate({"name": "l", "kind": "llm", "engine": "vllm", "source": str(models["ce"])})
    with pytest.raises(_Captured) as pooled:
        VLLMPoolingEncoder(enc, str(models["ce"]))
    assert "enforce_eager" not in pooled.value.args[1]  # vLLM's default: CUDA graphs where it can
    assert "enforce_eager" not in serving_args(llm, str(models["ce"]))  # vLLM's default for the LLM too
    with pytest.raises(_Captured) as asked:
        VLLMPoolingEncoder(enc.model_copy(update={"engine_kwargs": {"enforce_eager": True}}), str(models["ce"]))
    assert asked.value.args[1]["enforce_eager"] is True

    vllm_models = lambda p: [m for _, app in load_serve_config(REPO_ROOT / p)[1]  # noqa: E731
                             for m in app.models if m.engine.value == "vllm"]
    assert all(m.engine_kwargs.get("enforce_eager") is True for m in vllm_models("serve_config.yaml"))  # CPU profile
    assert not any(m.engine_kwargs.get("enforce_eager") for m in vllm_models("cluster/gpu_serve_config.yaml"))


def test_tp_checks_kv_head_replication_and_whole_gpus(tmp_path):
    import json

    from serve_app.compat import check_model

    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_attention_heads": 32,
                                                 "num_key_value_heads": 2, "max_position_embeddings": 4096}))
    m = lambda tp, gpus=1.0: ModelConfig.model_validate({  # noqa: E731
        "name": "l", "kind": "llm", "engine": "vllm", "source": str(src), "tensor_parallel_size": tp,
        "deployment": {"ray_actor_options": {"num_gpus": gpus}}})
    assert check_model(m(4), tmp_path) == []  # 4 ranks, 2 KV heads: vLLM replicates them
    assert check_model(m(2), tmp_path) == []
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_attention_heads": 24,
                                                 "num_key_value_heads": 3}))
    assert any("num_key_value_heads=3" in p for p in check_model(m(2), tmp_path))
    assert any("num_gpus 0.5 per worker" in p for p in check_model(m(4, 0.5), tmp_path))
    hub = ModelConfig.model_validate({"name": "h", "kind": "llm", "engine": "vllm", "source": "org/h",
                                      "tensor_parallel_size": 2, "deployment": {"ray_actor_options": {"num_gpus": 0.5}}})
    assert any("use num_gpus: 1" in p for p in check_model(hub, tmp_path))


def test_engine_kwargs_are_checked_against_vllms_engine_args(monkeypatch):
    from serve_app.compat import check_engine_kwargs

    m = ModelConfig.model_validate({"name": "l", "kind": "llm", "engine": "vllm", "source": "org/l",
                                    "engine_kwargs": {"enforce_eagr": True, "max_num_seqs": 8}})
    problems, notes = check_engine_kwargs(m)
    assert notes == [] and len(problems) == 1
    assert "engine_kwargs.enforce_eagr" in problems[0] and "'enforce_eager'" in problems[0]
    assert check_engine_kwargs(m.model_copy(update={"engine_kwargs": {"enforce_eager": True}})) == ([], [])
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # vllm not installed: a note, not an error
    problems, notes = check_engine_kwargs(m)
    assert problems == [] and "not checked" in notes[0]


def test_padding_rounds_up_but_never_past_the_position_limit():
    from deployments.engines.transformers_encoder import _pad

    ids, mask = _pad([[5, 6, 7], [8]], 0, False, 8, 512)
    assert ids.tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [8, 0, 0, 0, 0, 0, 0, 0]] and mask.sum() == 4
    ids, mask = _pad([[5, 6, 7], [8]], 0, True, 1, 512)  # left: the last position is every row's last token
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert _pad([[1] * 513], 0, False, 8, 514)[0].shape == (1, 514)  # not 520
