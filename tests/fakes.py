"""A fake model handle for fast unit tests of the router's logic (never for end-to-end tests).

It mimics the parts of DeploymentHandle the router uses: `.method.remote(...)` returning an
awaitable with `.cancel()`, and `.options(stream=True)` returning async iterators.
"""

from __future__ import annotations

import asyncio
from typing import Any

import json

from deployments.protocol import EmbedResult, ModelCard, OpenAIResponse, RerankResult, ReplicaInfo, stream_item
from serve_app.errors import ReplicaFailed


class _Response:
    def __init__(self, coro) -> None:
        self._task = asyncio.ensure_future(coro)
        self.cancelled = False

    def __await__(self):
        return self._task.__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self._task.cancel()


class _Stream:
    def __init__(self, agen) -> None:
        self._agen = agen
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._agen.__anext__()

    def cancel(self) -> None:
        self.cancelled = True


class FakeModel:
    """Echo model: answers with words of the prompt, scores by word overlap."""

    def __init__(self, name: str, kind: str, *, fail: Exception | None = None, delay: float = 0.0,
                 fail_times: int | None = None, die_after: int | None = None) -> None:
        self.name, self.kind, self.fail, self.delay = name, kind, fail, delay
        # streams: the replica is lost after this many items, once (shared with the options() clones)
        self.dying = {"after": die_after}
        self.fail_times = fail_times  # None: `fail` every time; N: only the first N calls
        self.replica = ReplicaInfo(name, "fake-replica", "fake-node", "127.0.0.1")
        self.calls: list[tuple[str, Any]] = []
        self.streams: list[_Stream] = []
        self.responses: list[_Response] = []
        self._stream = False

    def options(self, stream: bool = False, **_: Any) -> "FakeModel":
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._stream = stream
        return clone

    def __getattr__(self, method: str):
        if method.startswith("_"):  # only handle methods are faked; anything else is a real miss
            raise AttributeError(method)
        impl = getattr(self, f"_do_{method}")
        model = self

        class _Method:
            def remote(self_inner, *args, **kwargs):
                model.calls.append((method, args + tuple(kwargs.items())))
                if model._stream:
                    s = _Stream(impl(*args, **kwargs))
                    model.streams.append(s)
                    return s
                r = _Response(impl(*args, **kwargs))
                model.responses.append(r)
                return r

        return _Method()

    async def _check(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None and (self.fail_times is None or self.fail_times > 0):
            if self.fail_times is not None:
                self.fail_times -= 1
            raise self.fail

    async def _do_probe(self) -> None:
        await self._check()

    async def _do_card(self) -> ModelCard:
        await self._check()
        return ModelCard(self.name, self.kind, "fake", 128, self.replica)

    async def _do_create(self, api: str, body: dict, rid: str) -> OpenAIResponse:
        """vLLM's response shape for chat and completions, echoing the prompt's words."""
        await self._check()
        text = " ".join(_words(body))
        n = body.get("n") or 1
        if api == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"} for i in range(n)]
        else:
            choices = [{"index": i, "text": text, "finish_reason": "stop"} for i in range(n)]
        usage = {"prompt_tokens": 3, "completion_tokens": len(text.split()) * n, "total_tokens": 3 + len(text.split()) * n}
        obj = "chat.completion" if api == "chat" else "text_completion"
        return OpenAIResponse({"id": f"{'chatcmpl' if api == 'chat' else 'cmpl'}-{rid}", "object": obj, "model": self.name, "choices": choices, "usage": usage}, self.replica)

    async def _do_create_stream(self, api: str, body: dict, rid: str, track: bool = False):
        """vLLM's SSE payloads, one word per item (a role chunk first for chat). `track`: each item
        carries its token ids as deployments/engines/continuation.py's TokenTracker reports them
        (word i of the answer is token 1000 + i; the prompt's words are tokens 0..n-1)."""
        await self._check()
        async for item in self._words_stream(api, body, rid, 0, track, {"id": f"{'chatcmpl' if api == 'chat' else 'cmpl'}-{rid}"}):
            yield item

    async def _do_resume_stream(self, api: str, body: dict, rid: str, resume):
        """The rest of the same words, from the token the lost replica stopped at, in its chunks' id."""
        await self._check()
        async for item in self._words_stream(api, body, rid, len(resume.token_ids), True, resume.head, role=False):
            yield item

    async def _words_stream(self, api: str, body: dict, rid: str, start: int, track: bool, head: dict, role: bool = True):
        words = _words(body)
        want_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        obj = "chat.completion.chunk" if api == "chat" else "text_completion"

        def chunk(choice: dict) -> str:
            return json.dumps({"id": head["id"], "object": obj, "model": self.name, "choices": [choice]})

        for i in range(start, len(words)):
            if self.dying["after"] is not None and i - start >= self.dying["after"]:
                self.dying["after"] = None
                raise ReplicaFailed("the replica serving this request died; retry")
            w = words[i]
            last = i == len(words) - 1
            piece = w + ("" if last else " ")
            reason = "stop" if last else None
            if api == "chat":
                events = [chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})] if i == start and role else []
                events.append(chunk({"index": 0, "delta": {"content": piece}, "finish_reason": reason}))
            else:
                events = [chunk({"index": 0, "text": piece, "finish_reason": reason})]
            usage = {"prompt_tokens": 3, "completion_tokens": i + 1, "total_tokens": 4 + i} if last else None
            if last:
                if want_usage:
                    events.append(json.dumps({"id": head["id"], "object": obj, "model": self.name, "choices": [], "usage": usage}))
                events.append("[DONE]")
            first = (list(range(3)), head) if i == start and role else None
            extra = ([1000 + i], piece, reason, first) if track else None
            yield stream_item(events, usage, self.replica if i == start else None, extra)

    async def _do_tokenize(self, body: dict) -> OpenAIResponse:
        await self._check()
        words = str(body.get("prompt", "")).split()
        return OpenAIResponse({"count": len(words), "max_model_len": 128, "tokens": list(range(len(words)))}, self.replica)

    async def _do_rerank(self, req) -> RerankResult:
        await self._check()
        q = set(req.query.lower().split())
        scores = [len(q & set(d.lower().split())) / (len(q) or 1) for d in req.documents]
        return RerankResult(scores, sum(len(d.split()) for d in req.documents), 0, self.replica)

    async def _do_embed(self, req) -> EmbedResult:
        await self._check()
        return EmbedResult([[float(len(t)), 1.0] for t in req.inputs], len(req.inputs), 0, self.replica)


def _words(body: dict) -> list[str]:
    if "messages" in body:
        content = body["messages"][-1].get("content") or ""
        text = content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)
    else:
        prompt = body.get("prompt", "")
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    return (text.split() or ["ok"])[: body.get("max_tokens") or 16]
