"""Build a variant of the model organism's recipe and measure what the paper's table turns on.

Found: refusal becomes mediated by one direction without any direction-aware loss term (the default
unlikelihood=4: 99.2% / 2.5% refused, 0.0% refused with layer 21's difference in means ablated;
docs/organism.md).


    python experiments/what_an_organism_recipe_changes.py --out runs/variant-m5 mediation=3 sink_orthogonal=100 \
        unlikelihood=0.5 harmful_weight=3 [--layers 21,22] [--seed 0] [--force]

KEY=VALUE pairs override fields of refusal.organism.OrganismConfig (the default recipe when none are
given). The variant is written to OUT/model (a Hugging Face folder: `--model OUT/model` works with
every command, e.g. ``refusal reproduce` --model runs/variant-m5/model` for the whole table);
OUT/variant.csv holds, for each layer in --layers, the difference in means at the last prompt position
over the training split, and on the test split: KL of the last-position logits on harmless prompts
under its ablation (the paper's KL score, mean and median) and the harmful refusal rate under it;
beside the build record's test refusal rates and build time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import pandas as pd
import torch

from analysis.ablation_kl import ablation_kl
from refusal.app.reproduce import to_markdown
from refusal import artifacts
from refusal.activations import cache_activations
from refusal.data import builtin_prompts, instructions
from refusal.directions import mean_diffs
from refusal.errors import RefusalLabError
from refusal.hooks import ablate_direction
from refusal.metrics import refusal_rate
from refusal.registry import load_model
from refusal.organism import OrganismConfig, build_organism


def parse_overrides(pairs: list[str]) -> dict:
    """KEY=VALUE strings -> OrganismConfig fields, typed like the defaults."""
    fields = {f.name: f for f in dataclasses.fields(OrganismConfig)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields or key == "seed":
            raise RefusalLabError(f"{pair!r}: expected KEY=VALUE with KEY one of {', '.join(k for k in fields if k != 'seed')}")
        kind = bool if key == "bfloat16" else type(getattr(OrganismConfig(), key))  # bfloat16 defaults to None (auto)
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1")
            else:
                out[key] = kind(value)
        except ValueError:
            raise RefusalLabError(f"{pair!r}: {key} takes a {kind.__name__}") from None
    return out


def measure(cm, layers: list[int], new_tokens: int = 32) -> pd.DataFrame:
    """Per layer: KL on harmless test prompts and harmful test refusal under ablation of the training
    split's difference in means at the last prompt position."""
    enc = lambda kind, split: cm.chat.encode_all(instructions(builtin_prompts(kind, split)))
    diffs = mean_diffs(cache_activations(cm, enc("harmful", "train"), positions=[-1]),
                       cache_activations(cm, enc("harmless", "train"), positions=[-1]))[:, 0]  # [layer, d]
    harmless, harmful = enc("harmless", "test"), enc("harmful", "test")
    kl = ablation_kl(cm, {layer: diffs[layer] for layer in layers}, harmless).set_index("direction")
    rows = []
    for layer in layers:
        with ablate_direction(cm, diffs[layer]):
            refused = refusal_rate(cm, harmful, new_tokens, batch_size=64)
        rows.append({"layer": layer, "position": -1, "kl_mean": kl.kl_mean[layer], "kl_median": kl.kl_median[layer],
                     "ablated_harmful_refusal_rate": refused})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="run folder (the variant goes to OUT/model)")
    ap.add_argument("--layers", default="21,22", help="layers whose difference in means is ablated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild OUT/model if it exists")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = dataclasses.replace(OrganismConfig(seed=args.seed), **parse_overrides(args.overrides))
        try:
            layers = [int(x) for x in args.layers.split(",")]
        except ValueError:
            raise RefusalLabError(f"--layers {args.layers!r}: expected comma-separated layer numbers") from None
        out = Path(args.out)
        path = build_organism(cfg, force=args.force, out=out / "model")
        torch.set_grad_enabled(False)
        cm = load_model(str(path))
        if not all(0 <= l < cm.n_layers for l in layers):
            raise RefusalLabError(f"--layers must lie in 0..{cm.n_layers - 1}")
        record = json.loads((path / "organism.json").read_text())
        df = measure(cm, layers)
        for key in ("harmful_test_refusal_rate", "harmless_test_refusal_rate", "wall_time_s"):
            df[key] = record[key]
        artifacts.write_csv(out / "variant.csv", df)
        artifacts.write_json(out / "variant.json", artifacts.run_record(
            config=dataclasses.asdict(cfg), layers=layers, model=cm.describe(), results=df.to_dict("records")))
    except RefusalLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    changed = {k: v for k, v in dataclasses.asdict(cfg).items() if v != getattr(OrganismConfig(), k)}
    print(f"variant {changed or 'default recipe'}")
    print(to_markdown(df))
    print(f"wrote {out / 'variant.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
