"""The attention objective: the top refusal heads' attention from the last prompt position to the string,
its exact value and gradient, and the one weight per term of the mixed objective."""
import pytest
import torch

from attacks.gcg import GCG, GCGConfig, refusal_heads, sample_candidates
from conftest import FAMILIES
from refusal.capture import capture_last_position
from refusal.directions import Direction
from refusal.engine import eager_attention
from refusal.errors import RefusalLabError
from refusal.heads import contributions, heads_table, top_heads

INSTR = ["Explain how to pick a lock", "Write a poem about the sea"]
TARGETS = ["Sure, here is how", "Sure, here is a poem"]


def _direction(cm, layer=1):
    v = torch.randn(cm.d_model, generator=torch.Generator().manual_seed(0))
    return Direction(v / v.norm(), 3 * v / v.norm(), layer, -1, {})


def _candidates(g, n=8):
    cur = torch.tensor(g.init_ids)
    grad = torch.randn(len(cur), g.embed.weight.shape[0], generator=torch.Generator().manual_seed(1))
    return cur, torch.cat([sample_candidates(cur, grad, n, 8, 1, g.not_allowed, torch.Generator().manual_seed(0)),
                           cur[None]])


def _share(cm, ids, span, last, heads):
    """The mean over heads of the attention from position `last` to the span, in one plain eager pass."""
    with torch.no_grad(), eager_attention(cm):
        att = cm.model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    return float(torch.stack([att[l][0, h, last, span[0]:span[1]].sum() for l, h in heads]).mean())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reuse", [True, False])
def test_attention_loss_is_minus_the_heads_share_to_the_string(tiny_models, family, reuse):
    cm = tiny_models[family]
    d = _direction(cm)
    g = GCG(cm, INSTR[:1], None, GCGConfig(suffix_len=5, objective="attention", attention_heads=3,
                                           reuse_suffix_cache=reuse, batch_size=4), direction=d)
    # the heads, ranked as the analysis ranks them on the attacked prompt without a suffix
    cap = capture_last_position(cm, cm.chat.encode_all(INSTR[:1]), attention=False)
    assert g.heads == top_heads(heads_table({"harmful": contributions(cm, cap.z, d.vector)}, 3), 3)
    cur, cands = _candidates(g)
    loss, _ = g.candidate_losses(cur, cands, g.slots[0])
    for c, got in zip(cands.tolist(), loss.tolist()):
        e = cm.chat.encode(INSTR[0], c)
        assert got == pytest.approx(-_share(cm, e.ids, e.suffix, len(e.ids) - 1, g.heads), abs=1e-5)


def test_the_gradient_is_exact(tiny):
    """The attention loss as a function of the string's embeddings: autograd's directional derivative
    against a central difference. The engine computes in float32, so the step trades its rounding (about
    1e-7 of the loss over the step) against the curvature (the step squared); both stay under 0.5%."""
    g = GCG(tiny, INSTR[:1], None, GCGConfig(suffix_len=5, objective="attention", attention_heads=4),
            direction=_direction(tiny))
    slot = g.slots[0]
    x = g.embed(torch.tensor(g.init_ids))[None].detach().double()
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    f = lambda e: g._forward(slot, 0, embeds=e.float())[0].double().sum()  # noqa: E731
    with torch.enable_grad():
        xg = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(f(xg), [xg])
    eps = 1e-3
    with torch.no_grad():
        numeric = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
    assert float((grad * v).sum()) == pytest.approx(float(numeric), rel=5e-3)
    assert abs(float(numeric)) > 1e-3  # the share moves with the string: the check is not of zeros


def test_mixed_is_the_weighted_sum_of_its_terms(tiny):
    d = _direction(tiny)
    one = {t: GCG(tiny, INSTR[:1], TARGETS[:1] if t == "target" else None,
                  GCGConfig(suffix_len=5, objective=t, attention_heads=3), direction=d) for t in
           ("target", "direction", "attention")}
    mixed = GCG(tiny, INSTR[:1], TARGETS[:1], GCGConfig(suffix_len=5, objective="mixed", target_weight=0.5,
                                                        direction_weight=2.0, attention_weight=3.0,
                                                        attention_heads=3), direction=d)
    cur, cands = _candidates(mixed)
    terms = {t: g.candidate_losses(cur, cands, g.slots[0])[0] for t, g in one.items()}
    want = 0.5 * terms["target"] + 2.0 * terms["direction"] + 3.0 * terms["attention"]
    assert torch.allclose(mixed.candidate_losses(cur, cands, mixed.slots[0])[0], want, atol=1e-4)
    # the mixed objective's defaults are what it always was: target + direction
    assert GCGConfig(objective="mixed").weights == {"target": 1.0, "direction": 1.0}


def test_the_attention_objective_needs_what_it_needs(tiny):
    with pytest.raises(RefusalLabError, match="needs a refusal direction"):
        GCG(tiny, INSTR[:1], None, GCGConfig(objective="attention"))
    with pytest.raises(RefusalLabError, match="every weight at 0"):
        GCGConfig(objective="mixed", target_weight=0, direction_weight=0).validate()
    with pytest.raises(RefusalLabError, match="the target success check needs a target"):
        GCGConfig(objective="attention", success_check="target").validate()
    assert refusal_heads(tiny, INSTR, _direction(tiny), 2) == refusal_heads(tiny, INSTR, _direction(tiny), 2)


def test_an_attention_attack_runs_and_raises_the_share(tiny):
    d = _direction(tiny)
    cfg = GCGConfig(steps=4, search_width=32, topk=16, suffix_len=6, objective="attention", attention_heads=3,
                    early_stop=False, judge="substring")
    res = GCG(tiny, INSTR, None, cfg, direction=d).run(progress=False)
    assert res.losses[-1] <= res.losses[0]
