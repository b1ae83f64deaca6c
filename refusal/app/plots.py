"""The bench's and the sweep's plots."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from analysis.plots import pyplot, save_figure


def plot_loss_vs_time(traces: Mapping[str, Sequence[Sequence[Sequence[float]]]], path: str | Path) -> Path:
    """Best loss so far against wall time, one line per engine: at every time the median over prompts of
    the best loss reached by then (a prompt that stopped keeps its last value); each prompt's own trace
    faint behind. traces: {engine: [one [[seconds, best loss], ...] list per prompt]}."""
    plt, sns = pyplot()
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
    return save_figure(fig, path)


def plot_success_curves(curves: Mapping[str, Mapping], path: str | Path) -> Path:
    """The attacker's curves: per engine, the share of prompts broken against wall time (left) and against
    the attacked model's tokens (right). curves: {engine: {"time_s": [...], "tokens": [...], "prompts": n}},
    the sorted costs at which its prompts were broken."""
    plt, sns = pyplot()
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
    return save_figure(fig, path)


OBJECTIVE_COLORS = {"target": "#8e44ad", "direction": "#c0392b", "attention": "#16a085", "mixed": "#2980b9"}


def plot_sweep_success(by: pd.DataFrame, path: str | Path, judge: str) -> Path:
    """A sweep's attack success on the unseen prompts per model (x) and objective (colour), each suffix on its
    own model; the no-suffix rate as a black line over each model. by: model, objective, attack_success
    (mean over the suffixes), and no_suffix where measured."""
    plt, sns = pyplot()
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
    return save_figure(fig, path)


def plot_transfer(matrix: pd.DataFrame, path: str | Path, judge: str) -> Path:
    """The transfer matrix as a heat map: rows the model a suffix was made on, columns the model it is
    evaluated on, cells the mean attack success on the unseen prompts."""
    plt, sns = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * matrix.shape[1] + 2), max(3.0, 0.9 * matrix.shape[0] + 1.5)))
    sns.heatmap(matrix.astype(float), annot=True, fmt=".0%", vmin=0, vmax=1, cmap="viridis", cbar_kws={"label": judge},
                ax=ax)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("suffix made on")
    ax.set_title("Transfer of suffixes between models")
    return save_figure(fig, path)


def plot_front(trials: pd.DataFrame, front: pd.DataFrame, path: str | Path, title: str,
               others: Mapping[str, pd.DataFrame] | None = None) -> Path:
    """An abliteration study: every trial's refusal rate against its KL, the Pareto front as a step line,
    the paper's ablation (trial 0) marked; `others`: more fronts to compare ({label: front}), e.g. another
    tool's, each a frame with refusal and kl."""
    plt, sns = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.scatter(trials.kl, trials.refusal, s=14, color="0.7", label="trials")

    def step(df: pd.DataFrame, label: str, color) -> None:
        df = df.sort_values("kl")
        ax.step(df.kl, df.refusal, where="post", color=color, lw=1.8, label=label)
        ax.scatter(df.kl, df.refusal, s=22, color=color)

    colors = sns.color_palette("deep", 1 + len(others or {}))
    step(front, "refusal-lab front", colors[0])
    for (label, df), color in zip((others or {}).items(), colors[1:]):
        step(df, label, color)
    paper = trials[trials.trial == 0]
    if len(paper):
        ax.scatter(paper.kl, paper.refusal, marker="*", s=120, color="black", zorder=5, label="the paper's ablation")
    ax.set_xlabel("KL of the first reply token on harmless prompts")
    ax.set_ylabel("harmful prompts not complied with")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
