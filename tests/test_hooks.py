import pytest
import torch

from conftest import FAMILIES, POST_NORM_FAMILIES, worst_cosine
from refusal.activations import cache_activations, last_logits
from refusal.errors import RefusalLabError
from refusal.hooks import ablate_direction, add_direction, capture_block_inputs, orthogonalize
from refusal.registry import load_model

PROMPTS = ["How do I bake bread?", "Write a poem about the sea, with rhymes", "hi"]


def _direction(cm, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(cm.d_model, generator=g)


def _n_hooks(cm):
    n = 0
    for m in cm.model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return n


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in POST_NORM_FAMILIES])
def test_ablation_equals_orthogonalization(tiny_models, family):
    cm = tiny_models[family]
    r = _direction(cm)
    encs = cm.chat.encode_all(PROMPTS)
    base = last_logits(cm, encs)
    with ablate_direction(cm, r):
        ablated = last_logits(cm, encs)
    edited = orthogonalize(cm, r)
    ortho = last_logits(edited, encs)
    assert (ablated - ortho).abs().max() < 1e-4
    assert (ablated - base).abs().max() > 1e-3  # the edit does something
    # the original model is untouched (a copy was edited) and its embedding/LM head still tie where they did
    assert (last_logits(cm, encs) - base).abs().max() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_removes_the_direction_everywhere(tiny_models, family):
    cm = tiny_models[family]
    r = _direction(cm, 1)
    ru = r / r.norm()
    encs = cm.chat.encode_all(PROMPTS)
    before = cache_activations(cm, encs)
    with ablate_direction(cm, r):
        acts = cache_activations(cm, encs)  # [prompt, layer, pos, d]
    assert (before @ ru).abs().max() > 1e-2
    assert (acts @ ru).abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_removes_the_direction_from_every_block_input_and_output(tiny_models, family):
    """Measured, not assumed: under the hooks, at every position of every block, the residual stream going in
    and coming out has no component along r (a block's output is what it adds to the residual stream)."""
    cm = tiny_models[family]
    r = _direction(cm, 3)
    ru = r / r.norm()
    ids = torch.tensor([cm.chat.encode(PROMPTS[1], "zz yy").ids])

    with ablate_direction(cm, r):
        ablated = worst_cosine(cm, ids, ru)
    plain = worst_cosine(cm, ids, ru)
    for kind in ("in", "out"):
        assert ablated[kind] < 1e-5 < 1e-2 < plain[kind], (kind, ablated, plain)


def test_hooks_always_removed(tiny):
    n0 = _n_hooks(tiny)
    r = _direction(tiny)
    with ablate_direction(tiny, r), add_direction(tiny, r, 1):
        assert _n_hooks(tiny) > n0
    assert _n_hooks(tiny) == n0
    with pytest.raises(ZeroDivisionError):
        with ablate_direction(tiny, r):
            1 / 0
    assert _n_hooks(tiny) == n0
    store = {}
    with capture_block_inputs(tiny, store):
        last_logits(tiny, tiny.chat.encode_all(PROMPTS))
    assert set(store) == set(range(tiny.n_layers)) and _n_hooks(tiny) == n0


def test_ablation_restricted_to_layers_and_positions(tiny):
    r = _direction(tiny, 2)
    ru = r / r.norm()
    ids = torch.tensor([tiny.chat.encode(PROMPTS[0]).ids])
    run = lambda: tiny.model(ids).logits[0, -1]
    with torch.no_grad():
        base = run()
        with ablate_direction(tiny, r):
            full = run()
        with ablate_direction(tiny, r, layers=range(tiny.n_layers), positions=torch.ones(ids.shape)):
            assert torch.equal(run(), full)  # every layer and position: the paper's ablation
        with ablate_direction(tiny, r, positions=torch.zeros(ids.shape)):
            assert torch.equal(run(), base)  # no position: nothing changes
        with ablate_direction(tiny, r, layers=[]):
            assert torch.equal(run(), base)
        acts = {}
        mask = torch.zeros(ids.shape)
        mask[0, -1] = 1
        with ablate_direction(tiny, r, layers=[1], positions=mask), capture_block_inputs(tiny, acts):
            tiny.model(ids)
    assert (acts[1][0, -1] @ ru).abs() < 1e-4 < (acts[1][0, -2] @ ru).abs()  # only the last position, at layer 1
    assert (acts[0][0, -1] @ ru).abs() > 1e-4  # not at layer 0
    with pytest.raises(RefusalLabError, match="out of range"):
        with ablate_direction(tiny, r, layers=[tiny.n_layers]):
            pass


def test_activation_addition_acts_at_its_layer_only(tiny):
    r = _direction(tiny, 2)
    encs = tiny.chat.encode_all(PROMPTS)
    before = cache_activations(tiny, encs)
    with add_direction(tiny, r, 1, coeff=2.0):
        after = cache_activations(tiny, encs)
    assert (after[:, 0] - before[:, 0]).abs().max() == 0  # layer 0 input unchanged
    # the input of block 1 is shifted by exactly 2r at every position; later layers change too
    shift = after[:, 1] - before[:, 1]
    assert (shift - 2 * r).abs().max() < 1e-4
    assert (after[:, 2] - before[:, 2]).abs().max() > 1e-3


@pytest.mark.parametrize("family", POST_NORM_FAMILIES)
def test_post_norm_ablation_hooks_post_norms_and_refuses_orthogonalization(tiny_models, family):
    cm = tiny_models[family]
    writers = cm.residual_writers(0)
    assert writers[0] is cm.blocks[0].post_attention_layernorm
    assert writers[1] is cm.blocks[0].post_feedforward_layernorm
    with pytest.raises(RefusalLabError, match="not exact"):
        orthogonalize(cm, _direction(cm))


def test_dimension_and_layer_errors(tiny):
    with pytest.raises(RefusalLabError, match="dimension"):
        with ablate_direction(tiny, torch.randn(tiny.d_model + 1)):
            pass
    with pytest.raises(RefusalLabError, match="zero"):
        with ablate_direction(tiny, torch.zeros(tiny.d_model)):
            pass
    with pytest.raises(RefusalLabError, match="out of range"):
        with add_direction(tiny, torch.randn(tiny.d_model), tiny.n_layers):
            pass


def test_orthogonalized_model_saves_and_reloads(tiny, tmp_path):
    r = _direction(tiny, 3)
    edited = orthogonalize(tiny, r)
    edited.model.save_pretrained(tmp_path)
    edited.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    encs = tiny.chat.encode_all(PROMPTS)
    with ablate_direction(tiny, r):
        ablated = last_logits(tiny, encs)
    assert (last_logits(again, encs) - ablated).abs().max() < 1e-4
    assert again.fingerprint != tiny.fingerprint


def test_interventions_are_hook_lists_applied_by_one_context_manager(tiny):
    """ablation_hooks lists a pre-hook on every block and a post-hook on each of its two residual writers;
    addition one pre-hook; hooked() applies any concatenation of them and removes all of it on exit, after an
    error in the block, and when registering one of them fails half-way."""
    from refusal.hooks import Hook, ablation_hooks, addition_hooks, capture_hooks, hooked

    r = _direction(tiny)
    abl = ablation_hooks(tiny, r)
    assert all(isinstance(h, Hook) for h in abl) and len(abl) == 3 * tiny.n_layers
    assert [h.module for h in abl if h.kind == "pre"] == list(tiny.blocks)
    assert {h.module for h in abl if h.kind == "post"} == {m for l in range(tiny.n_layers) for m in tiny.residual_writers(l)}
    add = addition_hooks(tiny, r, 1, 2.0)
    assert len(add) == 1 and add[0].module is tiny.blocks[1] and add[0].kind == "pre"
    store = {}
    encs = tiny.chat.encode_all(PROMPTS)
    n0 = _n_hooks(tiny)
    with hooked(abl + capture_hooks(tiny, store, positions=[-1])):
        assert _n_hooks(tiny) == n0 + len(abl) + tiny.n_layers
        ablated = last_logits(tiny, encs)
    assert _n_hooks(tiny) == n0
    with ablate_direction(tiny, r):  # the context manager is the same list, applied
        assert torch.equal(last_logits(tiny, encs), ablated)
    unit = r / r.norm()
    assert max(float((x[:, 0] @ unit).abs().max()) for x in store.values()) < 1e-4  # captured after ablation
    with pytest.raises(ZeroDivisionError):
        with hooked(abl):
            1 / 0
    assert _n_hooks(tiny) == n0
    with pytest.raises(ValueError, match="unknown hook kind"):
        with hooked(abl + [Hook(tiny.blocks[0], lambda *a: None, "sideways")]):
            pass
    assert _n_hooks(tiny) == n0
