"""Does probe sampling (a draft model scores every candidate, the attacked model only a probe set and the
draft's best) pay, and how well does a draft agree with the model it stands in for?

Found: (AMD EPYC with AVX-512 BF16, 2 cores; docs/results.md#probe-sampling) per step 1.91x faster with a
SmolLM2-135M-shaped draft for a random Llama-1B-shaped target (36.84 against 19.32 s/step); on the organism
the base SmolLM2 (the only trained draft here, the same size) agrees with rho 0.36-0.73, makes a step
0.84-0.88x as fast and the loss fall slower per step: an option, not a default. Two parts, since no pair of
trained models of different sizes with one tokenizer is on the CPU machines:

    python experiments/does_probe_sampling_pay.py agreement [--model organism] [--draft smollm2] [--prompts 2] [--steps 8]
    python experiments/does_probe_sampling_pay.py speed [--target llama-1b] [--draft smollm2-135m] [--steps 3]

`agreement`: trained weights, the organism attacked with the base SmolLM2 as its draft (same size, so no speed
to gain: it measures the draft's rank agreement, which sets how many candidates the attacked model scores)
on harmful validation prompts, with and without the draft: the median Spearman rho per prompt, s/step and
the best loss after every step. `speed`: randomly initialised models of real shapes with the SmolLM2
tokenizer (a Llama-3.2-1B-shaped target and a SmolLM2-135M-shaped draft); s/step with and without the draft
(random weights agree by chance only, rho near 0, the case where probe sampling scores the most). Width
128 (a probe set of 8), the target objective, every step run.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from attacks.gcg import GCG, GCGConfig
from attacks.targets import default_target
from refusal.data import builtin_prompts, instructions
from refusal.models import smollm2_path
from refusal.registry import load_model

SHAPES = {  # hidden, layers, heads, kv heads, MLP width
    "llama-1b": (2048, 16, 32, 8, 8192),
    "llama-3b": (3072, 28, 24, 8, 8192),
    "smollm2-135m": (576, 30, 9, 3, 1536),
    "smollm2-360m": (960, 32, 15, 5, 2560),
}


def random_model(shape: str, folder: Path, seed: int):
    """A randomly initialised Llama of `shape` with the SmolLM2 tokenizer, saved in `folder`, loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    hidden, layers, heads, kv, mlp = SHAPES[shape]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=mlp, max_position_embeddings=2048, tie_word_embeddings=True))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return load_model(str(folder))


def attack(cm, prompt: str, steps: int, width: int, draft=None) -> tuple[float, list[float], list[float]]:
    cfg = GCGConfig(steps=steps, search_width=width, success_check="target", early_stop=False)
    res = GCG(cm, [prompt], [default_target(prompt)], cfg, draft=draft).run(progress=False)
    best = [min(res.losses[: k + 1]) for k in range(len(res.losses))]
    return res.elapsed_s / res.steps_run, best, res.agreement


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=("agreement", "speed"))
    ap.add_argument("--model", default="organism")
    ap.add_argument("--draft", default="smollm2")
    ap.add_argument("--target", default="llama-1b", choices=tuple(SHAPES))
    ap.add_argument("--draft-shape", default="smollm2-135m", choices=tuple(SHAPES))
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--search-width", type=int, default=128)
    args = ap.parse_args(argv)
    prompts = instructions(builtin_prompts("harmful", "val"))[: args.prompts]
    with tempfile.TemporaryDirectory() as tmp:
        if args.part == "agreement":
            cm, draft = load_model(args.model), load_model(args.draft)
        else:
            cm = random_model(args.target, Path(tmp) / "target", 0)
            draft = random_model(args.draft_shape, Path(tmp) / "draft", 1)
            prompts = prompts[:1]
        print(f"attacked {cm.name}, draft {draft.name}; width {args.search_width}, {args.steps} steps")
        for i, p in enumerate(prompts):
            s_plain, best_plain, _ = attack(cm, p, args.steps, args.search_width)
            s_probe, best_probe, rho = attack(cm, p, args.steps, args.search_width, draft)
            print(f"prompt {i + 1}: s/step {s_plain:.2f} without the draft, {s_probe:.2f} with it "
                  f"({s_plain / s_probe:.2f}x); median rho {statistics.median(rho):.2f} (steps: "
                  f"{' '.join(f'{r:.2f}' for r in rho)})")
            print(f"  best loss by step without: {' '.join(f'{x:.3f}' for x in best_plain)}")
            print(f"  best loss by step with:    {' '.join(f'{x:.3f}' for x in best_probe)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
