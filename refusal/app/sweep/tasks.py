"""One task, in a worker: the model loaded (once per worker), then the same stage function the CLI calls
(find_direction, run_attack, run_eval, analyze_suffix; an abliteration search's trial: AblationScorer),
writing the task's folder."""
from __future__ import annotations

import gc
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import torch

from attacks.gcg import GCGConfig
from refusal import artifacts
from refusal.config import from_dict
from refusal.ablation import AblationConfig, AblationScorer
from refusal.data import direction_sets, instructions
from refusal.directions import DirectionConfig, load_direction
from refusal.methods import find_direction
from refusal.judges import JudgeConfig, load_judge
from refusal.models import seed_everything
from refusal.registry import ModelConfig, load_model
from refusal.app.analyze import AnalysisConfig, analyze_suffix
from refusal.app.attack import run_attack
from refusal.app.evaluation import EvalConfig, run_eval

log = logging.getLogger(__name__)

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
        find_direction(cm, from_dict(DirectionConfig, spec["config"]), ddir)
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
                     eval_tokens=spec["eval_tokens"], progress=False)
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


_SCORER: dict = {}  # the last ablation scorer this process made: {key: AblationScorer}


def _ablation_trial_task(cm, spec: dict, run_dir: Path, folder: Path) -> dict:
    """One trial of an abliteration search (`refusal abliterate` on Ray workers): the ablation's scores. The
    scorer (the validation prompts, the base logits, the weights to put back) is kept for the next trial."""
    key = json.dumps({k: spec[k] for k in ("model", "direction", "n_val", "seed", "new_tokens", "batch_size", "judge")},
                     sort_keys=True)
    scorer = _SCORER.get(key)
    if scorer is None or scorer.cm is not cm:
        direction = load_direction(spec["direction"], cm)
        _, _, harmful, harmless = direction_sets(None, None, 0, spec["n_val"], spec["seed"])
        scorer = AblationScorer(cm, direction, instructions(harmful), instructions(harmless),
                                load_judge(JudgeConfig(**spec["judge"])), spec["new_tokens"], spec["batch_size"])
        _SCORER.clear()
        _SCORER[key] = scorer
    scores = scorer(AblationConfig(**spec["ablation"]))
    scores["trial_s"] = scores.pop("wall_s")  # the trial's own time (run_task's wall_s includes loading)
    return scores


KINDS: dict[str, Callable] = {"direction": _direction_task, "attack": _attack_task, "eval": _eval_task,
                              "analysis": _analysis_task, "ablation_trial": _ablation_trial_task}


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


