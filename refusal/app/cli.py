"""The `refusal` command: a thin layer over the library. Each command turns its options into the stage's
config dataclass (whose fields hold the defaults and their meaning, refusal.config), loads the model,
calls the stage function a script would call, and prints what it returned.

User errors print one line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from attacks.gcg import GCGConfig
from refusal import artifacts
from refusal.config import check_fields, field_info
from refusal.data import resolve_prompts
from refusal.ablation import CHECK_PROMPTS, load_ablation, write_abliterated
from refusal.directions import DirectionConfig, load_direction
from refusal.methods import find_direction
from refusal.errors import RefusalLabError
from refusal.judges import JudgeConfig, judge_file
from refusal.models import ChatModel, seed_everything
from refusal.rdo import RDOConfig
from refusal.recipe import OrganismConfig
from refusal.registry import load_model
from refusal.app.abliterate import AbliterateConfig, check_abliterate, run_abliterate
from refusal.app.analyze import AnalysisConfig, analyze_jailbreaks, analyze_suffix, check_analysis, check_jailbreaks
from refusal.app.attack import check_attack, run_attack
from refusal.app.bench import BENCH_CONFIG, BenchConfig, check_bench_out, rows_path, run_bench
from refusal.app.evaluation import EvalConfig, check_eval, run_eval
from refusal.app.options import (SWEEP_OPTIONS, AppendTuple, Parser, config_from, judge_arg, judge_config_from,
                                 model_args, model_config, nested_config, nested_opts, opt, positive, seconds_or_none,
                                 sweep_kw)
from refusal.app.pipeline import JOB_ATTACK, JobConfig, check_job, main_job
from refusal.app.reproduce import ReproduceConfig, reproduce_paper, to_markdown
from refusal.app.sweep import EXECUTORS, SweepConfig, load_sweep_config, run_sweep, sweep_config

log = logging.getLogger("refusal")


def _load(args):
    return load_model(model_config(args))


# ----------------------------------------------------------------------------- commands


def cmd_direction(args) -> int:
    out = Path(args.out) / "direction"
    artifacts.check_out(out, force=args.force)  # fail before the slow part
    config = config_from(DirectionConfig, args, rdo=nested_config(RDOConfig, args, "rdo"))
    config.validate()
    seed_everything(config.seed)
    cm = _load(args)
    direction = find_direction(cm, config, out)
    s = direction.meta["scores"]
    took = f"{sum(direction.meta['timings_s'].values()):.0f}s"
    if config.method == "harmfulness":
        print(f"harmfulness direction: layer {direction.layer}, the instruction's last token (position "
              f"{direction.position}); validation accuracy {s['val_accuracy']:.3f}, d' {s['d_prime']:.2f}, "
              f"cosine with the refusal candidate there {s['cos_with_refusal_candidate']:.3f}; {took}")
    else:
        print(f"direction: layer {direction.layer}, position {direction.position} "
              f"(bypass {s['bypass']:.3f}, induce {s['induce']:.3f}, kl {s['kl']:.4f}); {took}")
    if config.method == "subspace":
        sub = direction.meta["subspace_scores"]
        print(f"subspace: k = {direction.k} ({direction.meta['construction']}), bypass {sub['bypass']:.3f}, "
              f"kl {sub['kl']:.4f}; every construction in {out}/subspaces.csv")
    if config.method == "rdo":
        r = direction.meta["rdo_scores"]
        cone = (f"; {r['cone_samples_mediating']}/{r['cone_samples']} sampled cone directions mediate refusal "
                f"(bypass < 0 < induce)" if direction.k > 1 else "")
        print(f"rdo: k = {direction.k}, {direction.meta['training_s_per_step']:.1f} s/step; no intervention: harmful "
              f"{r['none']['bypass']:.3f}, harmless {r['none']['induce']:.3f}; the difference in means r*: bypass "
              f"{r['r*']['bypass']:.3f}, induce {r['r*']['induce']:.3f}, kl {r['r*']['kl']:.4f}, training loss "
              f"{r['objective']['r*']['loss']:.3f} (b0's {r['objective']['b0']['loss']:.3f}); RepInd with r* "
              f"{r['repind_with_r*']:.2e}{cone}; every score in {out}/rdo_scores.csv")
    print(f"wrote {out}/direction.safetensors, direction.json, candidates.csv")
    return 0


def cmd_orthogonalize(args) -> int:
    out = Path(args.out)
    artifacts.check_out(out, force=args.force)
    direction = load_direction(args.direction)  # a bad direction file fails before the model loads
    ablation = load_ablation(args.direction)  # the paper's, unless the folder records another
    _, rec = write_abliterated(_load(args), direction, out, ablation, args.direction)
    how = "exact" if rec["exact"] else "not exact (a norm follows each sublayer)" if rec["post_norm_family"] \
        else "norm-preserving (a weight edit only)"
    gap = rec["max_logit_gap_from_hooks"]
    print(f"{rec['edit']} ({ablation.summary()}): {how}; on {2 * CHECK_PROMPTS} test prompts the largest logit gap "
          f"from the hooks is {'n/a' if gap is None else f'{gap:.2g}'}, the largest |cos| left along the direction "
          f"in a write at weight 1 {rec['max_cosine_left_at_weight_1'] or 0:.2g}")
    print(f"wrote the edited model to {out} (load it with --model {out})")
    return 0


def cmd_eval(args) -> int:
    out = Path(args.out)
    artifacts.check_out(out, force=args.force)
    config = config_from(EvalConfig, args, judge=judge_config_from(args))
    check_eval(config)  # bad inputs fail before the model loads
    rec = run_eval(_load(args), config, out)
    rates = rec["attack_success_rates"]
    by = f"substring {rates['substring']:.1%}" + (f", {rec['judge']} {rates[rec['judge']]:.1%}"
                                                  if rec["judge"] != "substring" else "")
    print(f"refusal rate: {rec['refusal_rate']:.1%} ({rec['n_refused']}/{rec['n']}), mean refusal score "
          f"{rec['mean_refusal_score']:.3f}, attack success by judge: {by} [{rec['intervention']}]"
          + (" (a suffix made on another model: transfer)" if rec["transfer"] else ""))
    print(f"wrote {out}")
    return 0


def cmd_organism_build(args) -> int:
    from refusal.organism import build_organism  # the training code, imported only to build

    path = build_organism(OrganismConfig(seed=args.seed), force=args.force)
    rec = artifacts.read_json(path / "organism.json")
    print(f"organism built in {rec['wall_time_s']:.0f}s: refuses {rec['harmful_test_refusal_rate']:.1%} of harmful "
          f"and {rec['harmless_test_refusal_rate']:.1%} of harmless test instructions")
    print(f"wrote {path} (use --model organism)")
    return 0


def cmd_attack(args) -> int:
    if (args.prompt is None) == (args.prompts is None):
        raise RefusalLabError("give exactly one of --prompt TEXT or --prompts FILE")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise RefusalLabError("--prompt is empty")
        instructions, targets = [args.prompt.strip()], [args.target] if args.target else None
    else:
        if args.target:
            raise RefusalLabError("--target goes with --prompt; a prompt file gives targets in a 'target' column")
        prompts = resolve_prompts(args.prompts)[: args.max_prompts]
        instructions = [p.instruction for p in prompts]
        targets = [p.target for p in prompts] if all(p.target for p in prompts) else None
    config = config_from(GCGConfig, args, judge=judge_config_from(args))  # the judge with the model's device, dtype
    direction = load_direction(args.direction) if args.direction else None
    check_attack(config, args.engine, direction, args.resume, args.force)
    out = Path(args.out)
    artifacts.check_out(out / "attack", force=args.force, resume=args.resume,
                        fix="pass --resume to continue it, --force to overwrite it, or choose another --out")
    cm = _load(args)
    seed_everything(config.seed)
    try:
        rec = run_attack(cm, instructions, targets, config, out, engine=args.engine, direction=direction,
                         direction_path=args.direction, resume=args.resume, force=args.force,
                         checkpoint_name=args.checkpoint)
    except KeyboardInterrupt:
        print("refusal: interrupted; the last completed step is saved: continue with the same command and --resume",
              file=sys.stderr)
        return _interrupt_status()
    print(f"suffix: {rec['suffix']!r}")
    print(f"best loss {rec['best_loss']:.4f} at step {rec['best_step']} of {rec['steps_run']} "
          f"({rec['elapsed_s']:.0f}s, {rec['s_per_step']:.2f}s/step)")
    print(f"attack success on the {len(instructions)} attacked prompt(s) by the {rec.get('judge', 'substring')} judge: "
          f"{rec['success_rate']:.1%}; random suffix of the same length: {rec['random_success_rate']:.1%}")
    for name, r in rec.get("ensemble", {}).items():
        print(f"  on the ensemble's {name}: {r['success_rate']:.1%}")
    print(f"wrote {out / 'attack' / 'suffix.json'}")
    return 0


def cmd_analyze(args) -> int:
    out = Path(args.out) / "analysis"
    artifacts.check_out(out, force=args.force)
    config = config_from(AnalysisConfig, args, judge=judge_config_from(args))
    if (args.suffix is None) == (args.jailbreaks is None):
        raise RefusalLabError("give --suffix (a suffix against a random one) or --jailbreaks FILE.jsonl, one of them")
    # bad files and a bad judge fail before the model loads
    if args.jailbreaks is not None:
        check_jailbreaks(config, args.jailbreaks)
    else:
        check_analysis(config, args.suffix)
    direction = load_direction(args.direction)
    if args.harmfulness and args.jailbreaks is not None:
        raise RefusalLabError("--harmfulness goes with --suffix (the four conditions), not with --jailbreaks")
    if args.jailbreaks is not None:
        res = analyze_jailbreaks(_load(args), direction, args.jailbreaks, config, out)
        sentences = res["sentences"]
    else:
        harmfulness = load_direction(args.harmfulness) if args.harmfulness else None
        res = analyze_suffix(_load(args), direction, args.suffix, config, out, harmfulness=harmfulness)
        sentences = res["numbers"]["sentences"]
    for s in sentences:
        print("- " + s)
    print(f"report: {res['report_html']} (and {res['report_md'].name})")
    return 0


def cmd_bench(args) -> int:
    out = Path(args.out)
    check_bench_out(out, resume=args.resume, force=args.force)
    own = {f.name for f in dataclasses.fields(BenchConfig)}  # steps, seed, max_time_s: the bench's, not the attack's
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(GCGConfig)
             if hasattr(args, f.name) and f.name not in own}
    config = config_from(BenchConfig, args, attack=dataclasses.replace(BENCH_CONFIG, **{**given, "judge": judge_config_from(args)}))
    config.validate()
    res = run_bench(_load(args), config, out, progress=lambda m: print(m, flush=True), resume=args.resume)
    keys = [k for k in res if k.startswith(("speedup", "time_to_success_speedup", "time_to_asr_speedup",
                                            "tokens_to_asr_speedup"))]
    keys += ["native_screen_dtype", "bare_forward_s", "cache_activations_s", "activation_overhead"]
    rounded = lambda v: round(v, 4) if isinstance(v, float) else v  # noqa: E731
    print(json.dumps({"engines": {e: {k: rounded(v) for k, v in f.items()} for e, f in res["engines"].items()},
                      **{k: rounded(res[k]) for k in keys}}, indent=1))
    for k, note in res.get("speedup_notes", {}).items():
        if res.get(k) is None:
            print(f"{k}: none ({note})")
    print(f"wrote {out}, {rows_path(out)}, {res['plot']} and {res['success_plot']}")
    return 0


def cmd_run(args) -> int:
    judge = judge_config_from(args)
    config = JobConfig.quick(seed=args.seed, batch_size=args.batch_size, judge=judge, resume=args.resume,
                             force=args.force) if args.quick else \
        JobConfig(seed=args.seed, batch_size=args.batch_size, judge=judge, resume=args.resume, force=args.force)
    config = replace(config, attack=replace(config.attack, max_time_s=args.attack_max_time_s))
    check_fields(config.attack, prefix="attack_")  # a bad --attack-* option named as given
    check_job(config, args.out)  # a bad config, run folder or judge fails before the model loads
    cm = _load(args)
    rec = main_job(cm, config, args.out, progress=lambda m: print(m, flush=True))
    print()
    for s in rec["sentences"]:
        print("- " + s)
    print(f"\nreport: {rec['report']}")
    print(f"(main job done in {rec['wall_time_s']:.0f}s: {rec['timings_s']})")
    return 0


def cmd_sweep(args) -> int:
    given = {name: getattr(args, name) for _, name, _ in SWEEP_OPTIONS if getattr(args, name) is not None}
    config = load_sweep_config(args.config, given) if args.config else sweep_config(given, where="the command line", options=True)
    if not config.models:
        raise RefusalLabError("no model to sweep: give --model M (repeatable) or `models` in the --config file")
    res = run_sweep(config, args.out, executor=args.executor, address=args.address, resume=args.resume,
                    force=args.force, say=lambda m: print(m, flush=True))
    print()
    for s in res["sentences"]:
        print("- " + s)
    if len(res["transfer"]):
        print("\ntransfer (attack success on the unseen prompts; rows: the suffix's model, columns: evaluated on):")
        print(res["transfer"].to_string(float_format=lambda v: f"{v:.1%}"))
    for tid, err in res["failed"].items():
        print(f"failed: {tid}: {err}")
    out = Path(args.out)
    print(f"\n{res['n_tasks']} tasks on {res['executor']} in {res['wall_s']:.0f}s (the tasks' own time: "
          f"{res['task_s_sum']:.0f}s); wrote {out / 'summary.csv'}, {out / 'transfer.csv'}, {res['report']}")
    return 1 if res["failed"] else 0


def _reference_model(args, cm: ChatModel) -> ChatModel:
    """The model whose greedy replies reply_ce is measured on: --reference-model, else the base SmolLM2 for
    the organism, else the model itself (`cm`, unmodified)."""
    spec = args.reference_model or ("smollm2" if args.model == "organism" else args.model)
    return cm if spec == args.model else load_model(replace(model_config(args), model=spec))


def cmd_abliterate(args) -> int:
    config = config_from(AbliterateConfig, args, judge=judge_config_from(args),
                         direction=DirectionConfig(batch_size=args.batch_size))
    check_abliterate(config, args.out, args.resume, args.force, args.direction)  # before the model loads
    cm = _load(args)
    reference = _reference_model(args, cm) if config.test_table else None
    try:
        rec = run_abliterate(cm, config, args.out, direction=args.direction, resume=args.resume, force=args.force,
                             say=lambda m: print(m, flush=True), reference=reference, model=model_config(args))
    except KeyboardInterrupt:
        print("refusal: interrupted; the finished trials are kept: continue with the same command and --resume",
              file=sys.stderr)
        return _interrupt_status()
    c = rec["chosen"]
    print(f"front ({len(rec['front'])} of {rec['n_trials']} trials): "
          + ", ".join(f"{p['refusal']:.1%} at KL {p['kl']:.3f}" for p in rec["front"]))
    print(f"chosen: trial {c['trial']}: refusal {c['refusal']:.1%} of the validation prompts at KL {c['kl']:.3f} "
          f"({c['summary']})")
    if rec["table"]:
        print(to_markdown(pd.DataFrame(rec["table"])))
    out = Path(args.out)
    print(f"wrote {out / 'trials.csv'}, {out / 'front.csv'}, {out / 'front.png'}, {out / 'direction'} (--ablate "
          f"{out}){', ' + str(out / 'model') if config.save_model else ''}"
          f"{', ' + str(out / 'adapter') if (out / 'adapter').is_dir() else ''}")
    return 0


def cmd_reproduce(args) -> int:
    config = ReproduceConfig(max_new_tokens=args.max_new_tokens, reference_tokens=args.reference_tokens,
                             direction=DirectionConfig(seed=args.seed, batch_size=args.batch_size, method=args.method,
                                                       k=args.k, construction=args.construction,
                                                       rdo=nested_config(RDOConfig, args, "rdo")),
                             force=args.force)
    config.validate()
    torch.manual_seed(args.seed)
    cm = _load(args)
    # the reference replies: by default the base model for the organism, else the model itself, unmodified
    reference = _reference_model(args, cm)
    with torch.no_grad():
        rec = reproduce_paper(cm, config, args.out, reference=reference)
    print(f"direction: layer {rec['direction']['layer']}, position {rec['direction']['position']}")
    print(rec["table_md"])
    print(rec["pca_summary"])
    print(f"wrote {rec['out']}")
    return 0


def cmd_judge(args) -> int:
    config = judge_config_from(args, batch_size=args.batch_size)
    rec = judge_file(args.file, config, out=args.out, force=args.force)
    r = rec["rates"]
    print(f"{rec['judge']} judge on {rec['n']} replies: complies {r['complies']:.1%}, refuses {r['refuses']:.1%}, "
          f"neither {r['neither']:.1%}; attack success {rec['attack_success_rate']:.1%}")
    print(f"wrote {rec['out']}")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="refusal", description="Refusal directions, adversarial suffixes, and how suffixes beat refusal.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", parser_class=Parser, required=True)

    d = sub.add_parser("direction", help="find the refusal direction (difference in means + selection), or "
                                          "--method harmfulness")
    model_args(d, batch_size=field_info(DirectionConfig, "batch_size")[0])
    for name in ("method", "harmful", "harmless", "n_train", "n_val", "seed", "kl_threshold"):
        opt(d, DirectionConfig, name)
    opt(d, DirectionConfig, "k", type=int)
    opt(d, DirectionConfig, "construction")
    nested_opts(d, RDOConfig, "rdo")
    opt(d, DirectionConfig, "layer", type=int)
    opt(d, DirectionConfig, "position", type=int)
    opt(d, DirectionConfig, "score_all")
    d.add_argument("--out", required=True, help="run folder; writes OUT/direction/")
    d.add_argument("--force", action="store_true", help="overwrite an existing direction")
    d.set_defaults(fn=cmd_direction)

    o = sub.add_parser("orthogonalize", help="bake the direction's ablation (the paper's, or the one its folder's "
                                             "ablation.json records) into the weights; save a HF folder")
    model_args(o, batch_size=None)
    o.add_argument("--direction", required=True, help="run folder or its direction/ subfolder")
    o.add_argument("--out", required=True, help="folder for the edited model")
    o.add_argument("--force", action="store_true")
    o.set_defaults(fn=cmd_orthogonalize)

    e = sub.add_parser("eval", help="generate, judge refusal, score; optional ablation/addition/suffix")
    model_args(e, batch_size=field_info(EvalConfig, "batch_size")[0])
    opt(e, EvalConfig, "prompts", required=True, default=None)
    g = e.add_mutually_exclusive_group()
    opt(g, EvalConfig, "ablate", metavar="DIR")
    opt(g, EvalConfig, "actadd", metavar="DIR")
    for name in ("coeff", "suffix", "max_new_tokens"):
        opt(e, EvalConfig, name)
    judge_arg(e)
    e.add_argument("--out", required=True, help="results .jsonl")
    e.add_argument("--force", action="store_true")
    e.set_defaults(fn=cmd_eval)

    org = sub.add_parser("organism", help="the model organism: a safety-tuned SmolLM2")
    osub = org.add_subparsers(dest="organism_command", parser_class=Parser, required=True)
    ob = osub.add_parser("build", help="fine-tune SmolLM2 to refuse (deterministic, CPU, a few minutes)")
    opt(ob, OrganismConfig, "seed")
    ob.add_argument("--force", action="store_true", help="rebuild even if it is cached")
    ob.set_defaults(fn=cmd_organism_build)

    a = sub.add_parser("attack", help="optimize an adversarial suffix (GCG) for one prompt or a prompt set")
    model_args(a)
    opt(a, GCGConfig, "batch_size", type=int)
    a.add_argument("--prompt", help="one instruction to attack")
    a.add_argument("--target", help="target reply opening for --prompt (default: 'Sure, here is ...')")
    a.add_argument("--prompts", help="prompt file or built-in set (e.g. harmful:train): one universal suffix")
    a.add_argument("--max-prompts", type=positive("--max-prompts"), default=None, help="use the first N prompts")
    a.add_argument("--engine", choices=("native", "nanogcg"), default="native",
                   help="native (refusal-lab's engine) or nanogcg (nanoGCG 0.3.0, the target objective only)")
    opt(a, GCGConfig, "objective")
    a.add_argument("--direction", help="direction folder (needed by --objective direction|mixed)")
    for name in ("target_weight", "direction_weight", "attention_weight", "attention_heads", "steps", "search_width",
                 "topk", "n_replace", "suffix_len", "success_rate", "patience"):
        opt(a, GCGConfig, name)
    opt(a, GCGConfig, "progressive", "--all-prompts", help="universal: optimize on all prompts from the start")
    opt(a, GCGConfig, "early_stop", "--no-early-stop", help="run all steps even after success")
    judge_arg(a, "success (early stopping, adding prompts, the success rates)")
    for name in ("allow_non_ascii", "screen_dtype", "rescore", "screen_prompts", "multi_coordinate", "seed"):
        opt(a, GCGConfig, name)
    for name in ("draft_model", "probe_r", "probe_sampling_factor"):
        opt(a, GCGConfig, name)
    opt(a, GCGConfig, "ensemble", action=AppendTuple, type=str, metavar="MODEL",
        help=field_info(GCGConfig, "ensemble")[1] + " (repeatable)")
    opt(a, GCGConfig, "target_loss")
    opt(a, GCGConfig, "max_time_s", type=float)
    opt(a, GCGConfig, "prefer_target_match", "--no-prefer-target-match",
         help="always choose the lowest-loss candidate, also over one whose reply begins with the target")
    opt(a, GCGConfig, "success_check")
    opt(a, GCGConfig, "check_matched")
    opt(a, GCGConfig, "momentum")
    opt(a, GCGConfig, "message")
    opt(a, GCGConfig, "system")
    a.add_argument("--resume", action="store_true", help="continue a run from its checkpoint")
    a.add_argument("--checkpoint", default=None, help="checkpoint file name in OUT/attack (must contain 'checkpoint')")
    a.add_argument("--out", required=True, help="run folder; writes OUT/attack/")
    a.add_argument("--force", action="store_true", help="overwrite an existing attack")
    a.set_defaults(fn=cmd_attack)

    an = sub.add_parser("analyze", help="how a suffix (or any jailbreak) moves the refusal direction and the "
                                        "refusal heads; report")
    model_args(an, batch_size=field_info(AnalysisConfig, "batch_size")[0])
    an.add_argument("--direction", required=True, help="direction folder")
    an.add_argument("--suffix", help="suffix.json (or its run folder), a text file, or the suffix text")
    an.add_argument("--harmfulness", metavar="DIR", help="with --suffix: also project every condition onto this "
                                                         "direction folder (refusal direction --method harmfulness) "
                                                         "at its position, by layer")
    an.add_argument("--jailbreaks", help="instead of --suffix: a JSON Lines file of jailbreaks, each row a name, a "
                                         "prompt, and an {optim_str} marker with adversarial, a span [start, end], or "
                                         "neither; goal optional (refusal.jailbreaks)")
    opt(an, AnalysisConfig, "harmful", "--prompts")
    opt(an, AnalysisConfig, "harmless")
    opt(an, AnalysisConfig, "max_prompts", type=int)
    opt(an, AnalysisConfig, "top_k")
    opt(an, AnalysisConfig, "eval_tokens", type=int)
    judge_arg(an)
    opt(an, AnalysisConfig, "seed")
    an.add_argument("--out", required=True, help="run folder; writes OUT/analysis/")
    an.add_argument("--force", action="store_true")
    an.set_defaults(fn=cmd_analyze)

    b = sub.add_parser("bench", help="time to jailbreak: the native engine vs nanoGCG on held-out prompts, and "
                                     "activation caching vs a bare forward")
    model_args(b, default="organism")
    opt(b, BenchConfig, "nanogcg_early_stop", "--nanogcg-early-stop")
    for name in ("steps", "max_time_s", "target_words", "prompts", "prompts_from", "seed", "engines", "rerun", "universal",
                 "universal_rate", "universal_steps", "direction"):
        opt(b, BenchConfig, name, **({"type": int} if name in ("universal", "target_words") else {}))
    for name in ("search_width", "topk", "suffix_len", "n_replace", "rescore", "multi_coordinate", "check_matched",
                 "momentum", "judge_tokens", "draft_model", "probe_r", "probe_sampling_factor"):
        opt(b, GCGConfig, name, default=getattr(BENCH_CONFIG, name))
    opt(b, GCGConfig, "target_loss", default=BENCH_CONFIG.target_loss)
    judge_arg(b, "success (the native engine's target+judge check, nanoGCG's steps checked alike)")
    b.add_argument("--out", default="bench.json")
    b.add_argument("--resume", action="store_true", help="continue the bench at --out: run only the (prompt, engine) "
                                                          "rows its rows file lacks (a larger --prompts adds prompts)")
    b.add_argument("--force", action="store_true")
    b.set_defaults(fn=cmd_bench)

    r = sub.add_parser("run", help="the main job, end to end, on one model")
    model_args(r, default="organism", batch_size=field_info(JobConfig, "batch_size")[0])
    r.add_argument("--quick", action="store_true", help="smaller sets, for a fast look (JobConfig.quick())")
    opt(r, JobConfig, "seed")
    opt(r, GCGConfig, "max_time_s", "--attack-max-time-s", dest="attack_max_time_s",
        default=JOB_ATTACK["max_time_s"], type=seconds_or_none,
        help="the universal attack's time budget in seconds ('none': its step budget alone); it stops once a step "
             f"ends past it (default: {JOB_ATTACK['max_time_s']:g})")
    r.add_argument("--out", default="runs/main")
    opt(r, JobConfig, "resume")
    opt(r, JobConfig, "force")
    judge_arg(r, "attack success (the attack's success checks, the evaluation, the report)")
    r.set_defaults(fn=cmd_run)

    sw = sub.add_parser("sweep", help="many attacks (models x prompt sets x settings x seeds) as Ray tasks, with "
                                      "transfer evaluations, gathered into summary.csv and report.html")
    sw.add_argument("--config", help="a TOML file of SweepConfig's keys (options given here override it)")
    for opt_flag, name, kw in SWEEP_OPTIONS:
        default, help_text = field_info(SweepConfig, name)
        kw = sweep_kw(name, kw)
        if opt_flag in ("--per-prompt", "--universal"):
            help_text = "one attack per prompt (single behaviours); with --universal, both" if opt_flag == "--per-prompt" \
                else "one universal suffix per prompt set (the default; with --per-prompt, both)"
            default = None
        default = getattr(default, "name", default)  # the judge: its name
        shown = f" (default: {list(default) if isinstance(default, tuple) else default})" if default not in (None, ()) else ""
        sw.add_argument(opt_flag, dest=name, default=None, help=help_text + ("; repeatable" if kw.get("action") == "append"
                                                                         else "") + shown, **kw)
    sw.add_argument("--executor", choices=EXECUTORS, default="auto",
                    help="ray (Ray tasks), local (one after another in this process), auto (Ray where installed)")
    sw.add_argument("--address", default=None, help="join this Ray cluster (default: start an embedded local Ray)")
    sw.add_argument("--resume", action="store_true", help="reuse the finished tasks in OUT and run the rest")
    sw.add_argument("--force", action="store_true", help="delete OUT and start over")
    sw.add_argument("--out", required=True, help="the sweep's folder: tasks/, summary.csv, transfer.csv, report.html")
    sw.set_defaults(fn=cmd_sweep)

    rp = sub.add_parser("reproduce", help="the paper's table: refusal and capability under each intervention, and "
                                          "the PCA of harmful vs harmless activations")
    model_args(rp, default="organism", batch_size=field_info(DirectionConfig, "batch_size")[0])
    opt(rp, ReproduceConfig, "max_new_tokens")
    opt(rp, ReproduceConfig, "reference_tokens")
    rp.add_argument("--reference-model", default=None,
                    help="the model whose greedy replies to the harmless test prompts reply_ce is measured on "
                         "(default: smollm2 for --model organism, else the model itself, unmodified)")
    opt(rp, DirectionConfig, "seed")
    opt(rp, DirectionConfig, "method")
    opt(rp, DirectionConfig, "k", type=int)
    opt(rp, DirectionConfig, "construction")
    nested_opts(rp, RDOConfig, "rdo")
    rp.add_argument("--out", default="runs/paper")
    opt(rp, ReproduceConfig, "force")
    rp.set_defaults(fn=cmd_reproduce)

    ab = sub.add_parser("abliterate", help="search per-layer ablation weights, the direction's layer and its "
                                          "projection with Optuna for few refusals at low KL; save the chosen "
                                          "edit as hooks' parameters, a model folder and a LoRA adapter")
    model_args(ab, default="organism", batch_size=field_info(AbliterateConfig, "batch_size")[0])
    for name in ("trials", "startup_trials", "fill_trials", "n_val", "new_tokens", "max_kl", "seed", "space",
                 "workers"):
        opt(ab, AbliterateConfig, name)
    judge_arg(ab, "the harmful validation replies")
    ab.add_argument("--direction", default=None, help="a direction folder (default: OUT/direction, found first "
                                                      "when not there)")
    ab.add_argument("--reference-model", default=None,
                    help="the test table's reply cross-entropy is measured on this model's replies (default: "
                         "smollm2 for --model organism, else the model itself, unedited)")
    for name in ("test_table", "save_model", "save_adapter"):
        opt(ab, AbliterateConfig, name, "--no-" + name.replace("_", "-"))
    opt(ab, AbliterateConfig, "adapter_rank")
    ab.add_argument("--out", required=True, help="the study's folder: study.db, trials.csv, front.csv, front.png, "
                                                 "direction/, table.csv, model/, adapter/")
    ab.add_argument("--resume", action="store_true", help="continue the study in OUT")
    ab.add_argument("--force", action="store_true", help="delete OUT and start over")
    ab.set_defaults(fn=cmd_abliterate)

    j = sub.add_parser("judge", help="judge saved replies again (a JSONL file with prompt and completion fields)")
    j.add_argument("file", metavar="FILE.jsonl", help="replies, e.g. as `refusal eval` writes them")
    judge_arg(j, "the replies")
    j.add_argument("--out", default=None, help="output .jsonl (default: FILE.judged-NAME.jsonl beside FILE)")
    j.add_argument("--force", action="store_true", help="overwrite an existing output")
    opt(j, JudgeConfig, "device")
    opt(j, JudgeConfig, "dtype")
    opt(j, JudgeConfig, "trust_remote_code")
    opt(j, JudgeConfig, "batch_size")
    opt(j, JudgeConfig, "hf_format", "--judge-format")
    opt(j, JudgeConfig, "max_reply_tokens")
    opt(j, JudgeConfig, "off_topic_threshold", type=float)
    j.set_defaults(fn=cmd_judge)
    return p


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop), handled like Ctrl-C: stop cleanly, keep the checkpoint."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _interrupt_status() -> int:
    exc = sys.exc_info()[1]
    return 143 if isinstance(exc, _Terminated) else 130


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    artifacts.COMMAND = ["refusal", *map(str, argv)] if argv is not None else list(sys.argv)
    args = None
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
        for noisy in ("transformers", "accelerate"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="transformers")
        return int(args.fn(args) or 0)
    except RefusalLabError as e:
        print(f"refusal: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        print(f"refusal: error: {e.filename or ''}: {e.strerror}; check the path and its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = getattr(args, "command", None) in ("run", "sweep")
        print("refusal: interrupted; nothing half-written is left" +
              ("; finished stages and the attack's last step are kept: rerun with --resume" if resumable else ""),
              file=sys.stderr)
        return _interrupt_status()
    except MemoryError:
        print("refusal: error: out of memory; lower --batch-size (attacks: --search-width) or use a smaller model",
              file=sys.stderr)
        return 1
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            return _internal_error()
        print("refusal: error: out of memory on the device; lower --batch-size (attacks: --search-width)",
              file=sys.stderr)
        return 1
    except Exception:
        return _internal_error()


def _internal_error() -> int:
    """An exception no user input explains: its traceback, and a line saying that it is a bug (status 1)."""
    traceback.print_exc()
    print("refusal: internal error: the traceback above is a bug in refusal-lab, not a problem with your input; "
          "please report it with the command you ran", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
