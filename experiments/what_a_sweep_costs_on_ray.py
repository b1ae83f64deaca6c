"""What does Ray cost per sweep task against calling the library directly, and how long does a sweep take
on 2 cores against the sum of its tasks?

Found: (2-core AMD EPYC with AVX-512 BF16; docs/sweeps.md#figures) Ray costs 0.097 s per task over a direct
library call, plus 4.6 s per sweep for its workers' start (ray.init: 2.8 s); on the organism, 9 tasks with one
core each take 100.4 s on Ray against 176.6 s summed (0.57) and 121.8 s on the sequential runner, with the
same suffixes. Two parts:

    python experiments/what_a_sweep_costs_on_ray.py overhead [--seeds 4 16]
    python experiments/what_a_sweep_costs_on_ray.py parallel [--model organism] [--seeds 4] [--steps 4]

`overhead`: a tiny random Llama with the SmolLM2 tokenizer (tasks of well under a second, so the fixed costs
show): one model, 2 harmful training prompts, attacks of 2 steps and their evaluations (2 prompts, 4 tokens),
the substring judge, at two sweep sizes (`--seeds` attacks). The same tasks three ways: the library called
directly in this process (each task's run_task, one after another, the model loaded once), `run_sweep` on the
sequential runner, and `run_sweep` on Ray with each task taking both cores (one task at a time, so only Ray's
cost differs); ray.init is timed apart. Ray's cost over the direct calls = a start (its worker's process, its
imports and model load) + a cost per task: the intercept and the slope between the two sizes.

`parallel`: the organism (trained weights), one model, `--seeds` universal attacks on 2 harmful training prompts
(`--steps` steps, width 32, 12 tokens, all steps run) and their evaluations on 8 unseen prompts (24 tokens),
the substring judge: the sweep's wall time on Ray with one core per task (two at a time on 2 cores) against the
sum of its tasks' own wall times, and the sequential runner (one task at a time on both cores).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from refusal.models import smollm2_path
from refusal.app.sweep import SweepConfig, expand, run_sweep, run_task


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def tiny_model(where: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(where)
    tok.save_pretrained(where)
    return where


def overhead(args) -> dict:
    import ray

    work = Path(tempfile.mkdtemp(prefix="sweep-overhead-"))
    model = tiny_model(work / "tiny-llama")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, object_store_memory=256 * 2 ** 20)
    init = time.perf_counter() - t0
    rows = []
    for seeds in args.seeds:
        cfg = SweepConfig(models=(str(model),), prompts=("harmful:train",), max_prompts=2, steps=(2,),
                          search_width=(8,), suffix_len=(4,), seeds=tuple(range(seeds)), topk=8, eval_max_prompts=2,
                          eval_tokens=4, judge="substring", early_stop=False, cpus_per_task=os.cpu_count() or 1)
        tasks = expand(cfg)
        tag = f"n{seeds}"
        run_sweep(cfg, work / f"warm-{tag}", executor="local", progress=False)  # imports, judge, first model load
        direct_dir = work / f"direct-{tag}"
        (direct_dir / "prompts").mkdir(parents=True)
        (direct_dir / "prompts" / "eval.jsonl").write_text((work / f"warm-{tag}" / "prompts" / "eval.jsonl").read_text())
        t0 = time.perf_counter()
        for t in tasks:
            run_task(t.spec, str(direct_dir))
        direct = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_sweep(cfg, work / f"local-{tag}", executor="local", progress=False)
        local = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_sweep(cfg, work / f"ray-{tag}", executor="ray", progress=False)
        on_ray = time.perf_counter() - t0
        rows.append(dict(tasks=len(tasks), direct_s=round(direct, 3), local_sweep_s=round(local, 3),
                         ray_sweep_s=round(on_ray, 3), ray_over_direct_s=round(on_ray - direct, 3)))
    ray.shutdown()
    (a, b) = rows[0], rows[-1]
    per_task = (b["ray_over_direct_s"] - a["ray_over_direct_s"]) / (b["tasks"] - a["tasks"])
    return dict(part="overhead", ray_init_s=round(init, 3), runs=rows,
                # Ray's cost = start + per_task * tasks: the slope and intercept between the two sizes
                ray_per_task_s=round(per_task, 4), ray_start_s=round(a["ray_over_direct_s"] - per_task * a["tasks"], 3))


def parallel(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="sweep-parallel-"))
    cfg = SweepConfig(models=(args.model,), prompts=("harmful:train",), max_prompts=2, steps=(args.steps,),
                      search_width=(32,), suffix_len=(12,), seeds=tuple(range(args.seeds)), topk=32,
                      eval_max_prompts=8, eval_tokens=24, judge="substring", early_stop=False, cpus_per_task=1)
    out = {"part": "parallel", "model": args.model, "tasks": len(expand(cfg))}
    for name, executor in (("ray", "ray"), ("local", "local")):
        t0 = time.perf_counter()
        res = run_sweep(cfg, work / name, executor=executor, progress=False)
        wall = time.perf_counter() - t0
        s = res["summary"]
        out[name] = dict(wall_s=round(wall, 1), task_s_sum=res["task_s_sum"],
                         load_s_sum=round(float(s.load_s.sum()), 1), wall_over_sum=round(wall / res["task_s_sum"], 3),
                         suffixes=sorted(s[s.kind == "attack"].suffix.tolist()))
    out["same_suffixes"] = out["ray"]["suffixes"] == out["local"]["suffixes"]
    out["ray_over_local"] = round(out["ray"]["wall_s"] / out["local"]["wall_s"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="part", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--seeds", type=int, nargs=2, default=[4, 16], help="two sweep sizes (attacks)")
    q = sub.add_parser("parallel")
    q.add_argument("--model", default="organism")
    q.add_argument("--seeds", type=int, default=4)
    q.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=None, help="also write the figures here (JSON)")
    args = p.parse_args()
    res = overhead(args) if args.part == "overhead" else parallel(args)
    res.update(cpu=cpu_name(), cores=os.cpu_count(), torch=torch.__version__)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
