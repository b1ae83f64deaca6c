"""Measure the attack goals on a model (default: the organism), on CPU or GPU.

Found: on the behaviour-only organism (8 prompts, 30 steps, width 64) per-prompt GCG succeeds on 1/8 with the
target objective, 7/8 with the direction objective and 4/8 with mixed, strict judge (docs/results.md).


    python experiments/how_often_attacks_succeed.py single    [--model organism] [--prompts 5] [--steps 60] [--search-width 128] [--judge strict]
    python experiments/how_often_attacks_succeed.py universal [--model organism] [--train 16] [--steps 150] [--search-width 128] [--judge strict]
    python experiments/how_often_attacks_succeed.py objectives --direction runs/paper [--prompts 3] [--steps 60]

single: one suffix per unseen harmful test prompt, target objective, early stop when the greedy reply
begins with the target; reports the steps needed and whether the judged reply (64 tokens) succeeds, by
--judge (default strict) and by the substring judge, each rate under its judge's name.
universal: one suffix over the first N harmful training prompts (progressive, success judged by --judge),
then attack success on the unseen harmful test prompts with the suffix, with a random suffix of the same
length, and with none, by --judge and by the substring judge (success_rates[split][suffix][judge]).
objectives: for the same prompts, the first step at which the judged greedy reply (48 tokens) succeeds under
the target, direction and mixed objectives, by the substring and by the strict judge (refusal.judges); the
target rows answer the one-prompt goal under the judged criterion (single stops on an exact target match).
Each writes OUT/<mode>.json and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from refusal.success import suffix_success
from attacks.gcg import GCG, GCGConfig
from refusal.suffix import random_suffix_ids
from attacks.targets import default_target
from refusal import artifacts
from refusal.data import builtin_prompts, instructions
from refusal.directions import load_direction
from refusal.errors import RefusalLabError
from refusal.judges import load_judge
from refusal.metrics import generate
from refusal.registry import load_model


def _spread(items, n):
    return items[:: max(1, len(items) // n)][:n]


def single(cm, args) -> dict:
    """Per prompt: the steps to an exact target match and the judged 64-token reply, its verdict by the
    chosen judge (args.judge) and by the substring judge; rates of both, each under its judge's name."""
    judge = load_judge(args.judge)
    rows = []
    for ins in _spread(instructions(builtin_prompts("harmful", "test")), args.prompts):
        cfg = GCGConfig(steps=args.steps, search_width=args.search_width, topk=args.topk, seed=args.seed,
                        judge=judge.name)
        t0 = time.perf_counter()
        res = GCG(cm, [ins], [default_target(ins)], cfg).run()
        judged = suffix_success(cm, [ins], res.token_ids, 64, progress=False, judge=judge)
        rows.append(dict(prompt=ins, target_reached=res.stopped_early, steps=res.steps_run, judge=judge.name,
                         verdict=judged.verdict[0], success={"substring": bool(judged.substring_success[0]),
                                                             judge.name: bool(judged.success[0])},
                         completion=judged.completion[0], suffix=res.suffix,
                         seconds=round(time.perf_counter() - t0, 1)))
        print(json.dumps(rows[-1])[:300], flush=True)
    n = len(rows)
    rates = {name: sum(r["success"][name] for r in rows) / n for name in ("substring", judge.name)}
    return dict(rows=rows, target_reached=sum(r["target_reached"] for r in rows) / n, judge=judge.name,
                success_rate=rates[judge.name], substring_success_rate=rates["substring"], success_rates=rates,
                median_steps=sorted(r["steps"] for r in rows)[n // 2], search_width=args.search_width,
                max_steps=args.steps)


def universal(cm, args) -> dict:
    """One suffix over the training prompts (success during the attack judged by args.judge); attack success
    of it, a random suffix and none on the training and test prompts, by args.judge and by the substring
    judge: success_rates[split][suffix][judge name]."""
    judge = load_judge(args.judge)
    train = instructions(builtin_prompts("harmful", "train"))[: args.train]
    test = instructions(builtin_prompts("harmful", "test"))
    cfg = GCGConfig(steps=args.steps, search_width=args.search_width, topk=args.topk, seed=args.seed,
                    patience=args.patience, success_rate=args.success_rate, judge=judge.name)
    t0 = time.perf_counter()
    res = GCG(cm, train, [default_target(i) for i in train], cfg, judge=judge).run()
    seconds = time.perf_counter() - t0
    rand = random_suffix_ids(cm, len(res.token_ids), seed=args.seed + 1)
    out = dict(suffix=res.suffix, token_ids=res.token_ids, steps=res.steps_run, seconds=round(seconds, 1),
               n_train=len(train), judge=judge.name, train_success_last=res.success[-1],  # by the judge
               n_active_last=res.n_active[-1], success_rates={})
    for name, sfx in (("adversarial", res.token_ids), ("random", rand), ("none", None)):
        for split, prompts in (("train", train), ("test", test)):
            df = suffix_success(cm, prompts, sfx, 64, progress=False, judge=judge)
            out["success_rates"].setdefault(split, {})[name] = {"substring": float(df.substring_success.mean()),
                                                                judge.name: float(df.success.mean())}
    return out


def objectives(cm, args) -> dict:
    """Per prompt and objective: GCG for up to args.steps steps, the greedy reply judged after every
    args.judge_every steps (and the last) by the substring and the strict judge; the first step each judge calls a success, stopping at the strict
    judge's first success. Every judged reply goes to OUT/objectives_replies.jsonl (prompt, completion)."""
    if not args.direction:
        raise RefusalLabError("objectives needs --direction DIR")
    d = load_direction(args.direction, cm)
    judges = {name: load_judge(name) for name in ("substring", "strict")}
    rows, replies = [], []
    for ins in _spread(instructions(builtin_prompts("harmful", "test")), args.prompts):
        for obj in ("target", "direction", "mixed"):
            cfg = GCGConfig(steps=args.steps, search_width=args.search_width, topk=args.topk, seed=args.seed,
                            objective=obj, early_stop=False)
            first: dict[str, tuple] = {}

            def judge(info, ins=ins, obj=obj):
                if (info["step"] + 1) % args.judge_every and info["step"] + 1 < args.steps:
                    return
                enc = cm.chat.encode(ins, cm.tokenizer(info["suffix"], add_special_tokens=False).input_ids)
                reply = generate(cm, [enc], args.judge_tokens, progress=False)[0]
                verdicts = {name: j.verdicts([ins], [reply])[0] for name, j in judges.items()}
                replies.append(dict(prompt=ins, completion=reply, suffix=info["suffix"], objective=obj,
                                    step=info["step"], **{f"{n}_verdict": v for n, v in verdicts.items()}))
                for name, v in verdicts.items():
                    if v == "complies" and name not in first:
                        first[name] = (info["step"], info["suffix"], reply)
                if "strict" in first:
                    raise StopIteration

            t0 = time.perf_counter()
            try:
                GCG(cm, [ins], [default_target(ins)] if obj != "direction" else None, cfg, d).run(on_step=judge)
            except StopIteration:
                pass
            row = dict(prompt=ins, objective=obj, seconds=round(time.perf_counter() - t0, 1))
            for name in judges:
                hit = first.get(name)
                row.update({f"{name}_first_success_step": hit[0] if hit else None,
                            f"{name}_suffix": hit[1] if hit else None, f"{name}_reply": hit[2] if hit else None})
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for name in judges:
        for obj in ("target", "direction", "mixed"):
            steps = [r[f"{name}_first_success_step"] for r in rows if r["objective"] == obj]
            ok = sorted(s + 1 for s in steps if s is not None)
            summary[f"{name}/{obj}"] = dict(judge=name, objective=obj, successes=len(ok), prompts=len(steps),
                                            median_steps=ok[len(ok) // 2] if ok else None)
    artifacts.write_text(Path(args.out) / "objectives_replies.jsonl", "".join(json.dumps(r) + "\n" for r in replies))
    return dict(rows=rows, summary=summary, max_steps=args.steps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("single", "universal", "objectives"))
    ap.add_argument("--model", default="organism")
    ap.add_argument("--direction")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--train", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--search-width", type=int, default=128)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--patience", type=int, default=0)
    ap.add_argument("--success-rate", type=float, default=1.0)
    ap.add_argument("--judge-tokens", type=int, default=48, help="objectives: greedy tokens judged after each step")
    ap.add_argument("--judge-every", type=int, default=1, help="objectives: judge the reply every N steps (and at the last)")
    ap.add_argument("--judge", default="strict",
                    help="single, universal: the judge of attack success beside the substring judge (substring, "
                         "strict, hf:MODEL; objectives always uses substring and strict)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/attack-goals")
    args = ap.parse_args(argv)
    args.steps = args.steps or (150 if args.mode == "universal" else 60)
    logging.basicConfig(level=logging.WARNING)
    try:
        cm = load_model(args.model)
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        res = {"single": single, "universal": universal, "objectives": objectives}[args.mode](cm, args)
        res.update(model=cm.describe(), args=vars(args), wall_s=round(time.perf_counter() - t0, 1))
        path = Path(args.out) / f"{args.mode}.json"
        artifacts.write_json(path, artifacts.run_record(**res))
        print(json.dumps({k: v for k, v in res.items() if k not in ("rows", "model", "token_ids")}, indent=1))
        print(f"wrote {path}")
        return 0
    except RefusalLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
