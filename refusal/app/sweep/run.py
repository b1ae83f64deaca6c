"""Running a sweep: its folder checked, the grid's tasks run (finished ones reused) on a runner, the
results gathered."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from attacks.gcg import GCGConfig
from refusal import artifacts
from refusal.config import as_dict
from refusal.data import resolve_prompts
from refusal.directions import load_direction
from refusal.errors import RefusalLabError
from refusal.app.attack import check_attack
from refusal.app.sweep.config import EXECUTORS, SweepConfig
from refusal.app.sweep.gather import gather
from refusal.app.sweep.grid import Task, expand
from refusal.app.sweep.runners import LocalRunner, RayRunner, failure_message, ray_available

log = logging.getLogger(__name__)

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


