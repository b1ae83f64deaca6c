"""Could a bound on the target loss skip candidates? (issue 6: an exact speed-up idea, measured)

Found: no; a bound on partial target losses prunes 0% of the candidates (AMD EPYC, 2026-11-23;
docs/results.md).


The target loss of a candidate is the mean over prompts of the mean cross-entropy over target tokens;
every term is >= 0, so a candidate whose loss on the first k target tokens already reaches the full loss
of another candidate cannot win and need not run its remaining target tokens. This script takes the
suffixes of an attack run at a few steps, samples the candidates GCG would sample there, computes every
candidate's per-token cross-entropy on every prompt, and prints how many candidates such a bound would
prune for k = 1..6.

    python experiments/can_a_loss_bound_prune_candidates.py --run runs/main [--model organism] [--steps 3 15 25]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch


def main(argv=None) -> int:
    from attacks.gcg import GCG, GCGConfig, sample_candidates
    from refusal.engine import expand_cache
    from refusal.registry import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a run folder with attack/suffix.json and attack/steps.csv")
    ap.add_argument("--model", default="organism")
    ap.add_argument("--steps", type=int, nargs="+", default=[3, 15, 25])
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    rec = json.loads((Path(args.run) / "attack" / "suffix.json").read_text())
    steps = pd.read_csv(Path(args.run) / "attack" / "steps.csv")
    cfg = rec["config"]
    cm = load_model(args.model)
    g = GCG(cm, rec["prompts"], rec["targets"], GCGConfig(steps=1, search_width=cfg["search_width"], topk=cfg["topk"],
                                                           suffix_len=cfg["suffix_len"], seed=0))
    for step in args.steps:
        ids = torch.tensor(cm.tokenizer(steps.suffix[step], add_special_tokens=False).input_ids)
        if len(ids) != cfg["suffix_len"]:
            print(f"step {step}: its suffix does not re-tokenize to {cfg['suffix_len']} tokens; skipped")
            continue
        with torch.enable_grad():
            grad = g.token_gradient(ids, g.slots)
        cands = torch.unique(sample_candidates(ids, grad, cfg["search_width"], cfg["topk"], 1, g.not_allowed,
                                               torch.Generator().manual_seed(step)), dim=0)
        per = []  # per prompt: ce[candidate, target token] / n_target_tokens
        for s in g.slots:
            n, nt = len(cands), len(s.target_ids)
            x = torch.cat([cands, torch.cat([s.post_t, s.target_t])[None].expand(n, -1)], 1)
            off, T = len(s.before), x.shape[1]
            h = cm.base(input_ids=x, cache=expand_cache(s.cache, n, off), use_cache=True,
                        position_ids=torch.arange(off, off + T)[None].expand(n, -1))[0]
            logits = cm.logits_from_hidden(h[:, T - nt - 1:T - 1].reshape(n * nt, -1)).float().view(n, nt, -1)
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), s.target_t[None].expand(n, -1), reduction="none")
            per.append(ce / nt)
        total = sum(p.sum(1) for p in per) / len(per)
        print(f"step {step}: {len(cands)} candidates on {len(per)} prompts; loss min {total.min():.3f}, "
              f"median {total.median():.3f}, max {total.max():.3f}")
        for k in (1, 2, 3, 4, 6):
            partial = sum(p[:, :k].sum(1) for p in per) / len(per)
            bound = total[partial.argmin()]  # the full loss of the most promising candidate
            print(f"  first {k} target tokens: {float((partial / total).mean()):.0%} of the loss; "
                  f"pruned {float((partial >= bound).float().mean()):.0%} of the candidates")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
