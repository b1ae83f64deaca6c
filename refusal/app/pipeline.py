"""The main job (`refusal run`), end to end: the direction (and the harmfulness direction the analysis also
reads), a universal suffix and its random baseline, evaluation with and without the suffixes (and with the
direction ablated / added), the analysis and the report. Each stage reads the previous stage's artifact
and is reused when it is already in the run folder."""
from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pandas as pd

from attacks.gcg import GCGConfig, universal_patience
from refusal.app.analyze import AnalysisConfig, analyze
from refusal.app.attack import run_attack

from refusal import artifacts
from refusal.config import as_dict, check_fields, option
from refusal.data import builtin_prompts, instructions
from refusal.directions import DirectionConfig, load_direction
from refusal.methods import find_direction
from refusal.errors import RefusalLabError
from refusal.hooks import ablate_direction, add_direction
from refusal.judges import Judge, JudgeConfig, add_verdicts, load_judge
from refusal.metrics import evaluate
from refusal.models import ChatModel, seed_everything

log = logging.getLogger(__name__)

# the main job's attack where it differs from GCGConfig's defaults: a shorter, narrower universal attack with a
# time budget, so that a cold main job on 2 CPU cores computing in float32 ends within 20 minutes
JOB_ATTACK = dict(steps=60, search_width=64, topk=64, suffix_len=16, max_time_s=240.0)


@dataclass(frozen=True)
class JobConfig:
    """The main job: the direction's and the universal suffix's settings, the sizes of the evaluation and
    analysis (the full job's by default; JobConfig.quick() for a fast look), one seed and one judge for all
    of it."""

    direction: DirectionConfig = option(help="the direction (its seed and batch size are the job's)",
                                        factory=DirectionConfig)
    attack: GCGConfig = option(help="the universal suffix (its seed and judge are the job's; its patience, where 0, "
                                    "the steps shared among the prompts: attacks.gcg.universal_patience; it stops at "
                                    "60 steps or once a step ends past 240 s, --attack-max-time-s)",
                               factory=lambda: replace(GCGConfig(), **JOB_ATTACK))
    attack_prompts: int = option(6, "universal suffix: harmful training prompts it is optimized on", ge=1)
    n_test: int = option(100, "evaluation and analysis: held-out test prompts of each kind", ge=1)
    new_tokens: int = option(48, "greedy reply tokens judged per reply", ge=1)
    top_k: int = option(8, "analysis: refusal heads", ge=1)
    batch_size: int = option(32, "prompts per forward pass", ge=1)
    seed: int = option(0, "seed of the direction's prompt sampling, the attack and the random suffix", ge=0)
    judge: JudgeConfig = option(help="the judge of attack success (refusal.judges.JudgeConfig)", factory=JudgeConfig)
    resume: bool = option(False, "reuse the stages already finished in the run folder (and continue the attack)")
    force: bool = option(False, "delete the run folder and start over")

    @classmethod
    def quick(cls, **changes) -> "JobConfig":
        """The quick job: smaller sets and a short attack, under 5 minutes on 2 CPU cores with the organism
        cached: its suffix moves the direction and the heads' attention (docs/results.md), but is too
        short-lived to beat refusal on most prompts."""
        return cls(**{**quick_sizes(), **changes})

    @property
    def is_quick(self) -> bool:
        return all(getattr(self, k) == v for k, v in quick_sizes().items())

    def validate(self) -> None:
        check_fields(self)
        if self.resume and self.force:
            raise RefusalLabError("--resume and --force contradict each other; choose one")


def quick_sizes() -> dict:
    """The quick job's fields (QUICK_SIZES, the nested configs' fields under their config's name)."""
    return dict(direction=replace(DirectionConfig(), **QUICK_SIZES["direction"]),
                attack=replace(GCGConfig(), **{**JOB_ATTACK, **QUICK_SIZES["attack"]}),
                **{k: v for k, v in QUICK_SIZES.items() if k not in ("direction", "attack")})


QUICK_SIZES = dict(direction=dict(n_train=48, n_val=8), attack=dict(steps=9, search_width=32, topk=32, suffix_len=12),
                   attack_prompts=3, n_test=24, new_tokens=32)


def judged_eval(path: Path, judge, make) -> pd.DataFrame:
    """One evaluation condition's replies with verdicts by `judge` (a loaded Judge): the file at `path` when
    it is there (its replies reused; judged again, and rewritten atomically, when they were judged by another
    judge or not at all), else make()'s replies judged and written there."""
    path = Path(path)
    if path.is_file():
        df = pd.read_json(path, lines=True, dtype=False)
        if "judge" in df and set(df.judge) == {judge.name}:
            return df
        log.info("%s: replies reused, judged again by the %s judge", path, judge.name)
    else:
        df = make()
    add_verdicts(df, judge)  # substring_success (the paper's judge), judge, verdict, success (by the judge)
    with artifacts.atomic_path(path) as tmp:
        df.to_json(tmp, orient="records", lines=True, force_ascii=False)
    return df


def same_success(a: dict | None, b: dict | None, tol: float = 1e-9) -> bool:
    """Whether two {judge: {condition: rate}} tables name the same judges and conditions with the same rates."""
    if not isinstance(a, dict) or not isinstance(b, dict) or a.keys() != b.keys():
        return False
    for judge, rates in a.items():
        other = b[judge]
        if not isinstance(rates, dict) or not isinstance(other, dict) or rates.keys() != other.keys():
            return False
        for k, v in rates.items():
            try:
                if not math.isclose(float(v), float(other[k]), rel_tol=0.0, abs_tol=tol):
                    return False
            except (TypeError, ValueError):
                return False
    return True


def analysis_is_current(adir: Path, success: dict) -> bool:
    """Whether `adir` holds a finished analysis (report.html and analysis.json) that states these attack
    success rates (same_success: the same judges, conditions and rates); otherwise it is made again."""
    adir = Path(adir)
    if not ((adir / "report.html").is_file() and (adir / "analysis.json").is_file()):
        return False
    try:
        headline = artifacts.read_json(adir / "analysis.json").get("headline") or {}
    except (RefusalLabError, AttributeError):
        return False
    return isinstance(headline, dict) and "sentences" in headline and same_success(headline.get("success"), success)


def check_job(config: JobConfig, out: str | Path) -> Judge:
    """The main job's checks before a model loads (by the CLI and by main_job): the config valid, the run
    folder usable with its resume/force, and the judge, which it returns loaded."""
    config.validate()
    artifacts.check_out(Path(out), force=config.force, resume=config.resume,
                        fix="pass --resume to reuse its finished stages, --force to start over, or choose another --out")
    return load_judge(config.judge)  # loaded once per process: main_job's call reuses it


def main_job(cm: ChatModel, config: JobConfig, out: str | Path, progress: Callable[[str], None] | None = None) -> dict:
    """The main job on a loaded model, written to `out`: the direction, a universal suffix and its random
    baseline, the evaluation on held-out prompts, the analysis and its report. Stages already finished in
    `out` are reused with config.resume. Returns the run record (also written to out/run.json), with
    `sentences` (the headline) and `report` (the HTML report's path). `progress` receives a line per finished
    stage (default: the log)."""
    say = progress or log.info
    t0 = time.perf_counter()
    out = Path(out)
    judge = check_job(config, out)  # a bad config, folder or judge fails before anything is written
    seed_everything(config.seed)
    if config.force and out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    timer = artifacts.Timer()

    # 1. the direction
    ddir = out / "direction"
    with timer("direction"):
        if (ddir / "direction.safetensors").is_file():
            log.info("reusing the direction in %s", ddir)
            direction = load_direction(ddir, cm)
        else:
            direction = find_direction(cm, replace(config.direction, seed=config.seed, batch_size=config.batch_size),
                                       ddir)
    say(f"[direction] layer {direction.layer}, position {direction.position}: {direction.meta.get('selection', '')}")
    # the harmfulness direction (Zhao et al.) on the same prompts, for the analysis: does the suffix lower
    # refusal while the user turn's last token still reads "harmful"?
    hdir = out / "harmfulness"
    with timer("harmfulness"):
        if (hdir / "direction.safetensors").is_file():
            harmfulness = load_direction(hdir, cm)
        else:
            harmfulness = find_direction(cm, replace(config.direction, method="harmfulness", k=None, construction="best",
                                                     layer=None, position=None, seed=config.seed,
                                                     batch_size=config.batch_size), hdir)
    say(f"[harmfulness] layer {harmfulness.layer}, the instruction's last token")

    # 2. a universal suffix (and its random baseline) on harmful training prompts
    train = instructions(builtin_prompts("harmful", "train"))[: config.attack_prompts]
    cfg = replace(config.attack, seed=config.seed, judge=config.judge,
                  patience=config.attack.patience or universal_patience(config.attack.steps, config.attack_prompts))
    with timer("attack"):
        rec = run_attack(cm, train, None, cfg, out, engine="native", resume=True, eval_tokens=config.new_tokens,
                         judge=judge)
    adversarial, rand = rec["token_ids"], rec["random_token_ids"]
    budget = cfg.max_time_s is not None and not rec["stopped_early"] and rec["steps_run"] < cfg.steps
    say(f"[attack] suffix {rec['suffix']!r} after {rec['steps_run']} steps"
        f"{f' (its time budget of {cfg.max_time_s:g} s reached)' if budget else ''}; success on its {len(train)} training "
        f"prompts {rec['success_rate']:.0%} (random suffix {rec['random_success_rate']:.0%}) by the "
        f"{rec.get('judge', 'substring')} judge")

    # 3. evaluation on held-out prompts
    edir = out / "eval"
    edir.mkdir(exist_ok=True)
    harmful = instructions(builtin_prompts("harmful", "test"))[: config.n_test]
    harmless = instructions(builtin_prompts("harmless", "test"))[: config.n_test]
    null = contextlib.nullcontext
    conditions = [
        ("harmful", "none", harmful, None, null),
        ("harmful", "random_suffix", harmful, rand, null),
        ("harmful", "adversarial_suffix", harmful, adversarial, null),
        ("harmful", "ablation", harmful, None, lambda: ablate_direction(cm, direction.ablated)),
        ("harmless", "none", harmless, None, null),
        ("harmless", "addition", harmless, None, lambda: add_direction(cm, direction.mean_diff, direction.layer)),
    ]
    rows = []
    with timer("evaluation"):
        for kind, condition, prompts, suffix, ctx in conditions:
            def make(prompts=prompts, suffix=suffix, ctx=ctx):
                with ctx():
                    return evaluate(cm, prompts, suffix, max_new_tokens=config.new_tokens, batch_size=config.batch_size,
                                    placement=cfg.placement)

            df = judged_eval(edir / f"{kind}_{condition}.jsonl", judge, make)
            rows.append({"prompts": kind, "condition": condition, "n": len(df),
                         "refusal_rate": round(float(df.refused.mean()), 3),
                         "refusal_score": round(float(df.refusal_score.mean()), 3),
                         "attack_success_substring": round(float(df.substring_success.mean()), 3),
                         "judge": judge.name,
                         "attack_success": round(float(df.success.mean()), 3)})
    summary = pd.DataFrame(rows)
    artifacts.write_csv(edir / "summary.csv", summary)
    say(summary.to_string(index=False))

    # 4. analysis and report
    # attack success by the substring judge (the paper's) and by the chosen one, side by side
    attacked = [r for r in rows if r["prompts"] == "harmful" and r["condition"] in ("none", "random_suffix", "adversarial_suffix")]
    name = lambda r: r["condition"] if r["condition"] != "none" else "no_suffix"  # noqa: E731
    success = {"substring": {name(r): r["attack_success_substring"] for r in attacked},
               judge.name: {name(r): r["attack_success"] for r in attacked}}
    adir = out / "analysis"
    with timer("analysis"):
        if analysis_is_current(adir, success):  # made with the same judges and the same success rates
            numbers, report = artifacts.read_json(adir / "analysis.json")["headline"], adir / "report.html"
        else:
            res = analyze(cm, direction, harmful, harmless, adversarial, rand, adir,
                          AnalysisConfig(top_k=config.top_k, batch_size=config.batch_size), success=success,
                          placement=cfg.placement, harmfulness=harmfulness,
                          facts={"universal suffix": f"{len(train)} training prompts, {rec['steps_run']} steps"})
            numbers, report = res["numbers"], res["report_html"]
    record = artifacts.run_record(
        model=cm.describe(), quick=config.is_quick, seed=config.seed, config=as_dict(config), judge=judge.name,
        direction={"layer": direction.layer, "position": direction.position}, summary=rows,
        timings_s=timer.seconds, wall_time_s=round(time.perf_counter() - t0, 1))
    artifacts.write_json(out / "run.json", record)
    log.info("main job done in %.0fs: %s", time.perf_counter() - t0, timer.seconds)
    return {**record, "sentences": numbers["sentences"], "report": str(report)}
