"""Refusal heads and attention hijacking: the metrics live in the core (refusal.heads), where attacks
can use them too; this keeps the path researchers import them from."""
from refusal.heads import (attention_shares, attention_table_from, contributions, head_contributions, heads_table,
                           shares_table, top_heads)

__all__ = ["attention_shares", "attention_table_from", "contributions", "head_contributions", "heads_table",
           "shares_table", "top_heads"]
