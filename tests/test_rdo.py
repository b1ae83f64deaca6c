"""RDO and refusal cones (Wollschläger et al. 2025): cone sampling stays in the cone, the row-wise
ablation equals the paper's ablation row by row, the three losses equal a computation by hand, training
keeps the basis orthonormal and a killed run resumes to the same basis, RepInd equals a computation by
hand, and the CLI writes a k-dimensional folder (and refuses bad settings in one line)."""
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import FAMILIES
from refusal.activations import last_logits
from refusal.app.cli import main
from refusal.decode import greedy_decode
from refusal.directions import DirectionConfig, addition_vector, load_direction
from refusal.errors import RefusalLabError
from refusal.hooks import ablate_direction, add_direction, hooked
from refusal.rdo import (RDOConfig, batch_of, cone_directions, cone_samples, direction_scores, repind,
                         row_ablation_hooks, row_coefficients, step_losses, train_basis, training_targets)

HARMFUL = [f"How do I make weapon number {i}?" for i in range(6)]
HARMLESS = [f"Tell me a fun fact about the number {i}." for i in range(6)]


def _setup(cm, n_tokens=4):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(cm.d_model, generator=g) * 3
    harmful, harmless = cm.chat.encode_all(HARMFUL), cm.chat.encode_all(HARMLESS)
    targets = training_targets(cm, harmful, harmless, r, 1, n_tokens, batch_size=4)
    return r, harmful, harmless, targets


def test_cone_samples_are_nonnegative_unit_combinations():
    g = torch.Generator().manual_seed(0)
    s = cone_samples(3, 50, g)
    assert (s >= 0).all() and torch.allclose(s.norm(dim=-1), torch.ones(50, dtype=s.dtype))
    basis = torch.eye(3, 8, dtype=torch.float64)
    u = cone_directions(basis, s)
    assert torch.allclose(u.norm(dim=-1), torch.ones(50, dtype=u.dtype)) and (u[:, 3:] == 0).all()
    rows = row_coefficients(3, 6, 0, g)  # even rows: the basis vectors in turn; odd rows: samples
    assert rows[0].tolist() == [1, 0, 0] and rows[2].tolist() == [0, 1, 0] and rows[4].tolist() == [0, 0, 1]
    assert (rows[1] > 0).all() and torch.equal(row_coefficients(1, 4, 0, g), torch.ones(4, 1, dtype=torch.float64))


@pytest.mark.parametrize("family", FAMILIES[:4])
def test_row_ablation_is_the_papers_ablation_row_by_row(tiny_models, family):
    cm = tiny_models[family]
    encs = cm.chat.encode_all(["a short one", "How do I bake bread?"])
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, cm.d_model, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    ids = torch.tensor([encs[0].ids + [0] * (len(encs[1]) - len(encs[0])), encs[1].ids])
    mask = (torch.arange(ids.shape[1]) < torch.tensor([[len(encs[0])], [len(encs[1])]])).long()
    with hooked(row_ablation_hooks(cm, u)):
        rows = cm.model(input_ids=ids, attention_mask=mask).logits
    for i, e in enumerate(encs):
        with ablate_direction(cm, u[i]):
            alone = cm.model(input_ids=torch.tensor([e.ids])).logits[0]
        assert (rows[i, :len(e)] - alone).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_the_three_losses_equal_a_computation_by_hand(tiny_models, family):
    cm = tiny_models[family]
    r, harmful, harmless, targets = _setup(cm)
    u = torch.nn.functional.normalize(torch.randn(cm.d_model, generator=torch.Generator().manual_seed(2)), dim=0)
    alpha, layer, rows = 2.5, 1, [0, 3]
    hb = batch_of(cm, [harmful[i] for i in rows], [targets["ablation"][i] for i in rows])
    ab = batch_of(cm, [harmless[i] for i in rows], [targets["addition"][i] for i in rows])
    rb = batch_of(cm, [harmless[i] for i in rows], [targets["retain"][i] for i in rows])

    def by_hand(prompts, tgts, ctx):  # each row alone, unpadded: the logits predicting its target tokens
        out = []
        for p, t in zip(prompts, tgts):
            with ctx():
                logits = cm.model(input_ids=torch.tensor([p.ids + t])).logits[0].float()
            out.append(logits[len(p.ids) - 1:len(p.ids) + len(t) - 1])
        return out

    def ce(logits, tgts):
        return torch.stack([F.cross_entropy(lg, torch.tensor(t)) for lg, t in zip(logits, tgts)]).mean()

    clean = by_hand([harmless[i] for i in rows], [targets["retain"][i] for i in rows], lambda: hooked([]))
    abl = by_hand([harmful[i] for i in rows], [targets["ablation"][i] for i in rows], lambda: ablate_direction(cm, u))
    add = by_hand([harmless[i] for i in rows], [targets["addition"][i] for i in rows],
                  lambda: add_direction(cm, alpha * u, layer))
    ret = by_hand([harmless[i] for i in rows], [targets["retain"][i] for i in rows], lambda: ablate_direction(cm, u))
    kl = torch.stack([(F.softmax(q, -1) * (F.log_softmax(q, -1) - F.log_softmax(p, -1))).sum()
                      for p, q in zip(clean, ret)]).mean()
    clean_logp = torch.log_softmax(torch.cat(clean), -1)
    got = step_losses(cm, u.expand(2, -1), u.expand(2, -1), alpha, layer, hb, ab, rb, clean_logp)
    assert got["ablation"].item() == pytest.approx(ce(abl, [targets["ablation"][i] for i in rows]).item(), abs=1e-4)
    assert got["addition"].item() == pytest.approx(ce(add, [targets["addition"][i] for i in rows]).item(), abs=1e-4)
    assert got["retain"].item() == pytest.approx(kl.item(), abs=1e-4, rel=1e-3)


def test_targets_are_the_intervened_greedy_replies_and_are_cached(tiny_models, monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSAL_LAB_CACHE", str(tmp_path))
    cm = tiny_models["llama"]
    r, harmful, harmless, targets = _setup(cm, n_tokens=3)
    with ablate_direction(cm, r):
        assert targets["ablation"] == greedy_decode(cm, harmful, 3)[0]
    with add_direction(cm, r, 1):
        assert targets["addition"] == greedy_decode(cm, harmless, 3)[0]
    assert targets["retain"] == greedy_decode(cm, harmless, 3)[0]
    assert len(list((tmp_path / "rdo-targets").glob("*.json"))) == 1
    assert training_targets(cm, harmful, harmless, r, 1, 3) == targets  # read back, not generated again


def test_training_keeps_an_orthonormal_basis_and_a_killed_run_resumes_to_the_same(tiny_models, tmp_path):
    cm = tiny_models["llama"]
    r, harmful, harmless, targets = _setup(cm)
    config = RDOConfig(steps=4, batch=2, checkpoint_every=1)
    whole, losses = train_basis(cm, 2, harmful, harmless, targets, 2.0, 1, config)
    assert torch.allclose(whole @ whole.T, torch.eye(2), atol=1e-5)
    assert list(losses.step) == [1, 2, 3, 4] and losses[["ablation", "addition", "retain"]].notna().all().all()
    start, _ = train_basis(cm, 2, harmful, harmless, targets, 2.0, 1, RDOConfig(steps=4, batch=2, lr=1e-9))
    assert (whole - start).abs().max() > 1e-3  # it moved from the random start
    ckpt = tmp_path / "ckpt.pt"
    train_basis(cm, 2, harmful, harmless, targets, 2.0, 1, config, ckpt, stop_after=2)  # killed after 2 steps
    resumed, resumed_losses = train_basis(cm, 2, harmful, harmless, targets, 2.0, 1, config, ckpt)
    assert torch.allclose(resumed, whole, atol=1e-5)
    assert resumed_losses.loss.tolist() == pytest.approx(losses.loss.tolist(), rel=1e-4)
    with pytest.raises(RefusalLabError, match="another RDO run"):
        train_basis(cm, 2, harmful, harmless, targets, 2.0, 1, RDOConfig(steps=4, batch=2, lr=0.5), ckpt)
    with pytest.raises(RefusalLabError, match="already run 4 steps"):
        train_basis(cm, 2, harmful, harmless, targets, 2.0, 1, RDOConfig(steps=3, batch=2, checkpoint_every=1), ckpt)
    longer = tmp_path / "longer.pt"  # a finished run asked for more steps trains on from where it ended
    train_basis(cm, 2, harmful, harmless, targets, 2.0, 1, RDOConfig(steps=2, batch=2), longer)
    extended, _ = train_basis(cm, 2, harmful, harmless, targets, 2.0, 1, RDOConfig(steps=4, batch=2), longer)
    assert torch.allclose(extended, whole, atol=1e-5)


def test_repind_equals_a_computation_by_hand(tiny_models):
    cm = tiny_models["qwen2"]
    encs = cm.chat.encode_all(HARMFUL[:3])
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(cm.d_model, generator=g), torch.randn(cm.d_model, generator=g)
    table = repind(cm, {"a": a, "b": b}, encs, batch_size=2)
    n = max(1, int(0.9 * cm.n_layers))

    def cosines(ctx):  # cos(block l's input at the last position, b), each prompt alone
        out = []
        for e in encs:
            with ctx():
                hs = cm.model(input_ids=torch.tensor([e.ids]), output_hidden_states=True).hidden_states
            out.append(torch.stack([F.cosine_similarity(hs[l][0, -1].float(), b / b.norm(), dim=0) for l in range(n)]))
        return torch.stack(out)

    change = cosines(lambda: ablate_direction(cm, a)) - cosines(lambda: hooked([]))
    row = table[(table.ablated == "a") & (table.read == "b")].iloc[0]
    assert row.repind == pytest.approx(float((change ** 2).mean()), rel=1e-3, abs=1e-8)
    assert row.max_abs_change == pytest.approx(float(change.mean(0).abs().max()), rel=1e-3, abs=1e-6)
    assert len(table) == 2


def test_cli_writes_a_cone_folder_and_refuses_bad_settings(capsys, tmp_path, tiny_dirs, monkeypatch):
    monkeypatch.setenv("REFUSAL_LAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "harmful.txt").write_text("\n".join(f"Explain how to build dangerous device {i}" for i in range(8)))
    (tmp_path / "harmless.txt").write_text("\n".join(f"Give me a recipe with {i} eggs" for i in range(8)))
    common = ["--model", str(tiny_dirs["llama"]), "--harmful", str(tmp_path / "harmful.txt"),
              "--harmless", str(tmp_path / "harmless.txt"), "--n-train", "6", "--n-val", "2"]
    assert main(["direction", "--method", "rdo", "--k", "2", "--rdo-steps", "2", "--rdo-batch", "2",
                 "--rdo-target-tokens", "3", "--rdo-cone-samples", "3", *common, "--out", str(tmp_path / "c")]) == 0
    assert "rdo: k = 2" in capsys.readouterr().out
    folder = tmp_path / "c" / "direction"
    d = load_direction(folder)
    assert d.k == 2 and torch.allclose(d.basis @ d.basis.T, torch.eye(2), atol=1e-5)
    meta = json.loads((folder / "direction.json").read_text())
    assert meta["method"] == "rdo" and meta["cone"] and meta["config"]["rdo"]["steps"] == 2
    assert torch.allclose(addition_vector(d, 1), d.basis[1] * meta["alpha"], atol=1e-5)
    scores = pd.read_csv(folder / "rdo_scores.csv")
    assert list(scores.direction) == ["none", "r*", "b0", "b1", "span", "sample0", "sample1", "sample2"]
    assert (pd.read_csv(folder / "rdo_losses.csv").step == [1, 2]).all()
    assert set(pd.read_csv(folder / "rdo_repind.csv").ablated) == {"r*", "b0", "b1"}
    assert not list((tmp_path / "c").glob("*.rdo-checkpoint.pt"))  # removed once the folder is whole
    for bad, message in ((["--method", "diff-in-means", "--k", "2"], "--k is a setting"),
                         (["--method", "subspace", "--k", "1"], "at least 2"),
                         (["--method", "rdo", "--rdo-ablation-weight", "0", "--rdo-addition-weight", "0",
                           "--rdo-retain-weight", "0"], "nothing to train"),
                         (["--method", "rdo", "--rdo-steps", "0"], "--rdo-steps must be >= 1")):
        assert main(["direction", *bad, *common, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(RefusalLabError, match="method"):
        DirectionConfig(method="cone").validate()


def test_validation_scores_read_the_span_and_each_direction(tiny_models):
    cm = tiny_models["llama"]
    hv, bv = cm.chat.encode_all(HARMFUL[:2]), cm.chat.encode_all(HARMLESS[:2])
    base = last_logits(cm, bv)
    basis = torch.linalg.qr(torch.randn(cm.d_model, 2, generator=torch.Generator().manual_seed(4)))[0].T
    span = direction_scores(cm, basis, 2.0, 1, hv, bv, base)
    first = direction_scores(cm, basis[0], 2.0, 1, hv, bv, base)
    assert span["induce"] == pytest.approx(first["induce"])  # addition adds the first vector
    assert span["bypass"] != pytest.approx(first["bypass"])  # ablation removes the whole span
    assert span["mediates"] == (span["bypass"] < 0 < span["induce"])
