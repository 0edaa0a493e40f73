"""Mid-stream continuation of LLM streams (issue: a stream survives its replica).

The router keeps what each eligible stream has sent (`track.Track`: the prompt's token ids, the
token ids and text generated so far) and, when the replica fails after the first token, opens the
rest of the stream on another replica (`LLMServer.resume_stream`, deployments/engines/continuation.py),
which runs prompt + generated ids as one token prompt and writes its output in the original
stream's shape. What cannot continue exactly is refused up front (`eligibility.why_not`).
"""
