"""Refusal directions learned by gradient (Wollschläger et al. 2025, "The Geometry of Refusal in Large
Language Models": RDO) and refusal cones of k such directions (their RCO).

A basis B [k, d] of orthonormal unit vectors (k = 1: one direction) is trained from a random start so
that every direction u in the cone {normalise(s @ B): s >= 0} mediates refusal, as three losses say:
  ablation  CE of harmful prompts' ablation targets with u ablated at every layer and write (the paper's
            directional ablation): the targets are the model's own greedy replies with the paper's
            difference-in-means direction r* ablated (it complies);
  addition  CE of harmless prompts' addition targets with alpha u added at the input of r*'s layer, alpha
            = |r*|'s raw norm: the targets are the greedy replies with r* added (it refuses);
  retain    KL(P_ablated || P_clean) over the reply positions of harmless prompts' clean greedy replies,
            summed over positions (ablation must leave harmless replies alone).
loss = ablation_weight * ablation + addition_weight * addition + retain_weight * retain (the paper's 1, 0.2,
1). Each training row gets its own direction: for k > 1, alternately one of the basis vectors (in turn)
and a fresh sample of the cone (s = |N(0, I_k)|, normalised), so a batch trains basis and cone at the cost
of one direction. After each step's AdamW update (the gradient first projected onto each vector's
tangent space, then clipped to norm 10) the basis is made orthonormal again (Gram-Schmidt, signs kept).
The targets are generated once and cached (the project cache, keyed by model, prompts and r*); a
checkpoint every few steps lets a killed run resume where it stopped, with the same result.

On validation prompts, every basis vector, r* and `cone_samples` sampled cone directions are scored as the
paper scores a candidate (bypass: mean refusal score of harmful prompts under ablation; induce: of
harmless prompts under addition; KL of harmless first-reply logits under ablation), and a direction
"mediates refusal" when bypass < 0 < induce (ablating it makes refusal the less likely first token,
adding it the more likely). Representational independence (their RepInd) between any two of r* and
the basis vectors: how far ablating one moves the cosine of the residual stream with the other, at the
last prompt position of harmful validation prompts, over the first 90% of the layers,
repind(a -> b) = mean over prompts and layers of (cos(x_l | a ablated, b) - cos(x_l, b))^2 (0: independent).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from . import artifacts
from .activations import cache_activations, last_logits
from .chat import Encoded
from .config import as_dict, check_fields, option
from .decode import greedy_decode
from .errors import RefusalLabError
from .hooks import (ablate_direction, ablation_sites, add_direction, check_ablation_sites,
                    hooked, input_hook, orthonormal_basis)
from .metrics import kl_divergence, refusal_score_from_logits, refusal_token_ids
from .models import ChatModel, cache_dir

REPIND_LAYER_FRACTION = 0.9  # RepInd reads the first 90% of the layers (the paper's)


@dataclass(frozen=True)
class RDOConfig:
    """Training a refusal direction or cone by gradient (refusal.rdo)."""

    steps: int = option(64, "optimiser steps", ge=1)
    batch: int = option(4, "training prompts per step, for each of the three losses", ge=1)
    lr: float = option(1e-2, "AdamW learning rate (the paper's)", gt=0)
    target_tokens: int = option(30, "greedy tokens of each training target, generated once and cached (the "
                                    "paper's 30)", ge=1)
    ablation_weight: float = option(1.0, "weight of the ablation loss (harmful prompts comply)", ge=0)
    addition_weight: float = option(0.2, "weight of the addition loss (harmless prompts refuse)", ge=0)
    retain_weight: float = option(1.0, "weight of the retain loss (KL on harmless replies)", ge=0)
    seed: int = option(0, "seed of the random start and of the training order", ge=0)
    cone_samples: int = option(16, "cone directions sampled on validation prompts to test that each mediates "
                                   "refusal (k > 1)", ge=1)
    checkpoint_every: int = option(8, "steps between checkpoints (a killed run resumes from the last)", ge=1)

    def validate(self) -> None:
        check_fields(self)

    def checks(self) -> None:
        if self.ablation_weight + self.addition_weight + self.retain_weight == 0:
            raise RefusalLabError("every RDO loss weight is 0: nothing to train")


# ----------------------------------------------------------------------------- the cone


def cone_samples(k: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n nonnegative unit coefficient vectors [n, k] (|N(0, I_k)| normalised): directions in the cone."""
    s = torch.randn(n, k, generator=generator, dtype=torch.float64).abs()
    return s / s.norm(dim=-1, keepdim=True)


def cone_directions(basis: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """basis [k, d], coefficients [n, k] >= 0 -> unit directions [n, d] in the cone."""
    u = coeffs.to(basis.dtype) @ basis
    return u / u.norm(dim=-1, keepdim=True)


def row_coefficients(k: int, n: int, first: int, generator: torch.Generator) -> torch.Tensor:
    """The coefficients [n, k] of training rows first .. first + n - 1: k = 1 the one direction; else even
    rows a basis vector in turn, odd rows a fresh cone sample."""
    if k == 1:
        return torch.ones(n, 1, dtype=torch.float64)
    out = cone_samples(k, n, generator)
    for j in range(n):
        if (first + j) % 2 == 0:
            out[j] = 0
            out[j, ((first + j) // 2) % k] = 1
    return out


# ----------------------------------------------------------------------------- row-wise interventions


def _row_ablation(u: torch.Tensor):
    """x [b, s, d] <- x - (x . u_b) u_b with one unit direction per row, u [b, d] (differentiable)."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        v = u.to(device=x.device, dtype=x.dtype)[:, None]  # the basis stays on the CPU, in float32
        return x - (x * v).sum(-1, keepdim=True) * v
    return fn


def row_ablation_hooks(cm: ChatModel, u: torch.Tensor):
    """Directional ablation of a different unit direction per batch row, at every layer and write."""
    if not cm.sites_checked:
        check_ablation_sites(cm)
    return ablation_sites(cm, None, _row_ablation(u))


def row_addition_hooks(cm: ChatModel, v: torch.Tensor, layer: int):
    """x <- x + v_b at block `layer`'s input, one vector per batch row, v [b, d] (differentiable)."""
    return [input_hook(cm.blocks[layer], lambda x: x + v.to(device=x.device, dtype=x.dtype)[:, None])]


# ----------------------------------------------------------------------------- targets


def _targets_key(cm: ChatModel, encs: Sequence[Sequence[Encoded]], r: torch.Tensor, layer: int, n: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([cm.fingerprint, layer, n, [[e.ids for e in s] for s in encs]]).encode())
    h.update(r.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def training_targets(cm: ChatModel, harmful: Sequence[Encoded], harmless: Sequence[Encoded], mean_diff: torch.Tensor,
                     layer: int, n_tokens: int, batch_size: int = 32) -> dict[str, list[list[int]]]:
    """The three target sets, greedy replies of n_tokens: `ablation` (harmful prompts, r* ablated),
    `addition` (harmless prompts, r* added at its layer) and `retain` (harmless prompts, no intervention).
    Generated once and cached under the project cache (keyed by model, prompts, r* and n_tokens)."""
    path = cache_dir() / "rdo-targets" / f"{_targets_key(cm, (harmful, harmless), mean_diff, layer, n_tokens)}.json"
    if path.is_file():
        try:
            cached = artifacts.read_json(path)
            if set(cached) == {"ablation", "addition", "retain"}:
                return cached
        except RefusalLabError:
            pass  # an unreadable cache is made again
    with ablate_direction(cm, mean_diff):
        ablation = greedy_decode(cm, harmful, n_tokens, batch_size)[0]
    with add_direction(cm, mean_diff, layer):
        addition = greedy_decode(cm, harmless, n_tokens, batch_size)[0]
    retain = greedy_decode(cm, harmless, n_tokens, batch_size)[0]
    out = {"ablation": ablation, "addition": addition, "retain": retain}
    artifacts.write_json(path, out)
    return out


def batch_of(cm: ChatModel, prompts: Sequence[Encoded], targets: Sequence[Sequence[int]]):
    """Right-padded prompt + target rows: (input_ids [b, s], attention_mask [b, s], target mask [b, s]
    marking the positions whose next token is a target token, labels [b, s] there)."""
    seqs = [list(p.ids) + list(t) for p, t in zip(prompts, targets)]
    width = max(len(s) for s in seqs)
    pad = cm.tokenizer.pad_token_id if cm.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    tmask = torch.zeros((len(seqs), width), dtype=torch.bool)
    labels = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        n, m = len(p.ids), len(t)
        ids[i, :n + m] = torch.as_tensor(seqs[i])
        mask[i, :n + m] = 1
        tmask[i, n - 1:n + m - 1] = True
        labels[i, n - 1:n + m - 1] = torch.as_tensor(list(t))
    dev = cm.device
    return ids.to(dev), mask.to(dev), tmask.to(dev), labels.to(dev)


def _target_logits(cm: ChatModel, batch) -> torch.Tensor:
    """Logits [n_target_tokens, vocab] (float32) at the batch's target positions only (the LM head is the
    largest matrix: the prompt positions skip it)."""
    ids, mask, tmask, _ = batch
    hidden = cm.base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return cm.logits_from_hidden(hidden[tmask]).float()


def _per_row(values: torch.Tensor, tmask: torch.Tensor, mean: bool) -> torch.Tensor:
    """values [n_target_tokens] (in tmask's row-major order) -> the mean over rows of each row's mean (or
    sum) over its target tokens."""
    counts = tmask.sum(-1).to(values.device)  # [b]
    row = torch.repeat_interleave(torch.arange(len(counts), device=values.device), counts)
    w = 1.0 / counts.clamp(min=1)[row].to(values.dtype) if mean else torch.ones_like(values)
    return (values * w).sum() / len(counts)


# ----------------------------------------------------------------------------- training


def step_losses(cm: ChatModel, u_harmful: torch.Tensor, u_harmless: torch.Tensor, alpha: float, layer: int,
                harmful_batch, addition_batch, retain_batch, clean_logp: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three losses of one step: u_* [b, d] unit directions, one per row of each batch (the batch_of
    tuples); clean_logp [n_target_tokens, vocab] the clean model's log-probabilities at the retain batch's
    target positions."""
    def ce(batch, logits):
        _, _, tmask, labels = batch
        return _per_row(F.cross_entropy(logits, labels[tmask].to(logits.device), reduction="none"), tmask, mean=True)

    with hooked(row_ablation_hooks(cm, u_harmful)):
        ablation = ce(harmful_batch, _target_logits(cm, harmful_batch))
    with hooked(row_addition_hooks(cm, alpha * u_harmless, layer)):
        addition = ce(addition_batch, _target_logits(cm, addition_batch))
    with hooked(row_ablation_hooks(cm, u_harmless)):
        logp = torch.log_softmax(_target_logits(cm, retain_batch), -1)
    kl = (logp.exp() * (logp - clean_logp)).sum(-1)  # KL(P_ablated || P_clean) [n_target_tokens]
    retain = _per_row(kl, retain_batch[2], mean=False)
    return {"ablation": ablation, "addition": addition, "retain": retain}


def _orthonormal(basis: torch.Tensor) -> torch.Tensor:
    return orthonormal_basis(basis.detach(), "the RDO basis").to(basis.dtype)


def train_basis(cm: ChatModel, k: int, harmful: Sequence[Encoded], harmless: Sequence[Encoded],
                targets: dict, alpha: float, layer: int, config: RDOConfig, checkpoint: Path | None = None,
                stop_after: int | None = None) -> tuple[torch.Tensor, pd.DataFrame]:
    """Train the basis [k, d] (module docstring). `checkpoint`: a file written every
    config.checkpoint_every steps and read back to resume (it must have been made with the same settings,
    prompts and targets, the number of steps aside: a run resumed with more steps trains on; a one-line
    error otherwise). `stop_after` stops after that many steps (as a kill
    would; the tests' resume). Returns (basis [k, d] float32, the losses per step)."""
    g = torch.Generator().manual_seed(config.seed)
    basis = torch.randn(k, cm.d_model, generator=g, dtype=torch.float32)
    basis = torch.nn.Parameter(_orthonormal(basis))
    opt = torch.optim.AdamW([basis], lr=config.lr, betas=(0.9, 0.98), weight_decay=0.0, amsgrad=True)
    # what decides the trajectory (not the number of steps: a run may be resumed with more)
    same = {k_: v for k_, v in as_dict(config).items() if k_ not in ("steps", "cone_samples", "checkpoint_every")}
    identity = {"config": same, "k": k, "alpha": alpha, "layer": layer,
                "data": _targets_key(cm, (harmful, harmless), torch.tensor([alpha]), layer, config.target_tokens),
                "targets": hashlib.sha256(json.dumps(targets, sort_keys=True).encode()).hexdigest()}
    rows, start = [], 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state.get("identity") != identity:
            raise RefusalLabError(f"{checkpoint} is a checkpoint of another RDO run (other settings, prompts or "
                                  "targets): remove it, or run with the settings that made it")
        with torch.no_grad():
            basis.copy_(state["basis"])
        opt.load_state_dict(state["optimizer"])
        rows, start = state["losses"], state["step"]
        if start > config.steps:
            raise RefusalLabError(f"{checkpoint} has already run {start} steps, more than the {config.steps} asked: "
                                  f"ask for at least {start}, or remove it")

    def save(step: int) -> None:
        if checkpoint is None:
            return
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        with artifacts.atomic_path(checkpoint) as tmp:
            torch.save({"identity": identity, "basis": basis.detach().clone(), "optimizer": opt.state_dict(),
                        "losses": rows, "step": step}, tmp)

    b = config.batch
    weights = {"ablation": config.ablation_weight, "addition": config.addition_weight, "retain": config.retain_weight}
    grads = [p.requires_grad for p in cm.model.parameters()]
    for p in cm.model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for step in range(start, config.steps):
                if stop_after is not None and step >= stop_after:
                    break
                timer = artifacts.Timer()
                with timer("step"):
                    # the step's rows and directions depend on (seed, step) alone, so a resumed run matches
                    sg = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
                    hi = torch.randint(len(harmful), (b,), generator=sg).tolist()
                    bi = torch.randint(len(harmless), (b,), generator=sg).tolist()
                    u_h = cone_directions(basis, row_coefficients(k, b, step * b, sg))
                    u_b = cone_directions(basis, row_coefficients(k, b, step * b + 1, sg))
                    retain_batch = batch_of(cm, [harmless[i] for i in bi], [targets["retain"][i] for i in bi])
                    with torch.no_grad():
                        clean = torch.log_softmax(_target_logits(cm, retain_batch), -1)
                    losses = step_losses(cm, u_h, u_b, alpha, layer,
                                         batch_of(cm, [harmful[i] for i in hi], [targets["ablation"][i] for i in hi]),
                                         batch_of(cm, [harmless[i] for i in bi], [targets["addition"][i] for i in bi]),
                                         retain_batch, clean)
                    total = sum(weights[n] * v for n, v in losses.items())
                    opt.zero_grad()
                    total.backward()
                    with torch.no_grad():
                        basis.grad -= (basis.grad * basis).sum(-1, keepdim=True) * basis  # onto each tangent
                        torch.nn.utils.clip_grad_norm_([basis], 10.0)
                    opt.step()
                    with torch.no_grad():
                        basis.copy_(_orthonormal(basis))
                rows.append({"step": step + 1, "loss": total.item(), **{n: v.item() for n, v in losses.items()},
                             "seconds": timer.seconds["step"]})
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                    save(step + 1)
    finally:
        for p, req in zip(cm.model.parameters(), grads):
            p.requires_grad_(req)
    return basis.detach().float().clone(), pd.DataFrame(rows)


@torch.no_grad()
def mean_losses(cm: ChatModel, u: torch.Tensor, harmful: Sequence[Encoded], harmless: Sequence[Encoded],
                targets: dict, alpha: float, layer: int, n: int, batch: int) -> dict[str, float]:
    """The three losses of one unit direction u [d] over the first n training rows (what the training
    minimises, for comparing the learned direction with r* on equal rows)."""
    total: dict[str, float] = {}
    rows = list(range(min(n, len(harmful), len(harmless))))
    for start in range(0, len(rows), batch):
        idx = rows[start:start + batch]
        retain = batch_of(cm, [harmless[i] for i in idx], [targets["retain"][i] for i in idx])
        clean = torch.log_softmax(_target_logits(cm, retain), -1)
        u_rows = u.float().expand(len(idx), -1)
        losses = step_losses(cm, u_rows, u_rows, alpha, layer,
                             batch_of(cm, [harmful[i] for i in idx], [targets["ablation"][i] for i in idx]),
                             batch_of(cm, [harmless[i] for i in idx], [targets["addition"][i] for i in idx]),
                             retain, clean)
        for name, v in losses.items():
            total[name] = total.get(name, 0.0) + v.item() * len(idx) / len(rows)
    return total


# ----------------------------------------------------------------------------- validation


def direction_scores(cm: ChatModel, u: torch.Tensor, alpha: float, layer: int, harmful: Sequence[Encoded],
                     harmless: Sequence[Encoded], base_harmless: torch.Tensor, batch_size: int = 32) -> dict:
    """bypass, induce and KL of one unit direction u [d] (or the span of a basis [k, d] for bypass and KL;
    induce then adds its first vector) on validation prompts, as the paper scores a candidate."""
    ref = refusal_token_ids(cm.tokenizer)
    with ablate_direction(cm, u):
        logits = last_logits(cm, list(harmful) + list(harmless), batch_size)
    first = u if u.ndim == 1 else u[0]
    with add_direction(cm, alpha * first / first.norm(), layer):
        induced = last_logits(cm, harmless, batch_size)
    nh = len(harmful)
    bypass = float(refusal_score_from_logits(logits[:nh], ref).mean())
    induce = float(refusal_score_from_logits(induced, ref).mean())
    kl = float(kl_divergence(base_harmless, logits[nh:]).mean())
    return {"bypass": bypass, "induce": induce, "kl": kl, "mediates": bool(bypass < 0 < induce)}


def repind(cm: ChatModel, vectors: dict[str, torch.Tensor], harmful: Sequence[Encoded],
           batch_size: int = 32) -> pd.DataFrame:
    """RepInd between every ordered pair of named unit vectors [d] (module docstring): per pair (a, b), the
    mean over prompts and the first 90% of layers of the squared change of cos(x_l, b) when a is ablated,
    and the largest absolute change of its mean over prompts at any of those layers."""
    n = max(1, int(REPIND_LAYER_FRACTION * cm.n_layers))
    with torch.no_grad():
        clean = cache_activations(cm, harmful, [-1], batch_size, desc=None)[:, :n, 0]  # [prompt, layer, d]
        ablated = {}
        for name, v in vectors.items():
            with ablate_direction(cm, v):
                ablated[name] = cache_activations(cm, harmful, [-1], batch_size, desc=None)[:, :n, 0]
    rows = []
    for a in vectors:
        for b, vb in vectors.items():
            if a == b:
                continue
            unit = vb.float() / vb.float().norm()
            change = (F.cosine_similarity(ablated[a], unit, dim=-1)
                      - F.cosine_similarity(clean, unit, dim=-1))  # [prompt, layer]
            rows.append({"ablated": a, "read": b, "repind": float((change ** 2).mean()),
                         "max_abs_change": float(change.mean(0).abs().max())})
    return pd.DataFrame(rows)
