"""Batched forward passes: residual-stream activations and first-reply-position logits.

Prompts are run in batches sorted by length (little padding), left-padded so every prompt
ends at the last position, and the chat template's shared prefix (system prompt, user header)
is computed once per call and reused through the key/value cache. Hooks that are active apply
to the prefix pass too, so interventions see every position.
"""
from __future__ import annotations

import logging
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .chat import Batch, Encoded, pad_left
from .errors import RefusalLabError
from .hooks import capture_block_inputs
from .models import ChatModel

log = logging.getLogger(__name__)


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


def batches(cm: ChatModel, encs: Sequence[Encoded], batch_size: int) -> Iterator[tuple[slice, Batch]]:
    """Left-padded batches over `encs` in their order, with their slice."""
    check_lengths(cm, encs)
    if batch_size < 1:
        raise RefusalLabError(f"batch size must be >= 1, got {batch_size}")
    for start in range(0, len(encs), batch_size):
        chunk = encs[start : start + batch_size]
        yield slice(start, start + len(chunk)), pad_left([e.ids for e in chunk], cm.tokenizer.pad_token_id, cm.device)


def _shared_prefix_len(cm: ChatModel, encs: Sequence[Encoded]) -> int:
    """Length of the template prefix shared by all prompts, if the family's cache allows reuse."""
    if cm.config.model_type in ("gemma2",):  # sliding-window hybrid cache: no reuse
        return 0
    prefix = cm.chat.prefix_ids
    p = len(prefix)
    if p < 2 or any(e.ids[:p] != prefix or len(e) <= p for e in encs):
        return 0
    return p


def _expand_cache(past, n: int):
    """A fresh copy of a batch-1 key/value cache expanded to n rows (views, no copies)."""
    from transformers.cache_utils import Cache, DynamicCache

    legacy = past.to_legacy_cache() if isinstance(past, Cache) else past
    expanded = tuple(tuple(t.expand(n, *t.shape[1:]) for t in layer) for layer in legacy)
    return DynamicCache.from_legacy_cache(expanded) if isinstance(past, Cache) else expanded


def prefix_cache(cm: ChatModel):
    """The key/value cache of the chat template's prefix (cm.chat.prefix_ids), run once (under whatever
    hooks are active); a transformers Cache where the family uses one, else legacy tuples."""
    kw = {}
    if getattr(cm.model, "_supports_cache_class", False):
        from transformers.cache_utils import DynamicCache

        kw["past_key_values"] = DynamicCache()
    p = len(cm.chat.prefix_ids)
    ids = torch.tensor([cm.chat.prefix_ids], device=cm.device)
    return cm.base(input_ids=ids, position_ids=torch.arange(p, device=cm.device)[None], use_cache=True,
                   **kw).past_key_values


def with_prefix(mask: torch.Tensor, p: int) -> torch.Tensor:
    """An attention mask [n, seq] for rows that follow a cached prefix of p tokens: [n, p + seq]."""
    return torch.cat([torch.ones(len(mask), p, dtype=mask.dtype, device=mask.device), mask], 1)


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


def forward_batches(
    cm: ChatModel,
    encs: Sequence[Encoded],
    batch_size: int = 32,
    share_prefix: bool = True,
    desc: str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Run the decoder (no LM head) over `encs`; yield (indices into encs, hidden[batch, seq, d]).

    The last position of every row is its prompt's last token. Hooks registered on the model run
    during each step, and the prefix step, before the yield.
    """
    for idx, out, _ in forward_outputs(cm, encs, batch_size, share_prefix, desc):
        yield idx, out[0]


def forward_outputs(
    cm: ChatModel,
    encs: Sequence[Encoded],
    batch_size: int = 32,
    share_prefix: bool = True,
    desc: str | None = None,
    **forward_kw,
) -> Iterator[tuple[torch.Tensor, object, int]]:
    """forward_batches with the decoder's whole output (forward_kw, e.g. output_attentions=True, are
    passed on) and the length p of the shared prefix: yield (indices into encs, output, p). Row j of a
    batch holds encs[idx[j]].ids[p:] left-padded; the prefix's p positions come before it in the cache."""
    check_lengths(cm, encs)
    if batch_size < 1:
        raise RefusalLabError(f"batch size must be >= 1, got {batch_size}")
    p = _shared_prefix_len(cm, encs) if share_prefix else 0
    past = prefix_cache(cm) if p else None
    chunks = plan_batches([len(e) - p for e in encs], batch_size)
    for chunk in tqdm(chunks, desc=desc, leave=False, disable=desc is None):
        b = pad_left([encs[i].ids[p:] for i in chunk], cm.tokenizer.pad_token_id, cm.device)
        if p:
            out = cm.base(input_ids=b.input_ids, attention_mask=with_prefix(b.attention_mask, p),
                          position_ids=b.position_ids + p, past_key_values=_expand_cache(past, len(chunk)),
                          use_cache=True, **forward_kw)
        else:
            out = cm.base(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                          use_cache=False, **forward_kw)
        yield torch.as_tensor(chunk), out, p


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
    if encs and -min(positions) > min(len(e) for e in encs) - (_shared_prefix_len(cm, encs) if share_prefix else 0):
        share_prefix = False  # positions reach into the shared prefix
    out = torch.empty(len(encs), cm.n_layers, len(positions), cm.d_model)
    store: dict[int, torch.Tensor] = {}
    with capture_block_inputs(cm, store, positions=positions):
        for idx, _ in forward_batches(cm, encs, batch_size, share_prefix, desc=desc):
            for layer, x in store.items():  # x[batch, pos, d]
                out[idx, layer] = x
    return out
