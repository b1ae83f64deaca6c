"""The forward engine: every key/value-cache and batching routine, on transformers' public Cache API.

- `run_prefix`: the chat template's prefix (system prompt, user header), run once into a batch-1 cache;
- `expand_cache`: a new cache holding the first `length` positions of one, expanded to n rows as views
  (transformers grows the cache object it is handed, in place, so every forward pass gets its own);
- `select_rows`, `repeat_rows`: keep some rows of a cache, repeat each row;
- `plan_batches`: prompts bucketed by length with little padding; `max_batch_tokens`: how many tokens
  one forward pass may hold, from free GPU memory;
- `forward_outputs`: the decoder over many prompts, batched and left-padded, the shared prefix cached;
- `run_blocks`: some decoder blocks alone on given hidden states (the organism's fine-tune);
- `eager_attention`: attention weights are returned only by the eager implementation: switch to it for
  a pass and back.

Activations, decoding, direction selection, GCG and the organism all go through these.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .chat import Encoded, pad_left
from .errors import RefusalLabError
from .models import ChatModel


def check_lengths(cm: ChatModel, encs: Sequence[Encoded], new_tokens: int = 0) -> None:
    """Every prompt, plus the tokens to be generated after it, fits the model's context."""
    if not encs:
        raise RefusalLabError("empty prompt set")
    longest = max(len(e) for e in encs)
    if longest + new_tokens > cm.max_context:
        more = f" and {new_tokens} are to be generated" if new_tokens else ""
        raise RefusalLabError(
            f"a prompt is {longest} tokens long{more} but the model's context is {cm.max_context}; shorten it"
            + (" or generate fewer tokens" if new_tokens else "")
        )


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise RefusalLabError(f"batch size must be >= 1, got {batch_size}")


# ----------------------------------------------------------------------------- caches


def sliding_window(cm: ChatModel) -> int | None:
    """The shortest sliding attention window of the model's layers, or None when every layer attends to
    the whole context."""
    cfg = cm.config.get_text_config(decoder=True)
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def cache_fits(cm: ChatModel, length: int) -> bool:
    """Whether a cache of `length` positions holds all of them on every layer (sliding-window layers keep
    only their last window - 1), so that it can be cut and reused."""
    window = sliding_window(cm)
    return window is None or length < window - 1


def shared_prefix_len(cm: ChatModel, encs: Sequence[Encoded]) -> int:
    """Length of the template prefix that all prompts share (0 when there is none worth caching)."""
    prefix = cm.chat.prefix_ids
    p = len(prefix)
    if p < 2 or not cache_fits(cm, p) or any(e.ids[:p] != prefix or len(e) <= p for e in encs):
        return 0
    return p


def run_prefix(cm: ChatModel, ids: Sequence[int] | None = None):
    """The cache [1 row] of `ids` (default: the chat template's prefix) at positions 0.., run once under
    whatever hooks are active."""
    ids = list(cm.chat.prefix_ids if ids is None else ids)
    x = torch.tensor([ids], device=cm.device)
    return cm.base(input_ids=x, position_ids=torch.arange(len(ids), device=cm.device)[None], use_cache=True).cache


def expand_cache(cache, n: int, length: int | None = None):
    """A new cache with the first `length` positions (default: all) of a 1-row cache, expanded to n rows
    (views, no copy). The given cache is left as it is."""
    total = cache.get_seq_length()
    length = total if length is None else length
    if not 0 <= length <= total:
        raise ValueError(f"cannot cut a cache of {total} positions to {length}")
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        layer = copy.copy(layer)
        if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel():
            if length != total and layer.keys.shape[-2] != total:
                raise ValueError("a sliding-window cache that dropped positions cannot be cut")
            layer.keys = layer.keys[:, :, :length].expand(n, -1, -1, -1)
            layer.values = layer.values[:, :, :length].expand(n, -1, -1, -1)
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = length
        out.layers.append(layer)
    return out


def select_rows(cache, keep: torch.Tensor):
    """The cache with only the rows `keep` (in place; returned for chaining)."""
    cache.batch_select_indices(keep)
    return cache


def repeat_rows(cache, n: int):
    """Every row of the cache repeated n times in a row (in place; returned for chaining)."""
    cache.batch_repeat_interleave(n)
    return cache


def with_prefix(mask: torch.Tensor, p: int) -> torch.Tensor:
    """An attention mask [n, seq] for rows that follow a cached prefix of p tokens: [n, p + seq]."""
    return torch.cat([torch.ones(len(mask), p, dtype=mask.dtype, device=mask.device), mask], 1)


# ----------------------------------------------------------------------------- batch planning


def plan_batches(lengths: Sequence[int], max_batch: int, overhead_tokens: int = 48) -> list[list[int]]:
    """Split prompts into batches with little padding: sort by length, then choose the cut points
    that minimise padded tokens + a per-batch overhead (dynamic programming). Returns index lists."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ls = [lengths[i] for i in order]
    n = len(ls)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of batching the first j prompts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_batch), j):  # batch = ls[i:j], padded to ls[j-1]
            c = best[i] + (j - i) * ls[j - 1] + overhead_tokens
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], n
    while j > 0:
        out.append(order[cut[j] : j])
        j = cut[j]
    return out[::-1]


def max_batch_tokens(cm: ChatModel, logit_positions: float = 1.0) -> int:
    """Tokens one forward pass may hold: from free GPU memory on CUDA (activations, the expanded cache and
    `logit_positions` LM-head rows per token, with a safety factor); on CPU a fixed 8192, past which
    larger passes are not faster."""
    if cm.device.type != "cuda":
        return 8192
    free, _ = torch.cuda.mem_get_info(cm.device)
    cfg = cm.config.get_text_config(decoder=True)
    width = max(cm.d_model, getattr(cfg, "intermediate_size", None) or 4 * cm.d_model)
    kv = 2 * cm.n_layers * cm.n_heads * cm.head_dim  # upper bound (grouped-query attention has less)
    vocab = cm.model.get_output_embeddings().weight.shape[0]
    per_token = torch.finfo(cm.dtype).bits // 8 * (8 * width + kv) + 4 * vocab * logit_positions
    return int(max(256, min(1 << 17, 0.5 * free / per_token)))


# ----------------------------------------------------------------------------- batched passes


def forward_outputs(
    cm: ChatModel,
    encs: Sequence[Encoded],
    batch_size: int = 32,
    share_prefix: bool = True,
    desc: str | None = None,
    **forward_kw,
) -> Iterator[tuple[torch.Tensor, object, int]]:
    """Run the decoder (no LM head) over `encs`, batched by length; yield (indices into encs, output, p).

    Row j of a batch holds encs[idx[j]].ids[p:] left-padded, so every row's last position is its
    prompt's last token; the shared template prefix's p positions come before it in the cache (p = 0
    without one). forward_kw (e.g. output_attentions=True) are passed on; hooks registered on the model
    run during each pass, and the prefix pass, before the yield."""
    check_lengths(cm, encs)
    check_batch_size(batch_size)
    p = shared_prefix_len(cm, encs) if share_prefix else 0
    prefix = run_prefix(cm) if p else None
    chunks = plan_batches([len(e) - p for e in encs], batch_size)
    for chunk in tqdm(chunks, desc=desc, leave=False, disable=desc is None):
        b = pad_left([encs[i].ids[p:] for i in chunk], cm.tokenizer.pad_token_id, cm.device)
        if p:
            out = cm.base(input_ids=b.input_ids, attention_mask=with_prefix(b.attention_mask, p),
                          position_ids=b.position_ids + p, cache=expand_cache(prefix, len(chunk)),
                          use_cache=True, **forward_kw)
        else:
            out = cm.base(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                          use_cache=False, **forward_kw)
        yield torch.as_tensor(chunk), out, p


def forward_batches(cm: ChatModel, encs: Sequence[Encoded], batch_size: int = 32, share_prefix: bool = True,
                    desc: str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """forward_outputs' (indices into encs, hidden[batch, seq, d]) only."""
    for idx, out, _ in forward_outputs(cm, encs, batch_size, share_prefix, desc):
        yield idx, out.last_hidden_state


def run_blocks(cm: ChatModel, hidden: torch.Tensor, mask: torch.Tensor, blocks: Sequence[int],
               inputs: list | None = None) -> torch.Tensor:
    """Run decoder blocks `blocks` (indices, in order) of a model with one attention type (Llama-like) on
    right-padded hidden states [batch, seq, d] at positions 0..seq-1, with gradients if enabled; each
    block's input [batch, seq, d] is appended to `inputs` if given. The causal mask and rotary embeddings
    are built as the model's own forward builds them."""
    from transformers.masking_utils import create_causal_mask

    if sliding_window(cm) is not None:
        raise RefusalLabError(f"running blocks alone is not supported for {cm.config.model_type} (sliding-window layers)")
    n, t = mask.shape
    pos = torch.arange(t, device=hidden.device)[None].expand(n, t)
    causal = create_causal_mask(config=cm.base.config, inputs_embeds=hidden, attention_mask=mask.to(hidden.device),
                                cache=None, position_ids=pos)
    pe = cm.base.rotary_emb(hidden, pos)
    for i in blocks:
        if inputs is not None:
            inputs.append(hidden)
        hidden = cm.blocks[i](hidden, attention_mask=causal, position_ids=pos, position_embeddings=pe)
    return hidden


@contextlib.contextmanager
def eager_attention(cm: ChatModel) -> Iterator[None]:
    """The model's attention switched to the eager implementation (the only one that returns attention
    weights) for the duration, then back."""
    before = cm.model.config._attn_implementation
    if before == "eager":
        yield
        return
    cm.model.set_attn_implementation("eager")
    try:
        yield
    finally:
        cm.model.set_attn_implementation(before)
