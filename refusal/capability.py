"""What an intervention costs a model's capabilities beyond the first-token KL, as the paper reports
it (Arditi et al. 2024, section 4.2 and appendix G: cross-entropy loss on reference text), plus the
false refusal it causes on borderline-but-safe prompts.

- Cross-entropy (mean per token, nats) of held-out reference text, teacher-forced:
  `reply_cross_entropy`: chat replies, the prompt through the chat template, the loss on the reply
  tokens only (the paper's "on-distribution" loss: the base model's own greedy answers to harmless
  prompts, made by `reference_replies` and cached by `cached_reference_replies`);
  `text_cross_entropy`: plain text, no chat template, the loss on every token after the first (the
  paper's Pile-like loss).
- `borderline` false refusal: greedy replies to safe prompts that look unsafe by their words, judged by
  the substring judge (refusal.judges.is_refusal).

Every function runs under whatever intervention is active (refusal.hooks: ablate_direction,
add_direction, ...; the chat template's shared prefix pass included) and on an edited model
(orthogonalize) alike. `capability_row` gathers the three numbers for one intervention.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from . import artifacts
from .chat import Encoded
from .engine import forward_outputs
from .errors import RefusalLabError
from .metrics import evaluate, generate
from .models import ChatModel

log = logging.getLogger(__name__)

LOGIT_ROWS = 1024  # positions put through the LM head at once (a [rows, vocab] float32 block each)


def _sequence(ids: Sequence[int]) -> Encoded:
    """A token sequence as the forward engine takes it (its region spans are not used here)."""
    ids = list(ids)
    return Encoded(ids, (0, 0), (len(ids), len(ids)), (len(ids), len(ids)))


@torch.no_grad()
def token_losses(cm: ChatModel, seqs: Sequence[Sequence[int]], n_scored: Sequence[int], batch_size: int = 16,
                 share_prefix: bool = True) -> list[torch.Tensor]:
    """Teacher-forced cross-entropy (nats) of the last n_scored[i] tokens of each token sequence seqs[i],
    each predicted from the tokens before it, under whatever hooks are active.

    Runs through the forward engine (batched by length, left-padded, with real-token positions, so padding
    changes nothing; with share_prefix, the chat template's shared prefix is run once and cached, under the
    active hooks too). Returns loss[i] of shape [n_scored[i]] (float32, CPU)."""
    if len(seqs) != len(n_scored):
        raise RefusalLabError(f"{len(seqs)} sequences but {len(n_scored)} scored lengths")
    encs = [_sequence(s) for s in seqs]
    out: list[torch.Tensor | None] = [None] * len(encs)
    for idx, res, p in forward_outputs(cm, encs, batch_size, share_prefix):
        hidden = res.last_hidden_state  # [batch, width, d]; row j ends with seqs[idx[j]]'s last token
        width = hidden.shape[1]
        rows, targets, counts = [], [], []
        for j, i in enumerate(idx.tolist()):
            ids, n = encs[i].ids, int(n_scored[i])
            if not 0 <= n <= len(ids) - 1 - p:
                raise RefusalLabError(f"cannot score {n} tokens of a {len(ids)}-token sequence "
                                      f"(the first {p + 1} are never predicted here)")
            # the hidden state at column c predicts the token at column c + 1; the last n tokens sit at
            # columns width-n .. width-1, so their predictions are at columns width-n-1 .. width-2
            rows.append(hidden[j, width - n - 1 : width - 1])  # [n, d]
            targets.append(torch.tensor(ids[len(ids) - n :], dtype=torch.long))
            counts.append(n)
        h = torch.cat(rows)  # [scored tokens in the batch, d]
        t = torch.cat(targets)  # [scored tokens in the batch]
        loss = torch.empty(len(t))
        for s in range(0, len(t), LOGIT_ROWS):
            logits = cm.logits_from_hidden(h[s : s + LOGIT_ROWS]).float()  # [rows, vocab]
            loss[s : s + LOGIT_ROWS] = F.cross_entropy(logits, t[s : s + LOGIT_ROWS].to(logits.device),
                                                       reduction="none").cpu()
        for i, part in zip(idx.tolist(), loss.split(counts)):
            out[i] = part
    return out  # type: ignore[return-value]


def _pooled(losses: Sequence[torch.Tensor], what: str) -> float:
    """The mean over every scored token of every sequence (token-weighted)."""
    n = sum(len(x) for x in losses)
    if n == 0:
        raise RefusalLabError(f"no {what} tokens to measure a cross-entropy on")
    return float(sum(x.double().sum() for x in losses) / n)


def reply_token_ids(cm: ChatModel, replies: Sequence[str]) -> list[list[int]]:
    """Each reply as the tokens the model would write after the chat template's assistant header."""
    return [list(cm.tokenizer(r, add_special_tokens=False).input_ids) if r else [] for r in replies]


def reply_losses(cm: ChatModel, instructions: Sequence[str], replies: Sequence[str],
                 batch_size: int = 16) -> list[torch.Tensor]:
    """Per-token cross-entropy of each reply given its instruction as a chat prompt: loss[i][reply tokens]."""
    if len(instructions) != len(replies):
        raise RefusalLabError(f"{len(instructions)} instructions but {len(replies)} replies")
    prompts = cm.chat.encode_all(instructions)
    answers = reply_token_ids(cm, replies)
    return token_losses(cm, [e.ids + a for e, a in zip(prompts, answers)], [len(a) for a in answers], batch_size)


def reply_cross_entropy(cm: ChatModel, instructions: Sequence[str], replies: Sequence[str],
                        batch_size: int = 16) -> float:
    """Mean per-token cross-entropy (nats) of the replies, teacher-forced after their instructions put
    through the chat template; the loss on the reply tokens only, pooled over every reply token."""
    return _pooled(reply_losses(cm, instructions, replies, batch_size), "reply")


def text_token_ids(cm: ChatModel, texts: Sequence[str]) -> list[list[int]]:
    """Each text as the tokenizer encodes plain text (with its BOS where it adds one), cut to the context."""
    out = []
    for t in texts:
        ids = list(cm.tokenizer(t).input_ids)[: cm.max_context]
        if len(ids) < 2:
            raise RefusalLabError(f"the text {t[:40]!r} has fewer than 2 tokens; nothing to predict")
        out.append(ids)
    return out


def text_losses(cm: ChatModel, texts: Sequence[str], batch_size: int = 16) -> list[torch.Tensor]:
    """Per-token cross-entropy of plain texts (no chat template): loss[i][every token after the first]."""
    seqs = text_token_ids(cm, texts)
    return token_losses(cm, seqs, [len(s) - 1 for s in seqs], batch_size, share_prefix=False)


def text_cross_entropy(cm: ChatModel, texts: Sequence[str], batch_size: int = 16) -> float:
    """Mean per-token cross-entropy (nats) of plain texts, teacher-forced, no chat template; every token
    after the first is scored, pooled over every token."""
    return _pooled(text_losses(cm, texts, batch_size), "text")


def reference_replies(ref_cm: ChatModel, instructions: Sequence[str], new_tokens: int = 64,
                      batch_size: int = 16) -> list[str]:
    """The reference model's greedy replies (at most new_tokens tokens, as text) to the instructions, the
    held-out text of reply_cross_entropy. Runs under whatever hooks are active: call it with none."""
    return generate(ref_cm, ref_cm.chat.encode_all(instructions), new_tokens, batch_size, progress=True)


def cached_reference_replies(path: str | Path, ref_cm: ChatModel, instructions: Sequence[str],
                             new_tokens: int = 64, batch_size: int = 16, force: bool = False) -> list[str]:
    """reference_replies, cached as JSON at `path` (written atomically) and reused while the reference
    model (its fingerprint), the instructions (their hash) and new_tokens are those recorded there. A cache
    made otherwise is refused unless force, which remakes it."""
    path = Path(path)
    key = {"reference_model": ref_cm.fingerprint, "instructions_hash": artifacts.hash_strings(list(instructions)),
           "new_tokens": int(new_tokens)}
    if path.is_file():
        cached = artifacts.read_json(path)
        cached = cached if isinstance(cached, dict) else {}
        model = cached.get("model") if isinstance(cached.get("model"), dict) else {}
        found = {"reference_model": model.get("fingerprint"), "instructions_hash": cached.get("instructions_hash"),
                 "new_tokens": cached.get("new_tokens")}
        if found == key and isinstance(cached.get("replies"), list) and len(cached["replies"]) == len(instructions):
            log.info("reference replies reused from %s", path)
            return [r["reply"] for r in cached["replies"]]
        if not force:
            differs = ", ".join(k for k in key if found[k] != key[k]) or "replies"
            raise RefusalLabError(f"{path} holds reference replies made otherwise ({differs} differ); "
                                  "pass --force to remake them, or choose another --out")
    replies = reference_replies(ref_cm, instructions, new_tokens, batch_size)
    artifacts.write_json(path, artifacts.run_record(
        model=ref_cm.describe(), instructions_hash=key["instructions_hash"], new_tokens=int(new_tokens),
        replies=[{"instruction": x, "reply": r} for x, r in zip(instructions, replies)]))
    return replies


def capability_row(cm: ChatModel, borderline: Sequence[str] | None = None,
                   replies: tuple[Sequence[str], Sequence[str]] | None = None, texts: Sequence[str] | None = None,
                   max_new_tokens: int = 32, batch_size: int = 16):
    """The capability measures of one intervention (whichever is active, or an edited model), each only
    when its data is given: `borderline_refusal_rate` (greedy, max_new_tokens, substring judge) on the
    borderline prompts, `reply_ce` of replies = (instructions, reference replies), `text_ce` of texts.
    Returns (the measures as a dict, the borderline per-prompt DataFrame of refusal.metrics.evaluate or
    None)."""
    row: dict[str, float] = {}
    details = None
    if borderline is not None:
        details = evaluate(cm, borderline, max_new_tokens=max_new_tokens, batch_size=batch_size)
        row["borderline_refusal_rate"] = float(details.refused.mean())
    if replies is not None:
        row["reply_ce"] = reply_cross_entropy(cm, replies[0], replies[1], batch_size)
    if texts is not None:
        row["text_ce"] = text_cross_entropy(cm, texts, batch_size)
    return row, details
