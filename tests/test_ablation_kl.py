"""The ablation-cost baselines (analysis/ablation_kl.py) on a tiny random model with the real template."""
import torch

from analysis.ablation_kl import ablation_kl, ablation_kl_by_region, massive_dims, random_directions, without
from refusal.activations import last_logits
from refusal.hooks import ablate_direction
from refusal.metrics import kl_divergence
from refusal.registry import load_model

PROMPTS = ["Write a poem about the sea.", "How do I bake bread?", "Name three rivers.", "Explain photosynthesis."]


def test_ablation_kl_is_the_papers_kl_score(tiny):
    encs = tiny.chat.encode_all(PROMPTS)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(tiny.d_model, generator=g)
    df = ablation_kl(tiny, {"v": v, "same v, scaled": 3 * v}, encs)
    base = last_logits(tiny, encs)
    with ablate_direction(tiny, v):
        want = kl_divergence(base, last_logits(tiny, encs))
    assert list(df.direction) == ["v", "same v, scaled"]
    assert abs(df.kl_mean[0] - want.mean().item()) < 1e-6 and df.kl_mean[0] > 0
    assert abs(df.kl_mean[1] - df.kl_mean[0]) < 1e-6  # ablation depends on the unit direction only
    assert df.kl_max[0] >= df.kl_mean[0] >= 0


def test_massive_dims_finds_a_planted_one(tiny_dirs):
    cm = load_model(str(tiny_dirs["llama"]))  # its own copy: the embedding is edited
    encs = cm.chat.encode_all(PROMPTS)
    assert 5 not in massive_dims(cm, encs, 0)[0]
    with torch.no_grad():
        cm.model.get_input_embeddings().weight[:, 5] = 500.0  # every token carries dim 5 at ~500
    dims, peaks = massive_dims(cm, encs, 0)
    assert 5 in dims and peaks[dims.index(5)] == 500.0


def test_random_directions_and_without():
    dirs = random_directions(32, 3, seed=1, zero=[2, 7])
    assert len(dirs) == 3 and all("zeroed" in k for k in dirs)
    for v in dirs.values():
        assert abs(v.norm().item() - 1) < 1e-6 and v[2] == 0 and v[7] == 0
    assert torch.equal(next(iter(random_directions(32, 1, seed=1).values())),
                       next(iter(random_directions(32, 1, seed=1).values())))  # seeded
    w = without(torch.ones(4), [0])
    assert torch.allclose(w, torch.tensor([0.0, 1, 1, 1]) / 3**0.5)


def test_ablation_kl_by_region(tiny):
    encs = tiny.chat.encode_all(PROMPTS)
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(1))
    df = ablation_kl_by_region(tiny, v, encs, layer=1)
    full = ablation_kl(tiny, {"v": v}, encs).kl_mean[0]
    kl = df.set_index(["positions", "layers"]).kl_mean
    n = tiny.n_layers
    assert abs(kl[("every position (the paper's ablation)", f"all {n}")] - full) < 1e-5  # the paper's ablation, exactly
    assert set(df.positions) >= {"the first token only (the attention sink)", "the last position only"}
    assert (df.kl_mean >= -1e-7).all() and (df.kl_max >= df.kl_mean - 1e-7).all()
    # by hand, with the KV cache: run the unablated positions first, then the rest under the full ablation
    base = last_logits(tiny, encs)

    def split_kl(k):
        kls = []
        for b, e in zip(base, encs):
            ids = torch.tensor([e.ids])
            with torch.no_grad():
                past = tiny.model(ids[:, :k], use_cache=True).cache
                with ablate_direction(tiny, v):
                    logits = tiny.model(ids[:, k:], cache=past).logits[:, -1]
            kls.append(kl_divergence(b[None], logits).item())
        return sum(kls) / len(kls)

    assert abs(kl[("the last position only", f"all {n}")] - split_kl(-1)) < 1e-5 < abs(split_kl(-1) - full)
    assert abs(kl[("every position but the first token", f"all {n}")] - split_kl(1)) < 1e-5
    layers_rows = df[df.layers != f"all {n}"]
    assert sorted(layers_rows.layers) == sorted([f"layers 0-0", f"layers 1-{n - 1}"])
    assert (layers_rows.kl_mean > 0).all()


def test_ablation_kl_by_region_rejects_no_prompts(tiny):
    import pytest
    from refusal.errors import RefusalLabError
    with pytest.raises(RefusalLabError, match="no prompts"):
        ablation_kl_by_region(tiny, torch.ones(tiny.d_model), [])
