"""The router's record of one tracked stream: enough to continue it on another replica."""

from __future__ import annotations

from typing import Any

from deployments.engines.continuation import usage_event
from deployments.protocol import Resume


class Track:
    """Fed each handle item's fourth element (deployments/engines/continuation.py TokenTracker.take)."""

    __slots__ = ("prompt_ids", "head", "ids", "text", "finish", "continued")

    def __init__(self) -> None:
        self.prompt_ids: list[int] | None = None
        self.head: dict[str, Any] = {}
        self.ids: list[int] = []
        self.text: list[str] = []
        self.finish: str | None = None
        self.continued = 0  # continuations taken so far

    def add(self, item: tuple[Any, ...]) -> None:
        if len(item) < 4 or item[3] is None:
            return
        ids, text, finish, first = item[3]
        if first is not None:
            self.prompt_ids, self.head = first
        self.ids.extend(ids)
        if text:
            self.text.append(text)
        if finish:
            self.finish = finish

    @property
    def ready(self) -> bool:
        """The first item carried the prompt's ids (an older replica, or no tracking, sends none)."""
        return self.prompt_ids is not None

    def resume(self) -> Resume:
        return Resume(list(self.prompt_ids or ()), list(self.ids), "".join(self.text), dict(self.head))

    def ending(self, api: str, want_usage: bool) -> tuple[list[str], dict[str, int]]:
        """A stream that had finished (its finish_reason sent) when its replica failed lost only its
        usage chunk and [DONE]: written here, with the usage the ids tell."""
        prompt = len(self.prompt_ids or ())
        usage = {"prompt_tokens": prompt, "total_tokens": prompt + len(self.ids), "completion_tokens": len(self.ids)}
        return [*([usage_event(api, self.head, usage)] if want_usage else []), "[DONE]"], usage
