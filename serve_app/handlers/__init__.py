"""The router's handlers, one module per API family (as vLLM's serving_chat, serving_completion,
...): `llm.py`, `scoring.py`, `admin.py`, over the small `context.py` they share."""
