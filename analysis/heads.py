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

from refusal.activations import batches
from refusal.chat import Encoded
from refusal.hooks import hooks
from refusal.models import ChatModel


def _head_readout(cm: ChatModel, layer: int, r: torch.Tensor) -> torch.Tensor:
    """W_O^T r for one layer: [n_heads * head_dim], so that contribution = z . readout per head slice."""
    from transformers.pytorch_utils import Conv1D

    m = cm.o_proj(layer)
    w = m.weight.float()
    r = r.to(w.device, torch.float32)
    return (w @ r) if isinstance(m, Conv1D) else (w.T @ r)  # Conv1D: out = z @ W; Linear: out = z @ W.T


@torch.no_grad()
def head_contributions(cm: ChatModel, encs: Sequence[Encoded], direction: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """contrib[prompt, layer, head]: each head's direct contribution to the unit direction at the last
    position."""
    r = direction.float() / direction.float().norm()
    H, hd = cm.n_heads, cm.head_dim
    readouts = [_head_readout(cm, l, r).view(H, hd) for l in range(cm.n_layers)]
    out = torch.empty(len(encs), cm.n_layers, H)
    store: dict[int, torch.Tensor] = {}

    def make(layer):
        def hook(m, args, kwargs):
            z = args[0] if args else next(iter(kwargs.values()))
            store[layer] = z[:, -1].float()

        return hook

    handles = [cm.o_proj(l).register_forward_pre_hook(make(l), with_kwargs=True) for l in range(cm.n_layers)]
    with hooks(handles):
        for sl, b in batches(cm, encs, batch_size):
            cm.base(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False)
            for l in range(cm.n_layers):
                z = store[l].view(-1, H, hd)
                out[sl, l] = (z * readouts[l].to(z.device)).sum(-1).cpu()
    return out


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


@torch.no_grad()
def attention_shares(cm: ChatModel, encs: Sequence[Encoded], heads: Sequence[tuple[int, int]],
                     batch_size: int = 16) -> pd.DataFrame:
    """DataFrame(prompt_id, layer, head, instruction, suffix, other): the attention weight from the last
    position summed over the instruction tokens, the suffix tokens and everything else."""
    rows = []
    for sl, b in batches(cm, encs, batch_size):
        out = cm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                       output_attentions=True, use_cache=False)
        atts = out.attentions  # per layer [batch, head, q, k]
        for j, i in enumerate(range(sl.start, sl.stop)):
            e, o = encs[i], int(b.offsets[j])
            for l, h in heads:
                a = atts[l][j, h, -1].float()
                ins = float(a[o + e.instruction[0]: o + e.instruction[1]].sum())
                suf = float(a[o + e.suffix[0]: o + e.suffix[1]].sum())
                rows.append((i, l, h, ins, suf, float(a.sum()) - ins - suf))
        del out
    return pd.DataFrame(rows, columns=["prompt_id", "layer", "head", "instruction", "suffix", "other"])


def attention_table(cm: ChatModel, encodings: Mapping[str, Sequence[Encoded]], heads: Sequence[tuple[int, int]],
                    batch_size: int = 16) -> pd.DataFrame:
    """attention_shares for every condition: DataFrame(prompt_id, condition, layer, head, instruction,
    suffix, other)."""
    frames = []
    for cond, encs in encodings.items():
        df = attention_shares(cm, encs, heads, batch_size)
        df.insert(1, "condition", cond)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)
