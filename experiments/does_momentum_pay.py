"""Does momentum on the token gradient (MAC, Zhang & Wei 2024: candidates sampled from mu * the previous step's
sampling gradient + (1 - mu) * this step's, `GCGConfig.momentum`) shorten the native engine's time to a jailbreak
at the model's precision?

Found: no. On 8 validation prompts at the model's precision (float32) MAC's 0.4 looked faster (8/8 both; time to
success summed 392 s against 327 s without and with it, faster on 5 prompts, slower on 2), but on the bench's 12
held-out test prompts, same machine and settings, it was slower (12/12 both; 616 s against 954 s summed, the
slowest prompt 145 s against 406 s, tokens 258,212 against 332,114; slower on 9 of 12), so it stays off by default
(Intel Xeon, family 6 model 106, AVX-512 without BF16 or AMX, 2 cores; docs/results.md#momentum-on-the-token-gradient).

    python experiments/does_momentum_pay.py run [--prompts 8] [--momentum 0,0.4] [--out-dir D]
    python experiments/does_momentum_pay.py report [--out-dir D]

The bench's per-prompt rows (`refusal bench`'s defaults: the bare "Sure, here is" target, width 64, 100 steps and
600 s per row, the strict judge on 32 greedy tokens, check_matched 8) of the native engine at the model's
precision (native_model_precision) alone, once per --momentum value, on the first --prompts harmful *validation*
prompts in the order of the validation split shuffled with seed 0 (the held-out test prompts stay for the bench's
figures). mu = 0.4 is MAC's own value for single-prompt attacks, chosen before any run here. The arms are run
prompt by prompt, interleaved, each a bench of its own under --out-dir (`momentum-MU.json`) run with --resume: a
killed run continues, and a larger --prompts adds prompts.
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


def arm(out_dir: Path, mu: float) -> Path:
    return out_dir / f"momentum-{mu:g}.json"


def run(args) -> None:
    cm = load_model(args.model)
    prompts_file = validation_prompts_file(Path(args.out_dir) / "val.txt")
    for n in range(1, args.prompts + 1):  # interleaved: both arms' rows of a prompt on the same machine state
        for mu in args.momentum:
            attack = replace(BENCH_CONFIG, momentum=mu, judge=JudgeConfig.of("strict"))
            config = BenchConfig(prompts=n, prompts_from=str(prompts_file), engines=ENGINE, attack=attack)
            out = arm(Path(args.out_dir), mu)
            print(f"momentum {mu:g}, prompt {n}: {out}", flush=True)
            run_bench(cm, config, out, progress=lambda m: print(m, flush=True), resume=True)


def report(args) -> None:
    arms = [(f"momentum {mu:g}", arm(Path(args.out_dir), mu)) for mu in args.momentum]
    print("\n".join(compare_arms(arms, ENGINE)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("run", "report"))
    ap.add_argument("--model", default="organism")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--momentum", default="0,0.4", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--out-dir", default="runs/momentum")
    args = ap.parse_args(argv)
    try:
        run(args) if args.what == "run" else report(args)
    except RefusalLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
