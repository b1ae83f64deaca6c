"""Reproduce the paper's central claims on a model (default: the organism), on the test split.

    python scripts/reproduce_paper.py [--model organism] [--reference-model M] [--reference-tokens 64]
                                      [--out runs/paper] [--force]

Finds the refusal direction (or reuses OUT/direction), then writes OUT/reproduce/table.csv,
table.md and one completions file per (intervention, prompt set), then the PCA of harmful vs
harmless test activations at every layer (pca.csv, pca.png), and prints the table and the PCA summary.
A finished table is reused only if OUT/reproduce/reproduce.json records the same model, reference
model, --reference-tokens and --max-new-tokens (otherwise an error; --force recomputes it).

Beside the paper's refusal and KL columns, the table has the capability cost of each intervention
(refusal.capability): `borderline_refusal_rate` (the built-in borderline-but-safe prompts, greedy, the
table's --max-new-tokens, substring judge), `reply_ce` (mean per-token cross-entropy, nats, of the
reference model's greedy replies to the harmless test prompts, reply tokens only, chat template) and
`text_ce` (the same of the built-in general text, no chat template). The reference model is, by default,
the embedded SmolLM2 for `--model organism` and the model itself, unmodified, for any other model; its
replies are made once, with no intervention, and cached in OUT/reference/replies.json.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from analysis.pca import first_separating_layer, layer_pca, plot_layer_pca
from analysis.reproduce import CAPABILITY_COLUMNS, intervention_table, to_markdown
from refusal.activations import cache_activations
from refusal import artifacts
from refusal.capability import cached_reference_replies
from refusal.data import builtin_prompts, builtin_texts, direction_sets, instructions, prompt_hash, text_hash
from refusal.directions import compute_direction, load_direction, save_direction
from refusal.errors import RefusalLabError
from refusal.models import load_model


def table_reuse_problem(rdir: Path, ref_path: Path, model_fingerprint: str, ref_fingerprint: str,
                        reference_tokens: int, max_new_tokens: int) -> str | None:
    """What differs between the settings a finished table in `rdir` was made with and these (None: it can
    be reused): the model, the reference model (fingerprints), --reference-tokens and --max-new-tokens, as
    its reproduce.json records them; without that record, the reference replies' cache (`ref_path`) tells
    the reference model and tokens, and an unrecorded setting counts as different."""
    def read(path: Path) -> dict:
        try:
            rec = artifacts.read_json(path) if path.is_file() else {}
        except RefusalLabError:
            return {}
        return rec if isinstance(rec, dict) else {}

    def fingerprint(model) -> str | None:
        return model.get("fingerprint") if isinstance(model, dict) else None

    rec, cache = read(rdir / "reproduce.json"), read(ref_path)
    made = {"model": fingerprint(rec.get("model")),
            "reference model": fingerprint(rec.get("reference_model")) or fingerprint(cache.get("model")),
            "--reference-tokens": rec.get("reference_tokens", cache.get("new_tokens")),
            "--max-new-tokens": rec.get("max_new_tokens")}
    now = {"model": model_fingerprint, "reference model": ref_fingerprint, "--reference-tokens": reference_tokens,
           "--max-new-tokens": max_new_tokens}
    problems = []
    for key, value in now.items():
        if made[key] is None:
            problems.append(f"an unrecorded {key}")
        elif made[key] != value:
            problems.append(f"another {key} (fingerprint {made[key]}, this run's {value})" if "model" in key
                            else f"{key} {made[key]} (this run: {value})")
    return ", ".join(problems) or None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--out", default="runs/paper")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--reference-model", default=None,
                    help="the model whose greedy replies to the harmless test prompts reply_ce is measured on "
                         "(default: smollm2 for --model organism, else the model itself, unmodified)")
    ap.add_argument("--reference-tokens", type=int, default=64, help="tokens of each reference reply")
    ap.add_argument("--force", action="store_true",
                    help="recompute OUT/reproduce (a finished table is reused otherwise, if made with the same model, "
                         "reference model, --reference-tokens and --max-new-tokens)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_grad_enabled(False)
    torch.manual_seed(args.seed)
    try:
        out = Path(args.out)
        rdir = artifacts.prepare_stage_dir(out / "reproduce", force=args.force, resume=not args.force)
        cm = load_model(args.model)
        ddir = out / "direction"
        if (ddir / "direction.safetensors").is_file():
            direction = load_direction(ddir, cm)
        else:
            direction, diffs, cands = compute_direction(cm, *direction_sets(None, None, 128, 16, args.seed))
            with artifacts.atomic_dir(ddir) as tmp:
                save_direction(tmp, direction, diffs, cands, config={"n_train": 128, "n_val": 16, "seed": args.seed})
        harmful = instructions(builtin_prompts("harmful", "test"))
        harmless = instructions(builtin_prompts("harmless", "test"))
        borderline = instructions(builtin_prompts("borderline"))
        texts = builtin_texts("general_text")
        ref_spec = args.reference_model or ("smollm2" if args.model == "organism" else args.model)
        table = None
        if (rdir / "table.csv").is_file():  # reuse a finished table (--force recomputes it)
            import pandas as pd

            table = pd.read_csv(rdir / "table.csv")
            if not set(CAPABILITY_COLUMNS) <= set(table.columns):
                table = None  # a table from before the capability columns: recompute it
        ref_path = out / "reference" / "replies.json"
        # the reference replies: made once by the reference model with no intervention, cached as JSON
        ref = cm if ref_spec == args.model else load_model(ref_spec)
        ref_record = ref.describe()
        if table is not None:  # reused only if made with this model, reference model and token counts
            problem = table_reuse_problem(rdir, ref_path, cm.fingerprint, ref.fingerprint, args.reference_tokens,
                                          args.max_new_tokens)
            if problem:
                raise RefusalLabError(f"{rdir} holds a finished table made with {problem}; pass --force to "
                                      "recompute it, or choose another --out")
        else:
            replies = cached_reference_replies(ref_path, ref, harmless, args.reference_tokens, force=args.force)
            table, details = intervention_table(cm, direction, harmful, harmless, args.max_new_tokens,
                                                borderline=borderline, replies=(harmless, replies), texts=texts)
            artifacts.write_csv(rdir / "table.csv", table)
            artifacts.write_text(rdir / "table.md", to_markdown(table))
            for name, df in details.items():
                artifacts.write_csv(rdir / f"{name}.csv", df)
        del ref
        # PCA of harmful vs harmless test activations at the direction's position, every layer
        acts = {k: cache_activations(cm, cm.chat.encode_all(v), positions=[direction.position])[:, :, 0]
                for k, v in (("harmful", harmful), ("harmless", harmless))}
        saved = artifacts.load_tensors(ddir / "direction.safetensors").get("mean_diffs")
        diffs = saved[:, direction.position + saved.shape[1]] if saved is not None else None
        pca = layer_pca(acts["harmful"], acts["harmless"], diffs)
        artifacts.write_csv(rdir / "pca.csv", pca)
        sep_from = first_separating_layer(pca)
        plot_layer_pca(pca, rdir / "pca.png", f"{cm.name}: PCA of harmful vs harmless (test split, position {direction.position})")
        artifacts.write_json(rdir / "reproduce.json", artifacts.run_record(
            model=cm.describe(), direction={"layer": direction.layer, "position": direction.position,
                                            **direction.meta.get("scores", {})},
            n_harmful=len(harmful), n_harmless=len(harmless), max_new_tokens=args.max_new_tokens,
            prompt_sets={"harmful:test": prompt_hash(builtin_prompts("harmful", "test")),
                         "harmless:test": prompt_hash(builtin_prompts("harmless", "test")),
                         "borderline": prompt_hash(builtin_prompts("borderline")),
                         "general_text": text_hash(texts)},
            n_borderline=len(borderline), n_texts=len(texts),
            reference_model=ref_record, reference_tokens=args.reference_tokens,
            pca_first_separating_layer=sep_from))
        print(f"direction: layer {direction.layer}, position {direction.position}")
        print(to_markdown(table))
        at = pca.set_index("layer").loc[direction.layer]
        print(f"PCA: PC1 separates harmful from harmless (>= 95% accuracy) from layer {sep_from}; at layer "
              f"{direction.layer} PC1 explains {at.ev1:.1%} of the variance, separates {at.pc1_separation:.1%}, "
              f"|cos| with the difference in means {at.cos_pc1_diff_in_means:.2f}")
        print(f"wrote {rdir}")
        return 0
    except RefusalLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
