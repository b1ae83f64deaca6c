"""The sweep's config (SweepConfig) and reading it from a TOML file or the command line."""
from __future__ import annotations

import dataclasses
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attacks.gcg import OBJECTIVES
from refusal.config import check_fields, field_info, from_dict, option
from refusal.directions import DirectionConfig
from refusal.errors import RefusalLabError
from refusal.judges import JudgeConfig
from refusal.registry import NAMED_MODELS, resolve
from refusal.app.attack import ENGINES
from refusal.app.evaluation import EvalConfig
from refusal.app.pipeline import JobConfig

log = logging.getLogger(__name__)

EXECUTORS = ("auto", "ray", "local")


def _JOB(name: str):  # noqa: N802 -- the main job's default, which a sweep's attacks share
    job = JobConfig()
    return getattr(job.attack, name) if hasattr(job.attack, name) else getattr(job, name)


@dataclass(frozen=True)
class SweepConfig:
    """A sweep's grid and evaluations. The grid fields (models, prompts, engines, objectives, steps,
    search_width, suffix_len, seeds) take lists; every combination is one attack."""

    models: tuple[str, ...] = option((), "the models attacked (any --model form); every suffix is evaluated on each")
    prompts: tuple[str, ...] = option(("harmful:train",), "the prompt sets attacked: files or built-in sets")
    max_prompts: int = option(_JOB("attack_prompts"), "the first N prompts of each set", ge=1)
    per_prompt: tuple[bool, ...] = option((False,), "false: one universal suffix per set; true: one attack per prompt "
                                                     "(single behaviours); [false, true]: both")
    engines: tuple[str, ...] = option(("native",), "attack engines: native, nanogcg (one prompt per attack: per_prompt)", choices=tuple(ENGINES))
    objectives: tuple[str, ...] = option(("target",), "attack objectives: target, direction, attention, mixed",
                                         choices=OBJECTIVES)
    steps: tuple[int, ...] = option((_JOB("steps"),), "GCG steps at most", ge=1)
    search_width: tuple[int, ...] = option((_JOB("search_width"),), "candidate suffixes per step", ge=1)
    suffix_len: tuple[int, ...] = option((_JOB("suffix_len"),), "suffix tokens", ge=1)
    seeds: tuple[int, ...] = option((0,), "attack seeds (the random baseline suffix uses seed + 1)", ge=0)
    topk: int = option(_JOB("topk"), "top-k replacement tokens per suffix position", ge=1)
    early_stop: bool = option(True, "stop an attack once it succeeds (False: every attack runs all its steps)")
    eval_prompts: str = option("harmful:test", "the unseen prompts every suffix is evaluated on")
    eval_max_prompts: int = option(50, "the first N of the unseen prompts", ge=1)
    eval_tokens: int = option(_JOB("new_tokens"), "greedy reply tokens judged per reply", ge=1)
    transfer: bool = option(True, "evaluate every suffix on every other model of the sweep too (the transfer matrix)")
    analysis: bool = option(False, "analyze each suffix on its model: cosine with the direction, the refusal heads")
    direction: str | None = option(None, "a direction folder (one model only); otherwise a direction task per model "
                                         "finds it, where an objective or the analysis needs it")
    direction_search: DirectionConfig = option(help="the direction tasks' settings (refusal.directions.DirectionConfig)",
                                               factory=DirectionConfig)
    judge: JudgeConfig = option(help="the judge of attack success (its name alone, such as \"strict\", or a table of "
                                     "JudgeConfig's fields; its device and dtype default to the models')",
                                factory=JudgeConfig)
    device: str | None = option(None, "cpu or cuda (None: cuda if present)")
    dtype: str | None = option(None, "the models' dtype (None: float32 on CPU, the checkpoint's on GPU)")
    batch_size: int = option(field_info(EvalConfig, "batch_size")[0], "prompts per forward pass in the evaluations", ge=1)
    cpus_per_task: int = option(1, "CPU cores a task takes (its torch threads); the local runner uses all cores", ge=1)
    gpus_per_task: float | None = option(None, "GPUs a task takes (None: 1 where the cluster has GPUs, else 0)", ge=0, le=64)
    retries: int = option(3, "times Ray runs a task again after its worker dies (killed, out of memory, node lost)", ge=0)

    def __post_init__(self):
        if isinstance(self.judge, (str, dict)):  # a judge given by its name or its options
            object.__setattr__(self, "judge", JudgeConfig.of(self.judge))

    def validate(self, where: str | None = None) -> None:
        """One-line errors for a value of the wrong type or out of its bounds (`where`: the file, whose keys
        the messages then name), an empty grid, an unknown model, and combinations no attack can run."""
        check_fields(self, where)
        for name in ("models", "prompts", "per_prompt", "engines", "objectives", "steps", "search_width", "suffix_len",
                     "seeds"):
            values = getattr(self, name)
            if not values:
                raise RefusalLabError(f"the sweep's grid is empty: give at least one value of {name}")
            if len(set(values)) != len(values):
                raise RefusalLabError(f"{name} lists a value twice: {list(values)}")
        for m in self.models:
            if not m.strip():
                raise RefusalLabError(f"models: {m!r} is not a model")
            if m not in NAMED_MODELS:
                resolve(m)  # an unknown name or a path that is no model fails here
        if "nanogcg" in self.engines:
            if False in self.per_prompt and self.max_prompts > 1:
                raise RefusalLabError("the nanogcg engine attacks one prompt at a time: set per_prompt (--per-prompt) "
                                      "or max_prompts = 1")
            if set(self.objectives) != {"target"}:
                raise RefusalLabError("the nanogcg engine optimizes the target objective only: sweep nanogcg and the "
                                      "other objectives separately")
        if self.direction is not None and len(self.models) != 1:
            raise RefusalLabError("--direction belongs to one model; with several, each gets a direction task")

    @property
    def needs_direction(self) -> bool:
        return self.analysis or any(o != "target" for o in self.objectives)


# ----------------------------------------------------------------------------- config files

_TUPLES = {f.name for f in dataclasses.fields(SweepConfig) if isinstance(f.default, tuple)}
# the command line's singular names for the grid's lists, also accepted in a config file
ALIASES = {"model": "models", "engine": "engines", "objective": "objectives", "seed": "seeds"}




def sweep_config(values: dict[str, Any], where: str = "the sweep", options: bool = False) -> SweepConfig:
    """A SweepConfig from a dict (a parsed TOML file, or the command line's options): a scalar is accepted
    for any list field, a [direction_search] table sets DirectionConfig's fields; an unknown key or a value
    of the wrong type is a one-line error naming the accepted keys (refusal.config.check_fields), or the
    command line's options where `options`."""
    names = {f.name for f in dataclasses.fields(SweepConfig)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = ALIASES.get(key, key).replace("-", "_")
        if name not in names:
            raise RefusalLabError(f"{where}: unknown key {key!r}; the keys are {', '.join(names)}")
        if name == "direction_search":
            if not isinstance(value, dict):
                raise RefusalLabError(f"{where}: direction_search must be a table of DirectionConfig's fields")
            value = from_dict(DirectionConfig, value, where, name)
        elif name == "judge" and isinstance(value, dict):
            value = from_dict(JudgeConfig, value, where, name)
        elif name in _TUPLES:
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        out[name] = value
    config = SweepConfig(**out)
    check_fields(config, None if options else where)
    return config


def load_sweep_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """A sweep's TOML file (keys: SweepConfig's fields), with `overrides` (the command line's options) on top."""
    path = Path(path)
    if not path.is_file():
        raise RefusalLabError(f"{path}: sweep config not found; give a TOML file (see the README's Sweeps section)")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RefusalLabError(f"{path}: not a valid TOML file ({e})") from None
    return sweep_config({**values, **(overrides or {})}, where=str(path))


