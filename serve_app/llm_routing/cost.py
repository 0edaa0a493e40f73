"""The cost of a request on each LLM replica, and the ranking the request router returns.

cost(replica) = prefill it would compute      (prompt tokens minus the prefix it likely holds)
              + load_weight x outstanding work (tokens routed there and not yet computed: a
                                                request's prompt until its first token, its output
                                                until it ends)
              + kv_penalty_tokens x kv_use^2   (a full cache evicts, preempts and recomputes)
              + adapter_load_tokens            (a LoRA adapter it does not hold: loaded first)

An adapter's requests therefore go where it is loaded while that replica is not busier than a
load costs; a hot adapter spreads as a hot prefix does. What a replica holds is what it last
reported (vLLM's loaded adapters) plus what this router sent there since (least recent out, as
vLLM's own adapter cache evicts). An adapter's prompt hashes apart from its base's (the name is
part of the rendered prompt), as vLLM keys its prefix cache by adapter.

There is no fleet-wide on/off switch for affinity: load is a term of every replica's cost, so a
replica holding a prefix wins exactly while the prefill it saves outweighs the work queued on it.
A prefix every request shares (one system prompt) therefore spreads: once the replica holding it
is busier than the prefill it saves, another replica takes a request, computes the prefix, and
from then on both hold it and load alone decides. Outstanding work is this router's own, counted
exactly as its requests start and end, plus the other routers' share as of the replica's last
report: N router replicas see one load, not 1/N of it each. The share is what the replica
reported minus what this router holds there now and what it finished there within a report's
transit time (a report travels replica -> controller -> router, and may still count a request
that has ended since). So a report taken while a conversation's last turn ran does not make its
replica look busy when the next turn, sent at once, is routed; the price is that other routers'
work that ended in the same window is briefly under-counted, the cheaper error.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import time
from typing import Any

from serve_app.llm_routing.config import RoutingConfig
from serve_app.llm_routing.prefix import PrefixIndex, block_hashes, render

DEFAULT_BLOCK_SIZE = 16  # vLLM's on GPUs (128 on CPU); replicas report their own
DEFAULT_OUTPUT_TOKENS = 128  # a request that names no max_tokens, for its share of the load
MAX_OUTPUT_TOKENS = 32_768  # one body's claim on a replica's load (vLLM caps max_tokens by the context)
MAX_CHOICES = 16
FLOAT_FIELDS = ("kv_usage", "reported_at")
SCALE_MIN_TOKENS = 2048  # vLLM's prompt tokens seen before its ratio to the estimate is used
SCALE_BOUNDS = (0.25, 4.0)


def estimate(api: str, body: dict[str, Any], chars_per_token: float) -> tuple[str, int, int]:
    """(the rendered prompt, its tokens, the output tokens it may take), without a tokenizer."""
    text = render(api, body)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    n = body.get("n") if isinstance(body.get("n"), int) and body.get("n") > 0 else 1
    per_choice = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else DEFAULT_OUTPUT_TOKENS
    output = min(per_choice, MAX_OUTPUT_TOKENS) * min(n, MAX_CHOICES)  # a huge claim must not mark a replica busy
    return text, max(1, round(len(text) / chars_per_token)), output


def outstanding_work(api: str, body: dict[str, Any], chars_per_token: float) -> tuple[int, int]:
    """A request's share of a replica's load, (prompt tokens, output tokens): the prompt counts until
    its first token (the prefill is then done; a stream's first token is seen on both sides), the
    output until it ends. The replica's count and the router's are the same numbers."""
    _, prompt_tokens, output_tokens = estimate(api, body, chars_per_token)
    return prompt_tokens, output_tokens


@dataclasses.dataclass(frozen=True)
class ReplicaLoad:
    """What an LLM replica reports through Serve's routing stats (deployments/engines/vllm_load.py)."""

    block_size: int = DEFAULT_BLOCK_SIZE
    num_blocks: int = 0  # its KV cache, in blocks (0: unknown yet)
    kv_usage: float = 0.0
    running: int = 0
    waiting: int = 0
    outstanding_tokens: int = 0  # tokens of the requests it holds not yet computed (outstanding_work), all routers'
    prompt_tokens_waiting: int = 0  # of which prompts not yet prefilled (the router's token queue reads them)
    prefill_tokens_per_s: float = 0.0  # its measured prefill rate (the token queue's Retry-After)
    prefix_queries: int = 0  # vLLM's prefix-cache counters since the replica started, in tokens
    prefix_hits: int = 0
    estimated_prompt_tokens: int = 0  # the same prompts as the routers estimate them (chars_per_token)
    reported_at: float = 0.0  # the replica's clock: tells a new report from the one seen before
    adapters: frozenset[str] = frozenset()  # the LoRA adapters vLLM holds loaded there

    def block_scale(self) -> float:
        """How many of the router's prompt blocks one of vLLM's holds: the routers' estimate of the
        prompts this replica took over vLLM's own count of them (its prefix-cache queries). Prose
        of whole words runs ~7 characters a token, not the estimate's 4, so without this the index
        forgot prefixes vLLM still held. 1 until enough was seen; bounded both ways."""
        if self.prefix_queries < SCALE_MIN_TOKENS or self.estimated_prompt_tokens <= 0:
            return 1.0
        return min(SCALE_BOUNDS[1], max(SCALE_BOUNDS[0], self.estimated_prompt_tokens / self.prefix_queries))

    @classmethod
    def from_stats(cls, stats: dict[str, Any] | None) -> "ReplicaLoad":
        """Tolerant of missing keys (a replica not reporting yet, or an older one)."""
        if not stats:
            return cls()
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in stats.items():
            if key == "adapters" and isinstance(value, (list, tuple, set, frozenset)):
                values[key] = frozenset(v for v in value if isinstance(v, str))
            elif key in known and key != "adapters" and isinstance(value, (int, float)) and not isinstance(value, bool):
                values[key] = float(value) if key in FLOAT_FIELDS else int(value)
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A routed request as the cost sees it."""

    hashes: list[bytes]
    block_size: int
    prompt_tokens: int
    output_tokens: int
    adapter: str | None = None  # the LoRA adapter it asks for


@dataclasses.dataclass(frozen=True)
class Cost:
    replica: str
    total: float
    cached_tokens: int
    prefill_tokens: int
    outstanding_tokens: int
    adapter_cold: bool = False  # the replica would load the request's adapter first


@dataclasses.dataclass
class Predictions:
    """Per replica: prompt tokens routed there and how many of them the router expected cached,
    beside vLLM's own counters: how right the guesses were."""

    prompt_tokens: int = 0
    predicted_cached: int = 0
    requests: int = 0


class CostModel:
    """Pure bookkeeping (no Ray): unit-tested against a simulated engine."""

    def __init__(self, cfg: RoutingConfig | None = None, rng: random.Random | None = None,
                 adapter_names: dict[str, str] | None = None, adapters_resident: int = 0) -> None:
        self.cfg = cfg or RoutingConfig()
        self.adapter_names = dict(adapter_names or {})  # `sql`, `base:sql` -> `sql`
        self.adapters_resident = max(1, adapters_resident)
        self.adapters_sent: dict[str, collections.OrderedDict[str, None]] = {}  # replica -> adapters, LRU
        self.index = PrefixIndex()
        self.loads: dict[str, ReplicaLoad] = {}
        self.outstanding: collections.Counter[str] = collections.Counter()  # this router's, exact
        self.others: dict[str, int] = {}  # other routers' work on each replica, as of its last report
        self.ended: dict[str, collections.deque[tuple[float, int]]] = {}  # this router's recent ends: (when, work)
        self.clock = time.monotonic
        # handle request id -> [replica, prompt tokens not yet prefilled (0 after the first token), output tokens]
        self.inflight: dict[str, list] = {}
        self.last_tried: dict[Any, str] = {}  # a request's attempt key -> the replica that last took it
        self.predictions: dict[str, Predictions] = collections.defaultdict(Predictions)
        self.rng = rng or random.Random()

    # --- the request ---
    def prompt(self, api: str, body: dict[str, Any]) -> Prompt:
        text, prompt_tokens, output_tokens = estimate(api, body, self.cfg.chars_per_token)
        block_size = self._block_size()
        hashes = block_hashes(text, max(1, round(block_size * self.cfg.chars_per_token)))
        name = body.get("model")
        adapter = self.adapter_names.get(name) if isinstance(name, str) else None
        return Prompt(hashes, block_size, prompt_tokens, output_tokens, adapter)

    def holds_adapter(self, replica: str, adapter: str) -> bool:
        return adapter in self.loads.get(replica, ReplicaLoad()).adapters or adapter in self.adapters_sent.get(replica, ())

    def _block_size(self) -> int:
        """One block size for the model (its replicas share the engine config)."""
        for load in self.loads.values():
            if load.block_size > 0:
                return load.block_size
        return DEFAULT_BLOCK_SIZE

    # --- the choice ---
    def costs(self, prompt: Prompt, replicas: list[str]) -> list[Cost]:
        out = []
        for r in replicas:
            load = self.loads.get(r, ReplicaLoad())
            cached = min(self.index.matched(r, prompt.hashes) * prompt.block_size, prompt.prompt_tokens - 1)
            prefill = prompt.prompt_tokens - max(cached, 0)
            outstanding = self.outstanding[r] + self.others.get(r, 0)
            cold = prompt.adapter is not None and not self.holds_adapter(r, prompt.adapter)
            total = (prefill + self.cfg.load_weight * outstanding + self.cfg.kv_penalty_tokens * load.kv_usage ** 2
                     + (self.cfg.adapter_load_tokens if cold else 0))
            out.append(Cost(r, total, max(cached, 0), prefill, outstanding, cold))
        return out

    def rank(self, prompt: Prompt, replicas: list[str], attempt: Any = None) -> list[Cost]:
        """Cheapest first; ties in random order (no replica is everyone's first by its name). The
        replica that last took this request (`attempt`: the same key for each of its tries) goes
        last: a retry tries another first."""
        costs = self.costs(prompt, replicas)
        self.rng.shuffle(costs)
        last = self.last_tried.get(attempt) if attempt is not None else None
        costs.sort(key=lambda c: (c.replica == last, c.total))
        return costs

    # --- what happened ---
    def routed(self, handle_request_id: str, attempt: Any, replica: str, prompt: Prompt, cost: Cost | None) -> None:
        """A replica accepted the request: its work is outstanding there until `completed`."""
        cost = cost or self.costs(prompt, [replica])[0]
        self.inflight[handle_request_id] = [replica, prompt.prompt_tokens, prompt.output_tokens]  # as outstanding_work
        self.outstanding[replica] += prompt.prompt_tokens + prompt.output_tokens
        if attempt is not None:
            self.last_tried[attempt] = replica
            while len(self.last_tried) > 10_000:  # ids of finished requests: oldest first out
                self.last_tried.pop(next(iter(self.last_tried)))
        p = self.predictions[replica]
        p.prompt_tokens += prompt.prompt_tokens
        p.predicted_cached += cost.cached_tokens
        p.requests += 1
        load = self.loads.get(replica, ReplicaLoad())
        capacity = round(load.num_blocks * load.block_scale()) if load.num_blocks else 1_000_000
        self.index.add(replica, prompt.hashes, capacity)
        if prompt.adapter is not None:
            sent = self.adapters_sent.setdefault(replica, collections.OrderedDict())
            sent[prompt.adapter] = None
            sent.move_to_end(prompt.adapter)
            while len(sent) > self.adapters_resident:
                sent.popitem(last=False)

    def prefilled(self, handle_request_id: str) -> None:
        """The request's first token came back: its prompt is computed, and what it still asks of
        the replica is its decode. (A replica busy only decoding is no reason to send a prefix
        elsewhere: a new prefill there waits for steps, not for other prefills.)"""
        entry = self.inflight.get(handle_request_id)
        if entry is not None and entry[1]:
            prompt_tokens, entry[1] = entry[1], 0
            self._release(entry[0], prompt_tokens)

    def completed(self, handle_request_id: str) -> None:
        """The accepted request ended (answered, failed or cancelled)."""
        entry = self.inflight.pop(handle_request_id, None)
        if entry is not None:
            self._release(entry[0], entry[1] + entry[2])

    def _release(self, replica: str, work: int) -> None:
        """Work left this router's count for `replica`; a report may still hold it for a while."""
        self.outstanding[replica] -= work
        if self.outstanding[replica] <= 0:
            del self.outstanding[replica]
        ended = self.ended.setdefault(replica, collections.deque())
        ended.append((self.clock(), work))
        self._recently_ended(replica)

    @property
    def report_transit_s(self) -> float:
        """How long a report may still count a request that ended: the controller polls each
        replica every `stats_period_s` and passes the result on in its next loops."""
        return 2 * self.cfg.stats_period_s + 1.0

    def _recently_ended(self, replica: str) -> int:
        """This router's work that left `replica` (its prefill done, or the request ended) within a
        report's transit time."""
        ended = self.ended.get(replica)
        if not ended:
            return 0
        horizon = self.clock() - self.report_transit_s
        while ended and ended[0][0] < horizon:
            ended.popleft()
        return sum(work for _, work in ended)

    def observe(self, loads: dict[str, ReplicaLoad]) -> None:
        """Replicas' reports as routing finds them. A new report splits its outstanding work into
        this router's (known exactly, counted live) and the others' (kept until the next report);
        the same report seen again changes nothing."""
        for r, load in loads.items():
            if self.loads.get(r) != load:
                mine = self.outstanding[r] + self._recently_ended(r)
                self.others[r] = max(0, load.outstanding_tokens - mine)
                self.loads[r] = load

    def update(self, loads: dict[str, ReplicaLoad]) -> None:
        """The replicas Serve lists now, with their latest reports; the gone are forgotten."""
        for gone in set(self.loads) - set(loads):
            del self.loads[gone]
            self.others.pop(gone, None)
            self.ended.pop(gone, None)
            self.adapters_sent.pop(gone, None)
        self.observe(loads)
        self.index.keep(set(loads))
        for gone in set(self.predictions) - set(loads):
            del self.predictions[gone]
