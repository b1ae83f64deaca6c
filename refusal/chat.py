"""Chat formatting with token-level bookkeeping.

A prompt is built from token segments so that every region is known exactly:

    prefix (template, system prompt) | instruction | [separator | suffix] | post-instruction

Where the adversarial string sits is a Placement: by default a suffix after the instruction, as above;
any user-message template with `{instruction}` and `{optim_str}` (a prefix, an infix), or a system prompt
with `{optim_str}`. Every piece of a template is tokenized on its own, as the default's separator is.

The post-instruction tokens are the template tokens between the end of the user's
instruction and the start of the assistant's reply (for ChatML
`<|im_end|>\\n<|im_start|>assistant\\n`), indexed -k..-1 from the end of the prompt. They are read off
the template as rendered, so whatever a generation prompt adds after the assistant header (Qwen3's empty
thinking block when thinking is off) is part of them, and whatever a template puts before the user's
message (a default system prompt, a date line) is part of the prefix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from jinja2 import TemplateError

from .errors import RefusalLabError

# what a chat template (Jinja, through the tokenizer) raises on a conversation it does not accept: the
# template's problem, which the user can fix with --chat-template; anything else is a bug here
TEMPLATE_ERRORS = (TemplateError, ValueError, TypeError, KeyError)

_SENTINEL = "XQZINSTRUCTIONXQZ"
_SYSTEM_SENTINEL = "XQZSYSTEMXQZ"
OPTIM = "{optim_str}"
INSTRUCTION = "{instruction}"
DEFAULT_MESSAGE = "{instruction} {optim_str}"


@dataclass(frozen=True)
class Placement:
    """Where the adversarial string goes. `message`: the user's message as a template holding
    {instruction} once and, unless the string goes in the system prompt, {optim_str} once (default: a
    suffix after a space). `system`: a system prompt holding {optim_str} once, or None."""

    message: str = DEFAULT_MESSAGE
    system: str | None = None

    def check(self) -> None:
        """One-line errors for a template that does not place the instruction and the string once each."""
        if self.message.count(INSTRUCTION) != 1:
            raise RefusalLabError(f"the message template {self.message!r} must hold {INSTRUCTION} exactly once")
        in_message, in_system = self.message.count(OPTIM), (self.system or "").count(OPTIM)
        if self.system is not None and in_system != 1:
            raise RefusalLabError(f"the system template {self.system!r} must hold {OPTIM} exactly once")
        if self.system is not None and in_message:
            raise RefusalLabError(f"{OPTIM} is in both the system and the message template; put it in one")
        if self.system is None and in_message != 1:
            raise RefusalLabError(f"the message template {self.message!r} must hold {OPTIM} exactly once (or give a "
                                  "system template that does)")

    @property
    def is_default(self) -> bool:
        return self.message == DEFAULT_MESSAGE and self.system is None

    @staticmethod
    def of(config) -> "Placement":
        """The placement a config (or a suffix.json's config dict) records; the default where it has none
        (attacks from before placements existed)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        return Placement(get("message", DEFAULT_MESSAGE) or DEFAULT_MESSAGE, get("system", None))


def _pieces(template: str) -> list[str]:
    """template split into its literal text and its {instruction} / {optim_str} markers, in order."""
    out, rest = [], template
    while rest:
        hits = [i for i in (rest.find(INSTRUCTION), rest.find(OPTIM)) if i >= 0]
        if not hits:
            out.append(rest)
            break
        i = min(hits)
        marker = INSTRUCTION if rest.startswith(INSTRUCTION, i) else OPTIM
        out += [rest[:i], marker] if i else [marker]
        rest = rest[i + len(marker):]
    return out


@dataclass
class Encoded:
    """One chat prompt as token ids, with the regions as [start, end) spans."""

    ids: list[int]
    instruction: tuple[int, int]
    suffix: tuple[int, int]  # empty span (end, end) when there is no suffix
    post: tuple[int, int]

    @property
    def n_post(self) -> int:
        return self.post[1] - self.post[0]

    def __len__(self) -> int:
        return len(self.ids)


def read_template(template: str | None) -> str | None:
    """A chat template given as a file path or as the Jinja text itself."""
    if template is None:
        return None
    p = Path(template)
    if len(template) < 4096 and "{" not in template and p.exists():
        if not p.is_file():
            raise RefusalLabError(f"{template}: chat template path is not a file")
        return p.read_text(encoding="utf-8")
    if "{" not in template:
        raise RefusalLabError(f"{template}: chat template file not found (give a path or the Jinja text)")
    return template


class ChatFormat:
    """Splits the model's chat template around the user's message, once, into token segments."""

    def __init__(self, tokenizer, chat_template: str | None = None, template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        # options the template reads (e.g. enable_thinking=False for Qwen3), passed at every rendering
        self.template_kwargs = dict(template_kwargs or {})
        template = read_template(chat_template)
        if template is not None:
            tokenizer.chat_template = template
        if not getattr(tokenizer, "chat_template", None):
            raise RefusalLabError(
                "this model's tokenizer has no chat template; pass one with --chat-template FILE_OR_JINJA"
            )
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True,
                **self.template_kwargs)
        except TEMPLATE_ERRORS as e:
            raise RefusalLabError(f"the chat template failed to render a user message ({e})") from e
        if text.count(_SENTINEL) != 1:
            raise RefusalLabError("the chat template does not place the user's message verbatim exactly once")
        before, after = text.split(_SENTINEL)
        self.prefix_ids: list[int] = self.encode_text(before)
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
        if adds_bos and self.prefix_ids[:1] != [bos]:
            self.prefix_ids = [bos] + self.prefix_ids  # templates that rely on the tokenizer's BOS
        self.post_ids: list[int] = self.encode_text(after)
        if not self.post_ids:
            raise RefusalLabError("the chat template has no tokens after the user's message (no assistant turn)")
        self.sep_ids: list[int] = self.encode_text(" ")
        self.end_of_turn_id: int | None = self._end_of_turn()

    def _end_of_turn(self) -> int | None:
        """The token that ends an assistant turn (ChatML: <|im_end|>), read off the template."""
        tok = self.tokenizer
        try:
            text = tok.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False,
                **self.template_kwargs)
            after = text.split(_SENTINEL, 1)[1]
        except (*TEMPLATE_ERRORS, IndexError):  # a template without an assistant turn of its own
            return tok.eos_token_id
        ids = self.encode_text(after.strip()) if after.strip() else []
        if ids and (ids[0] in tok.all_special_ids or ids[0] in getattr(tok, "added_tokens_decoder", {})):
            return ids[0]
        return tok.eos_token_id

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end a reply: the template's end of turn and the tokenizer's EOS."""
        return [i for i in dict.fromkeys([self.end_of_turn_id, self.tokenizer.eos_token_id]) if i is not None]

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens, no template)."""
        if not text:
            return []
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RefusalLabError(f"text is not valid Unicode (it holds a lone surrogate): {text[:40]!r}; remove that character") from None
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    @property
    def n_post(self) -> int:
        return len(self.post_ids)

    def suffix_ids(self, suffix: str) -> list[int]:
        """Token ids of a suffix given as text (tokenized on its own, as the attack optimizes it)."""
        return self.encode_text(suffix)

    def encode(self, instruction: str, suffix: Sequence[int] | str | None = None,
               placement: Placement | None = None) -> Encoded:
        """The prompt as token ids with its regions. `placement`: where a suffix goes (default: after the
        instruction and a space); a prompt without one is the instruction alone."""
        if not isinstance(instruction, str):
            raise RefusalLabError(f"instruction must be text, got {type(instruction).__name__}")
        instruction = instruction.strip()
        if not instruction:
            raise RefusalLabError("empty instruction; every prompt needs some text")
        instr = self.encode_text(instruction)
        if not instr:
            raise RefusalLabError(f"the instruction {instruction[:40]!r} has no tokens (this tokenizer drops its "
                                  "characters); give some text")
        if isinstance(suffix, str):
            suffix = self.suffix_ids(suffix)
        suffix = list(suffix or [])
        if suffix and placement is not None and not placement.is_default:
            return self._placed(instr, suffix, placement)
        ids = list(self.prefix_ids)
        i0 = len(ids)
        ids += instr
        i1 = len(ids)
        if suffix:
            ids += self.sep_ids
        s0 = len(ids)
        ids += suffix
        s1 = len(ids)
        ids += self.post_ids
        return Encoded(ids, (i0, i1), (s0, s1), (s1, len(ids)))

    def encode_all(self, instructions: Sequence[str], suffix: Sequence[int] | str | None = None,
                   placement: Placement | None = None) -> list[Encoded]:
        return [self.encode(x, suffix, placement) for x in instructions]

    def _placed(self, instr: list[int], suffix: list[int], placement: Placement) -> Encoded:
        """The prompt with the string where `placement` puts it (encode's non-default path)."""
        ids: list[int] = []
        spans = {}

        def add(template: str) -> None:
            for piece in _pieces(template):
                start = len(ids)
                ids.extend(instr if piece == INSTRUCTION else suffix if piece == OPTIM else self.encode_text(piece))
                if piece in (INSTRUCTION, OPTIM):
                    spans[piece] = (start, len(ids))

        if placement.system is None:
            ids += self.prefix_ids
        else:
            before, between = self._system_segments()
            ids += before
            add(placement.system)
            ids += between
        add(placement.message)
        end = len(ids)
        ids += self.post_ids
        return Encoded(ids, spans[INSTRUCTION], spans[OPTIM], (end, len(ids)))

    def _system_segments(self) -> tuple[list[int], list[int]]:
        """The template's tokens before a system prompt, and between it and the user's message."""
        if not hasattr(self, "_system"):
            try:
                text = self.tokenizer.apply_chat_template(
                    [{"role": "system", "content": _SYSTEM_SENTINEL}, {"role": "user", "content": _SENTINEL}],
                    tokenize=False, add_generation_prompt=True, **self.template_kwargs)
            except TEMPLATE_ERRORS as e:
                raise RefusalLabError(f"the chat template does not take a system prompt ({e}); put {OPTIM} in the "
                                      "user's message instead") from e
            if text.count(_SYSTEM_SENTINEL) != 1 or text.count(_SENTINEL) != 1 or \
                    text.index(_SYSTEM_SENTINEL) > text.index(_SENTINEL):
                raise RefusalLabError("the chat template does not place a system prompt verbatim once before the "
                                      f"user's message; put {OPTIM} in the user's message instead")
            before, rest = text.split(_SYSTEM_SENTINEL)
            between, after = rest.split(_SENTINEL)
            if self.encode_text(after) != self.post_ids:
                raise RefusalLabError("the chat template ends a turn differently after a system prompt; put "
                                      f"{OPTIM} in the user's message instead")
            head = self.encode_text(before)
            if self.prefix_ids[:1] != head[:1] and self.prefix_ids[:1] == [self.tokenizer.bos_token_id]:
                head = self.prefix_ids[:1] + head  # templates that rely on the tokenizer's BOS
            self._system = (head, self.encode_text(between))
        return self._system

    def render(self, instruction: str, suffix: Sequence[int] | str | None = None,
               placement: Placement | None = None) -> str:
        """The prompt as text (for display)."""
        return self.tokenizer.decode(self.encode(instruction, suffix, placement).ids)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    position_ids: torch.Tensor  # [batch, seq]
    offsets: torch.Tensor  # [batch] left-padding added to each row


def pad_right(seqs: Sequence[torch.Tensor], value: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad tensors [len, ...] into [batch, width, ...] filled with `value`, and a 0/1 mask [batch, width]
    (long): every row's positions count from 0, so a position mask can be built per prompt."""
    if not seqs:
        raise RefusalLabError("empty batch")
    width = max(x.shape[0] for x in seqs)
    out = seqs[0].new_full((len(seqs), width, *seqs[0].shape[1:]), value)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, x in enumerate(seqs):
        out[i, : x.shape[0]] = x
        mask[i, : x.shape[0]] = 1
    return out, mask


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Left-pad token lists into a batch; positions count real tokens only (so padding changes nothing)."""
    if not seqs:
        raise RefusalLabError("empty batch")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    offsets = torch.zeros(len(seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        off = width - len(s)
        offsets[i] = off
        ids[i, off:] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, off:] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids.to(device), mask.to(device), pos.to(device), offsets.to(device))
