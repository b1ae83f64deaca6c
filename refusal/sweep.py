"""Sweeps (`refusal sweep`): models x prompt sets (or single behaviours) x attack settings x seeds, every
suffix evaluated on unseen prompts on its own model and on every other model of the sweep (transfer),
optionally analysed; the grid is expanded into tasks, each a plain library call (find_direction,
run_attack, run_eval, analyze_suffix) writing its own folder under OUT/tasks/, run on Ray (an embedded
local Ray, or a cluster with an address) or, without Ray, one after another in this process; then
gathered into OUT/summary.csv (one row per task), OUT/transfer.csv (suffix's model x target model) and
OUT/report.html.

Nothing is lost: a task's result.json is written last, and a finished task is reused on resume; a task
whose worker dies is retried by Ray and its attack continues from its checkpoint (run_attack(resume=True)),
ending with the suffix an uninterrupted run gives; a task that fails is listed with its error and the
tasks that need it are skipped, the others go on."""
from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import logging
import os
import re
import shutil
import socket
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis.plots import plot_sweep_success, plot_transfer
from analysis.report import write_report
from analysis.run import AnalysisConfig, analyze_suffix
from attacks.gcg import OBJECTIVES, GCGConfig, universal_patience
from attacks.run import ENGINES, check_attack, run_attack

from . import artifacts
from .config import as_dict, field_info, option
from .data import resolve_prompts
from .directions import DirectionConfig, find_direction, load_direction
from .errors import RefusalLabError
from .evaluation import EvalConfig, run_eval
from .judges import JudgeConfig
from .models import seed_everything
from .pipeline import JobConfig
from .registry import NAMED_MODELS, ModelConfig, load_model, resolve

log = logging.getLogger(__name__)

EXECUTORS = ("auto", "ray", "local")


def _JOB(name: str):  # noqa: N802 -- the main job's default, which a sweep's attacks share
    return field_info(JobConfig, name)[0]


@dataclass(frozen=True)
class SweepConfig:
    """A sweep's grid and evaluations. The grid fields (models, prompts, engines, objectives, steps,
    search_width, suffix_len, seeds) take lists; every combination is one attack."""

    models: tuple[str, ...] = option((), "the models attacked (any --model form); every suffix is evaluated on each")
    prompts: tuple[str, ...] = option(("harmful:train",), "the prompt sets attacked: files or built-in sets")
    max_prompts: int = option(_JOB("attack_prompts"), "the first N prompts of each set")
    per_prompt: tuple[bool, ...] = option((False,), "false: one universal suffix per set; true: one attack per prompt "
                                                     "(single behaviours); [false, true]: both")
    engines: tuple[str, ...] = option(("native",), "attack engines: native, nanogcg (one prompt per attack: per_prompt)")
    objectives: tuple[str, ...] = option(("target",), "attack objectives: target, direction, mixed")
    steps: tuple[int, ...] = option((_JOB("attack_steps"),), "GCG steps at most")
    search_width: tuple[int, ...] = option((_JOB("search_width"),), "candidate suffixes per step")
    suffix_len: tuple[int, ...] = option((_JOB("suffix_len"),), "suffix tokens")
    seeds: tuple[int, ...] = option((0,), "attack seeds (the random baseline suffix uses seed + 1)")
    topk: int = option(_JOB("topk"), "top-k replacement tokens per suffix position")
    early_stop: bool = option(True, "stop an attack once it succeeds (False: every attack runs all its steps)")
    eval_prompts: str = option("harmful:test", "the unseen prompts every suffix is evaluated on")
    eval_max_prompts: int = option(50, "the first N of the unseen prompts")
    eval_tokens: int = option(_JOB("new_tokens"), "greedy reply tokens judged per reply")
    transfer: bool = option(True, "evaluate every suffix on every other model of the sweep too (the transfer matrix)")
    analysis: bool = option(False, "analyze each suffix on its model: cosine with the direction, the refusal heads")
    direction: str | None = option(None, "a direction folder (one model only); otherwise a direction task per model "
                                         "finds it, where an objective or the analysis needs it")
    direction_search: DirectionConfig = option(help="the direction tasks' settings (refusal.directions.DirectionConfig)",
                                               factory=DirectionConfig)
    judge: str = option(field_info(JudgeConfig, "name")[0], "the judge of attack success: substring, strict or hf:MODEL")
    device: str | None = option(None, "cpu or cuda (None: cuda if present)")
    dtype: str | None = option(None, "the models' dtype (None: float32 on CPU, the checkpoint's on GPU)")
    batch_size: int = option(field_info(EvalConfig, "batch_size")[0], "prompts per forward pass in the evaluations")
    cpus_per_task: int = option(1, "CPU cores a task takes (its torch threads); the local runner uses all cores")
    gpus_per_task: float | None = option(None, "GPUs a task takes (None: 1 where the cluster has GPUs, else 0)")
    retries: int = option(3, "times Ray runs a task again after its worker dies (killed, out of memory, node lost)")

    def validate(self) -> None:
        """One-line errors for an empty grid, an unknown model, engine or objective, a value out of range, and
        combinations no attack can run."""
        for name in ("models", "prompts", "per_prompt", "engines", "objectives", "steps", "search_width", "suffix_len",
                     "seeds"):
            values = getattr(self, name)
            if not isinstance(values, (tuple, list)):
                raise RefusalLabError(f"{name} takes a list of values, e.g. ({values!r},), got {values!r}")
            if not values:
                raise RefusalLabError(f"the sweep's grid is empty: give at least one value of {name}")
            if len(set(values)) != len(values):
                raise RefusalLabError(f"{name} lists a value twice: {list(values)}")
        for m in self.models:
            if not isinstance(m, str) or not m.strip():
                raise RefusalLabError(f"models: {m!r} is not a model")
            if m not in NAMED_MODELS:
                resolve(m)  # an unknown name or a path that is no model fails here
        for e in self.engines:
            if e not in ENGINES:
                raise RefusalLabError(f"unknown engine {e!r}; use {', '.join(ENGINES)}")
        for o in self.objectives:
            if o not in OBJECTIVES:
                raise RefusalLabError(f"unknown objective {o!r}; use {', '.join(OBJECTIVES)}")
        for name in ("steps", "search_width", "suffix_len"):
            for v in getattr(self, name):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise RefusalLabError(f"{name} must be integers >= 1, got {v!r}")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise RefusalLabError(f"seeds must be integers >= 0, got {s!r}")
        for name in ("max_prompts", "topk", "eval_max_prompts", "eval_tokens", "batch_size", "cpus_per_task"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RefusalLabError(f"{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise RefusalLabError(f"retries must be an integer >= 0, got {self.retries!r}")
        for name in ("direction", "device", "dtype"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise RefusalLabError(f"{name} takes a string, got {getattr(self, name)!r}")
        if self.gpus_per_task is not None and (isinstance(self.gpus_per_task, bool) or not isinstance(
                self.gpus_per_task, (int, float)) or not 0 <= self.gpus_per_task <= 64):
            raise RefusalLabError(f"gpus-per-task must be between 0 and 64, got {self.gpus_per_task}")
        if "nanogcg" in self.engines:
            if False in self.per_prompt and self.max_prompts > 1:
                raise RefusalLabError("the nanogcg engine attacks one prompt at a time: set per_prompt (--per-prompt) "
                                      "or max_prompts = 1")
            if set(self.objectives) != {"target"}:
                raise RefusalLabError("the nanogcg engine optimizes the target objective only: sweep nanogcg and the "
                                      "other objectives separately")
        if self.direction is not None and len(self.models) != 1:
            raise RefusalLabError("--direction belongs to one model; with several, each gets a direction task")
        self.direction_search.validate()
        JudgeConfig(name=self.judge).validate()

    @property
    def needs_direction(self) -> bool:
        return self.analysis or any(o != "target" for o in self.objectives)


# ----------------------------------------------------------------------------- config files

_TUPLES = {f.name for f in dataclasses.fields(SweepConfig) if isinstance(f.default, tuple)}
# the command line's singular names for the grid's lists, also accepted in a config file
ALIASES = {"model": "models", "engine": "engines", "objective": "objectives", "seed": "seeds"}


def _check_type(cls, name: str, value: Any, where: str) -> None:
    """A one-line error when `value` is not of the type of cls.name's default, or of its annotation where the
    default is None (an int for a float field is fine)."""
    default = field_info(cls, name)[0]
    if default is None:
        kind = str(next(f.type for f in dataclasses.fields(cls) if f.name == name)).split("|")[0].strip()
        default = {"int": 0, "float": 0.0, "str": ""}.get(kind, "")
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default)) and not isinstance(value, bool)
    if not ok:
        kind = "true or false" if isinstance(default, bool) else f"a {type(default).__name__}"
        raise RefusalLabError(f"{where} takes {kind}, got {value!r}")


def sweep_config(values: dict[str, Any], where: str = "the sweep") -> SweepConfig:
    """A SweepConfig from a dict (a parsed TOML file, or the command line's options): a scalar is accepted
    for any list field, a [direction_search] table sets DirectionConfig's fields; an unknown key or a value
    of the wrong type is a one-line error naming the accepted keys."""
    names = {f.name: f for f in dataclasses.fields(SweepConfig)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = ALIASES.get(key, key).replace("-", "_")
        if name not in names:
            raise RefusalLabError(f"{where}: unknown key {key!r}; the keys are {', '.join(names)}")
        default = field_info(SweepConfig, name)[0]
        if name == "direction_search":
            if not isinstance(value, dict):
                raise RefusalLabError(f"{where}: direction_search must be a table of DirectionConfig's fields")
            known = {f.name for f in dataclasses.fields(DirectionConfig)}
            bad = set(value) - known
            if bad:
                raise RefusalLabError(f"{where}: unknown direction_search key {sorted(bad)[0]!r}; the keys are "
                                      f"{', '.join(sorted(known))}")
            for k, v in value.items():
                if v is not None:
                    _check_type(DirectionConfig, k, v, f"{where}: direction_search.{k}")
            value = DirectionConfig(**value)
        elif name in _TUPLES:
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
            kind = type(default[0]) if default else str
            if any(not isinstance(v, kind) or isinstance(v, bool) != (kind is bool) for v in value):
                raise RefusalLabError(f"{where}: {key} takes {kind.__name__} values, got {list(value)!r}")
        elif value is not None:
            _check_type(SweepConfig, name, value, f"{where}: {key}")
        out[name] = value
    return SweepConfig(**out)


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


# ----------------------------------------------------------------------------- the grid, as tasks


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
    judge = as_dict(JudgeConfig(name=config.judge, device=config.device, dtype=config.dtype))
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
                        objective=objective, judge=config.judge, judge_tokens=min(field_info(GCGConfig, "judge_tokens")[0], config.eval_tokens),
                        early_stop=config.early_stop,
                        patience=universal_patience(steps, len(instructions)) if len(instructions) > 1 else 0)
        direction, dtask = direction_of.get(m, (None, None)) if objective != "target" else (None, None)
        tasks.append(Task(aid, "attack", (dtask,) if dtask else (), dict(
            model=mcfg[m], prompt_set=pset, behaviour=bkey, mode="per prompt" if bkey != set_keys[pset] else "universal",
            instructions=instructions, targets=targets, engine=engine,
            config=as_dict(gcg), direction=direction, judge=judge, eval_tokens=config.eval_tokens)))
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


# ----------------------------------------------------------------------------- one task (in a worker)

_LOADED: dict[str, Any] = {}  # the model this process loaded last, kept for the next task of the same model


def worker_model(model: dict) -> tuple[Any, float]:
    """The model of a task's ModelConfig dict, loaded once per process (a new model replaces the old one);
    returns (model, seconds spent loading: 0 when it was already loaded)."""
    key = json.dumps(model, sort_keys=True)
    if key in _LOADED:
        return _LOADED[key], 0.0
    _LOADED.clear()
    gc.collect()
    t0 = time.perf_counter()
    _LOADED[key] = load_model(ModelConfig(**model))
    return _LOADED[key], time.perf_counter() - t0


def _at(run_dir: Path, path: str | None) -> str | None:
    return None if path is None else str(run_dir / path)


def _direction_task(cm, spec: dict, run_dir: Path, folder: Path) -> dict:
    ddir = folder / "direction"
    d = load_direction(ddir, cm) if (ddir / "direction.safetensors").is_file() else \
        find_direction(cm, DirectionConfig(**spec["config"]), ddir)
    return dict(layer=d.layer, position=d.position)


def _attack_task(cm, spec: dict, run_dir: Path, folder: Path) -> dict:
    config = GCGConfig(**spec["config"])
    direction = load_direction(_at(run_dir, spec["direction"]), cm) if spec["direction"] else None
    seed_everything(config.seed)
    nano = spec["engine"] == "nanogcg"  # not resumable: a retried nanoGCG attack starts again
    ckpt = folder / "attack" / "checkpoint.json"
    resumed_from = 0 if nano or not ckpt.is_file() else int(artifacts.read_json(ckpt).get("step", 0))
    rec = run_attack(cm, spec["instructions"], spec["targets"], config, folder, engine=spec["engine"],
                     direction=direction, direction_path=spec["direction"], resume=not nano, force=nano,
                     eval_tokens=spec["eval_tokens"], progress=False, judge=JudgeConfig(**spec["judge"]))
    return dict(suffix=rec["suffix"], train_success=rec["success_rate"], train_random_success=rec["random_success_rate"],
                best_loss=rec["best_loss"], steps_run=rec["steps_run"], s_per_step=rec["s_per_step"],
                attack_s=rec["elapsed_s"], n_prompts=len(rec["prompts"]), resumed_from_step=resumed_from)


def _eval_task(cm, spec: dict, run_dir: Path, folder: Path) -> dict:
    suffix = _at(run_dir, spec["suffix"])
    if suffix is not None and spec["source"] != spec["model"]["model"]:
        # on another model the suffix is its text, tokenized by that model's tokenizer (token ids are the
        # source's vocabulary)
        suffix = str(artifacts.write_text(folder / "suffix.txt", artifacts.read_json(suffix)["suffix"]))
    config = EvalConfig(prompts=_at(run_dir, spec["prompts"]), suffix=suffix,
                        max_new_tokens=spec["max_new_tokens"], batch_size=spec["batch_size"],
                        judge=JudgeConfig(**spec["judge"]))
    rec = run_eval(cm, config, folder / "replies.jsonl")
    return dict(n_eval=rec["n"], attack_success=rec["attack_success_rate"],
                attack_success_substring=rec["attack_success_rates"]["substring"], refusal_rate=rec["refusal_rate"])


def _analysis_task(cm, spec: dict, run_dir: Path, folder: Path) -> dict:
    direction = load_direction(_at(run_dir, spec["direction"]), cm)
    config = AnalysisConfig(**{**spec["config"], "harmful": _at(run_dir, spec["config"]["harmful"]),
                               "judge": JudgeConfig(**spec["config"]["judge"])})
    res = analyze_suffix(cm, direction, _at(run_dir, spec["suffix"]), config, folder / "analysis")
    n = res["numbers"]
    cos, share = n["cosine_at_layer"], n["suffix_attention_share"]
    return dict(layer=n["layer"], cosine_harmful=cos.get("harmful"), cosine_adversarial=cos.get("adversarial_suffix"),
                cosine_random=cos.get("random_suffix"), cosine_harmless=cos.get("harmless"),
                heads_suffix_share_adversarial=share.get("adversarial_suffix"),
                heads_suffix_share_random=share.get("random_suffix"))


KINDS: dict[str, Callable] = {"direction": _direction_task, "attack": _attack_task, "eval": _eval_task,
                              "analysis": _analysis_task}


def run_task(spec: dict, run_dir: str, threads: int | None = None) -> dict:
    """Run one task of a sweep (what a Ray worker calls): append this attempt to its attempts.log, load its
    model (kept in this process for the next task), make the library call into OUT/tasks/ID/, and write
    result.json last. `threads`: torch threads (a task's CPU cores)."""
    run_dir = Path(run_dir)
    folder = run_dir / "tasks" / spec["id"]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "attempts.log", "a", encoding="utf-8") as f:  # one line per attempt; a kill leaves it
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    if threads:
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    cm, load_s = worker_model(spec["model"])
    t1 = time.perf_counter()
    out = KINDS[spec["kind"]](cm, spec, run_dir, folder)
    result = dict(id=spec["id"], kind=spec["kind"], status="done", **out, load_s=round(load_s, 3),
                  task_s=round(time.perf_counter() - t1, 3), wall_s=round(time.perf_counter() - t0, 3),
                  attempts=len((folder / "attempts.log").read_text(encoding="utf-8").splitlines()),
                  host=socket.gethostname(), pid=os.getpid(), spec=spec)
    artifacts.write_json(folder / "result.json", result)
    return result


# ----------------------------------------------------------------------------- runners


def failure_message(e: BaseException) -> str:
    """A failed task's error in one line: the task's own exception (not Ray's wrapper), or the worker's death."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    name = type(e).__name__
    if any(k in name for k in ("WorkerCrashed", "NodeDied", "OutOfMemory", "ActorDied", "ActorUnavailable")):
        return f"{name}: the task's worker died (killed, out of memory or node lost) on every attempt"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{name}: {first}"[:400]


class LocalRunner:
    """Runs each task when it is submitted, in this process (the fallback without Ray)."""

    name = "local"

    def __init__(self):
        self.done: list[tuple[str, dict | None, BaseException | None]] = []

    def submit(self, task: Task, run_dir: Path) -> None:
        try:
            self.done.append((task.id, run_task(task.spec, str(run_dir)), None))
        except Exception as e:  # a failed task is recorded; the others go on
            log.debug("task %s failed", task.id, exc_info=True)
            self.done.append((task.id, None, e))

    def pending(self) -> int:
        return len(self.done)

    def wait(self) -> list[tuple[str, dict | None, BaseException | None]]:
        done, self.done = self.done, []
        return done

    def close(self) -> None:
        pass


class TaskWorker:
    """A Ray actor: one process holding its share of the cluster (config.cpus_per_task cores, one GPU where
    there are GPUs) for the whole sweep, running one task at a time and keeping the model it loaded last."""

    def run(self, spec: dict, run_dir: str, threads: int | None) -> dict:
        return run_task(spec, run_dir, threads)


class RayRunner:
    """Runs tasks on Ray: the embedded local Ray (sized to this machine's cores and GPUs) or the cluster at
    `address`. As many TaskWorker actors as the cluster's resources hold (at most one per task) take the
    tasks; a ready task goes to an idle worker that holds its model where there is one. A worker that dies
    (killed, out of memory, node lost) is restarted and its task run again, up to config.retries times."""

    name = "ray"

    def __init__(self, config: SweepConfig, address: str | None, n_tasks: int):
        import ray

        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            kw = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                      configure_logging=False)
            if address is None:  # a new local Ray of this user's, on this machine
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                kw.update(address="local", object_store_memory=256 * 2 ** 20)  # tasks pass small JSON
            else:
                kw.update(address=address)
            try:
                ray.init(**kw)
            except (ConnectionError, ValueError, RuntimeError, TimeoutError) as e:
                raise RefusalLabError(f"Ray did not start{f' at {address}' if address else ''}: "
                                      f"{(str(e).strip().splitlines() or [''])[0][:200]}; check --address") from None
        try:
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            total = ray.cluster_resources()
            gpus = config.gpus_per_task
            if gpus is None:
                gpus = 1 if total.get("GPU", 0) >= 1 else 0
            if not any(n.get("CPU", 0) >= config.cpus_per_task and n.get("GPU", 0) >= gpus for n in nodes):
                raise RefusalLabError(f"no Ray node has {config.cpus_per_task} CPU(s) and {gpus:g} GPU(s) for a task "
                                      f"(the largest: {max((n.get('CPU', 0) for n in nodes), default=0):g} CPUs, "
                                      f"{max((n.get('GPU', 0) for n in nodes), default=0):g} GPUs); lower "
                                      "--cpus-per-task / --gpus-per-task")
            slots = int(total.get("CPU", 0) // config.cpus_per_task)
            if gpus:
                slots = min(slots, int(total.get("GPU", 0) // gpus))
            self.actor = ray.remote(TaskWorker).options(num_cpus=config.cpus_per_task, num_gpus=gpus,
                                                        max_restarts=config.retries,
                                                        max_task_retries=config.retries)
            self.workers = [self.actor.remote() for _ in range(max(1, min(slots, n_tasks)))]
        except BaseException:
            self.close()
            raise
        self.threads = config.cpus_per_task
        self.idle = list(range(len(self.workers)))
        self.holds: dict[int, str] = {}  # worker -> the model it loaded last
        self.queue: list[Task] = []
        self.refs: dict[Any, tuple[str, int]] = {}  # running: ref -> (task id, worker)
        self.run_dir: Path | None = None

    def submit(self, task: Task, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.queue.append(task)
        self._dispatch()

    def _dispatch(self) -> None:
        """Queued tasks to idle workers: a task of the model a worker holds; else a task of a model no worker
        holds (to a worker without a model where there is one); else the first task."""
        model_of = lambda t: t.spec["model"]["model"]  # noqa: E731
        while self.queue and self.idle:
            pair = next(((w, t) for w in self.idle for t in self.queue if self.holds.get(w) == model_of(t)), None)
            if pair is None:
                held = set(self.holds.values())
                task = next((t for t in self.queue if model_of(t) not in held), self.queue[0])
                pair = (next((w for w in self.idle if w not in self.holds), self.idle[0]), task)
            w, task = pair
            model = model_of(task)
            self.queue.remove(task)
            self.idle.remove(w)
            self.holds[w] = model
            ref = self.workers[w].run.remote(task.spec, str(self.run_dir), self.threads)
            self.refs[ref] = (task.id, w)

    def pending(self) -> int:
        return len(self.refs) + len(self.queue)

    def wait(self) -> list[tuple[str, dict | None, BaseException | None]]:
        """The tasks that have finished (at least one: it waits for the first)."""
        first, rest = self.ray.wait(list(self.refs), num_returns=1)
        more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0) if rest else ([], [])
        out = []
        for ref in first + more:
            tid, w = self.refs.pop(ref)
            try:
                out.append((tid, self.ray.get(ref), None))
            except Exception as e:  # the task's exception (wrapped by Ray) or its worker's death
                out.append((tid, None, e))
                if isinstance(e, self.ray.exceptions.RayActorError):  # restarts used up: a fresh worker
                    self.workers[w] = self.actor.remote()
                    self.holds.pop(w, None)
            self.idle.append(w)
        self._dispatch()
        return out

    def close(self) -> None:
        for w in getattr(self, "workers", []):
            self.ray.kill(w)
        if self.started:
            self.ray.shutdown()


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- the sweep

# settings that change where and how often tasks run, not what they compute: another machine may resume
RESOURCES = ("cpus_per_task", "gpus_per_task", "retries")


def _results_config(config: SweepConfig) -> dict:
    return {k: v for k, v in json.loads(json.dumps(as_dict(config))).items() if k not in RESOURCES}


def check_sweep(config: SweepConfig, out: str | Path, resume: bool = False, force: bool = False,
                executor: str = "auto", address: str | None = None) -> list[Task]:
    """The config, the run folder and the executor checked, and the grid expanded, before any task starts."""
    if resume and force:
        raise RefusalLabError("--resume and --force contradict each other; choose one")
    if executor not in EXECUTORS:
        raise RefusalLabError(f"unknown executor {executor!r}; use {', '.join(EXECUTORS)}")
    if executor == "ray" and not ray_available():
        raise RefusalLabError("Ray is not installed; pip install 'refusal-lab[ray]' (make setup installs it), or "
                              "use --executor local")
    if address is not None and (executor == "local" or not ray_available()):
        raise RefusalLabError("--address needs Ray: pip install 'refusal-lab[ray]' and --executor ray or auto")
    out = Path(out)
    artifacts.check_out(out, force=force, resume=resume,
                        fix="pass --resume to reuse its finished tasks, --force to start over, or choose another --out")
    tasks = expand(config)
    for engine in config.engines:
        check_attack(GCGConfig(objective="target"), engine)  # nanoGCG installed where it is swept
    if config.direction is not None and config.needs_direction:
        load_direction(config.direction)  # a bad direction folder fails before any task
    if config.needs_direction and config.direction is None:
        for name in ("harmful", "harmless"):
            if getattr(config.direction_search, name):
                resolve_prompts(getattr(config.direction_search, name))
    if resume and (out / "sweep.json").is_file():
        before = artifacts.read_json(out / "sweep.json").get("config") or {}
        if {k: v for k, v in before.items() if k not in RESOURCES} != _results_config(config):
            raise RefusalLabError(f"{out} holds a sweep with other settings; pass --force to start over or choose "
                                  "another --out")
    return tasks


def run_sweep(config: SweepConfig, out: str | Path, executor: str = "auto", address: str | None = None,
              resume: bool = False, force: bool = False, progress: bool = True,
              say: Callable[[str], None] | None = None) -> dict:
    """Run a sweep into `out` and gather it: returns the sweep record (also out/sweep.json) with `summary`
    (the DataFrame of summary.csv), `transfer` (transfer.csv's matrix), `report` (report.html's path) and
    `failed` (task id -> error). executor: ray (Ray must be installed), local (one task after another in
    this process), auto (Ray where installed). resume reuses the tasks whose result.json is there."""
    say = say or log.info
    t0 = time.perf_counter()
    out = Path(out).resolve()  # tasks on other nodes join paths to it
    tasks = check_sweep(config, out, resume, force, executor, address)
    use_ray = executor == "ray" or (executor == "auto" and ray_available())
    if not use_ray:
        say(f"Ray is not installed (pip install 'refusal-lab[ray]'): running the {len(tasks)} tasks one after another "
            "in this process" if executor == "auto" else f"running the {len(tasks)} tasks one after another in this process")
    runner = RayRunner(config, address, len(tasks)) if use_ray else LocalRunner()  # Ray's errors before any write
    try:
        if force and out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        out.mkdir(parents=True, exist_ok=True)
        eval_prompts = resolve_prompts(config.eval_prompts)[: config.eval_max_prompts]
        with artifacts.atomic_path(out / "prompts" / "eval.jsonl") as tmp:
            tmp.write_text("".join(json.dumps({"instruction": p.instruction, "category": p.category}) + "\n"
                                   for p in eval_prompts), encoding="utf-8")
        artifacts.write_json(out / "sweep.json", artifacts.run_record(
            config=as_dict(config), executor=runner.name, address=address,
            tasks=[{"id": t.id, "kind": t.kind, "deps": list(t.deps)} for t in tasks]))

        results: dict[str, dict] = {}
        for t in tasks:  # finished tasks of an earlier run of this sweep
            path = out / "tasks" / t.id / "result.json"
            if resume and path.is_file():
                try:
                    rec = artifacts.read_json(path)
                except RefusalLabError:
                    continue
                if rec.get("spec") == json.loads(json.dumps(t.spec)):
                    results[t.id] = {**rec, "status": "reused"}
        if results:
            say(f"reusing {len(results)} finished tasks of {len(tasks)}")
        run_tasks(tasks, results, runner, out, progress)
    finally:
        runner.close()
    gathered = gather(config, tasks, results, out)
    failed = {tid: r["error"] for tid, r in results.items() if r["status"] == "failed"}
    record = artifacts.run_record(
        config=as_dict(config), executor=runner.name, address=address, n_tasks=len(tasks),
        n_done=sum(r["status"] == "done" for r in results.values()),
        n_reused=sum(r["status"] == "reused" for r in results.values()), n_failed=len(failed), failed=failed,
        tasks=[{"id": t.id, "kind": t.kind, "deps": list(t.deps)} for t in tasks],
        wall_s=round(time.perf_counter() - t0, 3),
        task_s_sum=round(sum(float(r.get("wall_s") or 0) for r in results.values() if r["status"] == "done"), 3))
    artifacts.write_json(out / "sweep.json", record)
    return {**record, **gathered, "failed": failed}


def run_tasks(tasks: list[Task], results: dict[str, dict], runner, out: Path, progress: bool = True) -> None:
    """Run every task not in `results` once the tasks it needs are done, recording each result (or its
    failure, and the tasks skipped because of it) in `results`, with a progress bar over the tasks."""
    by_id = {t.id: t for t in tasks}
    submitted: set[str] = set()
    bar = tqdm(total=len(tasks), initial=len(results), desc="sweep", unit="task", disable=not progress)
    last_model = None
    try:
        while True:
            ready = []
            for t in tasks:  # in order: a task's dependencies come before it
                if t.id in results or t.id in submitted:
                    continue
                failed = [d for d in t.deps if d in results and results[d]["status"] == "failed"]
                if failed:
                    results[t.id] = {"id": t.id, "kind": t.kind, "status": "failed", "spec": t.spec,
                                     "error": f"skipped: it needs task {failed[0]}, which failed"}
                    bar.update()
                elif all(d in results for d in t.deps):
                    ready.append(t)
            # the tasks of one model together (the model loaded last first): a worker keeps its model loaded
            ready.sort(key=lambda t: (t.spec["model"]["model"] != last_model, t.spec["model"]["model"]))
            for t in ready:
                runner.submit(t, out)
                submitted.add(t.id)
                last_model = t.spec["model"]["model"]
            if not runner.pending():
                break
            for tid, rec, err in runner.wait():
                if err is not None:
                    rec = {"id": tid, "kind": by_id[tid].kind, "status": "failed", "spec": by_id[tid].spec,
                           "error": failure_message(err)}
                    log.warning("task %s failed: %s", tid, rec["error"])
                results[tid] = rec
                bar.update()
    finally:
        bar.close()


# ----------------------------------------------------------------------------- gathering

def task_row(result: dict) -> dict:
    """A summary row: the task's settings (from its spec), status, error, success rates and timings."""
    spec = result.get("spec") or {}
    gcg = (spec.get("config") or {}) if spec.get("kind") == "attack" else {}
    source = spec.get("source") if spec.get("kind") == "eval" else (spec.get("model") or {}).get("model")
    row = dict(task=result["id"], kind=result.get("kind", spec.get("kind")), status=result["status"],
               error=result.get("error", ""),
               model=source if spec.get("kind") == "eval" else (spec.get("model") or {}).get("model"),
               target_model=(spec.get("model") or {}).get("model") if spec.get("kind") == "eval" else None,
               prompt_set=spec.get("prompt_set"), behaviour=spec.get("behaviour"), mode=spec.get("mode"),
               engine=spec.get("engine"),
               objective=gcg.get("objective"),
               steps=gcg.get("steps"), search_width=gcg.get("search_width"), suffix_len=gcg.get("suffix_len"),
               seed=gcg.get("seed"), judge=gcg.get("judge"))
    if spec.get("kind") == "eval" and source is None:
        row["model"] = row["target_model"]
    if spec.get("kind") == "eval":
        row["judge"] = (spec.get("judge") or {}).get("name")
    skip = {"id", "kind", "status", "spec", "error", "host", "pid"}
    row.update({k: v for k, v in result.items() if k not in skip and k not in row})
    return row


def gather(config: SweepConfig, tasks: list[Task], results: dict[str, dict], out: Path) -> dict:
    """summary.csv (one row per task; an evaluation row carries its attack's settings), transfer.csv (mean
    attack success on the unseen prompts: the suffix's model x the target model) and report.html."""
    rows = {t.id: task_row(results[t.id]) for t in tasks}
    attack_of = {t.id: t.deps[0] for t in tasks if t.kind in ("eval", "analysis") and t.deps}
    for tid, aid in attack_of.items():  # an evaluation or analysis row carries its attack's settings
        if aid in rows and rows[aid]["kind"] == "attack":
            for k in ("prompt_set", "behaviour", "mode", "engine", "objective", "steps", "search_width", "suffix_len",
                      "seed"):
                rows[tid][k] = rows[aid][k]
    summary = pd.DataFrame(list(rows.values()))
    for c in ("attack_success", "cosine_harmful", "cosine_adversarial"):  # the columns read below, also when no
        if c not in summary:                                             # task of their kind finished
            summary[c] = float("nan")
    artifacts.write_csv(out / "summary.csv", summary)

    ok = summary[summary.status.isin(["done", "reused"])]
    evals = ok[(ok.kind == "eval") & ok.objective.notna()] if "objective" in ok else ok.iloc[:0]
    if len(evals):
        transfer = evals.pivot_table(index="model", columns="target_model", values="attack_success", aggfunc="mean")
        transfer.index.name, transfer.columns.name = "suffix_model", "target_model"
    else:
        transfer = pd.DataFrame()
    artifacts.write_csv(out / "transfer.csv", transfer.reset_index() if len(transfer) else
                        pd.DataFrame(columns=["suffix_model"]))

    own = evals[evals.model == evals.target_model] if len(evals) else evals
    if len(own) and own["mode"].nunique() > 1:  # universal and per-prompt suffixes apart
        own = own.assign(objective=own.objective + ", " + own["mode"])
    by = (own.groupby(["model", "objective"]).attack_success.agg(["mean", "count"]).reset_index()
          .rename(columns={"mean": "attack_success", "count": "suffixes"}) if len(own) else pd.DataFrame())
    base = ok[(ok.kind == "eval") & ok.objective.isna()][["model", "attack_success"]] if len(ok) else pd.DataFrame()
    if len(by) and len(base):
        by = by.merge(base.rename(columns={"attack_success": "no_suffix"}), on="model", how="left")
    analysed = ok[ok.kind == "analysis"] if len(ok) else ok
    if len(by) and len(analysed):  # the cosine at the direction's layer: harmful minus with the suffix
        if analysed["mode"].nunique() > 1:
            analysed = analysed.assign(objective=analysed.objective + ", " + analysed["mode"])
        drop = (analysed.cosine_harmful - analysed.cosine_adversarial).groupby(
            [analysed.model, analysed.objective]).mean().rename("cosine_drop").reset_index()
        by = by.merge(drop, on=["model", "objective"], how="left")
    plots = {}
    if len(by):
        plots["Attack success on unseen prompts by model and objective"] = plot_sweep_success(
            by, out / "success_by_model.png", config.judge)
    if len(transfer):
        plots["Transfer: attack success of a model's suffixes on each model"] = plot_transfer(
            transfer, out / "transfer.png", config.judge)
    failed = summary[summary.status == "failed"][["task", "error"]]
    n_ok = len(ok)
    sentences = [f"{len(summary)} tasks: {n_ok} done ({int((summary.status == 'reused').sum())} reused from an earlier "
                 f"run), {len(failed)} failed."]
    for r in by.itertuples(index=False) if len(by) else []:
        no = getattr(r, "no_suffix", float("nan"))
        drop = getattr(r, "cosine_drop", float("nan"))
        sentences.append(f"On {r.model}, {r.suffixes} suffix(es) of the {r.objective} objective succeed on "
                         f"{r.attack_success:.1%} of the unseen prompts on average by the {config.judge} judge"
                         + (f" (no suffix: {no:.1%})" if no == no else "")
                         + (f"; they lower the cosine with the direction at its layer by {drop:.3f}" if drop == drop else "")
                         + ".")
    if len(transfer) > 1 or (len(transfer) and transfer.shape[1] > 1):
        for src in transfer.index:
            others = [f"{t} {transfer.loc[src, t]:.1%}" for t in transfer.columns
                      if t != src and transfer.loc[src, t] == transfer.loc[src, t]]
            if others:
                own_rate = transfer.loc[src].get(src, float("nan"))
                sentences.append(f"Suffixes made on {src} (own model {own_rate:.1%}) transfer to "
                                 + ", ".join(others) + ".")
    columns = [c for c in ("task", "status", "model", "target_model", "behaviour", "mode", "engine", "objective", "seed",
                           "train_success", "attack_success", "attack_success_substring", "cosine_harmful",
                           "cosine_adversarial", "cosine_random", "wall_s", "attempts") if c in summary]
    tables = {"Success by model and objective": by, "Transfer matrix": transfer.reset_index() if len(transfer) else transfer,
              "Failed tasks": failed, "Tasks": summary[columns]}
    facts = {"models": ", ".join(config.models), "prompt sets": ", ".join(config.prompts),
             "unseen prompts": f"{config.eval_prompts} (first {config.eval_max_prompts}), {config.eval_tokens} reply tokens",
             "judge": config.judge}
    _, report = write_report(out, "refusal-lab sweep", sentences, plots, {k: v for k, v in tables.items() if len(v)},
                             facts, max_rows=10_000)
    return {"summary": summary, "transfer": transfer, "by_model": by, "report": str(report), "sentences": sentences}
