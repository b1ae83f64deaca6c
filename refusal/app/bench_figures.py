"""The bench's figures over prompts, from its rows: medians with bootstrap intervals, success rates, the
split of a step's time, and the speed-ups over nanoGCG (per step, in time to success, in time and tokens
to nanoGCG's success rate), all rows together (tokens) and per machine model (wall times)."""
from __future__ import annotations

import statistics
from typing import Sequence

import torch

def bootstrap_median(xs: Sequence[float], n: int = 2000, seed: int = 0) -> list[float] | None:
    """A 95% percentile bootstrap interval of the median of xs (resampling prompts), or None for < 2 values."""
    if len(xs) < 2:
        return None
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(list(xs), dtype=torch.float64)
    idx = torch.randint(len(x), (n, len(x)), generator=g)
    meds = x[idx].median(dim=1).values  # the lower median, as the interval's ends are order statistics
    return [float(meds.quantile(0.025)), float(meds.quantile(0.975))]


def summarize(rows: Sequence[dict]) -> dict:
    """An engine's figures over prompts: medians (time and tokens to success: a prompt that never succeeded
    counts as its budget's) with bootstrap intervals over prompts, the success rate within the budget, the
    share of the wall time in each part of a step, the peak memory."""
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    cost_t = [r["time_to_success_s"] if r["success"] else r["budget_time_s"] for r in rows]
    cost_k = [r.get("tokens_to_success") if r["success"] else r.get("budget_tokens") for r in rows]
    cost_k = [k for k in cost_k if k is not None]
    split = {}
    for r in rows:
        for k, v in (r.get("profile_s") or {}).items():
            split[k] = split.get(k, 0.0) + v
    total = sum(split.values())
    return dict(
        s_per_step=med([r["s_per_step"] for r in rows]),
        time_to_success_s=med(cost_t), time_to_success_ci=bootstrap_median(cost_t),
        tokens_to_success=med(cost_k), tokens_to_success_ci=bootstrap_median(cost_k),
        success_rate=sum(r["success"] for r in rows) / len(rows),
        successes=sum(r["success"] for r in rows),
        prompts=len(rows),
        best_loss=med([r["best_loss"] for r in rows]),
        steps_run=med([r["steps_run"] for r in rows]),
        time_split={k: round(v / total, 4) for k, v in split.items()} if total > 0 else {},
        peak_mib=max(r["peak_mib"] for r in rows),
    )


def asr_curve(rows: Sequence[dict], key: str) -> list[float]:
    """The costs (`key`: time_to_success_s or tokens_to_success) at which an engine's prompts were broken,
    sorted: the share of prompts broken by cost c is (how many are <= c) / len(rows)."""
    return sorted(r[key] for r in rows if r["success"] and r.get(key) is not None)


def to_asr_speedup(ref: Sequence[dict], ours: Sequence[dict], key: str) -> tuple[float | None, str]:
    """The cost the reference needs to reach its final success rate over the cost ours needs to reach the
    same rate (the k-th cheapest success of each, k the reference's successes), with a sentence; None when
    the reference breaks no prompt or ours breaks fewer."""
    a, b = asr_curve(ref, key), asr_curve(ours, key)
    k = len(a)
    if k == 0:
        return None, "nanoGCG broke no prompt within the budget, so it has no success rate to reach"
    if len(b) < k:
        return None, f"the native engine broke {len(b)} prompts, fewer than nanoGCG's {k}"
    if b[k - 1] <= 0:
        return None, "the native engine's cost to its first success is zero"
    return a[k - 1] / b[k - 1], f"nanoGCG reached {k}/{len(ref)} at {a[k - 1]:.4g}, the native engine at {b[k - 1]:.4g}"


def bench_figures(per_prompt: Sequence[dict], engines: Sequence[str]) -> dict:
    """The bench's figures from its rows: each engine's summary over all rows (tokens hold on any machine)
    and per machine model (wall times hold on one), the speed-ups over nanoGCG, the success curves."""
    rows = {e: [p[e] for p in per_prompt] for e in engines}
    out: dict = {"engines": {e: summarize(rows[e]) for e in engines}}
    machines = sorted({p[e]["machine"]["cpu"] for p in per_prompt for e in engines if "machine" in p[e]})
    # wall times compare only on one machine: per machine model, the prompts whose rows all ran on it
    # (a resumed bench may have run one prompt's engines on two machines: such a prompt is left out there)
    cpu = lambda p: {p[e].get("machine", {}).get("cpu") for e in engines}  # noqa: E731
    machines = sorted({m for p in per_prompt for m in cpu(p) if m is not None})
    out["by_machine"] = {}
    for m in machines:
        on_m = [p for p in per_prompt if cpu(p) == {m}]
        if on_m:
            out["by_machine"][m] = speedups(on_m, engines, {"engines": {e: summarize([p[e] for p in on_m])
                                                                        for e in engines}})
    out["mixed_machine_prompts"] = sum(len(cpu(p)) > 1 for p in per_prompt)
    for e, figures in out["engines"].items():  # the flat keys of earlier bench records, beside
        for k in ("s_per_step", "best_loss", "time_to_success_s", "peak_mib", "successes"):
            out[f"{e}_{k}"] = figures[k]
    out["curves"] = {e: {"time_s": asr_curve(rows[e], "time_to_success_s"),
                         "tokens": asr_curve(rows[e], "tokens_to_success"), "prompts": len(rows[e])} for e in engines}
    return speedups(per_prompt, engines, out)


def speedups(per_prompt: Sequence[dict], engines: Sequence[str], out: dict) -> dict:
    """Add to `out` (holding each engine's summary under `engines`) each native engine's speed-ups over
    nanoGCG on these prompts: s/step, median time to success, time and tokens to nanoGCG's success rate."""
    if "nanogcg" not in engines:
        return out
    rows = {e: [p[e] for p in per_prompt] for e in engines}
    ref = out["engines"]["nanogcg"]
    notes = {}
    for e in engines:
        if e == "nanogcg":
            continue
        sfx = "" if e == "native" else f"_{e}"
        out[f"speedup{sfx}"] = ref["s_per_step"] / out["engines"][e]["s_per_step"]
        out[f"time_to_success_speedup{sfx}"] = ref["time_to_success_s"] / out["engines"][e]["time_to_success_s"]
        for k, name in (("time_to_success_s", "time"), ("tokens_to_success", "tokens")):
            out[f"{name}_to_asr_speedup{sfx}"], notes[f"{name}_to_asr_speedup{sfx}"] = \
                to_asr_speedup(rows["nanogcg"], rows[e], k)
    out["speedup_notes"] = notes
    return out


# universal attacks: the native engine against the GCG paper's algorithm run by the same engine (nanoGCG
# attacks one prompt at a time); the paper's: one coordinate per step, the lowest loss chosen, every
# candidate at the model's precision
