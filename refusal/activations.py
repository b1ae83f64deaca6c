"""Residual-stream activations and first-reply-position logits of many prompts, through the forward
engine (refusal.engine: batched by length, the chat template's shared prefix run once and cached).
Hooks that are active apply to the prefix pass too, so interventions see every position.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .chat import Encoded
from .engine import forward_batches, shared_prefix_len
from .hooks import capture_block_inputs
from .models import ChatModel


@torch.no_grad()
def last_logits(cm: ChatModel, encs: Sequence[Encoded], batch_size: int = 32, share_prefix: bool = True) -> torch.Tensor:
    """Logits at the last prompt position (the first reply position): [prompt, vocab] float32 CPU."""
    out = None
    for idx, hidden in forward_batches(cm, encs, batch_size, share_prefix):
        logits = cm.logits_from_hidden(hidden[:, -1]).float().cpu()  # [batch, vocab]
        if out is None:
            out = torch.empty(len(encs), logits.shape[-1])
        out[idx] = logits
    return out


@torch.no_grad()
def cache_activations(
    cm: ChatModel,
    encs: Sequence[Encoded],
    positions: Sequence[int] | None = None,
    batch_size: int = 32,
    desc: str = "activations",
    share_prefix: bool = True,
) -> torch.Tensor:
    """Residual stream at the input of every block, at the given positions (negative, from the end;
    default: the post-instruction positions -k..-1). Returns acts[prompt, layer, pos, d] float32 CPU."""
    if positions is None:
        k = encs[0].n_post if encs else cm.chat.n_post
        positions = list(range(-k, 0))
    positions = list(positions)
    if encs and -min(positions) > min(len(e) for e in encs) - (shared_prefix_len(cm, encs) if share_prefix else 0):
        share_prefix = False  # positions reach into the shared prefix
    out = torch.empty(len(encs), cm.n_layers, len(positions), cm.d_model)
    store: dict[int, torch.Tensor] = {}
    with capture_block_inputs(cm, store, positions=positions):
        for idx, _ in forward_batches(cm, encs, batch_size, share_prefix, desc=desc):
            for layer, x in store.items():  # x[batch, pos, d]
                out[idx, layer] = x
    return out
