"""What ablating a direction costs on harmless prompts: the selected refusal direction against baselines.

Found: on the organism of 2026-11-25 ablating the selected direction costs KL 1.145, random directions
0.026-0.062, and 0.821 of it comes from the first token alone (docs/organism.md).


    python experiments/what_ablating_the_direction_costs.py [--model organism] [--direction runs/paper/direction] [--random 8]
                                  [--out runs/paper/ablation_kl.csv]

KL of the last-position logits on the harmless test prompts (as the paper's KL score) under directional
ablation of: the selected direction; the same with the massive-activation dimensions zeroed; seeded
random unit directions, with and without those dimensions. Prints the table and the massive dimensions.
Then where the selected direction's cost comes from: the same ablation restricted to the first token (the
attention sink), to every position but it, to the post-instruction positions, to the last position, and to
the layers below / from the direction's layer (written beside, as ablation_kl_regions.csv).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from analysis.ablation_kl import ablation_kl, ablation_kl_by_region, massive_dims, random_directions, without
from refusal.app.reproduce import to_markdown
from refusal import artifacts
from refusal.data import builtin_prompts, instructions
from refusal.directions import load_direction
from refusal.errors import RefusalLabError
from refusal.registry import load_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--direction", default="runs/paper/direction", help="a direction folder (refusal direction --out)")
    ap.add_argument("--random", type=int, default=8, help="random directions of each kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="CSV to write (default: beside the direction, ablation_kl.csv)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        if args.random < 0:
            raise RefusalLabError("--random must be >= 0")
        cm = load_model(args.model)
        direction = load_direction(args.direction, cm)
        out = Path(args.out) if args.out else Path(args.direction).parent / "ablation_kl.csv"
        harmless = cm.chat.encode_all(instructions(builtin_prompts("harmless", "test")))
        dims, peaks = massive_dims(cm, harmless[:16], direction.layer)
        v = direction.vector.float().cpu()
        groups = {
            "selected": {f"selected (layer {direction.layer}, position {direction.position})": v,
                         "selected, massive dims zeroed": without(v, dims)},
            "random": random_directions(cm.d_model, args.random, args.seed),
            "random, massive dims zeroed": random_directions(cm.d_model, args.random, args.seed + 1, zero=dims),
        }
        df = ablation_kl(cm, {name: d for g in groups.values() for name, d in g.items()}, harmless)
        artifacts.write_csv(out, df)
        print(f"massive dims at layer {direction.layer}: "
              + ", ".join(f"{d} (|x| up to {p:.0f}; selected direction's component {v[d]:+.3f})" for d, p in zip(dims, peaks.tolist())))
        print(to_markdown(df))
        kl = df.set_index("direction").kl_mean
        for kind in ("random", "random, massive dims zeroed"):
            if groups[kind]:
                k = kl[list(groups[kind])]
                print(f"{kind}: KL mean over directions {k.mean():.3f} (min {k.min():.3f}, max {k.max():.3f})")
        regions = ablation_kl_by_region(cm, v, harmless, layer=direction.layer)
        out_regions = out.with_name(out.stem + "_regions.csv")
        artifacts.write_csv(out_regions, regions)
        print("where the selected direction's KL comes from (ablation restricted to):")
        print(to_markdown(regions))
        print(f"wrote {out} and {out_regions}")
        return 0
    except RefusalLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
