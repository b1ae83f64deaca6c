"""Make the judge validation set: organism replies to harmful test prompts, under several conditions, to be

Made: tests/data/judge_set.jsonl, 245 organism replies labelled by reading, blind to the judges
(tests/data/judge_set.md).

labelled by reading (tests/data/judge_set.md says how they were labelled).

    python experiments/make_judge_set.py --model organism --direction runs/paper --universal runs/main \
        --objectives runs/objectives --out runs/judge-set/replies.jsonl

Sources (greedy, 48 new tokens, harmful TEST prompts, spread over the set):
  none        the prompt alone (40 prompts)
  random      a random 16-token suffix (30 prompts)
  ablation    the prompt alone, the direction ablated (40 prompts)
  universal   the main job's universal suffix (runs/main/attack; 50 prompts)
  objectives  replies judged during per-prompt GCG with the target, direction and mixed objectives
              (experiments/how_often_attacks_succeed.py objectives: OUT/objectives_replies.jsonl): per (prompt, objective) the
              first, middle and last reply judged, up to 72
  transfer    each of those runs' last suffix on two other harmful test prompts
Writes one JSON object per line: id, source, prompt, completion, suffix (text or null). No verdict of any
judge is written, so the labels are made blind to them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

import torch

from refusal.suffix import random_suffix_ids
from refusal import artifacts
from refusal.data import builtin_prompts, instructions
from refusal.directions import load_direction
from refusal.errors import RefusalLabError
from refusal.hooks import ablate_direction
from refusal.metrics import generate
from refusal.registry import load_model

NEW_TOKENS = 48
SOURCES = ("none", "random", "ablation", "universal", "objectives", "transfer")


def spread(items: list, n: int, offset: int = 0) -> list:
    """n items spread evenly over the list, starting at offset."""
    step = max(1, len(items) // n)
    return [items[(offset + i * step) % len(items)] for i in range(min(n, len(items)))]


def objective_runs(path: Path) -> dict[tuple[str, str], list[dict]]:
    """The judged replies of attack_goals.py objectives, per (prompt, objective) run, in step order."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        runs.setdefault((row["prompt"], row["objective"]), []).append(row)
    return runs


def objective_rows(runs: dict[tuple[str, str], list[dict]], limit: int = 72) -> list[dict]:
    out = []
    for (prompt, objective), rows in runs.items():
        picks = {0, len(rows) // 2, len(rows) - 1}
        out += [dict(source=f"objectives/{objective}/step{rows[i]['step']}", prompt=prompt,
                     completion=rows[i]["completion"], suffix=rows[i]["suffix"]) for i in sorted(picks)]
    return out[:limit]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--direction", required=True, help="a direction folder (e.g. the paper table's run)")
    ap.add_argument("--universal", help="the main job's run folder (its attack/suffix.json)")
    ap.add_argument("--objectives", help="attack_goals.py objectives' output folder")
    ap.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, of {', '.join(SOURCES)}")
    ap.add_argument("--first-id", type=int, default=0, help="the first row's id (to extend a set)")
    ap.add_argument("--offset", type=int, default=0, help="shift every source's choice of prompts (to extend a set)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        torch.set_grad_enabled(False)
        cm = load_model(args.model)
        sources = args.sources.split(",")
        if set(sources) - set(SOURCES):
            raise RefusalLabError(f"--sources: unknown {sorted(set(sources) - set(SOURCES))}; use {', '.join(SOURCES)}")
        if "universal" in sources and not args.universal or "objectives" in sources and not args.objectives:
            raise RefusalLabError("the universal source needs --universal DIR, the objectives source --objectives DIR")
        direction = load_direction(args.direction, cm)
        prompts = instructions(builtin_prompts("harmful", "test"))
        rows = []

        def add(source, chosen, suffix_ids=None, suffix_text=None, ablate=False):
            encs = cm.chat.encode_all(chosen, suffix_ids)
            with ablate_direction(cm, direction.vector) if ablate else contextlib.nullcontext():
                replies = generate(cm, encs, NEW_TOKENS, progress=False)
            rows.extend(dict(source=source, prompt=p, completion=r, suffix=suffix_text) for p, r in zip(chosen, replies))

        if "none" in sources:
            add("none", spread(prompts, 40, 0 + args.offset))
        if "random" in sources:
            rand = random_suffix_ids(cm, 16, seed=1)
            add("random", spread(prompts, 30, 1 + args.offset), rand, cm.tokenizer.decode(rand))
        if "ablation" in sources:
            add("ablation", spread(prompts, 40, 2 + args.offset), ablate=True)
        if "universal" in sources:
            universal = artifacts.read_json(Path(args.universal) / "attack" / "suffix.json")
            add("universal", spread(prompts, 50, 1 + args.offset), universal["token_ids"], universal["suffix"])
        runs = objective_runs(Path(args.objectives) / "objectives_replies.jsonl") if args.objectives else {}
        if "objectives" in sources:
            rows += objective_rows(runs)
        if "transfer" in sources:
            last = {key: replies[-1] for key, replies in runs.items()}
            for k, ((prompt, objective), row) in enumerate(sorted(last.items())):
                others = [p for p in spread(prompts, 40, k) if p != prompt][:2]
                ids = cm.tokenizer(row["suffix"], add_special_tokens=False).input_ids
                add(f"transfer/{objective}", others, ids, row["suffix"])
        seen, unique = set(), []
        for row in rows:
            if (row["prompt"], row["completion"]) not in seen:
                seen.add((row["prompt"], row["completion"]))
                unique.append({"id": args.first_id + len(unique), **row})
        artifacts.write_text(args.out, "".join(json.dumps(r) + "\n" for r in unique))
        print(f"wrote {len(unique)} replies to {args.out}")
        return 0
    except (RefusalLabError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
