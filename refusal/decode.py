"""Batched greedy decoding, built for judging many short replies on a CPU.

It differs from `model.generate` in three ways that change the cost, not the tokens:
- the chat template's shared prefix (system prompt, user header) is run once and reused through the
  key/value cache, and prompts are batched by length (as in activations.forward_batches);
- a reply that has ended (end of turn or EOS) leaves the batch at once, so a batch of refusals that
  end after a dozen tokens does not run to max_new_tokens for the one reply that goes on;
- the logits at the first reply position, which the first token is chosen from, are returned too:
  the refusal score needs them, and they cost a second pass otherwise.
Hooks registered on the model (ablation, addition) apply to every pass, the prefix pass included.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from .activations import _expand_cache, _shared_prefix_len, check_lengths, plan_batches, prefix_cache, with_prefix
from .chat import Encoded, pad_left
from .errors import RefusalLabError
from .models import ChatModel

# families whose cache cannot be sliced row by row here (Gemma2's sliding-window hybrid cache)
_GENERATE_FALLBACK = ("gemma2",)


def _select_rows(past, keep: torch.Tensor):
    """The key/value cache with only the rows `keep` (a Cache object or legacy tuples)."""
    from transformers.cache_utils import DynamicCache

    if isinstance(past, DynamicCache):
        past.key_cache = [k[keep] for k in past.key_cache]
        past.value_cache = [v[keep] for v in past.value_cache]
        return past
    return tuple(tuple(t[keep] for t in layer) for layer in past)


@torch.no_grad()
def greedy_decode(cm: ChatModel, encs: Sequence[Encoded], max_new_tokens: int, batch_size: int = 32,
                  progress: bool = False) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy reply token ids of every prompt (cut after the first stop token, which is kept) and the
    logits at the first reply position [prompt, vocab] (float32, CPU)."""
    check_lengths(cm, encs, max_new_tokens)
    if batch_size < 1:
        raise RefusalLabError(f"batch size must be >= 1, got {batch_size}")
    if max_new_tokens < 0:
        raise RefusalLabError(f"the number of tokens to generate must be >= 0, got {max_new_tokens}")
    if cm.config.model_type in _GENERATE_FALLBACK:
        return _generate_fallback(cm, encs, max_new_tokens, batch_size, progress)
    stops = torch.tensor(cm.chat.stop_ids, device=cm.device)
    p = _shared_prefix_len(cm, encs)
    prefix = prefix_cache(cm) if p else None
    replies: list[list[int]] = [[] for _ in encs]
    first_logits = None
    chunks = plan_batches([len(e) - p for e in encs], batch_size)
    for chunk in tqdm(chunks, desc="generate", leave=False, disable=not progress):
        b = pad_left([encs[i].ids[p:] for i in chunk], cm.tokenizer.pad_token_id, cm.device)
        n = len(chunk)
        mask = with_prefix(b.attention_mask, p) if p else b.attention_mask
        pos = b.position_ids + p
        past = _expand_cache(prefix, n) if p else None
        out = cm.base(input_ids=b.input_ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                      use_cache=True)
        logits = cm.logits_from_hidden(out[0][:, -1]).float()
        if first_logits is None:
            first_logits = torch.empty(len(encs), logits.shape[-1])
        first_logits[torch.as_tensor(chunk)] = logits.cpu()
        rows = torch.as_tensor(chunk, device=cm.device)  # prompt index of each live row
        last = pos[:, -1:]
        past = out.past_key_values
        for t in range(max_new_tokens):
            nxt = logits.argmax(-1)
            for r, tok in zip(rows.tolist(), nxt.tolist()):
                replies[r].append(tok)
            live = ~torch.isin(nxt, stops)
            if t == max_new_tokens - 1 or not live.any():
                break
            if not live.all():  # finished replies leave the batch
                keep = live.nonzero()[:, 0]
                rows, nxt, mask, last = rows[keep], nxt[keep], mask[keep], last[keep]
                past = _select_rows(past, keep)
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=cm.device)], 1)
            last = last + 1
            out = cm.base(input_ids=nxt[:, None], attention_mask=mask, position_ids=last, past_key_values=past,
                          use_cache=True)
            past = out.past_key_values
            logits = cm.logits_from_hidden(out[0][:, -1]).float()
    return replies, first_logits


def _generate_fallback(cm: ChatModel, encs: Sequence[Encoded], max_new_tokens: int, batch_size: int,
                       progress: bool) -> tuple[list[list[int]], torch.Tensor]:
    """transformers' generate, for families whose cache the loop above cannot slice."""
    from .activations import batches, last_logits

    stops = cm.chat.stop_ids
    out: list[list[int]] = []
    for _, b in tqdm(list(batches(cm, encs, batch_size)), desc="generate", leave=False, disable=not progress):
        if max_new_tokens == 0:
            out.extend([] for _ in range(b.input_ids.shape[0]))
            continue
        gen = cm.model.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=max_new_tokens,
                                do_sample=False, temperature=None, top_p=None, top_k=None,
                                pad_token_id=cm.tokenizer.pad_token_id, eos_token_id=stops)
        for row in gen[:, b.input_ids.shape[1]:].tolist():
            end = next((k for k, t in enumerate(row) if t in stops), None)
            out.append(row if end is None else row[: end + 1])
    return out, last_logits(cm, encs, batch_size)
