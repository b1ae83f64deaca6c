"""PCA of harmful vs harmless activations, layer by layer: how much variance the first components
explain, whether the first component separates the two sets (and from which layer), and how it lines
up with the difference-in-means direction."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from refusal.artifacts import atomic_path


def pca(x: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x[n, d] -> (components[k, d], explained variance ratio[k], scores[n, k]), centred, float64."""
    x = x.double()
    xc = x - x.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    var = s**2
    k = min(k, vh.shape[0])
    return vh[:k], (var[:k] / var.sum().clamp_min(1e-30)), xc @ vh[:k].T


def separation_accuracy(score: np.ndarray, labels: np.ndarray) -> float:
    """Best accuracy of a single threshold on a 1-D score (either orientation) at telling labels apart."""
    order = np.argsort(score, kind="stable")
    y = labels[order].astype(bool)
    n, pos = len(y), y.sum()
    # threshold after the first i points: predict "negative" below, "positive" above
    neg_below = np.concatenate([[0], np.cumsum(~y)])
    pos_above = pos - np.concatenate([[0], np.cumsum(y)])
    acc = (neg_below + pos_above) / n
    s = score[order]
    valid = np.concatenate([[True], s[1:] != s[:-1], [True]])  # never cut between equal scores
    acc = acc[valid]
    return float(max(acc.max(), (1 - acc).max()))


def layer_pca(harmful: torch.Tensor, harmless: torch.Tensor, diffs: torch.Tensor | None = None, k: int = 5) -> pd.DataFrame:
    """harmful[n, layer, d], harmless[m, layer, d] (one position) -> one row per layer: explained
    variance of the first k components (ev1..evk), the separation accuracy of PC1 and the |cosine|
    of PC1 with the difference in means (diffs[layer, d], computed from these sets when not given)."""
    if harmful.shape[1:] != harmless.shape[1:]:
        raise ValueError("harmful and harmless activations differ in shape")
    labels = np.array([1] * len(harmful) + [0] * len(harmless))
    if diffs is None:
        diffs = harmful.float().mean(0) - harmless.float().mean(0)
    rows = []
    for layer in range(harmful.shape[1]):
        x = torch.cat([harmful[:, layer], harmless[:, layer]]).double()
        comps, ev, scores = pca(x, k)
        r = diffs[layer].double()
        cos = float((comps[0] @ r).abs() / r.norm().clamp_min(1e-30)) if r.norm() > 0 else float("nan")
        row = {"layer": layer}
        row.update({f"ev{i + 1}": float(ev[i]) for i in range(len(ev))})
        row["pc1_separation"] = separation_accuracy(scores[:, 0].numpy(), labels)
        row["cos_pc1_diff_in_means"] = cos
        rows.append(row)
    return pd.DataFrame(rows)


def first_separating_layer(df: pd.DataFrame, threshold: float = 0.95) -> int | None:
    """The first layer from which PC1 separates the sets with at least `threshold` accuracy at every
    later layer too (None if there is none)."""
    ok = (df.pc1_separation >= threshold).to_numpy()
    for i in range(len(ok)):
        if ok[i:].all():
            return int(df.layer.iloc[i])
    return None


def plot_layer_pca(df: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Line plot by layer: PC1 separation accuracy, |cos(PC1, diff-in-means)|, PC1 explained variance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    long = df.melt(id_vars="layer", value_vars=["pc1_separation", "cos_pc1_diff_in_means", "ev1"],
                   var_name="measure", value_name="value")
    long["measure"] = long.measure.map({"pc1_separation": "PC1 separation accuracy",
                                        "cos_pc1_diff_in_means": "|cos(PC1, diff in means)|",
                                        "ev1": "PC1 explained variance"})
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    sns.lineplot(data=long, x="layer", y="value", hue="measure", marker="o", ax=ax)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("")
    ax.set_title(title or "PCA of harmful vs harmless activations")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path
