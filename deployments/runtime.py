"""Who and where this replica is, for results, logs and status."""

from __future__ import annotations

import functools

from deployments.protocol import ReplicaInfo


@functools.cache
def replica_info(model: str) -> ReplicaInfo:
    import ray
    from ray import serve

    try:
        replica_id = serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (unit tests of an engine)
        replica_id = "local"
    ctx = ray.get_runtime_context() if ray.is_initialized() else None
    return ReplicaInfo(
        model=model,
        replica_id=replica_id,
        node_id=ctx.get_node_id() if ctx else "local",
        node_ip=ray.util.get_node_ip_address() if ctx else "127.0.0.1",
        gpu_ids=tuple(ctx.get_accelerator_ids().get("GPU", [])) if ctx else (),
    )
