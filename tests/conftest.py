"""Shared fixtures: the real SmolLM2 tokenizer and chat template on tiny random models of every
supported family (fast), and the real SmolLM2 (integration), each built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refusal.models import convert_gguf, smollm2_gguf
from refusal.registry import load_model

torch.set_grad_enabled(False)
FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gemma2", "gpt2", "qwen3", "gemma3_text", "phi3", "olmo2",
            "qwen3_moe", "mixtral")
# a norm follows each sublayer before the residual add: weight orthogonalization is not exact, and refused
POST_NORM_FAMILIES = ("gemma2", "gemma3_text", "olmo2")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded model converted to a HF folder (cached in the project cache)."""
    return convert_gguf(smollm2_gguf())


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def tiny_config(family: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=1024)
    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common)
    if family == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if family == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    if family == "gemma":
        return tf.GemmaConfig(num_key_value_heads=1, head_dim=16, **common)
    if family == "gemma2":
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=256, query_pre_attn_scalar=16, **common)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=3, n_head=4, n_positions=1024)
    if family == "qwen3":
        return tf.Qwen3Config(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, **common)
    if family == "gemma3_text":
        # sliding-window layers (a window longer than the test prompts) beside a global one
        return tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, sliding_window=256, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"], **common)
    if family == "phi3":
        return tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, **common)
    if family == "olmo2":
        return tf.Olmo2Config(num_key_value_heads=2, **common)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=4,
                                 num_experts_per_tok=2, **common)
    if family == "mixtral":
        return tf.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **common)
    raise ValueError(family)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A tiny randomly initialised model of each family, saved as a HF folder with the real tokenizer."""
    from transformers import AutoModelForCausalLM

    out = {}
    for i, family in enumerate(FAMILIES):
        torch.manual_seed(i)
        cfg = tiny_config(family, len(tokenizer))
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():  # random init is tiny; make activations non-trivial
            for name, p in model.named_parameters():
                if p.ndim >= 2:  # matrices, and the stacked experts of a mixture of experts
                    p.normal_(0, 0.08)
                elif "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    p.add_(torch.randn_like(p) * 0.2)  # norm weights of a trained model are not all equal
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


def worst_cosine(cm, ids: torch.Tensor, r_unit: torch.Tensor) -> dict[str, float]:
    """The largest |cos| with r_unit over every position of every block's input (as the block computes on it,
    after any pre-hooks) and every block's output (what it leaves in the residual stream), for ids [1, seq]."""
    worst = {"in": 0.0, "out": 0.0}

    def note(kind, x):
        x = x.float()
        worst[kind] = max(worst[kind], float(((x @ r_unit.to(x)).abs() / x.norm(dim=-1)).max()))

    handles = []
    for block in cm.blocks:
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k: note("in", a[0] if a else k["hidden_states"]), with_kwargs=True))
        handles.append(block.register_forward_hook(
            lambda m, a, out: note("out", out[0] if isinstance(out, tuple) else out)))
    try:
        with torch.no_grad():
            cm.model(ids.to(cm.device))
    finally:
        for h in handles:
            h.remove()
    return worst
