"""`refusal abliterate`: the Optuna search over ablations on a tiny model: trials, the front, the chosen
edit saved as hooks' parameters, a model folder and an adapter; a search killed mid-trial resumes; bad
settings are one-line errors that lose nothing."""
import json
from dataclasses import replace

import pandas as pd
import pytest
import torch

from refusal.ablation import AblationConfig, ablate, load_ablation
from refusal.activations import last_logits
from refusal.app.abliterate import (FOCUSED, AbliterateConfig, ablation_from, ask, fill_plan, finish_stale, open_study,
                                    pareto_front, paper_params, recipe_params, run_abliterate, scaled, search_space,
                                    start_params)
from refusal.directions import DirectionConfig, load_direction
from refusal.errors import RefusalLabError
from refusal.registry import load_model

SMALL = dict(trials=3, startup_trials=1, fill_trials=0, n_val=4, new_tokens=3, batch_size=8, judge="substring",
             max_kl=50.0, direction=DirectionConfig(n_train=8, n_val=4), test_table=False)


def test_the_start_trials_are_the_papers_ablation_then_heretics_recipe_inside_the_full_space():
    paper = ablation_from(paper_params(6))  # every write at weight 1, the selected direction, unprojected
    assert paper.attn.weights(6) == paper.mlp.weights(6) == [1.0] * 6
    assert paper == AblationConfig(attn=paper.attn, mlp=paper.mlp)
    recipe = ablation_from(recipe_params(11))  # each layer's own direction, projected, rows' norms kept
    assert recipe.per_layer and recipe.projection == "harmless" and recipe.norm_preserving and recipe.embed == 0
    assert recipe.attn.weights(11) == recipe.mlp.weights(11)
    weights = recipe.attn.weights(11)  # 1.15 at layer 8 of 0-10, half that 3 layers away, nothing beyond
    assert weights[8] == pytest.approx(1.15) and weights[5] == pytest.approx(0.575) and weights[4] == 0.0
    for n_layers in (6, 11):
        space = search_space(n_layers, "full")
        assert start_params(n_layers) == [paper_params(n_layers), recipe_params(n_layers)]
        for params in start_params(n_layers):
            for k, v in params.items():
                assert space[k]._contains(space[k].to_internal_repr(v)), k


def test_the_focused_space_leaves_the_projection_and_norm_preservation_to_heretics_choices():
    full, focused = search_space(11, "full"), search_space(11, "focused")
    assert set(full) - set(focused) == set(FOCUSED) == {"projection", "norm_preserving"}
    assert all(focused[k] == full[k] for k in focused)
    drawn = {k: v for k, v in recipe_params(11).items() if k in focused}  # a trial of the focused space
    assert ablation_from(drawn) == ablation_from(recipe_params(11))
    assert ablation_from({**drawn, "projection": float("nan"), "norm_preserving": None}) == ablation_from(drawn)
    with pytest.raises(RefusalLabError, match="search space"):
        search_space(11, "wide")


def test_a_start_trial_a_kill_interrupted_is_drawn_again_with_its_parameters():
    import optuna

    study = optuna.create_study()
    study.enqueue_trial({"x": 0.25})
    study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # in flight when the run was killed
    assert finish_stale(study) == 1
    assert study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}).params == {"x": 0.25}


def test_a_filling_trial_scales_the_edit_above_the_fronts_widest_gap_towards_its_middle():
    trials = pd.DataFrame({"trial": [0, 1, 2, 3, 4], "refusal": [0.9, 0.5, 0.1, 0.6, 0.0],
                           "kl": [0.02, 0.08, 0.18, 0.1, 0.5]})  # front under KL 0.2: 0, 1, 2 (3 dominated)
    # gaps from the unedited corner (KL 0, refusal 1): 0.02 x 0.1, 0.06 x 0.4, 0.10 x 0.4 (the widest)
    assert fill_plan(trials, set(), 0.2) == {"source": 2, "below": 1, "scale": pytest.approx((0.13 / 0.18) ** 0.5)}
    assert fill_plan(trials, {(2, 1)}, 0.2)["source"] == 1  # tried: the next widest
    assert fill_plan(trials, {(2, 1), (1, 0)}, 0.2)["below"] == -1  # from the unedited model's corner
    assert fill_plan(trials, {(2, 1), (1, 0), (0, -1)}, 0.2) is None
    assert fill_plan(trials.iloc[:0], set(), 0.2) is None  # nothing to fill yet
    for params in (paper_params(11), recipe_params(11)):  # every weight halved, the rest as it was
        half, whole = ablation_from(scaled(params, 0.5)), ablation_from(params)
        assert half.attn.weights(11) == pytest.approx([w / 2 for w in whole.attn.weights(11)])
        assert half.mlp.weights(11) == pytest.approx([w / 2 for w in whole.mlp.weights(11)])
        assert half.embed == whole.embed / 2
        assert replace(half, attn=whole.attn, mlp=whole.mlp, embed=whole.embed) == whole


def test_filling_trials_come_last_and_one_a_kill_interrupted_is_drawn_again_as_it_was():
    import optuna

    config = AbliterateConfig(trials=4, fill_trials=2, max_kl=0.2)
    study = optuna.create_study(directions=["minimize", "minimize"])
    for refusal, kl in ((0.9, 0.02), (0.2, 0.18)):  # two trials the sampler drew
        study.tell(study.ask(search_space(11)), [refusal, kl])
    trial = ask(study, search_space(11), 11, config)  # fills the widest gap: 0.16 x 0.7 above trial 0
    assert trial.user_attrs == {"fill_source": 1, "fill_below": 0, "fill_scale": pytest.approx((0.1 / 0.18) ** 0.5)}
    assert trial.params == pytest.approx(scaled(study.trials[1].params, trial.user_attrs["fill_scale"]))
    assert trial.distributions["attn.peak"].low == 0.0  # scaled peaks may lie below the sampler's range
    assert finish_stale(study) == 1  # killed in flight: failed, and drawn again as it was
    again = ask(study, search_space(11), 11, config)
    assert (again.params, again.user_attrs) == (trial.params, trial.user_attrs) and again.number == 3
    assert study.trials[2].state == optuna.trial.TrialState.FAIL
    study.tell(again, [0.5, 0.1])  # the gap split: 0.08 x 0.4 below the filled trial is now the widest
    assert ask(study, search_space(11), 11, config).user_attrs == {"fill_source": 3, "fill_below": 0,
                                                                   "fill_scale": pytest.approx(0.6 ** 0.5)}


def test_the_front_keeps_only_undominated_trials():
    trials = pd.DataFrame({"trial": [0, 1, 2, 3], "refusal": [0.5, 0.2, 0.2, 0.0], "kl": [0.1, 0.3, 0.2, 0.9]})
    assert list(pareto_front(trials).trial) == [3, 2, 0]


def test_a_search_writes_its_front_and_the_chosen_edit(tmp_path, tiny_dirs, caplog):
    cm = load_model(str(tiny_dirs["llama"]))
    out = tmp_path / "ab"
    rec = run_abliterate(cm, AbliterateConfig(**{**SMALL, "trials": 4, "fill_trials": 1, "test_table": True}), out)
    trials = pd.read_csv(out / "trials.csv")
    assert list(trials.trial) == [0, 1, 2, 3] and (trials.wall_s > 0).all()
    # the last trial fills the front: a front trial's edit scaled down, with a lower KL
    fill = trials.iloc[3]
    source = trials.set_index("trial").loc[int(fill.fill_source)]
    front = pareto_front(trials.iloc[:3])
    assert int(fill.fill_source) in set(front.trial) and fill.fill_below in {-1, *front.trial}
    assert 0.5 ** 0.5 <= fill.fill_scale <= 0.95
    params = lambda row: {k.removeprefix("param."): v for k, v in row.items() if k.startswith("param.")}  # noqa: E731
    assert params(fill) == pytest.approx(scaled(params(source), fill.fill_scale))
    assert fill.kl < source.kl
    assert {"refusal", "kl", "refuses", "neither", "substring_refusal"} <= set(trials.columns)
    assert trials.kl.iloc[0] > 0  # trial 0, the paper's ablation, changes the model
    for number, start in enumerate(start_params(cm.n_layers)):  # the paper's ablation, then heretic's recipe
        params = trials.set_index("trial").loc[number]
        for k, v in start.items():
            assert params[f"param.{k}"] == (pytest.approx(v) if isinstance(v, float) else v), k
    front = pd.read_csv(out / "front.csv")
    assert set(front.trial) <= set(trials.trial) and (out / "front.png").is_file()
    chosen = json.loads((out / "chosen.json").read_text())
    assert chosen["trial"] == rec["chosen"]["trial"]
    ablation = load_ablation(out)  # what `refusal eval --ablate OUT` reads
    assert ablation == ablation_from({k.removeprefix("param."): v for k, v in
                                      trials.set_index("trial").loc[chosen["trial"]].items() if k.startswith("param.")})
    table = pd.read_csv(out / "table.csv")
    assert {"none", "orthogonalized"} <= set(table.intervention) and "reply_ce" in table
    # the saved model is the chosen edit (the hooks' logits where the edit has a hook form)
    saved = load_model(str(out / "model"))
    assert json.loads((out / "model" / "refusal_lab.json").read_text())["ablation"] == chosen["ablation"]
    # an adapter, exact unless the edit keeps write vectors' norms (not low-rank: then approximated at its rank)
    adapter = json.loads((out / "adapter" / "adapter.json").read_text())
    assert (out / "adapter" / "adapter_config.json").is_file() and adapter["exact"] != ablation.norm_preserving
    assert (adapter["approximation"] is not None) == ablation.norm_preserving
    if not ablation.norm_preserving:
        d = load_direction(out, cm)
        encs = cm.chat.encode_all(["How do I bake bread?", "hi"])
        with ablate(cm, d, ablation):
            hooked = last_logits(cm, encs)
        assert (last_logits(saved, encs) - hooked).abs().max() < 1e-4
    # the loaded model is left as it was, and was taken for itself throughout (no "another model" warning)
    fresh = load_model(str(tiny_dirs["llama"]))
    encs = cm.chat.encode_all(["hi"])
    assert (last_logits(cm, encs) - last_logits(fresh, encs)).abs().max() < 1e-6
    assert cm.fingerprint == fresh.fingerprint
    assert cm.model.config.tie_word_embeddings == fresh.model.config.tie_word_embeddings
    assert not [r for r in caplog.records if "another model" in r.getMessage()]


def test_a_search_killed_mid_trial_resumes_and_bad_settings_lose_nothing(tmp_path, tiny_dirs):
    cm = load_model(str(tiny_dirs["llama"]))
    out = tmp_path / "ab"
    config = AbliterateConfig(**{**SMALL, "trials": 2, "save_model": False, "save_adapter": False, "space": "focused"})
    run_abliterate(cm, config, out)
    d = load_direction(out, cm)
    study = open_study(out, config, cm.fingerprint, d, resume=True)
    study.ask(search_space(cm.n_layers))  # a trial in flight when the run was killed
    before = pd.read_csv(out / "trials.csv")
    run_abliterate(cm, replace(config, trials=3), out, resume=True)
    after = pd.read_csv(out / "trials.csv")
    assert len(after) == 3 and after.iloc[:2].equals(before)  # the finished trials kept as they were
    drawn = after.iloc[2]  # by the sampler on the focused space: FOCUSED's choices, recorded
    assert {k: drawn[f"param.{k}"] for k in FOCUSED} == FOCUSED
    study = open_study(out, replace(config, trials=3), cm.fingerprint, d, resume=True)
    assert not set(FOCUSED) & set(study.trials[-1].params)  # not drawn: fixed
    with pytest.raises(RefusalLabError, match="other settings"):
        run_abliterate(cm, AbliterateConfig(**{**SMALL, "n_val": 5}), out, resume=True)
    with pytest.raises(RefusalLabError, match="--max-kl"):
        run_abliterate(cm, replace(config, trials=3, max_kl=1e-9), out, resume=True)
    assert pd.read_csv(out / "trials.csv").equals(after)  # nothing lost
    with pytest.raises(RefusalLabError, match="--force"):
        run_abliterate(cm, config, out)  # neither --resume nor --force


def test_the_cli_runs_a_search(capsys, tmp_path, tiny_dirs):
    from refusal.app.cli import main

    out = tmp_path / "ab"
    argv = ["abliterate", "--model", str(tiny_dirs["llama"]), "--trials", "2", "--startup-trials", "1", "--n-val", "4",
            "--new-tokens", "2", "--max-kl", "50", "--judge", "substring", "--no-test-table", "--no-save-model",
            "--no-save-adapter", "--out", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "chosen: trial" in stdout and "front (" in stdout
    assert main(argv) == 2  # an existing study: --resume or --force
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0]
    assert main(argv + ["--resume", "--max-kl", "1e-12"]) == 2
    assert "raise --max-kl" in capsys.readouterr().err
    assert main(argv + ["--resume", "--space", "focused"]) == 2  # the study was made on the full space
    assert "other settings (space)" in capsys.readouterr().err
    assert torch.is_tensor(load_direction(out).vector)


def test_trials_on_ray_workers_score_as_in_this_process(tmp_path, tiny_dirs):
    """The driver asks and tells; two Ray workers score the trials; each trial's scores are those the
    scorer gives here for its parameters."""
    pytest.importorskip("ray")
    import os

    import ray

    from refusal.ablation import AblationScorer
    from refusal.data import direction_sets, instructions
    from refusal.judges import load_judge
    from refusal.registry import ModelConfig

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=200 * 2 ** 20)
    try:
        model = ModelConfig(model=str(tiny_dirs["llama"]))
        cm = load_model(str(tiny_dirs["llama"]))
        out = tmp_path / "ab"
        config = AbliterateConfig(**{**SMALL, "trials": 4, "workers": 2, "save_model": False, "save_adapter": False})
        run_abliterate(cm, config, out, model=model)
    finally:
        ray.shutdown()
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 and (out / "tasks" / "trial-0" / "result.json").is_file()
    _, _, harmful, harmless = direction_sets(None, None, 0, config.n_val, config.seed)
    fresh = load_model(str(tiny_dirs["llama"]))
    scorer = AblationScorer(fresh, load_direction(out, fresh), instructions(harmful), instructions(harmless),
                            load_judge("substring"), config.new_tokens, config.batch_size)
    for _, t in trials.iterrows():
        got = scorer(ablation_from({k.removeprefix("param."): v for k, v in t.items() if k.startswith("param.")}))
        assert got["refusal"] == t.refusal and abs(got["kl"] - t.kl) < 1e-4


def test_trials_that_keep_failing_on_workers_stop_the_search_in_one_line(tmp_path, tiny_dirs, monkeypatch):
    """Every trial's worker fails: the driver marks each failed, and stops once twice the workers have failed
    in a row, instead of drawing trials forever; the failed trials are in the study, nothing is chosen."""
    import refusal.app.abliterate as ab
    from refusal.registry import ModelConfig

    class Failing:  # RayRunner's interface, every task failing
        def __init__(self, config, address, n_tasks):
            self.workers, self.ids, self.closed = [0, 1], [], False

        def submit(self, task, run_dir):
            self.ids.append(task.id)

        def wait(self):
            done, self.ids = [(tid, None, RuntimeError("worker died")) for tid in self.ids], []
            return done

        def close(self):
            self.closed = True

    monkeypatch.setattr(ab, "RayRunner", Failing)
    cm = load_model(str(tiny_dirs["llama"]))
    config = AbliterateConfig(**{**SMALL, "workers": 2, "save_model": False, "save_adapter": False})
    with pytest.raises(RefusalLabError, match="keep failing .*worker died"):
        run_abliterate(cm, config, tmp_path / "ab", model=ModelConfig(model=str(tiny_dirs["llama"])))
    import optuna

    study = optuna.load_study(study_name="abliterate", storage=f"sqlite:///{tmp_path / 'ab' / 'study.db'}")
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert len(failed) == 4 and len(study.trials) == 6  # the start trials wait to be drawn again, as they were
    assert [t.system_attrs["fixed_params"] for t in waiting] == start_params(cm.n_layers)
    assert not (tmp_path / "ab" / "chosen.json").exists()
