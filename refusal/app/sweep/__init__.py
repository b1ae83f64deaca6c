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
tasks that need it are skipped, the others go on.

One concern a module: config (SweepConfig, reading it), grid (expanding it into tasks), tasks (one task
in a worker), runners (local and Ray, behind one interface), run (run_sweep), gather (the tables and the
report).
"""
from .config import ALIASES, EXECUTORS, SweepConfig, load_sweep_config, sweep_config
from .grid import Task, expand, short_keys, slug
from .tasks import run_task, worker_model
from .runners import LocalRunner, RayRunner, TaskWorker, failure_message, ray_available
from .run import RESOURCES, check_sweep, run_sweep, run_tasks
from .gather import gather, task_row
