"""What do refusal directions and cones learned by gradient (RDO, Wollschläger et al. 2025) find on the
organism, beside the paper's difference in means r*?

Found: with the paper's loss weights RDO beats r* at its own objective (training loss 0.97-1.12 against 4.57:
half r*'s KL, 0.13-0.15 against 0.335) but mediates refusal on one seed of three (validation bypass -0.31 to
2.48, r*'s -1.67; cosine with r* -0.11 to 0.40); a 3-dimensional cone mediates in 11 of 16 sampled directions
and its span, ablated, bypasses more than r* (-3.63) at a lower KL (0.226); on 120 held-out harmful test prompts
(`refusal reproduce --method rdo`) the cone's ablation leaves 1.7% refused at KL 0.239, r*'s 25.0% at 0.400
(docs/results.md).

    python experiments/what_rdo_learns_on_the_organism.py run      # resumable: finished arms are kept
    python experiments/what_rdo_learns_on_the_organism.py report   # OUT/report.md, the table in docs/results.md

The arms, each `refusal direction --model organism --method rdo` with the defaults (64 steps of 4 rows, lr
0.01, 30-token targets) unless named: the paper's loss weights (ablation 1, addition 0.2, retain 1) at seeds
0, 1 and 2 (the spread of a non-convex optimisation); retain weight 0.1 at seed 0; and a cone of k = 3 at seed
0 with the weights the rule below picks. Everything is scored on the 16 + 16 validation prompts, never on
test prompts: the weights for the cone are the ones whose seed-0 direction mediates refusal (bypass < 0 <
induce); if both or neither do, the lower bypass. The held-out test table of the chosen cone, beside the
single direction's, is `refusal reproduce --method rdo` (docs/results.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from refusal import artifacts
from refusal.directions import DirectionConfig, load_direction
from refusal.errors import RefusalLabError
from refusal.hardware import machine_info, machine_line
from refusal.methods import find_direction
from refusal.rdo import RDOConfig
from refusal.registry import load_model
from refusal.app.reproduce import to_markdown

RUNS = Path("runs")
OUT = RUNS / "rdo-report"
SEEDS = (0, 1, 2)
CONE_K = 3


def arms() -> dict[str, tuple[Path, DirectionConfig]]:
    """The single-direction arms: name -> (folder, config)."""
    out = {f"paper weights, seed {s}": (RUNS / f"rdo-s{s}", DirectionConfig(method="rdo", rdo=RDOConfig(seed=s)))
           for s in SEEDS}
    out["retain 0.1, seed 0"] = (RUNS / "rdo-r01-s0", DirectionConfig(method="rdo", rdo=RDOConfig(retain_weight=0.1)))
    return out


def scores(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "direction" / "rdo_scores.csv")


def chosen_weights(folders: dict[str, Path]) -> tuple[str, RDOConfig]:
    """The rule (module docstring) on the two seed-0 directions' validation scores."""
    rows = {name: scores(f).set_index("direction").loc["b0"] for name, f in folders.items()}
    mediating = [n for n, r in rows.items() if r.mediates]
    pool = mediating if len(mediating) == 1 else list(rows)
    name = min(pool, key=lambda n: rows[n].bypass)
    return name, RDOConfig(retain_weight=0.1) if name.startswith("retain") else RDOConfig()


def done(folder: Path) -> bool:
    return (folder / "direction" / "direction.safetensors").is_file()


def run(model: str) -> None:
    cm = None
    todo = list(arms().items())
    for name, (folder, config) in todo:
        if done(folder):
            continue
        cm = cm or load_model(model)
        print(f"[{name}] -> {folder}", flush=True)
        find_direction(cm, config, folder / "direction")
    name, rdo = chosen_weights({n: f for n, (f, _) in arms().items() if "seed 0" in n})
    cone = RUNS / f"rdo-cone{CONE_K}"
    if not done(cone):
        cm = cm or load_model(model)
        print(f"[cone, k = {CONE_K}, {name}'s weights] -> {cone}", flush=True)
        find_direction(cm, DirectionConfig(method="rdo", k=CONE_K, rdo=rdo), cone / "direction")


def arm_row(name: str, folder: Path) -> dict:
    d = load_direction(folder)
    rec = d.meta["rdo_scores"]
    s = scores(folder).set_index("direction")
    rep = pd.read_csv(folder / "direction" / "rdo_repind.csv")
    b0 = s.loc["b0"]
    return {"arm": name, "k": d.k, "bypass": b0.bypass, "induce": b0.induce, "kl": b0.kl, "mediates": bool(b0.mediates),
            "cos with r*": s.loc["b0", "cos_with_r*"],
            "RepInd r*->b0": rep[(rep.ablated == "r*") & (rep.read == "b0")].repind.item(),
            "RepInd b0->r*": rep[(rep.ablated == "b0") & (rep.read == "r*")].repind.item(),
            "loss b0": rec["objective"]["b0"]["loss"], "loss r*": rec["objective"]["r*"]["loss"],
            "s/step": d.meta["training_s_per_step"], "training s": d.meta["timings_s"]["training"]}


def small(df: pd.DataFrame) -> pd.DataFrame:
    """RepInd columns in scientific notation (they are 1e-4 to 1e-2), the rest as to_markdown writes them."""
    return df.assign(**{c: df[c].map(lambda v: f"{v:.2e}") for c in df.columns if "RepInd" in c or c == "repind"})


def report() -> str:
    rows, ref = [], None
    for name, (folder, _) in arms().items():
        if not done(folder):
            raise RefusalLabError(f"{folder} is not finished: run `{sys.argv[0]} run` first")
        rows.append(arm_row(name, folder))
        ref = scores(folder).set_index("direction") if ref is None else ref
    table = pd.DataFrame(rows)
    seeds = table[table.arm.str.startswith("paper weights")]
    spread = {c: f"{seeds[c].mean():.3f} ({seeds[c].min():.3f} to {seeds[c].max():.3f})"
              for c in ("bypass", "induce", "kl", "cos with r*")}
    made = load_direction(arms()["paper weights, seed 0"][0]).meta.get("machine")
    machine = (f"Made on {machine_line(made)}" if made else
               f"Made before folders recorded their machine; reported on {machine_line(machine_info())}")
    lines = [f"# RDO on the organism\n\n{machine}\n",
             f"No intervention: harmful {ref.loc['none'].bypass:.3f}, harmless {ref.loc['none'].induce:.3f} (mean "
             f"refusal score on the validation prompts). r*: bypass {ref.loc['r*'].bypass:.3f}, induce "
             f"{ref.loc['r*'].induce:.3f}, KL {ref.loc['r*'].kl:.4f}.\n",
             to_markdown(small(table)), "",
             "Paper weights over seeds 0-2, mean (range): " + "; ".join(f"{k} {v}" for k, v in spread.items()) + "\n"]
    cone = RUNS / f"rdo-cone{CONE_K}"
    if done(cone):
        d = load_direction(cone)
        s = scores(cone)
        rec = d.meta["rdo_scores"]
        samples = s[s.direction.str.startswith("sample")]
        name, _ = chosen_weights({n: f for n, (f, _) in arms().items() if "seed 0" in n})
        lines += [f"## Cone, k = {CONE_K} ({name}'s weights, by the rule)\n",
                  to_markdown(s), "",
                  f"{rec['cone_samples_mediating']}/{rec['cone_samples']} sampled cone directions mediate refusal "
                  f"(bypass < 0 < induce); sampled bypass {samples.bypass.min():.3f} to {samples.bypass.max():.3f}, "
                  f"induce {samples.induce.min():.3f} to {samples.induce.max():.3f}; every basis vector mediates: "
                  f"{rec['every_basis_vector_mediates']}. Training loss on the same 16 training rows: "
                  + ", ".join(f"{n} {o['loss']:.3f}" for n, o in rec["objective"].items())
                  + f". {d.meta['training_s_per_step']:.2f} s/step; seconds: "
                  + ", ".join(f"{n} {v:.0f}" for n, v in d.meta["timings_s"].items()) + ". RepInd:\n",
                  to_markdown(small(pd.read_csv(cone / "direction" / "rdo_repind.csv"))), ""]
    text = "\n".join(lines)
    artifacts.write_text(OUT / "report.md", text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "report"))
    ap.add_argument("--model", default="organism")
    args = ap.parse_args(argv)
    try:
        if args.what == "run":
            run(args.model)
        print(report())
    except RefusalLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
