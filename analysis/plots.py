"""Seaborn plots of the analysis tables. Each function takes DataFrames and writes one PNG (atomically)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
import torch

from refusal.artifacts import atomic_path

from .pca import pca

PALETTE = {"harmful": "#c0392b", "random_suffix": "#e67e22", "adversarial_suffix": "#8e44ad", "harmless": "#2980b9"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _order(conds) -> list[str]:
    return [c for c in PALETTE if c in set(conds)]


def plot_cosine_by_layer(df: pd.DataFrame, direction_layer: int, path: str | Path) -> Path:
    """Mean cosine with the direction at every layer, a band (one standard deviation) per condition."""
    plt, sns = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    sns.lineplot(data=df, x="layer", y="cosine", hue="condition", hue_order=_order(df.condition),
                 palette=PALETTE, errorbar="sd", ax=ax)
    ax.axvline(direction_layer, color="grey", ls="--", lw=1)
    ax.text(direction_layer, ax.get_ylim()[1], f" direction's layer {direction_layer}", va="top", fontsize=8, color="grey")
    ax.set_title("Cosine of the last position's residual stream with the refusal direction")
    ax.set_ylabel("cosine similarity")
    return _save(fig, path)


def _head_label(df: pd.DataFrame) -> pd.Series:
    return "L" + df.layer.astype(str) + "H" + df["head"].astype(str)


def plot_head_contributions(heads: pd.DataFrame, top_k: int, path: str | Path) -> Path:
    """The top-k refusal heads' mean direct contribution to the direction, per condition."""
    plt, sns = _plt()
    top = heads[heads["rank"] <= top_k].sort_values("rank").copy()
    top["head_label"] = _head_label(top)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * top_k), 4))
    sns.barplot(data=top, x="head_label", y="contribution", hue="condition", hue_order=_order(top.condition),
                palette=PALETTE, ax=ax)
    ax.set_xlabel("head (ranked by contribution on harmful prompts)")
    ax.set_ylabel("direct contribution to r")
    ax.set_title(f"Top {top_k} refusal heads")
    return _save(fig, path)


def plot_attention_shares(att: pd.DataFrame, path: str | Path) -> Path:
    """Mean attention share from the last position to the instruction, the suffix and the rest, per top
    head and condition."""
    plt, sns = _plt()
    long = att.melt(id_vars=["prompt_id", "condition", "layer", "head"], value_vars=["instruction", "suffix", "other"],
                    var_name="region", value_name="share")
    long["head_label"] = _head_label(long)
    n_heads = long.head_label.nunique()
    g = sns.catplot(data=long, x="head_label", y="share", hue="condition", hue_order=_order(long.condition),
                    col="region", kind="bar", palette=PALETTE, errorbar=None, height=3.6,
                    aspect=max(1.0, n_heads / 7))
    g.set_axis_labels("head", "attention share")
    g.set_titles("{col_name}")
    for ax in g.axes.flat:
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    g.figure.suptitle("Where the top refusal heads look from the last position", y=1.04)
    return _save(g.figure, path)


def plot_pca_conditions(acts: Mapping[str, torch.Tensor], layer: int, path: str | Path) -> Path:
    """The four conditions' last-position activations at one layer, on the first two principal
    components of harmful + harmless."""
    plt, sns = _plt()
    base = torch.cat([acts[c][:, layer] for c in ("harmful", "harmless") if c in acts]).double()
    comps, ev, _ = pca(base, 2)
    mean = base.mean(0)
    rows = []
    for cond, a in acts.items():
        s = (a[:, layer].double() - mean) @ comps.T
        rows += [(cond, float(x), float(y)) for x, y in s.tolist()]
    df = pd.DataFrame(rows, columns=["condition", "PC1", "PC2"])
    fig, ax = plt.subplots(figsize=(6, 5))
    sns.scatterplot(data=df, x="PC1", y="PC2", hue="condition", hue_order=_order(df.condition), palette=PALETTE,
                    alpha=0.75, s=28, ax=ax)
    ax.set_xlabel(f"PC1 ({float(ev[0]):.0%} of variance)")
    ax.set_ylabel(f"PC2 ({float(ev[1]):.0%} of variance)")
    ax.set_title(f"Last-position activations at layer {layer}")
    return _save(fig, path)


def plot_loss_vs_time(traces: Mapping[str, Sequence[Sequence[Sequence[float]]]], path: str | Path) -> Path:
    """Best loss so far against wall time, one line per engine: at every time the median over prompts of
    the best loss reached by then (a prompt that stopped keeps its last value); each prompt's own trace
    faint behind. traces: {engine: [one [[seconds, best loss], ...] list per prompt]}."""
    plt, sns = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = dict(zip(traces, sns.color_palette("deep", len(traces))))
    end = max((t[-1][0] for runs in traces.values() for t in runs if t), default=1.0)
    grid = [end * i / 200 for i in range(201)]
    for engine, runs in traces.items():
        runs = [t for t in runs if t]
        for t in runs:
            ax.step([x for x, _ in t], [y for _, y in t], where="post", color=colors[engine], alpha=0.15, lw=0.8)
        xs, ys = [], []
        for g in grid:
            seen = [next((y for x, y in reversed(t) if x <= g), None) for t in runs]
            seen = sorted(v for v in seen if v is not None)
            if len(seen) == len(runs) and seen:
                xs.append(g)
                ys.append(seen[len(seen) // 2] if len(seen) % 2 else 0.5 * (seen[len(seen) // 2 - 1] + seen[len(seen) // 2]))
        ax.plot(xs, ys, color=colors[engine], lw=2, label=engine)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("best loss so far (median over prompts)")
    ax.legend()
    return _save(fig, path)


def plot_success_curves(curves: Mapping[str, Mapping], path: str | Path) -> Path:
    """The attacker's curves: per engine, the share of prompts broken against wall time (left) and against
    the attacked model's tokens (right). curves: {engine: {"time_s": [...], "tokens": [...], "prompts": n}},
    the sorted costs at which its prompts were broken."""
    plt, sns = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = dict(zip(curves, sns.color_palette("deep", len(curves))))
    for ax, key, label in ((axes[0], "time_s", "wall time (s)"), (axes[1], "tokens", "tokens (forward + backward)")):
        end = max((c[key][-1] for c in curves.values() if c[key]), default=1.0)
        for engine, c in curves.items():
            n = max(1, c["prompts"])
            xs = [0.0] + list(c[key]) + [end * 1.05]
            ys = [0.0] + [(i + 1) / n for i in range(len(c[key]))] + [len(c[key]) / n]
            ax.step(xs, ys, where="post", color=colors[engine], lw=2, label=f"{engine} ({len(c[key])}/{n})")
        ax.set_xlabel(label)
        ax.set_ylabel("share of prompts broken")
        ax.set_ylim(0, 1.02)
        ax.legend(loc="lower right")
    return _save(fig, path)


OBJECTIVE_COLORS = {"target": "#8e44ad", "direction": "#c0392b", "mixed": "#2980b9"}


def plot_sweep_success(by: pd.DataFrame, path: str | Path, judge: str) -> Path:
    """A sweep's attack success on the unseen prompts per model (x) and objective (colour), each suffix on its
    own model; the no-suffix rate as a black line over each model. by: model, objective, attack_success
    (mean over the suffixes), and no_suffix where measured."""
    plt, sns = _plt()
    models = list(dict.fromkeys(by.model))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 * len(models) + 2), 4))
    hue_order = sorted(set(by.objective), key=lambda o: (list(OBJECTIVE_COLORS).index(o.split(",")[0])
                                                          if o.split(",")[0] in OBJECTIVE_COLORS else 9, o))
    extra = iter(sns.color_palette("deep", len(hue_order)))
    palette = {o: OBJECTIVE_COLORS[o] if o in OBJECTIVE_COLORS else next(extra) for o in hue_order}
    sns.barplot(data=by, x="model", y="attack_success", hue="objective", hue_order=hue_order, order=models,
                palette=palette, errorbar=None, ax=ax)
    if "no_suffix" in by:
        for i, m in enumerate(models):
            base = by[by.model == m].no_suffix.dropna()
            if len(base):
                ax.hlines(float(base.iloc[0]), i - 0.4, i + 0.4, color="black", lw=2,
                          label="no suffix" if i == 0 else None)
    ax.set_ylim(0, 1)
    ax.set_xlabel("model")
    ax.set_ylabel(f"attack success ({judge} judge)")
    ax.set_title("Attack success on unseen prompts")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_transfer(matrix: pd.DataFrame, path: str | Path, judge: str) -> Path:
    """The transfer matrix as a heat map: rows the model a suffix was made on, columns the model it is
    evaluated on, cells the mean attack success on the unseen prompts."""
    plt, sns = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * matrix.shape[1] + 2), max(3.0, 0.9 * matrix.shape[0] + 1.5)))
    sns.heatmap(matrix.astype(float), annot=True, fmt=".0%", vmin=0, vmax=1, cmap="viridis", cbar_kws={"label": judge},
                ax=ax)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("suffix made on")
    ax.set_title("Transfer of suffixes between models")
    return _save(fig, path)
