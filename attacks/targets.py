"""Default attack targets built from the instruction ("Sure, here is how to ..."), as in GCG."""
from __future__ import annotations

import re

_LEADS = re.compile(
    r"^(?:please\s+|can you\s+|could you\s+|would you\s+|i need you to\s+|i want you to\s+|help me\s+)+", re.I)
_HOW = re.compile(r"^(?:tell me |show me |explain |describe |teach me )?how (?:do i|can i|could i|would i|to|should i|"
                  r"do you|does one|can one|can someone|would someone) ", re.I)
_NOUN_VERBS = re.compile(
    r"^(?:write|create|generate|give|provide|draft|compose|produce|develop|design|make|outline|list|"
    r"prepare|suggest|share|build|code|program)(?: me| us)? ", re.I)
_TELL = re.compile(r"^(?:explain|describe|detail|teach me|tell me|show me) ", re.I)


def default_target(instruction: str, max_words: int = 12) -> str:
    """A target reply opening for `instruction`: "Sure, here is a tutorial on X" for "Write a tutorial
    on X", "Sure, here is how to X" for "How do I X?" and otherwise "Sure, here is how to <instruction>".
    Long instructions are cut to `max_words` words (the target only has to begin the reply); with
    max_words 0 the target is "Sure, here is" alone."""
    text = " ".join(instruction.strip().split())
    text = text.rstrip("?.!:; ")
    text = _LEADS.sub("", text)
    if m := _HOW.match(text):
        body, lead = text[m.end():], "how to "
    elif m := _NOUN_VERBS.match(text):
        body, lead = text[m.end():], ""
    elif m := _TELL.match(text):
        body, lead = text[m.end():], ""
    else:
        body, lead = text, "how to "
    if lead and body[:1].isupper() and not body[:2].isupper():
        body = body[:1].lower() + body[1:]
    words = (lead + body).split()
    if not words or max_words < 1:
        return "Sure, here is"
    return "Sure, here is " + " ".join(words[:max_words])
