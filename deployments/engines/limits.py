"""How many tokens a model really takes: the one number every truncation and token budget uses.

Pure functions over config values (no torch), shared by the engines and by `serve_app/compat.py`.
"""

from __future__ import annotations

# Families whose learned positions start after `padding_idx` (RoBERTa's
# create_position_ids_from_input_ids): XLM-R reports max_position_embeddings 514 and indexes past
# the table from its 513th token on, an IndexError on CPU and a device-side assert that poisons the CUDA
# context on GPU. Engines that hold the loaded model read the offset off its embedding module
# instead (see `transformers_encoder._position_table`); this list serves config-only checks.
PADDING_OFFSET_TYPES = frozenset({
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "data2vec-text", "ibert",
    "longformer", "roberta-prelayernorm", "xmod", "markuplm", "luke",
})
# A tokenizer saved without model_max_length reports int(1e30); anything this large means "unset".
_UNSET = 1_000_000
DEFAULT_LIMIT = 512


def usable_positions(model_type: str | None, max_position_embeddings: int | None, pad_token_id: int | None) -> int | None:
    """Positions a model accepts, from its config: RoBERTa-style models lose `pad_token_id + 1`."""
    if not isinstance(max_position_embeddings, int) or max_position_embeddings <= 0:
        return None
    if model_type in PADDING_OFFSET_TYPES and isinstance(pad_token_id, int):
        return max_position_embeddings - (pad_token_id + 1)
    return max_position_embeddings


def input_limit(*, positions: int | None, tokenizer_max: int | None = None, configured: int | None = None) -> int:
    """The input limit in tokens (special tokens included): the smaller of what the model's
    positions allow and the tokenizer's model_max_length (which sentence-transformers sets to the
    max_seq_length a model was trained at), or `configured` when that is lower still."""
    known = [n for n in (positions, tokenizer_max) if isinstance(n, int) and 0 < n < _UNSET]
    model_max = min(known) if known else DEFAULT_LIMIT
    if configured is not None and configured > model_max:
        raise ValueError(f"max_input_tokens {configured} exceeds the model's limit {model_max}")
    return configured or model_max
