"""Gathering a sweep's task results into OUT/summary.csv (a row per task), OUT/transfer.csv (a suffix's
model x target model) and OUT/report.html."""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from analysis.report import write_report
from refusal import artifacts
from refusal.judges import JudgeConfig
from refusal.app.plots import plot_sweep_success, plot_transfer
from refusal.app.sweep.config import SweepConfig
from refusal.app.sweep.grid import Task

log = logging.getLogger(__name__)

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
               seed=gcg.get("seed"), judge=JudgeConfig.of(gcg["judge"]).name if gcg.get("judge") else None)
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
            by, out / "success_by_model.png", config.judge.name)
    if len(transfer):
        plots["Transfer: attack success of a model's suffixes on each model"] = plot_transfer(
            transfer, out / "transfer.png", config.judge.name)
    failed = summary[summary.status == "failed"][["task", "error"]]
    n_ok = len(ok)
    sentences = [f"{len(summary)} tasks: {n_ok} done ({int((summary.status == 'reused').sum())} reused from an earlier "
                 f"run), {len(failed)} failed."]
    for r in by.itertuples(index=False) if len(by) else []:
        no = getattr(r, "no_suffix", float("nan"))
        drop = getattr(r, "cosine_drop", float("nan"))
        sentences.append(f"On {r.model}, {r.suffixes} suffix(es) of the {r.objective} objective succeed on "
                         f"{r.attack_success:.1%} of the unseen prompts on average by the {config.judge.name} judge"
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
             "judge": config.judge.name}
    _, report = write_report(out, "refusal-lab sweep", sentences, plots, {k: v for k, v in tables.items() if len(v)},
                             facts, max_rows=10_000)
    return {"summary": summary, "transfer": transfer, "by_model": by, "report": str(report), "sentences": sentences}
