"""Projection metrics: how strongly the last prompt position's residual stream points along the refusal
direction, at every layer, per prompt and condition (harmful, random_suffix, adversarial_suffix,
harmless)."""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
import torch

from refusal.activations import cache_activations
from refusal.chat import Encoded, Placement
from refusal.models import ChatModel


def condition_encodings(cm: ChatModel, harmful: Sequence[str], harmless: Sequence[str],
                        adversarial: Sequence[int] | str | None, random: Sequence[int] | str | None,
                        placement: Placement | None = None) -> dict[str, list[Encoded]]:
    """The four conditions as encodings: harmful prompts bare, with the random suffix, with the
    adversarial suffix (both where `placement` puts them); harmless prompts bare. Conditions whose suffix
    is None are left out."""
    out = {"harmful": cm.chat.encode_all(harmful)}
    if random is not None:
        out["random_suffix"] = cm.chat.encode_all(harmful, random, placement)
    if adversarial is not None:
        out["adversarial_suffix"] = cm.chat.encode_all(harmful, adversarial, placement)
    out["harmless"] = cm.chat.encode_all(harmless)
    return out


@torch.no_grad()
def last_position_activations(cm: ChatModel, encs: Sequence[Encoded], batch_size: int = 32) -> torch.Tensor:
    """acts[prompt, layer, d]: the residual stream at every block's input at the last prompt position."""
    return cache_activations(cm, encs, positions=[-1], batch_size=batch_size, desc=None)[:, :, 0]


def projection_table(acts: Mapping[str, torch.Tensor], direction: torch.Tensor) -> pd.DataFrame:
    """acts: {condition: acts[prompt, layer, d]} -> DataFrame(prompt_id, condition, layer, cosine,
    projection): the cosine similarity with the direction and the scalar projection x . r/|r|."""
    r = direction.float() / direction.float().norm()
    frames = []
    for cond, a in acts.items():
        a = a.float()
        proj = a @ r  # [prompt, layer]
        cos = proj / a.norm(dim=-1).clamp_min(1e-12)
        n, L = proj.shape
        frames.append(pd.DataFrame({
            "prompt_id": torch.arange(n).repeat_interleave(L).numpy(),
            "condition": cond,
            "layer": torch.arange(L).repeat(n).numpy(),
            "cosine": cos.flatten().numpy(),
            "projection": proj.flatten().numpy(),
        }))
    return pd.concat(frames, ignore_index=True)


def subspace_table(acts: Mapping[str, torch.Tensor], basis: torch.Tensor) -> pd.DataFrame:
    """A subspace (or cone) as the analysis reads it: acts {condition: [prompt, layer, d]}, basis [k, d]
    orthonormal -> projection_table's columns plus `vector`: each basis vector's rows (b0, b1, ...: its
    signed projection and cosine) and the subspace's (span: the norm of the projection |R x| and
    |R x| / |x|, which no sign can cancel)."""
    b = basis.float()
    frames = [projection_table(acts, v).assign(vector=f"b{i}") for i, v in enumerate(b)]
    for cond, a in acts.items():
        a = a.float()
        norm = (a @ b.T).norm(dim=-1)  # [prompt, layer]
        n, L = norm.shape
        frames.append(pd.DataFrame({
            "prompt_id": torch.arange(n).repeat_interleave(L).numpy(), "condition": cond,
            "layer": torch.arange(L).repeat(n).numpy(),
            "cosine": (norm / a.norm(dim=-1).clamp_min(1e-12)).flatten().numpy(),
            "projection": norm.flatten().numpy(), "vector": "span"}))
    return pd.concat(frames, ignore_index=True)


def projection_metrics(cm: ChatModel, encodings: Mapping[str, Sequence[Encoded]], direction: torch.Tensor,
                       batch_size: int = 32) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """The projection table for every condition, and the activations it was computed from."""
    acts = {c: last_position_activations(cm, e, batch_size) for c, e in encodings.items()}
    return projection_table(acts, direction), acts


def gap_kept(df: pd.DataFrame, layer: int, condition: str = "adversarial_suffix") -> float | None:
    """At `layer`, where `condition`'s mean cosine sits between harmless (0) and harmful (1): the share of the
    harmful-minus-harmless gap it keeps (None where a condition is missing or the gap is 0)."""
    at = df[df.layer == layer].groupby("condition").cosine.mean()
    if not {"harmful", "harmless", condition} <= set(at.index) or at["harmful"] == at["harmless"]:
        return None
    return float((at[condition] - at["harmless"]) / (at["harmful"] - at["harmless"]))
