"""Engine-adapter logic that needs no engine: sampling defaults, context planning."""

from __future__ import annotations

import pytest

from deployments.engines.vllm_generate import VLLMGenerator, sampling_kwargs
from deployments.protocol import SamplingOptions
from serve_app.errors import InvalidRequest


def test_model_defaults_apply_where_the_request_is_silent():
    defaults = {"temperature": 0.2, "top_p": 0.9, "max_new_tokens": 50}
    assert sampling_kwargs(defaults, SamplingOptions()) == {"temperature": 0.2, "top_p": 0.9}
    assert sampling_kwargs(defaults, SamplingOptions(temperature=0.0, presence_penalty=1.0)) == {
        "temperature": 0.0, "top_p": 0.9, "presence_penalty": 1.0,
    }


def test_context_planning_names_both_numbers():
    gen = VLLMGenerator.__new__(VLLMGenerator)  # planning needs only the context length
    gen.max_model_len = 100
    assert gen.plan_max_tokens(90, None, 256) == 10
    assert gen.plan_max_tokens(10, 90, 256) == 90
    with pytest.raises(InvalidRequest) as e:
        gen.plan_max_tokens(10, 91, 256)
    assert "10" in e.value.message and "91" in e.value.message and "100" in e.value.message
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequest):
        gen.plan_max_tokens(100, None, 256)
