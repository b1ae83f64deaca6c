"""The `refusal` command: a thin layer over the library functions.

User errors print one line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from pathlib import Path

from .errors import RefusalLabError

log = logging.getLogger("refusal")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2, no usage dump
        raise RefusalLabError(f"{self.prog}: {message} (see --help)")


def _positive(name: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v

    return parse


def _model_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--model", required=default is None, default=default,
                   help="smollm2, organism, a HF model folder, a hub id, or a .gguf file")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16 (default: float32 on CPU)")
    p.add_argument("--chat-template", default=None, help="Jinja chat template (file or text) for models without one")
    p.add_argument("--chat-template-kwargs", action="append", default=[], metavar="KEY=VALUE",
                   help="an option the chat template reads, e.g. enable_thinking=false (repeatable; recorded)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    p.add_argument("--batch-size", type=_positive("--batch-size"), default=32)


def _judge_arg(p: argparse.ArgumentParser, what: str = "attack success") -> None:
    from .judges import DEFAULT_JUDGE

    p.add_argument("--judge", default=DEFAULT_JUDGE, metavar="NAME",
                   help=f"the judge of {what}: substring (the paper's list), strict (default: a broader refusal "
                        "lexicon, degenerate text and off-topic replies are not successes), or hf:MODEL (a "
                        "HarmBench or Llama Guard classifier: a local folder or a hub id)")


def _load(args):
    from .models import load_model_from_options

    return load_model_from_options(args)


def _seed(seed: int) -> None:
    from .models import seed_everything

    seed_everything(seed)


# ----------------------------------------------------------------------------- commands


def cmd_direction(args) -> int:
    from . import artifacts
    from .data import direction_sets
    from .directions import compute_direction, save_direction

    out = Path(args.out) / "direction"
    artifacts.check_out(out, force=args.force)  # fail before the slow part
    if (args.layer is None) != (args.position is None):
        raise RefusalLabError("give both --layer and --position to pin the direction, or neither")
    _seed(args.seed)
    ht, bt, hv, bv = direction_sets(args.harmful, args.harmless, args.n_train, args.n_val, args.seed)
    cm = _load(args)
    direction, diffs, df = compute_direction(cm, ht, bt, hv, bv, batch_size=args.batch_size,
                                             score_all=args.score_all, layer=args.layer, position=args.position)
    config = {"n_train": args.n_train, "n_val": args.n_val, "seed": args.seed, "batch_size": args.batch_size,
              "harmful": args.harmful or "builtin", "harmless": args.harmless or "builtin",
              "layer": args.layer, "position": args.position}
    with artifacts.atomic_dir(out) as tmp:  # a failed or killed run never leaves a half-written direction
        save_direction(tmp, direction, diffs, df, config=config)
    s = direction.meta["scores"]
    print(f"direction: layer {direction.layer}, position {direction.position} "
          f"(bypass {s['bypass']:.3f}, induce {s['induce']:.3f}, kl {s['kl']:.4f}); "
          f"{sum(direction.meta['timings_s'].values()):.0f}s")
    print(f"wrote {out}/direction.safetensors, direction.json, candidates.csv")
    return 0


def cmd_orthogonalize(args) -> int:
    from . import artifacts
    from .directions import check_direction, load_direction
    from .hooks import orthogonalize

    out = Path(args.out)
    artifacts.check_out(out, force=args.force)
    direction = load_direction(args.direction)  # a bad direction file fails before the model loads
    cm = _load(args)
    check_direction(direction, cm)
    edited = orthogonalize(cm, direction.vector, inplace=True)
    with artifacts.atomic_dir(out) as tmp:
        edited.model.save_pretrained(tmp, safe_serialization=True)
        edited.tokenizer.save_pretrained(tmp)
        artifacts.write_json(tmp / "refusal_lab.json", artifacts.run_record(
            edit="weight orthogonalization", base_model=cm.describe(), direction=str(args.direction),
            direction_layer=direction.layer, direction_position=direction.position,
            fingerprint=edited.fingerprint))
    print(f"wrote the orthogonalized model to {out} (load it with --model {out})")
    return 0


def cmd_eval(args) -> int:
    import contextlib

    from . import artifacts
    from .data import instructions, resolve_prompts
    from .directions import check_direction, load_direction
    from .hooks import ablate_direction, add_direction
    from .judges import add_verdicts, judge_config_from, load_judge, verdict_rates
    from .metrics import evaluate
    from .suffix import check_suffix_ids, load_suffix, suffix_record

    out = Path(args.out)
    artifacts.check_out(out, force=args.force)
    if not math.isfinite(args.coeff):
        raise RefusalLabError(f"--coeff must be a finite number, got {args.coeff}")
    judge = load_judge(judge_config_from(args))  # a bad judge fails before the model loads
    prompts = resolve_prompts(args.prompts)
    suffix_text, suffix_ids = (None, None) if args.suffix is None else load_suffix(args.suffix)
    d = load_direction(args.ablate or args.actadd) if (args.ablate or args.actadd) else None
    cm = _load(args)
    if suffix_ids is not None:
        check_suffix_ids(args.suffix, suffix_ids, cm.tokenizer)
    suffix = suffix_ids if suffix_ids is not None else suffix_text
    check_fits(cm, instructions(prompts), suffix, args.max_new_tokens)
    intervention, ctx = "none", contextlib.nullcontext()
    if d is not None:
        check_direction(d, cm)
    if args.ablate:
        intervention, ctx = f"ablate {args.ablate}", ablate_direction(cm, d.vector)
    elif args.actadd:
        intervention = f"actadd {args.actadd} coeff {args.coeff}"
        ctx = add_direction(cm, d.mean_diff, d.layer, args.coeff)
    with ctx:
        df = evaluate(cm, instructions(prompts), suffix, args.max_new_tokens, args.batch_size)
    df.insert(1, "category", [p.category for p in prompts])
    add_verdicts(df, judge)  # substring_success (the paper's judge), judge, verdict, success (by the judge)
    if suffix_text is not None:
        df["suffix"] = suffix_text
    with artifacts.atomic_path(out) as tmp:
        df.to_json(tmp, orient="records", lines=True, force_ascii=False)
    rate = df.refused.mean()
    made_on = ((suffix_record(args.suffix) or {}).get("model") or {}).get("fingerprint") if args.suffix else None
    transfer = bool(made_on and made_on != cm.fingerprint)
    artifacts.write_json(out.with_name(out.name + ".record.json"), artifacts.run_record(
        model=cm.describe(), prompts=str(args.prompts), n=len(df), intervention=intervention,
        suffix=suffix_text, suffix_model_fingerprint=made_on, transfer=transfer,
        refusal_rate=rate, mean_refusal_score=df.refusal_score.mean(), judge=judge.name,
        attack_success_rate=df.success.mean(),  # by `judge`
        attack_success_rates={"substring": df.substring_success.mean(), judge.name: df.success.mean()},
        verdict_rates=verdict_rates(df.verdict), max_new_tokens=args.max_new_tokens))
    by = f"substring {df.substring_success.mean():.1%}" + (
        f", {judge.name} {df.success.mean():.1%}" if judge.name != "substring" else "")
    print(f"refusal rate: {rate:.1%} ({int(df.refused.sum())}/{len(df)}), "
          f"mean refusal score {df.refusal_score.mean():.3f}, attack success by judge: {by} [{intervention}]"
          + (" (a suffix made on another model: transfer)" if transfer else ""))
    print(f"wrote {out}")
    return 0


def check_fits(cm, instructions, suffix, new_tokens: int) -> None:
    """Every prompt (with its suffix) plus the tokens to generate fits the model's context: checked before
    anything runs, so a too-long prompt is a clear error, not a failure half-way through."""
    from .engine import check_lengths

    check_lengths(cm, cm.chat.encode_all(instructions, suffix), new_tokens)


def cmd_organism_build(args) -> int:
    from dataclasses import replace

    from .artifacts import read_json
    from .organism import OrganismConfig, build_organism

    cfg = replace(OrganismConfig(), seed=args.seed)
    path = build_organism(cfg, force=args.force)
    rec = read_json(path / "organism.json")
    print(f"organism built in {rec['wall_time_s']:.0f}s: refuses {rec['harmful_test_refusal_rate']:.1%} of harmful "
          f"and {rec['harmless_test_refusal_rate']:.1%} of harmless test instructions")
    print(f"wrote {path} (use --model organism)")
    return 0


def cmd_attack(args) -> int:
    from attacks.gcg import GCGConfig
    from attacks.run import run_attack

    from . import artifacts
    from .data import resolve_prompts
    from .directions import load_direction
    from .judges import judge_config_from

    if (args.prompt is None) == (args.prompts is None):
        raise RefusalLabError("give exactly one of --prompt TEXT or --prompts FILE")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise RefusalLabError("--prompt is empty")
        instructions, targets = [args.prompt.strip()], [args.target] if args.target else None
    else:
        if args.target:
            raise RefusalLabError("--target goes with --prompt; a prompt file gives targets in a 'target' column")
        prompts = resolve_prompts(args.prompts)
        if args.max_prompts:
            prompts = prompts[: args.max_prompts]
        instructions = [p.instruction for p in prompts]
        targets = [p.target for p in prompts] if all(p.target for p in prompts) else None
    cfg = GCGConfig(steps=args.steps, search_width=args.search_width, topk=args.topk, n_replace=args.n_replace,
                    suffix_len=args.suffix_len, objective=args.objective, direction_weight=args.direction_weight,
                    seed=args.seed, early_stop=not args.no_early_stop, success_rate=args.success_rate,
                    patience=args.patience, progressive=not args.all_prompts, allow_non_ascii=args.allow_non_ascii,
                    screen_dtype=args.screen_dtype, rescore=args.rescore, judge=args.judge)
    cfg.validate()
    judge = judge_config_from(args)  # the judge's name in cfg; its options (device, dtype) travel beside it
    if args.objective != "target" and args.engine == "nanogcg":
        raise RefusalLabError("the nanogcg engine optimizes the target objective only; use --engine native")
    if args.engine == "nanogcg":
        from attacks.reference import require_nanogcg

        require_nanogcg()
    if args.objective != "target" and not args.direction:
        raise RefusalLabError(f"--objective {args.objective} needs --direction DIR (a folder made by `refusal direction`)")
    if args.resume and args.force:
        raise RefusalLabError("--resume and --force contradict each other; choose one")
    if not math.isfinite(args.direction_weight) or args.direction_weight < 0:
        raise RefusalLabError(f"--direction-weight must be a finite number >= 0, got {args.direction_weight}")
    out = Path(args.out)
    attack_dir = out / "attack"
    artifacts.check_out(attack_dir, force=args.force, resume=args.resume,
                        fix="pass --resume to continue it, --force to overwrite it, or choose another --out")
    direction = load_direction(args.direction) if args.direction else None
    cm = _load(args)
    _seed(args.seed)
    try:
        rec = run_attack(cm, instructions, targets, cfg, out, engine=args.engine, direction=direction,
                         direction_path=args.direction, resume=args.resume, force=args.force,
                         checkpoint_name=args.checkpoint, judge=judge)
    except KeyboardInterrupt:
        print("refusal: interrupted; the last completed step is saved: continue with the same command and --resume",
              file=sys.stderr)
        return _interrupt_status()
    print(f"suffix: {rec['suffix']!r}")
    print(f"best loss {rec['best_loss']:.4f} at step {rec['best_step']} of {rec['steps_run']} "
          f"({rec['elapsed_s']:.0f}s, {rec['s_per_step']:.2f}s/step)")
    print(f"attack success on the {len(instructions)} attacked prompt(s) by the {rec.get('judge', 'substring')} judge: "
          f"{rec['success_rate']:.1%}; random suffix of the same length: {rec['random_success_rate']:.1%}")
    print(f"wrote {attack_dir / 'suffix.json'}")
    return 0


def cmd_analyze(args) -> int:
    from analysis.run import analyze
    from attacks.gcg import random_suffix_ids

    from . import artifacts
    from .data import instructions, resolve_prompts
    from .directions import check_direction, load_direction
    from .suffix import check_suffix_ids, load_suffix, suffix_record

    out = Path(args.out) / "analysis"
    artifacts.check_out(out, force=args.force)
    if args.eval_tokens < 0:
        raise RefusalLabError(f"--eval-tokens must be >= 0 (0 skips judging), got {args.eval_tokens}")
    harmful = instructions(resolve_prompts(args.prompts, "harmful:test"))
    harmless = instructions(resolve_prompts(args.harmless, "harmless:test"))
    if args.max_prompts:
        harmful, harmless = harmful[: args.max_prompts], harmless[: args.max_prompts]
    text, ids = load_suffix(args.suffix)
    direction = load_direction(args.direction)
    judge = None
    if args.eval_tokens:
        from .judges import judge_config_from, load_judge

        judge = load_judge(judge_config_from(args))
    cm = _load(args)
    check_direction(direction, cm)
    if ids is not None:
        check_suffix_ids(args.suffix, ids, cm.tokenizer)
    adversarial = ids if ids is not None else cm.chat.suffix_ids(text)
    rand = (suffix_record(args.suffix) or {}).get("random_token_ids")
    if rand is None:
        rand = random_suffix_ids(cm, len(adversarial), seed=args.seed + 1)
    check_fits(cm, harmful + harmless, adversarial, args.eval_tokens)
    success = None
    if args.eval_tokens:
        from attacks.evaluate import suffix_success

        judged = {name: suffix_success(cm, harmful, sfx, args.eval_tokens, progress=False, judge=judge)
                  for name, sfx in (("no_suffix", None), ("random_suffix", rand), ("adversarial_suffix", adversarial))}
        # the paper's substring judge and the chosen one, side by side
        success = {"substring": {k: float(df.substring_success.mean()) for k, df in judged.items()},
                   judge.name: {k: float(df.success.mean()) for k, df in judged.items()}}
    res = analyze(cm, direction, harmful, harmless, adversarial, rand, out, top_k=args.top_k,
                  batch_size=args.batch_size, success=success)
    for s in res["numbers"]["sentences"]:
        print("- " + s)
    print(f"report: {res['report_html']} (and {res['report_md'].name})")
    return 0


def cmd_bench(args) -> int:
    import json

    from attacks.bench import bench_activations, bench_attacks, engine_names

    from . import artifacts
    from .data import builtin_prompts, instructions

    engines = engine_names(args.engines)
    out = Path(args.out)
    artifacts.check_out(out, force=args.force)
    cm = _load(args)
    prompts = instructions(builtin_prompts("harmful", "test"))[:: max(1, 120 // args.prompts)][: args.prompts]
    _seed(args.seed)
    res = bench_attacks(cm, prompts, steps=args.steps, seed=args.seed, progress=lambda m: print(m, flush=True),
                        engines=engines)
    acts = bench_activations(cm, instructions(builtin_prompts("harmful", "val")) + instructions(builtin_prompts("harmless", "val")))
    res.update(acts)
    res["model"] = cm.describe()
    res["device"] = str(cm.device) if cm.device.type != "cuda" else torch_device_name()
    res["threads"] = __import__("torch").get_num_threads()
    artifacts.write_json(out, artifacts.run_record(**res))
    keys = [f"{e}_{k}" for e in res["engines"] for k in ("s_per_step", "best_loss", "time_to_success_s", "peak_mib")]
    keys = [k for k in res if k.startswith("speedup")] + keys + ["native_screen_dtype", "bare_forward_s",
                                                                  "cache_activations_s", "activation_overhead"]
    print(json.dumps({k: (round(res[k], 4) if isinstance(res[k], float) else res[k]) for k in keys}, indent=1))
    print(f"wrote {out}")
    return 0


def torch_device_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def cmd_run(args) -> int:
    from .pipeline import main_job

    return main_job(args)


def cmd_judge(args) -> int:
    from .judges import judge_config_from, judge_file

    config = judge_config_from(args, batch_size=args.batch_size)
    rec = judge_file(args.file, config, out=args.out, force=args.force)
    r = rec["rates"]
    print(f"{rec['judge']} judge on {rec['n']} replies: complies {r['complies']:.1%}, refuses {r['refuses']:.1%}, "
          f"neither {r['neither']:.1%}; attack success {rec['attack_success_rate']:.1%}")
    print(f"wrote {rec['out']}")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from .judges import HF_FORMATS, OFF_TOPIC_THRESHOLD

    p = _Parser(prog="refusal", description="Refusal directions, adversarial suffixes, and how suffixes beat refusal.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, required=True)

    d = sub.add_parser("direction", help="find the refusal direction (difference in means + selection)")
    _model_args(d)
    d.add_argument("--harmful", help="harmful prompt file (default: built-in harmful train/val splits)")
    d.add_argument("--harmless", help="harmless prompt file (default: built-in harmless train/val splits)")
    d.add_argument("--n-train", type=_positive("--n-train"), default=128)
    d.add_argument("--n-val", type=_positive("--n-val"), default=16)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--layer", type=int, default=None, help="pin the direction to this layer (with --position)")
    d.add_argument("--position", type=int, default=None,
                   help="pin the direction to this post-instruction position, -1 the last (with --layer)")
    d.add_argument("--score-all", action="store_true",
                   help="compute every score of every candidate, including those the filters drop (slower)")
    d.add_argument("--out", required=True, help="run folder; writes OUT/direction/")
    d.add_argument("--force", action="store_true", help="overwrite an existing direction")
    d.set_defaults(fn=cmd_direction)

    o = sub.add_parser("orthogonalize", help="bake directional ablation into the weights; save a HF folder")
    _model_args(o)
    o.add_argument("--direction", required=True, help="run folder or its direction/ subfolder")
    o.add_argument("--out", required=True, help="folder for the edited model")
    o.add_argument("--force", action="store_true")
    o.set_defaults(fn=cmd_orthogonalize)

    e = sub.add_parser("eval", help="generate, judge refusal, score; optional ablation/addition/suffix")
    _model_args(e)
    e.set_defaults(batch_size=16)
    e.add_argument("--prompts", required=True, help="prompt file, or a built-in set such as harmful:test")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--ablate", metavar="DIR", help="ablate this direction")
    g.add_argument("--actadd", metavar="DIR", help="add this direction at its layer")
    e.add_argument("--coeff", type=float, default=1.0, help="activation addition coefficient")
    e.add_argument("--suffix", help="suffix.json, a text file, or the suffix text itself")
    e.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=64)
    _judge_arg(e)
    e.add_argument("--out", required=True, help="results .jsonl")
    e.add_argument("--force", action="store_true")
    e.set_defaults(fn=cmd_eval)

    org = sub.add_parser("organism", help="the model organism: a safety-tuned SmolLM2")
    osub = org.add_subparsers(dest="organism_command", parser_class=_Parser, required=True)
    ob = osub.add_parser("build", help="fine-tune SmolLM2 to refuse (deterministic, CPU, a few minutes)")
    ob.add_argument("--seed", type=int, default=0)
    ob.add_argument("--force", action="store_true", help="rebuild even if it is cached")
    ob.set_defaults(fn=cmd_organism_build)

    a = sub.add_parser("attack", help="optimize an adversarial suffix (GCG) for one prompt or a prompt set")
    _model_args(a)
    a.add_argument("--prompt", help="one instruction to attack")
    a.add_argument("--target", help="target reply opening for --prompt (default: 'Sure, here is ...')")
    a.add_argument("--prompts", help="prompt file or built-in set (e.g. harmful:train): one universal suffix")
    a.add_argument("--max-prompts", type=_positive("--max-prompts"), default=None, help="use the first N prompts")
    a.add_argument("--engine", choices=("native", "nanogcg"), default="native")
    a.add_argument("--objective", choices=("target", "direction", "mixed"), default="target")
    a.add_argument("--direction", help="direction folder (needed by --objective direction|mixed)")
    a.add_argument("--direction-weight", type=float, default=1.0, help="weight of the direction term in mixed")
    a.add_argument("--steps", type=_positive("--steps"), default=150)
    a.add_argument("--search-width", type=_positive("--search-width"), default=128)
    a.add_argument("--topk", type=_positive("--topk"), default=64)
    a.add_argument("--n-replace", type=_positive("--n-replace"), default=1)
    a.add_argument("--suffix-len", type=_positive("--suffix-len"), default=20)
    a.add_argument("--success-rate", type=float, default=1.0,
                   help="universal: add the next prompt / stop when this share of active prompts succeed")
    a.add_argument("--patience", type=int, default=0,
                   help="universal: add the next prompt after this many steps without one (0: only on success)")
    a.add_argument("--all-prompts", action="store_true", help="universal: optimize on all prompts from the start")
    a.add_argument("--no-early-stop", action="store_true", help="run all steps even after success")
    _judge_arg(a, "success (early stopping, adding prompts, the success rates)")
    a.add_argument("--allow-non-ascii", action="store_true")
    a.add_argument("--screen-dtype", default="auto",
                   help="precision candidates are screened in; the best --rescore are scored again in the model's "
                        "(auto, model, bfloat16, float16; auto: bfloat16 where the hardware is fast at it and the "
                        "model is float32; model: no screening)")
    a.add_argument("--rescore", type=_positive("--rescore"), default=8,
                   help="screened candidates scored again in the model's precision each step")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--resume", action="store_true", help="continue a run from its checkpoint")
    a.add_argument("--checkpoint", default=None, help="checkpoint file name in OUT/attack (must contain 'checkpoint')")
    a.add_argument("--out", required=True, help="run folder; writes OUT/attack/")
    a.add_argument("--force", action="store_true", help="overwrite an existing attack")
    a.set_defaults(fn=cmd_attack)

    an = sub.add_parser("analyze", help="how a suffix moves the refusal direction and the refusal heads; report")
    _model_args(an)
    an.set_defaults(batch_size=16)
    an.add_argument("--direction", required=True, help="direction folder")
    an.add_argument("--suffix", required=True, help="suffix.json (or its run folder), a text file, or the suffix text")
    an.add_argument("--prompts", default=None, help="harmful prompts (default: harmful:test)")
    an.add_argument("--harmless", default=None, help="harmless prompts (default: harmless:test)")
    an.add_argument("--max-prompts", type=_positive("--max-prompts"), default=None)
    an.add_argument("--top-k", type=_positive("--top-k"), default=8)
    an.add_argument("--eval-tokens", type=int, default=48, help="greedy tokens to judge attack success (0: skip)")
    _judge_arg(an)
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--out", required=True, help="run folder; writes OUT/analysis/")
    an.add_argument("--force", action="store_true")
    an.set_defaults(fn=cmd_analyze)

    b = sub.add_parser("bench", help="nanoGCG vs the native engine, and activation caching vs a bare forward")
    _model_args(b, default="organism")
    b.add_argument("--steps", type=_positive("--steps"), default=10)
    b.add_argument("--prompts", type=_positive("--prompts"), default=5, help="number of harmful test prompts")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--engines", default="nanogcg,native,native_model_precision",
                   help="comma-separated, run in this order per prompt: nanogcg, native (screening in bfloat16 where "
                        "fast, the best candidates rescored), native_model_precision (no screening)")
    b.add_argument("--out", default="bench.json")
    b.add_argument("--force", action="store_true")
    b.set_defaults(fn=cmd_bench)

    r = sub.add_parser("run", help="the main job, end to end, on one model")
    _model_args(r, default="organism")
    r.add_argument("--quick", action="store_true", help="smaller sets, for a fast look")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="runs/main")
    r.add_argument("--resume", action="store_true", help="reuse the stages already finished in OUT (and continue the attack)")
    r.add_argument("--force", action="store_true", help="delete OUT and start over")
    _judge_arg(r, "attack success (the attack's success checks, the evaluation, the report)")
    r.set_defaults(fn=cmd_run)

    j = sub.add_parser("judge", help="judge saved replies again (a JSONL file with prompt and completion fields)")
    j.add_argument("file", metavar="FILE.jsonl", help="replies, e.g. as `refusal eval` writes them")
    _judge_arg(j, "the replies")
    j.add_argument("--out", default=None, help="output .jsonl (default: FILE.judged-NAME.jsonl beside FILE)")
    j.add_argument("--force", action="store_true", help="overwrite an existing output")
    j.add_argument("--device", default=None, help="hf judges: cpu or cuda (default: cuda if present)")
    j.add_argument("--dtype", default=None, help="hf judges: the classifier's dtype (default: float32 on CPU)")
    j.add_argument("--trust-remote-code", action="store_true", help="hf judges: allow the classifier's own code")
    j.add_argument("--batch-size", type=_positive("--batch-size"), default=8, help="pairs per classifier pass")
    j.add_argument("--judge-format", choices=HF_FORMATS, default="auto",
                   help="hf judges: the classifier's prompt: auto (Llama Guard if its chat template is one, else "
                        "HarmBench), harmbench, llamaguard")
    j.add_argument("--max-reply-tokens", type=_positive("--max-reply-tokens"), default=512,
                   help="hf judges: a reply is clipped to this many classifier tokens (as HarmBench does)")
    j.add_argument("--off-topic-threshold", type=float, default=OFF_TOPIC_THRESHOLD,
                   help=f"strict: a reply whose MiniLM cosine with its instruction is below this is off topic "
                        f"(neither; default {OFF_TOPIC_THRESHOLD}, calibrated on harmless prompts)")
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
    import signal

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    from . import artifacts

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
        resumable = getattr(args, "command", None) == "run"
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
            raise
        print("refusal: error: out of memory on the device; lower --batch-size (attacks: --search-width)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
