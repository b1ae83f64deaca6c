"""Interventions on the residual stream, as context managers that always remove their hooks,
and weight orthogonalization (the same edit baked into the weights).

- directional ablation of a unit direction r: x <- x - (x.r) r at every block's residual
  input and at every attention and MLP output, all layers and positions;
- activation addition: x <- x + c * v at one block's input, all positions;
- weight orthogonalization: W <- W - r r^T W for every matrix writing the residual stream.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from .errors import RefusalLabError
from .models import ChatModel


def _replace_hidden(args: tuple, kwargs: dict, fn) -> tuple[tuple, dict]:
    """Apply fn to a block's hidden_states input, wherever it was passed."""
    if args:
        return (fn(args[0]),) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = fn(kwargs["hidden_states"])
    return args, kwargs


def _hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_output(output, fn):
    if isinstance(output, tuple):
        return (fn(output[0]),) + tuple(output[1:])
    return fn(output)


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


@contextmanager
def hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _project_out(rv: _PerDevice, positions: torch.Tensor | None = None):
    mask = None if positions is None else _PerDevice(positions[..., None])

    def fn(x: torch.Tensor) -> torch.Tensor:
        r = rv.like(x)
        if mask is None:
            return x - (x @ r).unsqueeze(-1) * r
        return x - mask.like(x) * (x @ r).unsqueeze(-1) * r

    return fn


@contextmanager
def ablate_direction(cm: ChatModel, direction: torch.Tensor, layers: Sequence[int] | None = None,
                     positions: torch.Tensor | None = None) -> Iterator[None]:
    """Directional ablation: remove the unit direction from every residual input and every write to the residual.

    The paper ablates at every layer and position (the default). For analysis, `layers` restricts it to some
    blocks and `positions`, a 0/1 mask [batch, seq] shaped like the inputs the model will be run on, to some
    positions."""
    rv = _PerDevice(_unit(cm, direction))
    proj = _project_out(rv, None if positions is None else positions.detach().float())
    handles = []
    try:
        for layer in range(cm.n_layers) if layers is None else [_check_layer(cm, l) for l in layers]:
            block = cm.blocks[layer]
            handles.append(
                block.register_forward_pre_hook(lambda m, a, k: _replace_hidden(a, k, proj), with_kwargs=True)
            )
            for mod in cm.residual_writers(layer):
                handles.append(mod.register_forward_hook(lambda m, a, out: _replace_output(out, proj)))
    except Exception:
        for h in handles:
            h.remove()
        raise
    with hooks(handles):
        yield


def _check_layer(cm: ChatModel, layer: int) -> int:
    if not isinstance(layer, int) or not 0 <= layer < cm.n_layers:
        raise RefusalLabError(f"layer {layer} is out of range: this model has layers 0..{cm.n_layers - 1}")
    return layer


@contextmanager
def add_direction(cm: ChatModel, vector: torch.Tensor, layer: int, coeff: float = 1.0) -> Iterator[None]:
    """Activation addition: x <- x + coeff * vector at block `layer`'s input, at all positions."""
    _check_layer(cm, layer)
    vv = _PerDevice(_check_vector(cm, vector, "direction").float() * coeff)
    add = lambda x: x + vv.like(x)  # noqa: E731
    h = cm.blocks[layer].register_forward_pre_hook(lambda m, a, k: _replace_hidden(a, k, add), with_kwargs=True)
    with hooks([h]):
        yield


@contextmanager
def capture_block_inputs(
    cm: ChatModel, store: dict, layers: Sequence[int] | None = None, positions: Sequence[int] | None = None
) -> Iterator[None]:
    """Record the residual stream at the input of each block into store[layer] ([batch, pos, d], float32, CPU).

    positions: indices into the sequence (negative from the end); None keeps all positions.
    """
    layers = range(cm.n_layers) if layers is None else layers
    idx = None if positions is None else torch.as_tensor(list(positions))

    def make(layer: int):
        def hook(m, a, k):
            x = _hidden_input(a, k)
            sel = x if idx is None else x[:, idx.to(x.device)]
            store[layer] = sel.detach().float().cpu()

        return hook

    handles = [cm.blocks[_check_layer(cm, l)].register_forward_pre_hook(make(l), with_kwargs=True) for l in layers]
    with hooks(handles):
        yield


class _PassThrough(torch.nn.Module):
    """Stands in for a decoder block that is not run: its output is its input."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def start_at_layer(cm: ChatModel, layer: int, hidden_fn) -> Iterator[None]:
    """Forward passes run only blocks `layer`.. : the blocks before it are replaced by pass-throughs (so
    every block keeps its index, and with it its attention type and cache layer), and block `layer`'s
    input is hidden_fn(whatever arrives there), typically a cached residual stream. The model's own
    forward still builds the masks, positions and rotary embeddings, and applies the final norm, so
    nothing family-specific is reimplemented."""
    _check_layer(cm, layer)
    blocks = cm.blocks
    saved = [blocks[i] for i in range(layer)]
    h = blocks[layer].register_forward_pre_hook(lambda m, a, k: _replace_hidden(a, k, hidden_fn), with_kwargs=True)
    try:
        for i in range(layer):
            blocks[i] = _PassThrough()
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block
        h.remove()


# ----------------------------------------------------------------------------- weight orthogonalization


def _orth_out_rows(weight: torch.Tensor, r: torch.Tensor) -> None:
    """W[..., d, in] <- W - r r^T W: an nn.Linear's weight [d, in] (output = W x), or a mixture of experts'
    stacked down projections [experts, d, in], each expert edited alike."""
    w = weight.data
    rr = r.to(w.device, torch.float64)
    wf = w.double()
    w.copy_((wf - rr[:, None] * (rr @ wf)[..., None, :]).to(w.dtype))


def _orth_out_cols(weight: torch.Tensor, r: torch.Tensor) -> None:
    """W[in, out] <- W - W r r^T  (GPT-2 Conv1D: output = x W, and embeddings [vocab, d])."""
    w = weight.data
    rr = r.to(w.device, torch.float64)
    wf = w.double()
    w.copy_((wf - torch.outer(wf @ rr, rr)).to(w.dtype))


def _orth_bias(bias: torch.Tensor | None, r: torch.Tensor) -> None:
    if bias is not None:
        b = bias.data
        rr = r.to(b.device, torch.float64)
        bf = b.double()
        b.copy_((bf - (bf @ rr)[..., None] * rr).to(b.dtype))  # [..., d]


def orthogonalize(cm: ChatModel, direction: torch.Tensor, inplace: bool = False) -> ChatModel:
    """Return a model whose weights can no longer write the direction: W <- W - r r^T W for the
    embeddings, every attention output projection and every MLP output projection (every expert's, and
    a shared expert's, in a mixture of experts; biases too).

    Gives the same logits as `ablate_direction`. Families that normalise a sublayer's output
    before adding it to the residual (Gemma2, Gemma3, OLMo-2) cannot be edited exactly and are refused.
    """
    if cm.family.post_norms:
        raise RefusalLabError(
            f"weight orthogonalization is not exact for {cm.config.model_type} (a norm follows each sublayer "
            "before the residual add); use inference-time ablation (--ablate) instead"
        )
    r = _unit(cm, direction)
    if not inplace:
        cm = ChatModel(copy.deepcopy(cm.model), cm.tokenizer, name=cm.name, source=cm.source,
                       chat_template_kwargs=cm.chat.template_kwargs)
    model = cm.model
    # untie the LM head from the embedding: orthogonalizing the embedding must not edit the unembedding
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is not None and out_emb.weight is in_emb.weight:
        out_emb.weight = torch.nn.Parameter(in_emb.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = []
    with torch.no_grad():
        for emb in cm.embeddings():
            _orth_out_cols(emb.weight, r)  # each row is a vector written to the residual
        for layer in range(cm.n_layers):
            o_proj = cm.o_proj(layer)
            for weight in [o_proj.weight] + cm.mlp_writers(layer):
                (_orth_out_cols if cm.family.conv1d else _orth_out_rows)(weight, r)
            for bias in [o_proj.bias] + cm.mlp_biases(layer):
                _orth_bias(bias, r)
    cm._fingerprint = None
    return cm
