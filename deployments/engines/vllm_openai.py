"""vLLM's own OpenAI serving layer over the replica's `AsyncLLM`: the classes `vllm serve` uses.

The engine and the serving objects are built exactly as `vllm serve` builds them: vLLM's own
argument parser gives every frontend and engine default, our config sets the fields it owns
(engine_kwargs, the tool/reasoning parsers, the chat template), `AsyncEngineArgs.from_cli_args`
builds the engine, and vLLM's `init_app_state` builds chat, completions and tokenization. So
every parameter `vllm serve` honours (tools, response_format, logprobs, sampling extras, ...)
reaches the engine unchanged, and nothing of vLLM's protocol is re-implemented here.

What we add: unknown fields are a 400 naming them (vLLM lets them through with a warning), vLLM's
error responses become our typed errors (a context overflow is `ContextLengthExceeded`, so
context-window fallbacks still work), and streams are coalesced (`Coalescer`): what the engine
produced since the last send leaves as one handle item, so a slow reader costs one item, not one
per token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from serve_app.errors import ApiError, ContextLengthExceeded, EngineFailure, InvalidRequest, UnsupportedParameter

# How `vllm serve` says a prompt does not fit (vLLM 0.32's renderer and serving classes).
_CONTEXT_PHRASES = ("maximum context length", "than max_model_len", "context length is", "longer than the maximum model length")


class VLLMOpenAI:
    def __init__(self, cfg, path: str, adapters: dict[str, str] | None = None) -> None:
        """cfg: serve_app.config.ModelConfig; adapters: LoRA adapter name -> resolved folder."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.entrypoints.openai.models.protocol import LoRAModulePath
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        self.args = make_arg_parser(FlexibleArgumentParser()).parse_args([])
        for key, value in serving_args(cfg, path, adapters).items():
            if key == "lora_modules":  # as `--lora-modules name=path` parses them
                value = [LoRAModulePath(**m) for m in value]
            setattr(self.args, key, as_flag_value(getattr(self.args, key, None), value))
        # init_app_state reads the reasoning parser from here; give this engine its own copy.
        self.args.structured_outputs_config = dataclasses.replace(
            self.args.structured_outputs_config, reasoning_parser=self.args.reasoning_parser)
        engine_args = AsyncEngineArgs.from_cli_args(self.args)
        from deployments.engines.vllm_load import EngineLoad

        # vLLM's own metrics (queue, KV cache use, tokens/s) into Ray's Prometheus export, and the
        # same scheduler numbers kept for the request router (`self.load`).
        self.load: EngineLoad | None = None

        def load_logger(vllm_config: Any, engine_index: int = 0) -> EngineLoad:
            self.load = EngineLoad(vllm_config, engine_index)
            return self.load

        self.engine = AsyncLLM.from_engine_args(engine_args, stat_loggers=[RayPrometheusStatLogger, load_logger])
        self.max_model_len: int = self.engine.model_config.max_model_len
        self.device: str = self.engine.vllm_config.device_config.device_type  # "cuda", "cpu", ...
        self.dtype: str = str(self.engine.model_config.dtype).removeprefix("torch.")
        # The model's own sampling defaults (generation_config.json), as `vllm serve` applies them.
        self.model_defaults: dict[str, Any] = {
            k: v for k, v in self.engine.model_config.get_diff_sampling_param().items() if k != "max_tokens"
        }
        self.chat = self.completion = self.tokenization = self.models = None

    async def start(self) -> None:
        """vLLM's `init_app_state`: the serving objects `vllm serve` would put on its app."""
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        state = State()
        tasks = await self.engine.get_supported_tasks()
        await init_app_state(self.engine, state, self.args, supported_tasks=tasks)
        self.chat = getattr(state, "openai_serving_chat", None)
        self.completion = getattr(state, "openai_serving_completion", None)
        self.tokenization = getattr(state, "serving_tokenization", None) or getattr(state, "openai_serving_tokenization", None)
        self.models = getattr(state, "openai_serving_models", None)  # the served names, LoRA adapters included
        if self.chat is None or self.completion is None or self.tokenization is None:
            raise RuntimeError(f"vLLM built no chat/completion/tokenization serving for tasks {tasks}")

    # --- one call per API family: a response dict, or an async iterator of SSE payloads ---
    async def create(self, api: str, body: dict[str, Any], request_id: str) -> dict[str, Any] | AsyncIterator[str]:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        shape, serving = {"chat": (ChatCompletionRequest, self.chat), "completion": (CompletionRequest, self.completion)}[api]
        request = parse(shape, {**body, "request_id": request_id})
        call = serving.create_chat_completion if api == "chat" else serving.create_completion
        return unwrap(await _client_errors(call(request, None)))

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        from vllm.entrypoints.serve.tokenize.protocol import (
            TokenizeChatRequest, TokenizeCompletionRequest,
        )

        shape = TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
        return unwrap(await _client_errors(self.tokenization.create_tokenize(parse(shape, body), None)))

    async def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest

        return unwrap(await _client_errors(self.tokenization.create_detokenize(parse(DetokenizeRequest, body), None)))

    async def loaded_adapters(self) -> list[str]:
        """The LoRA adapters the engine holds loaded now (it loads others on demand, evicting)."""
        if self.models is None or not self.models.lora_requests:
            return []
        ids = await self.engine.list_loras()
        return sorted(name for name, req in self.models.lora_requests.items() if req.lora_int_id in ids)

    def unfinished(self) -> int:
        return self.engine.get_num_unfinished_requests()

    async def check_health(self) -> None:
        await self.engine.check_health()

    def shutdown(self) -> None:
        self.engine.shutdown()


async def _client_errors(call: Awaitable[Any]) -> Any:
    """vLLM raises some request errors instead of returning an ErrorResponse: same mapping."""
    from vllm.exceptions import VLLMClientError, VLLMUnprocessableEntityError, VLLMValidationError

    try:
        return await call
    except (VLLMValidationError, VLLMUnprocessableEntityError) as exc:
        raise to_api_error(str(exc.args[0] if exc.args else exc), 400, exc.parameter) from None
    except VLLMClientError as exc:
        raise to_api_error(str(exc), 400, None) from None


def serving_args(cfg, path: str, adapters: dict[str, str] | None = None) -> dict[str, Any]:
    """The `vllm serve` flags our config owns, as attributes of vLLM's parsed arguments."""
    kwargs: dict[str, Any] = dict(cfg.engine_kwargs)  # eager mode only where the config asks
    if cfg.lora is not None:  # `--enable-lora --lora-modules name=path ...`: loaded at start
        kwargs.update(enable_lora=True, max_loras=cfg.lora.max_loras, max_lora_rank=cfg.lora.max_lora_rank,
                      max_cpu_loras=cfg.lora.resident,
                      lora_modules=[{"name": n, "path": p, "base_model_name": cfg.name} for n, p in (adapters or {}).items()])
    if cfg.pipeline_parallel_size > 1:
        # Across nodes: vLLM's ray executor fills the replica's placement group (serve_app/app.py).
        kwargs.setdefault("distributed_executor_backend", "ray")
    elif cfg.tensor_parallel_size > 1:
        # One node, workers forked by the replica inside the GPUs it holds (see docs/ARCHITECTURE.md).
        kwargs.setdefault("distributed_executor_backend", "mp")
    if cfg.max_input_tokens:
        kwargs["max_model_len"] = cfg.max_input_tokens
    # No `max_new_tokens` override for the gateway's default_max_tokens: vLLM 0.32 caps every
    # request's max_tokens by it, named or not (a client's 400 became 256, finish "length"). The
    # replica fills a chat's unnamed budget instead (deployments/llm.py).
    override = dict(kwargs.pop("override_generation_config", None) or {})
    serving = cfg.serving
    return {
        **kwargs,
        "model": path, "tokenizer": path, "served_model_name": [cfg.name, *serving.aliases],
        "tensor_parallel_size": cfg.tensor_parallel_size, "pipeline_parallel_size": cfg.pipeline_parallel_size,
        "trust_remote_code": cfg.trust_remote_code, "override_generation_config": override,
        "tool_call_parser": serving.tool_call_parser, "enable_auto_tool_choice": serving.enable_auto_tool_choice,
        "reasoning_parser": serving.reasoning_parser or "", "chat_template": serving.chat_template,
        "disable_log_stats": False, "enable_log_requests": False,
    }


def as_flag_value(default: Any, value: Any) -> Any:
    """A config-group flag (`--structured-outputs-config`, `--compilation-config`, ...) given as a
    mapping in engine_kwargs becomes that group's config object, as `vllm serve` parses its JSON:
    from_cli_args passes attributes through unconverted, and vLLM reads them as objects."""
    if isinstance(value, dict) and dataclasses.is_dataclass(default):
        return type(default)(**value)
    return value


def parse(shape, body: dict[str, Any]):
    """vLLM's request model, strictly: unknown fields are a 400 naming them (vLLM would only warn);
    validation errors are worded as the router words its own (serve_app/body.py)."""
    from serve_app.body import validate

    known = set(shape.model_fields) | {f.alias for f in shape.model_fields.values() if f.alias}
    unknown = sorted(set(body) - known)
    if unknown:
        raise UnsupportedParameter(f"unknown parameter '{unknown[0][:100]}'", unknown[0][:100])
    return validate(shape, body)


def unwrap(result: Any) -> Any:
    """vLLM's ErrorResponse → our typed error; a response model → its dict; a stream stays a stream."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(result, ErrorResponse):
        raise to_api_error(result.error.message, result.error.code, result.error.param)
    if hasattr(result, "model_dump"):
        return result.model_dump(mode="json", exclude_unset=False)
    return result


def to_api_error(message: str, code: int, param: str | None) -> ApiError:
    if any(p in message for p in _CONTEXT_PHRASES):
        return ContextLengthExceeded(message, param or "messages")
    if 400 <= code < 500:
        err = InvalidRequest(message, param)
        if code != 400:
            err.status = code
        return err
    return EngineFailure(f"the engine failed: {message[:300]}")


async def coalesce(sse: AsyncIterator[str], want_usage: bool,
                   payloads: Any = None) -> AsyncIterator[tuple[list[str], dict[str, int] | None]]:
    """Read vLLM's SSE strings in a task; hand the reader everything produced since its last read.

    The first item is held back until it carries a token (or the end), so an error vLLM reports
    in-band before any token becomes a raised error: the router can still retry, fall back, or
    answer with a real status code. Usage is always requested from vLLM (the router counts it);
    the usage-only chunk is passed on only when the client asked for it.

    `payloads` (deployments/engines/continuation.py) sees each payload first and returns those to
    send instead: it reads token ids out, or rewrites a continuation; once its `done` is set the
    engine's stream is closed (a stop string found across a continuation's cut).
    """
    buffer: list[str] = []
    usage: dict[str, int] | None = None
    ready = asyncio.Event()
    done = False
    failure: BaseException | None = None

    async def pump() -> None:
        nonlocal done, failure, usage
        try:
            async for raw in sse:
                for line in raw.splitlines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[len("data: "):]
                    for payload in (payloads.see(payload) if payloads is not None else (payload,)):
                        if payload != "[DONE]" and '"usage"' in payload:
                            chunk = json.loads(payload)
                            if chunk.get("usage"):
                                usage = chunk["usage"]
                                if not chunk.get("choices") and not want_usage:
                                    continue
                        buffer.append(payload)
                ready.set()
                if payloads is not None and payloads.done:
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            failure = exc
        finally:
            done = True
            ready.set()

    task = asyncio.ensure_future(pump())
    first = True
    try:
        while True:
            await ready.wait()
            ready.clear()
            if failure is not None:
                raise failure
            if first:
                if not done and not _has_token(buffer):
                    continue
                error = _first_error(buffer)
                if error is not None:
                    raise to_api_error(error.get("message", "stream failed"), int(error.get("code") or 500), error.get("param"))
                first = False
            if buffer:
                events, buffer[:] = list(buffer), []
                yield events, usage
            if done:
                return
    finally:
        task.cancel()
        close = getattr(sse, "aclose", None)
        if close is not None:
            try:
                await close()  # aborts the engine request if the reader went away
            except Exception:  # noqa: BLE001
                pass


def _has_token(events: list[str]) -> bool:
    """Anything beyond role chunks: content, a tool call, a finish, an error, or the end."""
    for payload in events:
        if payload == "[DONE]" or '"error"' in payload or '"finish_reason":"' in payload.replace(" ", ""):
            return True
        chunk = json.loads(payload)
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if choice.get("text") or delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content") \
                    or delta.get("reasoning") or choice.get("logprobs"):
                return True
    return False


def _first_error(events: list[str]) -> dict[str, Any] | None:
    for payload in events:
        if payload != "[DONE]" and '"error"' in payload:
            chunk = json.loads(payload)
            if isinstance(chunk.get("error"), dict) and not chunk.get("choices"):
                return chunk["error"]
        elif payload != "[DONE]" and _has_token([payload]):
            return None
    return None
