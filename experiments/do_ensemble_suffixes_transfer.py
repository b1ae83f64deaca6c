"""Does a universal suffix optimised on two organisms (the GCG paper's transfer recipe) break held-out organisms
more often than one optimised on one organism, at equal steps and at equal tokens?

Found: no, not at 30 steps on the organisms: on held-out organisms (seeds 2 and 3, 24 held-out prompts each)
the seed-0 suffix broke 12/48 at equal steps and 9/48 at equal tokens, the seeds-0+1 suffix 6/48 (strict judge;
random 0/48); within noise, but the ensemble did not help (docs/results.md).

    python experiments/do_ensemble_suffixes_transfer.py train      # both attacks, resumable
    python experiments/do_ensemble_suffixes_transfer.py evaluate   # the transfer matrix, resumable
    python experiments/do_ensemble_suffixes_transfer.py report

train: one universal suffix over the first --train harmful training prompts (target objective, width 64,
20-token suffix, prompts added as they succeed by the strict judge, seed 0, every step run), on the
organism of seed 0 alone and on the organisms of seeds 0 and 1 together (`--ensemble organism:1`), for
--steps steps each; the seed-0 attack then runs on until it has spent as many tokens as the ensemble
(forward and backward tokens of every model, counted as the bench counts them, success checks included).
Organisms of other seeds are built on first use (about 5 minutes each on 2 cores).
evaluate: each suffix (seed 0 at equal steps, seed 0 at equal tokens, seeds 0+1, a random suffix of the same
length, none) on the held-out harmful test prompts (the first --test of a fixed spread), greedy 48-token
replies judged by the strict and the substring judge, on the organisms of seeds 0 and 1 (trained on) and 2
and 3 (held out). The best suffix of an attack up to a step is the engine's own rule (most prompts active,
then the highest success rate, then the lowest loss).
Everything lands under runs/ensemble-transfer/ (uncommitted).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.report import write_report
from attacks.gcg import GCG, GCGConfig
from attacks.targets import default_target
from refusal import artifacts
from refusal.data import builtin_prompts, instructions
from refusal.errors import RefusalLabError
from refusal.hardware import machine_info, machine_line
from refusal.hooks import TokenCounter
from refusal.judges import load_judge
from refusal.registry import load_model
from refusal.success import suffix_success
from refusal.suffix import random_suffix_ids

OUT = Path("runs/ensemble-transfer")
WIDTH, SUFFIX_LEN, REPLY_TOKENS = 64, 20, 48
ARMS = {"seed 0": (), "seeds 0+1": ("organism:1",)}
MODELS = ("organism", "organism:1", "organism:2", "organism:3")
HELD_OUT = ("organism:2", "organism:3")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(s) for s in path.read_text().splitlines() if s.strip()] if path.is_file() else []


def config(steps: int, ensemble: tuple[str, ...]) -> GCGConfig:
    return GCGConfig(steps=steps, search_width=WIDTH, suffix_len=SUFFIX_LEN, early_stop=False, judge="strict",
                     seed=0, ensemble=ensemble)


def attack(name: str, train: list[str], steps: int, out: Path, stop_at_tokens: int | None = None,
           min_steps: int = 0) -> None:
    """One arm, resumable: the checkpoint, and each step's cumulative tokens in tokens.jsonl; it stops early
    once it has run min_steps and spent stop_at_tokens."""
    folder = out / name.replace(" ", "_").replace("+", "-")
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "tokens.jsonl"
    done = read_jsonl(log)
    if (folder / "done").is_file():
        return
    cm = load_model("organism")
    members = [load_model(m) for m in ARMS[name]]
    counters = [TokenCounter(m.base) for m in (cm, *members)]
    base = done[-1]["tokens"] if done else 0
    g = GCG(cm, train, [default_target(i) for i in train], config(steps, ARMS[name]), ensemble=members)

    def on_step(info):
        tokens = base + sum(c.tokens for c in counters)
        with log.open("a") as f:
            f.write(json.dumps(dict(step=info["step"], tokens=tokens, loss=info["loss"], success=info["success"],
                                    n_active=info["n_active"], suffix=info["suffix"],
                                    elapsed_s=round(info["elapsed_s"], 2))) + "\n")
        print(f"{name} step {info['step']}: loss {info['loss']:.3f} success {info['success']:.2f} "
              f"active {info['n_active']} tokens {tokens}", flush=True)
        if stop_at_tokens is not None and info["step"] + 1 >= min_steps and tokens >= stop_at_tokens:
            raise StopIteration

    with contextlib.ExitStack() as stack:
        for c in counters:
            stack.enter_context(c)
        try:
            g.run(checkpoint=folder / "checkpoint.json", resume=True, on_step=on_step, progress=False)
        except StopIteration:
            pass
    (folder / "done").touch()


def train_arms(args) -> None:
    out = Path(args.out)
    train = instructions(builtin_prompts("harmful", "train"))[: args.train]
    artifacts.write_json(out / "meta.json", dict(machine=machine_info(), train=train, steps=args.steps, width=WIDTH,
                                                 suffix_len=SUFFIX_LEN, arms={k: list(v) for k, v in ARMS.items()}))
    t0 = time.perf_counter()
    attack("seeds 0+1", train, args.steps, out)
    ens = read_jsonl(out / "seeds_0-1" / "tokens.jsonl")
    # the one-model arm: as many steps, then on until it has spent the ensemble's tokens (at most 4x the steps)
    attack("seed 0", train, 4 * args.steps, out, stop_at_tokens=ens[-1]["tokens"], min_steps=args.steps)
    print(f"trained in {time.perf_counter() - t0:.0f}s")


def best_until(rows: list[dict], last_step: int) -> dict:
    """The engine's best suffix over steps 0..last_step: most prompts active, then success, then loss."""
    pool = [r for r in rows if r["step"] <= last_step]
    return max(pool, key=lambda r: (r["n_active"], r["success"], -r["loss"]))


def suffixes(out: Path, steps: int) -> dict[str, dict]:
    ens = read_jsonl(out / "seeds_0-1" / "tokens.jsonl")
    one = read_jsonl(out / "seed_0" / "tokens.jsonl")
    if not ens or not one or not (out / "seed_0" / "done").is_file():
        raise RefusalLabError(f"{out}: the attacks are not finished; run `train` first")
    budget = ens[-1]["tokens"]
    at_tokens = next((r["step"] for r in one if r["tokens"] >= budget), one[-1]["step"])
    out = {}
    for name, rows, last in (("seed 0, equal steps", one, steps - 1), ("seed 0, equal tokens", one, at_tokens),
                             ("seeds 0+1", ens, steps - 1)):
        by_step = {r["step"]: r for r in rows}
        last = min(last, max(by_step))
        out[name] = dict(best_until(rows, last), steps_run=last + 1, tokens_spent=by_step[last]["tokens"])
    return out


def evaluate(args) -> None:
    out = Path(args.out)
    meta = artifacts.read_json(out / "meta.json")
    picks = suffixes(out, meta["steps"])
    test = instructions(builtin_prompts("harmful", "test"))
    test = (test[::max(1, len(test) // args.test)] + test)[: args.test]
    path = out / "eval.jsonl"
    done = {(r["suffix_name"], r["model"]) for r in read_jsonl(path)}
    judge = load_judge("strict")
    for model in MODELS:
        if all((s, model) in done for s in (*picks, "random", "none")):
            continue
        cm = load_model(model)
        named = {k: cm.tokenizer(v["suffix"], add_special_tokens=False).input_ids for k, v in picks.items()}
        named["random"] = random_suffix_ids(cm, SUFFIX_LEN, seed=1)
        named["none"] = None
        for name, ids in named.items():
            if (name, model) in done:
                continue
            df = suffix_success(cm, test, ids, REPLY_TOKENS, progress=False, judge=judge)
            row = dict(suffix_name=name, model=model, held_out=model in HELD_OUT, n=len(test),
                       strict=float(df["success"].mean()), substring=float(df["substring_success"].mean()),
                       suffix=cm.tokenizer.decode(ids) if ids is not None else None,
                       tokens_spent=picks.get(name, {}).get("tokens_spent"),
                       steps_run=picks.get(name, {}).get("steps_run"), best_step=picks.get(name, {}).get("step"))
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name} on {model}: strict {row['strict']:.3f} substring {row['substring']:.3f}", flush=True)


def report(args) -> None:
    from refusal.app.plots import pyplot, save_figure
    out = Path(args.out)
    rows = read_jsonl(out / "eval.jsonl")
    if not rows:
        raise RefusalLabError(f"{out}/eval.jsonl: nothing evaluated yet; run `evaluate` first")
    names = list(dict.fromkeys(r["suffix_name"] for r in rows))
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    cell = {(r["suffix_name"], r["model"]): r for r in rows}
    for judge in ("strict", "substring"):
        print(f"\nSuccess on {rows[0]['n']} held-out test prompts by the {judge} judge (models 2, 3 held out):\n")
        print("| suffix | steps | tokens | " + " | ".join(models) + " | held-out mean |")
        print("|---|---|---|" + "---|" * len(models) + "---|")
        for n in names:
            vals = [cell[(n, m)][judge] if (n, m) in cell else float("nan") for m in models]
            held = [cell[(n, m)][judge] for m in HELD_OUT if (n, m) in cell]
            r0 = cell.get((n, models[0]), {})
            print(f"| {n} | {r0.get('steps_run') or ''} | {r0.get('tokens_spent') or ''} | "
                  + " | ".join(f"{v:.3f}" for v in vals) + f" | {sum(held) / max(1, len(held)):.3f} |")
    plt, sns = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    grid = np.array([[cell[(n, m)]["strict"] if (n, m) in cell else np.nan for m in models] for n in names])
    sns.heatmap(grid, annot=True, fmt=".2f", cmap="rocket_r", vmin=0, vmax=1, ax=ax,
                xticklabels=[f"seed {m.partition(':')[2] or 0}" + ("\n(held out)" if m in HELD_OUT else "\n(trained on)")
                             for m in models], yticklabels=names)
    ax.tick_params(axis="x", rotation=0)
    ax.set_title("universal suffix success on held-out test prompts, by organism (strict judge)", fontsize=9)
    fig_path = save_figure(fig, out / "transfer.png")
    meta = artifacts.read_json(out / "meta.json")
    m = meta["machine"]
    table = pd.DataFrame([dict(suffix=n, steps=cell[(n, models[0])].get("steps_run"),
                               tokens=cell[(n, models[0])].get("tokens_spent"),
                               **{f"{mo} {j}": cell[(n, mo)][j] for mo in models for j in ("strict", "substring")
                                  if (n, mo) in cell}) for n in names if (n, models[0]) in cell])
    facts = {"machine": machine_line(m),
             "attack": f"universal over {len(meta['train'])} harmful training prompts, target objective, width "
                       f"{meta['width']}, {meta['steps']} steps, {meta['suffix_len']}-token suffix",
             "held out": ", ".join(HELD_OUT), "command": "python experiments/do_ensemble_suffixes_transfer.py report"}
    write_report(out, "Suffixes optimised over several organisms: transfer", [], {"transfer": fig_path},
                 {"success on held-out test prompts": table}, facts)
    print("saved", fig_path, out / "report.md")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="both attacks (resumable)")
    t.add_argument("--train", type=int, default=4, help="harmful training prompts the suffix is optimised on")
    t.add_argument("--steps", type=int, default=30, help="steps of each attack (the one-model arm then runs on to "
                                                         "equal tokens)")
    e = sub.add_parser("evaluate", help="the transfer matrix (resumable)")
    e.add_argument("--test", type=int, default=24, help="held-out harmful test prompts")
    sub.add_parser("report", help="the tables and OUT/transfer.png")
    for p in sub.choices.values():
        p.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    try:
        {"train": train_arms, "evaluate": evaluate, "report": report}[args.cmd](args)
    except RefusalLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
