"""Tiny random models of every supported family, built from configs, plus a tokenizer
trained in-process: fast, offline stand-ins for real checkpoints."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

TEXT = ("The licence grants permission to use, copy, modify and distribute the software. "
        "A function returns a value; a class defines methods and attributes. "
        "Permission is hereby granted, free of charge, to any person obtaining a copy. ") * 20


@functools.lru_cache(maxsize=None)
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def config(family: str, vocab: int = 320):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, PhiConfig, Qwen2Config

    common = dict(vocab_size=vocab)
    if family == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    if family == "mistral":
        return MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=32, max_position_embeddings=256, **common)
    if family == "phi":
        return PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=256, **common)
    if family == "gemma3":
        return gemma3_config(vocab)
    raise ValueError(family)


def gemma3_config(vocab: int = 320, layers: int = 3, heads: int = 4, kv: int = 1, **kw):
    """Gemma 3 as the 270M model is shaped, shrunk: a single KV head, head_dim 8, q/k norms, four
    norms per block, sliding-window attention (window 4, shorter than the test sequences) in all
    but every third layer, the sqrt(hidden) embedding scale, a tied LM head."""
    from transformers import Gemma3TextConfig

    cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv, head_dim=8, max_position_embeddings=256,
               sliding_window=4, query_pre_attn_scalar=8, tie_word_embeddings=True,
               layer_types=[("full_attention" if (i + 1) % 3 == 0 else "sliding_attention") for i in range(layers)],
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(kw)
    return Gemma3TextConfig(**cfg)


FAMILIES = ("llama", "mistral", "qwen2", "opt", "phi", "gpt2", "gemma3")


def model(family: str, seed: int = 0, vocab: int = 320):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(config(family, vocab), dtype=torch.float32)
    # random init leaves tiny activations; scale so scores spread and pruning bites
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return m.eval()


def save(family: str, folder: Path, seed: int = 0) -> Path:
    m = model(family, seed)
    m.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def model_with(family: str, seed: int = 0, dtype=torch.float32, vocab: int = 320, **overrides):
    """A tiny model of `family` with config fields overridden (e.g. more heads, GQA, more layers),
    initialised like `model`, in `dtype` (float64 for exactness tests)."""
    from transformers import AutoModelForCausalLM

    cfg = config(family, vocab)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    if getattr(cfg, "layer_types", None) and "layer_types" not in overrides:  # one entry per block
        if family == "gemma3":  # keep the sliding / full mix
            cfg.layer_types = gemma3_config(vocab, layers=cfg.num_hidden_layers).layer_types
        else:
            cfg.layer_types = [cfg.layer_types[0]] * cfg.num_hidden_layers
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return m.to(dtype).eval()


def gqa_llama(seed: int = 0, dtype=torch.float32, layers: int = 3):
    """Llama with 8 query heads in 2 key/value groups (head_dim 8), `layers` blocks."""
    return model_with("llama", seed, dtype, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=8, num_hidden_layers=layers)


def ids(n=3, L=20, vocab=300, seed=1):
    """Seeded random token ids [n, L] for logit comparisons."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, L), generator=g)


def logits(m, ids_):
    with torch.no_grad():
        return m(ids_, use_cache=False).logits
