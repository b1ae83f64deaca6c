"""The paper's central result as one table: refusal under no intervention, directional ablation,
activation addition and weight orthogonalization, on harmful and harmless test prompts; and, where
given their data, the capability cost of each intervention beyond the first-token KL (refusal.capability:
cross-entropy of reference replies and of general text, false refusal on borderline-but-safe prompts)."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from refusal import artifacts
from refusal.activations import cache_activations, last_logits
from refusal.capability import capability_row, cached_reference_replies
from refusal.config import as_dict, check_fields, option
from refusal.data import builtin_prompts, builtin_texts, instructions, prompt_hash, text_hash
from refusal.directions import Direction, DirectionConfig, load_direction
from refusal.methods import find_direction
from refusal.errors import RefusalLabError
from refusal.ablation import AblationConfig, ablate, abliterate, load_ablation
from refusal.hooks import add_direction
from refusal.metrics import evaluate, kl_divergence
from refusal.models import ChatModel

from analysis.pca import first_separating_layer, layer_pca, plot_layer_pca

log = logging.getLogger(__name__)

# the capability columns intervention_table adds when given their data
CAPABILITY_COLUMNS = ("borderline_refusal_rate", "reply_ce", "text_ce")


def intervention_table(
    cm: ChatModel,
    direction: Direction,
    harmful: Sequence[str],
    harmless: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 64,
    borderline: Sequence[str] | None = None,
    replies: tuple[Sequence[str], Sequence[str]] | None = None,
    texts: Sequence[str] | None = None,
    ablation: AblationConfig | None = None,
    addition: bool = True,
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """One row per intervention: refusal rate and mean refusal score on harmful and harmless
    prompts, and the KL divergence of the harmless first-reply logits from the unedited model.
    Also returns the per-prompt completions of every (intervention, prompt set).

    The capability columns, each only when its data is given (refusal.capability.capability_row):
    `borderline_refusal_rate` (greedy, max_new_tokens, substring judge) on the `borderline` prompts;
    `reply_ce`, the mean per-token cross-entropy (nats) of replies = (instructions, reference replies,
    made once without intervention by the reference model), reply tokens only; `text_ce`, that of the
    plain `texts`. The borderline completions are in details as `{intervention}_borderline`.

    `ablation`: how the direction is ablated, as hooks ("ablation") and in the weights ("orthogonalized";
    default: the paper's). The weight edit is the closest one in the post-norm families, where it is not
    exact; a norm-preserving ablation has no hook form, so no "ablation" row. `addition`: the activation
    addition row too."""
    ablation = ablation or AblationConfig()
    edited = abliterate(cm, direction, ablation)  # not exact in the post-norm families: the closest edit
    conditions = {"none": (cm, contextlib.nullcontext)}
    if not ablation.norm_preserving:  # which has no hook form
        conditions["ablation"] = (cm, lambda: ablate(cm, direction, ablation))
    if addition:
        conditions["addition"] = (cm, lambda: add_direction(cm, direction.mean_diff, direction.layer))
    conditions["orthogonalized"] = (edited, contextlib.nullcontext)
    base_logits = last_logits(cm, cm.chat.encode_all(harmless))
    rows, details = [], {}
    for name, (model, ctx) in conditions.items():
        row = {"intervention": name}
        with ctx():
            for kind, prompts in (("harmful", harmful), ("harmless", harmless)):
                df = evaluate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
                details[f"{name}_{kind}"] = df
                row[f"{kind}_refusal_rate"] = float(df.refused.mean())
                row[f"{kind}_refusal_score"] = float(df.refusal_score.mean())
            logits = last_logits(model, model.chat.encode_all(harmless))
            capability, borderline_df = capability_row(model, borderline, replies, texts, max_new_tokens, batch_size)
        row["harmless_kl"] = float(kl_divergence(base_logits, logits).mean())
        row.update(capability)
        if borderline_df is not None:
            details[f"{name}_borderline"] = borderline_df
        rows.append(row)
    return pd.DataFrame(rows), details


def to_markdown(df: pd.DataFrame) -> str:
    """A Markdown table without extra dependencies."""
    cols = list(df.columns)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the reproduce stage


@dataclass(frozen=True)
class ReproduceConfig:
    """The paper table (`refusal reproduce`): the direction, the intervention table on the test split with
    its capability columns, and the PCA of harmful vs harmless activations at every layer."""

    max_new_tokens: int = option(32, "greedy reply tokens judged per reply (refusal by the substring judge)", ge=1)
    reference_tokens: int = option(64, "tokens of each reference reply the reply cross-entropy is measured on", ge=1)
    direction: DirectionConfig = option(help="how the direction is found when the run folder has none",
                                        factory=DirectionConfig)
    force: bool = option(False, "recompute the table (a finished one is reused if made with the same model, "
                                "reference model, reference_tokens and max_new_tokens)")

    def validate(self) -> None:
        check_fields(self)  # the nested direction config's too


def table_reuse_problem(rdir: Path, ref_path: Path, model_fingerprint: str, ref_fingerprint: str,
                        reference_tokens: int, max_new_tokens: int, ablation: dict | None = None) -> str | None:
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
            "--max-new-tokens": rec.get("max_new_tokens"),
           "ablation": rec.get("ablation", as_dict(AblationConfig())) if rec else None}  # older tables: the paper's
    now = {"model": model_fingerprint, "reference model": ref_fingerprint, "--reference-tokens": reference_tokens,
           "--max-new-tokens": max_new_tokens, "ablation": ablation or as_dict(AblationConfig())}
    problems = []
    for key, value in now.items():
        if made[key] is None:
            problems.append(f"an unrecorded {key}")
        elif made[key] != value:
            problems.append(f"another {key} (fingerprint {made[key]}, this run's {value})" if "model" in key
                            else f"{key} {made[key]} (this run: {value})")
    return ", ".join(problems) or None


def reproduce_paper(cm: ChatModel, config: ReproduceConfig, out: str | Path, reference: ChatModel | None = None) -> dict:
    """The paper's central claims on `cm`, written to `out`: the direction (out/direction, reused when
    there), then out/reproduce/table.csv and table.md (refusal rates, KL and the capability columns under
    no intervention, ablation, addition and orthogonalization), one completions file per (intervention,
    prompt set), pca.csv and pca.png, and reproduce.json. `reference`: the model whose greedy replies to the
    harmless test prompts reply_ce is measured on (default: cm itself, unmodified); its replies are made
    once and cached in out/reference/replies.json. With config.direction.method other than the paper's, the
    method's folder (out/direction-METHOD) and its table (table-METHOD.csv; table-METHOD.md side by side with
    the paper's direction) too. Returns the record, with the table(s) and the PCA summary."""
    config.validate()
    out = Path(out)
    rdir = artifacts.prepare_stage_dir(out / "reproduce", force=config.force, resume=not config.force)
    ddir = out / "direction"
    if (ddir / "direction.safetensors").is_file():
        direction = load_direction(ddir, cm)
    else:
        direction = find_direction(cm, config.direction, ddir)
    ablation = load_ablation(ddir)  # the paper's, unless the folder records another (refusal abliterate)
    harmful = instructions(builtin_prompts("harmful", "test"))
    harmless = instructions(builtin_prompts("harmless", "test"))
    borderline = instructions(builtin_prompts("borderline"))
    texts = builtin_texts("general_text")
    ref = reference if reference is not None else cm
    table = None
    if (rdir / "table.csv").is_file():  # reuse a finished table (force recomputes it)
        table = pd.read_csv(rdir / "table.csv")
        if not set(CAPABILITY_COLUMNS) <= set(table.columns):
            table = None  # a table without the capability columns: recompute it
    ref_path = out / "reference" / "replies.json"
    if table is not None:  # reused only if made with this model, reference model and token counts
        problem = table_reuse_problem(rdir, ref_path, cm.fingerprint, ref.fingerprint, config.reference_tokens,
                                      config.max_new_tokens, as_dict(ablation))
        if problem:
            raise RefusalLabError(f"{rdir} holds a finished table made with {problem}; pass --force to "
                                  "recompute it, or choose another --out")
    else:
        replies = cached_reference_replies(ref_path, ref, harmless, config.reference_tokens, force=config.force)
        table, details = intervention_table(cm, direction, harmful, harmless, config.max_new_tokens,
                                            borderline=borderline, replies=(harmless, replies), texts=texts,
                                            ablation=ablation)
        artifacts.write_csv(rdir / "table.csv", table)
        artifacts.write_text(rdir / "table.md", to_markdown(table))
        for name, df in details.items():
            artifacts.write_csv(rdir / f"{name}.csv", df)
    # PCA of harmful vs harmless test activations at the direction's position, every layer
    acts = {k: cache_activations(cm, cm.chat.encode_all(v), positions=[direction.position])[:, :, 0]
            for k, v in (("harmful", harmful), ("harmless", harmless))}
    saved = artifacts.load_tensors(ddir / "direction.safetensors").get("mean_diffs")
    diffs = saved[:, direction.position + saved.shape[1]] if saved is not None else None
    pca = layer_pca(acts["harmful"], acts["harmless"], diffs)
    artifacts.write_csv(rdir / "pca.csv", pca)
    sep_from = first_separating_layer(pca)
    plot_layer_pca(pca, rdir / "pca.png", f"{cm.name}: PCA of harmful vs harmless (test split, position {direction.position})")
    at = pca.set_index("layer").loc[direction.layer]
    record = artifacts.run_record(
        model=cm.describe(), direction={"layer": direction.layer, "position": direction.position,
                                        **direction.meta.get("scores", {})},
        n_harmful=len(harmful), n_harmless=len(harmless), max_new_tokens=config.max_new_tokens,
        prompt_sets={"harmful:test": prompt_hash(builtin_prompts("harmful", "test")),
                     "harmless:test": prompt_hash(builtin_prompts("harmless", "test")),
                     "borderline": prompt_hash(builtin_prompts("borderline")),
                     "general_text": text_hash(texts)},
        n_borderline=len(borderline), n_texts=len(texts),
        reference_model=ref.describe(), reference_tokens=config.reference_tokens,
        config=as_dict(config), pca_first_separating_layer=sep_from, ablation=as_dict(ablation),
        orthogonalized_exact=not cm.family.post_norms and not ablation.norm_preserving)
    method = config.direction.method
    method_table = None
    if method != "diff-in-means":  # the method's own folder and table, beside the paper's direction's
        mdir = out / f"direction-{method}"
        md = load_direction(mdir, cm) if (mdir / "direction.safetensors").is_file() else \
            find_direction(cm, config.direction, mdir)
        mpath = rdir / f"table-{method}.csv"
        if mpath.is_file() and not config.force:
            method_table = pd.read_csv(mpath)
        else:
            replies = cached_reference_replies(ref_path, ref, harmless, config.reference_tokens)
            method_table, details = intervention_table(cm, md, harmful, harmless, config.max_new_tokens,
                                                       borderline=borderline, replies=(harmless, replies),
                                                       texts=texts)
            artifacts.write_csv(mpath, method_table)
            for name, df in details.items():
                artifacts.write_csv(rdir / f"{method}_{name}.csv", df)
        both = pd.concat([table.assign(direction="diff-in-means (the paper's)"),
                          method_table.assign(direction=f"{method} (layer {md.layer}, k {md.k})")], ignore_index=True)
        both = both[["direction"] + [c for c in both.columns if c != "direction"]]
        artifacts.write_text(rdir / f"table-{method}.md", to_markdown(both))
        record["method"] = {"method": method, "folder": str(mdir), "layer": md.layer, "position": md.position,
                            "k": md.k, "table": method_table.to_dict("records")}
    artifacts.write_json(rdir / "reproduce.json", record)
    pca_summary = (f"PCA: PC1 separates harmful from harmless (>= 95% accuracy) from layer {sep_from}; at layer "
                   f"{direction.layer} PC1 explains {at.ev1:.1%} of the variance, separates {at.pc1_separation:.1%}, "
                   f"|cos| with the difference in means {at.cos_pc1_diff_in_means:.2f}")
    shown = table if method_table is None else both
    return {**record, "table": table, "method_table": method_table, "table_md": to_markdown(shown),
            "pca_summary": pca_summary, "out": str(rdir)}
