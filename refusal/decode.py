"""Batched greedy decoding, built for judging many short replies on a CPU.

It differs from `model.generate` in three ways that change the cost, not the tokens:
- the chat template's shared prefix (system prompt, user header) is run once and reused through the
  key/value cache, and prompts are batched by length (refusal.engine);
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

from .chat import Encoded, pad_left
from .engine import (check_batch_size, check_lengths, expand_cache, plan_batches, run_prefix, select_rows,
                     shared_prefix_len, with_prefix)
from .errors import RefusalLabError
from .models import ChatModel


@torch.no_grad()
def greedy_decode(cm: ChatModel, encs: Sequence[Encoded], max_new_tokens: int, batch_size: int = 32,
                  progress: bool = False, prefix: tuple[Sequence[int], object] | None = None
                  ) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy reply token ids of every prompt (cut after the first stop token, which is kept) and the
    logits at the first reply position [prompt, vocab] (float32, CPU). prefix: (ids, their cache [1 row]),
    a start of every prompt that the caller has already run (such as an attack's text before its suffix);
    it is reused instead of the chat template's prefix when every prompt begins with it."""
    check_lengths(cm, encs, max_new_tokens)
    check_batch_size(batch_size)
    if max_new_tokens < 0:
        raise RefusalLabError(f"the number of tokens to generate must be >= 0, got {max_new_tokens}")
    stops = torch.tensor(cm.chat.stop_ids, device=cm.device)
    if prefix is not None and prefix[1] is not None and all(
            len(e) > len(prefix[0]) and e.ids[:len(prefix[0])] == list(prefix[0]) for e in encs):
        p, prefix = len(prefix[0]), prefix[1]
    else:
        p = shared_prefix_len(cm, encs)
        prefix = run_prefix(cm) if p else None
    replies: list[list[int]] = [[] for _ in encs]
    first_logits = None
    chunks = plan_batches([len(e) - p for e in encs], batch_size)
    for chunk in tqdm(chunks, desc="generate", leave=False, disable=not progress):
        b = pad_left([encs[i].ids[p:] for i in chunk], cm.tokenizer.pad_token_id, cm.device)
        n = len(chunk)
        mask = with_prefix(b.attention_mask, p) if p else b.attention_mask
        pos = b.position_ids + p
        past = expand_cache(prefix, n) if p else None
        out = cm.base(input_ids=b.input_ids, attention_mask=mask, position_ids=pos, cache=past, use_cache=True)
        logits = cm.logits_from_hidden(out.last_hidden_state[:, -1]).float()
        if first_logits is None:
            first_logits = torch.empty(len(encs), logits.shape[-1])
        first_logits[torch.as_tensor(chunk)] = logits.cpu()
        rows = torch.as_tensor(chunk, device=cm.device)  # prompt index of each live row
        last = pos[:, -1:]
        past = out.cache
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
                past = select_rows(past, keep)
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=cm.device)], 1)
            last = last + 1
            out = cm.base(input_ids=nxt[:, None], attention_mask=mask, position_ids=last, cache=past, use_cache=True)
            past = out.cache
            logits = cm.logits_from_hidden(out.last_hidden_state[:, -1]).float()
    return replies, first_logits



def greedy_replies(cm: ChatModel, encs: Sequence[Encoded], max_new_tokens: int,
                   known: Sequence[Sequence[int]] | None = None, batch_size: int = 16,
                   prefix: tuple[Sequence[int], object] | None = None) -> list[list[int]]:
    """Greedy reply token ids (at most max_new_tokens, cut after the first stop token) where known[i],
    the first tokens of reply i, are already known to be its greedy start (an attack's teacher-forced
    target match): they are run as part of the prompt in one pass instead of generated one at a time,
    and the reply is them followed by its greedy continuation. prefix: as greedy_decode's."""
    known = [list(k) for k in known] if known is not None else [[] for _ in encs]
    if len(known) != len(encs):
        raise ValueError(f"{len(encs)} prompts but {len(known)} known reply starts")
    replies: list[list[int]] = [k[:max_new_tokens] for k in known]
    rest: dict[int, list[int]] = {}  # tokens still to generate -> the prompts that need that many
    for i, k in enumerate(known):
        if len(k) < max_new_tokens:
            rest.setdefault(max_new_tokens - len(k), []).append(i)
    for n, rows in rest.items():
        longer = [Encoded(encs[i].ids + known[i], encs[i].instruction, encs[i].suffix, encs[i].post) for i in rows]
        out = greedy_decode(cm, longer, n, batch_size, prefix=prefix)[0]
        for i, ids in zip(rows, out):
            replies[i] = known[i] + ids
    return replies
