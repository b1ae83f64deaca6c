"""The loader for every --model form.

`NAMED_MODELS` maps a name to a function returning the model's local Hugging Face folder, converted
or built on first use; the application registers its named models there (`register_model`: `smollm2`
and `organism`, refusal.app.models; `organism:SEED` is another seed's organism). `load_model(spec)` takes a name, a local model folder, a hub id
(`org/name`) or a `.gguf` file; `ModelConfig` holds the loading options a run records.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import option
from .errors import RefusalLabError
from .hooks import check_ablation_sites
from .models import ChatModel, accepted_forms, load_chat_model, resolve_model

log = logging.getLogger(__name__)

NAMED_MODELS: dict[str, Callable[[], Path]] = {}
SEEDED: set[str] = set()  # the named models that also come as NAME:SEED (another seed's build)


def register_model(name: str, folder: Callable[..., Path], seeded: bool = False) -> None:
    """Make `name` a --model value: `folder()` returns the model's local Hugging Face folder (converting or
    building it on first use); seeded: `name:SEED` is a value too, `folder(SEED)` its folder."""
    NAMED_MODELS[name] = folder
    if seeded:
        SEEDED.add(name)


def named(spec: str) -> tuple[str, int | None] | None:
    """(name, seed) of a named model's --model value (seed None for the plain name), else None."""
    if not isinstance(spec, str):
        return None
    if spec in NAMED_MODELS:
        return spec, None
    name, sep, seed = spec.partition(":")
    if sep and name in SEEDED and seed.isdigit():
        return name, int(seed)
    return None


@dataclass(frozen=True)
class ModelConfig:
    model: str = option("organism", "smollm2, organism (organism:SEED: another seed's), a Hugging Face model "
                                    "folder, a hub id, or a .gguf file")
    device: str | None = option(None, "cpu or cuda (None: cuda if present)")
    dtype: str | None = option(None, "auto, float32, bfloat16, float16 (None: float32 on CPU, the checkpoint's on GPU)")
    trust_remote_code: bool = option(False, "allow a model folder's own Python code")
    chat_template: str | None = option(None, "a Jinja chat template (file or text) for models without one")
    chat_template_kwargs: dict = option(help="options the chat template reads, e.g. {'enable_thinking': False}",
                                        factory=dict)


def resolve(spec: str) -> tuple[str, str]:
    """A --model value as (kind, local path or hub id): a named model's folder (built on first use), or a
    path form (refusal.models.resolve_model)."""
    found = named(spec)
    if found is not None:
        name, seed = found
        return spec, str(NAMED_MODELS[name]() if seed is None else NAMED_MODELS[name](seed))
    return resolve_model(spec, names=tuple(NAMED_MODELS))


def load_model(spec: str | ModelConfig, device: str | None = None, dtype: str | torch.dtype | None = None,
               trust_remote_code: bool = False, chat_template: str | None = None,
               chat_template_kwargs: dict | None = None) -> ChatModel:
    """A chat model from any --model form (or a ModelConfig, whose fields then replace the keywords). CPU
    by default unless CUDA is present. A model of an untested Llama-shaped family has its ablation sites
    checked here (a one-line error if ablation would not remove a direction from its residual stream)."""
    if isinstance(spec, ModelConfig):
        c = spec
        spec, device, dtype, trust_remote_code = c.model, c.device, c.dtype, c.trust_remote_code
        chat_template, chat_template_kwargs = c.chat_template, c.chat_template_kwargs
    if not spec or not isinstance(spec, str):
        raise RefusalLabError(f"no model given; --model accepts {accepted_forms(tuple(NAMED_MODELS))}")
    _, where = resolve(spec)
    cm = load_chat_model(where, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                         chat_template=chat_template, chat_template_kwargs=chat_template_kwargs, name=spec)
    if not cm.sites_checked:
        check_ablation_sites(cm)
    return cm
