"""The harmfulness direction (Zhao et al. 2025, "LLMs Encode Harmfulness and Refusal Separately").

h_l = mean over harmful of x_{l,t} - mean over harmless of x_{l,t}, with t the instruction's last token
(before the post-instruction template, where Zhao et al. find the model's own judgement of harm) and x_{l,t}
the residual stream at the input of block l. Every layer is a candidate; the chosen layer is the one
where harmful and harmless *validation* prompts separate best along the unit h_l: the accuracy of the
midpoint rule (a prompt is called harmful when its projection exceeds the midpoint of the two training
means' projections), ties to the larger d' ((mean harmful - mean harmless) / pooled standard deviation
of the validation projections). Each layer's row also keeps the cosine of h_l with the refusal direction's
candidate at the same layer and the last post-instruction position, r(l, -1): how far apart the two
directions are.

The folder is a direction folder like the paper's: `position` is the instruction's last token, counted
from the end like the post-instruction positions (-(n_post + 1)), and `mean_diffs`/`harmless_means` hold
that position and the post-instruction ones ([layer, n_post + 1, d]).
"""
from __future__ import annotations

import math
from typing import Sequence

import pandas as pd
import torch

from . import artifacts
from .activations import cache_activations
from .chat import Encoded
from .data import Prompt, instructions, prompt_hash
from .directions import Direction
from .errors import RefusalLabError
from .models import ChatModel


def instruction_position(encs: Sequence[Encoded]) -> int:
    """The instruction's last token as a negative index from the end, the same in every prompt (the
    post-instruction template follows the instruction directly); a one-line error otherwise."""
    offsets = {e.instruction[1] - 1 - len(e.ids) for e in encs}
    if len(offsets) != 1 or any(e.instruction[1] != e.post[0] or e.instruction[1] <= e.instruction[0] for e in encs):
        raise RefusalLabError("the chat template does not put the post-instruction tokens right after the "
                              "instruction in every prompt: the instruction's last token has no fixed position")
    return offsets.pop()


def separation(train_h: torch.Tensor, train_b: torch.Tensor, val_h: torch.Tensor,
               val_b: torch.Tensor) -> pd.DataFrame:
    """acts[prompt, layer, d] of the four sets -> per layer: the difference in means' norm, the validation
    accuracy of the midpoint rule along it and d'."""
    rows = []
    mh, mb = train_h.double().mean(0), train_b.double().mean(0)  # [layer, d]
    for layer in range(mh.shape[0]):
        r = mh[layer] - mb[layer]
        norm = float(r.norm())
        if norm == 0 or not math.isfinite(norm):
            rows.append(dict(layer=layer, norm=norm, val_accuracy=float("nan"), d_prime=float("nan")))
            continue
        u = r / norm
        mid = float((mh[layer] + mb[layer]) @ u) / 2
        ph, pb = val_h[:, layer].double() @ u, val_b[:, layer].double() @ u
        acc = (float((ph > mid).sum()) + float((pb <= mid).sum())) / (len(ph) + len(pb))
        spread = math.sqrt((float(ph.var(unbiased=False)) + float(pb.var(unbiased=False))) / 2)
        d_prime = (float(ph.mean()) - float(pb.mean())) / spread if spread > 0 else float("inf")
        rows.append(dict(layer=layer, norm=norm, val_accuracy=acc, d_prime=d_prime))
    return pd.DataFrame(rows)


def compute_harmfulness(cm: ChatModel, harmful_train: Sequence[Prompt], harmless_train: Sequence[Prompt],
                        harmful_val: Sequence[Prompt], harmless_val: Sequence[Prompt], batch_size: int = 32,
                        layer: int | None = None):
    """The harmfulness direction on given prompt sets. `layer` pins the layer (every layer is still
    scored). Returns (Direction, diffs[layer, n_post + 1, d], candidates table)."""
    for name, s in (("harmful train", harmful_train), ("harmless train", harmless_train),
                    ("harmful val", harmful_val), ("harmless val", harmless_val)):
        if not s:
            raise RefusalLabError(f"the {name} prompt set is empty")
    if layer is not None and not 0 <= layer < cm.n_layers:
        raise RefusalLabError(f"--layer {layer} is out of range: this model has layers 0 to {cm.n_layers - 1}")
    timer = artifacts.Timer()
    sets = [cm.chat.encode_all(instructions(s)) for s in (harmful_train, harmless_train, harmful_val, harmless_val)]
    pos = instruction_position([e for s in sets for e in s])
    positions = list(range(pos, 0))  # the instruction's last token, then the post-instruction positions
    with timer("activations"):
        th, tb, vh, vb = (cache_activations(cm, s, positions, batch_size, desc=f"{name} activations")
                          for s, name in zip(sets, ("harmful train", "harmless train", "harmful val",
                                                    "harmless val")))
    diffs = th.float().mean(0) - tb.float().mean(0)  # [layer, n_post + 1, d]
    harmless_means = tb.float().mean(0)
    with timer("selection"):
        df = separation(th[:, :, 0], tb[:, :, 0], vh[:, :, 0], vb[:, :, 0])
        refusal = diffs[:, -1].double()  # r(l, -1): the refusal direction's candidate at each layer
        h = diffs[:, 0].double()
        df["cos_with_refusal_candidate"] = (torch.nn.functional.cosine_similarity(h, refusal, dim=-1)).tolist()
        df["position"] = pos
        scored = df[df.val_accuracy.notna()]
        if scored.empty:
            raise RefusalLabError("harmful and harmless prompts have the same mean activation at the instruction's "
                                  "last token at every layer; check that the two prompt sets differ")
        best = int(scored.sort_values(["val_accuracy", "d_prime"], ascending=False).index[0]) if layer is None else layer
        df["selected"] = df.index == best
    row = df.loc[best]
    r = diffs[best, 0]
    if not float(r.norm()) > 0:
        raise RefusalLabError(f"the difference in means at layer {best} is zero; pin another --layer")
    meta = {
        "method": "harmfulness", "layer": best, "position": pos, "n_layers": cm.n_layers,
        "n_positions": int(diffs.shape[1]), "d_model": cm.d_model,
        "scores": {"val_accuracy": float(row.val_accuracy), "d_prime": float(row.d_prime),
                   "cos_with_refusal_candidate": float(row.cos_with_refusal_candidate)},
        "selection": ("PINNED by the user" if layer is not None else
                      "the highest validation accuracy of the midpoint rule, ties to the larger d'"),
        "mean_diff_norm": float(r.norm()), "model": cm.describe(),
        "prompts": {name: {"n": len(s), "hash": prompt_hash(s)} for name, s in
                    (("harmful_train", harmful_train), ("harmless_train", harmless_train),
                     ("harmful_val", harmful_val), ("harmless_val", harmless_val))},
        "timings_s": timer.seconds,
    }
    return Direction(r / r.norm(), r.clone(), best, pos, meta, diffs, harmless_means), diffs, df
