"""The main job (`refusal run`): each stage reads the previous stage's artifact and is reused if done."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pandas as pd

from . import artifacts
from .data import builtin_prompts, instructions

log = logging.getLogger(__name__)


def main_job(args) -> int:
    """Direction on the built-in sets, then refusal evaluated with and without interventions."""
    from .cli import _load, _seed
    from .data import direction_sets
    from .directions import compute_direction, load_direction, save_direction
    from .hooks import ablate_direction, add_direction
    from .metrics import evaluate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _seed(args.seed)
    cm = _load(args)
    n_train, n_val, n_test, new_tokens = (32, 12, 24, 32) if args.quick else (128, 32, 100, 48)

    ddir = out / "direction"
    if (ddir / "direction.safetensors").is_file():
        log.info("reusing the direction in %s", ddir)
        direction = load_direction(ddir, cm)
    else:
        ht, bt, hv, bv = direction_sets(None, None, n_train, n_val, args.seed)
        direction, diffs, df = compute_direction(cm, ht, bt, hv, bv, batch_size=args.batch_size)
        save_direction(ddir, direction, diffs, df, config={"n_train": n_train, "n_val": n_val, "seed": args.seed})

    edir = out / "eval"
    edir.mkdir(exist_ok=True)
    harmful = instructions(builtin_prompts("harmful", "test"))[:n_test]
    harmless = instructions(builtin_prompts("harmless", "test"))[:n_test]
    conditions = [
        ("harmful", "none", harmful, contextlib.nullcontext),
        ("harmful", "ablation", harmful, lambda: ablate_direction(cm, direction.vector)),
        ("harmless", "none", harmless, contextlib.nullcontext),
        ("harmless", "addition", harmless, lambda: add_direction(cm, direction.mean_diff, direction.layer)),
    ]
    rows = []
    for kind, intervention, prompts, ctx in conditions:
        path = edir / f"{kind}_{intervention}.jsonl"
        if path.is_file():
            df = pd.read_json(path, lines=True)
        else:
            with ctx():
                df = evaluate(cm, prompts, max_new_tokens=new_tokens, batch_size=args.batch_size)
            with artifacts.atomic_path(path) as tmp:
                df.to_json(tmp, orient="records", lines=True, force_ascii=False)
        rows.append({"prompts": kind, "intervention": intervention, "n": len(df),
                     "refusal_rate": round(float(df.refused.mean()), 3),
                     "refusal_score": round(float(df.refusal_score.mean()), 3)})
    summary = pd.DataFrame(rows)
    artifacts.write_csv(edir / "summary.csv", summary)
    artifacts.write_json(out / "run.json", artifacts.run_record(model=cm.describe(), quick=args.quick, seed=args.seed,
                                                                direction={"layer": direction.layer, "position": direction.position}))
    print(summary.to_string(index=False))
    print(f"outputs: {ddir}/ (direction), {edir}/ (completions per condition, summary.csv)")
    return 0
