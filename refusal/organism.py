"""The model organism: SmolLM2 with a short deterministic safety fine-tune (built in a later step)."""
from __future__ import annotations

from pathlib import Path

from .errors import RefusalLabError
from .models import cache_dir


def organism_path() -> Path:
    path = cache_dir() / "organism"
    if (path / "config.json").is_file():
        return path
    raise RefusalLabError("the model organism is not available yet: its build (`refusal organism build`) is not implemented")
