"""The capability cost of an intervention (refusal/capability.py): teacher-forced cross-entropy of
reference replies and of plain text, on tiny random models with the real SmolLM2 template, against an
independent computation, under the interventions and on an orthogonalized model; the borderline and
general-text data files; and the capability columns of the paper table (refusal/app/reproduce.py,
`refusal reproduce`)."""
import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from refusal.app.reproduce import CAPABILITY_COLUMNS, intervention_table, to_markdown
from refusal import artifacts
from refusal.capability import (cached_reference_replies, capability_row, reference_replies, reply_cross_entropy,
                                reply_losses, text_cross_entropy, text_losses, token_losses)
from refusal.data import builtin_prompts, builtin_texts, instructions, resolve_prompts
from refusal.directions import Direction, save_direction
from refusal.errors import RefusalLabError
from refusal.hooks import ablate_direction, add_direction, orthogonalize
from refusal.metrics import generate

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTIONS = ["Name three rivers.", "How do I bake bread at home without a bread machine?", "Hi",
                "Explain photosynthesis to a ten-year-old in two short paragraphs, please."]
REPLIES = ["The Nile, the Amazon and the Danube.", "Mix flour, water, salt and yeast; knead, let it rise, bake.",
           "Hello! How can I help you today?", "Plants use sunlight to turn air and water into food."]
TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Tides are caused mainly by the Moon's gravity, which pulls the oceans into two bulges.",
         "Bread rises because yeast eats sugar and releases carbon dioxide, which the gluten traps in bubbles."]


def _reference_reply_ce(cm, instructions, replies) -> float:
    """The pooled reply cross-entropy by one full forward pass per (prompt + reply), unpadded, through
    the whole model (its own LM head), torch's cross_entropy on the reply tokens only."""
    total, n = 0.0, 0
    for x, r in zip(instructions, replies):
        prompt = cm.chat.encode(x).ids
        reply = cm.tokenizer(r, add_special_tokens=False).input_ids
        ids = torch.tensor([prompt + reply], device=cm.device)
        logits = cm.model(input_ids=ids).logits[0].float()  # [seq, vocab]
        total += F.cross_entropy(logits[len(prompt) - 1 : -1], ids[0, len(prompt) :], reduction="sum").item()
        n += len(reply)
    return total / n


def _reference_text_ce(cm, texts) -> float:
    total, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([cm.tokenizer(t).input_ids], device=cm.device)
        logits = cm.model(input_ids=ids).logits[0].float()
        total += F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
        n += ids.shape[1] - 1
    return total / n


def _unit(cm, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(cm.d_model, generator=g)
    return v / v.norm()


# ----------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gemma3_text", "qwen3_moe"])
def test_reply_ce_is_a_full_forward_on_the_reply_tokens_and_padding_changes_nothing(tiny_models, family):
    cm = tiny_models[family]
    want = _reference_reply_ce(cm, INSTRUCTIONS, REPLIES)
    batched = reply_cross_entropy(cm, INSTRUCTIONS, REPLIES, batch_size=4)  # unequal lengths, one batch
    assert abs(batched - want) < 1e-4 * max(1.0, want), (batched, want)
    # batch of unequal lengths = one by one, token by token
    together = reply_losses(cm, INSTRUCTIONS, REPLIES, batch_size=4)
    alone = [reply_losses(cm, [x], [r], batch_size=1)[0] for x, r in zip(INSTRUCTIONS, REPLIES)]
    for a, b, r in zip(together, alone, REPLIES):
        assert a.shape == b.shape == (len(cm.tokenizer(r, add_special_tokens=False).input_ids),)
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_text_ce_is_a_full_forward_on_every_token_after_the_first(tiny_models, family):
    cm = tiny_models[family]
    want = _reference_text_ce(cm, TEXTS)
    assert abs(text_cross_entropy(cm, TEXTS, batch_size=3) - want) < 1e-4 * max(1.0, want)
    together = text_losses(cm, TEXTS, batch_size=3)
    alone = [text_losses(cm, [t], batch_size=1)[0] for t in TEXTS]
    for a, b, t in zip(together, alone, TEXTS):
        assert len(a) == len(cm.tokenizer(t).input_ids) - 1
        assert torch.allclose(a, b, atol=1e-4)


def test_token_losses_checks_what_it_can_score(tiny):
    ids = tiny.chat.encode("Hi").ids
    assert len(token_losses(tiny, [ids], [0])[0]) == 0  # nothing scored: an empty loss, not an error
    with pytest.raises(RefusalLabError):
        token_losses(tiny, [ids], [len(ids)], share_prefix=False)  # the first token has no prediction
    with pytest.raises(RefusalLabError):
        token_losses(tiny, [ids, ids], [1])
    with pytest.raises(RefusalLabError):
        reply_cross_entropy(tiny, ["Hi"], [""])  # no reply tokens at all
    with pytest.raises(RefusalLabError):
        reply_cross_entropy(tiny, ["Hi", "Yo"], ["a"])


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_ce_under_ablation_equals_the_orthogonalized_model(tiny_models, family):
    cm = tiny_models[family]
    r = _unit(cm)
    base = (reply_cross_entropy(cm, INSTRUCTIONS, REPLIES), text_cross_entropy(cm, TEXTS))
    with ablate_direction(cm, r):
        ablated = (reply_cross_entropy(cm, INSTRUCTIONS, REPLIES), text_cross_entropy(cm, TEXTS))
    edited = orthogonalize(cm, r)
    orth = (reply_cross_entropy(edited, INSTRUCTIONS, REPLIES), text_cross_entropy(edited, TEXTS))
    for a, o, b in zip(ablated, orth, base):
        assert abs(a - o) < 1e-5, (a, o)  # measured: ~1e-7
        assert abs(a - b) > 1e-4  # the ablation does change it (measured: >= 4e-3): the equality is not vacuous
    # the hooks are gone on exit: the unedited model is as before
    assert abs(reply_cross_entropy(cm, INSTRUCTIONS, REPLIES) - base[0]) < 1e-6


def test_ce_under_activation_addition(tiny):
    base = reply_cross_entropy(tiny, INSTRUCTIONS, REPLIES)
    v = 4 * _unit(tiny, 1)
    with add_direction(tiny, v, 1):
        added = reply_cross_entropy(tiny, INSTRUCTIONS, REPLIES)
        # the reference computation sees the same hook: the engine (shared prefix cached) agrees with it
        assert abs(added - _reference_reply_ce(tiny, INSTRUCTIONS, REPLIES)) < 1e-4 * max(1.0, added)
    assert abs(added - base) > 1e-3
    assert abs(reply_cross_entropy(tiny, INSTRUCTIONS, REPLIES) - base) < 1e-6


# ----------------------------------------------------------------------------- reference replies


def test_reference_replies_are_cached_and_checked(tiny, tiny_models, tmp_path, monkeypatch):
    want = generate(tiny, tiny.chat.encode_all(INSTRUCTIONS), 5, progress=False)
    assert reference_replies(tiny, INSTRUCTIONS, 5) == want
    path = tmp_path / "reference" / "replies.json"
    assert cached_reference_replies(path, tiny, INSTRUCTIONS, 5) == want
    rec = artifacts.read_json(path)
    assert rec["model"]["fingerprint"] == tiny.fingerprint and rec["new_tokens"] == 5
    assert [r["instruction"] for r in rec["replies"]] == INSTRUCTIONS
    import refusal.capability as capability

    def fail(*a, **k):
        raise AssertionError("regenerated")

    monkeypatch.setattr(capability, "reference_replies", fail)
    assert cached_reference_replies(path, tiny, INSTRUCTIONS, 5) == want  # reused, not regenerated
    for args in ((tiny, INSTRUCTIONS, 6), (tiny, INSTRUCTIONS[:2], 5), (tiny_models["qwen2"], INSTRUCTIONS, 5)):
        with pytest.raises(RefusalLabError, match="--force"):
            cached_reference_replies(path, *args)
    monkeypatch.undo()
    assert cached_reference_replies(path, tiny, INSTRUCTIONS[:2], 5, force=True) == want[:2]
    assert artifacts.read_json(path)["instructions_hash"] == artifacts.hash_strings(INSTRUCTIONS[:2])


def test_capability_row(tiny):
    row, details = capability_row(tiny, INSTRUCTIONS[:2], (INSTRUCTIONS, REPLIES), TEXTS, max_new_tokens=4,
                                  batch_size=4)
    assert set(row) == set(CAPABILITY_COLUMNS)
    assert list(details.prompt) == INSTRUCTIONS[:2] and 0 <= row["borderline_refusal_rate"] <= 1
    assert row["reply_ce"] == pytest.approx(reply_cross_entropy(tiny, INSTRUCTIONS, REPLIES), abs=1e-6)
    assert row["text_ce"] == pytest.approx(text_cross_entropy(tiny, TEXTS), abs=1e-6)
    assert capability_row(tiny) == ({}, None)


# ----------------------------------------------------------------------------- data files


def _records(name):
    lines = (ROOT / "refusal" / "prompts" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_borderline_set():
    recs = _records("borderline")
    assert len(recs) >= 100
    assert all(set(r) == {"instruction", "category", "split"} for r in recs)  # harmless.jsonl's fields
    assert all(r["split"] == "test" and r["instruction"].strip() == r["instruction"] for r in recs)
    cats = pd.Series([r["category"] for r in recs]).value_counts()
    assert len(cats) >= 8 and cats.min() >= 5
    prompts = builtin_prompts("borderline")
    assert [p.instruction for p in prompts] == [r["instruction"] for r in recs]
    assert builtin_prompts("borderline", "test") == prompts and builtin_prompts("borderline", "train") == []
    assert resolve_prompts("borderline") == prompts
    lowered = [p.instruction.lower() for p in prompts]
    assert len(set(lowered)) == len(lowered), "duplicate borderline prompts"
    others = {p.instruction.lower() for kind in ("harmful", "harmless") for p in builtin_prompts(kind)}
    assert not set(lowered) & others, "a borderline prompt is in the harmful or harmless set"


def test_general_text_set():
    recs = _records("general_text")
    assert len(recs) == 40
    assert all(set(r) == {"text", "genre"} for r in recs)
    words = [len(r["text"].split()) for r in recs]
    assert min(words) >= 60 and max(words) <= 120
    assert len({r["genre"] for r in recs}) >= 8
    texts = builtin_texts("general_text")
    assert texts == [r["text"] for r in recs] and len(set(texts)) == len(texts)
    assert builtin_texts() == texts
    with pytest.raises(RefusalLabError):
        builtin_texts("pile")


# ----------------------------------------------------------------------------- the paper table


def test_intervention_table_has_the_capability_columns(tiny):
    harmful, harmless = INSTRUCTIONS[:2], INSTRUCTIONS[2:]
    v = _unit(tiny, 0)
    direction = Direction(v, 2 * v, 1, -1, {})
    replies = (INSTRUCTIONS, REPLIES)
    table, details = intervention_table(tiny, direction, harmful, harmless, max_new_tokens=3, batch_size=4,
                                        borderline=INSTRUCTIONS[1:3], replies=replies, texts=TEXTS)
    old = ["intervention", "harmful_refusal_rate", "harmful_refusal_score", "harmless_refusal_rate",
           "harmless_refusal_score", "harmless_kl"]
    assert list(table.columns) == old + list(CAPABILITY_COLUMNS)
    assert list(table.intervention) == ["none", "ablation", "addition", "orthogonalized"]
    t = table.set_index("intervention")
    assert t.loc["none", "reply_ce"] == pytest.approx(reply_cross_entropy(tiny, *replies), abs=1e-6)
    assert t.loc["none", "text_ce"] == pytest.approx(text_cross_entropy(tiny, TEXTS), abs=1e-6)
    for col in ("reply_ce", "text_ce"):
        assert abs(t.loc["ablation", col] - t.loc["orthogonalized", col]) < 1e-5
        assert abs(t.loc["ablation", col] - t.loc["none", col]) > 1e-4
    assert {f"{n}_borderline" for n in t.index} <= set(details)
    assert list(details["none_borderline"].prompt) == INSTRUCTIONS[1:3]
    assert "reply_ce" in to_markdown(table)
    # without the capability data: the table as it was
    plain, plain_details = intervention_table(tiny, direction, harmful, harmless, max_new_tokens=3, batch_size=4)
    assert list(plain.columns) == old and not any(k.endswith("_borderline") for k in plain_details)
    pd.testing.assert_frame_equal(plain, table[old])


class _Reproduce:
    """`refusal reproduce` through the CLI, with the stage module's data functions patchable."""

    def __init__(self):
        import refusal.app.reproduce as stage

        self.stage = stage
        self.builtin_prompts, self.builtin_texts = stage.builtin_prompts, stage.builtin_texts

    @staticmethod
    def main(argv) -> int:
        from refusal.app.cli import main

        return main(["reproduce", *argv])


def _small_reproduce_run(tiny_dirs, tmp_path, monkeypatch):
    """The tiny Llama with 3 prompts per set and 2 texts, and a run folder holding a direction: (the
    patchable CLI, the model's path, the run folder, the loaded model)."""
    from refusal.registry import load_model

    mod = _Reproduce()
    real_prompts, real_texts = mod.builtin_prompts, mod.builtin_texts
    monkeypatch.setattr(mod.stage, "builtin_prompts", lambda kind, split=None: real_prompts(kind, split)[:3])
    monkeypatch.setattr(mod.stage, "builtin_texts", lambda name="general_text": real_texts(name)[:2])
    model = str(tiny_dirs["llama"])
    out = tmp_path / "run"
    cm = load_model(model)
    v = _unit(cm, 3)
    save_direction(out / "direction", Direction(v, 2 * v, 1, -1, {"layer": 1, "position": -1}),
                   torch.zeros(cm.n_layers, cm.chat.n_post, cm.d_model), pd.DataFrame())
    return mod, model, out, cm


def test_reproduce_paper_writes_the_capability_columns_and_caches_the_references(tiny_dirs, tmp_path, monkeypatch,
                                                                                  capsys):
    """`refusal reproduce` end to end on a tiny model with 3 prompts per set: the table's new
    columns, the reference replies cached as JSON, a finished table reused (only with the settings it was
    made with), an old one recomputed."""
    mod, model, out, cm = _small_reproduce_run(tiny_dirs, tmp_path, monkeypatch)
    real_prompts, real_texts = mod.builtin_prompts, mod.builtin_texts
    argv = ["--model", model, "--out", str(out), "--max-new-tokens", "3", "--reference-tokens", "4"]
    assert mod.main(argv) == 0
    table = pd.read_csv(out / "reproduce" / "table.csv")
    assert set(CAPABILITY_COLUMNS) <= set(table.columns) and len(table) == 4
    assert (out / "reproduce" / "none_borderline.csv").is_file()
    ref = artifacts.read_json(out / "reference" / "replies.json")
    harmless = instructions(real_prompts("harmless", "test")[:3])
    assert [r["instruction"] for r in ref["replies"]] == harmless
    assert ref["model"]["fingerprint"] == cm.fingerprint  # the model itself is the reference for a folder
    replies = [r["reply"] for r in ref["replies"]]
    assert replies == generate(cm, cm.chat.encode_all(harmless), 4, progress=False)
    none = table.set_index("intervention").loc["none"]
    assert none.reply_ce == pytest.approx(reply_cross_entropy(cm, harmless, replies), abs=1e-5)
    rec = artifacts.read_json(out / "reproduce" / "reproduce.json")
    assert rec["reference_model"]["fingerprint"] == cm.fingerprint and rec["reference_tokens"] == 4
    assert set(rec["prompt_sets"]) == {"harmful:test", "harmless:test", "borderline", "general_text"}
    # a finished table is reused: nothing is recomputed
    monkeypatch.setattr(mod.stage, "intervention_table", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert mod.main(argv) == 0
    # ... but only with the settings it was made with (its record would claim them): otherwise an error
    # that names them, before anything is recomputed
    capsys.readouterr()
    assert mod.main(argv[:-1] + ["5"]) == 2
    assert "--reference-tokens 4 (this run: 5)" in capsys.readouterr().err
    assert mod.main(argv + ["--reference-model", str(tiny_dirs["qwen2"])]) == 2
    assert "another reference model" in capsys.readouterr().err
    assert mod.main(argv[:5] + ["4"] + argv[6:]) == 2  # --max-new-tokens 4, the table's 3
    assert "--max-new-tokens 3 (this run: 4)" in capsys.readouterr().err
    assert artifacts.read_json(out / "reproduce" / "reproduce.json")["reference_tokens"] == 4  # the record unchanged
    # a table from before the capability columns is not reused: it is remade, here with other reference
    # replies than those cached, which is refused without --force and done with it
    monkeypatch.undo()
    monkeypatch.setattr(mod.stage, "builtin_prompts", lambda kind, split=None: real_prompts(kind, split)[:3])
    monkeypatch.setattr(mod.stage, "builtin_texts", lambda name="general_text": real_texts(name)[:2])
    artifacts.write_csv(out / "reproduce" / "table.csv", table.drop(columns=list(CAPABILITY_COLUMNS)))
    assert mod.main(argv[:-1] + ["5"]) == 2
    assert mod.main(argv[:-1] + ["5", "--force"]) == 0
    assert artifacts.read_json(out / "reference" / "replies.json")["new_tokens"] == 5
    again = pd.read_csv(out / "reproduce" / "table.csv")
    assert set(CAPABILITY_COLUMNS) <= set(again.columns)
    pd.testing.assert_frame_equal(again.drop(columns="reply_ce"), table.drop(columns="reply_ce"))


def test_reproduce_with_a_method_puts_its_table_beside_the_papers_direction(tiny_dirs, tmp_path, monkeypatch, capsys):
    """`refusal reproduce --method subspace`: the method's folder and its table, side by side with the one
    direction's, recorded in reproduce.json."""
    from refusal.directions import load_direction

    mod, model, out, cm = _small_reproduce_run(tiny_dirs, tmp_path, monkeypatch)
    argv = ["--model", model, "--out", str(out), "--max-new-tokens", "3", "--reference-tokens", "4",
            "--method", "subspace", "--k", "2"]
    assert mod.main(argv) == 0
    printed = capsys.readouterr().out
    assert "diff-in-means (the paper's)" in printed and "subspace (layer" in printed
    method = pd.read_csv(out / "reproduce" / "table-subspace.csv")
    assert list(method.intervention) == ["none", "ablation", "addition", "orthogonalized"]
    md = load_direction(out / "direction-subspace")
    rec = artifacts.read_json(out / "reproduce" / "reproduce.json")
    assert rec["method"]["k"] == md.k and rec["method"]["method"] == "subspace"
    assert (out / "reproduce" / "table-subspace.md").read_text().count("|") > 20
