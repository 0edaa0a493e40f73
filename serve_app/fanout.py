"""Splitting a long rerank list across replicas and merging the answers.

A 10,000-document list sent as one call would occupy one replica for the whole list; split
into a bounded number of chunks, the handle spreads them over every replica of the model and
each replica's `@serve.batch` still fills its forward passes. The bound keeps one request from
flooding the model's queue (which would turn into 503s for everyone).
"""

from __future__ import annotations

import math


def plan_chunks(n_items: int, min_chunk: int, max_chunks: int) -> list[tuple[int, int]]:
    """[start, end) ranges: at least `min_chunk` items each (the replica's batch), at most `max_chunks`."""
    if n_items <= 0:
        return []
    size = max(min_chunk, math.ceil(n_items / max_chunks))
    return [(i, min(i + size, n_items)) for i in range(0, n_items, size)]
