"""The paper's central result as one table: refusal under no intervention, directional ablation,
activation addition and weight orthogonalization, on harmful and harmless test prompts; and, where
given their data, the capability cost of each intervention beyond the first-token KL (refusal.capability:
cross-entropy of reference replies and of general text, false refusal on borderline-but-safe prompts)."""
from __future__ import annotations

import contextlib
from typing import Sequence

import pandas as pd

from refusal.activations import last_logits
from refusal.capability import capability_row
from refusal.directions import Direction
from refusal.hooks import ablate_direction, add_direction, orthogonalize
from refusal.metrics import evaluate, kl_divergence
from refusal.models import ChatModel

# the capability columns intervention_table adds when given their data
CAPABILITY_COLUMNS = ("borderline_refusal_rate", "reply_ce", "text_ce")


def intervention_table(
    cm: ChatModel,
    direction: Direction,
    harmful: Sequence[str],
    harmless: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 64,
    borderline: Sequence[str] | None = None,
    replies: tuple[Sequence[str], Sequence[str]] | None = None,
    texts: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """One row per intervention: refusal rate and mean refusal score on harmful and harmless
    prompts, and the KL divergence of the harmless first-reply logits from the unedited model.
    Also returns the per-prompt completions of every (intervention, prompt set).

    The capability columns, each only when its data is given (refusal.capability.capability_row):
    `borderline_refusal_rate` (greedy, max_new_tokens, substring judge) on the `borderline` prompts;
    `reply_ce`, the mean per-token cross-entropy (nats) of replies = (instructions, reference replies,
    made once without intervention by the reference model), reply tokens only; `text_ce`, that of the
    plain `texts`. The borderline completions are in details as `{intervention}_borderline`."""
    edited = None if cm.family.post_norms else orthogonalize(cm, direction.vector)
    conditions = {
        "none": (cm, contextlib.nullcontext),
        "ablation": (cm, lambda: ablate_direction(cm, direction.vector)),
        "addition": (cm, lambda: add_direction(cm, direction.mean_diff, direction.layer)),
    }
    if edited is not None:
        conditions["orthogonalized"] = (edited, contextlib.nullcontext)
    base_logits = last_logits(cm, cm.chat.encode_all(harmless))
    rows, details = [], {}
    for name, (model, ctx) in conditions.items():
        row = {"intervention": name}
        with ctx():
            for kind, prompts in (("harmful", harmful), ("harmless", harmless)):
                df = evaluate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
                details[f"{name}_{kind}"] = df
                row[f"{kind}_refusal_rate"] = float(df.refused.mean())
                row[f"{kind}_refusal_score"] = float(df.refusal_score.mean())
            logits = last_logits(model, model.chat.encode_all(harmless))
            capability, borderline_df = capability_row(model, borderline, replies, texts, max_new_tokens, batch_size)
        row["harmless_kl"] = float(kl_divergence(base_logits, logits).mean())
        row.update(capability)
        if borderline_df is not None:
            details[f"{name}_borderline"] = borderline_df
        rows.append(row)
    return pd.DataFrame(rows), details


def to_markdown(df: pd.DataFrame) -> str:
    """A Markdown table without extra dependencies."""
    cols = list(df.columns)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
