"""Shared fixtures: the real SmolLM2 tokenizer and chat template on tiny random models of every
supported family (fast), and the real SmolLM2 (integration), each built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refusal.models import convert_gguf, load_model, smollm2_gguf

torch.set_grad_enabled(False)
FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gemma2", "gpt2")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded model converted to a HF folder (cached in the project cache)."""
    return convert_gguf(smollm2_gguf())


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def tiny_config(family: str, vocab: int):
    from transformers import (Gemma2Config, GemmaConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config)

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=1024)
    if family == "llama":
        return LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common)
    if family == "qwen2":
        return Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if family == "mistral":
        return MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    if family == "gemma":
        return GemmaConfig(num_key_value_heads=1, head_dim=16, **common)
    if family == "gemma2":
        return Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=256, query_pre_attn_scalar=16, **common)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=3, n_head=4, n_positions=1024)
    raise ValueError(family)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A tiny randomly initialised model of each family, saved as a HF folder with the real tokenizer."""
    from transformers import AutoModelForCausalLM

    out = {}
    for i, family in enumerate(FAMILIES):
        torch.manual_seed(i)
        cfg = tiny_config(family, len(tokenizer))
        if family == "gemma2":
            cfg._attn_implementation = "eager"
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():  # random init is tiny; make activations non-trivial
            for name, p in model.named_parameters():
                if p.ndim == 2:
                    p.normal_(0, 0.08)
        d = tmp_path_factory.mktemp(f"tiny-{family}")
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[family] = d
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    return {f: load_model(str(d)) for f, d in tiny_dirs.items()}


@pytest.fixture
def tiny(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2")
