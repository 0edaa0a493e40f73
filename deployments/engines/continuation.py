"""A stream's token ids, and its continuation on another replica (docs/MIGRATION.md).

`TokenTracker` reads the token ids vLLM returns with `return_token_ids` out of each SSE payload of
a tracked stream (and takes them out again unless the client asked for them): the router keeps
them, so it can continue the stream elsewhere if this replica fails.

`Continuation` is the other side: a completion over the original prompt's token ids + the ids
generated so far, with the same sampling parameters and `max_tokens` reduced by what was generated,
written back in the original stream's shape (chat deltas or completion text, its id, created and
model) with usage counting the prompt once. Two things need the tokenizer: text vLLM held back on
the dead replica (its stop-string buffer, a character cut between tokens) is sent first, and a stop
string that straddles the cut, which neither engine can see whole, still stops the stream (`Splice`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from deployments.protocol import Resume

# vLLM's ids in a payload ("token_ids":[1,2], "prompt_token_ids":[...]); JSON text cannot contain
# this unescaped, so a model's output never matches.
_IDS = re.compile(r'token_ids":\[[0-9,]*\]')
# Fields of the original request that a token-prompt completion must not carry: the prompt and its
# rendering, what is set here, and what eligibility already refused (serve_app/migration/eligibility.py).
_NOT_CARRIED = frozenset({
    "messages", "prompt", "model", "stream", "stream_options", "n", "max_tokens", "max_completion_tokens", "min_tokens",
    "echo", "suffix", "response_format", "truncate_prompt_tokens", "add_special_tokens", "request_id",
    "return_token_ids", "logprobs", "prompt_logprobs", "kv_transfer_params",
})
COMPLETION_DEFAULT_MAX_TOKENS = 16  # vLLM's CompletionRequest.max_tokens when a body names none
REWIND_LIMIT = 4  # tokens of a character cut between tokens (UTF-8: at most 4 bytes)


class TokenTracker:
    """Per tracked stream on the replica that serves it: what each item's events carried."""

    __slots__ = ("api", "keep_ids", "ids", "text", "finish", "first", "_seen_first")
    done = False  # coalesce's question: never ends a stream itself

    def __init__(self, api: str, keep_ids: bool) -> None:
        self.api, self.keep_ids = api, keep_ids
        self.ids: list[int] = []
        self.text: list[str] = []
        self.finish: str | None = None
        self.first: tuple[list[int], dict[str, Any]] | None = None
        self._seen_first = False

    def see(self, payload: str) -> list[str]:
        if payload == "[DONE]" or "token_ids" not in payload:
            return [payload]
        chunk = json.loads(payload)
        choices = chunk.get("choices") or ()
        if not self._seen_first:
            prompt = chunk.get("prompt_token_ids") or (choices[0].get("prompt_token_ids") if choices else None)
            if prompt:
                self._seen_first = True
                self.first = (prompt, {"id": chunk.get("id"), "created": chunk.get("created"), "model": chunk.get("model")})
        for choice in choices:
            self.ids.extend(choice.get("token_ids") or ())
            text = (choice.get("delta") or {}).get("content") if self.api == "chat" else choice.get("text")
            if text:
                self.text.append(text)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return [payload if self.keep_ids else _IDS.sub('token_ids":null', payload)]

    def take(self) -> tuple[list[int], str, str | None, tuple[list[int], dict[str, Any]] | None]:
        """What the events since the last take carried: (ids, text, finish_reason, first), where
        first is (prompt token ids, the chunks' id/created/model), once."""
        out = (self.ids, "".join(self.text), self.finish, self.first)
        self.ids, self.text, self.first = [], [], None
        return out


def requested_max_tokens(api: str, body: dict[str, Any], default_max_tokens: int) -> int:
    """The output budget the original request had, as vLLM reads it (the context's room aside:
    the continuation's prompt is longer by exactly what was generated, so vLLM caps it alike)."""
    if api == "chat":
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
    else:
        asked = body["max_tokens"] if "max_tokens" in body else COMPLETION_DEFAULT_MAX_TOKENS
    return int(asked) if asked is not None else default_max_tokens


def completion_body(api: str, body: dict[str, Any], resume: Resume, model: str, default_max_tokens: int) -> dict[str, Any] | None:
    """vLLM CompletionRequest fields for the rest of the stream; None when the budget is spent."""
    left = requested_max_tokens(api, body, default_max_tokens) - len(resume.token_ids)
    if left <= 0:
        return None
    out = {k: v for k, v in body.items() if k not in _NOT_CARRIED and not (api == "chat" and k in _CHAT_ONLY)}
    out.update(model=model, prompt=[*resume.prompt_ids, *resume.token_ids], max_tokens=left, stream=True,
               stream_options={"include_usage": True}, return_token_ids=True)
    if body.get("min_tokens"):
        out["min_tokens"] = max(0, int(body["min_tokens"]) - len(resume.token_ids))
    return out


# Chat request fields a CompletionRequest does not know (vLLM 0.32): the chat rendering and tools.
_CHAT_ONLY = frozenset({
    "tools", "tool_choice", "parallel_tool_calls", "chat_template", "chat_template_kwargs", "add_generation_prompt",
    "continue_final_message", "documents", "top_logprobs", "include_reasoning", "reasoning_effort", "mm_processor_kwargs",
    "media_io_kwargs", "return_prompt_text", "modalities", "audio", "metadata", "store", "service_tier",
    "web_search_options", "prediction", "function_call", "functions", "thinking_token_budget",
})


def generated_text(tokenizer: Any, prompt_ids: list[int], ids: list[int], skip_special_tokens: bool) -> str:
    """The text of `ids` as the engine's detokenizer writes it after the prompt (decoded with the
    prompt's last tokens, so a leading space or a merge across the boundary comes out the same)."""
    tail = prompt_ids[-4:]
    kw = {"skip_special_tokens": skip_special_tokens, "clean_up_tokenization_spaces": False}
    before = tokenizer.decode(tail, **kw)
    full = tokenizer.decode([*tail, *ids], **kw)
    return full[len(before):] if full.startswith(before) else tokenizer.decode(ids, **kw)


def rewound(tokenizer: Any, resume: Resume, skip_special_tokens: bool) -> tuple[list[int], str]:
    """(ids to continue from, text of those ids). A character cut between tokens decodes as U+FFFD
    and vLLM held it back: its tokens are dropped and generated again on the new replica."""
    ids = list(resume.token_ids)
    text = generated_text(tokenizer, resume.prompt_ids, ids, skip_special_tokens)
    for _ in range(REWIND_LIMIT):
        if not ids or not text.endswith("\ufffd"):
            break
        ids.pop()
        text = generated_text(tokenizer, resume.prompt_ids, ids, skip_special_tokens)
    return ids, text


class Splice:
    """The text at the cut. `held` (text of generated tokens the client has not seen) goes first;
    while a stop string could still straddle the cut (fewer than its length - 1 new characters),
    text is held, then checked over the sent text's tail + held + new text."""

    def __init__(self, sent: str, held: str, stops: list[str], include_stop: bool) -> None:
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        width = max((len(s) for s in self.stops), default=1) - 1
        self.tail = sent[-width:] if width else ""
        self.held = held
        self.width = width
        self.new = ""
        self.open = bool(self.stops) and width > 0  # a straddle is still possible
        self.stopped: str | None = None

    def feed(self, text: str, final: bool) -> str:
        """Text to send now for `text` newly generated (`final`: the continuation ended)."""
        if not self.open:
            out, self.held = self.held + text, ""
            return out
        self.new += text
        if len(self.new) < self.width and not final:
            return ""
        self.open = False
        window = self.tail + self.held + self.new
        cut = len(self.tail) + len(self.held)  # a straddle starts before this and ends after it
        # As vLLM picks: the stop string completing first, ties by the list's order. One wholly in
        # the new text is the continuation's engine's to stop at; one across the cut is ours.
        best: tuple[int, int, str] | None = None
        for stop in self.stops:
            start = window.find(stop, max(0, cut - len(stop) + 1))
            if start != -1 and (best is None or start + len(stop) < best[1]):
                best = (start, start + len(stop), stop)
        pending, self.held, self.new = self.held + self.new, "", ""
        if best is None or best[0] >= cut:
            return pending
        self.stopped = best[2]
        end = best[1] if self.include_stop else best[0]
        return pending[:max(0, end - len(self.tail))]


class Continuation:
    """Rewrites the completion stream of a continuation into the original stream's events.
    `resume`: what the lost replica sent, its ids as the continuation starts from (`rewound`)."""

    def __init__(self, api: str, resume: Resume, splice: Splice, keep_ids: bool) -> None:
        self.api, self.head, self.splice = api, resume.head, splice
        self.prompt_tokens, self.generated = len(resume.prompt_ids), len(resume.token_ids)
        self.keep_ids = keep_ids
        self.tracker = TokenTracker("completion", keep_ids=True)
        self.new_tokens = 0
        self.done = False  # a straddling stop ended it: the engine's stream is to be closed

    def see(self, payload: str) -> list[str]:
        if self.done:
            return []
        if payload == "[DONE]":
            return [payload]
        chunk = json.loads(payload)
        if chunk.get("error") and not chunk.get("choices"):
            return [payload]  # vLLM's in-band error: the client gets it as vLLM wrote it
        out: list[str] = []
        for choice in chunk.get("choices") or ():
            ids = choice.get("token_ids") or []
            self.tracker.ids.extend(ids)
            self.new_tokens += len(ids)
            finish, stop_reason = choice.get("finish_reason"), choice.get("stop_reason")
            text = self.splice.feed(choice.get("text") or "", final=finish is not None)
            if self.splice.stopped is not None:  # a stop string across the cut: the stream ends here
                finish, stop_reason, self.done = "stop", self.splice.stopped, True
            if text:
                self.tracker.text.append(text)
            if finish:
                self.tracker.finish = finish
            if text or finish or ids:
                out.append(self._choice_chunk(text, ids, finish, stop_reason))
            if self.done:
                return [*out, usage_event(self.api, self.head, self.usage()), "[DONE]"]
        if chunk.get("usage"):
            out.append(usage_event(self.api, self.head, self.usage(), chunk.get("system_fingerprint")))
        return out

    def ending(self, finish: str, want_usage: bool) -> list[str]:
        """The events of a stream whose budget was spent before the cut: its final chunk, usage, [DONE]."""
        self.tracker.finish = finish
        text = self.splice.held  # held-back text (no straddle check: nothing follows it)
        usage = [usage_event(self.api, self.head, self.usage())] if want_usage else []
        return [self._choice_chunk(text, [], finish, None), *usage, "[DONE]"]

    def usage(self) -> dict[str, int]:
        completion = self.generated + self.new_tokens
        return {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens + completion,
                "completion_tokens": completion}

    def _choice_chunk(self, text: str, ids: list[int], finish: str | None, stop_reason: Any) -> str:
        ids_out = ids if self.keep_ids else None
        if self.api == "chat":
            choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = stop_reason
            choice["token_ids"] = ids_out
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": stop_reason,
                      "prompt_token_ids": None, "token_ids": ids_out}
        return _dump({**event_head(self.api, self.head), "choices": [choice]})


def event_head(api: str, head: dict[str, Any]) -> dict[str, Any]:
    """The fields every chunk of the original stream starts with: its id, object, created, model."""
    return {"id": head.get("id"), "object": "chat.completion.chunk" if api == "chat" else "text_completion",
            "created": head.get("created"), "model": head.get("model")}


def usage_event(api: str, head: dict[str, Any], usage: dict[str, int], fingerprint: str | None = None) -> str:
    """The original stream's usage-only chunk, as vLLM writes it (the router writes one too: track.py)."""
    out: dict[str, Any] = {**event_head(api, head), "choices": [], "usage": usage}
    if fingerprint:
        out["system_fingerprint"] = fingerprint
    return _dump(out)


def _dump(chunk: dict[str, Any]) -> str:
    return json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))  # compact, as vLLM's pydantic dump
