"""One attack stage: optimize a suffix (native engine or nanogcg), draw the random baseline, judge the
result, and write runs/NAME/attack/: suffix.json, steps.csv, checkpoint.json, attack.json."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import pandas as pd

from refusal import artifacts
from refusal.errors import RefusalLabError
from refusal.judges import Judge, JudgeConfig, check_loaded_judge, load_judge
from refusal.models import ChatModel

from attacks.gcg import STEP_PARTS, GCG, AttackResult, GCGConfig, comparable_config, config_dict
from refusal.suffix import random_suffix_ids
from attacks.reference import check_probe_sampling, require_nanogcg, run_nanogcg
from attacks.targets import default_target
from refusal.success import suffix_success

log = logging.getLogger(__name__)

ENGINES = ("native", "nanogcg")


def checkpoint_path(attack_dir: Path, name: str | None = None) -> Path:
    name = name or "checkpoint.json"
    if "checkpoint" not in name:
        raise RefusalLabError(f"checkpoint file name {name!r} must contain 'checkpoint'")
    return Path(attack_dir) / name


def steps_frame(result: AttackResult, judge: str) -> pd.DataFrame:
    """One row per step; `success_rate` is the share of active prompts that `judge` names the check of: a
    judge's name (its verdict on the greedy reply), "target_match" (the greedy reply begins with the target),
    "target_match+NAME" (both), or "none" (nanogcg: not checked)."""
    best = pd.Series(result.losses).cummin() if result.losses else pd.Series(dtype=float)
    n = len(result.losses)
    profile = result.profile if len(result.profile) == n else [[float("nan")] * (len(STEP_PARTS) + 1)] * n
    parts = {f"{p}_s": [row[i] for row in profile] for i, p in enumerate(STEP_PARTS + ("other",))}
    return pd.DataFrame({
        "step": range(len(result.losses)),
        "loss": result.losses,
        "best_loss": best,
        "n_active": result.n_active,
        "success_rate": result.success,
        "judge": judge,
        "suffix": result.suffixes,
        **parts,  # the step's wall time split into the token gradient, candidate scoring, success checking, the rest
    })


def check_attack(config: GCGConfig, engine: str = "native", direction=None, resume: bool = False,
                 force: bool = False) -> Judge:
    """The attack's settings, checked before a model loads (by the CLI and by run_attack): the config, the
    engine (nanoGCG installed, the target objective only), a direction for the objectives that need one,
    resume or force, and the judge, which it returns loaded."""
    config.validate()
    if engine not in ENGINES:
        raise RefusalLabError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if engine == "nanogcg":
        if config.objective != "target":
            raise RefusalLabError("the nanogcg engine optimizes the target objective only; use --engine native")
        require_nanogcg()
        if config.draft_model is not None:
            check_probe_sampling(config)
        if config.ensemble:
            raise RefusalLabError("the nanogcg engine attacks one model; use --engine native for --ensemble")
    if config.objective != "target" and direction is None:
        raise RefusalLabError(f"--objective {config.objective} needs --direction DIR (a folder made by `refusal direction`)")
    if resume and force:
        raise RefusalLabError("--resume and --force contradict each other; choose one")
    return load_judge(config.judge)  # loaded once per process: run_attack's call reuses it


def ensemble_record(cm: ChatModel, instructions: Sequence[str], ids: Sequence[int], eval_tokens: int, judge,
                    placement) -> dict:
    """The suffix judged on one model of an ensemble: its success flags and rates (as the attacked model's)."""
    judged = suffix_success(cm, instructions, ids, eval_tokens, progress=False, judge=judge, placement=placement)
    return dict(model=cm.describe(), success_flags=[bool(x) for x in judged.success],
                success_rate=float(judged.success.mean()), substring_success_rate=float(judged.substring_success.mean()),
                verdicts=list(judged.verdict))


def run_attack(
    cm: ChatModel,
    instructions: Sequence[str],
    targets: Sequence[str | None] | None,
    config: GCGConfig,
    out: str | Path,
    engine: str = "native",
    direction=None,
    direction_path: str | None = None,
    resume: bool = False,
    force: bool = False,
    checkpoint_name: str | None = None,
    eval_tokens: int = 64,
    progress: bool = True,
    judge=None,
) -> dict:
    """Run an attack into `out`/attack and return the suffix record (also written as suffix.json).

    targets: one per instruction, None for the default "Sure, here is ..." targets (not needed by the
    direction objective). resume continues from the checkpoint in the folder; force overwrites it.
    judge: config.judge already loaded (a Judge, reused; it must be the one config.judge names); None loads
    config.judge."""
    loaded = check_attack(config, engine, direction, resume, force)
    instructions = [str(i).strip() for i in instructions]
    if not instructions or any(not i for i in instructions):
        raise RefusalLabError("no prompts to attack (or an empty one)")
    if targets is None:
        targets = [default_target(i) if "target" in config.weights else None for i in instructions]
    attack_dir = Path(out) / "attack"
    ckpt = checkpoint_path(attack_dir, checkpoint_name)
    if (attack_dir / "suffix.json").is_file() and resume and not force:
        done = artifacts.read_json(attack_dir / "suffix.json")
        old, new = comparable_config(done.get("config") or {}), comparable_config(config_dict(config))
        if old != new and {**old, "judge": None} == {**new, "judge": None} and done.get("prompts") == instructions:
            made_by = JudgeConfig.of((done.get("config") or {}).get("judge", "substring")).key
            raise RefusalLabError(f"{attack_dir} holds a finished attack judged by the {made_by} judge; pass --judge "
                                  f"{made_by} to reuse it, --force to redo it, or choose another --out")
        if old != new or done.get("prompts") != instructions or done.get("engine") != engine:
            raise RefusalLabError(f"{attack_dir} holds a finished attack with other prompts or settings; pass --force to "
                                  "overwrite it or choose another --out")
        log.info("%s: the attack is already complete", attack_dir)
        return done
    if engine == "nanogcg":
        if len(instructions) != 1:
            raise RefusalLabError("the nanogcg engine attacks one prompt; use --engine native for a prompt set")
        if resume:
            raise RefusalLabError("nanogcg runs cannot be resumed; use --engine native for resumable runs")
    check_loaded_judge(judge, config.judge)
    judge = loaded if judge is None else judge
    if engine != "nanogcg":
        gcg = GCG(cm, instructions, targets, config, direction, judge=judge)  # checks every input before anything is written
    artifacts.prepare_stage_dir(attack_dir, force=force, resume=resume)
    for stale in attack_dir.glob(".*.tmp"):  # the temporary file of a write that a kill interrupted
        stale.unlink(missing_ok=True)
    if engine == "nanogcg":
        result = run_nanogcg(cm, instructions[0], targets[0], config)
    else:
        result = gcg.run(checkpoint=ckpt, resume=resume, progress=progress)

    # what the per-step success (`success`, steps.csv) was checked by
    step_judge = ("none" if engine == "nanogcg" else "target_match" if gcg.check == "target" else
                  judge.name if gcg.check == "judge" else f"target_match+{judge.name}")

    rand_ids = random_suffix_ids(cm, len(result.token_ids), seed=config.seed + 1, allow_non_ascii=config.allow_non_ascii)
    judged = suffix_success(cm, instructions, result.token_ids, eval_tokens, progress=False, judge=judge,
                            placement=config.placement)
    judged_rand = suffix_success(cm, instructions, rand_ids, eval_tokens, progress=False, judge=judge,
                                 placement=config.placement)
    record = dict(
        suffix=result.suffix,
        token_ids=result.token_ids,
        best_loss=result.best_loss,
        best_step=result.best_step,
        losses=result.losses,
        success=result.success,
        step_success_judge=step_judge,
        judge=judge.name,  # the judge of success_flags, success_rate, verdicts and random_success_rate
        success_flags=[bool(x) for x in judged.success],
        success_rate=float(judged.success.mean()),
        verdicts=list(judged.verdict),
        substring_success_rate=float(judged.substring_success.mean()),  # the paper's substring judge
        completions=list(judged.completion),
        steps_run=result.steps_run,
        stopped_early=result.stopped_early,
        elapsed_s=round(result.elapsed_s, 3),
        s_per_step=round(result.elapsed_s / max(1, result.steps_run), 4),
        engine=engine,
        objective=config.objective,
        config=config_dict(config),
        seed=config.seed,
        prompts=instructions,
        targets=list(targets),
        direction=direction_path,
        model=cm.describe(),
        random_suffix=cm.tokenizer.decode(rand_ids),
        random_token_ids=rand_ids,
        random_success_rate=float(judged_rand.success.mean()),
        random_substring_success_rate=float(judged_rand.substring_success.mean()),
    )
    if engine != "nanogcg" and gcg.members:  # the suffix on every model it was optimised on
        record["ensemble"] = {m.cm.name: ensemble_record(m.cm, instructions, result.token_ids, eval_tokens, judge,
                                                         config.placement) for m in gcg.members}
    artifacts.write_csv(attack_dir / "steps.csv", steps_frame(result, step_judge))
    artifacts.write_json(attack_dir / "attack.json", artifacts.run_record(
        model=cm.describe(), engine=engine, config=config_dict(config), judge=judge.name,
        prompts_hash=artifacts.hash_strings(instructions), n_prompts=len(instructions),
        direction=direction_path, elapsed_s=round(result.elapsed_s, 3)))
    artifacts.write_json(attack_dir / "suffix.json", record)
    return record
