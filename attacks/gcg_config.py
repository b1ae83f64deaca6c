"""The GCG attack's settings (GCGConfig: default, help, bounds and choices of every field, and the
combinations no attack can run) and how a run's settings are compared with a checkpoint's. The engine that
reads them is attacks.gcg, which re-exports them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from refusal.chat import DEFAULT_MESSAGE, Placement
from refusal.config import check_fields, option
from refusal.errors import RefusalLabError
from refusal.judges import JudgeConfig
from refusal.registry import named, resolve

OBJECTIVES = ("target", "direction", "attention", "mixed")
TERMS = ("target", "direction", "attention")  # the terms of an objective, each with its weight in mixed
SUCCESS_CHECKS = ("auto", "target+judge", "judge", "target")
SCREEN_DTYPES = ("auto", "model", "bfloat16", "float16")
TARGET_LOSSES = ("ce", "cw")


@dataclass
class GCGConfig:
    """The GCG attack (native engine; nanoGCG reads the fields it has)."""

    steps: int = option(150, "optimization steps at most", ge=1)
    search_width: int = option(128, "candidate suffixes scored per step", ge=1)
    topk: int = option(64, "top-k replacement tokens per suffix position, from the token gradient", ge=1)
    n_replace: int = option(1, "suffix positions each candidate changes", ge=1)
    suffix_len: int = option(20, "suffix tokens", ge=1)
    suffix_init: str | None = option(None, "initial suffix text (None: 'x x x ... x', suffix_len tokens)")
    message: str = option(DEFAULT_MESSAGE, "the user's message around the adversarial string: {instruction} and "
                                           "{optim_str} once each, e.g. '{optim_str} {instruction}' for a prefix "
                                           "(without {optim_str} when --system holds it)")
    system: str | None = option(None, "a system prompt holding {optim_str}: the adversarial string goes there "
                                      "(None: no system prompt of the attack's own)")
    objective: str = option("target", "target (cross-entropy of 'Sure, here is ...'), direction (the last "
                                      "position's projection on the refusal direction), attention (the top "
                                      "refusal heads' attention to the string, maximised), or mixed (the terms "
                                      "summed with their weights)", choices=OBJECTIVES)
    target_loss: str = option("ce", "the target term: ce (cross-entropy of the target tokens, as GCG) or cw (Faster-GCG's "
                                    "margin loss: how far the best other token's logit leads the target's, floored "
                                    "at -1)", choices=TARGET_LOSSES)
    target_weight: float = option(1.0, "weight of the target term in the mixed objective", ge=0)
    direction_weight: float = option(1.0, "weight of the direction term in the mixed objective", ge=0)
    attention_weight: float = option(0.0, "weight of the attention term in the mixed objective", ge=0)
    attention_heads: int = option(8, "the attention term: how many top refusal heads it reads", ge=1)
    seed: int = option(0, "seed of the candidate sampling", ge=0)
    allow_non_ascii: bool = option(False, "allow suffix tokens that are not printable ASCII")
    filter_ids: bool = option(True, "drop candidates that do not re-tokenize to themselves")
    early_stop: bool = option(True, "stop once the attack succeeds")
    success_rate: float = option(1.0, "universal: add the next prompt / stop when this share of active prompts succeed",
                                 gt=0, le=1)
    progressive: bool = option(True, "universal: start with one prompt and add them one at a time")
    patience: int = option(0, "universal: add the next prompt after this many steps without one (0: only on success)",
                           ge=0)
    success_check: str = option("auto", "a step's success per prompt: target+judge (the greedy reply begins with "
                                        "the target, checked for free, and then the judge says it complies), "
                                        "judge (the judge alone, every step), target (the target match alone), "
                                        "auto (target+judge for one prompt, judge for several); without a "
                                        "target: the judge", choices=SUCCESS_CHECKS)
    prefer_target_match: bool = option(True, "choose the lowest-loss candidate whose greedy reply begins with the "
                                             "target (on every active prompt) over a lower-loss one whose does not")
    check_matched: int = option(8, "one prompt, target+judge: each step the judge reads the replies of up to this many "
                                   "scored candidates whose greedy reply begins with the target (the chosen one, then "
                                   "the others by loss) in one batched generation, and a complying one becomes the "
                                   "suffix (1: the chosen candidate alone)", ge=1)
    judge_tokens: int = option(32, "reply tokens generated for the judge", ge=1)
    judge: JudgeConfig = option(help="the judge of success (early stopping, adding prompts, the success rates): a "
                                     "refusal.judges.JudgeConfig, or its name (substring, strict or hf:MODEL)",
                                factory=JudgeConfig)
    batch_size: int | None = option(None, "candidates per forward pass (None: as many as memory allows)", ge=1)
    reuse_suffix_cache: bool = option(True, "candidates reuse the cache of the unchanged start of the suffix")
    dedupe: bool = option(True, "drop duplicate candidates")
    screen_dtype: str = option("auto", "precision candidates are screened in, the best `rescore` scored again in "
                                       "the model's: auto (bfloat16 where the hardware is fast at it, as "
                                       "REFUSAL_LAB_BFLOAT16 says, and the model is float32), model (no "
                                       "screening), bfloat16, float16", choices=SCREEN_DTYPES)
    rescore: int = option(8, "screened candidates scored again in the model's precision each step", ge=1)
    screen_prompts: int = option(0, "universal: every candidate is scored on this many of the active prompts, drawn "
                                    "at random each step, and the best `rescore` of them again on every active "
                                    "prompt (0: every candidate on every active prompt)", ge=0)
    momentum: float = option(0.0, "MAC (Zhang & Wei 2024): candidates are sampled from mu * the previous step's "
                                   "sampling gradient + (1 - mu) * this step's token gradient (0: this step's alone; "
                                   "MAC's value for one prompt is 0.4)", ge=0, lt=1)
    multi_coordinate: int = option(8, "multi-coordinate update (I-GCG): also score the current suffix with the "
                                      "changes of the best 2..m candidates combined (1: off)", ge=1)
    draft_model: str | None = option(None, "probe sampling (Zhao et al. 2024): a smaller model with the same "
                                           "tokenizer scores every candidate, the attacked model only a random "
                                           "probe set and the draft's best; None: off")
    probe_r: int = option(8, "probe sampling: the draft's best (1 - agreement) * width / r candidates are "
                             "scored on the attacked model", ge=1)
    probe_sampling_factor: int = option(16, "probe sampling: width / this random candidates form the probe set", ge=1)
    ensemble: tuple[str, ...] = option((), "more models the suffix is optimised on, the loss averaged over "
                                            "prompts x models (any --model form with the attacked model's "
                                            "tokenizer, e.g. organism:1; the target objective); success_rate "
                                            "then counts (prompt, model) pairs")
    max_time_s: float | None = option(None, "stop once a step ends this many seconds after the attack began (None: "
                                            "the step budget alone); the steps before it are the same as without it",
                                            gt=0)

    def __post_init__(self):
        if isinstance(self.judge, (str, dict)):  # its name, or its options as a table (a run's config.json)
            self.judge = JudgeConfig.of(self.judge)
        if isinstance(self.ensemble, (list, str)):  # repeated options, a config.json's list, or one model
            self.ensemble = (self.ensemble,) if isinstance(self.ensemble, str) else tuple(self.ensemble)

    def validate(self) -> None:
        check_fields(self)  # the fields (the judge's too), then checks()

    @property
    def weights(self) -> dict[str, float]:
        """{term: weight} of the terms the objective computes: its own term alone at weight 1, or mixed's
        terms of weight > 0."""
        if self.objective != "mixed":
            return {self.objective: 1.0}
        return {t: w for t, w in zip(TERMS, (self.target_weight, self.direction_weight, self.attention_weight)) if w > 0}

    @property
    def placement(self) -> Placement:
        """Where the adversarial string goes (message and system)."""
        return Placement(self.message, self.system)

    def checks(self) -> None:
        """The combinations no attack can run (check_fields calls this after the fields)."""
        if self.draft_model is not None and self.objective != "target":
            raise RefusalLabError(f"probe sampling (--draft-model) scores candidates by the target loss; it needs "
                                  f"--objective target, not {self.objective}")
        if self.draft_model is not None and named(self.draft_model) is None:
            try:  # a draft that is no model form fails here, before any model loads
                resolve(self.draft_model)
            except RefusalLabError as e:
                raise RefusalLabError(f"--draft-model: {e}") from None
        self.placement.check()
        if self.ensemble:
            if set(self.weights) != {"target"}:
                raise RefusalLabError(f"an ensemble (--ensemble) sums the target loss over models; the {self.objective} "
                                      "objective reads one model's direction: use --objective target")
            if self.draft_model is not None:
                raise RefusalLabError("probe sampling (--draft-model) and an ensemble (--ensemble) do not combine; "
                                      "choose one")
            for spec in self.ensemble:
                if named(spec) is None:
                    try:  # a model form that does not exist fails here, before any model loads
                        resolve(spec)
                    except RefusalLabError as e:
                        raise RefusalLabError(f"--ensemble: {e}") from None
        if not self.weights:
            raise RefusalLabError("the mixed objective has every weight at 0; give a term a weight "
                                  "(--target-weight, --direction-weight, --attention-weight)")
        if self.n_replace > self.suffix_len:
            raise RefusalLabError(f"n-replace ({self.n_replace}) cannot exceed the suffix length ({self.suffix_len})")
        if self.success_check == "target" and "target" not in self.weights:
            raise RefusalLabError(f"the target success check needs a target; the {self.objective} objective has none "
                                  "(as weighted): use --success-check judge")


def config_dict(config: GCGConfig) -> dict:
    return dataclasses.asdict(config)


def comparable_config(cfg: dict) -> dict:
    """A config dict as it is compared with a checkpoint's or a finished attack's: runs made before the
    judge was a setting were judged by the substring list, and stay resumable with `judge="substring"`
    (the field is left out of the comparison then)."""
    cfg = dict(cfg)
    if isinstance(cfg.get("judge"), dict):  # a JudgeConfig's fields: what decides its verdicts
        cfg["judge"] = JudgeConfig.of(cfg["judge"]).key
    if cfg.get("judge", "substring") == "substring":
        cfg.pop("judge", None)
    cfg.pop("max_time_s", None)  # a time limit ends a run; it does not change its steps
    if not cfg.get("screen_prompts"):  # every candidate on every prompt (and runs from before the setting)
        cfg.pop("screen_prompts", None)
    if cfg.get("message", DEFAULT_MESSAGE) == DEFAULT_MESSAGE and cfg.get("system") is None:  # a suffix (and
        cfg.pop("message", None)  # runs from before placements)
        cfg.pop("system", None)
    if cfg.get("target_weight", 1.0) == 1.0 and not cfg.get("attention_weight"):  # runs from before per-term
        for key in ("target_weight", "attention_weight", "attention_heads"):  # weights
            cfg.pop(key, None)
    if not cfg.get("momentum"):  # no momentum (and runs from before the setting)
        cfg.pop("momentum", None)
    if cfg.get("check_matched", 1) == 1:  # the chosen candidate alone (and runs from before the setting)
        cfg.pop("check_matched", None)
    if not cfg.get("ensemble"):  # one model (and runs from before ensembles)
        cfg.pop("ensemble", None)
    else:  # a tuple here, a list in JSON
        cfg["ensemble"] = list(cfg["ensemble"])
    if cfg.get("draft_model") is None:  # without a draft (and in runs from before probe sampling)
        for key in ("draft_model", "probe_r", "probe_sampling_factor"):
            cfg.pop(key, None)
    return cfg
