"""Seaborn plots of the analysis tables. Each function takes DataFrames and writes one PNG (atomically)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import pandas as pd
import torch

from refusal.artifacts import atomic_path

from .pca import pca

PALETTE = {"harmful": "#c0392b", "random_suffix": "#e67e22", "adversarial_suffix": "#8e44ad", "harmless": "#2980b9"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _order(conds) -> list[str]:
    """The known conditions in PALETTE's order, then any others (a jailbreak file's names) as they come."""
    seen = list(dict.fromkeys(conds))
    return [c for c in PALETTE if c in seen] + [c for c in seen if c not in PALETTE]


def _palette(conds) -> dict[str, str]:
    """PALETTE, and a colour of seaborn's "Dark2" (none of PALETTE's) for each other condition."""
    _, sns = pyplot()
    others = [c for c in _order(conds) if c not in PALETTE]
    return {**PALETTE, **dict(zip(others, sns.color_palette("Dark2", len(others)).as_hex()))}


def _legend_outside(ax, conds) -> None:
    """More conditions than the analysis' own four: the legend beside the axes, not over the lines."""
    if len(set(conds)) > len(PALETTE):
        sns = pyplot()[1]
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title_fontsize=9)


def plot_cosine_by_layer(df: pd.DataFrame, direction_layer: int, path: str | Path,
                         title: str = "Cosine of the last position's residual stream with the refusal direction") -> Path:
    """Mean cosine with the direction at every layer, a band (one standard deviation) per condition."""
    plt, sns = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    sns.lineplot(data=df, x="layer", y="cosine", hue="condition", hue_order=_order(df.condition),
                 palette=_palette(df.condition), errorbar="sd", ax=ax)
    _legend_outside(ax, df.condition)
    ax.axvline(direction_layer, color="grey", ls="--", lw=1)
    ax.text(direction_layer, ax.get_ylim()[1], f" direction's layer {direction_layer}", va="top", fontsize=8, color="grey")
    ax.set_title(title)
    ax.set_ylabel("cosine similarity")
    return save_figure(fig, path)


def _head_label(df: pd.DataFrame) -> pd.Series:
    return "L" + df.layer.astype(str) + "H" + df["head"].astype(str)


def plot_head_contributions(heads: pd.DataFrame, top_k: int, path: str | Path) -> Path:
    """The top-k refusal heads' mean direct contribution to the direction, per condition."""
    plt, sns = pyplot()
    top = heads[heads["rank"] <= top_k].sort_values("rank").copy()
    top["head_label"] = _head_label(top)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * top_k), 4))
    sns.barplot(data=top, x="head_label", y="contribution", hue="condition", hue_order=_order(top.condition),
                palette=_palette(top.condition), ax=ax)
    _legend_outside(ax, top.condition)
    ax.set_xlabel("head (ranked by contribution on harmful prompts)")
    ax.set_ylabel("direct contribution to r")
    ax.set_title(f"Top {top_k} refusal heads")
    return save_figure(fig, path)


def plot_attention_shares(att: pd.DataFrame, path: str | Path) -> Path:
    """Mean attention share from the last position to the instruction, the suffix and the rest, per top
    head and condition."""
    plt, sns = pyplot()
    long = att.melt(id_vars=["prompt_id", "condition", "layer", "head"], value_vars=["instruction", "suffix", "other"],
                    var_name="region", value_name="share")
    long["head_label"] = _head_label(long)
    n_heads = long.head_label.nunique()
    g = sns.catplot(data=long, x="head_label", y="share", hue="condition", hue_order=_order(long.condition),
                    col="region", kind="bar", palette=_palette(long.condition), errorbar=None, height=3.6,
                    aspect=max(1.0, n_heads / 7))
    g.set_axis_labels("head", "attention share")
    g.set_titles("{col_name}")
    for ax in g.axes.flat:
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    g.figure.suptitle("Where the top refusal heads look from the last position", y=1.04)
    return save_figure(g.figure, path)


def plot_pca_conditions(acts: Mapping[str, torch.Tensor], layer: int, path: str | Path) -> Path:
    """The four conditions' last-position activations at one layer, on the first two principal
    components of harmful + harmless."""
    plt, sns = pyplot()
    base = torch.cat([acts[c][:, layer] for c in ("harmful", "harmless") if c in acts]).double()
    comps, ev, _ = pca(base, 2)
    mean = base.mean(0)
    rows = []
    for cond, a in acts.items():
        s = (a[:, layer].double() - mean) @ comps.T
        rows += [(cond, float(x), float(y)) for x, y in s.tolist()]
    df = pd.DataFrame(rows, columns=["condition", "PC1", "PC2"])
    fig, ax = plt.subplots(figsize=(6, 5))
    sns.scatterplot(data=df, x="PC1", y="PC2", hue="condition", hue_order=_order(df.condition), palette=_palette(df.condition),
                    alpha=0.75, s=28, ax=ax)
    ax.set_xlabel(f"PC1 ({float(ev[0]):.0%} of variance)")
    ax.set_ylabel(f"PC2 ({float(ev[1]):.0%} of variance)")
    ax.set_title(f"Last-position activations at layer {layer}")
    return save_figure(fig, path)
