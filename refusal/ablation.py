"""Parametrised directional ablation ("abliteration"): the paper's ablation of the refusal direction with
a weight per layer and per residual writer, a direction taken between layers, and optionally only the
part of it orthogonal to the harmless mean.

- Per-layer weights come from a tent-shaped kernel over the layers (Kernel), one for the attention
  writes and one for the MLP writes: `peak` at layer `peak_layer`, falling linearly to `floor` at `width`
  layers from it, 0 beyond. A writer of layer l with weight w_l writes x - w_l (x.r_l) r_l instead of x;
  the embeddings' writes get the weight `embed`. Every weight 1 (the default) is the paper's ablation.
- The direction: the folder's selected one, or the difference in means at the direction's position
  taken at a fractional layer f: the unit directions of layers floor(f) and floor(f) + 1 mixed linearly
  and normalised again.
- projection "harmless": r <- r - (r.m) m with m the unit harmless mean where the direction is taken
  (only what sets harmful prompts apart from harmless ones beyond the harmless mean is removed);
  "biprojected": then, for the writes of each layer l, also orthogonal to the harmless mean at block l's
  input, so r_l varies with l (grimjim's biprojection).
- norm_preserving (grimjim's norm-preserving abliteration): every vector a matrix writes into the
  residual (an o_proj column, an embedding row) has r_l removed with its weight and is rescaled to its
  old length. The rescaling is not linear in the activations, so it exists as a weight edit only.

As hooks (`parametrised_hooks`) and as weight edits (`abliterate`), which give the same logits to float
tolerance wherever the edit is linear (not norm_preserving, not a post-norm family). In the post-norm
families (Gemma 2/3, OLMo 2) a norm rescales each sublayer's output before the residual add, so no edit of
the weights before it equals the hooks; there the edit removes u_l = g (*) r_l / |g (*) r_l| (g the norm's
scale) from the sublayer's output projection: the normalised write g (*) y / rms(y) then has no component
along r_l at all where the weight is 1 (y orthogonal to g (*) r_l), whatever rms(y). `write_components`
measures what any edit leaves along r_l in every write.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import artifacts
from .activations import last_logits
from .config import as_dict, check_fields, option
from .data import builtin_prompts, instructions
from .directions import Direction, check_direction, direction_dir
from .errors import RefusalLabError
from .hooks import (Hook, ablate_direction, as_rows, check_ablation_sites, hooked, orthonormal_basis, output_hook,
                    project_out, remove_from_bias, remove_from_cols, remove_from_rows, untie_embeddings)
from .metrics import evaluate, kl_divergence
from .models import ChatModel

PROJECTIONS = ("none", "harmless", "biprojected")


@dataclass(frozen=True)
class Kernel:
    """The ablation weight of each layer's writes of one kind: a tent over the layers."""

    peak: float = option(1.0, "the weight at the peak layer", ge=0, le=4)
    peak_layer: float = option(0.0, "the layer (fractional) where the weight peaks", ge=0)
    floor: float = option(1.0, "the weight `width` layers from the peak (linear in between)", ge=0, le=4)
    width: float | None = option(None, "layers from the peak that are edited, weight 0 beyond (None: every layer "
                                       "at `peak`..`floor` over the whole depth)", ge=0)

    def weights(self, n_layers: int) -> list[float]:
        """The weight of each of `n_layers` layers."""
        width = self.width if self.width is not None else max(n_layers - 1, 1)
        out = []
        for layer in range(n_layers):
            d = abs(layer - self.peak_layer)
            if d > width:
                out.append(0.0)
            else:
                out.append(self.peak + (self.floor - self.peak) * (d / width if width > 0 else 0.0))
        return out


@dataclass(frozen=True)
class AblationConfig:
    """How a direction is ablated (the defaults: the paper's, every write at weight 1)."""

    attn: Kernel = option(help="the attention writes' weights over the layers", factory=Kernel)
    mlp: Kernel = option(help="the MLP writes' weights over the layers", factory=Kernel)
    embed: float = option(1.0, "the embeddings' writes' weight", ge=0, le=4)
    direction_layer: float | None = option(None, "take the direction at this fractional layer, between the two "
                                                 "nearest layers' unit differences in means at the direction's "
                                                 "position (None: the folder's selected direction)", ge=0)
    per_layer: bool = option(False, "each layer's writes lose that layer's own direction, the unit difference in "
                                    "means where they land (the next block's input, at the direction's position; "
                                    "the embeddings lose the first block's), instead of one direction for all")
    projection: str = option("none", "none, harmless (ablate only the direction's part orthogonal to the harmless "
                                     "mean where it is taken), biprojected (and for each layer's writes also "
                                     "orthogonal to the harmless mean at that layer)", choices=PROJECTIONS)
    norm_preserving: bool = option(False, "weight edit only: each vector a matrix writes into the residual keeps "
                                          "its length after the direction is removed (not linear: no hook form)")

    def __post_init__(self):
        for name in ("attn", "mlp"):  # a config file's table
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, Kernel(**getattr(self, name)))

    def validate(self) -> None:
        check_fields(self)

    def checks(self) -> None:
        if self.per_layer and self.direction_layer is not None:
            raise RefusalLabError("per_layer takes each layer's own direction; direction_layer picks one for all: "
                                  "give one of them")

    @property
    def is_paper(self) -> bool:
        return self == AblationConfig()

    def summary(self) -> str:
        """The fields set away from the paper's, as one line ("the paper's" if none)."""
        def shown(v) -> str:
            if isinstance(v, dict):  # a kernel
                width = "all layers" if v["width"] is None else f"width {v['width']:.3g}"
                return f"(peak {v['peak']:.3g} at layer {v['peak_layer']:.3g}, floor {v['floor']:.3g}, {width})"
            return f"{v:.3g}" if isinstance(v, float) else str(v)

        paper = as_dict(AblationConfig())
        return ", ".join(f"{k}={shown(v)}" for k, v in as_dict(self).items() if v != paper[k]) or "the paper's"

    def check_hookable(self) -> None:
        """A one-line error if this ablation has no hook form (norm preservation)."""
        if self.norm_preserving:
            raise RefusalLabError("norm-preserving ablation rescales the weights' write vectors, which no hook on "
                                  "the activations reproduces: it exists as a weight edit only (evaluate the model "
                                  "folder `refusal orthogonalize` writes)")


@dataclass
class LayerDirections:
    """The unit directions an ablation removes: `per_layer[l]` [d] from layer l's writes and `embed` [d] from
    the embeddings' (all the same vector unless biprojected), with the weights of each."""

    per_layer: torch.Tensor  # [n_layers, d] float64 unit rows, or [n_layers, k, d] orthonormal bases (a subspace)
    embed: torch.Tensor  # [d] float64 unit, or [k, d]
    attn_weights: list[float]
    mlp_weights: list[float]
    embed_weight: float
    source: dict = field(default_factory=dict)  # how the direction was taken (recorded with an edit)


def _unit(v: torch.Tensor, what: str) -> torch.Tensor:
    v = v.double()
    n = v.norm()
    if not torch.isfinite(n) or n <= 1e-12:
        raise RefusalLabError(f"{what} is zero or not finite: no direction to ablate there")
    return v / n


def _without(v: torch.Tensor, m: torch.Tensor, what: str) -> torch.Tensor:
    """The unit part of unit `v` orthogonal to `m`."""
    m = _unit(m, f"the harmless mean at {what}")
    return _unit(v - (v @ m) * m, f"the direction orthogonal to the harmless mean at {what}")


def layer_directions(cm: ChatModel, direction: Direction, config: AblationConfig) -> LayerDirections:
    """The directions and weights `config` ablates from `cm`'s writes, from `direction` (its folder's
    candidates where config takes the direction at another layer or projects it)."""
    config.validate()
    check_direction(direction, cm)
    n = cm.n_layers
    diffs, harmless = direction.mean_diffs, direction.harmless_means
    pos = direction.position  # negative: a post-instruction index
    if (config.direction_layer is not None or config.per_layer) and diffs is None:
        raise RefusalLabError("this direction folder has no per-layer differences in means (mean_diffs); compute "
                              "it again with `refusal direction` to take the direction at another layer")
    if config.projection != "none" and harmless is None:
        raise RefusalLabError("this direction folder has no harmless means (made before they were saved); compute "
                              "it again with `refusal direction` to project the direction")
    if diffs is not None and diffs.shape[0] != n:
        raise RefusalLabError(f"the direction folder's candidates span {diffs.shape[0]} layers, the model {n}")
    if direction.k > 1:  # a subspace: its span at every write, weighted per layer as for one direction
        if config.direction_layer is not None or config.per_layer or config.projection != "none":
            raise RefusalLabError(f"a {direction.k}-dimensional direction folder is ablated as its subspace: "
                                  "direction_layer, per_layer and projection apply to one direction only")
        basis = orthonormal_basis(direction.basis, "the direction folder's basis")
        return LayerDirections(basis.expand(n, -1, -1).clone(), basis.clone(), config.attn.weights(n),
                               config.mlp.weights(n), float(config.embed),
                               {"layer": direction.layer, "position": pos, "k": direction.k, "projection": "none"})

    def unit_at(layer: int) -> torch.Tensor:  # the unit candidate at `layer`, projected if asked
        r = _unit(diffs[layer, pos], f"layer {layer}")
        return _without(r, harmless[layer, pos], f"layer {layer}") if config.projection != "none" else r

    if config.direction_layer is None:
        layer = direction.layer
        r = _unit(direction.vector, "the direction")
        if config.projection != "none":
            r = _without(r, harmless[layer, pos], f"layer {layer}")
        source = {"layer": layer, "position": pos}
    else:
        f = float(config.direction_layer)
        if not 0 <= f <= n - 1:
            raise RefusalLabError(f"direction_layer {f} is out of range: this model has layers 0..{n - 1}")
        lo = min(int(math.floor(f)), n - 2) if n > 1 else 0
        t = f - lo
        r = unit_at(lo) if t == 0 or n == 1 else _unit((1 - t) * unit_at(lo) + t * unit_at(lo + 1),
                                                       f"the direction at layer {f}")
        source = {"layer": f, "position": pos}
    if config.per_layer:  # layer l writes into the input of block l + 1 (the last block: its own input's)
        per_layer = torch.stack([unit_at(min(layer + 1, n - 1)) for layer in range(n)])
        embed = per_layer[0].clone()  # block 0's input is the embeddings: no difference at a template position
        source = {"layer": "per layer", "position": pos}
    elif config.projection == "biprojected":
        per_layer = torch.stack([_without(r, harmless[layer, pos], f"layer {layer}") for layer in range(n)])
        embed = per_layer[0].clone()
    else:
        per_layer = r.expand(n, -1).clone()
        embed = per_layer[0].clone()
    return LayerDirections(per_layer, embed, config.attn.weights(n), config.mlp.weights(n),
                           float(config.embed), {**source, "projection": config.projection})


def _remove(v: torch.Tensor, w: float):
    """x <- x - w * x's component in span(v) (v [d] unit or [k, d] orthonormal)."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        return project_out(x, v.to(x.device, x.dtype), w)

    return fn


def parametrised_hooks(cm: ChatModel, direction: Direction, config: AblationConfig) -> list[Hook]:
    """The ablation `config` describes as hooks on the writes into the residual stream: the embeddings'
    outputs and each block's attention and MLP outputs (after their post-norms where the family has them)."""
    config.check_hookable()
    if not cm.sites_checked:
        check_ablation_sites(cm)
    dirs = layer_directions(cm, direction, config)
    hooks = [output_hook(emb, _remove(dirs.embed, dirs.embed_weight)) for emb in cm.embeddings()
             if dirs.embed_weight]
    for layer in range(cm.n_layers):
        attn, mlp = cm.residual_writers(layer)
        for module, w in ((attn, dirs.attn_weights[layer]), (mlp, dirs.mlp_weights[layer])):
            if w:
                hooks.append(output_hook(module, _remove(dirs.per_layer[layer], w)))
    return hooks


def ablate(cm: ChatModel, direction: Direction, config: AblationConfig | None = None):
    """The ablation `config` describes (default: the paper's) for the duration of a `with` block: the
    paper's hooks (every block's input and every write) where it is the paper's, parametrised_hooks
    otherwise."""
    config = config or AblationConfig()
    if config.is_paper:
        return ablate_direction(cm, direction.ablated)
    return hooked(parametrised_hooks(cm, direction, config))


def edit_direction(cm: ChatModel, layer: int, which: int, r: torch.Tensor) -> torch.Tensor:
    """The unit direction a weight edit removes from layer `layer`'s attention (which 0) or MLP (1) output
    projection so that its write loses r: r itself, or in a post-norm family g (*) r normalised, g the
    post-norm's per-coordinate scale (RMSNorm(y) = g * y / rms(y), read off the norm of a vector of ones).
    A subspace's basis r [k, d] gives an orthonormal basis of span(g (*) r_i)."""
    if not cm.family.post_norms:
        return r
    norm = cm.residual_writers(layer)[which]
    like = cm.o_proj(layer).weight
    with torch.no_grad():
        g = norm(torch.ones(1, 1, cm.d_model, dtype=like.dtype, device=like.device)).reshape(-1).double()
    if r.ndim == 2:
        return orthonormal_basis(g * r.double(), f"the post-norm's scale at layer {layer} times the basis")
    return _unit(g * r, f"the post-norm's scale at layer {layer}")


def _preserving(weight: torch.Tensor, r: torch.Tensor, w: float, axis: int) -> None:
    """Remove w * r from every write vector of `weight` (those along `axis`, of length d) and give each its
    old length back."""
    t = weight.data
    wf = t.double().movedim(axis, -1)  # [..., n, d]: one write vector per row
    rr = r.to(t.device, torch.float64)
    lengths = wf.norm(dim=-1, keepdim=True)
    unit = wf / lengths.clamp_min(1e-30)
    edited = project_out(unit, rr, w)
    edited = edited / edited.norm(dim=-1, keepdim=True).clamp_min(1e-30) * lengths
    t.copy_(edited.movedim(-1, axis).to(t.dtype))


def abliterate(cm: ChatModel, direction: Direction, config: AblationConfig, inplace: bool = False) -> ChatModel:
    """A model whose weights make the ablation `config` describes (a copy unless `inplace`): the
    embeddings, every attention output projection and every MLP output projection (every expert's; biases
    too) edited with their layer's weight. The same logits as parametrised_hooks where the edit is linear;
    in a post-norm family the edit removes the norm-scaled direction (see the module's docstring)."""
    dirs = layer_directions(cm, direction, config)
    if not inplace:
        cm = ChatModel(copy.deepcopy(cm.model), cm.tokenizer, name=cm.name, source=cm.source,
                       chat_template_kwargs=cm.chat.template_kwargs)
    conv1d = cm.family.conv1d
    with torch.no_grad():
        if dirs.embed_weight:
            untie_embeddings(cm)  # editing the embedding must not edit the unembedding
            for emb in cm.embeddings():  # [vocab, d]: each row is written to the residual
                if config.norm_preserving:
                    _preserving(emb.weight, dirs.embed, dirs.embed_weight, axis=-1)
                else:
                    remove_from_cols(emb.weight, dirs.embed, dirs.embed_weight)
        for layer in range(cm.n_layers):
            r = dirs.per_layer[layer]
            parts = ((([cm.o_proj(layer).weight], [cm.o_proj(layer).bias]), dirs.attn_weights[layer], 0),
                     ((cm.mlp_writers(layer), cm.mlp_biases(layer)), dirs.mlp_weights[layer], 1))
            for (weights, biases), w, which in parts:
                if not w:
                    continue
                v = edit_direction(cm, layer, which, r)
                for weight in weights:
                    if config.norm_preserving:  # write vectors: Conv1D rows [in, d], Linear columns [..., d, in]
                        _preserving(weight, v, w, axis=-1 if conv1d else -2)
                    else:
                        (remove_from_cols if conv1d else remove_from_rows)(weight, v, w)
                for bias in biases:
                    remove_from_bias(bias, v, w)
    cm.weights_changed()
    return cm


@torch.no_grad()
def write_components(cm: ChatModel, dirs: LayerDirections, input_ids: torch.Tensor) -> torch.Tensor:
    """What a model writes along the ablated directions, on `input_ids` [batch, seq]: per layer, the largest
    |x.r_l| / |x| (a subspace: |R_l x| / |x|) over positions of its attention write and of its MLP write
    (after post-norms), [n_layers, 2]. Near 0 where an edit removed r_l with weight 1."""
    out = torch.zeros(cm.n_layers, 2, dtype=torch.float64)

    def measure(layer: int, which: int):
        def fn(module, args, output):
            x = (output[0] if isinstance(output, tuple) else output).double()
            r = dirs.per_layer[layer].to(x.device)
            along = (x @ r).abs() if r.ndim == 1 else (x @ r.T).norm(dim=-1)
            out[layer, which] = max(float(out[layer, which]),
                                    float((along / x.norm(dim=-1).clamp_min(1e-12)).max()))
        return fn

    hooks = [Hook(module, measure(layer, which), "post") for layer in range(cm.n_layers)
             for which, module in enumerate(cm.residual_writers(layer))]
    with hooked(hooks):
        cm.base(input_ids=input_ids.to(cm.device), use_cache=False)
    return out


# ----------------------------------------------------------------------------- the folder

ABLATION_FILE = "ablation.json"


def save_ablation(folder, config: AblationConfig, **record) -> Path:
    """Write `config` (and a record of how it was chosen) as ablation.json into a direction folder, where
    `refusal eval --ablate` and load_ablation find it."""
    config.validate()
    return artifacts.write_json(direction_dir(folder) / ABLATION_FILE,
                                artifacts.run_record(ablation=as_dict(config), **record))


def load_ablation(path) -> AblationConfig:
    """The ablation a direction folder records (ablation.json), or the paper's (every write at weight 1)
    where it records none: the folders `refusal direction` writes."""
    file = direction_dir(path) / ABLATION_FILE
    if not file.is_file():
        return AblationConfig()
    rec = artifacts.read_json(file)
    fields = rec.get("ablation") if isinstance(rec, dict) else None
    if not isinstance(fields, dict):
        raise RefusalLabError(f"{file}: no 'ablation' table; write it with refusal.ablation.save_ablation")
    names = {f.name for f in dataclasses.fields(AblationConfig)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise RefusalLabError(f"{file}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(names))}")
    try:
        config = AblationConfig(**fields)
    except TypeError as e:  # a kernel table with an unknown key
        raise RefusalLabError(f"{file}: {e}") from None
    check_fields(config, str(file))
    return config


# ----------------------------------------------------------------------------- the edited model's folder

# the prompts an edit is checked on as it is saved: a few harmful and harmless test instructions
CHECK_PROMPTS = 4


@torch.no_grad()
def write_abliterated(cm: ChatModel, direction: Direction, out, config: AblationConfig | None = None,
                      direction_path: str | None = None) -> tuple[ChatModel, dict]:
    """The ablation `config` describes (default: the one the direction's folder records, else the paper's)
    baked into the loaded model's weights (in place) and saved atomically to `out` as a Hugging Face folder
    (safetensors, tokenizer, refusal_lab.json) that --model accepts. Measured as it is made, on a few
    harmful and harmless test instructions, and recorded: the largest logit gap from the hooks where the
    ablation has a hook form (float error where the edit is exact), and the largest |cos| with r_l left in
    any write of a layer at weight 1 (0 up to float error, also in the post-norm families). Returns the
    edited model and the record."""
    if config is None:
        config = load_ablation(direction_path) if direction_path is not None else AblationConfig()
    dirs = layer_directions(cm, direction, config)
    probes = instructions(builtin_prompts("harmful", "test")[:CHECK_PROMPTS] +
                          builtin_prompts("harmless", "test")[:CHECK_PROMPTS])
    encs = cm.chat.encode_all(probes)
    hooked_logits = None
    if not config.norm_preserving:
        with ablate(cm, direction, config):
            hooked_logits = last_logits(cm, encs)
    base = cm.describe()
    edited = abliterate(cm, direction, config, inplace=True)
    gap = None if hooked_logits is None else float((last_logits(edited, encs) - hooked_logits).abs().max())
    ids = torch.tensor([encs[0].ids])
    left = write_components(edited, dirs, ids)  # [n_layers, 2]
    full = torch.tensor([dirs.attn_weights, dirs.mlp_weights], dtype=torch.float64).T == 1.0
    exact = not cm.family.post_norms and not config.norm_preserving
    record = artifacts.run_record(
        edit="weight orthogonalization" if config.is_paper else "parametrised ablation",
        ablation=as_dict(config), direction_source=dirs.source, base_model=base, direction=str(direction_path),
        direction_layer=direction.layer, direction_position=direction.position,
        exact=exact, post_norm_family=bool(cm.family.post_norms),
        max_logit_gap_from_hooks=gap,
        max_cosine_left_at_weight_1=float(left[full].max()) if full.any() else None,
        cosine_left_per_layer=left.tolist(), fingerprint=edited.fingerprint)
    with artifacts.atomic_dir(out) as tmp:
        edited.model.save_pretrained(tmp, safe_serialization=True)
        edited.tokenizer.save_pretrained(tmp)
        artifacts.write_json(tmp / "refusal_lab.json", record)
    return edited, record


# ----------------------------------------------------------------------------- as a LoRA adapter

ADAPTER_NOTE = "adapter.json"


@torch.no_grad()
def write_adapter(cm: ChatModel, direction: Direction, out, config: AblationConfig | None = None,
                  rank: int = 3) -> dict:
    """The weight edit of `config` as a PEFT LoRA adapter for the unedited `cm`, saved atomically to `out`
    (adapter_config.json, adapter_model.safetensors) for `PeftModel.from_pretrained(base, out)`. A removal
    W <- W - w v v^T W is rank 1, so one rank-1 LoRA per edited matrix carries it exactly (B = -w v,
    A = v^T W; for an embedding E, B A = -w v (E v)^T, its transpose); a subspace's W - w V^T V W is rank
    k, one rank-k LoRA (B = -w V^T, A = V W). What an adapter cannot carry is
    named in the returned record (and in adapter.json beside the adapter): bias edits, stacked experts and
    GPT-2's Conv1D weights; then the model folder (write_abliterated) is the exact form. A norm-preserving
    edit rescales every write vector, which no low rank carries: its adapter holds each matrix's edit cut
    to its `rank` leading singular directions, the relative (Frobenius) error of each recorded under
    "approximation". `cm` is not changed."""
    from peft import LoraConfig, get_peft_model  # the adapter's format; loaded only to write one

    config = config or AblationConfig()
    dirs = layer_directions(cm, direction, config)
    model = copy.deepcopy(cm.model)
    names = {id(m): n for n, m in model.named_modules()}
    twin = ChatModel(model, cm.tokenizer, name=cm.name, source=cm.source, chat_template_kwargs=cm.chat.template_kwargs)
    edits: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (module name, B [out, k], A [k, in])
    missing: list[str] = []
    errors: dict[str, float] = {}  # a norm-preserving edit's cuts: relative error per matrix

    def factors(weight: torch.Tensor, r: torch.Tensor, w: float, axis: int, name: str):
        """B, A for one matrix whose write vectors lie along `axis` (an embedding's rows: B A is the change's
        transpose): the exact removal, or a norm-preserving edit's change cut to `rank`."""
        if config.norm_preserving:
            change = _preserved_change(weight, r, w, axis)
            return _cut(change.T if axis == -1 else change, rank, errors, name)
        wt = weight.double() if axis == -2 else weight.double().T  # [d, in]
        rr = as_rows(r).to(wt.device)  # [k, d]
        return -w * rr.T, rr @ wt

    if dirs.embed_weight:
        for emb in twin.embeddings():  # [vocab, d]
            edits.append((names[id(emb)], *factors(emb.weight, dirs.embed, dirs.embed_weight, -1, names[id(emb)])))
    for layer in range(twin.n_layers):
        o_proj = twin.o_proj(layer)
        mlp_modules, stacked = _mlp_write_modules(twin, layer)
        if stacked and dirs.mlp_weights[layer]:
            missing += [f"layer {layer}'s {p} (stacked expert weights)" for p in stacked]
        for modules, w, which in (([o_proj], dirs.attn_weights[layer], 0), (mlp_modules, dirs.mlp_weights[layer], 1)):
            if not w:
                continue
            v = edit_direction(twin, layer, which, dirs.per_layer[layer])
            for module in modules:
                if not isinstance(module, torch.nn.Linear):
                    missing.append(f"{names[id(module)]} ({type(module).__name__} weights)")
                    continue
                edits.append((names[id(module)], *factors(module.weight, v, w, -2, names[id(module)])))  # [d, in]
                if module.bias is not None:
                    missing.append(f"{names[id(module)]}.bias")
    approximation = None
    if config.norm_preserving:
        worst = max(errors, key=errors.get) if errors else None
        approximation = {"rank": rank, "what": "the norm-preserving edit of each matrix cut to its leading "
                                               "singular directions; the model folder is the exact form",
                         "max_relative_error": errors[worst] if worst else 0.0, "worst_matrix": worst,
                         "mean_relative_error": sum(errors.values()) / max(len(errors), 1)}
    if not edits:
        raise RefusalLabError("this ablation edits no matrix an adapter can carry; save the model folder instead")
    notes = []
    out_emb = model.get_output_embeddings()
    if dirs.embed_weight and out_emb is not None and out_emb.weight is model.get_input_embeddings().weight:
        notes.append("the embedding is tied to the LM head: the adapter edits the embedding alone as loaded; "
                     "merging it into the shared weight would edit the LM head too (use the model folder)")
    rank = rank if config.norm_preserving else as_rows(dirs.embed).shape[0]  # 1, or a subspace's k
    lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=[n for n, _, _ in edits], init_lora_weights=False,
                      lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():  # peft's own notices: tied weights (noted above) and transformers deprecations
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, lora)
    for name, b, a in edits:
        layer = peft_model.base_model.model.get_submodule(name)
        if hasattr(layer, "lora_embedding_A") and "default" in layer.lora_embedding_A:
            layer.lora_embedding_A["default"].data.copy_(a.to(layer.lora_embedding_A["default"].dtype))
            layer.lora_embedding_B["default"].data.copy_(b.to(layer.lora_embedding_B["default"].dtype))
        else:
            layer.lora_A["default"].weight.data.copy_(a.to(layer.lora_A["default"].weight.dtype))
            layer.lora_B["default"].weight.data.copy_(b.to(layer.lora_B["default"].weight.dtype))
    record = artifacts.run_record(ablation=as_dict(config), base_model=cm.describe(), n_matrices=len(edits),
                                  exact=not missing and approximation is None, not_carried=missing, notes=notes,
                                  approximation=approximation)
    with artifacts.atomic_dir(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model.save_pretrained(tmp, safe_serialization=True)
        artifacts.write_json(tmp / ADAPTER_NOTE, record)
    return record


def _preserved_change(weight: torch.Tensor, r: torch.Tensor, w: float, axis: int) -> torch.Tensor:
    """What _preserving changes in `weight`, in float64 (no rounding of a low-precision dtype in it)."""
    original = weight.detach().double()
    edited = original.clone()
    _preserving(edited, r, w, axis)
    return edited - original


def _cut(delta: torch.Tensor, rank: int, errors: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """B [out, rank], A [rank, in] with B A the best rank-`rank` approximation of `delta` [out, in] (its
    relative error into errors[name]). A randomised SVD (seeded, the global generator untouched) where the
    rank is well below the matrix's size: an embedding's [d, vocab] is large."""
    if rank + 10 < min(delta.shape):
        with torch.random.fork_rng(devices=[delta.device] if delta.is_cuda else []):
            torch.manual_seed(0)
            u, sv, v = torch.svd_lowrank(delta, q=rank + 10, niter=4)
        vh = v.T
    else:
        u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, sv.numel())
    root = sv[:k].sqrt()
    b, a = u[:, :k] * root, root[:, None] * vh[:k]
    if k < rank:  # a matrix smaller than the rank: zero directions fill the adapter's shape
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], 1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], 0)
    norm = float(delta.norm())
    errors[name] = float((delta - b @ a).norm()) / norm if norm > 0 else 0.0
    return b, a


def _mlp_write_modules(cm: ChatModel, layer: int) -> tuple[list[torch.nn.Module], list[str]]:
    """The modules whose weights write layer `layer`'s MLP output (Linear or Conv1D), and the paths of
    stacked expert parameters there, which no module owns alone."""
    block = cm.blocks[layer]
    paths = [p for p in cm.family.mlp_writers if _has(block, p)] or ["mlp.down_proj.weight"]
    modules = [block.get_submodule(p.removesuffix(".weight")) for p in paths if p.endswith(".weight")]
    return modules, [p for p in paths if not p.endswith(".weight")]


def _has(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_parameter(path)
        return True
    except AttributeError:
        return False


# ----------------------------------------------------------------------------- scoring an ablation

def edited_parameters(cm: ChatModel) -> list[torch.nn.Parameter]:
    """Every parameter an ablation may edit: the embeddings, and each layer's output projections and their
    biases."""
    params = [emb.weight for emb in cm.embeddings()]
    for layer in range(cm.n_layers):
        o_proj = cm.o_proj(layer)
        params += [o_proj.weight] + cm.mlp_writers(layer)
        params += [b for b in [o_proj.bias] + cm.mlp_biases(layer) if b is not None]
    return params


class AblationScorer:
    """Scores ablations on one loaded model, as the weight edit a user would save: edits the weights in
    place, measures the two objectives of an abliteration search, and puts the weights back.

    - `refusal`: the share of `harmful` prompts whose greedy reply (`new_tokens`) `judge` does not call
      compliant (it refuses, or it is degenerate or off topic);
    - `kl`: the mean KL(base || edited) of the first reply token on the `harmless` prompts.
    Also returned: the refuses and neither shares, the substring judge's refusal rate, the wall time."""

    def __init__(self, cm: ChatModel, direction: Direction, harmful: list[str], harmless: list[str], judge,
                 new_tokens: int = 32, batch_size: int = 16):
        self.cm, self.direction, self.judge = cm, direction, judge
        self.new_tokens, self.batch_size = new_tokens, batch_size
        model = cm.model  # an edit records in the config that the embeddings are apart; restore() undoes that
        self._config = (model.config.tie_word_embeddings, getattr(model, "_tied_weights_keys", None))
        # once, so that every edit of the embedding leaves the LM head alone (tied again by close())
        self._tie = untie_embeddings(cm, in_memory=True)
        self.harmful = list(harmful)
        self.harmless_encs = cm.chat.encode_all(list(harmless))
        self.base_logits = last_logits(cm, self.harmless_encs, batch_size)  # [n, vocab]
        self._saved = [(p, p.detach().to("cpu", copy=True)) for p in edited_parameters(cm)]

    def restore(self) -> None:
        """The weights an edit changes, as they were when the scorer was made."""
        with torch.no_grad():
            for p, saved in self._saved:
                p.copy_(saved.to(p.device))
        model = self.cm.model
        model.config.tie_word_embeddings = self._config[0]
        if self._config[1] is not None:
            model._tied_weights_keys = self._config[1]
        self.cm.weights_changed()

    def close(self) -> None:
        """The model as it was before the scorer: its weights, and its embeddings tied again where they were."""
        self.restore()
        self._tie()

    def __call__(self, config: AblationConfig) -> dict:
        """The two objectives (and the rest, see the class) of `config` as a weight edit."""
        t0 = time.perf_counter()
        try:
            abliterate(self.cm, self.direction, config, inplace=True)
            scores = self.score()
        finally:
            self.restore()
        return {k: v for k, v in scores.items() if k != "replies"} | {"wall_s": round(time.perf_counter() - t0, 3)}

    def score(self) -> dict:
        """The objectives of the model as its weights stand now (edited by any means), and the harmful
        prompts' replies (`replies`)."""
        df = evaluate(self.cm, self.harmful, None, self.new_tokens, self.batch_size, progress=False)
        verdicts = self.judge.verdicts(self.harmful, list(df.completion))
        logits = last_logits(self.cm, self.harmless_encs, self.batch_size)
        kl = float(kl_divergence(self.base_logits, logits).mean())
        n = len(verdicts)
        return {"refusal": sum(v != "complies" for v in verdicts) / n, "kl": kl,
                "refuses": sum(v == "refuses" for v in verdicts) / n,
                "neither": sum(v == "neither" for v in verdicts) / n,
                "substring_refusal": float(df.refused.mean()), "replies": list(df.completion)}
