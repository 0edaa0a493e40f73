"""The reranker's token budgets on a real engine (tiny random BERT cross-encoder, transformers)."""

from __future__ import annotations

import pytest

from deployments.engines.build import build_encoder
from deployments.protocol import RerankRequest
from deployments.reranker import RerankerServer
from serve_app.config import ModelConfig
from serve_app.errors import InvalidRequest


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.tiny_models import build_tiny_cross_encoder

    path = build_tiny_cross_encoder(tmp_path_factory.mktemp("ce") / "ce")

    def make(**extra) -> RerankerServer:
        cfg = ModelConfig.model_validate({"name": "ce", "kind": "rerank", "engine": "transformers", "source": str(path), **extra})
        s = RerankerServer.__new__(RerankerServer)  # the fitting logic needs no Serve replica
        s.cfg, s.engine = cfg, build_encoder(cfg, str(path))
        return s

    return make


def test_default_leaves_cutting_to_the_engine(server):
    s = server()
    query, docs, cut = s._fit(RerankRequest("r", "paris", ["paris " * 200]))
    assert docs == ["paris " * 200] and cut == set()
    scored = s.engine.score_pairs([(query, docs[0])])
    assert scored[0].truncated and scored[0].tokens == 64


def test_truncate_false_names_the_document_with_its_client_index(server):
    with pytest.raises(InvalidRequest) as e:
        server()._fit(RerankRequest("r", "paris", ["apple", "paris " * 100], truncate=False, offset=40))
    assert e.value.param == "documents.41" and "documents[41] has 100 tokens" in e.value.message


def test_max_tokens_per_doc_cuts_first(server):
    _, docs, cut = server()._fit(RerankRequest("r", "q", ["red green blue sky", "sea"], max_tokens_per_doc=2))
    assert docs == ["red green", "sea"] and cut == {0}


def test_templates_wrap_after_cutting_so_the_suffix_survives(server):
    s = server(query_template="query: {query}", document_template="doc: {document} end")
    query, docs, cut = s._fit(RerankRequest("r", "paris", ["paris " * 200, "apple"]))
    assert query == "query: paris"
    assert docs[0].startswith("doc: paris") and docs[0].endswith(" end") and docs[1] == "doc: apple end"
    assert cut == {0}
    assert not s.engine.score_pairs([(query, docs[0])])[0].truncated  # fitted before the engine saw it
