"""How close a LoRA adapter of each rank comes to a norm-preserving edit (which is not low-rank).

Found: close. On the organism's chosen norm-preserving edit of runs/abl7-s0 (AMD EPYC, 2026-12-07), the
default rank 3 cuts each matrix's change with a relative error of 0.053 on average (0.096 at worst), and
the first reply token's KL(exact edit || adapter) on 32 harmless test prompts is 0.00005, against the
edit's own 0.078 from the unedited model; rank 1: 0.059 / 0.00018, rank 32: 0.036 / 0.00001
(docs/results.md).


    python experiments/how_close_a_low_rank_adapter_comes.py [--model organism] [--study runs/abl7-s0]
                                  [--ranks 1 3 8 32] [--prompts 32]

The study's chosen ablation (its direction folder's ablation.json, as `refusal abliterate` writes it) is
written as a model edit (the exact form) and as an adapter of each rank (refusal.ablation.write_adapter).
For each rank: the largest and mean relative Frobenius error of the cut matrices (adapter.json), and on
harmless test prompts the KL(exact edit || adapter) of the first reply token (the quantity the search's KL
measures) and the largest logit gap; the adapter's own KL from the unedited model beside the exact edit's.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from refusal.ablation import abliterate, load_ablation, write_adapter
from refusal.activations import last_logits
from refusal.data import builtin_prompts, instructions
from refusal.directions import load_direction
from refusal.errors import RefusalLabError
from refusal.models import ChatModel
from refusal.registry import load_model


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(p || q) over prompts of the next-token distributions, [batch, vocab] logits each."""
    p, q = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--study", default="runs/abl7-s0", help="a `refusal abliterate` folder (its direction/)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 3, 8, 32])
    ap.add_argument("--prompts", type=int, default=32, help="harmless test prompts")
    args = ap.parse_args(argv)
    try:
        from peft import PeftModel

        cm = load_model(args.model)
        ddir = Path(args.study) / "direction"
        d, ablation = load_direction(ddir, cm), load_ablation(ddir)
        if not ablation.norm_preserving:
            raise RefusalLabError(f"{ddir}: its ablation is not norm-preserving; its adapter is exact at rank 1")
        encs = cm.chat.encode_all(instructions(builtin_prompts("harmless", "test")[:args.prompts]))
        base = last_logits(cm, encs)
        exact = last_logits(abliterate(cm, d, ablation), encs)
        print(f"{ablation.summary()}\nexact edit: KL from the unedited model {kl(base, exact):.4f}\n")
        print("| rank | max relative error | mean relative error | KL(exact \\|\\| adapter) | max logit gap | "
              "adapter's KL from unedited |")
        print("|---|---|---|---|---|---|")
        for rank in args.ranks:
            with tempfile.TemporaryDirectory() as tmp:
                rec = write_adapter(cm, d, Path(tmp) / "adapter", ablation, rank=rank)
                with warnings.catch_warnings():  # peft's notices and transformers deprecations on loading
                    warnings.simplefilter("ignore")
                    peft_model = PeftModel.from_pretrained(copy.deepcopy(cm.model), str(Path(tmp) / "adapter"))
            adapted = ChatModel(peft_model.base_model.model, cm.tokenizer, name=cm.name, source=cm.source)
            logits = last_logits(adapted, encs)
            a = rec["approximation"]
            print(f"| {rank} | {a['max_relative_error']:.4f} ({a['worst_matrix']}) | {a['mean_relative_error']:.4f} | "
                  f"{kl(exact, logits):.5f} | {float((logits - exact).abs().max()):.3f} | {kl(base, logits):.4f} |",
                  flush=True)
    except RefusalLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
