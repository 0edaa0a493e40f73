"""The benchmark's cross-encoder: all-MiniLM-L6-v2's real encoder under a sequence-classification
head, built offline from the prepared model.

No PyPI package ships a real cross-encoder, and Infinity's /rerank needs one. The head is random
(seeded), so scores mean nothing, but the compute per pair is exactly a MiniLM-size cross-encoder's:
the same model goes to the raw baseline, our stack and Infinity.
"""

from __future__ import annotations

import pathlib

SOURCE = pathlib.Path("models") / "all-minilm-l6-v2"
TARGET = pathlib.Path("models") / "bench-minilm-ce"


def ensure_cross_encoder() -> pathlib.Path:
    if (TARGET / "config.json").exists():
        return TARGET
    if not (SOURCE / "config.json").exists():
        raise SystemExit(f"{SOURCE} is missing: run `make models` first")
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(SOURCE, num_labels=1)
    model.save_pretrained(TARGET)
    AutoTokenizer.from_pretrained(SOURCE).save_pretrained(TARGET)
    return TARGET


if __name__ == "__main__":
    print(ensure_cross_encoder())
