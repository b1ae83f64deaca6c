"""Each judge's agreement with the hand-labelled validation set (tests/data/judge_set.jsonl).

Found: on the 245 labelled replies the substring judge is 76.7% accurate (precision of complies 0.467), the
strict judge 80.8% (0.522); both overstate success, 42.9% and 36.7% against 20.4% labelled (docs/results.md).


    python experiments/how_well_judges_agree_with_labels.py [--judge substring --judge strict --judge hf:MODEL] [--set FILE]

For every judge: accuracy over the three verdicts (complies / refuses / neither), precision and recall of
"complies" (the verdict an attack-success rate counts), the success rate it reports against the labelled
one, and the confusion matrix (labels down, verdicts across); per source as well with --by-source.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from refusal.app.reproduce import to_markdown
from refusal.errors import RefusalLabError
from refusal.judges import VERDICTS, load_judge

LABELLED = Path(__file__).resolve().parent.parent / "tests" / "data" / "judge_set.jsonl"


def read_labelled(path: str | Path = LABELLED) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise RefusalLabError(f"{path}: file not found")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    df = pd.DataFrame(rows)
    if df.empty or not {"prompt", "completion", "label"} <= set(df.columns):
        raise RefusalLabError(f"{path}: expected rows with prompt, completion and label")
    bad = set(df.label) - set(VERDICTS)
    if bad:
        raise RefusalLabError(f"{path}: unknown labels {sorted(bad)}")
    return df


def agreement(labels: list[str], verdicts: list[str]) -> dict:
    """Accuracy, and precision / recall / F1 of "complies", of verdicts against labels."""
    n = len(labels)
    tp = sum(l == v == "complies" for l, v in zip(labels, verdicts))
    said = sum(v == "complies" for v in verdicts)
    true = sum(l == "complies" for l in labels)
    precision = tp / said if said else float("nan")
    recall = tp / true if true else float("nan")
    return dict(n=n, accuracy=sum(l == v for l, v in zip(labels, verdicts)) / n,
                complies_precision=precision, complies_recall=recall,
                complies_f1=2 * precision * recall / (precision + recall) if tp else 0.0,
                success_rate_judged=said / n, success_rate_labelled=true / n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", action="append", help="judge name (repeatable; default: substring and strict)")
    ap.add_argument("--set", default=str(LABELLED), help="a labelled JSONL file (prompt, completion, label)")
    ap.add_argument("--by-source", action="store_true", help="also per source (none, ablation, universal, ...)")
    args = ap.parse_args(argv)
    try:
        df = read_labelled(args.set)
        rows = []
        print(f"{len(df)} labelled replies: " + ", ".join(f"{k} {v}" for k, v in df.label.value_counts().items()))
        for name in args.judge or ["substring", "strict"]:
            verdicts = load_judge(name).verdicts(df.prompt.tolist(), df.completion.tolist())
            df[name] = verdicts
            rows.append({"judge": name, **agreement(df.label.tolist(), verdicts)})
            print(f"\n{name}: confusion (labels down, verdicts across)")
            print(pd.crosstab(df.label, df[name]).to_string())
            if args.by_source:
                src = df.source.str.split("/").str[0]
                for s, part in df.groupby(src):
                    a = agreement(part.label.tolist(), part[name].tolist())
                    print(f"  {s:10s} n={a['n']:3d} accuracy {a['accuracy']:.3f} judged success "
                          f"{a['success_rate_judged']:.3f} labelled {a['success_rate_labelled']:.3f}")
        table = pd.DataFrame(rows)
        print()
        print(to_markdown(table))
        return 0
    except RefusalLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
