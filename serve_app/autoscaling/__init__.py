"""LLM capacity by tokens and KV cache, not by request counts (docs/AUTOSCALING.md).

- `config`: the model's `deployment.autoscaling_config` (Serve's fields plus the token policy's);
- `policy`: the decision as a pure function of what the replicas report (no Ray in it);
- `serve_policy`: the same decision plugged into Serve's custom autoscaling-policy API (it runs
  in the Serve controller and tells the app's status board what it decided and why);
- `queue`: the router's admission by queued prompt tokens, with a Retry-After from the drain rate.
"""
