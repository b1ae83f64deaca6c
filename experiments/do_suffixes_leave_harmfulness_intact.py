"""Do adversarial suffixes lower the refusal direction while the model still represents the request as
harmful (Zhao et al. 2025), on the organism?

Found: no, not on the organism. Read at the user turn's last token (layer 27), the harmfulness direction falls
with every suffix: a random suffix keeps 59% of the harmful-harmless gap, the adversarial ones 24-47%; on the
refusal direction (layer 23, last position) the random suffix keeps 98%, the adversarial ones 33-69%. What sets an
adversarial suffix apart from a random one is the refusal reading; harmfulness falls with any suffix
(8 held-out prompts; docs/results.md).

    python experiments/do_suffixes_leave_harmfulness_intact.py --direction DIR --harmfulness HDIR [--universal S]

It reads the per-prompt suffixes of the attention experiment (`does_hijacking_attention_break_refusal.py run`:
8 held-out harmful test prompts, one 20-token suffix per prompt and objective, and a random suffix per prompt)
and, where `--universal` names a suffix.json or a transfer arm, one universal suffix on the same prompts. For
every prompt and suffix it reads two directions in one forward pass: the refusal direction (DIR) at the last
position and its layer, as the paper does, and the harmfulness direction (HDIR, `refusal direction --method
harmfulness`) at the user turn's last token and its layer, as Zhao et al. do (with a suffix at the end of the
message, that is the suffix's last token). Each condition's mean cosine is given as the share of the
harmful-minus-harmless gap it keeps (harmful prompts alone: 1; the first 8 harmless test prompts: 0), beside
its success by the strict judge (as the attention experiment judged it). Writes OUT/harmfulness.csv,
OUT/harmfulness.png and OUT/report.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from analysis.plots import pyplot, save_figure
from analysis.report import write_report
from refusal import artifacts
from refusal.activations import cache_activations
from refusal.data import builtin_prompts, instructions
from refusal.directions import load_direction
from refusal.errors import RefusalLabError
from refusal.hardware import machine_info, machine_line
from refusal.registry import load_model
from refusal.suffix import load_suffix

ROWS = Path("runs/attention-objective/rows.jsonl")
OUT = Path("runs/harmfulness")
ORDER = ("harmful", "random", "target", "direction", "attention", "mixed", "universal", "harmless")


def measure(cm, encs, refusal, harm) -> tuple[list[float], list[float]]:
    """The cosine of each prompt's last position with the refusal direction at its layer, and of its user
    turn's last token with the harmfulness direction at its layer."""
    acts = cache_activations(cm, encs, [harm.position, -1], batch_size=8, desc="activations")  # [n, L, 2, d]
    def cos(x, v):
        return (x @ v / (x.norm(dim=-1) * v.norm())).tolist()
    return cos(acts[:, refusal.layer, 1], refusal.vector), cos(acts[:, harm.layer, 0], harm.vector)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--direction", required=True, help="the refusal direction folder")
    ap.add_argument("--harmfulness", required=True, help="the harmfulness direction folder")
    ap.add_argument("--rows", default=str(ROWS), help="the attention experiment's rows.jsonl")
    ap.add_argument("--universal", help="a universal suffix (suffix.json, its folder, or text) to add")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    try:
        rows = [json.loads(s) for s in Path(args.rows).read_text().splitlines() if s.strip()] \
            if Path(args.rows).is_file() else []
        if not rows:
            raise RefusalLabError(f"{args.rows}: no rows; run does_hijacking_attention_break_refusal.py first")
        cm = load_model(args.model)
        refusal, harm = load_direction(args.direction, cm), load_direction(args.harmfulness, cm)
        prompts = list(dict.fromkeys(r["prompt"] for r in rows))
        harmless = instructions(builtin_prompts("harmless", "test"))[: len(prompts)]
        conds: dict[str, list] = {"harmful": [(p, None, None) for p in prompts]}
        for r in rows:
            if r["condition"] != "none":
                ids = cm.tokenizer(r["suffix"], add_special_tokens=False).input_ids
                conds.setdefault(r["condition"], []).append((r["prompt"], ids, r["success"]["strict"]))
        if args.universal:
            text, ids = load_suffix(args.universal)
            ids = ids if ids is not None else cm.chat.suffix_ids(text)
            conds["universal"] = [(p, ids, None) for p in prompts]
        frames = []
        for name, items in conds.items():
            encs = [cm.chat.encode(p, ids) if ids is not None else cm.chat.encode(p) for p, ids, _ in items]
            ref, har = measure(cm, encs, refusal, harm)
            frames.append(pd.DataFrame({"condition": name, "prompt": [p for p, _, _ in items], "refusal_cosine": ref,
                                        "harmfulness_cosine": har, "success": [s for _, _, s in items]}))
        ref, har = measure(cm, cm.chat.encode_all(harmless), refusal, harm)
        frames.append(pd.DataFrame({"condition": "harmless", "prompt": harmless, "refusal_cosine": ref,
                                    "harmfulness_cosine": har, "success": None}))
        df = pd.concat(frames, ignore_index=True)
    except RefusalLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    means = df.groupby("condition")[["refusal_cosine", "harmfulness_cosine"]].mean()
    top, bottom = means.loc["harmful"], means.loc["harmless"]
    kept = (means - bottom) / (top - bottom)
    table = pd.DataFrame({
        "condition": [c for c in ORDER if c in means.index],
    })
    table["n"] = [int((df.condition == c).sum()) for c in table.condition]
    table["strict success"] = [f"{int(df[df.condition == c].success.sum())}/{int((df.condition == c).sum())}"
                               if df[df.condition == c].success.notna().all() else "" for c in table.condition]
    for col, name in (("refusal_cosine", "refusal"), ("harmfulness_cosine", "harmfulness")):
        table[f"{name} cosine"] = [round(float(means.loc[c, col]), 3) for c in table.condition]
        table[f"{name} gap kept"] = [f"{float(kept.loc[c, col]):.0%}" for c in table.condition]
    print(table.to_string(index=False))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write_csv(out / "harmfulness.csv", df)
    plt, sns = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    sns.scatterplot(data=df, x="refusal_cosine", y="harmfulness_cosine", hue="condition",
                    hue_order=[c for c in ORDER if c in means.index], ax=ax)
    ax.set_xlabel(f"cosine with the refusal direction (layer {refusal.layer}, last position)")
    ax.set_ylabel(f"cosine with the harmfulness direction (layer {harm.layer}, user turn's last token)")
    ax.set_title("Each prompt with each suffix: refusal against harmfulness", fontsize=10)
    fig_path = save_figure(fig, out / "harmfulness.png")
    facts = {"machine": machine_line(machine_info(cm.device)), "model": cm.name,
             "refusal direction": f"{args.direction} (layer {refusal.layer})",
             "harmfulness direction": f"{args.harmfulness} (layer {harm.layer})", "suffixes": args.rows,
             "command": "python experiments/do_suffixes_leave_harmfulness_intact.py " + " ".join(argv or sys.argv[1:])}
    write_report(out, "Do suffixes leave harmfulness intact?", [], {"refusal against harmfulness": fig_path},
                 {"mean cosines and the share of the harmful-harmless gap kept": table}, facts)
    print("saved", fig_path, out / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
