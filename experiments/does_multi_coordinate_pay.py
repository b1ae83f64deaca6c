"""Does the multi-coordinate update (I-GCG) lower the loss faster per step, and at what cost per step?

Found: on three held-out prompts of the organism (width 64, 15 steps, AMD EPYC with AVX-512 BF16) the best loss
after 10 steps with multi_coordinate=8 is at or below what 15 steps reach without it, for about 5% more time
per step; it is on by default (docs/results.md#time-to-jailbreak-2026-12-02).

    python experiments/does_multi_coordinate_pay.py [--model organism] [--prompts 3] [--steps 15] [--search-width 64]

One suffix per prompt (the first of harmful:val, default targets; the figures in docs/results.md were made on
every 24th of harmful:test, which overlaps the bench's prompts: the prompts are validation ones since), the target objective, every step
run (no early stop, success by the target match alone), with multi_coordinate 1 and 8; prints s/step and the
best loss after a third, two thirds and all of the steps.
"""
from __future__ import annotations

import argparse

from attacks.gcg import GCG, GCGConfig
from attacks.targets import default_target
from refusal.data import builtin_prompts, instructions
from refusal.registry import load_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--search-width", type=int, default=64)
    args = ap.parse_args(argv)
    cm = load_model(args.model)
    test = instructions(builtin_prompts("harmful", "val"))[: args.prompts]
    marks = sorted({max(1, args.steps // 3), max(1, 2 * args.steps // 3), args.steps})
    for m in (1, 8):
        for i, p in enumerate(test):
            cfg = GCGConfig(steps=args.steps, search_width=args.search_width, multi_coordinate=m,
                            success_check="target", early_stop=False)
            res = GCG(cm, [p], [default_target(p)], cfg).run(progress=False)
            best = [min(res.losses[: k + 1]) for k in range(len(res.losses))]
            after = " / ".join(f"{best[k - 1]:.3f}" for k in marks)
            print(f"multi_coordinate={m} prompt {i + 1}: {res.elapsed_s / res.steps_run:.2f} s/step, best loss after "
                  f"{'/'.join(map(str, marks))} steps {after}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
