"""Jailbreaks of any kind as prompts with a marked adversarial part, for the analysis
(`refusal analyze --jailbreaks FILE.jsonl`).

A jailbreak file is JSON Lines, one object a line:
- `name`: the condition the row belongs to (rows sharing a name are analysed together);
- `prompt`: the user's message;
- where its adversarial part is, one of: an `{optim_str}` marker in the prompt and `adversarial`, the
  string that replaces it (a GCG suffix, an AutoDAN prefix, ...); or `span: [start, end]`, the character
  offsets of the adversarial part in the prompt; or neither (a plain prompt: a PAIR rewrite, a role-play
  framing), which is analysed without the attention share;
- `goal` (optional): the plain harmful request, the row's paired baseline and what its reply is judged
  against (a PAIR or role-play prompt may not contain it); without it, the prompt itself is judged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .chat import ChatFormat, Encoded
from .errors import RefusalLabError

MARKER = "{optim_str}"
FIELDS = ("name", "prompt", "adversarial", "span", "goal")


@dataclass(frozen=True)
class Jailbreak:
    name: str
    prompt: str  # the user's message, the adversarial string in place of the marker
    span: tuple[int, int] | None  # character offsets of the adversarial part in prompt (None: a plain prompt)
    goal: str | None  # the plain harmful request
    line: int  # the line of the file it came from

    @property
    def request(self) -> str:
        """What a reply is judged against: the goal where given, else the prompt."""
        return self.goal or self.prompt


def parse_jailbreak(obj, where: str) -> Jailbreak:
    """One row as a Jailbreak; a RefusalLabError naming `where` (FILE:LINE) when it is malformed."""
    if not isinstance(obj, dict):
        raise RefusalLabError(f"{where}: a row must be a JSON object with name and prompt")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise RefusalLabError(f"{where}: unknown field(s) {', '.join(unknown)}; a row has {', '.join(FIELDS)}")
    name, prompt, goal = obj.get("name"), obj.get("prompt"), obj.get("goal")
    if not isinstance(name, str) or not name.strip():
        raise RefusalLabError(f"{where}: no name (each row names its condition)")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RefusalLabError(f"{where}: no prompt")
    if goal is not None and (not isinstance(goal, str) or not goal.strip()):
        raise RefusalLabError(f"{where}: goal must be a non-empty string when given")
    adversarial, span = obj.get("adversarial"), obj.get("span")
    marked = MARKER in prompt
    if marked and prompt.count(MARKER) > 1:
        raise RefusalLabError(f"{where}: the prompt holds {MARKER} more than once")
    if marked and adversarial is None:
        raise RefusalLabError(f"{where}: the prompt has an {MARKER} marker but no adversarial string")
    if adversarial is not None and not marked:
        raise RefusalLabError(f"{where}: adversarial is given but the prompt has no {MARKER} marker to put it in")
    if marked and span is not None:
        raise RefusalLabError(f"{where}: give a {MARKER} marker or a span, not both")
    if marked:
        if not isinstance(adversarial, str) or not adversarial.strip():
            raise RefusalLabError(f"{where}: adversarial must be a non-empty string")
        start = prompt.index(MARKER)
        text = prompt[:start] + adversarial + prompt[start + len(MARKER):]
        return Jailbreak(name.strip(), text, (start, start + len(adversarial)), goal, _line(where))
    if span is not None:
        if (not isinstance(span, list) or len(span) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                     for x in span)):
            raise RefusalLabError(f"{where}: span must be [start, end], two character offsets")
        start, end = span
        if not 0 <= start < end <= len(prompt):
            raise RefusalLabError(f"{where}: span [{start}, {end}] lies outside the prompt's {len(prompt)} "
                                  "characters (0 <= start < end <= length)")
        if not prompt[start:end].strip():
            raise RefusalLabError(f"{where}: span [{start}, {end}] marks only whitespace")
        return Jailbreak(name.strip(), prompt, (start, end), goal, _line(where))
    return Jailbreak(name.strip(), prompt, None, goal, _line(where))


def _line(where: str) -> int:
    return int(where.rsplit(":", 1)[1])


def load_jailbreaks(path: str | Path) -> list[Jailbreak]:
    """Every row of a jailbreak file (see the module), checked whole before anything is returned."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RefusalLabError(f"{path}: no such jailbreak file (JSON Lines: name, prompt, and adversarial or span)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RefusalLabError(f"{path}:{n}: not JSON ({e.msg})") from None
        rows.append(parse_jailbreak(obj, f"{path}:{n}"))
    if not rows:
        raise RefusalLabError(f"{path}: no rows")
    return rows


def token_span(chat: ChatFormat, text: str, span: tuple[int, int]) -> tuple[list[int], tuple[int, int]]:
    """text's token ids (tokenized whole, as the model reads it) and the [start, end) token span that covers
    the characters span: every token that overlaps them."""
    tok = chat.tokenizer
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc.input_ids), enc.offset_mapping
        hit = [i for i, (a, b) in enumerate(offsets) if a < span[1] and b > span[0]]
        if hit:
            return ids, (hit[0], hit[-1] + 1)
    # a slow tokenizer: the three pieces one after another (the seams may tokenize differently)
    before, middle, after = (chat.encode_text(t) for t in (text[:span[0]], text[span[0]:span[1]], text[span[1]:]))
    return before + middle + after, (len(before), len(before) + len(middle))


def encode_jailbreak(chat: ChatFormat, jb: Jailbreak) -> Encoded:
    """The row as the model reads it: the template around the whole user message (its `instruction` span),
    the adversarial part's tokens as its `suffix` span (inside the message; empty for a plain prompt)."""
    if jb.span is None:
        user, sub = chat.encode_text(jb.prompt), None
    else:
        user, sub = token_span(chat, jb.prompt, jb.span)
    if not user:
        raise RefusalLabError(f"line {jb.line}: the prompt has no tokens")
    i0 = len(chat.prefix_ids)
    ids = list(chat.prefix_ids) + user
    i1 = len(ids)
    ids += chat.post_ids
    adversarial = (i1, i1) if sub is None else (i0 + sub[0], i0 + sub[1])
    return Encoded(ids, (i0, i1), adversarial, (i1, len(ids)))


def encode_jailbreaks(chat: ChatFormat, rows: Sequence[Jailbreak]) -> list[Encoded]:
    return [encode_jailbreak(chat, jb) for jb in rows]
