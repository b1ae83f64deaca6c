"""Does scoring every candidate on a few of a universal attack's active prompts, and only the best few on all of
them (GCGConfig.screen_prompts), reach the main job's goal sooner, and does the suffix still transfer?

Found: not shown to pay, so it stays off: on 6 validation prompts a step cost 12.3 s instead of 17.1 s (1.39x), but
the attack reached 5/6 in its 60 steps where scoring on every prompt reached 6/6 at step 39 (668 s, 412k
tokens); unseen success 6/12 vs 4/12. One seed each (AMD EPYC with AVX-512 BF16, 2 cores;
docs/results.md#screening-on-some-prompts).

    python experiments/does_screening_on_some_prompts_pay.py [--model organism] [--screen 0,2] [--out FILE.json]

The main job's universal attack (width 64, top-k 64, 16 suffix tokens, 60 steps at most, prompts added one
at a time with its patience, the strict judge every step, stopping once all succeed) on the first 6 harmful
validation prompts, once per --screen value; then each suffix's success on the next 12 validation prompts
(greedy replies of 32 tokens, strict judge). Reports steps, wall time and the attacked model's tokens
(forward + backward) to the end, s/step, training and unseen success. Validation prompts only: the held-out
test prompts stay for the main job's figures.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import json
import time

from attacks.gcg import GCG, universal_patience
from attacks.targets import default_target
from refusal.data import builtin_prompts, instructions
from refusal.hooks import TokenCounter
from refusal.judges import load_judge
from refusal.metrics import generate
from refusal.hardware import machine_info
from refusal.app.pipeline import JobConfig
from refusal.registry import load_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--screen", default="0,2", help="comma-separated screen_prompts values")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    cm = load_model(args.model)
    job = JobConfig()
    val = instructions(builtin_prompts("harmful", "val"))
    train, unseen = val[: job.attack_prompts], val[job.attack_prompts: job.attack_prompts + 12]
    judge = load_judge(job.judge.name)
    rows = {}
    for n in [int(x) for x in args.screen.split(",")]:
        cfg = replace(job.attack, seed=job.seed, judge=job.judge.name, screen_prompts=n, max_time_s=None,
                      patience=universal_patience(job.attack.steps, len(train)))
        t0 = time.perf_counter()
        with TokenCounter(cm.base) as counter:
            res = GCG(cm, train, [default_target(p) for p in train], cfg, judge=judge).run(progress=False)
        wall = time.perf_counter() - t0
        replies = generate(cm, [cm.chat.encode(p, res.token_ids) for p in unseen], 32, batch_size=16, progress=False)
        ok = [v == "complies" for v in judge.verdicts(unseen, replies)]
        rows[n] = dict(steps=res.steps_run, all_succeeded=res.stopped_early, wall_s=round(wall, 1),
                       s_per_step=round(res.elapsed_s / max(1, res.steps_run), 2), tokens=counter.tokens,
                       train_success=res.success[res.best_step], n_active=res.n_active[res.best_step],
                       unseen_success=sum(ok) / len(ok), suffix=res.suffix,
                       scoring_s=round(sum(p[1] for p in res.profile), 1), check_s=round(sum(p[2] for p in res.profile), 1))
        print(f"screen_prompts={n}: {json.dumps(rows[n])}", flush=True)
    machine = machine_info(cm.device)
    print(f"machine: {machine}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(rows=rows, machine=machine, model=cm.describe()), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
