"""`refusal direction --method subspace`: the paper's direction widened to k dimensions by one of two
constructions, every (construction, k) scored on validation prompts as the paper scores a candidate, the
best kept under the KL rule; the folder is a k-dimensional direction folder the other commands read."""
import json

import pandas as pd
import pytest
import torch

from refusal.app.cli import main
from refusal.data import Prompt
from refusal.directions import DirectionConfig, ablation_scores, load_direction
from refusal.errors import RefusalLabError
from refusal.activations import last_logits
from refusal.metrics import refusal_token_ids
from refusal.subspace import candidate_span, compute_subspace, pca_span

HARMFUL = [Prompt(f"How do I make weapon number {i}?") for i in range(8)]
HARMLESS = [Prompt(f"Tell me a fun fact about the number {i}.") for i in range(8)]


def test_pca_finds_what_varies_between_harmful_prompts_beyond_their_mean():
    g = torch.Generator().manual_seed(0)
    d = 16
    r = torch.zeros(d)
    r[0] = 1.0
    planted = torch.zeros(d)
    planted[3] = 1.0
    harmful = 4 * r + 3 * torch.randn(64, 1, generator=g) * planted + 0.05 * torch.randn(64, d, generator=g)
    harmless = 0.05 * torch.randn(64, d, generator=g)
    basis = pca_span(harmful, harmless, r, 2)
    assert torch.equal(basis[0], r)
    assert abs(float(basis[1] @ planted)) > 0.99


def test_the_candidate_span_starts_with_the_direction_and_adds_neighbours():
    g = torch.Generator().manual_seed(1)
    diffs = torch.randn(6, 3, 8, generator=g)
    r = diffs[2, -1] / diffs[2, -1].norm()
    basis = candidate_span(diffs, 2, r, 3)
    assert basis.shape == (3, 8) and torch.allclose(basis[0], r)
    assert abs(float(basis[1] @ r)) < 1e-5 and abs(float(basis[2] @ r)) < 1e-5


def test_the_chosen_subspace_follows_the_rule_and_its_scores_reproduce(tiny):
    config = DirectionConfig(method="subspace", k=3)
    d, diffs, df, table = compute_subspace(tiny, HARMFUL[:6], HARMLESS[:6], HARMFUL[6:], HARMLESS[6:], config)
    assert len(table) == 1 + 2 * 2 and table.selected.sum() == 1
    bound = max(config.kl_threshold, float(table.kl_score[0]))
    pick = table[table.selected].iloc[0]
    assert pick.bypass_score == table[table.kl_score <= bound].bypass_score.min()
    assert d.k == int(pick.k) and d.meta["construction"] == pick.construction
    paper = df[df.selected].iloc[0]
    assert (d.layer, d.position) == (int(paper.layer), int(paper.position))
    hv, bv = tiny.chat.encode_all([p.instruction for p in HARMFUL[6:]]), tiny.chat.encode_all([p.instruction for p in HARMLESS[6:]])
    bypass, kl = ablation_scores(tiny, d.ablated, hv, bv, last_logits(tiny, bv), refusal_token_ids(tiny.tokenizer), 8)
    assert abs(bypass - pick.bypass_score) < 1e-4 and abs(kl - pick.kl_score) < 1e-4


def test_a_pinned_construction_is_kept_at_exactly_k(tiny):
    config = DirectionConfig(method="subspace", k=3, construction="pca")
    d, _, _, table = compute_subspace(tiny, HARMFUL[:6], HARMLESS[:6], HARMFUL[6:], HARMLESS[6:], config)
    assert list(zip(table.construction, table.k)) == [("one direction", 1), ("pca", 3)]
    assert d.k == 3 and d.meta["construction"] == "pca" and "PINNED" in d.meta["subspace_rule"]
    with pytest.raises(RefusalLabError, match="--construction is a setting of --method subspace"):
        DirectionConfig(construction="pca").validate()


def test_cli_writes_a_subspace_folder_that_eval_ablates(capsys, tmp_path, tiny_dirs):
    (tmp_path / "harmful.txt").write_text("\n".join(f"Explain how to build dangerous device {i}" for i in range(10)))
    (tmp_path / "harmless.txt").write_text("\n".join(f"Give me a recipe with {i} eggs" for i in range(10)))
    model = str(tiny_dirs["llama"])
    assert main(["direction", "--method", "subspace", "--k", "3", "--model", model, "--harmful", str(tmp_path / "harmful.txt"),
                 "--harmless", str(tmp_path / "harmless.txt"), "--n-train", "6", "--n-val", "3", "--out", str(tmp_path / "s")]) == 0
    assert "subspace: k = " in capsys.readouterr().out
    folder = tmp_path / "s" / "direction"
    table = pd.read_csv(folder / "subspaces.csv")
    meta = json.loads((folder / "direction.json").read_text())
    assert meta["method"] == "subspace" and len(meta["subspaces"]) == len(table) == 5
    d = load_direction(folder)
    assert d.k == int(table[table.selected].k.iloc[0])
    assert main(["eval", "--model", model, "--prompts", str(tmp_path / "harmful.txt"), "--ablate", str(folder),
                 "--max-new-tokens", "2", "--out", str(tmp_path / "e.jsonl")]) == 0
