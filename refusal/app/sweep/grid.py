"""The sweep's grid expanded into tasks: directions, attacks, evaluations (on every model: transfer),
analyses, each with the tasks it needs."""
from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

from attacks.gcg import GCGConfig, universal_patience
from refusal.config import as_dict, field_info
from refusal.data import resolve_prompts
from refusal.errors import RefusalLabError
from refusal.registry import ModelConfig
from refusal.app.analyze import AnalysisConfig
from refusal.app.sweep.config import SweepConfig

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Task:
    """One library call: `spec` is JSON (kind, model, settings, paths relative to the sweep folder); `deps`
    are the ids of the tasks whose outputs it reads."""

    id: str
    kind: str
    deps: tuple[str, ...]
    spec: dict


def slug(text: str, keep: int = 40) -> str:
    """A folder-safe short name: a model's or prompt set's name (a path's last part)."""
    text = Path(str(text).rstrip("/")).name or str(text)
    text = re.sub(r"\.(jsonl?|csv|txt|gguf)$", "", text)
    return (re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "x")[:keep]


def short_keys(models: tuple[str, ...]) -> dict[str, str]:
    """A short unique key per model or prompt set (its slug; numbered where two slugs agree)."""
    keys: dict[str, str] = {}
    for i, m in enumerate(models):
        k = slug(m)
        keys[m] = k if k not in keys.values() else f"{k}{i}"
    return keys


def expand(config: SweepConfig) -> list[Task]:
    """The tasks of a sweep, each after the tasks it needs: per model a direction task (where an objective or
    the analysis needs the direction and none is given) and a no-suffix baseline evaluation; per grid point an
    attack, its evaluations (its own model, and every other model when config.transfer), and its analysis."""
    config.validate()
    keys = short_keys(config.models)
    mcfg = {m: as_dict(ModelConfig(model=m, device=config.device, dtype=config.dtype)) for m in config.models}
    judge_config = replace(config.judge, device=config.judge.device or config.device,
                           dtype=config.judge.dtype or config.dtype)
    judge = as_dict(judge_config)
    evals = dict(prompts="prompts/eval.jsonl", max_new_tokens=config.eval_tokens, batch_size=config.batch_size, judge=judge)
    tasks: list[Task] = []
    direction_of: dict[str, tuple[str, str | None]] = {}  # model -> (direction folder, the task that makes it)
    for m in config.models:
        if config.needs_direction:
            if config.direction is not None:
                direction_of[m] = (str(Path(config.direction).resolve()), None)
            else:
                tid = f"direction-{keys[m]}"
                tasks.append(Task(tid, "direction", (), dict(model=mcfg[m], config=as_dict(config.direction_search))))
                direction_of[m] = (f"tasks/{tid}/direction", tid)
        tasks.append(Task(f"eval-none-on-{keys[m]}", "eval", (), dict(model=mcfg[m], source=None, suffix=None, **evals)))

    behaviours: list[tuple[str, str, list[str], list[str | None] | None]] = []  # key, set, instructions, targets
    set_keys = short_keys(config.prompts)  # a short unique name per prompt set
    for spec, per_prompt in itertools.product(config.prompts, config.per_prompt):
        prompts = resolve_prompts(spec)[: config.max_prompts]
        groups = [[p] for p in prompts] if per_prompt else [prompts]
        for i, group in enumerate(groups):
            key = set_keys[spec] + (f"-p{i}" if per_prompt else "")
            targets = [p.target for p in group] if all(p.target for p in group) else None
            behaviours.append((key, spec, [p.instruction for p in group], targets))

    unseen = {p.instruction for p in resolve_prompts(config.eval_prompts)[: config.eval_max_prompts]}
    seen = sorted({i for _, _, ins, _ in behaviours for i in ins} & unseen)
    if seen:
        raise RefusalLabError(f"{len(seen)} attacked prompt(s) are among the evaluation prompts ({seen[0][:60]!r}); "
                              "evaluate on prompts the attacks do not see (eval_prompts)")
    grid = itertools.product(config.models, behaviours, config.engines, config.objectives, config.steps,
                             config.search_width, config.suffix_len, config.seeds)
    for m, (bkey, pset, instructions, targets), engine, objective, steps, width, slen, seed in grid:
        point = f"{keys[m]}-{bkey}-{engine}-{objective}-n{steps}-w{width}-l{slen}-s{seed}"
        aid = f"attack-{point}"
        gcg = GCGConfig(steps=steps, search_width=width, topk=config.topk, suffix_len=slen, seed=seed,
                        objective=objective, judge=judge_config, judge_tokens=min(field_info(GCGConfig, "judge_tokens")[0], config.eval_tokens),
                        early_stop=config.early_stop,
                        patience=universal_patience(steps, len(instructions)) if len(instructions) > 1 else 0)
        direction, dtask = direction_of.get(m, (None, None)) if objective != "target" else (None, None)
        tasks.append(Task(aid, "attack", (dtask,) if dtask else (), dict(
            model=mcfg[m], prompt_set=pset, behaviour=bkey, mode="per prompt" if bkey != set_keys[pset] else "universal",
            instructions=instructions, targets=targets, engine=engine,
            config=as_dict(gcg), direction=direction, eval_tokens=config.eval_tokens)))
        suffix = f"tasks/{aid}/attack/suffix.json"
        for target in config.models:
            if target == m or config.transfer:
                tasks.append(Task(f"eval-{point}-on-{keys[target]}", "eval", (aid,),
                                  dict(model=mcfg[target], source=m, suffix=suffix, **evals)))
        if config.analysis:
            direction, dtask = direction_of[m]
            tasks.append(Task(f"analysis-{point}", "analysis", (aid,) + ((dtask,) if dtask else ()), dict(
                model=mcfg[m], suffix=suffix, direction=direction, config=as_dict(AnalysisConfig(
                    harmful="prompts/eval.jsonl", max_prompts=config.eval_max_prompts, batch_size=config.batch_size,
                    eval_tokens=0)))))
    for t in tasks:
        t.spec.update(id=t.id, kind=t.kind)
    return tasks


