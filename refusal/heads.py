"""Refusal heads and attention hijacking.

A head's direct contribution to the direction at the last position is its output through the
attention output projection, dotted with the unit direction: (z_h W_O,h) . r. The heads with the
largest mean contribution over harmful prompts are the refusal heads. For those heads, the attention
from the last position is summed over the instruction tokens, the suffix tokens and the rest
(template and BOS sink), per prompt and condition.

For Gemma2 the attention output passes through a norm before it reaches the residual stream, so the
contribution measured before that norm is only proportional to the direct effect, not equal to it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
import torch

from .chat import Encoded
from .models import ChatModel

from .capture import REGIONS, capture_last_position


def _head_readout(cm: ChatModel, layer: int, r: torch.Tensor) -> torch.Tensor:
    """W_O^T r for one layer: [n_heads * head_dim], so that contribution = z . readout per head slice."""
    from transformers.pytorch_utils import Conv1D

    m = cm.o_proj(layer)
    w = m.weight.float()
    r = r.to(w.device, torch.float32)
    return (w @ r) if isinstance(m, Conv1D) else (w.T @ r)  # Conv1D: out = z @ W; Linear: out = z @ W.T


def contributions(cm: ChatModel, z: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """contrib[prompt, layer, head] from head outputs z[prompt, layer, n_heads * head_dim] at the last
    position: each head's output through the output projection, dotted with the unit direction."""
    r = direction.float() / direction.float().norm()
    H, hd = cm.n_heads, cm.head_dim
    readout = torch.stack([_head_readout(cm, l, r).cpu().view(H, hd) for l in range(cm.n_layers)])  # [layer, H, hd]
    return (z.float().view(len(z), cm.n_layers, H, hd) * readout).sum(-1)


@torch.no_grad()
def head_contributions(cm: ChatModel, encs: Sequence[Encoded], direction: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """contrib[prompt, layer, head]: each head's direct contribution to the unit direction at the last
    position."""
    return contributions(cm, capture_last_position(cm, encs, batch_size, attention=False).z, direction)


def heads_table(contribs: Mapping[str, torch.Tensor], top_k: int = 8, rank_by: str = "harmful") -> pd.DataFrame:
    """{condition: contrib[prompt, layer, head]} -> DataFrame(layer, head, condition, contribution, rank):
    mean contribution per head and condition; rank 1 is the head with the largest mean contribution
    under `rank_by` (the refusal heads are ranks 1..top_k). All heads are listed."""
    ref = contribs[rank_by].mean(0)  # [layer, head]
    L, H = ref.shape
    order = torch.argsort(ref.flatten(), descending=True)
    rank = torch.empty(L * H, dtype=torch.long)
    rank[order] = torch.arange(1, L * H + 1)
    rows = []
    for cond, c in contribs.items():
        m = c.mean(0)
        for l in range(L):
            for h in range(H):
                rows.append((l, h, cond, float(m[l, h]), int(rank[l * H + h])))
    df = pd.DataFrame(rows, columns=["layer", "head", "condition", "contribution", "rank"])
    return df.sort_values(["rank", "condition"]).reset_index(drop=True)


def top_heads(df: pd.DataFrame, k: int = 8) -> list[tuple[int, int]]:
    """The (layer, head) pairs of ranks 1..k."""
    top = df[df["rank"] <= k].drop_duplicates(["layer", "head"]).sort_values("rank")
    return [(int(l), int(h)) for l, h in zip(top["layer"], top["head"])]


def shares_table(regions: torch.Tensor, heads: Sequence[tuple[int, int]]) -> pd.DataFrame:
    """DataFrame(prompt_id, layer, head, instruction, suffix, other) for the given heads, from the
    attention by region regions[prompt, layer, head, 3] (capture.capture_last_position)."""
    rows = []
    for i in range(len(regions)):
        for l, h in heads:
            ins, suf, other = regions[i, l, h].tolist()
            rows.append((i, l, h, ins, suf, other))
    return pd.DataFrame(rows, columns=["prompt_id", "layer", "head", *REGIONS])


def attention_shares(cm: ChatModel, encs: Sequence[Encoded], heads: Sequence[tuple[int, int]],
                     batch_size: int = 16) -> pd.DataFrame:
    """DataFrame(prompt_id, layer, head, instruction, suffix, other): the attention weight from the last
    position summed over the instruction tokens, the suffix tokens and everything else."""
    return shares_table(capture_last_position(cm, encs, batch_size).regions, heads)


def attention_table_from(regions: Mapping[str, torch.Tensor], heads: Sequence[tuple[int, int]]) -> pd.DataFrame:
    """shares_table for every condition, from {condition: regions[prompt, layer, head, 3]}."""
    frames = []
    for cond, reg in regions.items():
        df = shares_table(reg, heads)
        df.insert(1, "condition", cond)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)
