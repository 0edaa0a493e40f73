"""Memory of request stories (serve_app/stories.py): bytes per 10,000 kept requests, measured with
tracemalloc on the same StoryBook a router replica (and the app's status board) keeps, filled
with stories made the way the router makes them."""

from __future__ import annotations

import argparse
import gc
import json
import tracemalloc

from deployments.protocol import ReplicaInfo
from serve_app import stories
from serve_app.errors import ReplicaFailed
from serve_app.stories import StoriesConfig, Stories

N = 10_000
ROUTER = {"replica_id": "u8w2k1zq", "node_id": "e1f07c22aa90" + "0" * 44, "node_ip": "10.0.0.11"}
REPLICA = ReplicaInfo("smollm2", "q1w2e3r4", "69dc193b0542" + "1" * 44, "10.0.0.12")


class _Result:
    replica = REPLICA


def _story(keeper: Stories, i: int, shape: str) -> None:
    """One request's story through the same calls the middleware, dispatcher and handlers make."""
    story = keeper.begin(f"{i:032x}", "POST", "/v1/chat/completions" if shape != "rerank" else "/v1/rerank", batch=False)
    token = stories._STORY.set(story)
    try:
        stories.note(admission={"decision": "admitted", "estimated_tokens": 812})
        if shape == "retried":
            dead = ReplicaFailed("the replica serving this request died; retry")
            dead.replica = {"replica": "k2x9q1aa", "node_ip": "10.0.0.13"}
            stories.attempt("smollm2", 0.0, exc=dead)
        stories.attempt("smollm2", 0.0, _Result())
        if shape != "rerank":
            stories.note(stream=True, first_token_ms=81.4,
                         routing={"replica": "q1w2e3r4", "predicted_cached_tokens": 512, "prompt_tokens": 700},
                         engine={"queued_ms": 1.2, "prefill_ms": 60.3, "decode_ms": 900.1, "prompt_tokens": 700,
                                 "cached_tokens": 512, "generated_tokens": 112, "preemptions": 0, "finish_reason": "stop"})
        stories.note_usage("smollm2", 700, 112)
        story.status, story.completed, story.key = 200, True, "team-analytics"
    finally:
        stories._STORY.reset(token)
    keeper.finish(story)


def measure(shape: str) -> dict:
    cfg = StoriesConfig(keep=N, keep_failed=N)
    gc.collect()
    tracemalloc.start()
    keeper = Stories(cfg, ROUTER)
    for i in range(N):
        _story(keeper, i, shape)
    keeper.take_outbox()  # handed to the board: this copy is the book's only
    gc.collect()
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(keeper.book) == N
    return {"bytes_per_10k": used, "bytes_per_story": round(used / N)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=0, help="unused (bench/run.py passes it to every step)")
    p.parse_args()
    print("RESULT " + json.dumps({shape: measure(shape) for shape in ("rerank", "llm", "retried")}), flush=True)


if __name__ == "__main__":
    main()
