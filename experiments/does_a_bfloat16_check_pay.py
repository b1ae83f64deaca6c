"""Would generating a success check's reply in bfloat16 first (the screening weights), and again at the model's
precision only when the judge says the bfloat16 reply complies, make checking cheaper?

Found: not enough to pay. On the organism (AMD EPYC with AVX-512 BF16, 2 cores) a 32-token greedy reply after a
matched "Sure, here is" takes 1.87 s at float32 and 1.34 s in bfloat16 (1.40x: one-row decoding is bound by
reading the weights, and the LM head's 49,152 rows stay large), and 4 of 12 bfloat16 replies differ from the
float32 ones. A failing check would cost 28% less, a passing one 1.34 + 1.87 s, and every bfloat16 reply
misjudged as failing delays a success by at least a step: the checks stay at the model's precision
(docs/results.md#checking-in-bfloat16-first).

    python experiments/does_a_bfloat16_check_pay.py [--model organism] [--prompts 12]

Replies to harmful validation prompts, each with a random 16-token suffix, the target's tokens known (as in
the native engine's target+judge check: only what follows the target is generated).
"""
from __future__ import annotations

import argparse
import time

import torch

from attacks.gcg import low_precision, low_precision_weights
from refusal.data import builtin_prompts, instructions
from refusal.decode import greedy_replies
from refusal.metrics import reply_texts
from refusal.hardware import machine_info
from refusal.registry import load_model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args(argv)
    cm = load_model(args.model)
    weights = low_precision_weights(cm.model, torch.bfloat16)
    target = cm.tokenizer("Sure, here is", add_special_tokens=False).input_ids
    gen = torch.Generator().manual_seed(0)
    same, t32, t16 = 0, 0.0, 0.0
    prompts = instructions(builtin_prompts("harmful", "val"))[: args.prompts]
    for instruction in prompts:
        suffix = torch.randint(200, 40000, (16,), generator=gen).tolist()
        enc = cm.chat.encode(instruction, suffix)
        t = time.perf_counter()
        exact = greedy_replies(cm, [enc], args.tokens, [target])
        t32 += time.perf_counter() - t
        with low_precision(weights, torch.bfloat16, cm.device.type):
            t = time.perf_counter()
            low = greedy_replies(cm, [enc], args.tokens, [target])
            t16 += time.perf_counter() - t
        same += exact == low
        if exact != low:
            print("differs:", reply_texts(cm, exact)[0][:70], "|", reply_texts(cm, low)[0][:70])
    n = len(prompts)
    print(f"{machine_info(cm.device)['cpu']}: float32 {t32 / n:.2f} s/reply, bfloat16 {t16 / n:.2f} s/reply "
          f"({t32 / t16:.2f}x); identical replies {same}/{n}")


if __name__ == "__main__":
    main()
