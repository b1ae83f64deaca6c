"""Does judging more of a step's candidates whose greedy reply begins with the target (GCGConfig.check_matched:
the chosen one and the next by loss, in one batched generation; a complying one becomes the suffix) shorten the
native engine's time to a jailbreak at the model's precision?

Found: yes, so it is on by default (check_matched 8): on 4 validation prompts, at the model's precision (float32),
both arms broke 4/4; the time to success summed 852 s with the chosen candidate alone and 406 s with 8 judged
(tokens 291,624 and 137,166); the two slowest prompts fell from 344 s to 33 s and from 432 s to 306 s, the two
fastest stayed (AMD EPYC with AVX-512 BF16, 2 cores; docs/results.md#judging-matched-candidates).

    python experiments/does_judging_matched_candidates_pay.py run [--prompts 4] [--check-matched 1,8] [--out-dir D]
    python experiments/does_judging_matched_candidates_pay.py report [--out-dir D]

The bench's per-prompt rows (`refusal bench`'s defaults: the bare "Sure, here is" target, width 64, 100 steps and
600 s per row, the strict judge on 32 greedy tokens), the native engine at the model's precision
(native_model_precision) alone, once per --check-matched value, on the first --prompts harmful *validation*
prompts in the order of the validation split shuffled with seed 0 (the held-out test prompts stay for the
bench's figures). Each arm is a bench of its own under --out-dir (`checked-K.json`), run with --resume: a killed
run continues, and a larger --prompts adds prompts.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from refusal.errors import RefusalLabError
from refusal.judges import JudgeConfig
from refusal.registry import load_model
from refusal.app.bench import BENCH_CONFIG, BenchConfig, compare_arms, run_bench, validation_prompts_file

ENGINE = "native_model_precision"


def arm(out_dir: Path, k: int) -> Path:
    return out_dir / f"checked-{k}.json"


def run(args) -> None:
    cm = load_model(args.model)
    prompts_file = validation_prompts_file(Path(args.out_dir) / "val.txt")
    for k in args.check_matched:
        attack = replace(BENCH_CONFIG, check_matched=k, judge=JudgeConfig.of("strict"))
        config = BenchConfig(prompts=args.prompts, prompts_from=str(prompts_file), engines=ENGINE, attack=attack)
        out = arm(Path(args.out_dir), k)
        print(f"check_matched {k}: {out}", flush=True)
        run_bench(cm, config, out, progress=lambda m: print(m, flush=True), resume=True)


def report(args) -> None:
    arms = [(f"check_matched {k}", arm(Path(args.out_dir), k)) for k in args.check_matched]
    print("\n".join(compare_arms(arms, ENGINE)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("run", "report"))
    ap.add_argument("--model", default="organism")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--check-matched", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--out-dir", default="runs/check-matched")
    args = ap.parse_args(argv)
    try:
        run(args) if args.what == "run" else report(args)
    except RefusalLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
