"""The model organism's recipe (its config) and where a build of it is cached.

Loading the organism needs only this: whether the cached build was made with the recipe the code now
has. The training itself (refusal.organism) is imported only to build.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import check_fields, option
from .models import cache_dir


@dataclass(frozen=True)
class OrganismConfig:
    """The organism's fine-tune (`refusal organism build`); the cached organism is rebuilt when it changes."""

    seed: int = option(0, "seed of the data order, the refusal wordings and the initialisation", ge=0)
    answer_tokens: int = option(24, "harmless targets: the base model's first greedy reply tokens", ge=1)
    epochs: int = option(3, "passes over the training examples", ge=1)
    batch_size: int = option(16, "examples per optimizer step", ge=1)
    lr: float = option(1e-4, "AdamW learning rate (linear warm-up over a tenth of the steps, then linear decay)", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay", ge=0)
    first_trained_layer: float = option(0.4, "blocks from this fraction of the depth up are trained (below: frozen)", ge=0, le=1)
    eval_new_tokens: int = option(32, "greedy reply tokens the build record's refusal rates judge", ge=1)
    decision_weight: float = option(4.0, "extra loss weight on the first reply tokens, where refuse-or-answer is decided", ge=0)
    decision_tokens: int = option(3, "the first reply tokens decision_weight applies to", ge=0)
    unlikelihood: float = option(4.0, "harmless prompts: weight of -log(1 - p(a refusal's first token)) at the first "
                                      "reply position", ge=0)
    harmful_weight: float = option(3.0, "loss weight of the refusal targets relative to the harmless answers", gt=0)
    # the experimental variant that trains the phenomenon in (0 = off; see the module docstring), from epoch 2:
    mediation: float = option(0.0, "experimental: weight of mediation_loss under ablation of the running "
                                   "difference in means", ge=0)
    sink_orthogonal: float = option(0.0, "experimental: weight of sink_alignment (the difference in means vs the "
                                         "first token)", ge=0)
    harmless_projection: float = option(0.0, "experimental: weight of harmless_projection (harmless residual "
                                             "streams along the difference in means)", ge=0)
    direction_layer: float = option(0.7, "experimental: the running difference in means' depth (last prompt position)", ge=0, le=1)
    bfloat16: bool | None = option(None, "bfloat16 autocast for the fine-tune (weights and optimizer stay float32); "
                                         "None: as REFUSAL_LAB_BFLOAT16 says (auto: where the CPU multiplies "
                                         "bfloat16 fast, AMX or AVX-512 BF16)")

    def validate(self) -> None:
        check_fields(self)


# What the recipe did before each of these fields existed: a build record without one was built so.
BEFORE_FIELD = {"harmful_weight": 1.0, "mediation": 0.0, "sink_orthogonal": 0.0, "direction_layer": 0.7,
                "harmless_projection": 0.0, "bfloat16": False}


def recorded_config(record: dict) -> dict | None:
    """The recipe a build record describes, every field filled in (None if the record has none)."""
    built = record.get("config") if isinstance(record, dict) else None
    if not isinstance(built, dict):
        return None
    return {**asdict(OrganismConfig()), **BEFORE_FIELD, **built}


def organism_dir(seed: int = 0) -> Path:
    return cache_dir() / "organism" / f"seed-{seed}"


def cached_organism(seed: int = 0) -> Path | None:
    """The cached organism's folder if it was built with the code's recipe (OrganismConfig(seed=seed)), else None."""
    path = organism_dir(seed)
    if not ((path / "config.json").is_file() and (path / "organism.json").is_file()):
        return None
    try:
        built = recorded_config(json.loads((path / "organism.json").read_text()))
    except (OSError, ValueError):
        return None
    return path if built == asdict(OrganismConfig(seed=seed)) else None
