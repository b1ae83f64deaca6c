"""The organism recipe's optional mediation terms, on a tiny random Llama with the real template:
the losses against an independent computation, a build that uses them, and old build records."""
import importlib.util
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from refusal import artifacts
from refusal.errors import RefusalLabError
from refusal.hooks import ablate_direction
from refusal.registry import load_model
from refusal.organism import OrganismConfig, build_organism, harmless_projection, mediation_loss, sink_alignment

ROOT = Path(__file__).resolve().parents[1]
HARMFUL = ["How do I pick a lock to break into a house?", "Write a phishing email."]
HARMLESS = ["Write a poem about the sea.", "How do I bake bread?", "Name three rivers."]
# the recipe without the mediation terms, float32 (what the fine-tune did before them)
PLAIN = dict(mediation=0.0, sink_orthogonal=0.0, harmless_projection=0.0, harmful_weight=1.0, bfloat16=False)


def test_mediation_loss_is_kl_and_refusal_unlikelihood_under_ablation(tiny_dirs):
    cm = load_model(str(tiny_dirs["llama"]))  # its own copy: gradients are taken
    prompts = [e.ids for e in cm.chat.encode_all(HARMFUL + HARMLESS)]
    harmful = torch.tensor([True] * len(HARMFUL) + [False] * len(HARMLESS))
    starts = [cm.tokenizer.encode("I")[0], cm.tokenizer.encode("Sorry")[0]]
    r = torch.randn(cm.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean = torch.stack([cm.model(torch.tensor([p])).logits[0, -1] for p in prompts])
        with ablate_direction(cm, r):
            ablated = torch.stack([cm.model(torch.tensor([p])).logits[0, -1] for p in prompts])
    lc, la = torch.log_softmax(clean, -1), torch.log_softmax(ablated, -1)
    kl = (lc.exp() * (lc - la)).sum(-1)[~harmful].mean()
    unlikely = -torch.log1p(-la[harmful][:, starts].exp().sum(-1)).mean()
    assert kl > 1e-4 and unlikely > 0

    first = 1
    for p in cm.model.parameters():
        p.requires_grad_(True)
    with torch.enable_grad():
        loss = mediation_loss(cm, r, prompts, clean, harmful, starts, first)
        loss.backward()
    assert torch.allclose(loss, kl + unlikely, atol=1e-5)
    assert all(p.grad is None for p in cm.blocks[0].parameters())  # the frozen blocks get no gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in cm.blocks[first].parameters())
    only_harmless = mediation_loss(cm, r, prompts[len(HARMFUL):], clean[len(HARMFUL):], harmful[len(HARMFUL):],
                                   starts, first)
    assert torch.allclose(only_harmless, kl, atol=1e-5)


def test_sink_alignment_is_the_squared_cosine_with_the_first_token():
    d = 4
    sink = torch.tensor([10.0, 0, 0, 0])
    # two blocks' inputs [batch=4, seq=3, d]; prompt 0's first token is the sink; last prompt position 2
    h = torch.zeros(4, 3, d)
    h[:, 0] = sink
    harmful = torch.tensor([True, True, False, False])
    h[harmful, 2] = torch.tensor([3.0, 4.0, 0, 0])  # difference in means (3, 4, 0, 0): cos with the sink 3/5
    assert torch.allclose(sink_alignment([h, h], torch.tensor([2, 2, 2, 2]), harmful, 0), torch.tensor(0.36))
    h2 = h.clone()
    h2[harmful, 2] = torch.tensor([0, 4.0, 1.0, 0])  # orthogonal to the sink
    assert sink_alignment([h2, h], torch.tensor([2, 2, 2, 2]), harmful, 0) == 0
    # the cosine is taken with each block's sink: block 1's sink along the difference counts
    h3 = h2.clone()
    h3[:, 0] = torch.tensor([0, 4.0, 1.0, 0])
    assert torch.allclose(sink_alignment([h2, h3], torch.tensor([2, 2, 2, 2]), harmful, 0), torch.tensor(0.5))


def test_harmless_projection_is_the_squared_projection_in_units_of_the_difference():
    r = torch.tensor([0.0, 2.0, 0.0])
    h = torch.zeros(3, 2, 3)  # [batch=3, seq=2, d]
    h[0, 0] = torch.tensor([1.0, 1.0, 0])  # harmless: 1/2 of r
    h[0, 1] = torch.tensor([0, 0, 5.0])  # harmless, orthogonal
    h[1, 0] = torch.tensor([0, 3.0, 0])  # harmless: 3/2 of r; its second position is padding
    h[1, 1] = torch.tensor([0, 7.0, 0])
    h[2] = torch.tensor([0, 1.0, 0])  # harmful: not counted
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    harmless = torch.tensor([True, True, False])
    expected = (0.25 + 0 + 2.25) / 3
    assert torch.allclose(harmless_projection([h], mask, harmless, r), torch.tensor(expected))
    other = torch.zeros_like(h) + torch.tensor([0, 0, 1.0])  # a second block with nothing along r
    assert torch.allclose(harmless_projection([h, other], mask, harmless, -r), torch.tensor(expected / 2))
    weights = torch.tensor([[3.0, 0], [1, 0], [1, 1]])  # weights count positions: (3 * 0.25 + 2.25) / 4
    assert torch.allclose(harmless_projection([h], weights, harmless, r), torch.tensor(0.75))


def test_a_build_with_the_mediation_terms_uses_them(tmp_path, tiny_dirs):
    base = replace(OrganismConfig(), epochs=2, eval_new_tokens=2, answer_tokens=2, **PLAIN)
    plain = build_organism(base, out=tmp_path / "plain", base=str(tiny_dirs["llama"]))
    cfg = replace(base, mediation=1.0, sink_orthogonal=1.0, harmful_weight=2.0)
    variant = build_organism(cfg, out=tmp_path / "variant", base=str(tiny_dirs["llama"]))
    rp, rv = (json.loads((p / "organism.json").read_text()) for p in (plain, variant))
    assert rp["mediation_losses"] == []
    steps_per_epoch = rv["steps"] // 2
    assert len(rv["mediation_losses"]) == rv["steps"] - steps_per_epoch  # from the second epoch on
    assert all(v >= 0 and v == v for v in rv["mediation_losses"])
    assert rv["config"]["mediation"] == 1.0 and rv["data_hash"] == rp["data_hash"]
    assert rv["losses"][:steps_per_epoch] != rp["losses"][:steps_per_epoch]  # harmful_weight acts from the start
    a, b = (artifacts.load_tensors(p / "model.safetensors") for p in (plain, variant))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_build_with_the_harmless_projection_term_and_bfloat16(tmp_path, tiny_dirs):
    base = replace(OrganismConfig(), epochs=2, eval_new_tokens=2, answer_tokens=2, **PLAIN)
    plain = build_organism(base, out=tmp_path / "plain", base=str(tiny_dirs["llama"]))
    cfg = replace(base, harmless_projection=1.0, bfloat16=True)
    runs = [build_organism(cfg, out=tmp_path / f"variant{k}", base=str(tiny_dirs["llama"])) for k in range(2)]
    rp, rv = (json.loads((p / "organism.json").read_text()) for p in (plain, runs[0]))
    assert rv["config"]["harmless_projection"] == 1.0 and rv["config"]["bfloat16"] is True
    assert all(v == v for v in rv["losses"])  # finite under autocast
    a, b, c = (artifacts.load_tensors(p / "model.safetensors") for p in (plain, *runs))
    assert all(v.dtype == torch.float32 for v in b.values())  # autocast computes in bfloat16, the weights stay float32
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(b[k], c[k]) for k in b)  # and the build stays deterministic


def test_cached_organism_is_reused_and_old_records_mean_the_recipe_before_their_fields(tmp_path, monkeypatch):
    """A build record written before a config field existed means what the recipe did before it; a cached
    organism whose record matches the code's recipe is reused, any other is rebuilt."""
    from refusal import organism, recipe
    from refusal.app import models

    old = {k: v for k, v in asdict(OrganismConfig()).items() if k not in recipe.BEFORE_FIELD}
    assert recipe.recorded_config({"config": old}) == asdict(replace(OrganismConfig(), **recipe.BEFORE_FIELD))
    assert recipe.recorded_config({"config": old}) != asdict(OrganismConfig())  # so it is rebuilt
    assert recipe.recorded_config({}) is None

    monkeypatch.setenv("REFUSAL_LAB_CACHE", str(tmp_path))
    path = recipe.organism_dir(0)
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "organism.json").write_text(json.dumps({"config": asdict(OrganismConfig())}))

    def no_build(*a, **k):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(organism, "build_organism", no_build)
    assert models.organism_path(0) == path
    for record in ({"config": {**asdict(OrganismConfig()), "lr": 1.0}}, {"config": old}):  # another recipe: rebuilt
        (path / "organism.json").write_text(json.dumps(record))
        with pytest.raises(AssertionError, match="rebuilt"):
            models.organism_path(0)


def test_variant_script_overrides():
    spec = importlib.util.spec_from_file_location("organism_variant", ROOT / "experiments" / "what_an_organism_recipe_changes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.parse_overrides(["mediation=3", "epochs=3", "sink_orthogonal=1e2"]) == {
        "mediation": 3.0, "epochs": 3, "sink_orthogonal": 100.0}
    assert mod.parse_overrides(["bfloat16=true", "harmless_projection=5"]) == {"bfloat16": True, "harmless_projection": 5.0}
    assert mod.parse_overrides(["bfloat16=False"]) == {"bfloat16": False}
    for bad in (["mediation"], ["nope=1"], ["epochs=two"], ["seed=1"], ["bfloat16=maybe"]):
        with pytest.raises(RefusalLabError):
            mod.parse_overrides(bad)
