"""Who and where this replica is, for results, logs and status."""

from __future__ import annotations

import functools

import ray

from deployments.protocol import ReplicaInfo
from serve_app.serve_context import replica_id


@functools.cache
def replica_info(model: str) -> ReplicaInfo:
    ctx = ray.get_runtime_context() if ray.is_initialized() else None
    return ReplicaInfo(
        model=model,
        replica_id=replica_id(),
        node_id=ctx.get_node_id() if ctx else "local",
        node_ip=ray.util.get_node_ip_address() if ctx else "127.0.0.1",
        gpu_ids=tuple(ctx.get_accelerator_ids().get("GPU", [])) if ctx else (),
    )
