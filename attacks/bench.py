"""`refusal bench`: nanoGCG and the native engine side by side, interleaved, on the same model, prompts,
targets, seed and settings; and activation caching against a bare forward pass."""
from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from refusal import artifacts
from refusal.activations import cache_activations
from refusal.config import as_dict, option
from refusal.data import builtin_prompts, instructions
from refusal.engine import forward_batches
from refusal.errors import RefusalLabError
from refusal.models import ChatModel, seed_everything

from .gcg import GCG, GCGConfig, screening_dtype
from .reference import require_nanogcg, run_nanogcg
from .targets import default_target

log = logging.getLogger(__name__)

BENCH_CONFIG = GCGConfig(early_stop=False)  # the attack's defaults, every step run


class PeakMemory:
    """Peak memory while a block runs: CUDA allocations on a GPU, resident set size (sampled) on CPU;
    reported in MiB above the level at the start."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak_mib = 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self.peak = self.base
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self._rss())
            self.peak_mib = (self.peak - self.base) / 2**20
        return False


def _sync(cm: ChatModel) -> None:
    if cm.device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def _first_success_steps(cm: ChatModel, instruction: str, target: str, suffixes: Sequence[str]) -> int | None:
    """First step whose suffix (text) makes the greedy reply begin with the target (teacher-forced)."""
    tgt = cm.tokenizer(target, add_special_tokens=False).input_ids
    for step, s in enumerate(suffixes):
        enc = cm.chat.encode(instruction, cm.tokenizer(s, add_special_tokens=False).input_ids)
        ids = torch.tensor([enc.ids + tgt], device=cm.device)
        logits = cm.model(input_ids=ids).logits[0, -len(tgt) - 1:-1]
        if logits.argmax(-1).tolist() == tgt:
            return step
    return None


def run_native(cm: ChatModel, instruction: str, target: str, config: GCGConfig) -> dict:
    times = []
    last = [time.perf_counter()]

    def tick(info):
        _sync(cm)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    with PeakMemory(cm.device) as mem:
        t0 = time.perf_counter()
        g = GCG(cm, [instruction], [target], config)
        last[0] = time.perf_counter()
        setup = last[0] - t0
        res = g.run(on_step=tick, progress=False)
        total = time.perf_counter() - t0
    first = next((i for i, ok in enumerate(res.success) if ok >= 1.0), None)
    return dict(s_per_step=total / res.steps_run, step_times=times, setup_s=setup, best_loss=min(res.losses),
                losses=res.losses, first_success_step=first,
                time_to_success_s=None if first is None else setup + sum(times[: first + 1]), peak_mib=mem.peak_mib,
                suffix=res.suffix)


def run_reference(cm: ChatModel, instruction: str, target: str, config: GCGConfig) -> dict:
    with PeakMemory(cm.device) as mem:
        t0 = time.perf_counter()
        res = run_nanogcg(cm, instruction, target, config)
        _sync(cm)
        total = time.perf_counter() - t0
    first = _first_success_steps(cm, instruction, target, res.suffixes)
    per = total / res.steps_run
    return dict(s_per_step=per, best_loss=min(res.losses), losses=res.losses, first_success_step=first,
                time_to_success_s=None if first is None else per * (first + 1), peak_mib=mem.peak_mib,
                suffix=res.suffix)


ENGINES = {
    "nanogcg": lambda config: (run_reference, config),
    "native": lambda config: (run_native, config),
    # the native engine without screening: every candidate at the model's precision
    "native_model_precision": lambda config: (run_native, replace(config, screen_dtype="model")),
}


def engine_names(text: str) -> list[str]:
    """The engines of a comma-separated --engines value, checked against ENGINES."""
    names = [e.strip() for e in text.split(",") if e.strip()]
    bad = [e for e in names if e not in ENGINES]
    if bad or not names:
        raise RefusalLabError(f"unknown engine {bad[0] if bad else text!r}; use a comma-separated list of "
                              f"{', '.join(ENGINES)}")
    return names


def bench_attacks(cm: ChatModel, instructions: Sequence[str], steps: int = 10, seed: int = 0,
                  config: GCGConfig | None = None, progress: Callable[[str], None] | None = None,
                  engines: Sequence[str] = ("nanogcg", "native", "native_model_precision")) -> dict:
    """Per prompt, each engine in turn with identical settings (interleaved, so that machine load hits
    them alike). Returns medians over prompts, speed-ups over nanoGCG and the per-prompt numbers."""
    config = replace(config or BENCH_CONFIG, steps=steps, seed=seed, early_stop=False)
    per_prompt = []
    for i, instruction in enumerate(instructions):
        target = default_target(instruction)
        row = {"prompt": instruction, "target": target}
        for name in engines:
            fn, cfg = ENGINES[name](config)
            torch.manual_seed(seed)
            r = fn(cm, instruction, target, cfg)
            row[name] = r
            if progress:
                progress(f"[{i + 1}/{len(instructions)}] {name}: {r['s_per_step']:.2f} s/step, best loss {r['best_loss']:.3f}")
        per_prompt.append(row)

    def med(engine, key):
        vals = [p[engine][key] for p in per_prompt if p[engine][key] is not None]
        return statistics.median(vals) if vals else None

    out = {"engines": list(engines)}
    for e in engines:
        for key in ("s_per_step", "best_loss", "time_to_success_s"):
            out[f"{e}_{key}"] = med(e, key)
        out[f"{e}_successes"] = sum(p[e]["first_success_step"] is not None for p in per_prompt)
        out[f"{e}_peak_mib"] = max(p[e]["peak_mib"] for p in per_prompt)
    if "nanogcg" in engines:
        for e in engines:
            if e != "nanogcg":
                key = "speedup" if e == "native" else f"speedup_{e}"
                out[key] = out["nanogcg_s_per_step"] / out[f"{e}_s_per_step"]
    screen = screening_dtype(config.screen_dtype, cm.dtype, cm.device)
    out["native_screen_dtype"] = str(screen).replace("torch.", "") if screen is not None else "none (model precision)"
    out["settings"] = dict(steps=steps, seed=seed, search_width=config.search_width, topk=config.topk,
                           suffix_len=config.suffix_len, n_replace=config.n_replace, rescore=config.rescore,
                           prompts=len(instructions))
    out["per_prompt"] = per_prompt
    return out


@torch.no_grad()
def bench_activations(cm: ChatModel, instructions: Sequence[str], batch_size: int = 32, repeats: int = 3) -> dict:
    """cache_activations (every layer, the post-instruction positions) against a bare forward pass of the
    decoder over the same batches without hooks or copies (the limit). Best of `repeats`."""
    encs = cm.chat.encode_all(list(instructions))

    def bare():
        for _ in forward_batches(cm, encs, batch_size):
            pass

    def cached():
        cache_activations(cm, encs, batch_size=batch_size, desc=None)

    def best(fn):
        ts = []
        for _ in range(repeats):
            _sync(cm)
            t0 = time.perf_counter()
            fn()
            _sync(cm)
            ts.append(time.perf_counter() - t0)
        return min(ts)

    bare()  # warm up
    t_bare, t_cache = best(bare), best(cached)
    n_tokens = sum(len(e) for e in encs)
    return {"bare_forward_s": t_bare, "cache_activations_s": t_cache, "activation_overhead": t_cache / t_bare,
            "prompts": len(encs), "tokens": n_tokens, "tokens_per_s": n_tokens / t_cache}


@dataclass(frozen=True)
class BenchConfig:
    """`refusal bench`: the native engine against nanoGCG on the same held-out harmful prompts."""

    steps: int = option(10, "GCG steps per prompt and engine")
    prompts: int = option(5, "harmful test prompts, spread over the split")
    seed: int = option(0, "the seed every engine starts from")
    engines: str = option("nanogcg,native,native_model_precision",
                          "comma-separated, run in this order per prompt: nanogcg, native (screening in bfloat16 "
                          "where fast, the best candidates rescored), native_model_precision (no screening)")

    def validate(self) -> None:
        for name in ("steps", "prompts"):
            if int(getattr(self, name)) < 1:
                raise RefusalLabError(f"{name} must be >= 1, got {getattr(self, name)}")
        engine_names(self.engines)


def run_bench(cm: ChatModel, config: BenchConfig, out: str | Path,
              progress: Callable[[str], None] | None = None) -> dict:
    """The bench on a loaded model, written to `out` (JSON): bench_attacks on `config.prompts` harmful test
    prompts spread over the split, and bench_activations on the validation prompts. Returns the record."""
    config.validate()
    engines = engine_names(config.engines)
    if "nanogcg" in engines:
        require_nanogcg()
    prompts = instructions(builtin_prompts("harmful", "test"))[:: max(1, 120 // config.prompts)][: config.prompts]
    seed_everything(config.seed)
    res = bench_attacks(cm, prompts, steps=config.steps, seed=config.seed, progress=progress, engines=engines)
    res.update(bench_activations(cm, instructions(builtin_prompts("harmful", "val"))
                                 + instructions(builtin_prompts("harmless", "val"))))
    res["model"] = cm.describe()
    res["device"] = torch.cuda.get_device_name(cm.device) if cm.device.type == "cuda" else str(cm.device)
    res["threads"] = torch.get_num_threads()
    res["config"] = as_dict(config)
    artifacts.write_json(out, artifacts.run_record(**res))
    return res
