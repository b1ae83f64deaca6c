"""Interventions on the residual stream as data, and weight orthogonalization (the same edit baked into
the weights).

An intervention is a list of `Hook`s, (module, fn) pairs with the kind of PyTorch hook each is, as in
the paper's own code and TransformerLens; `hooked(hooks)` applies any list and always removes it.
Every hook of the project goes through it: ablation, addition, capture, GCG's direction term and the
analysis's per-head capture.

- directional ablation of a unit direction r: x <- x - (x.r) r at every block's residual input and at
  every attention and MLP output, all layers and positions (`ablation_hooks`, `ablate_direction`);
- activation addition: x <- x + c * v at one block's input, all positions (`addition_hooks`, `add_direction`);
- capture of the residual stream at block inputs (`capture_hooks`, `capture_block_inputs`);
- weight orthogonalization: W <- W - r r^T W for every matrix writing the residual stream.
"""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import torch

from .errors import RefusalLabError
from .models import FAMILIES, ChatModel

log = logging.getLogger(__name__)


class Hook(NamedTuple):
    """One hook: `fn` on `module`. kind "pre": a forward pre-hook with kwargs, fn(module, args, kwargs) ->
    (args, kwargs) or None; kind "post": a forward hook, fn(module, args, output) -> output or None."""

    module: torch.nn.Module
    fn: Callable
    kind: str = "pre"


@contextmanager
def hooked(hooks: Iterable[Hook]) -> Iterator[None]:
    """Apply every hook for the duration; all are removed on exit, whatever happens (also when registering
    one of them fails)."""
    handles = []
    try:
        for h in hooks:
            if h.kind == "pre":
                handles.append(h.module.register_forward_pre_hook(h.fn, with_kwargs=True))
            elif h.kind == "post":
                handles.append(h.module.register_forward_hook(h.fn))
            else:
                raise ValueError(f"unknown hook kind {h.kind!r}; use 'pre' or 'post'")
        yield
    finally:
        for handle in handles:
            handle.remove()


def replace_hidden(args: tuple, kwargs: dict, fn) -> tuple[tuple, dict]:
    """A block's arguments with fn applied to its hidden_states input, wherever it was passed."""
    if args:
        return (fn(args[0]),) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = fn(kwargs["hidden_states"])
    return args, kwargs


def hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """A block's hidden_states input [batch, seq, d]."""
    return args[0] if args else kwargs["hidden_states"]


def replace_output(output, fn):
    """A module's output with fn applied to the hidden states (the first element of a tuple)."""
    if isinstance(output, tuple):
        return (fn(output[0]),) + tuple(output[1:])
    return fn(output)


def input_hook(module: torch.nn.Module, fn) -> Hook:
    """x <- fn(x) on the hidden states entering `module` (a block)."""
    return Hook(module, lambda m, a, k: replace_hidden(a, k, fn), "pre")


def output_hook(module: torch.nn.Module, fn) -> Hook:
    """y <- fn(y) on `module`'s output hidden states."""
    return Hook(module, lambda m, a, out: replace_output(out, fn), "post")


class _PerDevice:
    """A vector cast once to each device/dtype it meets (models spread over GPUs)."""

    def __init__(self, v: torch.Tensor):
        self.v = v.detach()
        self._cache: dict = {}

    def like(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in self._cache:
            self._cache[key] = self.v.to(device=x.device, dtype=x.dtype)
        return self._cache[key]


def _check_vector(cm: ChatModel, v: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.ndim != 1:
        raise RefusalLabError(f"{what} must be a 1-D tensor")
    if v.shape[0] != cm.d_model:
        raise RefusalLabError(
            f"{what} has dimension {v.shape[0]} but the model's residual stream has {cm.d_model}; "
            "use a direction computed on this model"
        )
    return v


def _unit(cm: ChatModel, direction: torch.Tensor) -> torch.Tensor:
    r = _check_vector(cm, direction, "direction").double()
    norm = r.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise RefusalLabError("direction is zero or not finite")
    return r / norm


def orthonormal_basis(vectors: torch.Tensor, what: str = "the basis") -> torch.Tensor:
    """vectors [k, d] -> an orthonormal basis [k, d] (float64) of their span, its first row along the
    first vector (QR, signs kept); a one-line error if they are not finite or not linearly independent."""
    v = vectors.double()
    if v.ndim != 2 or v.shape[0] == 0:
        raise RefusalLabError(f"{what} must be a [k, d] tensor of k >= 1 vectors")
    if not torch.isfinite(v).all():
        raise RefusalLabError(f"{what} is not finite")
    q, r = torch.linalg.qr(v.T)  # q [d, k], r [k, k]
    diag = r.diagonal()
    scale = v.norm(dim=-1).max()
    if scale == 0 or (diag.abs() <= 1e-6 * scale).any():
        raise RefusalLabError(f"{what}: its {v.shape[0]} vectors are not linearly independent")
    return (q * diag.sign()).T.contiguous()


def _directions(cm: ChatModel, direction: torch.Tensor) -> torch.Tensor:
    """A direction [d] as its unit vector, or a subspace's vectors [k, d] as an orthonormal basis of it."""
    if isinstance(direction, torch.Tensor) and direction.ndim == 2:
        if direction.shape[1] != cm.d_model:
            raise RefusalLabError(f"the basis has dimension {direction.shape[1]} but the model's residual stream "
                                  f"has {cm.d_model}; use directions computed on this model")
        return orthonormal_basis(direction)
    return _unit(cm, direction)


def project_out(x: torch.Tensor, r: torch.Tensor, w: float = 1.0) -> torch.Tensor:
    """x [..., d] with w times its component in span(r) removed: r a unit vector [d] (x - w (x.r) r) or an
    orthonormal basis [k, d] (x - w R^T R x), in x's dtype."""
    if r.ndim == 1:
        return x - w * (x @ r).unsqueeze(-1) * r
    return x - w * (x @ r.T) @ r


def check_layer(cm: ChatModel, layer: int) -> int:
    """`layer` if the model has it; a one-line error otherwise."""
    if not isinstance(layer, int) or not 0 <= layer < cm.n_layers:
        raise RefusalLabError(f"layer {layer} is out of range: this model has layers 0..{cm.n_layers - 1}")
    return layer


def _project_out(rv: _PerDevice, positions: torch.Tensor | None = None):
    mask = None if positions is None else _PerDevice(positions[..., None])

    def fn(x: torch.Tensor) -> torch.Tensor:
        r = rv.like(x)
        if mask is None:
            return project_out(x, r)
        return x - mask.like(x) * (x - project_out(x, r))

    return fn


def ablation_sites(cm: ChatModel, layers: Sequence[int] | None = None, fn=None) -> list[Hook]:
    """fn on every residual input of the blocks `layers` (default: all) and on every write to the residual
    stream there (attention and MLP outputs, or their post-norms)."""
    out = []
    for layer in range(cm.n_layers) if layers is None else [check_layer(cm, l) for l in layers]:
        out.append(input_hook(cm.blocks[layer], fn))
        out.extend(output_hook(mod, fn) for mod in cm.residual_writers(layer))
    return out


def ablation_hooks(cm: ChatModel, direction: torch.Tensor, layers: Sequence[int] | None = None,
                   positions: torch.Tensor | None = None) -> list[Hook]:
    """Directional ablation of `direction` as hooks: removed from every residual input and every write to the
    residual. `direction` [d] is one direction (normalised here), [k, d] a subspace (its span, made
    orthonormal here: x <- x - R^T R x). The paper ablates at every layer and position (the default). For
    analysis, `layers` restricts it to some blocks and `positions`, a 0/1 mask [batch, seq] shaped like the
    inputs the model will be run on, to some positions."""
    if not cm.sites_checked:
        check_ablation_sites(cm)
    rv = _PerDevice(_directions(cm, direction))
    return ablation_sites(cm, layers, _project_out(rv, None if positions is None else positions.detach().float()))


def ablate_direction(cm: ChatModel, direction: torch.Tensor, layers: Sequence[int] | None = None,
                     positions: torch.Tensor | None = None):
    """Directional ablation for the duration of a `with` block (see ablation_hooks)."""
    return hooked(ablation_hooks(cm, direction, layers, positions))


def addition_hooks(cm: ChatModel, vector: torch.Tensor, layer: int, coeff: float = 1.0) -> list[Hook]:
    """Activation addition as hooks: x <- x + coeff * vector at block `layer`'s input, at all positions."""
    check_layer(cm, layer)
    vv = _PerDevice(_check_vector(cm, vector, "direction").float() * coeff)
    return [input_hook(cm.blocks[layer], lambda x: x + vv.like(x))]


def add_direction(cm: ChatModel, vector: torch.Tensor, layer: int, coeff: float = 1.0):
    """Activation addition for the duration of a `with` block (see addition_hooks)."""
    return hooked(addition_hooks(cm, vector, layer, coeff))


def capture_hooks(cm: ChatModel, store: dict, layers: Sequence[int] | None = None,
                  positions: Sequence[int] | Callable[[], object] | None = None, keep_graph: bool = False) -> list[Hook]:
    """Hooks that record the residual stream at the input of each block into store[layer]: [batch, pos, d]
    as float32 on the CPU, or, with keep_graph, as it is (device, dtype, autograd graph: a loss can be
    taken through it). positions: indices into the sequence (negative from the end), or a function giving
    the index at call time; None keeps all positions."""
    layers = range(cm.n_layers) if layers is None else layers
    idx = None if positions is None or callable(positions) else torch.as_tensor(list(positions))

    def make(layer: int):
        def hook(m, a, k):
            x = hidden_input(a, k)
            sel = x if positions is None else x[:, positions() if callable(positions) else idx.to(x.device)]
            store[layer] = sel if keep_graph else sel.detach().float().cpu()

        return hook

    return [Hook(cm.blocks[check_layer(cm, l)], make(l), "pre") for l in layers]


def capture_block_inputs(cm: ChatModel, store: dict, layers: Sequence[int] | None = None,
                         positions: Sequence[int] | None = None):
    """Capture (see capture_hooks) for the duration of a `with` block."""
    return hooked(capture_hooks(cm, store, layers, positions))


@torch.no_grad()
def check_ablation_sites(cm: ChatModel) -> None:
    """Whether directional ablation at the sites this anatomy names (every block's input, every residual
    writer's output) really removes a direction from the residual stream: on one short prompt, with a
    random unit direction projected out there, no block's input or output may keep a component along it.
    A one-line error naming the supported families otherwise (e.g. a post-norm model taken for a
    Llama-like one). Run for models of untested families when they load or are first ablated."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(cm.d_model, generator=g, dtype=torch.float64)
    rv = _PerDevice((r / r.norm()).float())
    worst = [0.0]

    def measure(x):
        x = x.float()
        r32 = rv.like(x)
        worst[0] = max(worst[0], float(((x @ r32).abs() / x.norm(dim=-1).clamp_min(1e-6)).max()))

    seen_in = [Hook(b, lambda m, a, k: measure(hidden_input(a, k)), "pre") for b in cm.blocks]
    seen_out = [Hook(b, lambda m, a, out: measure(out[0] if isinstance(out, tuple) else out), "post") for b in cm.blocks]
    try:
        with hooked(ablation_sites(cm, None, _project_out(rv)) + seen_in + seen_out):
            ids = torch.tensor([cm.chat.encode("Hello, how are you today?").ids], device=cm.device)
            cm.base(input_ids=ids, use_cache=False)
    except Exception as e:
        raise RefusalLabError(f"model type {cm.config.model_type!r} is not a supported family and its anatomy "
                              f"could not be checked ({type(e).__name__}); supported families: "
                              f"{', '.join(FAMILIES)}") from e
    tolerance = 1e-4 if cm.dtype == torch.float32 else 2e-2
    if not worst[0] < tolerance:
        raise RefusalLabError(f"model type {cm.config.model_type!r} is not a supported family, and ablating a "
                              f"direction at its Llama-like sites leaves a component along it (cosine "
                              f"{worst[0]:.2g}); supported families: {', '.join(FAMILIES)}")
    cm.sites_checked = True
    log.warning("model type %r is not a tested family; its anatomy passed the check, so it is treated as "
                "Llama-like", cm.config.model_type)


class _PassThrough(torch.nn.Module):
    """Stands in for a decoder block that is not run: its output is its input."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def start_at_layer(cm: ChatModel, layer: int, hidden_fn) -> Iterator[None]:
    """Forward passes run only blocks `layer`.. , with block `layer`'s input replaced by hidden_fn(whatever
    arrives there), typically a cached residual stream. A hook cannot skip a module's computation, so the
    blocks before `layer` are stood in for by pass-throughs for the duration (every block keeps its index,
    and with it its attention type and cache layer) and put back on exit. The model's own forward still
    builds the masks, positions and rotary embeddings, and applies the final norm, so nothing
    family-specific is reimplemented."""
    check_layer(cm, layer)
    blocks = cm.blocks
    saved = [blocks[i] for i in range(layer)]
    try:
        for i in range(layer):
            blocks[i] = _PassThrough()
        with hooked([input_hook(blocks[layer], hidden_fn)]):
            yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


# ----------------------------------------------------------------------------- weight orthogonalization


def as_rows(r: torch.Tensor, device=None) -> torch.Tensor:
    """A unit vector [d] or an orthonormal basis [k, d] as rows [k, d], float64 (on `device` if given)."""
    rr = r.to(device or r.device, torch.float64)
    return rr[None] if rr.ndim == 1 else rr


def remove_from_rows(weight: torch.Tensor, r: torch.Tensor, w: float = 1.0) -> None:
    """W[..., d, in] <- W - w R^T R W (R: the unit r [d] or an orthonormal basis [k, d]): an nn.Linear's
    weight [d, in] (output = W x), or a mixture of experts' stacked down projections [experts, d, in], each
    expert edited alike (w = 1: span(R) removed)."""
    t = weight.data
    rr = as_rows(r, t.device)
    wf = t.double()
    t.copy_((wf - w * rr.T @ (rr @ wf)).to(t.dtype))


def remove_from_cols(weight: torch.Tensor, r: torch.Tensor, w: float = 1.0) -> None:
    """W[in, d] <- W - w W R^T R  (GPT-2 Conv1D: output = x W, and embeddings [vocab, d])."""
    t = weight.data
    rr = as_rows(r, t.device)
    wf = t.double()
    t.copy_((wf - w * (wf @ rr.T) @ rr).to(t.dtype))


def remove_from_bias(bias: torch.Tensor | None, r: torch.Tensor, w: float = 1.0) -> None:
    """b[..., d] <- b - w R^T R b."""
    if bias is not None:
        b = bias.data
        rr = as_rows(r, b.device)
        bf = b.double()
        b.copy_((bf - w * (bf @ rr.T) @ rr).to(b.dtype))


def untie_embeddings(cm: ChatModel, in_memory: bool = False) -> Callable[[], None]:
    """Give the LM head its own copy of a tied embedding matrix, so that editing the embedding (what is
    written into the residual) leaves the unembedding as it was, and (unless `in_memory`: the untying is
    undone before anything is saved) record in the config that they are apart, so that a saved model is
    not tied again when it loads. Returns what ties them again (with the embedding's values then)."""
    model = cm.model
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is None:
        return lambda: None
    tied = out_emb.weight is in_emb.weight
    flag, keys = model.config.tie_word_embeddings, getattr(model, "_tied_weights_keys", None)
    if tied:
        out_emb.weight = torch.nn.Parameter(in_emb.weight.detach().clone(), requires_grad=False)
    if not in_memory:
        model.config.tie_word_embeddings = False  # also for a model untied in memory before
        if keys is not None:
            model._tied_weights_keys = []

    def tie() -> None:
        if tied:
            out_emb.weight = in_emb.weight
        model.config.tie_word_embeddings = flag
        if keys is not None:
            model._tied_weights_keys = keys
        cm.weights_changed()

    return tie


def orthogonalize(cm: ChatModel, direction: torch.Tensor, inplace: bool = False) -> ChatModel:
    """Return a model whose weights can no longer write the direction: W <- W - r r^T W for the
    embeddings, every attention output projection and every MLP output projection (every expert's, and
    a shared expert's, in a mixture of experts; biases too). `direction` [k, d] is a subspace: W <- W -
    R^T R W with R an orthonormal basis of its span.

    Gives the same logits as `ablate_direction`. Families that normalise a sublayer's output
    before adding it to the residual (Gemma2, Gemma3, OLMo-2) cannot be edited exactly and are refused.
    """
    if cm.family.post_norms:
        raise RefusalLabError(
            f"weight orthogonalization is not exact for {cm.config.model_type} (a norm follows each sublayer "
            "before the residual add); use inference-time ablation (--ablate) instead"
        )
    r = _directions(cm, direction)
    if not inplace:
        cm = ChatModel(copy.deepcopy(cm.model), cm.tokenizer, name=cm.name, source=cm.source,
                       chat_template_kwargs=cm.chat.template_kwargs)
    untie_embeddings(cm)  # orthogonalizing the embedding must not edit the unembedding
    with torch.no_grad():
        for emb in cm.embeddings():
            remove_from_cols(emb.weight, r)  # each row is a vector written to the residual
        for layer in range(cm.n_layers):
            o_proj = cm.o_proj(layer)
            for weight in [o_proj.weight] + cm.mlp_writers(layer):
                (remove_from_cols if cm.family.conv1d else remove_from_rows)(weight, r)
            for bias in [o_proj.bias] + cm.mlp_biases(layer):
                remove_from_bias(bias, r)
    cm.weights_changed()
    return cm


class TokenCounter:
    """Tokens a decoder runs, counted by a forward pre-hook on `module` (a model's base decoder, which its
    causal LM, generation and the attacks all call): batch rows x positions of every call, so that a
    position served from a key/value cache counts once. `part()` names the work running now (None:
    "other"); tokens are kept per part. A call made with gradients on, on embeddings that need them, is
    one that a token gradient backpropagates through: its tokens count as backward tokens as well (a
    forward hook cannot see the backward pass itself). Use as a context manager; the hook is removed on
    exit."""

    def __init__(self, module: torch.nn.Module, part: Callable[[], str | None] = lambda: None):
        self.module, self.part = module, part
        self.forward: dict[str, int] = {}
        self.backward: dict[str, int] = {}
        self.marks: list[int] = []  # tokens (forward and backward) at each mark(): the bench marks every step's end
        self.counting = True
        self._hooks = None

    def mark(self) -> None:
        self.marks.append(self.tokens)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing counted for the duration (work the measured attack does not do)."""
        was, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = was

    def _count(self, module, args, kwargs):
        if not self.counting:
            return None
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            n = int(x.shape[0]) * int(x.shape[1])
            key = self.part() or "other"
            self.forward[key] = self.forward.get(key, 0) + n
            if torch.is_grad_enabled() and x.requires_grad:
                self.backward[key] = self.backward.get(key, 0) + n
        return None

    @property
    def forward_tokens(self) -> int:
        return sum(self.forward.values())

    @property
    def backward_tokens(self) -> int:
        return sum(self.backward.values())

    @property
    def tokens(self) -> int:
        """Forward and backward tokens together."""
        return self.forward_tokens + self.backward_tokens

    def __enter__(self):
        self._hooks = hooked([Hook(self.module, self._count, "pre")])
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False
