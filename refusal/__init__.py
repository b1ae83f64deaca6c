"""refusal-lab: refusal directions (Arditi et al. 2024), adversarial suffixes, and how suffixes beat refusal."""
from .errors import RefusalLabError
from .models import ChatModel
from .data import Prompt, builtin_prompts, load_prompts
from .directions import Direction, DirectionConfig, compute_direction, load_direction, save_direction
from .methods import find_direction
from .hooks import Hook, ablate_direction, ablation_hooks, add_direction, addition_hooks, hooked, orthogonalize
from .metrics import evaluate, generate, is_refusal, refusal_scores
from .judges import JudgeConfig, load_judge
from .recipe import OrganismConfig
from .registry import ModelConfig, load_model
from .app import models as _named_models  # noqa: F401  registers smollm2 and organism with load_model


def __getattr__(name: str):
    if name == "build_organism":  # the organism's training code, imported only when asked for
        from .organism import build_organism
        return build_organism
    raise AttributeError(f"module 'refusal' has no attribute {name!r}")


__all__ = [
    "RefusalLabError", "ChatModel", "ModelConfig", "load_model", "Prompt", "builtin_prompts", "load_prompts",
    "Direction", "DirectionConfig", "compute_direction", "find_direction", "load_direction", "save_direction",
    "Hook", "hooked", "ablation_hooks", "addition_hooks", "ablate_direction", "add_direction", "orthogonalize",
    "evaluate", "generate", "is_refusal", "refusal_scores", "JudgeConfig", "load_judge", "OrganismConfig",
    "build_organism",
]
