"""refusal-lab: refusal directions (Arditi et al. 2024), adversarial suffixes, and how suffixes beat refusal."""
from .errors import RefusalLabError
from .models import ChatModel, load_model
from .data import Prompt, builtin_prompts, load_prompts
from .directions import Direction, compute_direction, load_direction, save_direction
from .hooks import ablate_direction, add_direction, orthogonalize
from .metrics import evaluate, generate, is_refusal, refusal_scores

__all__ = [
    "RefusalLabError", "ChatModel", "load_model", "Prompt", "builtin_prompts", "load_prompts",
    "Direction", "compute_direction", "load_direction", "save_direction",
    "ablate_direction", "add_direction", "orthogonalize", "evaluate", "generate", "is_refusal", "refusal_scores",
]
