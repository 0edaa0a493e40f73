"""A request's prompt as chained block hashes, and the blocks each replica likely holds.

vLLM's prefix cache keys a block of `block_size` tokens on its tokens and every block before it,
so two prompts share cached blocks exactly as far as they share a prefix. The router holds no
tokenizer (it would load one per model and render every chat template), so it cuts the prompt as
it will be rendered, in order - tools, then each message with its role, name and tool calls - into
blocks of `block_size x chars_per_token` characters and chains their hashes the same way: two
requests share leading blocks here where vLLM would share leading blocks there, up to the
estimate's rounding. vLLM's own hit counters (`cost.Predictions`) show how close that guess is.

What a replica holds is remembered per replica as an LRU of block hashes as large as its KV cache
(reported by the replica), filled when a request is routed there.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any

import orjson

_SEED = b"serve-app-prefix"


def render(api: str, body: dict[str, Any]) -> str:
    """The prompt as text in the order a template puts it; the model (or adapter) name comes
    first, so two adapters of one base never share blocks (vLLM keys the adapter into its hash)."""
    head = str(body.get("model", ""))
    if api == "chat":
        parts = [head, _dumps(body.get("tools")), _dumps(body.get("chat_template_kwargs"))]
        messages = body.get("messages")
        parts += [_message(m) for m in messages] if isinstance(messages, list) else [_dumps(messages)]
        return "\x1e".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # one prompt in a list is that prompt; several never share a replica's pass
    return head + "\x1e" + (prompt if isinstance(prompt, str) else _dumps(prompt))


def _message(message: Any) -> str:
    """Role first, as every chat template writes it; then the content and what else it carries."""
    if not isinstance(message, dict):
        return _dumps(message)
    content = message.get("content")
    rest = {k: v for k, v in message.items() if k not in ("role", "content")}
    return "\x1f".join((str(message.get("role", "")), content if isinstance(content, str) else _dumps(content),
                        _dumps(rest) if rest else ""))


def _dumps(value: Any) -> str:
    if value is None:
        return ""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # not JSON (the router passes parsed JSON, so only in odd callers): its text
        return str(value)


def block_hashes(text: str, block_chars: int) -> list[bytes]:
    """One hash per full block, each covering the block and every block before it."""
    out, parent = [], _SEED
    data = text.encode("utf-8", "surrogatepass")
    for start in range(0, len(data) - block_chars + 1, block_chars):
        parent = hashlib.blake2b(data[start:start + block_chars], digest_size=8, key=parent[:8]).digest()
        out.append(parent)
    return out


class PrefixIndex:
    """Per replica, the block hashes it likely holds, least recently used first."""

    def __init__(self) -> None:
        self._held: dict[str, collections.OrderedDict[bytes, None]] = {}

    def matched(self, replica: str, hashes: list[bytes]) -> int:
        """How many leading blocks of `hashes` the replica holds."""
        held = self._held.get(replica)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def add(self, replica: str, hashes: list[bytes], capacity: int) -> None:
        """The replica computed (or reused) these blocks: most recently used now, the oldest
        dropped beyond `capacity` blocks. A prompt's blocks are touched last to first, so its
        first blocks are the freshest: vLLM frees a request's blocks tail first, and a prefix is
        only worth anything from its start."""
        held = self._held.setdefault(replica, collections.OrderedDict())
        for h in reversed(hashes):
            held[h] = None
            held.move_to_end(h)
        while len(held) > max(capacity, 1):
            held.popitem(last=False)

    def keep(self, replicas: set[str]) -> None:
        for gone in set(self._held) - replicas:
            del self._held[gone]

    def size(self, replica: str) -> int:
        return len(self._held.get(replica, ()))
