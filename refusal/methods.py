"""The direction stage: a method's direction folder from the prompt sets a DirectionConfig names.

`diff-in-means` is the paper's (refusal.directions), `subspace` widens it (refusal.subspace), `harmfulness`
is Zhao et al.'s (refusal.harmfulness); each writes the same direction folder.
"""
from __future__ import annotations

from pathlib import Path

from . import artifacts
from .config import as_dict
from .data import direction_sets
from .directions import Direction, DirectionConfig, compute_direction, save_direction
from .harmfulness import compute_harmfulness
from .models import ChatModel
from .subspace import compute_subspace


def find_direction(cm: ChatModel, config: DirectionConfig, out: str | Path) -> Direction:
    """The direction stage: the prompt sets config names (built-in splits, or files split by the seed), the
    direction of config.method computed and selected, written atomically to `out` (direction.safetensors,
    direction.json with the config, candidates.csv; subspaces.csv for a subspace). Returns the direction."""
    config.validate()
    ht, bt, hv, bv = direction_sets(config.harmful, config.harmless, config.n_train, config.n_val, config.seed)
    subspaces = None
    if config.method == "harmfulness":
        direction, diffs, df = compute_harmfulness(cm, ht, bt, hv, bv, config.batch_size, config.layer)
    elif config.method == "subspace":
        direction, diffs, df, subspaces = compute_subspace(cm, ht, bt, hv, bv, config)
    else:
        direction, diffs, df = compute_direction(cm, ht, bt, hv, bv, config)
    record = {**as_dict(config), "harmful": config.harmful or "builtin", "harmless": config.harmless or "builtin"}
    with artifacts.atomic_dir(out) as tmp:  # a failed or killed run never leaves a half-written direction
        save_direction(tmp, direction, diffs, df, config=record)
        if subspaces is not None:
            artifacts.write_csv(tmp / "subspaces.csv", subspaces)
    return direction
