"""Engine adapters behind one small interface per model kind: `base.py` (the `Encoder` interface,
`Scored`, `TokenBudget`), `build.py` (the engine a model's config asks for), the adapters
(`transformers_encoder.py`, `vllm_pooling.py`, `vllm_openai.py`) and `limits.py` (input limits).

`Encoder` serves rerank and embed replicas (synchronous: replicas run it in a worker thread
inside a `@serve.batch` call); `vllm_openai.VLLMOpenAI` (vLLM's own OpenAI serving layer)
serves LLM replicas. Heavy imports (torch, vllm, transformers) happen inside the adapters, never
at module import, so the router can import the deployment classes without them.
"""
