"""`refusal abliterate`: the best weight-edit jailbreak of a model, searched with Optuna.

Each trial draws an ablation (refusal.ablation.AblationConfig: per-layer kernels for the attention and
MLP writes, the embeddings' weight, the direction's layer, its projection, norm preservation), edits the
model's weights with it in place, and scores two objectives, both minimised:
- `refusal`: the share of the harmful validation prompts whose greedy reply the judge does not call
  compliant (it refuses, or it is degenerate or off topic: an edit that breaks the model does not win);
- `kl`: the mean KL(base || edited) of the first reply token's distribution on the harmless validation
  prompts (how much the edit changes the model where it should not).
The weights are put back after every trial. The study lives in OUT/study.db (SQLite), so a killed search
continues with --resume and loses at most the trial in flight; the first trial is always the paper's
ablation (every write at weight 1), so the front starts where the paper stands. The last `fill_trials`
trials fill the front's widest gap: an edit of the front scaled down towards the unedited model
(fill_plan), where the sampler, with few trials, leaves the gentle edits unexplored.

Afterwards: every trial (trials.csv), the Pareto front (front.csv, front.png), the chosen trial (the
fewest refusals among trials with KL at most max_kl, ties to the lower KL; chosen.json), the direction
folder with the chosen ablation (OUT/direction, for `refusal eval --ablate OUT` and `refusal reproduce`),
the chosen edit's paper table on the held-out test prompts (table.csv, table.md), and the edited model as
a folder (OUT/model) and as a LoRA adapter (OUT/adapter).
"""
from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pandas as pd

from refusal import artifacts
from refusal.ablation import AblationConfig, AblationScorer, Kernel, save_ablation, write_abliterated, write_adapter
from refusal.capability import cached_reference_replies
from refusal.config import as_dict, check_fields, option
from refusal.data import builtin_prompts, builtin_texts, direction_sets, instructions
from refusal.directions import Direction, DirectionConfig, load_direction
from refusal.methods import find_direction
from refusal.errors import RefusalLabError
from refusal.judges import Judge, JudgeConfig, load_judge
from refusal.models import ChatModel
from refusal.registry import ModelConfig
from refusal.app.plots import plot_front
from refusal.app.reproduce import intervention_table, to_markdown
from refusal.app.sweep import RayRunner, SweepConfig, Task, failure_message

log = logging.getLogger(__name__)

STUDY = "abliterate"
SETTINGS_VERSION = 7  # 2: the direction may be each layer's own (per_layer); 3: heretic's priors on the peak and
# the direction's layer, 128 candidates per TPE draw; 4 (not adopted): the embeddings at the attention kernel's
# layer-0 weight; 5: trial 1 is heretic's recipe (start_params); 6: the space a choice (SPACES; focused
# measured and not adopted, so full, version 5's, stays the default); 7: the last 4 trials fill the front
# (fill_trials; measured on seeds 0-2 and adopted)

# "full" searches the projection and norm preservation; "focused": after the start trials they are
# heretic's fixed choices (FOCUSED), so the sampler's one categorical choice is the direction's scope.
SPACES = ("full", "focused")
FOCUSED = {"projection": "harmless", "norm_preserving": True}


@dataclass(frozen=True)
class AbliterateConfig:
    """The search (`refusal abliterate`): its budget, its prompts, its judge, and how a trial is chosen."""

    trials: int = option(24, "trials in the study (a resumed study runs until it has this many finished)", ge=1)
    startup_trials: int = option(8, "trials before the sampler models the front: the start trials (the paper's "
                                    "ablation, then heretic's recipe), then random draws", ge=0)
    n_val: int = option(48, "harmful and harmless validation prompts each (never test prompts)", ge=1)
    new_tokens: int = option(32, "greedy reply tokens the judge reads per harmful validation prompt", ge=1)
    batch_size: int = option(16, "prompts per forward pass", ge=1)
    fill_trials: int = option(4, "the study's last trials fill the front's widest gap below --max-kl, each an edit "
                                 "of the front scaled down towards the unedited model (0: every trial the "
                                 "sampler's)", ge=0)
    max_kl: float = option(0.2, "the chosen trial: the fewest refusals among trials with KL at most this", gt=0)
    seed: int = option(0, "seed of the sampler and of the validation prompts' draw", ge=0)
    judge: JudgeConfig = option(help="the judge of the harmful replies (refusal.judges.JudgeConfig)",
                                factory=JudgeConfig)
    direction: DirectionConfig = option(help="how the direction is found when --direction is not given",
                                        factory=DirectionConfig)
    test_table: bool = option(True, "the chosen edit's paper table on the held-out test prompts (refusal, KL, "
                                    "reply cross-entropy, false refusal on borderline prompts)")
    save_model: bool = option(True, "save the chosen edit as a model folder (OUT/model)")
    save_adapter: bool = option(True, "save the chosen edit as a LoRA adapter (OUT/adapter)")
    adapter_rank: int = option(3, "the adapter's rank for a norm-preserving edit, which is not low-rank: the "
                                  "adapter approximates it (each matrix's error in adapter.json) and the model "
                                  "folder is the exact form; other edits are carried exactly, one rank per "
                                  "direction", ge=1)
    space: str = option("full", "the search space: full (the direction's scope, projection and norm preservation, "
                                "the kernels and the embeddings searched) or focused (the projection and norm "
                                "preservation fixed as heretic's defaults fix its own: projected off the harmless "
                                "mean, write vectors' norms kept); the start trials are the same in both",
                        choices=SPACES)
    workers: int = option(0, "trials scored at once on Ray workers, the driver asking and telling the study "
                             "(0: one after another in this process)", ge=0)

    def __post_init__(self):
        if isinstance(self.judge, (str, dict)):
            object.__setattr__(self, "judge", JudgeConfig.of(self.judge))

    def validate(self) -> None:
        check_fields(self)

    def settings(self) -> dict:
        """What decides the study's trials (recorded in it; a study made otherwise is not resumed). Not
        max_kl, so that a study can be resumed to choose under another bound; the filling trials read the
        bound they run with."""
        return {"version": SETTINGS_VERSION, "n_val": self.n_val, "new_tokens": self.new_tokens, "seed": self.seed,
                "judge": self.judge.key, "startup_trials": self.startup_trials, "space": self.space,
                "fill_trials": self.fill_trials}


# ----------------------------------------------------------------------------- the search space

def top_layer(n_layers: int) -> float:
    """The last layer's index, the scale of the space's layer parameters (1 for a one-layer model)."""
    return float(max(n_layers - 1, 1))


def search_space(n_layers: int, space: str = "full") -> dict:
    """Optuna's distributions for a model of `n_layers` layers: per kernel (attention, MLP) the peak weight
    (0.8-1.5), the peak layer (60-100% of the depth), the floor as a share of the peak and the width (1 layer
    to all); the embeddings' weight; where the direction is taken (the selected one, a fractional layer at
    40-90% of the depth, or each layer's own); in the full space also the projection and norm preservation
    (the focused space leaves them to FOCUSED). The peak's and the direction's ranges are heretic's priors
    (refusal is mediated in the later middle of the network); the paper's ablation (peak 1 at the last
    layer, floor 1, width all layers) lies inside the full space."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if space not in SPACES:
        raise RefusalLabError(f"unknown search space {space!r}; choose one of {', '.join(SPACES)}")
    top = top_layer(n_layers)
    dists = {}
    for part in ("attn", "mlp"):
        dists[f"{part}.peak"] = FloatDistribution(0.8, 1.5)
        dists[f"{part}.peak_layer"] = FloatDistribution(0.6 * top, top)
        dists[f"{part}.floor_share"] = FloatDistribution(0.0, 1.0)
        dists[f"{part}.width"] = FloatDistribution(1.0, top)
    dists["embed"] = FloatDistribution(0.0, 1.0)
    dists["direction"] = CategoricalDistribution(["selected", "layer", "per_layer"])
    dists["direction_layer"] = FloatDistribution(0.4 * top, 0.9 * top)
    if space == "full":
        dists["projection"] = CategoricalDistribution(["none", "harmless", "biprojected"])
        dists["norm_preserving"] = CategoricalDistribution([False, True])
    return dists


def complete_params(params: dict) -> dict:
    """A trial's parameters with those the focused space leaves out filled in as FOCUSED (a missing value may
    come as None or NaN from a table)."""
    given = {k: v for k, v in params.items() if v is not None and not (isinstance(v, float) and v != v)}
    return {**FOCUSED, **given}


def ablation_from(params: dict) -> AblationConfig:
    """The AblationConfig a trial's parameters describe (complete_params)."""
    p = {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
         for k, v in complete_params(params).items()}
    kernels = {part: Kernel(peak=p[f"{part}.peak"], peak_layer=p[f"{part}.peak_layer"],
                            floor=p[f"{part}.floor_share"] * p[f"{part}.peak"], width=p[f"{part}.width"])
               for part in ("attn", "mlp")}
    return AblationConfig(attn=kernels["attn"], mlp=kernels["mlp"], embed=p["embed"],
                          direction_layer=p["direction_layer"] if p["direction"] == "layer" else None,
                          per_layer=p["direction"] == "per_layer",
                          projection=str(p["projection"]), norm_preserving=bool(p["norm_preserving"]))


def paper_params(n_layers: int) -> dict:
    """The parameters of the paper's ablation (every write at weight 1, the selected direction)."""
    top = top_layer(n_layers)
    p = {}
    for part in ("attn", "mlp"):
        p.update({f"{part}.peak": 1.0, f"{part}.peak_layer": top, f"{part}.floor_share": 1.0, f"{part}.width": top})
    p.update(embed=1.0, direction="selected", direction_layer=0.5 * top, projection="none", norm_preserving=False)
    return p


def recipe_params(n_layers: int) -> dict:
    """heretic's recipe at the middle of its priors: each layer's own direction, projected off the harmless
    mean, write vectors' norms kept; both kernels peaking at 1.15 at 80% of the depth, falling to half that over 30%
    of it; the embeddings left alone. It starts the sampler on the corner of the space where heretic
    searches, beside the paper's ablation, so that neither corner waits on the random start-up draws."""
    top = top_layer(n_layers)
    p = {}
    for part in ("attn", "mlp"):
        p.update({f"{part}.peak": 1.15, f"{part}.peak_layer": 0.8 * top, f"{part}.floor_share": 0.5,
                  f"{part}.width": max(1.0, 0.3 * top)})
    p.update(embed=0.0, direction="per_layer", direction_layer=0.65 * top, projection="harmless",
             norm_preserving=True)
    return p


def start_params(n_layers: int) -> list[dict]:
    """The trials every study starts with, in order: the paper's ablation, then heretic's recipe."""
    return [paper_params(n_layers), recipe_params(n_layers)]


# ----------------------------------------------------------------------------- the study

def open_study(out: Path, config: AbliterateConfig, model_fingerprint: str, direction: Direction, resume: bool):
    """The study in out/study.db: new, or (resume) the one there if it was made with these settings, the
    same model and the same direction."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = {**config.settings(), "model": model_fingerprint,
                "direction": artifacts.hash_strings([repr(direction.vector.tolist()), str(direction.layer),
                                                     str(direction.position)])}
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    exists = (out / "study.db").is_file()
    with warnings.catch_warnings():  # multivariate and group TPE are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(study_name=STUDY, storage=storage, load_if_exists=resume and exists,
                                    directions=["minimize", "minimize"])
        # seeded by how far the study is, so that a resumed study does not draw its first trials again
        study.sampler = optuna.samplers.TPESampler(seed=config.seed + len(study.trials),
                                                   n_startup_trials=config.startup_trials, multivariate=True,
                                                   group=True, n_ei_candidates=128)
    made = study.user_attrs.get("settings")
    if made is None:
        study.set_user_attr("settings", settings)
    elif made != settings:
        diff = sorted(k for k in set(made) | set(settings) if made.get(k) != settings.get(k))
        raise RefusalLabError(f"{out}/study.db was made with other settings ({', '.join(diff)}); resume it with "
                              "the same ones, or pass --force to start over")
    return study


def finish_stale(study) -> int:
    """Trials a kill left running are marked failed and drawn again: a start or filling trial with its
    parameters, the others by the sampler. How many there were."""
    import optuna

    stale = [t.number for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for number in stale:
        fail(study, number)
    return len(stale)


def fail(study, number: int) -> None:
    """Trial `number` is marked failed; an enqueued one (a start or filling trial) waits to be drawn again as
    it was."""
    import optuna

    study.tell(number, state=optuna.trial.TrialState.FAIL)
    trial = study.get_trials(deepcopy=False)[number]  # trials are in order of their numbers
    if "fixed_params" in trial.system_attrs:
        study.enqueue_trial(trial.system_attrs["fixed_params"],
                            user_attrs={k: v for k, v in trial.user_attrs.items() if k.startswith("fill_")})


def fill_space(n_layers: int) -> dict:
    """The full space with the kernels' peaks open down to 0, where a filling trial's scaled-down edit
    (fill_plan) lies."""
    from optuna.distributions import FloatDistribution

    dists = search_space(n_layers, "full")
    for part in ("attn", "mlp"):
        dists[f"{part}.peak"] = FloatDistribution(0.0, 1.5)
    return dists


MAX_FILL_SCALE = 0.95  # a filling trial's edit at most this share of its source (at least sqrt(1/2) by the rule)


def fill_plan(trials: pd.DataFrame, tried: set[tuple[int, int]], max_kl: float) -> dict | None:
    """The next filling trial, or None when no gap is left untried. The front's points with KL at most
    max_kl, sorted by KL and led by the unedited model's corner (trial -1: KL 0, every prompt refused), make
    gaps between neighbours a (lower KL) and b; the gap whose rectangle (KL_b - KL_a) x (refusal_a -
    refusal_b) is largest and whose (b, a) is not in `tried` is filled with b's edit scaled by
    sqrt(((KL_a + KL_b) / 2) / KL_b): a small edit's KL grows as its scale squared, so the scaled edit aims at
    the gap's middle (at most MAX_FILL_SCALE). Returns {"source": b, "below": a, "scale": s}."""
    if trials.empty:  # no finished trial yet (no columns either)
        return None
    front = pareto_front(trials)
    front = front[front.kl <= max_kl].sort_values("kl")
    points = [(-1, 0.0, 1.0)] + [(int(t), float(k), float(r)) for t, k, r in zip(front.trial, front.kl, front.refusal)]
    best = None
    for (a, kl_a, ref_a), (b, kl_b, ref_b) in zip(points, points[1:]):
        area = (kl_b - kl_a) * (ref_a - ref_b)
        if (b, a) not in tried and area > 0 and kl_b > 0 and (best is None or area > best[0]):
            scale = min(((kl_a + kl_b) / 2 / kl_b) ** 0.5, MAX_FILL_SCALE)
            best = (area, {"source": b, "below": a, "scale": scale})
    return None if best is None else best[1]


def scaled(params: dict, scale: float) -> dict:
    """A trial's parameters with every weight (both kernels' peaks, hence their floors, and the embeddings')
    multiplied by `scale`."""
    p = complete_params(params)
    return {**p, "attn.peak": p["attn.peak"] * scale, "mlp.peak": p["mlp.peak"] * scale,
            "embed": p["embed"] * scale}


def ask(study, space: dict, n_layers: int, config: AbliterateConfig):
    """The study's next trial: an enqueued trial still waiting (a start trial, on the full space, since the
    paper's ablation lies outside the focused one; or a filling trial a kill interrupted), then, once
    config.trials - config.fill_trials other trials are finished or running, a filling trial (fill_plan)
    while a gap is left, else one the sampler draws on `space`."""
    import optuna

    S = optuna.trial.TrialState
    waiting = study.get_trials(deepcopy=False, states=(S.WAITING,))
    if waiting:  # the oldest is drawn next; the sampler's ranges are those of the first trials, the start trials
        return study.ask(fill_space(n_layers) if "fill_source" in waiting[0].user_attrs
                         else search_space(n_layers, "full"))
    others = [t for t in study.get_trials(deepcopy=False, states=(S.COMPLETE, S.RUNNING))
              if "fill_source" not in t.user_attrs]
    if len(others) >= config.trials - config.fill_trials:
        tried = {(t.user_attrs["fill_source"], t.user_attrs["fill_below"])
                 for t in study.get_trials(deepcopy=False) if "fill_source" in t.user_attrs}
        plan = fill_plan(trials_frame(study), tried, config.max_kl)
        if plan is not None:
            study.enqueue_trial(scaled(study.trials[plan["source"]].params, plan["scale"]),
                                user_attrs={f"fill_{k}": v for k, v in plan.items()})
            return study.ask(fill_space(n_layers))
    return study.ask(space)


def trials_frame(study) -> pd.DataFrame:
    """Every finished trial: its number, objectives, wall time and parameters (complete_params)."""
    import optuna

    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        rows.append({"trial": t.number, "refusal": t.values[0], "kl": t.values[1], **t.user_attrs,
                     **{f"param.{k}": v for k, v in complete_params(t.params).items()}})
    return pd.DataFrame(rows)


def pareto_front(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials no other trial beats on both objectives (no worse on both, better on one), by refusal."""
    keep = []
    for i, a in trials.iterrows():
        dominated = ((trials.refusal <= a.refusal) & (trials.kl <= a.kl) &
                     ((trials.refusal < a.refusal) | (trials.kl < a.kl))).any()
        if not dominated:
            keep.append(i)
    return trials.loc[keep].sort_values(["refusal", "kl"]).reset_index(drop=True)


def choose(trials: pd.DataFrame, max_kl: float) -> pd.Series:
    """The fewest refusals among trials with KL at most max_kl, ties to the lower KL; a one-line error when
    none is that close."""
    ok = trials[trials.kl <= max_kl]
    if ok.empty:
        raise RefusalLabError(f"no trial has a KL at most --max-kl {max_kl} (the lowest is {trials.kl.min():.3g}); "
                              "raise --max-kl and run again with --resume (the trials are kept)")
    return ok.sort_values(["refusal", "kl", "trial"]).iloc[0]


def check_abliterate(config: AbliterateConfig, out: str | Path, resume: bool, force: bool,
                     direction: str | None) -> tuple[Judge, Direction | None]:
    """The search's checks before a model loads (by the CLI and by run_abliterate): the config, the output
    folder with its resume/force, a given direction folder (it must carry the per-layer candidates and
    harmless means the search space reads), and the judge, returned loaded with the direction."""
    config.validate()
    if resume and force:
        raise RefusalLabError("--resume and --force contradict each other; choose one")
    artifacts.check_out(Path(out), force=force, resume=resume,
                        fix="pass --resume to continue its study, --force to start over, or choose another --out")
    d = None
    if direction is not None:
        d = load_direction(direction)
        if d.k > 1:
            raise RefusalLabError(f"{direction}: a {d.k}-dimensional direction folder; the search varies one "
                                  "direction's layer and projection, so give a one-direction folder")
        if d.mean_diffs is None or d.harmless_means is None:
            raise RefusalLabError(f"{direction}: the direction folder has no per-layer candidates or harmless means "
                                  "(made before they were saved); compute it again with `refusal direction`")
    return load_judge(config.judge), d


def run_on_ray(study, space: dict, n_layers: int, config: AbliterateConfig, model: ModelConfig | None, ddir: Path,
               out: Path, tell: Callable, done: Callable[[], int], say: Callable[[str], None]) -> None:
    """The study's remaining trials on config.workers Ray workers (the sweep's RayRunner, each worker one
    CPU core or one GPU, its model loaded once): the driver alone asks the study for trials, one per idle
    worker, and tells it each trial's scores as they arrive; a trial whose worker fails is marked failed
    and drawn again."""
    import optuna

    if model is None:
        raise RefusalLabError("trials on Ray workers need the model's ModelConfig (run_abliterate(model=...))")
    runner = RayRunner(SweepConfig(models=(model.model,)), None, config.workers)
    spec = dict(model=as_dict(model), direction=str(ddir.resolve()), n_val=config.n_val, seed=config.seed,
                new_tokens=config.new_tokens, batch_size=config.batch_size, judge=as_dict(config.judge))
    running: dict[str, optuna.trial.Trial] = {}
    failed_in_a_row = 0
    try:
        while done() < config.trials or running:
            while len(running) < len(runner.workers) and done() + len(running) < config.trials:
                trial = ask(study, space, n_layers, config)
                tid = f"trial-{trial.number}"
                running[tid] = trial
                runner.submit(Task(tid, "ablation_trial", (), {**spec, "id": tid, "kind": "ablation_trial",
                                                               "ablation": as_dict(ablation_from(trial.params))}), out)
            for tid, result, error in runner.wait():
                trial = running.pop(tid)
                if error is not None:
                    fail(study, trial.number)
                    failed_in_a_row += 1
                    say(f"[abliterate] trial {trial.number} failed: {failure_message(error)}")
                    if failed_in_a_row >= 2 * len(runner.workers):  # not one unlucky worker: every trial fails
                        raise RefusalLabError(f"the trials on Ray workers keep failing ({failed_in_a_row} in a row); "
                                              f"the last: {failure_message(error)}")
                else:
                    failed_in_a_row = 0
                    tell(trial, {**result, "wall_s": result["trial_s"]})
    finally:
        runner.close()


def run_abliterate(cm: ChatModel, config: AbliterateConfig, out: str | Path, direction: str | None = None,
                   resume: bool = False, force: bool = False, say: Callable[[str], None] | None = None,
                   reference: ChatModel | None = None, model: ModelConfig | None = None) -> dict:
    """The search on `cm` into `out` (see the module's docstring). `direction`: a direction folder (default:
    out/direction, found with config.direction if not there). `reference`: the model whose greedy replies
    the test table's reply cross-entropy is measured on (default: cm, unedited). `model`: cm's ModelConfig,
    which Ray workers load (config.workers > 0). Returns the record (also out/abliterate.json)."""
    say = say or log.info
    judge, given = check_abliterate(config, out, resume, force, direction)
    out = Path(out)
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    ddir = out / "direction"
    if given is not None and not (ddir / "direction.safetensors").is_file():
        shutil.copytree(Path(direction).expanduser() / "direction" if (Path(direction) / "direction").is_dir()
                        else Path(direction).expanduser(), ddir, dirs_exist_ok=True)
        (ddir / "ablation.json").unlink(missing_ok=True)  # the folder's own choice is not this search's
    if not (ddir / "direction.safetensors").is_file():
        find_direction(cm, replace(config.direction, seed=config.seed), ddir)
    d = load_direction(ddir, cm)  # as saved, so that a resumed study reads the same numbers
    if d.mean_diffs is None or d.harmless_means is None:
        raise RefusalLabError(f"{ddir}: the direction folder has no per-layer candidates or harmless means; delete "
                              "it (or pass --force) to compute it again")
    _, _, harmful_val, harmless_val = direction_sets(None, None, 0, config.n_val, config.seed)
    fingerprint = cm.fingerprint  # the model as loaded (the scorer unties tied embeddings until it closes)
    scorer = AblationScorer(cm, d, instructions(harmful_val), instructions(harmless_val), judge, config.new_tokens,
                            config.batch_size)
    try:
        return _search(cm, config, out, d, ddir, scorer, fingerprint, judge, resume, say, reference, model)
    finally:
        scorer.close()  # the loaded model as it was


def _search(cm: ChatModel, config: AbliterateConfig, out: Path, d: Direction, ddir: Path, scorer: AblationScorer,
            fingerprint: str, judge: Judge, resume: bool, say: Callable[[str], None], reference: ChatModel | None,
            model: ModelConfig | None) -> dict:
    """run_abliterate's study, choice and outputs, with the scorer made."""
    study = open_study(out, config, fingerprint, d, resume)
    stale = finish_stale(study)
    if stale:
        say(f"[abliterate] {stale} trial(s) a kill interrupted are drawn again")
    space = search_space(cm.n_layers, config.space)
    if not study.trials:
        for params in start_params(cm.n_layers):
            study.enqueue_trial(params)
    import optuna

    def tell(trial, scores: dict) -> None:
        for k in ("refuses", "neither", "substring_refusal", "wall_s"):
            trial.set_user_attr(k, scores[k])
        study.tell(trial, [scores["refusal"], scores["kl"]])
        say(f"[abliterate] trial {trial.number}: refusal {scores['refusal']:.1%}, KL {scores['kl']:.3f} "
            f"({scores['wall_s']:.0f}s)")

    done = lambda: len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))  # noqa: E731
    if config.workers == 0:  # one trial after another, in this process
        while done() < config.trials:
            trial = ask(study, space, cm.n_layers, config)
            tell(trial, scorer(ablation_from(trial.params)))
    else:
        run_on_ray(study, space, cm.n_layers, config, model, ddir, out, tell, done, say)

    trials = trials_frame(study)
    front = pareto_front(trials)
    artifacts.write_csv(out / "trials.csv", trials)
    artifacts.write_csv(out / "front.csv", front)
    plot_front(trials, front, out / "front.png", f"{cm.name}: {len(trials)} trials, {judge.name} judge")
    chosen = choose(trials, config.max_kl)
    ablation = ablation_from({k.removeprefix("param."): v for k, v in chosen.items() if k.startswith("param.")})
    save_ablation(ddir, ablation, chosen_trial=int(chosen.trial), refusal=float(chosen.refusal), kl=float(chosen.kl),
                  rule=f"the fewest refusals among trials with KL <= {config.max_kl}, ties to the lower KL")
    record = {"trial": int(chosen.trial), "refusal": float(chosen.refusal), "kl": float(chosen.kl),
              "ablation": as_dict(ablation), "summary": ablation.summary(), "max_kl": config.max_kl}
    artifacts.write_json(out / "chosen.json", artifacts.run_record(**record))
    say(f"[abliterate] chosen: trial {record['trial']}, refusal {record['refusal']:.1%}, KL {record['kl']:.3f} "
        f"({record['summary']})")

    table = None
    if config.test_table:
        harmful = instructions(builtin_prompts("harmful", "test"))
        harmless = instructions(builtin_prompts("harmless", "test"))
        ref = reference if reference is not None else cm
        replies = cached_reference_replies(out / "reference" / "replies.json", ref, harmless, 64)
        table, details = intervention_table(cm, d, harmful, harmless, max_new_tokens=config.new_tokens,
                                            batch_size=config.batch_size,
                                            borderline=instructions(builtin_prompts("borderline")),
                                            replies=(harmless, replies), texts=builtin_texts("general_text"),
                                            ablation=ablation, addition=False)
        artifacts.write_csv(out / "table.csv", table)
        artifacts.write_text(out / "table.md", to_markdown(table))
    if config.save_adapter:  # from the unedited model
        try:
            record["adapter"] = write_adapter(cm, d, out / "adapter", ablation, rank=config.adapter_rank)
        except RefusalLabError as e:  # e.g. every edited matrix a Conv1D: the model folder is the form
            record["adapter"] = {"written": False, "why": str(e)}
            say(f"[abliterate] no adapter: {e}")
    if config.save_model:
        _, record["model"] = write_abliterated(cm, d, out / "model", ablation, str(ddir))  # in place: closed after
    rec = artifacts.run_record(model=cm.describe(), config=as_dict(config), n_trials=len(trials),
                               front=front[["trial", "refusal", "kl"]].to_dict("records"), chosen=record,
                               table=None if table is None else table.to_dict("records"),
                               trial_wall_s=float(trials.wall_s.sum()) if "wall_s" in trials else None)
    artifacts.write_json(out / "abliterate.json", rec)
    return rec
