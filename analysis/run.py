"""The analysis stage: projection metrics, refusal heads, attention to regions, plots and the report,
written to runs/NAME/analysis/."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from refusal import artifacts
from refusal.directions import Direction
from refusal.errors import RefusalLabError
from refusal.models import ChatModel

from .capture import capture_last_position
from .heads import attention_table_from, contributions, heads_table, top_heads
from .plots import plot_attention_shares, plot_cosine_by_layer, plot_head_contributions, plot_pca_conditions
from .projection import condition_encodings, projection_table
from .report import headline_numbers, headline_sentences, success_frame, write_report

log = logging.getLogger(__name__)


def analyze(cm: ChatModel, direction: Direction, harmful: Sequence[str], harmless: Sequence[str],
            adversarial: Sequence[int] | str | None, random: Sequence[int] | str | None, out_dir: str | Path,
            top_k: int = 8, batch_size: int = 16, success: dict | None = None, facts: dict | None = None) -> dict:
    """Write projection.csv, heads.csv, attention.csv, the plots, report.md and report.html into out_dir;
    return the headline numbers (and sentences). `success`: attack success rates by judge, {judge name:
    {condition: rate}} (e.g. {"substring": {...}, "strict": {...}}), stated with their judges."""
    if success is not None and (not isinstance(success, dict) or not all(isinstance(v, dict) for v in success.values())):
        raise RefusalLabError("success must map judge names to {condition: rate}, e.g. {'strict': {'no_suffix': 0.1}}")
    out_dir = Path(out_dir)
    timer = artifacts.Timer()
    encs = condition_encodings(cm, harmful, harmless, adversarial, random)
    with timer("forward"):  # one pass per condition gives every measure below
        caps = {c: capture_last_position(cm, e, batch_size) for c, e in encs.items()}
    acts = {c: cap.resid for c, cap in caps.items()}
    proj = projection_table(acts, direction.vector)
    heads = heads_table({c: contributions(cm, cap.z, direction.vector) for c, cap in caps.items()}, top_k)
    chosen = top_heads(heads, top_k)
    att = attention_table_from({c: cap.regions for c, cap in caps.items()}, chosen)
    # written into a temporary folder that replaces out_dir at the end: never a half-written analysis
    with artifacts.atomic_dir(out_dir) as tmp:
        artifacts.write_csv(tmp / "projection.csv", proj)
        artifacts.write_csv(tmp / "heads.csv", heads)
        artifacts.write_csv(tmp / "attention.csv", att)
        with timer("plots"):
            plots = {
                "Cosine with the refusal direction by layer": plot_cosine_by_layer(proj, direction.layer, tmp / "cosine_by_layer.png"),
                "Top refusal heads: direct contribution": plot_head_contributions(heads, top_k, tmp / "head_contributions.png"),
                "Attention of the top heads": plot_attention_shares(att, tmp / "attention_shares.png"),
                f"PCA of the conditions at layer {direction.layer}": plot_pca_conditions(acts, direction.layer, tmp / "pca_conditions.png"),
            }
        numbers = headline_numbers(proj, heads, att, direction.layer, top_k)
        sentences = headline_sentences(numbers, success)
        summary = proj[proj.layer == direction.layer].groupby("condition")[["cosine", "projection"]].mean().reset_index()
        att_summary = att.groupby(["condition", "layer", "head"])[["instruction", "suffix", "other"]].mean().reset_index()
        top_rows = heads[heads["rank"] <= top_k]
        allfacts = {"model": f"{cm.name} ({cm.fingerprint})", "direction": f"layer {direction.layer}, position {direction.position}",
                    "prompts": f"{len(harmful)} harmful, {len(harmless)} harmless"}
        if isinstance(adversarial, str):
            allfacts["adversarial suffix"] = adversarial
        elif adversarial is not None:
            allfacts["adversarial suffix"] = repr(cm.tokenizer.decode(list(adversarial)))
        if random is not None:
            allfacts["random suffix"] = repr(random if isinstance(random, str) else cm.tokenizer.decode(list(random)))
        allfacts.update(facts or {})
        tables = {f"Mean cosine and projection at layer {direction.layer}": summary,
                  f"Top {top_k} heads": top_rows, "Attention shares of the top heads (mean)": att_summary}
        if success:
            tables = {"Attack success by judge": success_frame(success), **tables}
        md, html = write_report(tmp, "How the suffix beats refusal", sentences, plots, tables, allfacts)
        numbers["sentences"] = sentences
        numbers["success"] = success
        artifacts.write_json(tmp / "analysis.json", artifacts.run_record(
            model=cm.describe(), direction={"layer": direction.layer, "position": direction.position},
            n_harmful=len(harmful), n_harmless=len(harmless), top_k=top_k, headline=numbers, timings_s=timer.seconds))
    log.info("analysis written to %s (%s)", out_dir, timer.seconds)
    return {"numbers": numbers, "report_md": out_dir / md.name, "report_html": out_dir / html.name}
