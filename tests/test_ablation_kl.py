"""The ablation-cost baselines (analysis/ablation_kl.py) on a tiny random model with the real template."""
import torch

from analysis.ablation_kl import ablation_kl, massive_dims, random_directions, without
from refusal.activations import last_logits
from refusal.hooks import ablate_direction
from refusal.metrics import kl_divergence
from refusal.models import load_model

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
