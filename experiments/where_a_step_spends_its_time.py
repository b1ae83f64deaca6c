"""Where does a GCG step's wall time go: the token gradient, scoring candidates, checking success (generating
and judging replies), or the rest; for one prompt and for a universal attack with 1, 3 and 6 active prompts?

Found: scoring candidates, always: 93% of a one-prompt step (2.99 s), 69% / 76% / 84% of a universal step
with 1 / 3 / 6 active prompts (4.40 / 12.23 / 24.41 s); generating and judging replies 26% / 20% / 10%;
the token gradient 5-7% (AMD EPYC with AVX-512 BF16, 2 cores; docs/results.md#where-a-step-spends-its-time).

    python experiments/where_a_step_spends_its_time.py [--model organism] [--steps 4] [--out FILE.json]

Settings are the main job's universal attack (width 64, top-k 64, 16 suffix tokens, the judge every step for
several prompts, target+judge for one) on harmful validation prompts; every step runs (no early stop) with
all prompts active from the start, so that each count of active prompts is timed on its own. The native
engine's and nanoGCG's one-prompt steps are timed on the same prompt. Prints a table of seconds per step and
each part's share; writes it as JSON with the machine when --out is given.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import json

from attacks.gcg import STEP_PARTS, GCG, GCGConfig, StepClock
from attacks.reference import run_nanogcg
from attacks.targets import default_target
from refusal.data import builtin_prompts, instructions
from refusal.hardware import machine_info
from refusal.app.pipeline import JobConfig
from refusal.registry import load_model


def split(profile: list[list[float]]) -> dict:
    """Mean seconds per step of each part, skipping the first step (it warms caches up) when there are more."""
    rows = profile[1:] if len(profile) > 1 else profile
    names = STEP_PARTS + ("other",)
    mean = {n: sum(r[i] for r in rows) / len(rows) for i, n in enumerate(names)}
    total = sum(mean.values())
    return dict(s_per_step=round(total, 3), **{f"{n}_s": round(v, 3) for n, v in mean.items()},
                **{f"{n}_share": round(v / total, 3) for n, v in mean.items()})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    cm = load_model(args.model)
    job = JobConfig()
    base = replace(job.attack, steps=args.steps, early_stop=False, progressive=False, judge=job.judge.name,
                   max_time_s=None)
    prompts = instructions(builtin_prompts("harmful", "val"))[:6]
    rows = {}
    one = prompts[0]
    rows["native, 1 prompt (target+judge)"] = split(
        GCG(cm, [one], [default_target(one)], base).run(progress=False).profile)
    rows["nanoGCG, 1 prompt (target match)"] = split(
        run_nanogcg(cm, one, default_target(one), base, clock=StepClock(cm.device)).profile)
    for n in (1, 3, 6):
        cfg = GCGConfig(**{**base.__dict__, "success_check": "judge"})
        res = GCG(cm, prompts[:n], [default_target(p) for p in prompts[:n]], cfg).run(progress=False)
        rows[f"native, universal, {n} active (judge)"] = split(res.profile)
    names = STEP_PARTS + ("other",)
    print("| run | s/step | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for k, r in rows.items():
        print(f"| {k} | {r['s_per_step']:.2f} | " + " | ".join(f"{r[n + '_s']:.2f} ({r[n + '_share']:.0%})"
                                                        for n in names) + " |")
    machine = machine_info(cm.device)
    print(f"machine: {machine}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(rows=rows, machine=machine, steps=args.steps, model=cm.describe()), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
