"""Evaluating a suffix: attack success rate on a prompt set (greedy reply, judged)."""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from .chat import Placement
from .judges import Judge, JudgeConfig, add_verdicts, load_judge
from .judges.substring import is_degenerate, is_refusal
from .metrics import generate
from .models import ChatModel


def judge_replies(instructions: Sequence[str], replies: Sequence[str],
                  judge: Judge | JudgeConfig | str | None = None) -> pd.DataFrame:
    """Replies judged by the paper's substring list and by `judge` (default: strict). Returns a DataFrame:
    prompt, completion, refused (substring list), degenerate, substring_success (refusal.judges.attack_success),
    judge (its name), verdict (complies / refuses / neither), success (verdict == complies)."""
    df = pd.DataFrame({
        "prompt": list(instructions),
        "completion": list(replies),
        "refused": [is_refusal(r) for r in replies],
        "degenerate": [is_degenerate(r) for r in replies],
    })
    return add_verdicts(df, judge)


def suffix_success(cm: ChatModel, instructions: Sequence[str], suffix: Sequence[int] | str | None,
                   max_new_tokens: int = 64, batch_size: int = 16, progress: bool = True,
                   judge: Judge | JudgeConfig | str | None = None,
                   placement: Placement | None = None) -> pd.DataFrame:
    """Greedy replies to each instruction with `suffix` (token ids, text, or None for no suffix) where
    `placement` puts it (default: after the instruction),
    judged (judge_replies): a prompt is a success when `judge` (default: strict) says the reply complies;
    `substring_success` is the paper's (not refused by the substring list, not empty or degenerate).
    Returns a DataFrame: prompt, completion, refused, degenerate, substring_success, judge, verdict, success."""
    j = load_judge(judge)  # before generating: a bad judge fails at once
    encs = cm.chat.encode_all(list(instructions), suffix, placement)
    replies = generate(cm, encs, max_new_tokens, batch_size, progress)
    return judge_replies(instructions, replies, j)
