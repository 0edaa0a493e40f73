"""Which streams can continue exactly on another replica, decided before the stream opens.

A continuation is a completion over prompt + generated token ids with the same sampling
parameters. That is the same process as the uninterrupted stream (greedy: the same tokens) unless
the request carries state that lives only in the dead replica: a grammar's position (structured
output, tool calls), several choices, per-token logprobs in chat's shape, penalties counted over
the output alone, or a reasoning parser's split of the text. Those streams end with an error
event naming the reason instead (docs/MIGRATION.md); nothing is truncated silently.
"""

from __future__ import annotations

from typing import Any

# response_format types that constrain decoding with a grammar (its state is the dead replica's).
_FREE_FORMATS = (None, "text")
# Request fields that drive vLLM's structured outputs directly.
_GUIDED = ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")


def migration_refusal(api: str, body: dict[str, Any], model: Any) -> tuple[str, str] | None:
    """None when the stream can continue exactly; else (a metric label, why not in words).
    `model`: the ModelConfig of the replicas that serve it."""
    if not model.migration.enabled:
        return "off", "migration is off for this model (migration.enabled)"
    if (body.get("n") or 1) > 1:
        return "n", "n > 1 (several choices)"
    if api == "completion":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            return "prompts", "several prompts in one request"
        if body.get("echo"):
            return "echo", "echo"
        if body.get("suffix"):
            return "suffix", "suffix"
    fmt = body.get("response_format")
    if (isinstance(fmt, dict) and fmt.get("type") not in _FREE_FORMATS) or any(body.get(k) for k in _GUIDED):
        kind = fmt.get("type") if isinstance(fmt, dict) and fmt.get("type") not in _FREE_FORMATS else "guided decoding"
        return "structured_output", f"structured output ({kind}): the grammar's state was the lost replica's"
    if body.get("tools") and body.get("tool_choice") != "none":
        return "tools", "tool calls (a call's arguments may have been cut half sent)"
    if body.get("logprobs") or body.get("top_logprobs") or body.get("prompt_logprobs"):
        return "logprobs", "logprobs"
    if body.get("presence_penalty") or body.get("frequency_penalty"):
        return "penalties", "presence/frequency penalties (vLLM counts them over one replica's output)"
    if model.serving.reasoning_parser:
        return "reasoning", "a reasoning model's stream (its parser's state was the lost replica's)"
    return None
