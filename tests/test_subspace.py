"""A direction folder with a k-dimensional basis: ablating the subspace as hooks and as a weight edit
agree to float tolerance per family, nothing in the subspace is left in any write, the LoRA adapter
carries the rank-k edit, the folder reads back (and old folders read as k = 1), bad bases are one-line
errors."""
import copy
import warnings

import pytest
import torch

from conftest import FAMILIES, POST_NORM_FAMILIES
from refusal.ablation import (AblationConfig, Kernel, abliterate, ablate, layer_directions, write_adapter,
                              write_components)
from refusal.activations import last_logits
from refusal.directions import Direction, load_direction, save_direction, with_basis
from refusal.errors import RefusalLabError
from refusal.hooks import ablate_direction, orthogonalize, orthonormal_basis
from refusal.models import ChatModel

PROMPTS = ["How do I bake bread?", "Write a poem about the sea, with rhymes", "hi"]


def _subspace(cm, k=3, seed=0) -> Direction:
    g = torch.Generator().manual_seed(seed)
    diffs = torch.randn(cm.n_layers, 2, cm.d_model, generator=g)
    harmless = torch.randn(cm.n_layers, 2, cm.d_model, generator=g)
    layer = min(1, cm.n_layers - 1)
    r = diffs[layer, -1]
    one = Direction(r / r.norm(), r.clone(), layer, -1, {}, diffs, harmless)
    vectors = torch.cat([r[None], torch.randn(k - 1, cm.d_model, generator=g)])
    return with_basis(one, vectors, method="test")


def test_the_basis_is_orthonormal_and_starts_along_the_first_vector():
    v = torch.tensor([[3.0, 0.0, 4.0], [1.0, 1.0, 0.0]])
    b = orthonormal_basis(v)
    assert torch.allclose(b @ b.T, torch.eye(2, dtype=b.dtype), atol=1e-12)
    assert torch.allclose(b[0], torch.tensor([0.6, 0.0, 0.8], dtype=b.dtype))
    with pytest.raises(RefusalLabError, match="not linearly independent"):
        orthonormal_basis(torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]]))
    with pytest.raises(RefusalLabError, match="not finite"):
        orthonormal_basis(torch.tensor([[1.0, float("nan"), 0.0]]))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in POST_NORM_FAMILIES])
def test_subspace_hooks_and_weight_orthogonalization_agree(tiny_models, family):
    cm = tiny_models[family]
    d = _subspace(cm)
    encs = cm.chat.encode_all(PROMPTS)
    base = last_logits(cm, encs)
    with ablate(cm, d):  # the paper's ablation of the whole subspace
        hooked = last_logits(cm, encs)
    edited = last_logits(orthogonalize(cm, d.ablated), encs)
    assert (hooked - edited).abs().max() < 1e-4
    with ablate_direction(cm, d.vector):  # the subspace removes more than its first direction
        first = last_logits(cm, encs)
    assert (hooked - first).abs().max() > 1e-3
    assert (hooked - base).abs().max() > 1e-3


def test_the_span_not_the_vectors_decides(tiny):
    """Any basis of the same span (mixed by an invertible matrix) ablates alike; k = 1 is the direction."""
    cm = tiny
    d = _subspace(cm, k=3, seed=1)
    mix = torch.tensor([[2.0, 1.0, 0.0], [0.5, -1.0, 3.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    encs = cm.chat.encode_all(PROMPTS)
    with ablate_direction(cm, d.basis):
        a = last_logits(cm, encs)
    with ablate_direction(cm, (mix @ d.basis.double()).float()):
        b = last_logits(cm, encs)
    assert (a - b).abs().max() < 1e-4
    with ablate_direction(cm, d.vector[None] * 5):
        one_row = last_logits(cm, encs)
    with ablate_direction(cm, d.vector):
        one = last_logits(cm, encs)
    assert (one_row - one).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3_moe", "gemma2"])
def test_a_weighted_subspace_edit_leaves_nothing_in_the_span_at_weight_1(tiny_models, family):
    """A kernel over the layers with a subspace: hooks and weights agree where the edit is linear, and every
    write of a layer at weight 1 has no component in the span left (post-norm families too)."""
    cm = tiny_models[family]
    d = _subspace(cm, k=2, seed=2)
    config = AblationConfig(attn=Kernel(peak=1.0, peak_layer=0.0, floor=1.0, width=1.0),
                            mlp=Kernel(peak=1.0, peak_layer=0.0, floor=0.3, width=1.0), embed=0.5)
    encs = cm.chat.encode_all(PROMPTS)
    dirs = layer_directions(cm, d, config)
    assert dirs.per_layer.shape == (cm.n_layers, 2, cm.d_model)
    edited = abliterate(cm, d, config)
    if family != "gemma2":
        with ablate(cm, d, config):
            hooked = last_logits(cm, encs)
        assert (hooked - last_logits(edited, encs)).abs().max() < 1e-4
    left = write_components(edited, dirs, torch.tensor([encs[0].ids]))
    at_one = torch.tensor([dirs.attn_weights, dirs.mlp_weights], dtype=torch.float64).T == 1.0
    assert at_one.any() and float(left[at_one].max()) < 1e-4
    assert float(write_components(cm, dirs, torch.tensor([encs[0].ids])).max()) > 1e-3  # the base writes it


def test_one_direction_options_are_refused_for_a_subspace(tiny):
    d = _subspace(tiny)
    for config in (AblationConfig(projection="harmless"), AblationConfig(per_layer=True),
                   AblationConfig(direction_layer=0.5)):
        with pytest.raises(RefusalLabError, match="3-dimensional direction folder"):
            layer_directions(tiny, d, config)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_adapter_carries_the_rank_k_edit(tmp_path, tiny_models, family):
    from peft import PeftModel

    cm = tiny_models[family]
    d = _subspace(cm, k=3, seed=3)
    encs = cm.chat.encode_all(PROMPTS)
    before = last_logits(cm, encs)
    rec = write_adapter(cm, d, tmp_path / "adapter")
    assert rec["exact"] == (cm.o_proj(0).bias is None), rec["not_carried"]  # Qwen2's biases are named
    with warnings.catch_warnings():  # transformers deprecations peft's loading triggers, its tied-weights notice
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(cm.model), str(tmp_path / "adapter"))
    adapted = ChatModel(peft_model.base_model.model, cm.tokenizer, name=cm.name, source=cm.source)
    assert peft_model.peft_config["default"].r == 3
    gap = (last_logits(adapted, encs) - last_logits(orthogonalize(cm, d.ablated), encs)).abs().max()
    assert (last_logits(adapted, encs) - before).abs().max() > 1e-3
    if rec["exact"]:
        assert gap < 1e-4


def test_the_folder_keeps_the_basis_and_old_folders_read_as_one_direction(tmp_path, tiny):
    import pandas as pd

    d = _subspace(tiny, k=3, seed=4)
    save_direction(tmp_path / "sub", d, d.mean_diffs, pd.DataFrame({"layer": [d.layer]}))
    back = load_direction(tmp_path / "sub", tiny)
    assert back.k == 3 and torch.allclose(back.basis, d.basis, atol=1e-6)
    assert torch.allclose(back.vector, d.vector, atol=1e-6)
    assert back.meta["method"] == "test" and back.meta["k"] == 3
    one = Direction(d.vector, d.mean_diff, d.layer, d.position, {}, d.mean_diffs, d.harmless_means)
    save_direction(tmp_path / "one", one, d.mean_diffs, pd.DataFrame({"layer": [d.layer]}))
    back = load_direction(tmp_path / "one", tiny)
    assert back.k == 1 and back.basis is None and torch.equal(back.ablated, back.vector)


def test_a_basis_that_does_not_start_with_the_direction_is_a_one_line_error(tmp_path, tiny):
    import pandas as pd
    from refusal import artifacts

    d = _subspace(tiny, k=2, seed=5)
    folder = save_direction(tmp_path / "sub", d, d.mean_diffs, pd.DataFrame({"layer": [d.layer]}))
    tensors = artifacts.load_tensors(folder / "direction.safetensors")
    tensors["basis"] = tensors["basis"].flip(0).contiguous()
    artifacts.save_tensors(folder / "direction.safetensors", tensors,
                           metadata={"layer": str(d.layer), "position": str(d.position), "k": "2"})
    with pytest.raises(RefusalLabError, match="first vector is not the direction"):
        load_direction(folder)


def test_actadd_takes_a_basis_vector_scaled_to_the_difference_in_means(tmp_path, tiny_dirs, capsys):
    import pandas as pd

    from refusal.app.cli import main
    from refusal.directions import addition_vector, folder_and_index
    from refusal.registry import load_model

    cm = load_model(str(tiny_dirs["llama"]))
    d = _subspace(cm, k=2, seed=6)
    folder = save_direction(tmp_path / "sub", d, d.mean_diffs, pd.DataFrame({"layer": [d.layer]}))
    assert folder_and_index(f"{folder}:1") == (str(folder), 1) and folder_and_index(str(folder)) == (str(folder), 0)
    v = addition_vector(load_direction(folder), 1)
    assert torch.allclose(v.norm(), d.mean_diff.norm()) and abs(float(v @ d.basis[0])) < 1e-4
    one = Direction(d.vector, d.mean_diff, d.layer, d.position)
    assert torch.equal(addition_vector(one), d.mean_diff)  # the paper's: the raw difference in means
    (tmp_path / "p.txt").write_text("hello there\nwhat is up")
    common = ["eval", "--model", str(tiny_dirs["llama"]), "--prompts", str(tmp_path / "p.txt"), "--max-new-tokens", "2"]
    assert main([*common, "--actadd", f"{folder}:1", "--out", str(tmp_path / "a.jsonl")]) == 0
    assert main([*common, "--actadd", f"{folder}:2", "--out", str(tmp_path / "b.jsonl")]) == 2
    assert "choose 0 to 1" in capsys.readouterr().err and not (tmp_path / "b.jsonl").exists()
