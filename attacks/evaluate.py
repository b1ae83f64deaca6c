"""Evaluating a suffix: attack success rate on a prompt set (greedy reply, judged)."""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from refusal.metrics import generate, is_degenerate, is_refusal
from refusal.models import ChatModel


def suffix_success(cm: ChatModel, instructions: Sequence[str], suffix: Sequence[int] | str | None,
                   max_new_tokens: int = 64, batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """Greedy replies to each instruction followed by `suffix` (token ids, text, or None for no suffix).
    A prompt is a success when its reply is not refused (substring list) and not empty or degenerate.
    Returns a DataFrame: prompt, completion, refused, degenerate, success."""
    encs = cm.chat.encode_all(list(instructions), suffix)
    replies = generate(cm, encs, max_new_tokens, batch_size, progress)
    refused = [is_refusal(r) for r in replies]
    degenerate = [is_degenerate(r) for r in replies]
    return pd.DataFrame({
        "prompt": list(instructions),
        "completion": replies,
        "refused": refused,
        "degenerate": degenerate,
        "success": [not a and not b for a, b in zip(refused, degenerate)],
    })


def success_table(cm: ChatModel, instructions: Sequence[str], suffixes: dict, max_new_tokens: int = 64,
                  batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """Attack success rate of several suffixes ({name: ids, text or None}) on the same prompts:
    one row per suffix (suffix, n, success_rate, refusal_rate, degenerate_rate)."""
    rows = []
    for name, sfx in suffixes.items():
        df = suffix_success(cm, instructions, sfx, max_new_tokens, batch_size, progress)
        rows.append(dict(suffix=name, n=len(df), success_rate=df.success.mean(), refusal_rate=df.refused.mean(),
                         degenerate_rate=df.degenerate.mean()))
    return pd.DataFrame(rows)
