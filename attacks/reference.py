"""The reference engine: nanoGCG (`nanogcg.run`) driven with a GCGConfig built from our options."""
from __future__ import annotations

import logging
import time

from refusal.errors import RefusalLabError
from refusal.models import ChatModel

from .gcg import AttackResult, GCGConfig, initial_suffix_ids

log = logging.getLogger(__name__)


def nanogcg_config(config: GCGConfig, init_text: str):
    import nanogcg

    return nanogcg.GCGConfig(
        num_steps=config.steps, optim_str_init=init_text, search_width=config.search_width,
        batch_size=config.batch_size, topk=config.topk, n_replace=config.n_replace,
        early_stop=config.early_stop, use_prefix_cache=True, allow_non_ascii=config.allow_non_ascii,
        filter_ids=config.filter_ids, seed=config.seed, verbosity="WARNING")


def run_nanogcg(cm: ChatModel, instruction: str, target: str, config: GCGConfig) -> AttackResult:
    """One prompt, target objective. The suffix follows the instruction after a space, as in the native
    engine; the chat template is the model's own."""
    import nanogcg

    config.validate()
    if config.objective != "target":
        raise RefusalLabError("the nanogcg engine optimizes the target objective only; use --engine native")
    init_ids = initial_suffix_ids(cm, config.suffix_len, config.suffix_init)
    init_text = cm.tokenizer.decode(init_ids)
    logging.getLogger("nanogcg").setLevel(logging.WARNING)
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    t0 = time.perf_counter()
    try:
        with torch.enable_grad():
            res = nanogcg.run(cm.model, cm.tokenizer, [{"role": "user", "content": instruction + " {optim_str}"}],
                              target, nanogcg_config(config, init_text))
    finally:  # nanogcg turns deterministic algorithms on for the whole process when seeded
        torch.use_deterministic_algorithms(deterministic)
    elapsed = time.perf_counter() - t0
    best = res.losses.index(min(res.losses))
    ids = cm.tokenizer(res.best_string, add_special_tokens=False).input_ids
    return AttackResult(
        suffix=res.best_string, token_ids=list(ids), best_loss=float(res.best_loss), best_step=best,
        losses=[float(x) for x in res.losses], success=[float("nan")] * len(res.losses),
        n_active=[1] * len(res.losses), suffixes=list(res.strings), steps_run=len(res.losses),
        stopped_early=len(res.losses) < config.steps, elapsed_s=elapsed)
