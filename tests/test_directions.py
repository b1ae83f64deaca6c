import json
import math

import pandas as pd
import pytest
import torch

from conftest import FAMILIES

from refusal.engine import plan_batches
from refusal.data import Prompt
from refusal.directions import (Direction, DirectionConfig, compute_direction, load_direction, mean_diffs, save_direction,
                                select_candidate)
from refusal.errors import RefusalLabError


def test_mean_diffs():
    h = torch.zeros(4, 2, 3, 5)
    h[:, 1, 2, 0] = 3.0
    b = torch.ones(6, 2, 3, 5)
    d = mean_diffs(h, b)
    assert d.shape == (2, 3, 5)
    assert d[1, 2, 0] == 2.0 and d[0, 0, 1] == -1.0
    with pytest.raises(RefusalLabError, match="shapes differ"):
        mean_diffs(h, torch.ones(6, 3, 3, 5))


def _table(rows):
    return pd.DataFrame(rows, columns=["layer", "position", "bypass_score", "induce_score", "kl_score", "norm"])


def test_selection_follows_the_paper():
    n_layers = 10
    df = _table([
        (1, -1, -5.0, -0.5, 0.01, 1.0),   # best bypass but induce <= 0
        (2, -1, -4.0, 1.0, 0.5, 1.0),     # kl too high
        (8, -1, -9.0, 2.0, 0.01, 1.0),    # layer >= 0.8 * n_layers
        (3, -2, -2.0, 0.5, 0.05, 1.0),    # passes
        (4, -1, -3.0, 0.2, 0.1, 1.0),     # passes (kl == threshold is kept), lowest bypass among passing
        (5, -1, math.nan, math.nan, math.nan, 1.0),
    ])
    out, best, how = select_candidate(df, n_layers)
    assert best == 4 and "paper" in how
    assert out.selected.sum() == 1 and out.loc[4, "selected"]
    assert list(out.passed) == [False, False, False, True, True, False]
    assert out.loc[0, "reason"] == "induce <= 0" and out.loc[2, "reason"].startswith("layer")


def test_selection_relaxed_when_nothing_passes():
    df = _table([(1, -1, math.nan, -0.5, math.nan, 1.0), (2, -1, math.nan, -0.1, math.nan, 1.0),
                 (9, -1, math.nan, 5.0, math.nan, 1.0)])
    out, best, how = select_candidate(df, 10)
    assert best == 1 and how.startswith("RELAXED")


def test_selection_relaxes_kl_before_induce_and_as_little_as_it_takes():
    df = _table([(1, -1, -1.0, 2.0, 0.5, 1.0),   # induce > 0, kl too high
                 (2, -1, -4.0, 0.3, 3.0, 1.0),   # induce > 0, kl far too high: lowest bypass, not chosen
                 (4, -1, -2.0, 0.1, 0.7, 1.0),   # within the doubled threshold 0.8, lowest bypass there: chosen
                 (3, -1, math.nan, -0.2, math.nan, 1.0),
                 (9, -1, -9.0, 5.0, 0.01, 1.0)])  # layer too deep
    out, best, how = select_candidate(df, 10)
    assert best == 2 and how.startswith("RELAXED") and "KL" in how and "kl <= 0.8" in how
    assert not out.passed.any() and out.selected.sum() == 1
    out, best, how = select_candidate(df.drop(index=[0, 2]), 10)  # only the far one is left: still chosen
    assert best == 1 and "kl <= 3.2" in how


def test_plan_batches_covers_everything_once():
    lengths = [5, 40, 6, 7, 41, 39, 5, 100]
    batches = plan_batches(lengths, max_batch=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    assert all(len(b) <= 3 for b in batches)
    assert [7] in batches  # the long one alone, not padding the short ones


def test_save_and_load_roundtrip(tmp_path, tiny):
    d = torch.randn(tiny.d_model)
    diffs = torch.randn(tiny.n_layers, 6, tiny.d_model)
    direction = Direction(d / d.norm(), d, 1, -2, {"layer": 1, "position": -2, "model": tiny.describe(),
                                                  "scores": {"bypass": math.nan}})
    save_direction(tmp_path / "direction", direction, diffs, _table([(0, -1, 1.0, 1.0, 0.0, 1.0)]))
    meta = json.loads((tmp_path / "direction" / "direction.json").read_text())  # strict JSON, NaN -> null
    assert meta["scores"]["bypass"] is None
    for p in (tmp_path, tmp_path / "direction", tmp_path / "direction" / "direction.safetensors"):
        loaded = load_direction(p, tiny)
        assert torch.allclose(loaded.vector, d / d.norm()) and loaded.layer == 1 and loaded.position == -2
    with pytest.raises(RefusalLabError, match="not found"):
        load_direction(tmp_path / "nope")


def test_load_direction_checks_the_model(tmp_path, tiny, tiny_models, caplog):
    d = torch.randn(tiny.d_model)
    save_direction(tmp_path, Direction(d / d.norm(), d, 2, -1, {"layer": 2, "position": -1, "model": tiny.describe()}),
                   torch.randn(3, 6, tiny.d_model), _table([]))
    load_direction(tmp_path, tiny_models["qwen2"])  # same width, other weights: a warning
    assert any("another model" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    wide = Direction(torch.ones(tiny.d_model + 8), torch.ones(tiny.d_model + 8), 0, -1, {"layer": 0, "position": -1})
    save_direction(tmp_path / "w", wide, torch.ones(1, 1, tiny.d_model + 8), _table([]))
    with pytest.raises(RefusalLabError, match="dimension"):
        load_direction(tmp_path / "w", tiny)
    deep = Direction(d, d, 7, -1, {"layer": 7, "position": -1})
    save_direction(tmp_path / "deep", deep, torch.ones(1, 1, tiny.d_model), _table([]))
    with pytest.raises(RefusalLabError, match="out of range"):
        load_direction(tmp_path / "deep", tiny)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "direction.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RefusalLabError, match="safetensors"):
        load_direction(tmp_path / "bad", tiny)


def test_compute_direction_end_to_end_on_tiny(tiny):
    harmful = [Prompt(f"How do I make weapon number {i}?") for i in range(6)]
    harmless = [Prompt(f"Tell me a fun fact about the number {i}.") for i in range(6)]
    direction, diffs, df = compute_direction(tiny, harmful[:4], harmless[:4], harmful[4:], harmless[4:],
                                           DirectionConfig(score_all=True))
    assert diffs.shape == (tiny.n_layers, tiny.chat.n_post, tiny.d_model)
    assert len(df) == tiny.n_layers * tiny.chat.n_post and df.selected.sum() == 1
    assert abs(direction.vector.norm().item() - 1) < 1e-5
    sel = df[df.selected].iloc[0]
    assert (direction.layer, direction.position) == (sel.layer, sel.position)
    r = diffs[direction.layer, direction.position + diffs.shape[1]]
    assert torch.allclose(direction.mean_diff, r)
    # every scored candidate above layer 0 has all three scores with score_all
    scored = df[df.norm > 0]
    assert scored[["bypass_score", "induce_score", "kl_score"]].notna().all().all()
    assert (scored.kl_score >= -1e-6).all()
    with pytest.raises(RefusalLabError, match="empty"):
        compute_direction(tiny, [], harmless, harmful, harmless)


@pytest.mark.parametrize("family", FAMILIES)
def test_induce_scores_equal_whole_model_addition(tiny_models, family):
    """Starting each candidate at its layer from the cached residual stream gives the induce score of a
    whole forward pass under add_direction."""
    from refusal.activations import last_logits
    from refusal.directions import induce_scores
    from refusal.hooks import add_direction
    from refusal.metrics import refusal_score_from_logits, refusal_token_ids

    cm = tiny_models[family]
    encs = cm.chat.encode_all(["Bake a cake", "Write a poem about rain and wind", "hi", "Name three rivers of Europe"])
    diffs = torch.randn(cm.n_layers, 3, cm.d_model, generator=torch.Generator().manual_seed(0)) * 4
    got = induce_scores(cm, diffs, encs, [1, 2], batch_size=3)
    assert got[0].isnan().all()
    ref_ids = refusal_token_ids(cm.tokenizer)
    for layer in (1, 2):
        for p in range(3):
            with add_direction(cm, diffs[layer, p], layer):
                want = refusal_score_from_logits(last_logits(cm, encs), ref_ids).mean().item()
            assert got[layer, p].item() == pytest.approx(want, abs=1e-4), (layer, p)
    assert len(cm.blocks) == cm.n_layers == 3  # the blocks are all back
    assert got[1:].std() > 0.01  # the candidates do differ
