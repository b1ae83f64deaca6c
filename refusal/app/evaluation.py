"""The evaluation stage (`refusal eval`): greedy replies to a prompt set, optionally with a suffix and
with the refusal direction ablated or added, judged for refusal (the paper's substring list) and for
attack success (the substring judge and the configured one), written as JSONL with a record beside it."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from refusal import artifacts
from refusal.config import check_fields, option
from refusal.data import instructions, resolve_prompts
from refusal.directions import Direction, addition_vector, check_direction, folder_and_index, load_direction
from refusal.engine import check_lengths
from refusal.errors import RefusalLabError
from refusal.ablation import AblationConfig, ablate, load_ablation
from refusal.hooks import add_direction
from refusal.judges import Judge, JudgeConfig, add_verdicts, load_judge, verdict_rates
from refusal.metrics import evaluate
from refusal.models import ChatModel
from refusal.suffix import check_suffix_ids, load_suffix, suffix_placement, suffix_record


@dataclass(frozen=True)
class EvalConfig:
    prompts: str = option("harmful:test", "prompt file, or a built-in set such as harmful:test")
    suffix: str | None = option(None, "suffix.json (or its run folder), a text file, or the suffix text itself")
    ablate: str | None = option(None, "ablate this direction (a direction folder)")
    actadd: str | None = option(None, "add this direction at its layer (a direction folder; DIR:i adds a "
                                      "subspace folder's basis vector i, scaled to the difference in means)")
    coeff: float = option(1.0, "activation addition coefficient")
    max_new_tokens: int = option(64, "greedy reply tokens", ge=1)
    batch_size: int = option(16, "prompts per forward pass", ge=1)
    judge: JudgeConfig = option(help="the judge of attack success (refusal.judges.JudgeConfig)", factory=JudgeConfig)

    def validate(self) -> None:
        check_fields(self)
        if self.ablate and self.actadd:
            raise RefusalLabError("give one of --ablate and --actadd, not both")


@dataclass
class EvalInputs:
    """What an evaluation reads, loaded and checked (check_eval)."""

    prompts: list
    suffix_text: str | None
    suffix_ids: list[int] | None
    direction: Direction | None
    ablation: AblationConfig | None  # how --ablate's folder ablates (the paper's unless it records another)
    judge: Judge


def check_eval(config: EvalConfig) -> EvalInputs:
    """The evaluation's checks that need no model (by the CLI before it loads one, and by run_eval): the
    config, the prompts, the suffix, the direction and its ablation, and the judge, returned loaded."""
    config.validate()
    prompts = resolve_prompts(config.prompts)
    text, ids = (None, None) if config.suffix is None else load_suffix(config.suffix)
    where, index = folder_and_index(config.actadd) if config.actadd else (config.ablate, 0)
    direction = load_direction(where) if where else None
    if config.actadd:
        addition_vector(direction, index)  # an index the folder does not have fails here
    ablation = load_ablation(config.ablate) if config.ablate else None
    if ablation is not None:
        ablation.check_hookable()
    return EvalInputs(prompts, text, ids, direction, ablation, load_judge(config.judge))


def run_eval(cm: ChatModel, config: EvalConfig, out: str | Path) -> dict:
    """Replies to config.prompts under the configured suffix and intervention, judged, written to `out`
    (JSONL, atomically) and `out`.record.json. Returns the record (refusal rate, attack success rates by
    judge, verdict rates, whether the suffix was made on another model: transfer)."""
    inputs = check_eval(config)
    prompts, suffix_text, suffix_ids, d, judge = (inputs.prompts, inputs.suffix_text, inputs.suffix_ids,
                                                  inputs.direction, inputs.judge)
    out = Path(out)
    if suffix_ids is not None:
        check_suffix_ids(config.suffix, suffix_ids, cm.tokenizer)
    suffix = suffix_ids if suffix_ids is not None else suffix_text
    placement = suffix_placement(config.suffix) if config.suffix else None
    check_lengths(cm, cm.chat.encode_all(instructions(prompts), suffix, placement), config.max_new_tokens)
    intervention, ctx = "none", contextlib.nullcontext()
    if d is not None:
        check_direction(d, cm)
    if config.ablate:
        intervention, ctx = f"ablate {config.ablate}", ablate(cm, d, inputs.ablation)
        if not inputs.ablation.is_paper:
            intervention += f" ({inputs.ablation.summary()})"
    elif config.actadd:
        intervention = f"actadd {config.actadd} coeff {config.coeff}"
        ctx = add_direction(cm, addition_vector(d, folder_and_index(config.actadd)[1]), d.layer, config.coeff)
    with ctx:
        df = evaluate(cm, instructions(prompts), suffix, config.max_new_tokens, config.batch_size,
                      placement=placement)
    df.insert(1, "category", [p.category for p in prompts])
    add_verdicts(df, judge)  # substring_success (the paper's judge), judge, verdict, success (by the judge)
    if suffix_text is not None:
        df["suffix"] = suffix_text
    with artifacts.atomic_path(out) as tmp:
        df.to_json(tmp, orient="records", lines=True, force_ascii=False)
    made_on = ((suffix_record(config.suffix) or {}).get("model") or {}).get("fingerprint") if config.suffix else None
    record = artifacts.run_record(
        model=cm.describe(), prompts=str(config.prompts), n=len(df), intervention=intervention,
        suffix=suffix_text, placement=None if placement is None else {"message": placement.message,
                                                                        "system": placement.system},
        suffix_model_fingerprint=made_on, transfer=bool(made_on and made_on != cm.fingerprint),
        refusal_rate=df.refused.mean(), n_refused=int(df.refused.sum()), mean_refusal_score=df.refusal_score.mean(),
        judge=judge.name, attack_success_rate=df.success.mean(),  # by `judge`
        attack_success_rates={"substring": df.substring_success.mean(), judge.name: df.success.mean()},
        verdict_rates=verdict_rates(df.verdict), max_new_tokens=config.max_new_tokens)
    artifacts.write_json(out.with_name(out.name + ".record.json"), record)
    return record
