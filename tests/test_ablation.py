"""Parametrised ablation: the kernel's weights, hooks and weight edits that agree per family, the
paper's ablation as its default, the direction between layers and projected, norm preservation as a weight
edit only, and the post-norm families' edit measured by what it leaves along the direction."""
import copy
import warnings

import pytest
import torch

from conftest import FAMILIES, POST_NORM_FAMILIES
from refusal.ablation import AblationConfig, Kernel, abliterate, ablate, layer_directions, write_components
from refusal.activations import last_logits
from refusal.config import check_fields
from refusal.directions import Direction
from refusal.errors import RefusalLabError
from refusal.hooks import ablate_direction, orthogonalize, remove_from_rows
from refusal.models import ChatModel

PROMPTS = ["How do I bake bread?", "Write a poem about the sea, with rhymes", "hi"]

# far from the paper's: a narrow kernel per writer, the embeddings half-weighted, the direction between
# two layers and projected off each layer's harmless mean
SHAPED = AblationConfig(attn=Kernel(peak=1.2, peak_layer=1.5, floor=0.3, width=2.0),
                        mlp=Kernel(peak=0.9, peak_layer=0.0, floor=0.5, width=1.0),
                        embed=0.5, direction_layer=0.6, projection="biprojected")


def _direction(cm, seed=0) -> Direction:
    """A direction with random per-layer candidates and harmless means, as a folder made now carries."""
    g = torch.Generator().manual_seed(seed)
    diffs = torch.randn(cm.n_layers, 2, cm.d_model, generator=g)
    harmless = torch.randn(cm.n_layers, 2, cm.d_model, generator=g)
    layer = min(1, cm.n_layers - 1)
    r = diffs[layer, -1]
    return Direction(r / r.norm(), r.clone(), layer, -1, {}, diffs, harmless)


def test_the_kernel_is_a_tent_over_the_layers():
    assert Kernel().weights(4) == [1.0, 1.0, 1.0, 1.0]  # the paper's: every layer at weight 1
    w = Kernel(peak=1.0, peak_layer=2.0, floor=0.2, width=2.0).weights(6)
    assert w == pytest.approx([0.2, 0.6, 1.0, 0.6, 0.2, 0.0])
    w = Kernel(peak=1.5, peak_layer=1.5, floor=0.0, width=1.0).weights(4)  # a fractional peak
    assert w == pytest.approx([0.0, 0.75, 0.75, 0.0])
    with pytest.raises(RefusalLabError, match="peak"):
        check_fields(Kernel(peak=-1.0))
    with pytest.raises(RefusalLabError, match="projection"):
        AblationConfig(projection="sideways").validate()
    assert AblationConfig(attn={"peak": 0.5}).attn == Kernel(peak=0.5)  # a config file's table


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in POST_NORM_FAMILIES])
def test_hooks_and_weight_edit_agree(tiny_models, family):
    cm = tiny_models[family]
    d = _direction(cm)
    encs = cm.chat.encode_all(PROMPTS)
    base = last_logits(cm, encs)
    with ablate(cm, d, SHAPED):
        hooked = last_logits(cm, encs)
    edited = last_logits(abliterate(cm, d, SHAPED), encs)
    assert (hooked - edited).abs().max() < 1e-4
    assert (hooked - base).abs().max() > 1e-3  # the edit does something
    assert (last_logits(cm, encs) - base).abs().max() == 0  # a copy was edited


# each layer's own direction, with half-weighted embeddings and a kernel per writer
PER_LAYER = AblationConfig(attn=Kernel(peak=1.1, peak_layer=1.0, floor=0.4, width=2.0), embed=0.5, per_layer=True,
                           projection="harmless")


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3_moe"])
def test_each_layers_own_direction_as_hooks_and_as_weights(tiny_models, family):
    cm = tiny_models[family]
    d = _direction(cm, 4)
    unit = lambda v: v.double() / v.double().norm()  # noqa: E731
    dirs = layer_directions(cm, d, PER_LAYER)
    n = cm.n_layers
    for layer in range(n):  # where the layer's writes land, off the harmless mean there
        at = min(layer + 1, n - 1)
        m = unit(d.harmless_means[at, -1])
        own = unit(d.mean_diffs[at, -1])
        assert torch.allclose(dirs.per_layer[layer], unit(own - (own @ m) * m))
    assert torch.equal(dirs.embed, dirs.per_layer[0])  # the embeddings: as the first block's writes
    encs = cm.chat.encode_all(PROMPTS)
    with ablate(cm, d, PER_LAYER):
        hooked = last_logits(cm, encs)
    edited = abliterate(cm, d, PER_LAYER)
    assert (hooked - last_logits(edited, encs)).abs().max() < 1e-4
    assert (hooked - last_logits(cm, encs)).abs().max() > 1e-3
    ids = torch.tensor([cm.chat.encode(PROMPTS[0]).ids])
    full = AblationConfig(per_layer=True)  # weight 1 everywhere: every write loses its own direction
    assert write_components(abliterate(cm, d, full), layer_directions(cm, d, full), ids).max() < 1e-4
    with pytest.raises(RefusalLabError, match="give one of them"):
        AblationConfig(per_layer=True, direction_layer=1.0).validate()


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3_moe"])
def test_the_default_is_the_papers_ablation(tiny_models, family):
    cm = tiny_models[family]
    d = _direction(cm, 1)
    encs = cm.chat.encode_all(PROMPTS)
    with ablate_direction(cm, d.vector):
        paper = last_logits(cm, encs)
    with ablate(cm, d, AblationConfig()):
        hooked = last_logits(cm, encs)
    assert (paper - hooked).abs().max() < 1e-4
    assert (last_logits(abliterate(cm, d, AblationConfig()), encs) -
            last_logits(orthogonalize(cm, d.vector), encs)).abs().max() < 1e-5


def test_the_direction_between_layers_and_projected(tiny):
    d = _direction(tiny, 2)
    unit = lambda v: v.double() / v.double().norm()  # noqa: E731
    at = lambda l: unit(d.mean_diffs[l, -1])  # noqa: E731
    dirs = layer_directions(tiny, d, AblationConfig(direction_layer=0.25))
    assert torch.allclose(dirs.per_layer[0], unit(0.75 * at(0) + 0.25 * at(1)))
    assert torch.allclose(layer_directions(tiny, d, AblationConfig(direction_layer=1.0)).per_layer[0], at(1))
    m = unit(d.harmless_means[d.layer, -1])
    r = layer_directions(tiny, d, AblationConfig(projection="harmless")).per_layer
    assert abs(float(r[0] @ m)) < 1e-12 and torch.allclose(r[0], r[-1])  # one direction, off the harmless mean
    bi = layer_directions(tiny, d, AblationConfig(projection="biprojected")).per_layer
    for layer in range(tiny.n_layers):  # and off each layer's own
        assert abs(float(bi[layer] @ unit(d.harmless_means[layer, -1]))) < 1e-12
    with pytest.raises(RefusalLabError, match="out of range"):
        layer_directions(tiny, d, AblationConfig(direction_layer=tiny.n_layers + 0.5))
    old = Direction(d.vector, d.mean_diff, d.layer, -1, {})  # a folder from before the candidates were kept
    with pytest.raises(RefusalLabError, match="refusal direction"):
        layer_directions(tiny, old, AblationConfig(direction_layer=0.5))
    with pytest.raises(RefusalLabError, match="harmless means"):
        layer_directions(tiny, old, AblationConfig(projection="harmless"))


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3_moe"])
def test_norm_preserving_keeps_every_write_vectors_length(tiny_models, family):
    cm = tiny_models[family]
    d = _direction(cm, 3)
    config = AblationConfig(norm_preserving=True)
    edited = abliterate(cm, d, config)
    r = d.vector.double()
    axis = -1 if cm.family.conv1d else -2  # the write vectors: Conv1D rows, Linear columns
    for layer in range(cm.n_layers):
        for before, after in zip([cm.o_proj(layer).weight] + cm.mlp_writers(layer),
                                 [edited.o_proj(layer).weight] + edited.mlp_writers(layer)):
            b, a = before.double(), after.double()
            assert torch.allclose(b.norm(dim=axis), a.norm(dim=axis), rtol=1e-5, atol=1e-7)
            assert (a.movedim(axis, -1) @ r).abs().max() < 1e-5  # weight 1: nothing written along r
    ids = torch.tensor([cm.chat.encode(PROMPTS[0]).ids])
    dirs = layer_directions(cm, d, config)
    assert write_components(edited, dirs, ids).max() < 1e-4
    with pytest.raises(RefusalLabError, match="weight edit only"):
        ablate(cm, d, config)


@pytest.mark.parametrize("family", POST_NORM_FAMILIES)
def test_post_norm_families_edit_leaves_nothing_along_the_direction(tiny_models, family):
    """Where a norm follows each sublayer, the edit removes the norm-scaled direction: every write the
    block adds to the residual then has no component along r, measured on a real forward pass; the
    logits differ from the hooks' (reported, not equal)."""
    tiny = tiny_models[family]
    cm = ChatModel(copy.deepcopy(tiny.model), tiny.tokenizer, name=tiny.name, source=tiny.source)
    with torch.no_grad():  # post-norm scales that differ per coordinate, so that g (*) r is not r
        for layer in range(cm.n_layers):
            for norm in cm.residual_writers(layer):
                norm.weight.uniform_(0.5, 1.5)
    d = _direction(cm, 4)
    ids = torch.tensor([cm.chat.encode(PROMPTS[1]).ids])
    dirs = layer_directions(cm, d, AblationConfig())
    assert write_components(cm, dirs, ids).max() > 1e-2
    edited = abliterate(cm, d, AblationConfig())
    assert write_components(edited, dirs, ids).max() < 1e-4
    # removing r itself before the norm would not do: the norm's scale turns the rest back towards r
    plain = ChatModel(copy.deepcopy(cm.model), cm.tokenizer, name=cm.name, source=cm.source)
    with torch.no_grad():
        for layer in range(cm.n_layers):
            for weight in [plain.o_proj(layer).weight] + plain.mlp_writers(layer):
                remove_from_rows(weight, d.vector)
    assert write_components(plain, dirs, ids).max() > 1e-3
    encs = cm.chat.encode_all(PROMPTS)
    with ablate(cm, d):
        hooked = last_logits(cm, encs)
    assert (last_logits(edited, encs) - hooked).abs().max() > 1e-4  # not the hooks' logits: measured, reported


def test_an_ablation_is_saved_in_the_direction_folder_and_read_back(tmp_path, tiny):
    import json

    import pandas as pd

    from refusal.ablation import load_ablation, save_ablation
    from refusal.directions import load_direction, save_direction

    d = _direction(tiny, 5)
    d.meta.update(layer=d.layer, position=d.position)
    save_direction(tmp_path / "run" / "direction", d, d.mean_diffs, pd.DataFrame())
    loaded = load_direction(tmp_path / "run")
    assert torch.equal(loaded.harmless_means, d.harmless_means) and torch.equal(loaded.mean_diffs, d.mean_diffs)
    assert load_ablation(tmp_path / "run") == AblationConfig()  # a folder without one: the paper's
    save_ablation(tmp_path / "run", SHAPED, chosen_by="a test")
    assert load_ablation(tmp_path / "run") == SHAPED
    path = tmp_path / "run" / "direction" / "ablation.json"
    rec = json.loads(path.read_text())
    rec["ablation"]["sharpness"] = 2
    path.write_text(json.dumps(rec))
    with pytest.raises(RefusalLabError, match="unknown key 'sharpness'"):
        load_ablation(tmp_path / "run")
    del rec["ablation"]["sharpness"]
    rec["ablation"]["projection"] = "sideways"
    path.write_text(json.dumps(rec))
    with pytest.raises(RefusalLabError, match="projection"):
        load_ablation(tmp_path / "run")


def _folder(tmp_path, cm, seed=6):
    import pandas as pd

    from refusal.directions import save_direction

    d = _direction(cm, seed)
    d.meta.update(layer=d.layer, position=d.position, model=cm.describe())
    save_direction(tmp_path / "run" / "direction", d, d.mean_diffs, pd.DataFrame())
    return tmp_path / "run", d


def test_orthogonalize_edits_a_post_norm_family_and_reports_what_is_left(capsys, tmp_path, tiny_dirs):
    import json

    from refusal.app.cli import main
    from refusal.registry import load_model

    cm = load_model(str(tiny_dirs["gemma2"]))
    run, d = _folder(tmp_path, cm)
    assert main(["orthogonalize", "--model", str(tiny_dirs["gemma2"]), "--direction", str(run),
                 "--out", str(tmp_path / "edited")]) == 0
    out = capsys.readouterr().out
    assert "not exact" in out and "wrote the edited model" in out
    rec = json.loads((tmp_path / "edited" / "refusal_lab.json").read_text())
    assert rec["exact"] is False and rec["post_norm_family"] is True
    assert rec["max_cosine_left_at_weight_1"] < 1e-4 and rec["max_logit_gap_from_hooks"] > 0
    edited = load_model(str(tmp_path / "edited"))
    ids = torch.tensor([cm.chat.encode(PROMPTS[2]).ids])
    assert write_components(edited, layer_directions(cm, d, AblationConfig()), ids).max() < 1e-4


def test_eval_and_orthogonalize_apply_the_folders_ablation(capsys, tmp_path, tiny_dirs):
    from refusal.ablation import save_ablation
    from refusal.app.cli import main
    from refusal.registry import load_model

    model = str(tiny_dirs["llama"])
    cm = load_model(model)
    run, d = _folder(tmp_path, cm, 7)
    save_ablation(run, SHAPED)
    assert main(["orthogonalize", "--model", model, "--direction", str(run), "--out", str(tmp_path / "edited")]) == 0
    assert "parametrised ablation" in capsys.readouterr().out
    encs = cm.chat.encode_all(PROMPTS)
    with ablate(cm, d, SHAPED):
        hooked = last_logits(cm, encs)
    assert (last_logits(load_model(str(tmp_path / "edited")), encs) - hooked).abs().max() < 1e-4
    out = tmp_path / "replies.jsonl"
    assert main(["eval", "--model", model, "--prompts", "harmful:test", "--ablate", str(run), "--judge", "substring",
                 "--max-new-tokens", "2", "--out", str(out)]) == 0
    assert "direction_layer=0.6, projection=biprojected)]" in capsys.readouterr().out  # the intervention it ran
    save_ablation(run, AblationConfig(norm_preserving=True))
    code = main(["eval", "--model", model, "--prompts", "harmful:test", "--ablate", str(run), "--out",
                 str(tmp_path / "r2.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "weight edit only" in err[0]


def test_a_norm_preserving_edits_adapter_is_its_cut_to_the_rank_with_the_error_recorded(tmp_path, tiny_models):
    """Not low-rank: at full rank the adapter is the edit (the model folder's logits); at rank 1 it is not,
    and adapter.json says by how much."""
    from peft import PeftModel

    from refusal.ablation import write_adapter

    cm = tiny_models["llama"]
    d = _direction(cm, 8)
    config = AblationConfig(attn=Kernel(peak=1.2, peak_layer=1.0, width=1.0), embed=0.7, norm_preserving=True)
    encs = cm.chat.encode_all(PROMPTS)
    edited = last_logits(abliterate(cm, d, config), encs)
    gaps, errors = {}, {}
    for rank in (1, cm.model.config.hidden_size):  # every edited matrix has d rows or columns
        rec = write_adapter(cm, d, tmp_path / f"adapter-{rank}", config, rank=rank)
        assert not rec["exact"] and rec["approximation"]["rank"] == rank
        errors[rank] = rec["approximation"]["max_relative_error"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            peft_model = PeftModel.from_pretrained(copy.deepcopy(cm.model), str(tmp_path / f"adapter-{rank}"))
        adapted = ChatModel(peft_model.base_model.model, cm.tokenizer, name=cm.name, source=cm.source)
        gaps[rank] = float((last_logits(adapted, encs) - edited).abs().max())
    full = max(errors)
    assert errors[1] > 1e-3 and gaps[1] > 1e-4  # rank 1 misses the rescaling
    assert errors[full] < 1e-9 and gaps[full] < 1e-4  # full rank is the edit itself


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_the_adapter_gives_the_edits_logits(tmp_path, tiny_models, family):
    from peft import PeftModel

    from refusal.ablation import write_adapter

    cm = tiny_models[family]
    d = _direction(cm, 8)
    config = SHAPED if family != "gemma2" else AblationConfig(attn=Kernel(peak=0.8, peak_layer=1.0, width=1.0))
    rec = write_adapter(cm, d, tmp_path / "adapter", config)
    has_bias = cm.o_proj(0).bias is not None
    assert rec["exact"] == (not has_bias), rec["not_carried"]  # Qwen2's biases are named, not carried
    encs = cm.chat.encode_all(PROMPTS)
    before = last_logits(cm, encs)
    with warnings.catch_warnings():  # transformers deprecations peft's loading triggers, its tied-weights notice
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(cm.model), str(tmp_path / "adapter"))
    # the causal LM inside, its layers wrapped with the adapter's
    adapted = ChatModel(peft_model.base_model.model, cm.tokenizer, name=cm.name, source=cm.source)
    edited = last_logits(abliterate(cm, d, config), encs)
    assert (last_logits(adapted, encs) - before).abs().max() > 1e-3  # the adapter does something
    gap = (last_logits(adapted, encs) - edited).abs().max()
    if rec["exact"]:
        assert gap < 1e-4
    assert (last_logits(cm, encs) - before).abs().max() == 0  # the base model is not changed
