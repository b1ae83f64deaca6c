"""Refusal directions: difference-in-means candidates and the paper's selection (Appendix C).

r(l, i) = mean over harmful of x_{l,i} - mean over harmless of x_{l,i}, x_{l,i} the residual
stream at the input of block l at post-instruction position i (-k..-1).

Selection on validation sets, for every candidate:
  bypass  = mean refusal score on harmful prompts with r(l,i) ablated (lower is better);
  induce  = mean refusal score on harmless prompts with r(l,i) added at layer l;
  kl      = mean KL of the last-position logits on harmless prompts under ablation.
Candidates with induce <= 0, kl > 0.1 or l >= 0.8 * n_layers are dropped; the lowest bypass wins.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import artifacts
from .config import check_fields, option
from .activations import cache_activations, last_logits
from .chat import Encoded, pad_left
from .data import Prompt, instructions, prompt_hash
from .engine import expand_cache, plan_batches, repeat_rows, run_prefix, shared_prefix_len, with_prefix
from .errors import RefusalLabError
from .hooks import ablate_direction, capture_block_inputs, orthonormal_basis, start_at_layer
from .metrics import kl_divergence, refusal_score_from_logits, refusal_token_ids
from .models import ChatModel
from .rdo import RDOConfig

log = logging.getLogger(__name__)

KL_THRESHOLD = 0.1  # the paper's KL filter
METHODS = ("diff-in-means", "subspace", "rdo", "harmfulness")
SUBSPACE_K = 4  # the largest subspace considered when --k is not given
PRUNE_LAYER_FRACTION = 0.8  # candidates with layer >= 0.8 * n_layers are dropped


@dataclass(frozen=True)
class DirectionConfig:
    """The direction stage: difference-in-means candidates and the paper's selection (or another method)."""

    method: str = option("diff-in-means", "diff-in-means: the paper's refusal direction (post-instruction "
                                          "candidates, its selection); subspace: that direction widened to at most "
                                          "k dimensions, chosen on validation prompts (refusal.subspace); "
                                          "rdo: a direction, or a cone of k, learned by gradient (Wollschläger "
                                          "et al., refusal.rdo); harmfulness: Zhao et al.'s difference in "
                                          "means at the instruction's last token, at the layer where validation "
                                          "prompts separate best (refusal.harmfulness)", choices=METHODS)
    n_train: int = option(128, "harmful and harmless training prompts each (the difference in means)", ge=1)
    n_val: int = option(16, "harmful and harmless validation prompts each (the selection's scores)", ge=1)
    harmful: str | None = option(None, "harmful prompt file (None: the built-in harmful train/val splits)")
    harmless: str | None = option(None, "harmless prompt file (None: the built-in harmless train/val splits)")
    seed: int = option(0, "seed of the train/val sampling", ge=0)
    batch_size: int = option(32, "prompts per forward pass", ge=1)
    kl_threshold: float = option(KL_THRESHOLD, "selection drops candidates whose KL score exceeds this (the paper's 0.1)", gt=0)
    score_all: bool = option(False, "compute every score of every candidate, also those the filters drop (slower)")
    k: int | None = option(None, f"subspace: the largest dimension considered (every k from 2 up, and the one "
                                 f"direction, are scored on validation prompts; None: {SUBSPACE_K}); rdo: the "
                                 "cone's dimension (None: 1, one direction)", ge=1, le=64)
    construction: str = option("best", "subspace: best (construction and k chosen on validation prompts), or "
                                       "candidates or pca at exactly --k", choices=("best", "candidates", "pca"))
    rdo: RDOConfig = option(help="rdo: the training's settings", factory=RDOConfig)
    layer: int | None = option(None, "pin the direction to this layer (with position); None: the paper's selection")
    position: int | None = option(None, "pin the direction to this post-instruction position, -1 the last (with layer)")

    def validate(self) -> None:
        check_fields(self)  # the fields, then checks()

    def checks(self) -> None:
        if self.k is not None and self.method not in ("subspace", "rdo"):
            raise RefusalLabError(f"--k is a setting of --method subspace or rdo, not {self.method}")
        if self.construction != "best" and self.method != "subspace":
            raise RefusalLabError("--construction is a setting of --method subspace")
        if self.method == "subspace" and self.k is not None and self.k < 2:
            raise RefusalLabError("--method subspace needs --k of at least 2 (k = 1 is the paper's direction)")
        if self.method == "harmfulness":
            if self.position is not None:
                raise RefusalLabError("the harmfulness direction is taken at the instruction's last token: pin "
                                      "--layer alone, without --position")
        elif (self.layer is None) != (self.position is None):
            raise RefusalLabError("give both --layer and --position to pin the direction, or neither")


@dataclass
class Direction:
    """A selected refusal direction."""

    vector: torch.Tensor  # [d] unit
    mean_diff: torch.Tensor  # [d] raw difference in means r(l, i), used for activation addition
    layer: int
    position: int  # negative post-instruction index
    meta: dict = field(default_factory=dict)
    # every candidate's difference in means and the harmless means they were taken from, [layer, pos, d]
    # (what an interpolated or projected ablation reads; None in folders made before they were saved)
    mean_diffs: torch.Tensor | None = None
    harmless_means: torch.Tensor | None = None
    # a subspace: an orthonormal basis [k, d] whose first row is `vector` (None: the one direction, k = 1)
    basis: torch.Tensor | None = None

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    @property
    def k(self) -> int:
        """The dimension of what is ablated: 1 for one direction, k for a subspace."""
        return 1 if self.basis is None else int(self.basis.shape[0])

    @property
    def ablated(self) -> torch.Tensor:
        """What an ablation removes: the unit direction [d], or the orthonormal basis [k, d] of a subspace."""
        return self.vector if self.basis is None else self.basis


def folder_and_index(spec: str) -> tuple[str, int]:
    """`DIR` or `DIR:i` (the i-th vector of a subspace folder's basis) -> (DIR, i)."""
    head, sep, tail = str(spec).rpartition(":")
    if sep and tail.isdigit() and head and not Path(spec).exists():
        return head, int(tail)
    return str(spec), 0


def addition_vector(direction: Direction, i: int = 0) -> torch.Tensor:
    """What activation addition adds at the direction's layer: the raw difference in means (the paper's) for
    one direction; for a subspace, its basis vector i scaled to the difference in means' norm."""
    if not 0 <= i < direction.k:
        raise RefusalLabError(f"vector {i} of a direction folder with {direction.k} basis vector(s): choose 0"
                              + (f" to {direction.k - 1}" if direction.k > 1 else ""))
    if direction.k == 1:
        return direction.mean_diff
    return direction.basis[i].float() * direction.mean_diff.float().norm()


def with_basis(direction: Direction, vectors: torch.Tensor, **meta) -> Direction:
    """`direction` made a subspace: the span of `vectors` [k, d], stored as an orthonormal basis (QR) whose
    first row, along the first vector, becomes the direction's `vector`; the candidates and layer stay
    `direction`'s, and `meta` (the method, the layers the vectors come from, provenance) is recorded in
    the folder. k = 1 leaves one direction."""
    basis = orthonormal_basis(vectors.float(), "the subspace's vectors")
    if basis.shape[1] != direction.d_model:
        raise RefusalLabError(f"the subspace's vectors have dimension {basis.shape[1]}, the direction "
                              f"{direction.d_model}")
    vector = basis[0].float()
    return Direction(vector, direction.mean_diff, direction.layer, direction.position,
                     {**direction.meta, **meta, "k": int(basis.shape[0])}, direction.mean_diffs,
                     direction.harmless_means, basis.float() if basis.shape[0] > 1 else None)


def mean_diffs(harmful_acts: torch.Tensor, harmless_acts: torch.Tensor) -> torch.Tensor:
    """acts[prompt, layer, pos, d] x2 -> r[layer, pos, d] (float32)."""
    if harmful_acts.shape[1:] != harmless_acts.shape[1:]:
        raise RefusalLabError(
            f"activation shapes differ: harmful {tuple(harmful_acts.shape[1:])} vs harmless {tuple(harmless_acts.shape[1:])}"
        )
    return harmful_acts.float().mean(0) - harmless_acts.float().mean(0)


def ablation_scores(cm, r, harmful_val, harmless_val, base_harmless, ref_ids, batch_size) -> tuple[float, float]:
    """(bypass, kl) of candidate r: one ablated pass over harmful and harmless validation prompts."""
    with ablate_direction(cm, r):
        logits = last_logits(cm, list(harmful_val) + list(harmless_val), batch_size)
    nh = len(harmful_val)
    bypass = refusal_score_from_logits(logits[:nh], ref_ids).mean().item()
    return bypass, kl_divergence(base_harmless, logits[nh:]).mean().item()


@torch.no_grad()
def induce_scores(cm: ChatModel, diffs: torch.Tensor, harmless_val: Sequence[Encoded], layers: Sequence[int],
                  batch_size: int = 32) -> torch.Tensor:
    """induce[layer, pos]: mean refusal score on the harmless prompts with r(layer, pos) added at the
    layer's input (NaN for layers not asked for). Equal to running the whole model under add_direction.

    The residual stream before the layer does not depend on the addition: it is computed once, and each
    candidate runs only the blocks from its layer on, the candidates of one layer side by side in one
    batch. The template prefix every prompt shares is run once per candidate, not once per prompt, and
    reused through the key/value cache (whose layers below the candidate's are the plain prefix's)."""
    n_layers, n_pos, _ = diffs.shape
    ref_ids = refusal_token_ids(cm.tokenizer)
    total = torch.zeros(n_layers, n_pos, dtype=torch.float64)
    layers = sorted(set(layers))
    dev = cm.device
    p = shared_prefix_len(cm, harmless_val)

    if p:
        prefix_ids = torch.tensor([cm.chat.prefix_ids], device=dev)
        prefix_pos = torch.arange(p, device=dev)[None]
        prefix_h: dict[int, torch.Tensor] = {}  # the prefix's input to every block in `layers`
        with capture_block_inputs(cm, prefix_h, layers):
            plain = run_prefix(cm)

    def candidate_cache(layer: int, rs: torch.Tensor, n: int):
        """The prefix's cache with rs[k] added at `layer`, each candidate's rows repeated n times."""
        k = len(rs)
        hp = prefix_h[layer].to(dev, rs.dtype) + rs[:, None, :]  # [k, p, d]
        with start_at_layer(cm, layer, lambda _: hp):
            cache = cm.base(input_ids=prefix_ids.expand(k, -1), position_ids=prefix_pos.expand(k, -1),
                            use_cache=True).cache
        below = expand_cache(plain, k)  # below the layer every candidate's prefix is the plain one
        for l in range(layer):
            cache.layers[l] = below.layers[l]
        return repeat_rows(cache, n)

    for chunk in plan_batches([len(e) - p for e in harmless_val], batch_size):
        b = pad_left([harmless_val[i].ids[p:] for i in chunk], cm.tokenizer.pad_token_id, dev)
        n = len(chunk)
        mask, pos = (with_prefix(b.attention_mask, p) if p else b.attention_mask), b.position_ids + p
        kw = {"use_cache": True, "cache": expand_cache(plain, n)} if p else {"use_cache": False}
        store: dict[int, torch.Tensor] = {}
        with capture_block_inputs(cm, store, layers):
            cm.base(input_ids=b.input_ids, attention_mask=mask, position_ids=pos, **kw)
        per = max(1, (4 * batch_size) // n)  # candidates per pass
        for layer in layers:
            x = store.pop(layer).to(dev, cm.dtype)  # [n, seq, d]
            for p0 in range(0, n_pos, per):
                rs = diffs[layer, p0:p0 + per].to(dev, x.dtype)  # [k, d]
                k = len(rs)
                hidden = (x.unsqueeze(0) + rs[:, None, None, :]).reshape(k * n, *x.shape[1:])
                kw = {"use_cache": True, "cache": candidate_cache(layer, rs, n)} if p else {"use_cache": False}
                with start_at_layer(cm, layer, lambda _: hidden):
                    out = cm.base(input_ids=b.input_ids.repeat(k, 1), attention_mask=mask.repeat(k, 1),
                                  position_ids=pos.repeat(k, 1), **kw)
                scores = refusal_score_from_logits(cm.logits_from_hidden(out.last_hidden_state[:, -1]).float(), ref_ids)
                total[layer, p0:p0 + k] += scores.view(k, n).sum(1).double().cpu()
    out = torch.full((n_layers, n_pos), math.nan)
    out[layers] = (total[layers] / len(harmless_val)).float()
    return out


def score_candidates(
    cm: ChatModel,
    diffs: torch.Tensor,
    harmful_val: Sequence[Encoded],
    harmless_val: Sequence[Encoded],
    batch_size: int = 32,
    score_all: bool = False,
) -> pd.DataFrame:
    """Bypass, induce and KL scores of candidates r[layer, pos]; one row per candidate.

    By default only the scores the selection needs are computed, which selects exactly the same
    candidate: layers >= 0.8 * n_layers are skipped, the induce score (the cheapest pass) is
    computed first, and the ablation pass (bypass and KL) only for candidates with induce > 0.
    Skipped scores are NaN. With score_all every score of every candidate is computed.
    """
    n_layers, n_pos, _ = diffs.shape
    ref_ids = refusal_token_ids(cm.tokenizer)
    base_harmless = last_logits(cm, harmless_val, batch_size)
    norms = diffs.norm(dim=-1)
    # e.g. layer 0, where every prompt has the same template token: no difference at all
    usable = torch.isfinite(diffs).all(-1) & (norms > 1e-6 * max(1.0, norms.max().item()))
    scored = [l for l in range(n_layers) if usable[l].any() and (score_all or l < PRUNE_LAYER_FRACTION * n_layers)]
    induce = induce_scores(cm, diffs, harmless_val, scored, batch_size)
    rows = []
    todo = [(l, p) for l in range(n_layers) for p in range(n_pos)]
    for layer, pi in tqdm(todo, desc="scoring candidates", leave=False):
        r = diffs[layer, pi]
        row = dict(layer=layer, position=pi - n_pos, bypass_score=math.nan, induce_score=math.nan,
                   kl_score=math.nan, norm=r.norm().item())
        rows.append(row)
        if not usable[layer, pi] or layer not in scored:
            continue
        row["induce_score"] = induce[layer, pi].item()
        if row["induce_score"] <= 0 and not score_all:
            continue
        row["bypass_score"], row["kl_score"] = ablation_scores(
            cm, r, harmful_val, harmless_val, base_harmless, ref_ids, batch_size)
    return pd.DataFrame(rows)


def select_candidate(df: pd.DataFrame, n_layers: int, kl_threshold: float = KL_THRESHOLD) -> tuple[pd.DataFrame, int, str]:
    """Apply the paper's filters; return (df with `reason`, `passed`, `selected`), the chosen row index, and how."""
    df = df.copy()

    def reason(row) -> str:
        if row.layer >= PRUNE_LAYER_FRACTION * n_layers:
            return "layer >= 0.8 * n_layers"
        if not math.isfinite(row.induce_score):
            return "zero difference" if row.norm <= 1e-6 else "score not finite"
        if row.induce_score <= 0:
            return "induce <= 0"
        if not (math.isfinite(row.kl_score) and math.isfinite(row.bypass_score)):
            return "score not finite"
        if row.kl_score > kl_threshold:
            return f"kl > {kl_threshold}"
        return ""

    df["reason"] = [reason(r) for r in df.itertuples()]
    df["passed"] = df["reason"] == ""
    how = "paper filters (induce > 0, kl <= %g, layer < 0.8 * n_layers), lowest bypass" % kl_threshold
    pool = df[df.passed]
    if pool.empty:
        # relax the KL filter first, as little as it takes (keep induce > 0 and the layer cut): double the
        # threshold until a candidate passes, then the lowest bypass among those that pass it
        kl_relaxed = df[(df.reason == f"kl > {kl_threshold}") & df.bypass_score.notna()]
        if not kl_relaxed.empty:
            relaxed = kl_threshold
            while (kl_relaxed.kl_score > relaxed).all():
                relaxed *= 2
            best = int(kl_relaxed[kl_relaxed.kl_score <= relaxed].bypass_score.idxmin())
            how = ("RELAXED: no candidate passed the KL filter (kl <= %g); the threshold was doubled until one did "
                   "(kl <= %g): lowest bypass score among candidates with induce > 0, layer < 0.8 * n_layers and "
                   "kl <= %g" % (kl_threshold, relaxed, relaxed))
        else:
            allowed = df[(df.layer < PRUNE_LAYER_FRACTION * n_layers) & df.induce_score.notna()]
            if allowed.empty:
                raise RefusalLabError("no candidate direction could be scored: harmful and harmless activations do not "
                                      "differ at any layer below 0.8 of the depth; check that the two prompt sets differ")
            best = int(allowed.induce_score.idxmax())
            how = ("RELAXED: no candidate has induce > 0; the model may not refuse. "
                   "Chose the highest induce score among layers < 0.8 * n_layers")
        log.warning("no candidate direction passed the paper's filters; %s", how)
        df["selected"] = df.index == best
        return df, best, how
    best = int(pool.bypass_score.idxmin())
    df["selected"] = df.index == best
    return df, best, how


def check_layer_position(cm: ChatModel, layer: int, position: int) -> None:
    """A candidate exists at every layer and at each post-instruction position (-n_post .. -1)."""
    if not 0 <= layer < cm.n_layers:
        raise RefusalLabError(f"--layer {layer} is out of range: this model has layers 0 to {cm.n_layers - 1}; choose one of those")
    if not -cm.chat.n_post <= position <= -1:
        raise RefusalLabError(f"--position {position} is out of range: the post-instruction positions of this chat "
                              f"template are -{cm.chat.n_post} to -1; choose one of those")


def compute_direction(
    cm: ChatModel,
    harmful_train: Sequence[Prompt],
    harmless_train: Sequence[Prompt],
    harmful_val: Sequence[Prompt],
    harmless_val: Sequence[Prompt],
    config: DirectionConfig = DirectionConfig(),
) -> tuple[Direction, torch.Tensor, pd.DataFrame]:
    """The whole pipeline on given prompt sets: activations -> candidates -> scores -> selected direction.

    config.layer / config.position pin the choice to that candidate (the others are still scored and
    recorded); config's prompt-file fields are not read here (find_direction reads them). Returns
    (direction, diffs[layer, pos, d], candidates)."""
    config.validate()
    layer, position, batch_size = config.layer, config.position, config.batch_size
    if layer is not None:
        check_layer_position(cm, layer, position)
    for name, s in (("harmful train", harmful_train), ("harmless train", harmless_train),
                    ("harmful val", harmful_val), ("harmless val", harmless_val)):
        if not s:
            raise RefusalLabError(f"the {name} prompt set is empty")
    timer = artifacts.Timer()
    enc = lambda ps: cm.chat.encode_all(instructions(ps))  # noqa: E731
    with timer("activations"):
        acts_h = cache_activations(cm, enc(harmful_train), batch_size=batch_size, desc="harmful activations")
        acts_b = cache_activations(cm, enc(harmless_train), batch_size=batch_size, desc="harmless activations")
        diffs = mean_diffs(acts_h, acts_b)  # [layer, pos, d]
        harmless_means = acts_b.float().mean(0)  # [layer, pos, d]
    with timer("selection"):
        df = score_candidates(cm, diffs, enc(harmful_val), enc(harmless_val), batch_size, config.score_all)
        if layer is None:
            df, best, how = select_candidate(df, cm.n_layers, config.kl_threshold)
        else:
            try:
                df, paper_best, how = select_candidate(df, cm.n_layers, config.kl_threshold)
                how = f"the paper's selection would be layer {df.loc[paper_best, 'layer']}, position {df.loc[paper_best, 'position']}: {how}"
            except RefusalLabError as e:
                how = f"the paper's selection found nothing: {e}"
            best = int(df.index[(df.layer == layer) & (df.position == position)][0])
            if not df.loc[best, "norm"] > 1e-6 * max(1.0, float(df["norm"].max())):
                raise RefusalLabError(f"the difference in means at layer {layer}, position {position} is zero: "
                                      "every prompt has the same activation there; pin another layer or position")
            how = f"PINNED by the user to layer {layer}, position {position} ({how})"
            df["selected"] = df.index == best
        layer, pos = int(df.loc[best, "layer"]), int(df.loc[best, "position"])
        r = diffs[layer, pos + diffs.shape[1]]
        if df.loc[best, ["bypass_score", "kl_score"]].isna().any():  # relaxed choice: complete its record
            hv, bv = enc(harmful_val), enc(harmless_val)
            df.loc[best, ["bypass_score", "kl_score"]] = ablation_scores(
                cm, r, hv, bv, last_logits(cm, bv, batch_size), refusal_token_ids(cm.tokenizer), batch_size)
    row = df.loc[best]
    meta = {
        "layer": layer,
        "position": pos,
        "n_layers": cm.n_layers,
        "n_positions": int(diffs.shape[1]),
        "d_model": cm.d_model,
        "scores": {"bypass": float(row.bypass_score), "induce": float(row.induce_score), "kl": float(row.kl_score)},
        "selection": how,
        "mean_diff_norm": float(r.norm()),
        "model": cm.describe(),
        "prompts": {
            "harmful_train": {"n": len(harmful_train), "hash": prompt_hash(harmful_train)},
            "harmless_train": {"n": len(harmless_train), "hash": prompt_hash(harmless_train)},
            "harmful_val": {"n": len(harmful_val), "hash": prompt_hash(harmful_val)},
            "harmless_val": {"n": len(harmless_val), "hash": prompt_hash(harmless_val)},
        },
        "refusal_tokens": [cm.tokenizer.decode([i]) for i in refusal_token_ids(cm.tokenizer)],
        "timings_s": timer.seconds,
    }
    return Direction(r / r.norm(), r.clone(), layer, pos, meta, diffs, harmless_means), diffs, df


# ----------------------------------------------------------------------------- artifacts


def save_direction(out_dir: str | Path, direction: Direction, diffs: torch.Tensor, candidates: pd.DataFrame, **record) -> Path:
    """Write direction.safetensors, direction.json and candidates.csv into out_dir (atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts.save_tensors(
        out_dir / "direction.safetensors",
        {"direction": direction.vector.float(), "mean_diff": direction.mean_diff.float(), "mean_diffs": diffs.float(),
         **({} if direction.harmless_means is None else {"harmless_means": direction.harmless_means.float()}),
         **({} if direction.basis is None else {"basis": direction.basis.float()})},
        metadata={"layer": str(direction.layer), "position": str(direction.position), "k": str(direction.k)},
    )
    artifacts.write_csv(out_dir / "candidates.csv", candidates)
    artifacts.write_json(out_dir / "direction.json",
                         artifacts.run_record(**{**direction.meta, **record, "layer": direction.layer,
                                                 "position": direction.position, "k": direction.k}))
    return out_dir


def direction_dir(path: str | Path) -> Path:
    """The folder holding direction.safetensors: `path` itself, its direction/ subfolder, or the file's folder."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == "direction.safetensors":
        return p.parent
    for cand in (p / "direction", p):
        if (cand / "direction.safetensors").is_file():
            return cand
    if not p.exists():
        raise RefusalLabError(f"{path}: direction not found (give a run folder or its direction/ subfolder)")
    raise RefusalLabError(f"{path}: no direction.safetensors here (give a run folder or its direction/ subfolder)")


def load_direction(path: str | Path, cm: ChatModel | None = None) -> Direction:
    """Read a saved direction; with a model, check that it fits (dimension) and warn if it was made on another."""
    d = direction_dir(path)
    tensors = artifacts.load_tensors(d / "direction.safetensors")
    meta = artifacts.read_json(d / "direction.json") if (d / "direction.json").is_file() else {}
    if "direction" not in tensors or tensors["direction"].ndim != 1:
        raise RefusalLabError(f"{d}/direction.safetensors has no 1-D 'direction' tensor: not a refusal-lab direction; make one with `refusal direction`")
    vec = tensors["direction"].float()
    if not torch.isfinite(vec).all() or vec.norm() == 0:
        raise RefusalLabError(f"{d}/direction.safetensors: the direction is zero or not finite; compute it again with `refusal direction`")
    mean_diff = tensors.get("mean_diff", vec).float()
    try:
        layer, position = int(meta["layer"]), int(meta["position"])
    except (KeyError, TypeError, ValueError):
        raise RefusalLabError(f"{d}/direction.json is missing or has no layer/position; give a folder made by `refusal direction`") from None
    diffs, harmless = tensors.get("mean_diffs"), tensors.get("harmless_means")
    if diffs is not None and (diffs.ndim != 3 or diffs.shape[-1] != vec.shape[0]
                              or (harmless is not None and harmless.shape != diffs.shape)):
        raise RefusalLabError(f"{d}/direction.safetensors: mean_diffs {tuple(diffs.shape)} or harmless_means do not "
                              f"have the shape [layer, position, {vec.shape[0]}]; compute it again with `refusal direction`")
    basis = tensors.get("basis")
    if basis is not None:
        if basis.ndim != 2 or basis.shape[1] != vec.shape[0]:
            raise RefusalLabError(f"{d}/direction.safetensors: basis {tuple(basis.shape)} is not [k, {vec.shape[0]}]; "
                                  "write the folder again with refusal.directions.save_direction")
        basis = orthonormal_basis(basis.float(), f"{d}/direction.safetensors's basis").float()
        if float(basis[0] @ (vec / vec.norm())) < 1 - 1e-4:
            raise RefusalLabError(f"{d}/direction.safetensors: the basis's first vector is not the direction; "
                                  "write the folder again with refusal.directions.save_direction")
        basis = basis if basis.shape[0] > 1 else None
    direction = Direction(vec / vec.norm(), mean_diff, layer, position, meta,
                          None if diffs is None else diffs.float(), None if harmless is None else harmless.float(),
                          basis)
    if cm is not None:
        check_direction(direction, cm)
    return direction


def check_direction(direction: Direction, cm: ChatModel) -> None:
    if direction.d_model != cm.d_model:
        raise RefusalLabError(
            f"the direction has dimension {direction.d_model} but the model's residual stream has {cm.d_model}: "
            "it was computed on another model; compute one with `refusal direction` on this model"
        )
    if not 0 <= direction.layer < cm.n_layers:
        raise RefusalLabError(f"the direction's layer {direction.layer} is out of range for a model with {cm.n_layers} layers: "
                              "it was made on another model; compute one with `refusal direction` on this model")
    fp = (direction.meta.get("model") or {}).get("fingerprint")
    if fp and fp != cm.fingerprint:
        msg = (f"the direction was computed on another model (fingerprint {fp}, this model {cm.fingerprint}); "
               "results may not mean what you expect")
        log.warning(msg)
