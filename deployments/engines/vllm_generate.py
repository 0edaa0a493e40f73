"""vLLM engine for generation: `AsyncLLM` behind a small typed interface.

The replica applies the chat template and tokenizes itself, so it knows the prompt length
before the engine does (context checks happen here, next to the tokenizer) and can feed the
engine token ids (vLLM 0.32 deprecates raw prompt strings for `generate`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from deployments.protocol import Choice, SamplingOptions
from serve_app.errors import ContextLengthExceeded, InvalidRequest, preparing


# The OpenAI request parameters this engine honours; the router rejects any other by name
# (docs/PARAMETERS.md is the matrix). Keep in step with `sampling_kwargs` and `generate`.
HONOURED_PARAMS = frozenset({
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "n", "seed",
    "presence_penalty", "frequency_penalty",
})


class VLLMGenerator:
    def __init__(self, cfg, path: str) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs: dict[str, Any] = dict(cfg.engine_kwargs)  # eager mode only where the config asks
        if cfg.pipeline_parallel_size > 1:
            # Across nodes: vLLM's ray executor fills the replica's placement group (serve_app/app.py).
            kwargs.setdefault("distributed_executor_backend", "ray")
        elif cfg.tensor_parallel_size > 1:
            # One node, workers forked by the replica inside the GPUs it holds (see docs/ARCHITECTURE.md).
            kwargs.setdefault("distributed_executor_backend", "mp")
        if cfg.max_input_tokens:
            kwargs["max_model_len"] = cfg.max_input_tokens
        args = AsyncEngineArgs(
            model=path, tokenizer=path, tensor_parallel_size=cfg.tensor_parallel_size,
            pipeline_parallel_size=cfg.pipeline_parallel_size,
            trust_remote_code=cfg.trust_remote_code, **kwargs,
        )
        # vLLM's own metrics (queue, KV cache use, tokens/s) into Ray's Prometheus export.
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        self.engine = AsyncLLM.from_engine_args(args, stat_loggers=[RayPrometheusStatLogger])
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        self.max_model_len: int = self.engine.model_config.max_model_len
        self.device: str = self.engine.vllm_config.device_config.device_type  # "cuda", "cpu", ...
        self.dtype: str = str(self.engine.model_config.dtype).removeprefix("torch.")
        # The model's own sampling defaults (generation_config.json), applied where a request is
        # silent, as `vllm serve` does; bare SamplingParams() would silently use vLLM's instead.
        self.model_defaults: dict[str, Any] = self.engine.model_config.get_diff_sampling_param()

    def encode_chat(self, messages: tuple[tuple[str, str], ...]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("this model has no chat template; use /v1/completions", "messages")
        conv = [{"role": "system" if r == "developer" else r, "content": c} for r, c in messages]
        ids = self.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in transformers 5
            ids = ids["input_ids"]
        return list(ids)

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def plan_max_tokens(self, prompt_len: int, requested: int | None, default: int) -> int:
        """Fit the request in the context window, or say exactly why it cannot fit."""
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ContextLengthExceeded(
                f"the prompt has {prompt_len} tokens; this model's context is {self.max_model_len}",
                "messages",
            )
        if requested is None:
            return min(default, room)
        if requested > room:
            raise ContextLengthExceeded(
                f"prompt ({prompt_len} tokens) + max_tokens ({requested}) exceeds this model's "
                f"context of {self.max_model_len} tokens",
                "max_tokens",
            )
        return requested

    async def generate(
        self, request_id: str, prompt_ids: list[int], opts: SamplingOptions, max_tokens: int
    ) -> AsyncIterator[tuple[list[Choice], int]]:
        """Yield (choice deltas, completion tokens so far). Closing the iterator aborts the request."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        with preparing("the sampling parameters"):  # vLLM's own checks: a 400, not an engine failure
            params = SamplingParams(
                n=opts.n, max_tokens=max_tokens, stop=list(opts.stop) or None, seed=opts.seed,
                output_kind=RequestOutputKind.DELTA, **sampling_kwargs(self.model_defaults, opts),
            )
        # Engine request ids must be unique per engine; keep the client's id first for log search.
        engine_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
        produced = [0] * opts.n
        async for out in self.engine.generate({"prompt_token_ids": prompt_ids}, params, engine_id):
            deltas = []
            for c in out.outputs:
                produced[c.index] += len(c.token_ids)
                if c.text or c.finish_reason:
                    reason = c.finish_reason if c.finish_reason in ("stop", "length", "abort") else None
                    deltas.append(Choice(c.index, c.text, reason))
            if deltas:
                yield deltas, sum(produced)

    def unfinished(self) -> int:
        return self.engine.get_num_unfinished_requests()

    async def check_health(self) -> None:
        await self.engine.check_health()

    def shutdown(self) -> None:
        self.engine.shutdown()


def sampling_kwargs(model_defaults: dict[str, Any], opts: SamplingOptions) -> dict[str, Any]:
    """The request's values where given, else the model's generation_config defaults."""
    requested = {
        "temperature": opts.temperature, "top_p": opts.top_p,
        "presence_penalty": opts.presence_penalty, "frequency_penalty": opts.frequency_penalty,
    }
    merged = {k: v for k, v in model_defaults.items() if k != "max_new_tokens"}  # max_tokens is planned apart
    merged.update({k: v for k, v in requested.items() if v is not None})
    return merged
