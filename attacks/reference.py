"""The reference engine: nanoGCG (`nanogcg.run`) driven with a GCGConfig built from our options, at its
best: with its prefix cache on.

nanoGCG 0.3.0 was written for transformers 4: it keeps the key/value cache of the text before the suffix
(`output.past_key_values`), indexes it per layer (`cache[i]` -> keys, values) to expand it to a batch, and
hands it back to the model at every step. On transformers 5 a cache is an object that is not indexable,
and the model grows the cache object it is handed in place: passed back as it is, the stored prefix
would grow by the suffix and target at every step, and every later loss would be computed after the
wrong text, silently. `PrefixCacheModel` wraps the model's forward so that none of this happens: the
prefix nanoGCG stores is a read-only view of the cache, indexable as in transformers 4, and whatever
nanoGCG passes back (that view, or the per-layer tensors it expanded from it) reaches the model as a new
cache holding exactly the prefix, expanded to the batch. nanoGCG's own code is not changed.

nanoGCG is not a dependency of refusal-lab: it declares transformers<=4.47.1, so it is installed on its
own, without its declared requirements (`make setup` does this): `pip install --no-deps nanogcg==0.3.0`
(and scipy, the one requirement it imports).
"""
from __future__ import annotations

import importlib.util
import logging
import time

import torch

from refusal.engine import expand_cache
from refusal.errors import RefusalLabError
from refusal.models import ChatModel

from .gcg import AttackResult, GCGConfig, StepClock, initial_suffix_ids, load_draft

log = logging.getLogger(__name__)

NANOGCG_INSTALL = "pip install scipy && pip install --no-deps nanogcg==0.3.0"


def require_nanogcg() -> None:
    """A one-line error naming the install command when nanogcg (or scipy, which it imports) is missing."""
    for name in ("nanogcg", "scipy"):
        if importlib.util.find_spec(name) is None:
            raise RefusalLabError(f"the nanogcg engine needs nanoGCG 0.3.0, which is not installed; install it with "
                                  f"`{NANOGCG_INSTALL}` (or `make setup`)")


def check_probe_sampling(config: GCGConfig) -> None:
    """nanoGCG's probe sampling needs a probe set that stays 2 or more candidates after its filters (its rank
    correlation is NaN below that): search_width // probe_sampling_factor at least 4."""
    if config.search_width // config.probe_sampling_factor < 4:
        raise RefusalLabError(f"nanoGCG's probe sampling needs a probe set of 4 or more candidates: --search-width "
                              f"at least 4 x --probe-sampling-factor ({4 * config.probe_sampling_factor})")


class StoredPrefix:
    """The prefix cache as nanoGCG keeps it: len() layers, [i] -> (keys, values) [1, heads, prefix, head_dim].
    It is never handed to the model itself, so it never grows."""

    def __init__(self, cache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache.layers)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.cache.layers[i]
        return layer.keys, layer.values


class PrefixCacheModel:
    """A causal LM as nanoGCG 0.3.0 needs it on transformers 5 (see the module docstring). Everything but
    the forward call is the wrapped model's."""

    def __init__(self, model):
        self.model = model
        self.stored: StoredPrefix | None = None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _cache_for(self, past, n: int):
        if isinstance(past, StoredPrefix):
            return expand_cache(past.cache, n)
        # the per-layer tensors nanoGCG expanded from the stored prefix: the same positions, as a new cache
        if self.stored is None or len(past) != len(self.stored) or any(
                k.data_ptr() != self.stored[i][0].data_ptr() for i, (k, _) in enumerate(past)):
            raise RuntimeError("nanoGCG passed a cache that is not its stored prefix")
        return expand_cache(self.stored.cache, n)

    def __call__(self, *args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            x = kwargs.get("inputs_embeds", kwargs.get("input_ids", args[0] if args else None))
            kwargs["cache"] = self._cache_for(past_key_values, x.shape[0])
            return self.model(*args, **kwargs)
        out = self.model(*args, **kwargs)
        if kwargs.get("use_cache") and getattr(out, "cache", None) is not None:
            # the prefix pass: what nanoGCG stores as output.past_key_values
            self.stored = StoredPrefix(out.cache)
            out.cache = self.stored
        return out


def nanogcg_config(config: GCGConfig, init_text: str, use_prefix_cache: bool = True, draft: ChatModel | None = None):
    """nanoGCG's config for ours; with a draft model, its probe sampling with our r and sampling factor."""
    import nanogcg

    probe = None
    if draft is not None:
        probe = nanogcg.ProbeSamplingConfig(
            draft_model=PrefixCacheModel(draft.model) if use_prefix_cache else draft.model,
            draft_tokenizer=draft.tokenizer, r=config.probe_r, sampling_factor=config.probe_sampling_factor)
    return nanogcg.GCGConfig(probe_sampling_config=probe,
        num_steps=config.steps, optim_str_init=init_text, search_width=config.search_width,
        batch_size=config.batch_size, topk=config.topk, n_replace=config.n_replace,
        early_stop=config.early_stop, use_prefix_cache=use_prefix_cache, allow_non_ascii=config.allow_non_ascii,
        filter_ids=config.filter_ids, seed=config.seed, verbosity="WARNING")


def nanogcg_messages(instruction: str, config: GCGConfig) -> list[dict]:
    """nanoGCG's messages with its {optim_str} where config.message / config.system put the string."""
    user = {"role": "user", "content": config.message.replace("{instruction}", instruction)}
    return [{"role": "system", "content": config.system}, user] if config.system is not None else [user]


def run_nanogcg(cm: ChatModel, instruction: str, target: str, config: GCGConfig,
                use_prefix_cache: bool = True, draft: ChatModel | None = None,
                clock: StepClock | None = None) -> AttackResult:
    """One prompt, target objective. The string goes where config.message / config.system put it (a suffix
    after a space by default), as in the native engine; the chat template is the model's own. The result's step_times are the wall times (since the
    start) at which each of nanoGCG's steps ended, its profile each step's split into the token gradient,
    candidate scoring (its early stop's target match included: it has no other success check) and the
    rest, timed on `clock` (a new one if None). With config.max_time_s, the run stops at the end of the
    first step that ends after it. With config.draft_model (or a loaded `draft`), nanoGCG's own probe
    sampling with that draft."""
    require_nanogcg()
    config.validate()
    if config.objective != "target":
        raise RefusalLabError("the nanogcg engine optimizes the target objective only; use --engine native")
    if draft is not None or config.draft_model is not None:
        check_probe_sampling(config)
        draft = load_draft(cm, draft if draft is not None else config.draft_model)
    init_ids = initial_suffix_ids(cm, config.suffix_len, config.suffix_init)
    init_text = cm.tokenizer.decode(init_ids)
    logging.getLogger("nanogcg").setLevel(logging.WARNING)
    model = PrefixCacheModel(cm.model) if use_prefix_cache else cm.model
    clock = clock or StepClock(cm.device)
    starts: list[float] = []
    profile: list[list[float]] = []

    from nanogcg.gcg import GCG as NanoGCG

    class TimedGCG(NanoGCG):
        """nanoGCG's GCG, noting when each step begins (its token gradient is a step's first work), timing its
        gradient and its scoring, and ending the run after the step in which the time limit passes."""

        def compute_token_gradient(self, optim_ids):
            now = time.perf_counter()
            if starts:
                profile.append(clock.take(now - starts[-1]))
            else:  # its set-up scored the initial suffix: not a step's work
                clock.reset()
            starts.append(now)
            with clock.timing("gradient"):
                return super().compute_token_gradient(optim_ids)

        def _over_time(self):
            if config.max_time_s is not None and time.perf_counter() - t0 >= config.max_time_s:
                self.stop_flag = True  # read at the end of the step, as its early stop is

        # the parameter names are nanoGCG's: its batch-size decorator reads them
        def _compute_candidates_loss_original(self, search_batch_size, input_embeds):
            with clock.timing("scoring"):
                loss = super()._compute_candidates_loss_original(search_batch_size, input_embeds)
            self._over_time()
            return loss

        def _compute_candidates_loss_probe_sampling(self, search_batch_size, input_embeds, sampled_ids):
            with clock.timing("scoring"):
                out = super()._compute_candidates_loss_probe_sampling(search_batch_size, input_embeds, sampled_ids)
            self._over_time()
            return out

    deterministic = torch.are_deterministic_algorithms_enabled()
    t0 = time.perf_counter()
    try:
        with torch.enable_grad():
            gcg = TimedGCG(model, cm.tokenizer, nanogcg_config(config, init_text, use_prefix_cache, draft))
            res = gcg.run(nanogcg_messages(instruction, config), target)
    finally:  # nanogcg turns deterministic algorithms on for the whole process when seeded
        torch.use_deterministic_algorithms(deterministic)
    end = time.perf_counter()
    if starts:
        profile.append(clock.take(end - starts[-1]))
    elapsed = end - t0
    step_ends = [t - t0 for t in starts[1:len(res.losses)]] + [elapsed]
    best = res.losses.index(min(res.losses))
    ids = cm.tokenizer(res.best_string, add_special_tokens=False).input_ids
    return AttackResult(
        suffix=res.best_string, token_ids=list(ids), best_loss=float(res.best_loss), best_step=best,
        losses=[float(x) for x in res.losses], success=[float("nan")] * len(res.losses),
        n_active=[1] * len(res.losses), suffixes=list(res.strings), steps_run=len(res.losses),
        stopped_early=len(res.losses) < config.steps, elapsed_s=elapsed, step_times=step_ends,
        profile=profile[: len(res.losses)])
