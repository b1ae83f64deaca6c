"""One forward pass per condition for the whole analysis: at the last prompt position, the residual
stream at every block's input, every head's output (the attention output projection's input), and the
attention of every head summed over the instruction tokens, the suffix tokens and the rest (where the
adversarial part sits inside the user's message, as for refusal.jailbreaks, the instruction is the rest of
that message).

The projection metrics, the head contributions and the attention shares are computed from these
tensors, so the analysis runs the model once per prompt instead of once per measure. The pass uses
refusal.engine.forward_outputs: prompts batched by length, the template prefix run once and cached;
attention weights come from the eager attention implementation, switched on for the pass.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from .engine import eager_attention, forward_outputs
from .chat import Encoded
from .hooks import Hook, capture_hooks, hooked
from .models import ChatModel

REGIONS = ("instruction", "suffix", "other")


@dataclass
class LastPosition:
    resid: torch.Tensor  # [prompt, layer, d]: residual stream at each block's input
    z: torch.Tensor  # [prompt, layer, n_heads * head_dim]: head outputs, the input of the output projection
    regions: torch.Tensor | None  # [prompt, layer, head, 3]: attention summed over REGIONS (None: not captured)


def _key_index(e: Encoded, span: tuple[int, int], p: int, pad: int) -> torch.Tensor:
    """Key positions of the encoding's tokens span[0]..span[1]-1 in a batch row: the first p tokens
    are the cached prefix, the rest follow `pad` padding tokens."""
    t = torch.arange(span[0], span[1])
    return torch.where(t < p, t, t + pad)


@torch.no_grad()
def capture_last_position(cm: ChatModel, encs: Sequence[Encoded], batch_size: int = 16,
                          attention: bool = True) -> LastPosition:
    """Residual stream, head outputs and (attention=True) attention by region at the last position of
    every prompt, in one pass."""
    n, L, H, hd = len(encs), cm.n_layers, cm.n_heads, cm.head_dim
    resid = torch.empty(n, L, cm.d_model)
    z = torch.empty(n, L, H * hd)
    regions = torch.empty(n, L, H, len(REGIONS)) if attention else None
    zs: dict[int, torch.Tensor] = {}
    store: dict[int, torch.Tensor] = {}

    def make(layer):
        def hook(m, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            zs[layer] = x[:, -1].float().cpu()

        return hook

    head_outputs = [Hook(cm.o_proj(l), make(l), "pre") for l in range(L)]
    kw = {"output_attentions": True} if attention else {}
    attn = eager_attention(cm) if attention else contextlib.nullcontext()
    with hooked(head_outputs + capture_hooks(cm, store, positions=[-1])), attn:
        for idx, out, p in forward_outputs(cm, encs, batch_size, **kw):
            for l in range(L):
                resid[idx, l] = store[l][:, 0]
                z[idx, l] = zs[l]
            if not attention:
                continue
            width = out[0].shape[1]
            last = torch.stack([a[:, :, -1].float().cpu() for a in out.attentions], 1)  # [batch, layer, head, key]
            for j, i in enumerate(idx.tolist()):
                e = encs[i]
                pad = width - (len(e) - p)
                a = last[j]
                total = a.sum(-1)
                ins = a[..., _key_index(e, e.instruction, p, pad)].sum(-1)
                suf = a[..., _key_index(e, e.suffix, p, pad)].sum(-1)
                if e.instruction[0] <= e.suffix[0] and e.suffix[1] <= e.instruction[1]:
                    ins = ins - suf  # an adversarial part inside the user's message (refusal.jailbreaks)
                regions[i] = torch.stack([ins, suf, total - ins - suf], -1)
            del out
    return LastPosition(resid, z, regions)
