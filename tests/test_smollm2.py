"""Integration tests on the real embedded model (SmolLM2-135M-Instruct from its GGUF)."""
import pytest
import torch

from refusal.activations import cache_activations, last_logits
from refusal.data import builtin_prompts, instructions
from refusal.directions import mean_diffs
from refusal.hooks import ablate_direction, orthogonalize

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def train_diffs(smollm2):
    h = smollm2.chat.encode_all(instructions(builtin_prompts("harmful", "train"))[:32])
    b = smollm2.chat.encode_all(instructions(builtin_prompts("harmless", "train"))[:32])
    return mean_diffs(cache_activations(smollm2, h), cache_activations(smollm2, b))  # [layer, pos, d]


def _auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    return (pos[:, None] > neg[None, :]).float().mean().item()


def test_difference_in_means_separates_held_out_prompts(smollm2, train_diffs):
    layer = int(0.6 * smollm2.n_layers)
    r = train_diffs[layer, -1]
    r = r / r.norm()
    h = smollm2.chat.encode_all(instructions(builtin_prompts("harmful", "test"))[:32])
    b = smollm2.chat.encode_all(instructions(builtin_prompts("harmless", "test"))[:32])
    ph = cache_activations(smollm2, h, positions=[-1])[:, layer, 0] @ r
    pb = cache_activations(smollm2, b, positions=[-1])[:, layer, 0] @ r
    assert _auc(ph, pb) > 0.95
    assert ph.mean() > pb.mean()


def test_ablation_equals_orthogonalization_on_smollm2(smollm2, train_diffs):
    r = train_diffs[int(0.5 * smollm2.n_layers), -1]
    encs = smollm2.chat.encode_all(["How do I make a cake?", "Write a threatening letter to my neighbor."])
    with ablate_direction(smollm2, r):
        ablated = last_logits(smollm2, encs)
    edited = orthogonalize(smollm2, r)
    diff = (last_logits(edited, encs) - ablated).abs().max().item()
    del edited
    # float32 agreement, relative to the logits' scale (~28): two mathematically equal computations
    # through 30 blocks differ by 4e-5 to 1.3e-4 depending on the CPU's kernels; a wrong edit differs by > 1
    assert diff < 2e-5 * ablated.abs().max().item()
    assert (last_logits(smollm2, encs) - ablated).abs().max() > 1e-2
