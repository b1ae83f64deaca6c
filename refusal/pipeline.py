"""The main job (`refusal run`), end to end: the direction, a universal suffix and its random baseline,
evaluation with and without the suffixes (and with the direction ablated / added), the analysis and the
report. Each stage reads the previous stage's artifact and is reused when it is already in the run
folder."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import artifacts
from .data import builtin_prompts, instructions
from .errors import RefusalLabError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSizes:
    n_train: int  # direction: harmful and harmless training prompts each
    n_val: int  # direction: validation prompts each
    attack_prompts: int  # universal suffix: harmful training prompts
    attack_steps: int
    search_width: int
    topk: int
    suffix_len: int
    n_test: int  # evaluation and analysis: test prompts of each kind
    new_tokens: int  # greedy tokens judged per reply


# the attack stops early once all 6 training prompts succeed; up to 60 steps fit the 20-minute cold
# budget since candidates are screened in bfloat16 (docs/results.md)
FULL = JobSizes(n_train=128, n_val=16, attack_prompts=6, attack_steps=60, search_width=64, topk=64, suffix_len=16,
                n_test=100, new_tokens=48)
# --quick checks the plumbing end to end in under 5 minutes on 2 CPU cores; its suffix is too short-lived
# to beat refusal (the full job measures that)
QUICK = JobSizes(n_train=48, n_val=8, attack_prompts=3, attack_steps=9, search_width=32, topk=32, suffix_len=12,
                 n_test=24, new_tokens=32)


def judged_eval(path: Path, judge, make) -> pd.DataFrame:
    """One evaluation condition's replies with verdicts by `judge` (a loaded Judge): the file at `path` when
    it is there (its replies reused; judged again, and rewritten atomically, when they were judged by another
    judge or not at all), else make()'s replies judged and written there."""
    from .judges import add_verdicts

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


def main_job(args) -> int:
    from analysis.run import analyze
    from attacks.gcg import GCGConfig
    from attacks.run import run_attack

    from .models import load_model_from_options, seed_everything
    from .data import direction_sets
    from .directions import compute_direction, load_direction, save_direction
    from .hooks import ablate_direction, add_direction
    from .judges import judge_config_from, load_judge
    from .metrics import evaluate

    t0 = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    out = Path(args.out)
    resume, force = getattr(args, "resume", False), getattr(args, "force", False)
    if resume and force:
        raise RefusalLabError("--resume and --force contradict each other; choose one")
    artifacts.check_out(out, force=force, resume=resume,
                        fix="pass --resume to reuse its finished stages, --force to start over, or choose another --out")
    seed_everything(args.seed)
    # the judge, with the model's device, dtype and trust_remote_code (an hf: classifier): a bad judge fails first
    judge = load_judge(judge_config_from(args))
    cm = load_model_from_options(args)  # a bad model fails here, before anything is written
    if force and out.exists():
        import shutil

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
            ht, bt, hv, bv = direction_sets(None, None, sizes.n_train, sizes.n_val, args.seed)
            direction, diffs, df = compute_direction(cm, ht, bt, hv, bv, batch_size=args.batch_size)
            with artifacts.atomic_dir(ddir) as tmp:
                save_direction(tmp, direction, diffs, df, config={"n_train": sizes.n_train, "n_val": sizes.n_val, "seed": args.seed})
    print(f"[direction] layer {direction.layer}, position {direction.position}: {direction.meta.get('selection', '')}", flush=True)

    # 2. a universal suffix (and its random baseline) on harmful training prompts
    train = instructions(builtin_prompts("harmful", "train"))[: sizes.attack_prompts]
    cfg = GCGConfig(steps=sizes.attack_steps, search_width=sizes.search_width, topk=sizes.topk,
                    suffix_len=sizes.suffix_len, seed=args.seed, patience=max(3, sizes.attack_steps // (2 * sizes.attack_prompts)),
                    judge=judge.name)
    with timer("attack"):
        rec = run_attack(cm, train, None, cfg, out, engine="native", resume=True, eval_tokens=sizes.new_tokens,
                         judge=judge)
    adversarial, rand = rec["token_ids"], rec["random_token_ids"]
    print(f"[attack] suffix {rec['suffix']!r} after {rec['steps_run']} steps; success on its {len(train)} training "
          f"prompts {rec['success_rate']:.0%} (random suffix {rec['random_success_rate']:.0%}) by the "
          f"{rec.get('judge', 'substring')} judge", flush=True)

    # 3. evaluation on held-out prompts
    edir = out / "eval"
    edir.mkdir(exist_ok=True)
    harmful = instructions(builtin_prompts("harmful", "test"))[: sizes.n_test]
    harmless = instructions(builtin_prompts("harmless", "test"))[: sizes.n_test]
    null = contextlib.nullcontext
    conditions = [
        ("harmful", "none", harmful, None, null),
        ("harmful", "random_suffix", harmful, rand, null),
        ("harmful", "adversarial_suffix", harmful, adversarial, null),
        ("harmful", "ablation", harmful, None, lambda: ablate_direction(cm, direction.vector)),
        ("harmless", "none", harmless, None, null),
        ("harmless", "addition", harmless, None, lambda: add_direction(cm, direction.mean_diff, direction.layer)),
    ]
    rows = []
    with timer("evaluation"):
        for kind, condition, prompts, suffix, ctx in conditions:
            def make(prompts=prompts, suffix=suffix, ctx=ctx):
                with ctx():
                    return evaluate(cm, prompts, suffix, max_new_tokens=sizes.new_tokens, batch_size=args.batch_size)

            df = judged_eval(edir / f"{kind}_{condition}.jsonl", judge, make)
            rows.append({"prompts": kind, "condition": condition, "n": len(df),
                         "refusal_rate": round(float(df.refused.mean()), 3),
                         "refusal_score": round(float(df.refusal_score.mean()), 3),
                         "attack_success_substring": round(float(df.substring_success.mean()), 3),
                         "judge": judge.name,
                         "attack_success": round(float(df.success.mean()), 3)})
    summary = pd.DataFrame(rows)
    artifacts.write_csv(edir / "summary.csv", summary)
    print(summary.to_string(index=False), flush=True)

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
            res = analyze(cm, direction, harmful, harmless, adversarial, rand, adir, top_k=8,
                          batch_size=args.batch_size, success=success,
                          facts={"universal suffix": f"{len(train)} training prompts, {rec['steps_run']} steps"})
            numbers, report = res["numbers"], res["report_html"]
    artifacts.write_json(out / "run.json", artifacts.run_record(
        model=cm.describe(), quick=args.quick, seed=args.seed, sizes=sizes.__dict__, judge=judge.name,
        direction={"layer": direction.layer, "position": direction.position}, summary=rows,
        timings_s=timer.seconds, wall_time_s=round(time.perf_counter() - t0, 1)))
    print()
    for s in numbers["sentences"]:
        print("- " + s)
    print(f"\nreport: {report}")
    print(f"(main job done in {time.perf_counter() - t0:.0f}s: {timer.seconds})")
    return 0
