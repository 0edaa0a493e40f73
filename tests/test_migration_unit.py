"""Mid-stream continuation (serve_app/migration/, deployments/engines/continuation.py): the router's
side with fake replicas, the replica's rewriting and text splice with a byte-level tokenizer.
The real engine's side is tests/e2e/test_chaos_streams.py."""

from __future__ import annotations

import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from deployments.engines.continuation import (
    Continuation, Splice, TokenTracker, completion_body, requested_max_tokens, rewound,
)
from deployments.protocol import Resume
from serve_app.alerts.config import AlertsConfig
from serve_app.alerts.tracker import AlertTracker, ModelView, World
from serve_app.config import ConfigError, parse_app_config
from serve_app.migration.eligibility import migration_refusal
from serve_app.migration.track import Track
from serve_app.router import Router
from tests.fakes import FakeModel

CHAT = {"messages": [{"role": "user", "content": "one two three four five six seven eight"}], "max_tokens": 8}


def client(model: FakeModel, **migration):
    models = [{"name": "chat", "kind": "llm", "engine": "vllm", "source": "org/chat", **({"migration": migration} if migration else {})}]
    cfg = parse_app_config({"gateway": {"retry_backoff_s": 0}, "models": models})
    router = Router(cfg.gateway, cfg.models, {"chat": model})
    return TestClient(router.__serve_build_asgi_app__(), raise_server_exceptions=False), router


def events(text: str) -> list[str]:
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


def content(evs: list[str]) -> str:
    out = []
    for e in evs:
        if e != "[DONE]" and "choices" in e:
            for ch in json.loads(e)["choices"]:
                out.append((ch.get("delta") or {}).get("content") or ch.get("text") or "")
    return "".join(out)


# --- the router's side -------------------------------------------------------------------------

def test_a_stream_whose_replica_is_lost_mid_way_continues_on_another_with_nothing_lost_or_repeated():
    model = FakeModel("chat", "llm", die_after=3)
    c, router = client(model)
    r = c.post("/v1/chat/completions", json={"model": "chat", "stream": True, "stream_options": {"include_usage": True}, **CHAT},
               headers={"x-request-id": "rid-cont"})
    evs = events(r.text)
    assert r.status_code == 200 and evs[-1] == "[DONE]" and not any('"error"' in e for e in evs)
    assert content(evs) == "one two three four five six seven eight"  # each word once, in order
    assert {json.loads(e)["id"] for e in evs if e != "[DONE]"} == {"chatcmpl-rid-cont"}  # one stream, one id
    # the continuation was asked from token 3 on, with the prompt's and the sent tokens' ids
    resume = [args for method, args in model.calls if method == "resume_stream"][0][3]
    assert resume.token_ids == [1000, 1001, 1002] and resume.prompt_ids == [0, 1, 2] and resume.text == "one two three "
    assert ("track", True) in [args for method, args in model.calls if method == "create_stream"][0]
    assert router.events[("stream_continued", "chat")] == 1
    usage = [json.loads(e)["usage"] for e in evs if '"usage"' in e][-1]
    assert usage["completion_tokens"] == 8
    # The story: both attempts name their replica (a tracked first item has four parts), and the move.
    story = c.get("/v1/requests/rid-cont").json()
    assert [a["replica"] for a in story["attempts"]] == ["fake-replica", "fake-replica"]
    assert story["migrations"] == [{"outcome": "continued", "reason": "replica_lost", "lost_replica": "fake-replica",
                                    "at_token": 3, "to_replica": "fake-replica"}]


def test_a_stream_that_cannot_continue_exactly_ends_with_an_error_event_naming_why():
    model = FakeModel("chat", "llm", die_after=2)
    c, router = client(model)
    body = {"model": "chat", "stream": True, **CHAT,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}
    r = c.post("/v1/chat/completions", json=body, headers={"x-request-id": "rid-js"})
    evs = events(r.text)
    assert evs[-1] == "[DONE]" and content(evs[:-2]) == "one two "
    err = json.loads(evs[-2])["error"]
    assert err["code"] == "replica_failed" and "structured output (json_schema)" in err["message"] and err["request_id"] == "rid-js"
    assert router.events[("stream_refused", "chat")] == 1
    assert not [m for m, _ in model.calls if m == "resume_stream"]
    # untracked: the replica was not asked for token ids it would not need
    assert ("track", True) not in [args for m, args in model.calls if m == "create_stream"][0]


def test_migration_off_or_its_attempts_spent_end_the_stream_in_band():
    c, router = client(FakeModel("chat", "llm", die_after=2), enabled=False)
    evs = events(c.post("/v1/chat/completions", json={"model": "chat", "stream": True, **CHAT}).text)
    assert "migration is off" in json.loads(evs[-2])["error"]["message"]

    class DiesTwice(FakeModel):
        async def _do_resume_stream(self, api, body, rid, resume):
            self.dying["after"] = 1
            async for item in super()._do_resume_stream(api, body, rid, resume):
                yield item

    c, router = client(DiesTwice("chat", "llm", die_after=2), attempts=1)
    evs = events(c.post("/v1/chat/completions", json={"model": "chat", "stream": True, **CHAT}).text)
    assert content(evs[:-2]) == "one two three "  # two words, lost; one from the continuation, lost
    assert "continued 1 time(s) already" in json.loads(evs[-2])["error"]["message"]
    assert router.events[("stream_continued", "chat")] == 1 and router.events[("stream_refused", "chat")] == 1


def test_a_stream_lost_after_its_last_token_gets_its_usage_and_done_from_the_router():
    class DiesAtTheEnd(FakeModel):
        async def _do_create_stream(self, api, body, rid, track=False):
            async for item in super()._do_create_stream(api, body, rid, track):
                if item[0][-1] == "[DONE]":  # the replica dies before sending its usage and [DONE]
                    yield (item[0][:-2] if len(item[0]) > 2 else item[0][:1], None, None, item[3])
                    from serve_app.errors import ReplicaFailed
                    raise ReplicaFailed("gone")
                yield item

    model = DiesAtTheEnd("chat", "llm")
    c, _ = client(model)
    evs = events(c.post("/v1/chat/completions", json={"model": "chat", "stream": True, "stream_options": {"include_usage": True},
                                                      **CHAT}).text)
    assert evs[-1] == "[DONE]" and content(evs) == "one two three four five six seven eight"
    assert json.loads(evs[-2])["usage"] == {"prompt_tokens": 3, "total_tokens": 11, "completion_tokens": 8}
    assert not [m for m, _ in model.calls if m == "resume_stream"]


def test_a_replica_of_the_release_before_migration_still_streams():
    class Old(FakeModel):
        async def _do_create_stream(self, api, body, rid):  # no `track`
            async for item in super()._do_create_stream(api, body, rid):
                yield item

    c, _ = client(Old("chat", "llm"))
    r = c.post("/v1/chat/completions", json={"model": "chat", "stream": True, **CHAT})
    assert r.status_code == 200 and content(events(r.text)) == "one two three four five six seven eight"


@pytest.mark.parametrize("api,body,reason", [
    ("chat", {"n": 2}, "n"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}, None),
    ("chat", {"response_format": {"type": "json_object"}}, "structured_output"),
    ("chat", {"response_format": {"type": "text"}}, None),
    ("chat", {"structured_outputs": {"regex": "a+"}}, "structured_output"),
    ("chat", {"logprobs": True}, "logprobs"),
    ("chat", {"frequency_penalty": 0.5}, "penalties"),
    ("chat", {"repetition_penalty": 1.2, "seed": 3, "stop": ["x"], "temperature": 0.7}, None),
    ("completion", {"prompt": ["a", "b"]}, "prompts"),
    ("completion", {"prompt": [1, 2, 3]}, None),
    ("completion", {"prompt": "a", "echo": True}, "echo"),
])
def test_what_can_continue_exactly(api, body, reason):
    cfg = parse_app_config({"models": [{"name": "m", "kind": "llm", "engine": "vllm", "source": "o/m"}]}).models[0]
    got = migration_refusal(api, body, cfg)
    assert (got[0] if got else None) == reason
    thinker = parse_app_config({"models": [{"name": "m", "kind": "llm", "engine": "vllm", "source": "o/m",
                                            "serving": {"reasoning_parser": "qwen3"}}]}).models[0]
    assert migration_refusal("chat", {}, thinker)[0] == "reasoning"


def test_migration_is_an_llm_setting():
    with pytest.raises(ConfigError, match="migration applies to llm models only"):
        parse_app_config({"models": [{"name": "e", "kind": "embed", "engine": "transformers", "source": "o/e",
                                      "migration": {"enabled": False}}]})


def test_the_replica_gone_alert_names_the_streams_continued_elsewhere():
    tracker = AlertTracker(AlertsConfig.model_validate({"window_s": 0}), "app", clock=lambda: 100.0)
    view = ModelView(target=1, replicas={"r1": {"state": "RUNNING", "node_id": "n", "node_ip": "ip"}}, silent_after_s=60)
    tracker.observe(World(models={"m": view}, reports={"m": {"r1": {"reported_at": 99.0}}}, nodes=None))
    gone = ModelView(target=1, replicas={}, silent_after_s=60)
    out = tracker.observe(World(models={"m": gone}, reports={}, nodes=None, migrated={"r1": ["req-a", "req-b"]}))
    assert out and "streams continued on another replica: req-a, req-b" in out[0]["text"]
    assert out[0]["migrated_request_ids"] == ["req-a", "req-b"]


# --- the replica's side ------------------------------------------------------------------------

class ByteTokenizer:
    """Token i is byte i (UTF-8 bytes of a character may come as separate tokens)."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return bytes(ids).decode("utf-8", errors="replace")


def _chunk(api, text, ids, finish=None, first=None):
    if api == "chat":
        choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish, "token_ids": ids}
        out = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 5, "model": "m", "choices": [choice]}
        if first:
            out["prompt_token_ids"] = first
    else:
        out = {"id": "cmpl-x", "object": "text_completion", "created": 5, "model": "m", "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None,
             "prompt_token_ids": first, "token_ids": ids}]}
    return json.dumps(out, separators=(",", ":"))


@pytest.mark.parametrize("api", ["chat", "completion"])
def test_the_tracker_reads_ids_and_takes_them_out_unless_asked(api):
    t = TokenTracker(api, keep_ids=False)
    a = t.see(_chunk(api, "hi", [104, 105], first=[1, 2]))[0]
    b = t.see(_chunk(api, "!", [33], finish="length"))[0]
    assert "[104" not in a and "[1,2]" not in a and "[33]" not in b and json.loads(a)["choices"][0]["token_ids"] is None
    assert t.take() == ([104, 105, 33], "hi!", "length", ([1, 2], {"id": f"{'chatcmpl' if api == 'chat' else 'cmpl'}-x",
                                                                    "created": 5, "model": "m"}))
    assert t.take() == ([], "", "length", None)
    kept = TokenTracker(api, keep_ids=True).see(_chunk(api, "hi", [104, 105], first=[1, 2]))[0]
    assert "[104,105]" in kept


def test_the_budget_and_the_sampling_carry_over():
    resume = Resume([1, 2], [7, 8, 9], "abc", {"id": "x"})
    assert requested_max_tokens("chat", {}, 256) == 256 and requested_max_tokens("chat", {"max_completion_tokens": 9}, 256) == 9
    assert requested_max_tokens("completion", {}, 256) == 16 and requested_max_tokens("completion", {"max_tokens": None}, 256) == 256
    body = {"messages": [], "max_tokens": 10, "min_tokens": 5, "temperature": 0.3, "top_k": 4, "seed": 1, "stop": ["z"],
            "tools": [], "tool_choice": "none", "chat_template_kwargs": {}, "stream": True, "n": 1}
    out = completion_body("chat", body, resume, "m", 256)
    assert out == {"model": "m", "prompt": [1, 2, 7, 8, 9], "max_tokens": 7, "min_tokens": 2, "temperature": 0.3, "top_k": 4,
                   "seed": 1, "stop": ["z"], "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    assert completion_body("chat", {**body, "max_tokens": 3}, resume, "m", 256) is None  # spent


def test_a_character_cut_between_tokens_is_generated_again():
    tok = ByteTokenizer()
    e_acute = list("é".encode())  # two byte-tokens; the stream was cut between them
    resume = Resume([65], [ord("c"), ord("a"), ord("f"), e_acute[0]], "caf", {})
    ids, text = rewound(tok, resume, True)
    assert ids == [ord("c"), ord("a"), ord("f")] and text == "caf"


def test_text_held_back_is_sent_and_a_stop_string_across_the_cut_still_stops():
    # Sent "Hello wo", held "rl" (vLLM's stop buffer), new text "d! More": the stop "world!" straddles.
    s = Splice("Hello wo", "rl", ["world!"], include_stop=False)
    assert s.feed("d", False) == ""  # a straddle is still possible: held
    assert s.feed("! More", False) == "" and s.stopped == "world!"  # cut where the stop string began
    s = Splice("Hello wo", "rl", ["world!"], include_stop=True)
    s.feed("d", False)
    assert s.feed("! More", False) == "rld!" and s.stopped == "world!"
    s = Splice("Hello wo", "rl", ["world!"], include_stop=False)
    assert s.feed("dly and more", False) == "rldly and more" and s.stopped is None  # no straddle: all of it
    assert s.feed(" text", False) == " text"
    s = Splice("abc", "de", [], include_stop=False)
    assert s.feed("f", False) == "def"
    s = Splice("ab", "", ["abcdef"], include_stop=False)
    assert s.feed("c", True) == "c"  # the stream ended before the window closed: checked, no stop


def test_the_continuation_writes_the_original_streams_shape_and_usage():
    resume = Resume([1, 2, 3], [10, 11], "ab", {"id": "chatcmpl-orig", "created": 42, "model": "m"})
    w = Continuation("chat", resume, Splice("ab", "", [], False), keep_ids=False)
    out = w.see(_chunk("completion", "c", [12]))
    ch = json.loads(out[0])
    assert ch["id"] == "chatcmpl-orig" and ch["created"] == 42 and ch["object"] == "chat.completion.chunk"
    assert ch["choices"][0]["delta"] == {"content": "c"} and ch["choices"][0]["token_ids"] is None
    end = w.see(_chunk("completion", "d", [13], finish="length"))
    assert json.loads(end[0])["choices"][0]["finish_reason"] == "length"
    usage = w.see(json.dumps({"id": "cmpl-r", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                                                          "total_tokens": 7}}))
    assert json.loads(usage[0])["usage"] == {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4}
    assert w.tracker.take()[:3] == ([12, 13], "cd", "length")

    err = json.dumps({"error": {"message": "engine dead", "code": 500}})
    assert w.see(err) == [err]  # an in-band error passes through, never swallowed

    stopped = Continuation("completion", resume, Splice("ab", "", ["bcd"], False), keep_ids=True)
    out = stopped.see(_chunk("completion", "cd", [12, 13]))
    assert stopped.done and out[-1] == "[DONE]"
    final = json.loads(out[0])["choices"][0]
    assert final["text"] == "" and final["finish_reason"] == "stop" and final["stop_reason"] == "bcd" and final["token_ids"] == [12, 13]


def test_the_router_track_collects_what_was_sent():
    t = Track()
    t.add((["e"], None, None, ([1], "a", None, ([9, 9], {"id": "x"}))))
    t.add((["e"], None))  # an untracked item (no fourth element) changes nothing
    t.add((["e"], None, None, ([2, 3], "bc", "stop", None)))
    assert t.ready and t.finish == "stop" and t.resume() == Resume([9, 9], [1, 2, 3], "abc", {"id": "x"})
    events, usage = t.ending("chat", want_usage=True)
    assert events[-1] == "[DONE]" and usage == {"prompt_tokens": 2, "total_tokens": 5, "completion_tokens": 3}


# --- the splice against an uninterrupted run, as a property -------------------------------------

def _vllm_stream(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """vLLM's stop-string handling over `text`, one character per token: the output and the stop."""
    out = ""
    for ch in text:
        out += ch
        for stop in stops:  # vLLM: the earliest end; at the same end, the first in the list
            if out.endswith(stop):
                return (out if include else out[: len(out) - len(stop)]), stop
    return out, None


@settings(max_examples=400, deadline=None)
@given(text=st.text("ab ", min_size=1, max_size=30), cut=st.integers(0, 30), stops=st.lists(st.text("ab ", min_size=1, max_size=4),
       max_size=3), include=st.booleans(), pieces=st.lists(st.integers(1, 4), min_size=1, max_size=30))
def test_a_cut_stream_stops_where_the_uninterrupted_one_would(text, cut, stops, include, pieces):
    """The text sent before a cut + the continuation (vLLM's own stop check on the new text, and
    Splice at the cut) is what one uninterrupted run sends, wherever the cut falls."""
    cut = min(cut, len(text))
    whole, whole_stop = _vllm_stream(text, stops, include)
    before, stop_before = _vllm_stream(text[:cut], stops, include)
    assume(stop_before is None)  # the original had not stopped before its replica was lost
    width = max((len(s) for s in stops), default=1) - 1
    sent = text[: max(0, cut - width)] if stops else text[:cut]  # vLLM holds back width characters
    held = text[len(sent):cut]
    new_out, new_stop = _vllm_stream(text[cut:], stops, include)  # the continuation's engine
    # A stop string straddling the cut that ends inside a stop string wholly after it: not handled
    # (documented in docs/MIGRATION.md); the property holds everywhere else.
    assume(not _overlapping_straddle(text, cut, stops, include, new_stop, len(new_out)))
    splice, got, i = Splice(sent, held, stops, include), sent, 0
    for n in pieces:
        if i >= len(new_out):
            break
        part = new_out[i:i + n]
        i += n
        got += splice.feed(part, final=i >= len(new_out))
        if splice.stopped:
            break
    if not splice.stopped and (i < len(new_out) or not new_out):
        got += splice.feed(new_out[i:], final=True)
    assert got == whole
    assert (splice.stopped or new_stop) == whole_stop


def _overlapping_straddle(text: str, cut: int, stops: list[str], include: bool, new_stop: str | None, new_len: int) -> bool:
    """A stop string across the cut that ends after the start of the stop string the continuation's
    engine stopped at (which cut that text away, unless included, before the splice saw it) and
    before that one's end."""
    if new_stop is None or include:
        return False
    start2 = cut + new_len
    for s in stops:
        for start in range(max(0, cut - len(s) + 1), cut):
            if text.startswith(s, start) and start2 < start + len(s) <= start2 + len(new_stop):
                return True
    return False


def test_a_fallbacks_stream_continues_on_the_fallback_not_on_the_model_asked_for():
    from serve_app.errors import ServiceUnavailable

    primary = FakeModel("chat", "llm", fail=ServiceUnavailable("down"))
    backup = FakeModel("backup", "llm", die_after=2)
    cfg = parse_app_config({"gateway": {"retry_backoff_s": 0}, "models": [
        {"name": "chat", "kind": "llm", "engine": "vllm", "source": "o/chat", "fallbacks": ["backup"]},
        {"name": "backup", "kind": "llm", "engine": "vllm", "source": "o/backup"}]})
    c = TestClient(Router(cfg.gateway, cfg.models, {"chat": primary, "backup": backup}).__serve_build_asgi_app__(),
                   raise_server_exceptions=False)
    evs = events(c.post("/v1/chat/completions", json={"model": "chat", "stream": True, **CHAT}).text)
    assert content(evs) == "one two three four five six seven eight" and evs[-1] == "[DONE]"
    assert [m for m, _ in backup.calls].count("resume_stream") == 1
    assert not [m for m, _ in primary.calls if m == "resume_stream"]


def test_a_stopping_router_hands_its_last_stories_to_the_board(monkeypatch):
    """A redeploy stops the router replica that drained the streams it moved: their stories (and
    `migrations`) must outlive it, read from the router replicas that stay."""
    import ray

    from serve_app import status
    from serve_app.stories import Stories, StoriesConfig

    posted = []
    monkeypatch.setattr(status, "app_name", lambda: "app")
    monkeypatch.setattr(status.status_board, "call", lambda app, method, *args: posted.append((app, method, args)) or "ref")
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: None)
    stories = Stories(StoriesConfig(), {"replica_id": "r"})
    stories.finish(stories.begin("rid-last", "POST", "/v1/chat/completions", False))
    status.hand_over_last_stories(stories)
    ((app, method, (batch, _)),) = posted
    assert (app, method) == ("app", "add_stories") and len(batch) == 1
    status.hand_over_last_stories(stories)  # nothing left: nothing sent
    assert len(posted) == 1
