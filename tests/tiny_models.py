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


def _word_level(specials: list[str], unk: str):
    """A whitespace word-level tokenizer over the specials and WORDS, one token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok, vocab


def build_tiny_llama(dest: pathlib.Path) -> pathlib.Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (dest / "config.json").exists():
        return dest
    tok, vocab = _word_level(["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], "<unk>")
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


def build_tiny_cross_encoder(dest: pathlib.Path, *, hidden: int = 64, layers: int = 2, heads: int = 2,
                             positions: int = 64, seed: int = 0) -> pathlib.Path:
    """A BERT cross-encoder (one-label head). hidden=768, layers=12, heads=12, positions=512 is
    BERT-base size (~85M parameters besides the small vocabulary)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    if (dest / "config.json").exists():
        return dest
    tokenizer = _bert_tokenizer()
    cfg = BertConfig(
        vocab_size=len(tokenizer.vocab), hidden_size=hidden, intermediate_size=4 * hidden if hidden > 64 else 128,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=positions, num_labels=1,
    )
    cfg.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(seed)
    BertForSequenceClassification(cfg).save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def _bert_tokenizer():
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return BertTokenizer(vocab={t: i for i, t in enumerate(specials + WORDS)}, do_lower_case=True)


def build_tiny_xlmr_cross_encoder(dest: pathlib.Path) -> pathlib.Path:
    """An XLM-R sequence classifier shaped like bge-reranker's config: max_position_embeddings 514,
    pad_token_id 1, so 512 usable positions. Its tokenizer sets no model_max_length, the worst
    case: nothing but the model tells the engine where the limit is."""
    import torch
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaForSequenceClassification

    if (dest / "config.json").exists():
        return dest
    tok, vocab = _word_level(["<s>", "<pad>", "</s>", "<unk>"], "<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", cls_token="<s>", sep_token="</s>")
    fast.model_input_names = ["input_ids", "attention_mask"]
    cfg = XLMRobertaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=1,
    )
    cfg.architectures = ["XLMRobertaForSequenceClassification"]
    torch.manual_seed(0)
    XLMRobertaForSequenceClassification(cfg).save_pretrained(dest, safe_serialization=True)
    fast.save_pretrained(dest)
    return dest


def build_tiny_st_bi_encoder(dest: pathlib.Path, *, pooling: str = "lasttoken", dense: bool = True,
                             normalize: bool = False) -> pathlib.Path:
    """A sentence-transformers bi-encoder folder (modules.json) over a tiny BERT: by default
    last-token pooling, a Dense layer and no Normalize, the cases hand-written pooling got wrong."""
    import tempfile

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    if (dest / "modules.json").exists():
        return dest
    tokenizer = _bert_tokenizer()
    cfg = BertConfig(vocab_size=len(tokenizer.vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        BertModel(cfg).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        modules = [Transformer(tmp), Pooling(64, pooling)]
        if dense:
            modules.append(Dense(64, 32))
        if normalize:
            modules.append(Normalize())
        SentenceTransformer(modules=modules, device="cpu").save(str(dest))
    return dest


def build_tiny_qwen3_reranker(dest: pathlib.Path) -> pathlib.Path:
    """A Qwen3 causal LM shaped like Qwen3-Reranker (random weights); its folder name matches the
    preset, so both engines get the real Qwen3-Reranker treatment."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    assert "qwen3-reranker" in dest.name.lower()
    if (dest / "config.json").exists():
        return dest
    tok, vocab = _word_level(["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<unk>")
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


def build_tiny_lora(base: pathlib.Path, dest: pathlib.Path, *, rank: int = 8, seed: int = 1) -> pathlib.Path:
    """A real PEFT LoRA for the model at `base`, saved as PEFT saves one (adapter_config.json and
    adapter_model.safetensors). `init_lora_weights=False` draws both matrices at random (PEFT's
    default makes B zero, an adapter that changes nothing), so the adapter changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (dest / "adapter_config.json").exists():
        return dest
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=4 * rank, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, cfg).save_pretrained(dest, safe_serialization=True)
    return dest
