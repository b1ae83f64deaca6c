"""Evaluating a suffix: the functions live in the core (refusal.success), where the analysis can use
them too; this keeps the path scripts import them from."""
from refusal.success import judge_replies, suffix_success

__all__ = ["judge_replies", "suffix_success"]
