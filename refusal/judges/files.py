"""Judging saved replies again: reading a replies file written by `refusal eval` (or any JSONL of prompt
and completion), and writing it judged beside it."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .. import artifacts
from ..errors import RefusalLabError
from .base import JudgeConfig, judge_slug, verdict_rates
from .hf import HFJudge
from .load import judge_name, load_judge

def read_replies(path: str | Path) -> list[dict]:
    """The rows of a JSONL file of replies: one JSON object per line with text `prompt` (the instruction)
    and `completion` (the reply) fields, as `refusal eval` writes."""
    path = Path(path)
    if not path.is_file():
        raise RefusalLabError(f"{path}: replies file not found; give a .jsonl file written by `refusal eval`")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RefusalLabError(f"{path}: not UTF-8 text; give a .jsonl file written by `refusal eval`") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RefusalLabError(f"{path}:{n}: invalid JSON ({e.msg}); a .jsonl file holds one JSON record per line") from None
        if not isinstance(row, dict):
            raise RefusalLabError(f"{path}:{n}: expected a JSON object with prompt and completion fields")
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str):
                what = "no" if key not in row or row[key] is None else "a non-text"
                raise RefusalLabError(f"{path}:{n}: {what} {key!r} field; each line needs text 'prompt' (the "
                                      "instruction) and 'completion' (the reply) fields, as `refusal eval` writes")
        rows.append(row)
    if not rows:
        raise RefusalLabError(f"{path}: no replies in the file (it is empty)")
    return rows


def judged_path(path: str | Path, judge: str) -> Path:
    """The default output of re-judging FILE.jsonl: FILE.judged-NAME.jsonl beside it."""
    path = Path(path)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(f"{stem}.judged-{judge_slug(judge)}.jsonl")


def judge_file(path: str | Path, config: JudgeConfig | str | None = None, out: str | Path | None = None,
               force: bool = False) -> dict:
    """Re-judge saved replies: every row of `path` with `judge`, `verdict` and `success` added (or replaced),
    written atomically to `out` (default judged_path), with `out`.record.json. Returns the record (judge,
    judge_options: its JudgeConfig fields, the classifier format as resolved; n, rates, success rate, out)."""
    name = judge_name(config)
    path = Path(path)
    out = Path(out) if out is not None else judged_path(path, name)
    if out.resolve() == path.resolve():
        raise RefusalLabError(f"{out} is the input file; choose another --out (the input is never overwritten)")
    artifacts.check_out(out, force=force)
    rows = read_replies(path)
    judge = load_judge(config)
    verdicts = judge.verdicts([r["prompt"] for r in rows], [r["completion"] for r in rows])
    lines = []
    for row, v in zip(rows, verdicts):
        row = {k: v2 for k, v2 in row.items() if k not in ("judge", "verdict", "success")}
        lines.append(json.dumps({**row, "judge": judge.name, "verdict": v, "success": v == "complies"},
                                ensure_ascii=False))
    artifacts.write_text(out, "\n".join(lines) + "\n")
    rates = verdict_rates(verdicts)
    options = {k: v for k, v in asdict(judge.config).items() if k != "name"} if isinstance(
        getattr(judge, "config", None), JudgeConfig) else {}
    if isinstance(judge, HFJudge):
        options["hf_format"] = judge.format  # as resolved from "auto"
    record = dict(input=str(path), out=str(out), judge=judge.name, judge_options=options, n=len(rows), rates=rates,
                  attack_success_rate=rates["complies"])
    artifacts.write_json(out.with_name(out.name + ".record.json"), artifacts.run_record(**record))
    return record
