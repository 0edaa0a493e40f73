"""The LLM engine adapter's own logic, without an engine: the `vllm serve` flags our config sets,
strict parsing with vLLM's protocol, error mapping, and stream coalescing."""

from __future__ import annotations

import asyncio
import json
import pathlib

import pytest

from deployments.engines.vllm_openai import as_flag_value, coalesce, parse, serving_args, to_api_error
from serve_app.config import parse_app_config
from serve_app.errors import ContextLengthExceeded, EngineFailure, InvalidRequest, UnsupportedParameter
from serve_app.presets import apply_preset


def _llm(**kw):
    return parse_app_config({"models": [{"name": "smol", "kind": "llm", "engine": "vllm", "source": "org/smollm2-x", **kw}]}).models[0]


def test_serving_args_are_the_vllm_serve_flags_our_config_owns():
    args = serving_args(apply_preset(_llm(serving={"aliases": ["gpt-4o-mini"]})), "/m")
    assert args["served_model_name"] == ["smol", "gpt-4o-mini"] and args["model"] == "/m"
    assert args["tool_call_parser"] == "hermes" and args["enable_auto_tool_choice"] is True  # the preset
    # No max_new_tokens: vLLM caps every request's max_tokens by it, named or not (deployments/llm.py
    # fills a chat's unnamed budget instead).
    assert args["override_generation_config"] == {}
    assert "enforce_eager" not in args  # CUDA graphs unless the config asks
    tp = serving_args(_llm(tensor_parallel_size=2, engine_kwargs={"enforce_eager": True}), "/m")
    assert tp["distributed_executor_backend"] == "mp" and tp["enforce_eager"] is True
    assert tp["tool_call_parser"] is None  # no preset for this name without one


def test_a_config_group_in_engine_kwargs_becomes_the_object_vllm_reads():
    """serve_config.yaml sets structured_outputs_config as a mapping; vLLM's engine reads its
    attributes, so a dict left as-is would fail when the replica starts."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from serve_app.config import load_serve_config

    root = pathlib.Path(__file__).resolve().parents[1]
    (llm,) = [m for _, app in load_serve_config(root / "serve_config.yaml")[1] for m in app.models if m.kind == "llm"]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args([])
    for key, value in serving_args(llm, str(root / "models" / llm.name)).items():
        setattr(args, key, as_flag_value(getattr(args, key, None), value))
    structured = AsyncEngineArgs.from_cli_args(args).structured_outputs_config
    assert (structured.backend, structured.disable_any_whitespace) == ("xgrammar", True)
    assert as_flag_value(None, {"a": 1}) == {"a": 1} and as_flag_value(3, 4) == 4  # other values pass through


def test_unknown_fields_are_refused_by_name_and_vllm_validates_the_rest():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    msgs = [{"role": "user", "content": "hi"}]
    ok = parse(ChatCompletionRequest, {"model": "m", "messages": msgs, "top_k": 5, "logprobs": True, "top_logprobs": 3})
    assert ok.top_k == 5
    with pytest.raises(UnsupportedParameter) as unknown:
        parse(ChatCompletionRequest, {"model": "m", "messages": msgs, "frobnicate": 1})
    assert unknown.value.param == "frobnicate"
    with pytest.raises(InvalidRequest) as bad:
        parse(ChatCompletionRequest, {"model": "m", "messages": msgs, "temperature": "hot"})
    assert bad.value.param == "temperature"


def test_vllm_errors_become_ours():
    ctx = to_api_error("This model's maximum context length is 2048 tokens. However, your prompt contains 3000", 400, None)
    assert isinstance(ctx, ContextLengthExceeded)  # so context-window fallbacks still take it
    assert isinstance(to_api_error("max_tokens=9999 cannot be greater than max_model_len=2048.", 400, "max_tokens"),
                      ContextLengthExceeded)
    nf = to_api_error("The model `x` does not exist.", 404, "model")
    assert isinstance(nf, InvalidRequest) and nf.status == 404 and nf.param == "model"
    assert isinstance(to_api_error("CUDA out of memory", 500, None), EngineFailure)


def _sse(*payloads, delay=0.0):
    async def gen():
        for p in payloads:
            if delay:
                await asyncio.sleep(delay)
            yield f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n"
    return gen()


ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
TOKEN = {"choices": [{"index": 0, "delta": {"content": "Paris"}, "finish_reason": None}]}
END = {"choices": [{"index": 0, "delta": {"content": "."}, "finish_reason": "stop"}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


async def _items(sse, want_usage=False):
    return [item async for item in coalesce(sse, want_usage)]


def test_the_first_item_carries_the_first_token_and_usage_is_kept_for_the_router():
    items = asyncio.run(_items(_sse(ROLE, TOKEN, END, USAGE, "[DONE]", delay=0.01)))
    first_events, _ = items[0]
    assert [json.loads(e) for e in first_events[:2]] == [ROLE, TOKEN]  # never a role chunk alone
    events = [e for evs, _ in items for e in evs]
    assert events[-1] == "[DONE]" and json.dumps(USAGE) not in events  # the client did not ask for usage
    assert items[-1][1] == USAGE["usage"]
    with_usage = asyncio.run(_items(_sse(ROLE, TOKEN, END, USAGE, "[DONE]"), want_usage=True))
    usage_event = json.dumps(USAGE)
    assert usage_event in [e for evs, _ in with_usage for e in evs]


def test_what_the_engine_made_while_the_reader_was_busy_leaves_as_one_item():
    async def scenario():
        out = []
        async for events, _ in coalesce(_sse(ROLE, TOKEN, *[TOKEN] * 20, END, "[DONE]"), False):
            out.append(len(events))
            await asyncio.sleep(0.05)  # a slow reader
        return out

    sizes = asyncio.run(scenario())
    assert sum(sizes) == 24 and len(sizes) < 6


def test_an_error_before_the_first_token_is_raised_not_streamed():
    err = {"error": {"message": "This model's maximum context length is 10 tokens", "type": "BadRequestError", "code": 400}}
    with pytest.raises(ContextLengthExceeded):
        asyncio.run(_items(_sse(ROLE, err, "[DONE]")))


def test_a_chat_naming_no_budget_gets_the_gateway_default_and_a_named_one_stays_the_clients():
    """The gateway's default_max_tokens fills only an unnamed chat budget (vLLM clamps it to the
    context's room); a named one reaches vLLM as sent, above the default too; a completion without
    the field keeps vLLM's (OpenAI's) 16, one with an explicit null gets the default like a chat."""
    from deployments.llm import LLMServer

    from types import SimpleNamespace

    server = LLMServer.__new__(LLMServer)
    server.cfg, server.default_max_tokens = _llm(), 256
    server.adapter_names = server.cfg.adapter_names()
    server.engine = SimpleNamespace(max_model_len=2048, shutdown=lambda: None)
    assert server._generation("chat", {"model": "smol"})["max_tokens"] == 256
    assert server._generation("chat", {"model": "smol", "max_tokens": None})["max_tokens"] == 256
    assert server._generation("chat", {"model": "smol", "max_tokens": 400})["max_tokens"] == 400
    named = server._generation("chat", {"model": "smol", "max_completion_tokens": 900})
    assert named["max_completion_tokens"] == 900 and "max_tokens" not in named
    assert "max_tokens" not in server._generation("completion", {"model": "smol", "prompt": "x"})
    # an explicit null: vLLM would generate to the context's end; a continuation would not know that budget
    assert server._generation("completion", {"model": "smol", "prompt": "x", "max_tokens": None})["max_tokens"] == 256
    from deployments.engines.continuation import requested_max_tokens
    assert requested_max_tokens("completion", {"prompt": "x", "max_tokens": None}, 256) == 256
    assert requested_max_tokens("completion", {"prompt": "x"}, 256) == 16
    # the router's admission estimate charges what the replica will allow
    from serve_app.api.openai import ChatEnvelope, CompletionEnvelope
    assert CompletionEnvelope.model_validate({"model": "smol", "prompt": ""}).estimated_tokens(256) == 16
    assert CompletionEnvelope.model_validate({"model": "smol", "prompt": "", "max_tokens": None}).estimated_tokens(256) == 256
    assert CompletionEnvelope.model_validate({"model": "smol", "prompt": "", "max_tokens": 7}).estimated_tokens(256) == 7
    assert ChatEnvelope.model_validate({"model": "smol", "messages": [{"role": "user", "content": ""}]}).estimated_tokens(256) == 256
    server.default_max_tokens = 4096  # above the context: vLLM would reject it, so the context it is
    assert server._generation("chat", {"model": "smol"})["max_tokens"] == 2048
