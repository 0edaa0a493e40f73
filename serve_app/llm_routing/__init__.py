"""Which LLM replica serves a request: the one where it costs least, counting the prompt prefix the
replica likely holds in vLLM's KV cache, the work already queued there and how full its cache is.

- `config`: the `routing:` section of an LLM model;
- `prefix`: a request's prompt as chained block hashes, and what each replica likely holds;
- `cost`: the cost of a request on each replica, and the ranking (pure: unit-tested without Ray);
- `request_router`: the adapter to Ray Serve's public `RequestRouter` API, running in the router
  replica's process for its handle to the LLM deployment;
- the replicas' side: `deployments/engines/vllm_load.py` reads vLLM's scheduler stats and the LLM
  replica reports them through Serve's `record_routing_stats`.
"""
