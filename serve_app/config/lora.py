"""The `lora:` section of an LLM model: fine-tunes served as LoRA adapters on its replicas
(vLLM's `--enable-lora`), and the names clients may put in `model` for them (docs/LORA.md).

An adapter is served by its base model's replicas and answers under its own name; it is never a
deployment of its own. Clients name it by its name or as `base:adapter` (Ray Serve LLM's form);
allow-lists, quotas, usage and metrics see the adapter's name.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from serve_app.config_base import StrictConfig

# vLLM's accepted --max-lora-rank values (vllm.config.lora.MaxLoRARanks).
LoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
LORA_RANKS: tuple[int, ...] = get_args(LoraRank)
ADAPTER_SEPARATOR = ":"  # `base:adapter`


class LoraAdapter(StrictConfig):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="what clients put in `model` (also `base:name`); no ':'")
    source: str = Field(min_length=1, description="a local PEFT adapter folder (adapter_config.json and weights), "
                        "or a hub id in production")


class LoraSettings(StrictConfig):
    """vLLM's LoRA flags, owned here (not engine_kwargs) so `check` can hold the adapters to them."""

    adapters: list[LoraAdapter] = Field(min_length=1)
    max_lora_rank: LoraRank = Field(16, description="the largest adapter rank the engine accepts (`--max-lora-rank`)")
    max_loras: int = Field(4, ge=1, le=256, description="adapters in one engine step (`--max-loras`)")
    max_cpu_loras: int | None = Field(
        None, ge=1, le=4096, description="adapters kept loaded on a replica (`--max-cpu-loras`); more are "
        "loaded from disk on demand, least recently used out; default: max_loras"
    )

    @model_validator(mode="after")
    def _unique_and_fitting(self) -> "LoraSettings":
        names = [a.name for a in self.adapters]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"adapters: {dup[0]!r} is named twice")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")
        return self

    @property
    def resident(self) -> int:
        """How many adapters a replica keeps loaded (vLLM's CPU LoRA cache)."""
        return self.max_cpu_loras or self.max_loras


# vLLM flags that `lora:` owns: set through it, never through engine_kwargs.
OWNED_ENGINE_KWARGS = frozenset({"enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "lora_modules"})


def adapter_forms(base: str, aliases: list[str], adapter: str) -> list[str]:
    """Every name a client may use for `adapter` of model `base`: its own, `base:adapter`, `alias:adapter`."""
    return [adapter, *(f"{b}{ADAPTER_SEPARATOR}{adapter}" for b in (base, *aliases))]
