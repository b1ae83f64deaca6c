"""The direction stage: a method's direction folder from the prompt sets a DirectionConfig names.

`diff-in-means` is the paper's (refusal.directions), `subspace` widens it (refusal.subspace), `rdo` learns
a direction or cone by gradient (refusal.rdo, trained and scored here), `harmfulness` is Zhao et al.'s
(refusal.harmfulness); each writes the same direction folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from . import artifacts
from .config import as_dict
from .activations import last_logits
from .data import Prompt, direction_sets, instructions
from .directions import Direction, DirectionConfig, compute_direction, save_direction, with_basis
from .hardware import machine_info
from .harmfulness import compute_harmfulness
from .models import ChatModel
from .metrics import refusal_score_from_logits, refusal_token_ids
from .rdo import (cone_directions, cone_samples, direction_scores, mean_losses, repind, train_basis,
                  training_targets)
from .subspace import compute_subspace


LOSS_ROWS = 16  # training rows on which the learned vectors' and r*'s objective are compared


def compute_rdo(cm: ChatModel, harmful_train: Sequence[Prompt], harmless_train: Sequence[Prompt],
                harmful_val: Sequence[Prompt], harmless_val: Sequence[Prompt], config: DirectionConfig,
                checkpoint: Path | None = None):
    """RDO (refusal.rdo): the paper's direction r* (its layer, position and norm alpha), the targets, the
    trained basis of config.k (default 1) vectors, and the validation scores of the basis vectors, r*, the
    whole span and config.rdo.cone_samples sampled cone directions, with RepInd between r* and the basis
    vectors. Returns (Direction with its basis, diffs, the paper's candidates table, {name: table})."""
    rc, k, bs = config.rdo, config.k or 1, config.batch_size
    dim, diffs, df = compute_direction(cm, harmful_train, harmless_train, harmful_val, harmless_val, config)
    timer = artifacts.Timer()
    ht, bt = (cm.chat.encode_all(instructions(s)) for s in (harmful_train, harmless_train))
    hv, bv = (cm.chat.encode_all(instructions(s)) for s in (harmful_val, harmless_val))
    alpha = float(dim.mean_diff.norm())
    with timer("targets"):
        targets = training_targets(cm, ht, bt, dim.mean_diff, dim.layer, rc.target_tokens, bs)
    with timer("training"):
        basis, losses = train_basis(cm, k, ht, bt, targets, alpha, dim.layer, rc, checkpoint)
    with timer("validation"):
        base = last_logits(cm, bv, bs)
        ref = refusal_token_ids(cm.tokenizer)
        rows = [{"direction": "none", "bypass": float(refusal_score_from_logits(last_logits(cm, hv, bs), ref).mean()),
                 "induce": float(refusal_score_from_logits(base, ref).mean()), "kl": 0.0, "mediates": False}]
        named = {"r*": dim.vector.float(), **{f"b{i}": basis[i] for i in range(k)}}
        rows += [{"direction": n, "cos_with_r*": float(v @ dim.vector.float()),
                  **direction_scores(cm, v, alpha, dim.layer, hv, bv, base, bs)} for n, v in named.items()]
        if k > 1:
            rows.append({"direction": "span", "cos_with_r*": float((basis @ dim.vector.float()).norm()),
                         **direction_scores(cm, basis, alpha, dim.layer, hv, bv, base, bs)})
            coeffs = cone_samples(k, rc.cone_samples, torch.Generator().manual_seed(10_007 + rc.seed))
            for j, u in enumerate(cone_directions(basis.double(), coeffs).float()):
                rows.append({"direction": f"sample{j}", "cos_with_r*": float(u @ dim.vector.float()),
                             **direction_scores(cm, u, alpha, dim.layer, hv, bv, base, bs)})
        scores = pd.DataFrame(rows)
        independence = repind(cm, named, hv, bs)
        # the training objective of r* and of each basis vector on the same training rows
        objective = {n: mean_losses(cm, v, ht, bt, targets, alpha, dim.layer, LOSS_ROWS, rc.batch)
                     for n, v in named.items()}
    samples = scores[scores.direction.str.startswith("sample")]
    learned = scores[scores.direction.str.startswith("b")]
    weights = {"ablation": rc.ablation_weight, "addition": rc.addition_weight, "retain": rc.retain_weight}
    summary = {
        "none": scores[scores.direction == "none"].iloc[0][["bypass", "induce"]].to_dict(),
        "objective": {n: {**o, "loss": sum(weights[k] * v for k, v in o.items())} for n, o in objective.items()},
        "basis": learned[["bypass", "induce", "kl"]].mean().to_dict(),
        "every_basis_vector_mediates": bool(learned.mediates.all()),
        **({"cone_samples": len(samples), "cone_samples_mediating": int(samples.mediates.sum()),
            "cone_sample_bypass_max": float(samples.bypass.max()), "cone_sample_induce_min": float(samples.induce.min()),
            "span": scores[scores.direction == "span"].iloc[0][["bypass", "induce", "kl"]].to_dict()}
           if k > 1 else {}),
        "r*": scores[scores.direction == "r*"].iloc[0][["bypass", "induce", "kl"]].to_dict(),
        "repind_with_r*": float(independence[independence.ablated.eq("r*") | independence.read.eq("r*")].repind.mean()),
    }
    meta = {**dim.meta, "method": "rdo", "cone": k > 1, "rdo": as_dict(rc), "alpha": alpha,
            "rdo_scores": summary, "scores": {"bypass": float(learned.bypass.iloc[0]),
                                              "induce": float(learned.induce.iloc[0]), "kl": float(learned.kl.iloc[0])},
            "timings_s": {**dim.meta["timings_s"], **timer.seconds},
            "training_s_per_step": float(losses.seconds.median()) if len(losses) else None,
            "machine": machine_info(cm.device),
            "selection": f"learned by gradient from a random start (seed {rc.seed}), {rc.steps} steps; the "
                         f"difference in means r* at layer {dim.layer}, position {dim.position} gives the targets, "
                         "the addition's layer and norm"}
    one = Direction(basis[0], basis[0] * alpha, dim.layer, dim.position, meta, dim.mean_diffs, dim.harmless_means)
    direction = with_basis(one, basis) if k > 1 else one
    return direction, diffs, df, {"rdo_scores.csv": scores, "rdo_losses.csv": losses, "rdo_repind.csv": independence}


def find_direction(cm: ChatModel, config: DirectionConfig, out: str | Path) -> Direction:
    """The direction stage: the prompt sets config names (built-in splits, or files split by the seed), the
    direction of config.method computed and selected, written atomically to `out` (direction.safetensors,
    direction.json with the config, candidates.csv; subspaces.csv for a subspace). Returns the direction."""
    config.validate()
    ht, bt, hv, bv = direction_sets(config.harmful, config.harmless, config.n_train, config.n_val, config.seed)
    tables = {}
    if config.method == "harmfulness":
        direction, diffs, df = compute_harmfulness(cm, ht, bt, hv, bv, config.batch_size, config.layer)
    elif config.method == "subspace":
        direction, diffs, df, subspaces = compute_subspace(cm, ht, bt, hv, bv, config)
        tables = {"subspaces.csv": subspaces}
    elif config.method == "rdo":
        checkpoint = Path(out).with_name(Path(out).name + ".rdo-checkpoint.pt")
        direction, diffs, df, tables = compute_rdo(cm, ht, bt, hv, bv, config, checkpoint)
    else:
        direction, diffs, df = compute_direction(cm, ht, bt, hv, bv, config)
    record = {**as_dict(config), "harmful": config.harmful or "builtin", "harmless": config.harmless or "builtin"}
    with artifacts.atomic_dir(out) as tmp:  # a failed or killed run never leaves a half-written direction
        save_direction(tmp, direction, diffs, df, config=record)
        for name, table in tables.items():
            artifacts.write_csv(tmp / name, table)
    if config.method == "rdo":
        checkpoint.unlink(missing_ok=True)  # the folder is whole: nothing left to resume
    return direction
