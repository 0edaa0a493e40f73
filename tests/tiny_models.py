"""Tiny random-weight models built offline in seconds, for fast engine tests.

Real architectures (Llama, BERT) and real tokenizers, so vLLM and transformers run their real
code paths; only the weights are random. head_dim is 32: vLLM's CPU attention needs >= 32.
Heads and KV heads are 2, so tensor_parallel_size=2 divides them.
"""

from __future__ import annotations

import pathlib

WORDS = list(dict.fromkeys((
    "the a of to and in is it you that he was for on are with as his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an "
    "each she which do their time if will way about many then them write would like so these her "
    "long make thing see him two has look more day could go come did number sound no most people "
    "paris france capital city river apple green red blue sky sea document query answer model yes no"
).split()))  # unique: a repeated word would get an id past vocab_size
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tiny_llama(dest: pathlib.Path) -> pathlib.Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (dest / "config.json").exists():
        return dest
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(dest, safe_serialization=True)
    fast.save_pretrained(dest)
    return dest


def build_tiny_cross_encoder(dest: pathlib.Path) -> pathlib.Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    if (dest / "config.json").exists():
        return dest
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64, num_labels=1,
    )
    cfg.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def build_tiny_qwen3_reranker(dest: pathlib.Path) -> pathlib.Path:
    """A Qwen3 causal LM shaped like Qwen3-Reranker (random weights); its folder name matches the
    preset, so both engines get the real Qwen3-Reranker treatment."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    assert "qwen3-reranker" in dest.name.lower()
    if (dest / "config.json").exists():
        return dest
    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    cfg = Qwen3Config(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        tie_word_embeddings=False, eos_token_id=1, pad_token_id=1, bos_token_id=None,
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).to(torch.float32).save_pretrained(dest, safe_serialization=True)
    fast.save_pretrained(dest)
    return dest
