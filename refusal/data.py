"""Prompt sets: the project's own harmful and harmless instructions, its borderline-but-safe
instructions and general text, and loaders for user files.

Built-in sets (refusal/prompts/, written for this project, none copied from a data set):
- harmful.jsonl, harmless.jsonl: {instruction, category, split}, split train/val/test;
- borderline.jsonl: {instruction, category, split="test"}: safe requests that look unsafe by their
  words (XSTest-style categories: homonyms, figurative language, safe targets, safe contexts, fiction,
  definitions, historical events, public facts about public figures, fictional characters' "private"
  details, nonsense groups), written for the project to measure false refusal; none is harmful, and
  none is in the harmful or harmless sets. An evaluation set only: every record is in the test split;
- general_text.jsonl: {text, genre}: 40 paragraphs (60-120 words) of ordinary English prose (science,
  cooking, history, how-to, short stories, emails, code explanations, ...), written for the project as
  held-out plain text for a language-modelling loss.

User files: .txt (one instruction per line), .json (a list of strings or of records),
.jsonl (one string or record per line), .csv. Records take the instruction from the first
present of instruction / goal / prompt / behavior (any case), so AdvBench, HarmBench,
JailbreakBench and Alpaca files load as they are; a `target` column is kept for attacks.
"""
from __future__ import annotations

import csv
import random
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from .artifacts import hash_strings
from .errors import RefusalLabError

INSTRUCTION_KEYS = ("instruction", "goal", "prompt", "behavior")
TARGET_KEYS = ("target",)
SPLITS = ("train", "val", "test")
KINDS = ("harmful", "harmless")  # the sets split into train / val / test
EVAL_SETS = ("borderline",)  # evaluation-only sets (test split)
BUILTIN_SETS = KINDS + EVAL_SETS
TEXT_SETS = ("general_text",)  # plain text, no instructions
MAX_FILE_BYTES = 200 * 1024 * 1024


@dataclass(frozen=True)
class Prompt:
    instruction: str
    category: str | None = None
    target: str | None = None
    split: str | None = None


def instructions(prompts: Sequence[Prompt]) -> list[str]:
    return [p.instruction for p in prompts]


def prompt_hash(prompts: Sequence[Prompt]) -> str:
    return hash_strings(instructions(prompts))


# ----------------------------------------------------------------------------- built-in sets


def builtin_prompts(kind: str, split: str | None = None) -> list[Prompt]:
    """The project's own instructions: kind 'harmful', 'harmless' or 'borderline', split train/val/test or
    None for all."""
    if kind not in BUILTIN_SETS:
        raise RefusalLabError(f"unknown prompt set {kind!r}; built-in sets are {', '.join(BUILTIN_SETS)}")
    if split is not None and split not in SPLITS:
        raise RefusalLabError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    text = resources.files("refusal").joinpath("prompts", f"{kind}.jsonl").read_text(encoding="utf-8")
    out = []
    for line in text.splitlines():
        if line.strip():
            rec = json.loads(line)
            out.append(Prompt(rec["instruction"], rec.get("category"), rec.get("target"), rec.get("split")))
    return [p for p in out if split is None or p.split == split]


def builtin_texts(name: str = "general_text") -> list[str]:
    """The project's own plain-text paragraphs (no chat template), e.g. for a language-modelling loss."""
    if name not in TEXT_SETS:
        raise RefusalLabError(f"unknown text set {name!r}; built-in text sets are {', '.join(TEXT_SETS)}")
    text = resources.files("refusal").joinpath("prompts", f"{name}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]


def text_hash(texts: Sequence[str]) -> str:
    """Order-sensitive hash of a list of texts (as prompt_hash is of a prompt set)."""
    return hash_strings(list(texts))


def resolve_prompts(spec: str | None, default: str = "harmful:test") -> list[Prompt]:
    """A --prompts value: a file path, or a built-in set 'harmful', 'harmless', 'borderline', 'harmful:test', ..."""
    spec = spec or default
    p = Path(spec).expanduser()
    if p.exists():
        return load_prompts(p)
    kind, _, split = spec.partition(":")
    if kind in BUILTIN_SETS:
        return builtin_prompts(kind, split or None)
    raise RefusalLabError(
        f"{spec}: prompt file not found (give a .txt/.json/.jsonl/.csv file or a built-in set such as harmful:test)"
    )


# ----------------------------------------------------------------------------- user files


def _read_text(path: Path) -> str:
    if not path.exists():
        raise RefusalLabError(f"{path}: prompt file not found; check the path")
    if not path.is_file():
        raise RefusalLabError(f"{path}: not a file; give a .txt/.json/.jsonl/.csv prompt file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise RefusalLabError(f"{path}: prompt file is {size >> 20} MiB; the limit is {MAX_FILE_BYTES >> 20} MiB")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RefusalLabError(f"{path}: cannot read ({e.strerror})") from None
    if b"\x00" in raw:
        raise RefusalLabError(f"{path}: binary file, not a prompt file (use UTF-8 text)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RefusalLabError(f"{path}: not UTF-8 text; save the prompt file as UTF-8") from None


def _pick(rec: dict, keys: Iterable[str]) -> object | None:
    lower = {str(k).lower(): v for k, v in rec.items()}
    for k in keys:
        if k in lower and lower[k] not in (None, ""):
            return lower[k]
    return None


def _from_item(item: object, where: str) -> Prompt:
    if isinstance(item, str):
        return Prompt(item)
    if isinstance(item, dict):
        instr = _pick(item, INSTRUCTION_KEYS)
        if instr is None:
            raise RefusalLabError(
                f"{where}: record has no instruction field; expected one of {', '.join(INSTRUCTION_KEYS)} "
                f"(found {', '.join(map(str, item.keys())) or 'no fields'})"
            )
        if not isinstance(instr, str):
            raise RefusalLabError(f"{where}: the instruction must be text, got {type(instr).__name__}")
        # Alpaca records carry an `input` that belongs to the instruction
        extra = item.get("input")
        if isinstance(extra, str) and extra.strip() and "instruction" in {str(k).lower() for k in item}:
            instr = f"{instr.strip()}\n\n{extra.strip()}"
        target = _pick(item, TARGET_KEYS)
        cat = _pick(item, ("category", "semanticcategory", "functionalcategory"))
        return Prompt(instr, None if cat is None else str(cat), None if target is None else str(target), item.get("split"))
    raise RefusalLabError(f"{where}: expected a string or a record, got {type(item).__name__}")


def load_prompts(path: str | Path) -> list[Prompt]:
    """Load instructions from a .txt, .json, .jsonl or .csv file; clear errors for bad files."""
    path = Path(path).expanduser()
    text = _read_text(path)
    suffix = path.suffix.lower()
    items: list[Prompt] = []
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RefusalLabError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}); fix the file, or give the prompts as .txt, one per line") from None
        if isinstance(data, dict):  # {"instructions": [...]} / {"data": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise RefusalLabError(f"{path}: expected a JSON list of strings or records")
            data = lists[0]
        if not isinstance(data, list):
            raise RefusalLabError(f"{path}: expected a JSON list of strings or records, got {type(data).__name__}")
        items = [_from_item(x, f"{path}[{i}]") for i, x in enumerate(data)]
    elif suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(_from_item(json.loads(line), f"{path}:{n}"))
                except json.JSONDecodeError as e:
                    raise RefusalLabError(f"{path}:{n}: invalid JSON ({e.msg}); a .jsonl file holds one JSON record per line") from None
    elif suffix == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text))
            fields = reader.fieldnames or []
            if not any(str(f).strip().lower() in INSTRUCTION_KEYS for f in fields):
                raise RefusalLabError(
                    f"{path}: no instruction column; expected one of {', '.join(INSTRUCTION_KEYS)} "
                    f"(found {', '.join(fields) or 'no header'})"
                )
            for n, row in enumerate(reader, 2):
                row = {str(k).strip(): v for k, v in row.items() if k is not None}
                if _pick(row, INSTRUCTION_KEYS) is None:
                    continue  # a row with an empty instruction cell
                items.append(_from_item(row, f"{path}:{n}"))
        except csv.Error as e:
            raise RefusalLabError(f"{path}: malformed CSV ({e}); fix the file or save it as .jsonl") from None
    elif suffix in (".txt", ""):
        items = [Prompt(line) for line in text.splitlines()]
    else:
        raise RefusalLabError(f"{path}: unsupported prompt file type {suffix!r}; use .txt, .json, .jsonl or .csv")
    items = [Prompt(p.instruction.strip(), p.category, p.target, p.split) for p in items]
    items = [p for p in items if p.instruction]
    if not items:
        raise RefusalLabError(f"{path}: no instructions found (the prompt set is empty); add instructions, one per line in .txt")
    return items


# ----------------------------------------------------------------------------- direction sets


def split_user_prompts(prompts: list, n_train: int, n_val: int, seed: int, what: str) -> tuple[list, list]:
    """A user's file: seeded shuffle, val first, then train (disjoint)."""
    if len(prompts) < 4:
        raise RefusalLabError(f"the {what} prompt set has {len(prompts)} instructions; need at least 4 (train + val)")
    items = list(prompts)
    random.Random(seed).shuffle(items)
    n_val = min(n_val, len(items) // 4 or 1)
    return items[n_val : n_val + n_train], items[:n_val]


def direction_sets(harmful: str | None, harmless: str | None, n_train: int, n_val: int, seed: int):
    """(harmful train, harmless train, harmful val, harmless val): built-in splits sampled with the seed,
    or users' files split by split_user_prompts."""
    out = []
    for kind, spec in (("harmful", harmful), ("harmless", harmless)):
        if spec is None:
            rng = random.Random(seed)
            train = builtin_prompts(kind, "train")
            val = builtin_prompts(kind, "val")
            train = rng.sample(train, min(n_train, len(train)))
            val = rng.sample(val, min(n_val, len(val)))
        else:
            train, val = split_user_prompts(load_prompts(spec), n_train, n_val, seed, kind)
        out.append((train, val))
    (ht, hv), (bt, bv) = out
    return ht, bt, hv, bv
