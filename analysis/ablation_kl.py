"""What directional ablation costs on harmless prompts, for the refusal direction and for baselines.

The paper's selection drops candidates whose ablation moves the harmless last-position distribution by
KL > 0.1. On a small model that bar can sit near the cost of ablating *any* direction, so this compares:
  - the selected direction;
  - the same direction with the residual stream's massive-activation dimensions zeroed (the dimensions
    whose mean |activation| is many times the median: the attention sink's, which ablation at every
    position, the first token included, disturbs);
  - seeded random unit directions, with and without those dimensions.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
import torch

from refusal.activations import last_logits
from refusal.chat import Encoded
from refusal.hooks import ablate_direction, capture_block_inputs
from refusal.metrics import kl_divergence
from refusal.models import ChatModel


@torch.no_grad()
def massive_dims(cm: ChatModel, encs: Sequence[Encoded], layer: int, factor: float = 5.0) -> tuple[list[int], torch.Tensor]:
    """Dimensions whose mean |activation| at block `layer`'s input, over every token of `encs`, is more
    than `factor` x the median dimension's; and the largest value each reaches (on any token)."""
    acts: dict[int, torch.Tensor] = {}
    mags, peaks = [], []
    for e in encs:
        with capture_block_inputs(cm, acts, [layer]):
            cm.model(torch.tensor([e.ids], device=cm.device))
        x = acts[layer][0].float().cpu()
        mags.append(x.abs().mean(0))
        peaks.append(x.abs().amax(0))
    mag = torch.stack(mags).mean(0)
    dims = torch.nonzero(mag > factor * mag.median()).flatten()
    return dims.tolist(), torch.stack(peaks).amax(0)[dims]


@torch.no_grad()
def ablation_kl(cm: ChatModel, directions: Mapping[str, torch.Tensor], harmless: Sequence[Encoded],
                batch_size: int = 32) -> pd.DataFrame:
    """KL(P || P_ablated) of the last-position logits on `harmless` for each named direction
    (directional ablation at every layer and position, as in the paper). One row per direction."""
    base = last_logits(cm, harmless, batch_size)
    rows = []
    for name, v in directions.items():
        with ablate_direction(cm, v):
            kl = kl_divergence(base, last_logits(cm, harmless, batch_size))
        rows.append({"direction": name, "kl_mean": kl.mean().item(), "kl_median": kl.median().item(),
                     "kl_max": kl.max().item()})
    return pd.DataFrame(rows)


def random_directions(d: int, n: int, seed: int = 0, zero: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """n seeded random unit directions in R^d, with the `zero` dimensions set to 0 before normalising."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k in range(n):
        v = torch.randn(d, generator=gen)
        v[list(zero)] = 0
        out[f"random {k}" + (" (massive dims zeroed)" if len(zero) else "")] = v / v.norm()
    return out


def without(v: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """v with `dims` zeroed, renormalised."""
    v = v.clone().float()
    v[list(dims)] = 0
    return v / v.norm()
