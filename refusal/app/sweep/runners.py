"""The runners behind one interface (submit tasks, collect results as they finish): LocalRunner, one
task after another in this process, and RayRunner, tasks on Ray workers with retries."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from refusal.errors import RefusalLabError
from refusal.app.sweep.config import SweepConfig
from refusal.app.sweep.grid import Task
from refusal.app.sweep.tasks import run_task

log = logging.getLogger(__name__)

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


