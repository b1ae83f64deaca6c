"""The analysis stage: projection metrics, refusal heads, attention to regions, plots and the report,
written to runs/NAME/analysis/."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

from refusal.suffix import random_suffix_ids
from refusal import artifacts
from refusal.chat import Placement
from refusal.config import check_fields, option
from refusal.data import instructions, resolve_prompts
from refusal.directions import Direction, check_direction
from refusal.engine import check_lengths
from refusal.errors import RefusalLabError
from refusal.jailbreaks import Jailbreak, encode_jailbreaks, load_jailbreaks
from refusal.judges import Judge, JudgeConfig, load_judge
from refusal.metrics import generate
from refusal.models import ChatModel
from refusal.success import judge_replies, suffix_success
from refusal.suffix import check_suffix_ids, load_suffix, suffix_placement, suffix_record

from analysis.plots import plot_attention_shares, plot_cosine_by_layer, plot_head_contributions, plot_pca_conditions
from analysis.projection import condition_encodings, gap_kept, projection_table, subspace_table
from analysis.report import headline_numbers, headline_sentences, success_frame, write_report
from refusal.activations import cache_activations
from refusal.capture import capture_last_position
from refusal.heads import attention_table_from, contributions, heads_table, top_heads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisConfig:
    """The analysis stage (`refusal analyze`): which prompts, how many heads, how success is judged."""

    harmful: str = option("harmful:test", "harmful prompts: a file or a built-in set")
    harmless: str = option("harmless:test", "harmless prompts: a file or a built-in set")
    max_prompts: int | None = option(None, "use the first N prompts of each set (None: all)", ge=1)
    top_k: int = option(8, "refusal heads: the top k by direct contribution to the direction", ge=1)
    batch_size: int = option(16, "prompts per forward pass", ge=1)
    eval_tokens: int = option(48, "greedy reply tokens judged for attack success (0: not judged)", ge=0)
    judge: JudgeConfig = option(help="the judge of attack success (refusal.judges.JudgeConfig)", factory=JudgeConfig)
    seed: int = option(0, "the random baseline suffix is drawn with seed + 1 (when the suffix's record has none)", ge=0)

    def validate(self) -> None:
        check_fields(self)


def _checked_inputs(config: AnalysisConfig) -> tuple[list[str], list[str], Judge | None]:
    """The config checked, its reference prompts (the first max_prompts of each set) and its judge (None
    where replies are not judged), as both kinds of analysis read them."""
    config.validate()
    judge = load_judge(config.judge) if config.eval_tokens else None
    harmful = instructions(resolve_prompts(config.harmful, "harmful:test"))
    harmless = instructions(resolve_prompts(config.harmless, "harmless:test"))
    if config.max_prompts:
        harmful, harmless = harmful[: config.max_prompts], harmless[: config.max_prompts]
    return harmful, harmless, judge


def check_analysis(config: AnalysisConfig, suffix: str | Path) -> tuple[list[str], list[str], tuple, Judge | None]:
    """The analysis' checks that need no model (by the CLI before it loads one, and by analyze_suffix): the
    config, the prompts, the suffix and the judge (where replies are judged), returned loaded: (harmful,
    harmless, (suffix text, suffix ids), judge or None)."""
    harmful, harmless, judge = _checked_inputs(config)
    return harmful, harmless, load_suffix(suffix), judge


def analyze_suffix(cm: ChatModel, direction: Direction, suffix: str | Path, config: AnalysisConfig,
                   out_dir: str | Path, harmfulness: Direction | None = None) -> dict:
    """The analysis stage from artifacts: a suffix (suffix.json or its run folder, a text file, or the text)
    against the random suffix of the same length (the one its attack record drew, else a new one), on the
    config's prompts, with attack success judged (config.eval_tokens > 0) by the substring judge and the
    config's; then analyze() (with the harmfulness direction where given). Returns analyze()'s result."""
    harmful, harmless, (text, ids), judge = check_analysis(config, suffix)
    check_direction(direction, cm)
    if harmfulness is not None:
        check_direction(harmfulness, cm)
    if ids is not None:
        check_suffix_ids(suffix, ids, cm.tokenizer)
    adversarial = ids if ids is not None else cm.chat.suffix_ids(text)
    rand = (suffix_record(suffix) or {}).get("random_token_ids")
    if rand is None:
        rand = random_suffix_ids(cm, len(adversarial), seed=config.seed + 1)
    placement = suffix_placement(suffix)  # where the attack put it; the random suffix goes there too
    check_lengths(cm, cm.chat.encode_all(harmful + harmless, adversarial, placement), config.eval_tokens)
    success = None
    if judge is not None:
        judged = {name: suffix_success(cm, harmful, sfx, config.eval_tokens, progress=False, judge=judge,
                                       placement=placement)
                  for name, sfx in (("no_suffix", None), ("random_suffix", rand), ("adversarial_suffix", adversarial))}
        # the paper's substring judge and the chosen one, side by side
        success = {"substring": {k: float(df.substring_success.mean()) for k, df in judged.items()},
                   judge.name: {k: float(df.success.mean()) for k, df in judged.items()}}
    return analyze(cm, direction, harmful, harmless, adversarial, rand, out_dir, config, success=success,
                   placement=placement, harmfulness=harmfulness)


def analyze(cm: ChatModel, direction: Direction, harmful: Sequence[str], harmless: Sequence[str],
            adversarial: Sequence[int] | str | None, random: Sequence[int] | str | None, out_dir: str | Path,
            config: AnalysisConfig = AnalysisConfig(), success: dict | None = None, facts: dict | None = None,
            placement: Placement | None = None, harmfulness: Direction | None = None) -> dict:
    """Write projection.csv, heads.csv, attention.csv, the plots, report.md and report.html into out_dir;
    return the headline numbers (and sentences). Of the config, top_k and batch_size are read. `success`:
    attack success rates by judge, {judge name: {condition: rate}} (e.g. {"substring": {...}, "strict":
    {...}}), stated with their judges. `placement`: where both suffixes go (default: after the prompt).
    `harmfulness`: a second direction folder (`refusal direction --method harmfulness`), read at its own
    position counted from the end (the user turn's last token for the harmfulness direction, so after an
    adversarial string at the end of the message): harmfulness.csv, its plot, and a sentence on how much
    of the harmful-harmless gap the adversarial suffix keeps on each direction."""
    top_k, batch_size = config.top_k, config.batch_size
    if success is not None and (not isinstance(success, dict) or not all(isinstance(v, dict) for v in success.values())):
        raise RefusalLabError("success must map judge names to {condition: rate}, e.g. {'strict': {'no_suffix': 0.1}}")
    out_dir = Path(out_dir)
    timer = artifacts.Timer()
    encs = condition_encodings(cm, harmful, harmless, adversarial, random, placement)
    with timer("forward"):  # one pass per condition gives every measure below
        caps = {c: capture_last_position(cm, e, batch_size) for c, e in encs.items()}
    acts = {c: cap.resid for c, cap in caps.items()}
    proj = projection_table(acts, direction.vector)
    heads = heads_table({c: contributions(cm, cap.z, direction.vector) for c, cap in caps.items()}, top_k)
    chosen = top_heads(heads, top_k)
    att = attention_table_from({c: cap.regions for c, cap in caps.items()}, chosen)
    sub = subspace_table(acts, direction.basis) if direction.k > 1 else None
    harm = None
    if harmfulness is not None:
        with timer("harmfulness"):
            harm_acts = {c: cache_activations(cm, e, [harmfulness.position], batch_size,
                                              desc=f"{c} (harmfulness)")[:, :, 0] for c, e in encs.items()}
        harm = projection_table(harm_acts, harmfulness.vector)
    # written into a temporary folder that replaces out_dir at the end: never a half-written analysis
    with artifacts.atomic_dir(out_dir) as tmp:
        artifacts.write_csv(tmp / "projection.csv", proj)
        artifacts.write_csv(tmp / "heads.csv", heads)
        artifacts.write_csv(tmp / "attention.csv", att)
        with timer("plots"):
            plots = {
                "Cosine with the refusal direction by layer": plot_cosine_by_layer(proj, direction.layer, tmp / "cosine_by_layer.png"),
                "Top refusal heads: direct contribution": plot_head_contributions(heads, top_k, tmp / "head_contributions.png"),
                "Attention of the top heads": plot_attention_shares(att, tmp / "attention_shares.png"),
                f"PCA of the conditions at layer {direction.layer}": plot_pca_conditions(acts, direction.layer, tmp / "pca_conditions.png"),
            }
        numbers = headline_numbers(proj, heads, att, direction.layer, top_k)
        sentences = headline_sentences(numbers, success)
        if sub is not None:
            artifacts.write_csv(tmp / "subspace.csv", sub)
            span = sub[sub.vector == "span"]
            plots[f"Norm of the projection onto the {direction.k}-dimensional subspace by layer"] = plot_cosine_by_layer(
                span, direction.layer, tmp / "subspace_by_layer.png",
                title=f"|R x| / |x| for the direction folder's {direction.k}-dimensional basis R")
            kept = {v: gap_kept(sub[sub.vector == v], direction.layer) for v in ["span"] + [f"b{i}" for i in range(direction.k)]}
            numbers["subspace_k"], numbers["subspace_gap_kept"] = direction.k, kept
            if all(x is not None for x in kept.values()):
                sentences.append(
                    f"On the direction folder's {direction.k}-dimensional subspace the adversarial suffix keeps "
                    f"{kept['span']:.0%} of the harmful-harmless gap in the norm of the projection (layer "
                    f"{direction.layer}); on each basis vector: "
                    + ", ".join(f"{v} {x:.0%}" for v, x in kept.items() if v != "span") + ".")
        if harm is not None:
            artifacts.write_csv(tmp / "harmfulness.csv", harm)
            plots["Cosine with the harmfulness direction by layer"] = plot_cosine_by_layer(
                harm, harmfulness.layer, tmp / "harmfulness_by_layer.png",
                title="Cosine of the user turn's last token with the harmfulness direction")
            numbers["harmfulness_layer"] = harmfulness.layer
            numbers["harmfulness_gap_kept"] = gap_kept(harm, harmfulness.layer)
            numbers["refusal_gap_kept"] = gap_kept(proj, direction.layer)
            at = harm[harm.layer == harmfulness.layer].groupby("condition").cosine.mean()
            if numbers["harmfulness_gap_kept"] is not None and numbers["refusal_gap_kept"] is not None:
                sentences.append(
                    f"The adversarial suffix keeps {numbers['refusal_gap_kept']:.0%} of the harmful-harmless gap on the "
                    f"refusal direction (layer {direction.layer}, last position) and "
                    f"{numbers['harmfulness_gap_kept']:.0%} on the harmfulness direction (layer {harmfulness.layer}, the "
                    f"user turn's last token: harmful {at['harmful']:.3f}, adversarial {at['adversarial_suffix']:.3f}, "
                    + (f"random {at['random_suffix']:.3f}, " if "random_suffix" in at else "")
                    + f"harmless {at['harmless']:.3f}).")
        summary = proj[proj.layer == direction.layer].groupby("condition")[["cosine", "projection"]].mean().reset_index()
        att_summary = att.groupby(["condition", "layer", "head"])[["instruction", "suffix", "other"]].mean().reset_index()
        top_rows = heads[heads["rank"] <= top_k]
        allfacts = {"model": f"{cm.name} ({cm.fingerprint})", "direction": f"layer {direction.layer}, position {direction.position}",
                    "prompts": f"{len(harmful)} harmful, {len(harmless)} harmless"}
        if isinstance(adversarial, str):
            allfacts["adversarial suffix"] = adversarial
        elif adversarial is not None:
            allfacts["adversarial suffix"] = repr(cm.tokenizer.decode(list(adversarial)))
        if placement is not None and not placement.is_default:
            allfacts["placement"] = (f"system prompt {placement.system!r}, message {placement.message!r}" if placement.system
                                     else f"message {placement.message!r}")
        if random is not None:
            allfacts["random suffix"] = repr(random if isinstance(random, str) else cm.tokenizer.decode(list(random)))
        allfacts.update(facts or {})
        tables = {f"Mean cosine and projection at layer {direction.layer}": summary,
                  f"Top {top_k} heads": top_rows, "Attention shares of the top heads (mean)": att_summary}
        if success:
            tables = {"Attack success by judge": success_frame(success), **tables}
        md, html = write_report(tmp, "How the suffix beats refusal", sentences, plots, tables, allfacts)
        numbers["sentences"] = sentences
        numbers["success"] = success
        artifacts.write_json(tmp / "analysis.json", artifacts.run_record(
            model=cm.describe(), direction={"layer": direction.layer, "position": direction.position},
            n_harmful=len(harmful), n_harmless=len(harmless), top_k=top_k, headline=numbers, timings_s=timer.seconds))
    log.info("analysis written to %s (%s)", out_dir, timer.seconds)
    return {"numbers": numbers, "report_md": out_dir / md.name, "report_html": out_dir / html.name}


def check_jailbreaks(config: AnalysisConfig, path: str | Path) -> tuple[list[str], list[str], list[Jailbreak], Judge | None]:
    """check_analysis for `refusal analyze --jailbreaks`: the config, the reference prompts, every row of
    the jailbreak file (a malformed one is a one-line error naming its line) and the judge."""
    harmful, harmless, judge = _checked_inputs(config)
    rows = load_jailbreaks(path)
    for jb in rows:
        if jb.name in ("harmful", "harmless") or jb.name.endswith(GOAL):
            raise RefusalLabError(f"{path}:{jb.line}: the name {jb.name!r} is taken by the analysis' own conditions; "
                                  "rename the row")
    return harmful, harmless, rows, judge


GOAL = " (goal alone)"  # the condition of a name's goals, its paired baseline


def analyze_jailbreaks(cm: ChatModel, direction: Direction, path: str | Path, config: AnalysisConfig,
                       out_dir: str | Path) -> dict:
    """Any jailbreaks under the analysis' lens (refusal.jailbreaks reads the file): each name's prompts as
    one condition beside the reference harmful and harmless prompts and, where every row of a name has a
    goal, the goals alone (its paired baseline). Per condition: the cosine with the direction by layer, the
    top refusal heads (ranked on the harmful prompts) and their attention from the last position to the
    marked adversarial part (not measured for plain prompts), and (config.eval_tokens > 0) greedy replies
    judged against each row's goal by the substring judge and the config's. Writes jailbreaks.csv (a row
    per jailbreak), projection.csv, heads.csv, attention.csv, the plots, report.md/html and analysis.json."""
    harmful, harmless, rows, judge = check_jailbreaks(config, path)
    check_direction(direction, cm)
    top_k, batch_size = config.top_k, config.batch_size
    names = list(dict.fromkeys(jb.name for jb in rows))
    groups = {name: [jb for jb in rows if jb.name == name] for name in names}
    encs = {"harmful": cm.chat.encode_all(harmful)}
    for name, group in groups.items():
        encs[name] = encode_jailbreaks(cm.chat, group)
        if all(jb.goal for jb in group):
            encs[name + GOAL] = cm.chat.encode_all([jb.goal for jb in group])
    encs["harmless"] = cm.chat.encode_all(harmless)
    check_lengths(cm, [e for es in encs.values() for e in es], config.eval_tokens)
    out_dir = Path(out_dir)
    timer = artifacts.Timer()
    with timer("forward"):
        caps = {c: capture_last_position(cm, e, batch_size) for c, e in encs.items()}
    proj = projection_table({c: cap.resid for c, cap in caps.items()}, direction.vector)
    heads = heads_table({c: contributions(cm, cap.z, direction.vector) for c, cap in caps.items()}, top_k)
    chosen = top_heads(heads, top_k)
    att = attention_table_from({c: cap.regions for c, cap in caps.items()}, chosen)
    for name, group in groups.items():  # no adversarial part marked: no share to measure
        plain = [i for i, jb in enumerate(group) if jb.span is None]
        att.loc[(att.condition == name) & att.prompt_id.isin(plain), "suffix"] = float("nan")
    att = att[~att.condition.str.endswith(GOAL)]

    replies: dict[str, pd.DataFrame] = {}
    if judge is not None:
        with timer("replies"):
            for c in [n for n in encs if n not in ("harmful", "harmless")]:
                group = groups[c.removesuffix(GOAL)]
                requests = [jb.goal for jb in group] if c.endswith(GOAL) else [jb.request for jb in group]
                replies[c] = judge_replies(requests, generate(cm, encs[c], config.eval_tokens, batch_size,
                                                              progress=False), judge)
    layer = direction.layer
    at_layer = proj[proj.layer == layer].set_index(["condition", "prompt_id"]).cosine
    table = []
    for name, group in groups.items():
        shares = att[att.condition == name].groupby("prompt_id").suffix.mean()
        for i, jb in enumerate(group):
            row = {"name": name, "line": jb.line, "adversarial": jb.prompt[jb.span[0]:jb.span[1]] if jb.span else "",
                   "cosine": float(at_layer[(name, i)]),
                   "goal_cosine": float(at_layer[(name + GOAL, i)]) if (name + GOAL) in encs else float("nan"),
                   "attention_to_adversarial": float(shares.get(i, float("nan")))}
            if name in replies:
                r = replies[name].iloc[i]
                row |= {"success": bool(r.success), "substring_success": bool(r.substring_success),
                        "verdict": r.verdict, "reply": r.completion}
            table.append(row)
    table = pd.DataFrame(table)
    success = None
    if replies:
        success = {"substring": {c: float(df.substring_success.mean()) for c, df in replies.items()},
                   judge.name: {c: float(df.success.mean()) for c, df in replies.items()}}
    sentences = jailbreak_sentences(proj, att, layer, top_k, groups, success, judge.name if judge else None)
    summary = proj[proj.layer == layer].groupby("condition")[["cosine", "projection"]].mean().reset_index()
    with artifacts.atomic_dir(out_dir) as tmp:
        artifacts.write_csv(tmp / "jailbreaks.csv", table)
        artifacts.write_csv(tmp / "projection.csv", proj)
        artifacts.write_csv(tmp / "heads.csv", heads)
        artifacts.write_csv(tmp / "attention.csv", att)
        with timer("plots"):
            # the goals alone are in jailbreaks.csv; the plot keeps one line per name beside the references
            lines = proj[~proj.condition.str.endswith(GOAL)]
            plots = {"Cosine with the refusal direction by layer": plot_cosine_by_layer(lines, layer, tmp / "cosine_by_layer.png"),
                     "Top refusal heads: direct contribution": plot_head_contributions(
                         heads[~heads.condition.str.endswith(GOAL)], top_k, tmp / "head_contributions.png"),
                     "Attention of the top heads": plot_attention_shares(att, tmp / "attention_shares.png")}
        tables = {f"Mean cosine and projection at layer {layer}": summary,
                  "Each jailbreak": table.drop(columns=[c for c in ("reply",) if c in table])}
        if success:
            tables = {"Attack success by judge": success_frame(success), **tables}
        facts = {"model": f"{cm.name} ({cm.fingerprint})", "direction": f"layer {layer}, position {direction.position}",
                 "jailbreaks": f"{path} ({len(rows)} rows, {len(names)} names)",
                 "reference prompts": f"{len(harmful)} harmful, {len(harmless)} harmless"}
        md, html = write_report(tmp, "How these jailbreaks meet the refusal direction", sentences, plots, tables, facts)
        artifacts.write_json(tmp / "analysis.json", artifacts.run_record(
            model=cm.describe(), direction={"layer": layer, "position": direction.position}, jailbreaks=str(path),
            n_rows=len(rows), names=names, top_k=top_k, top_heads=[f"L{l}H{h}" for l, h in chosen],
            cosine_at_layer=summary.set_index("condition").cosine.to_dict(), success=success,
            sentences=sentences, timings_s=timer.seconds))
    log.info("analysis written to %s (%s)", out_dir, timer.seconds)
    return {"sentences": sentences, "success": success, "table": table, "report_md": out_dir / md.name,
            "report_html": out_dir / html.name}


def jailbreak_sentences(proj: pd.DataFrame, att: pd.DataFrame, layer: int, top_k: int,
                        groups: dict[str, list[Jailbreak]], success: dict | None, judge: str | None) -> list[str]:
    """One sentence per name: its cosine at the direction's layer against its goals' and the reference
    sets', its top heads' attention to the adversarial part, and its success by each judge."""
    cos = proj[proj.layer == layer].groupby("condition").cosine.mean()
    share = att.groupby("condition").suffix.mean()
    f = lambda x, pct=False: "n/a" if x != x else (f"{x:.1%}" if pct else f"{x:.3f}")  # noqa: E731
    out = [f"Reference at layer {layer} (the direction's): harmful prompts {f(cos.get('harmful', float('nan')))}, "
           f"harmless {f(cos.get('harmless', float('nan')))}; the top {top_k} refusal heads give "
           f"{f(att[att.condition == 'harmful'].instruction.mean(), True)} of their attention to a harmful "
           "instruction."]
    for name, group in groups.items():
        n_plain = sum(jb.span is None for jb in group)
        s = f"{name} ({len(group)} prompt{'s' if len(group) > 1 else ''}): cosine {f(cos.get(name, float('nan')))}"
        if name + GOAL in cos:
            s += f" (its goals alone: {f(cos[name + GOAL])})"
        if n_plain == len(group):
            s += "; no adversarial part marked, so no attention share"
        else:
            s += (f"; the top {top_k} heads give {f(share.get(name, float('nan')), True)} of their attention to the "
                  "adversarial part" + (f" ({n_plain} plain prompt(s) left out)" if n_plain else ""))
        if success:
            s += (f"; success {f(success[judge][name], True)} by the {judge} judge, "
                  f"{f(success['substring'][name], True)} by the substring judge")
            if name + GOAL in success[judge]:
                s += f" (goals alone: {f(success[judge][name + GOAL], True)}, {f(success['substring'][name + GOAL], True)})"
        out.append(s + ".")
    return out
