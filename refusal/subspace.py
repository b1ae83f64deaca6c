"""Refusal subspaces: the paper's direction r* = r(l*, i*) widened to k dimensions, k chosen on validation.

Two constructions, each a basis whose first vector is r* (so everything that reads one direction reads the
paper's), the other k - 1 taken from what is left once r* is projected out:
- candidates: the top right singular vectors of the unit difference-in-means candidates at every
  post-instruction position of layers l* - WINDOW .. l* + WINDOW (the directions the paper's selection
  chose among: does refusal spread over neighbouring candidates?);
- pca: the top principal directions (uncentred) of the per-prompt differences x_j - mean harmless at
  (l*, i*), over the harmful training prompts j (what varies between harmful prompts beyond their mean).
Every (construction, k) for k = 2 .. K, and the paper's k = 1, is scored on the validation prompts as the
paper scores a candidate: bypass (the mean refusal score of harmful prompts with the subspace ablated) and
KL (of harmless prompts' last-position logits under the ablation). The chosen one has the lowest bypass
among those whose KL is at most the threshold or the one direction's own KL, whichever is larger (a
subspace may not cost more than the direction it widens); the table of all is kept in the folder. A
user may pin the construction and k instead (config.construction), as they may pin the paper's layer.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

from .activations import cache_activations, last_logits
from .data import Prompt, instructions
from .directions import SUBSPACE_K, DirectionConfig, ablation_scores, compute_direction, with_basis
from .errors import RefusalLabError
from .metrics import refusal_token_ids
from .models import ChatModel

CONSTRUCTIONS = ("candidates", "pca")
WINDOW = 2  # layers on each side of the direction's layer whose candidates span the "candidates" subspace


def _top_beyond(vectors: torch.Tensor, r: torch.Tensor, n: int) -> torch.Tensor:
    """vectors [m, d] with the unit r [d] projected out -> their top n right singular vectors [n, d]."""
    v = vectors.double()
    u = r.double() / r.double().norm()
    rest = v - (v @ u)[:, None] * u
    _, s, vh = torch.linalg.svd(rest, full_matrices=False)
    if len(s) < n or s[n - 1] <= 1e-9 * max(float(s[0]), 1e-30):
        raise RefusalLabError(f"only {int((s > 1e-9 * s[0]).sum())} directions beyond the refusal direction here; "
                              f"lower --k to at most {int((s > 1e-9 * s[0]).sum()) + 1}")
    return vh[:n].float()


def candidate_span(diffs: torch.Tensor, layer: int, r: torch.Tensor, k: int) -> torch.Tensor:
    """The "candidates" basis vectors [k, d] (r first): diffs[layer, pos, d] near `layer`, unit, beyond r."""
    lo, hi = max(0, layer - WINDOW), min(diffs.shape[0], layer + WINDOW + 1)
    cands = diffs[lo:hi].reshape(-1, diffs.shape[-1]).float()
    cands = cands[cands.norm(dim=-1) > 0]
    cands = cands / cands.norm(dim=-1, keepdim=True)
    return torch.cat([r[None].float(), _top_beyond(cands, r, k - 1)])


def pca_span(harmful_at: torch.Tensor, harmless_at: torch.Tensor, r: torch.Tensor, k: int) -> torch.Tensor:
    """The "pca" basis vectors [k, d] (r first): per-prompt differences harmful_at[j] - mean harmless_at."""
    per_prompt = harmful_at.float() - harmless_at.float().mean(0)
    return torch.cat([r[None].float(), _top_beyond(per_prompt, r, k - 1)])


def compute_subspace(cm: ChatModel, harmful_train: Sequence[Prompt], harmless_train: Sequence[Prompt],
                     harmful_val: Sequence[Prompt], harmless_val: Sequence[Prompt], config: DirectionConfig):
    """The paper's direction, then every construction and k up to config.k scored on the validation prompts
    and the best kept (see the module's docstring). Returns (Direction with its basis, diffs, the paper's
    candidates table, the subspaces' table)."""
    direction, diffs, df = compute_direction(cm, harmful_train, harmless_train, harmful_val, harmless_val, config)
    layer, pos, r = direction.layer, direction.position, direction.vector
    hv = cm.chat.encode_all(instructions(harmful_val))
    bv = cm.chat.encode_all(instructions(harmless_val))
    ref_ids, bs = refusal_token_ids(cm.tokenizer), config.batch_size
    base = last_logits(cm, bv, bs)
    at = [cache_activations(cm, cm.chat.encode_all(instructions(s)), [pos], bs, desc=f"{name} at the direction")
          [:, layer, 0] for s, name in ((harmful_train, "harmful"), (harmless_train, "harmless"))]
    bases = {("one direction", 1): r[None]}
    top = config.k or SUBSPACE_K
    for k in range(2 if config.construction == "best" else top, top + 1):
        if config.construction in ("best", "candidates"):
            bases[("candidates", k)] = candidate_span(diffs, layer, r, k)
        if config.construction in ("best", "pca"):
            bases[("pca", k)] = pca_span(at[0], at[1], r, k)
    rows = []
    for (construction, k), vectors in bases.items():
        bypass, kl = ablation_scores(cm, vectors, hv, bv, base, ref_ids, bs)
        rows.append(dict(construction=construction, k=k, bypass_score=bypass, kl_score=kl))
    table = pd.DataFrame(rows)
    bound = max(config.kl_threshold, float(table.kl_score[0]))
    if config.construction == "best":
        allowed = table[table.kl_score <= bound]
        best = int(allowed.bypass_score.idxmin())
        rule = (f"the lowest bypass among constructions with KL <= {bound:.4g} (the threshold or the one "
                "direction's own KL, the larger)")
    else:
        best = len(table) - 1
        rule = f"PINNED by the user to {config.construction} at k = {top}"
    table["selected"] = table.index == best
    pick = table.loc[best]
    provenance = {"method": "subspace", "construction": pick.construction, "window_layers": WINDOW,
                  "subspace_scores": {"bypass": float(pick.bypass_score), "kl": float(pick.kl_score)},
                  "subspace_rule": rule,
                  "subspaces": table.to_dict("records")}
    chosen = with_basis(direction, bases[(pick.construction, int(pick.k))], **provenance)
    return chosen, diffs, df, table
