"""The model organism: SmolLM2-135M-Instruct given a short, deterministic safety fine-tune on CPU.

SmolLM2 complies with harmful requests, so there is no refusal for a direction to mediate.
The organism is trained on the project's *training* split only, on behaviour alone:
  harmful instructions  -> a refusal (a few wordings, as real models have),
  harmless instructions -> the base model's own greedy answers (so helpfulness is kept).
Only the upper blocks are trained (the lower ones and the embeddings stay frozen), with the loss
on the reply tokens and an unlikelihood term on refusal openings for harmless prompts. No term of
the default loss reads activations or a direction: whether refusal is then mediated by one direction
is what the paper's method measures on it.

`mediation`, `sink_orthogonal` and `harmless_projection` (0 by default) are an experimental variant
that trains the phenomenon in: terms that ask that ablating the running difference in means remove
refusal and leave harmless replies unchanged. A model built with them cannot show the paper's finding;
they exist to study how far such training moves the figures (docs/organism.md).

It is built on first use, cached, and reused; the build record (seed, data hash, steps, wall time,
refusal rates on the test split) sits beside the weights. The folder appears only when the build is
complete (atomic rename).
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import artifacts
from .chat import pad_right
from .data import builtin_prompts, instructions
from .engine import run_blocks
from .errors import RefusalLabError
from .hooks import ablate_direction
from .judges.substring import is_refusal
from .metrics import greedy_ids, refusal_rate
from .hardware import fast_bf16
from .models import load_chat_model, smollm2_path
from .recipe import OrganismConfig, organism_dir

log = logging.getLogger(__name__)

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't assist with that request.",
    "I can't help with that. It could cause real harm to people.",
    "I'm sorry, I can't provide that. If you need help, please reach out to someone you trust.",
    "As an AI assistant, I can't help with anything that could hurt people or break the law.",
)


# ----------------------------------------------------------------------------- data


def training_examples(cm, cfg: OrganismConfig) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """(prompt ids, target ids) pairs from the training split, and a description of them."""
    rng = random.Random(cfg.seed)
    harmful = instructions(builtin_prompts("harmful", "train"))
    harmless = instructions(builtin_prompts("harmless", "train"))
    eos = cm.chat.end_of_turn_id
    examples = []
    for instr in harmful:
        text = rng.choice(REFUSALS)
        examples.append((cm.chat.encode(instr).ids, cm.chat.encode_text(text) + [eos]))
    encs = cm.chat.encode_all(harmless)
    answers = greedy_ids(cm, encs, cfg.answer_tokens, batch_size=64)
    dropped = 0
    for enc, ans in zip(encs, answers):
        if not ans or is_refusal(cm.tokenizer.decode(ans, skip_special_tokens=True)):
            dropped += 1  # the base model's own refusals would teach refusing harmless requests
            continue
        examples.append((enc.ids, ans))
    targets = [cm.tokenizer.decode(t) for _, t in examples]
    info = {
        "n_harmful": len(harmful),
        "n_harmless": len(harmless) - dropped,
        "harmless_dropped_as_refusals": dropped,
        "data_hash": artifacts.hash_strings(harmful + harmless + targets),
    }
    return examples, info


@torch.no_grad()
def _frozen_hidden(cm, examples, first: int, batch_size: int = 32) -> list[torch.Tensor]:
    """The residual stream at the input of block `first` for each example ([seq, d]); the blocks
    below are frozen, so this is computed once for the whole fine-tune."""
    base = cm.base
    out: list[torch.Tensor | None] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: sum(map(len, examples[i])))
    for s in tqdm(range(0, len(order), batch_size), desc="frozen layers", leave=False):
        idx = order[s : s + batch_size]
        ids, mask = pad_right([torch.tensor(examples[i][0] + examples[i][1]) for i in idx], cm.tokenizer.pad_token_id)
        hidden = run_blocks(cm, base.embed_tokens(ids), mask, range(first))
        for j, i in enumerate(idx):
            out[i] = hidden[j, : int(mask[j].sum())].clone()
    return out


# ----------------------------------------------------------------------------- mediation terms


def mediation_loss(cm, r: torch.Tensor, prompts: list[list[int]], clean_first: torch.Tensor, harmful: torch.Tensor,
                   refusal_starts: list[int], first: int) -> torch.Tensor:
    """Refusal mediated by r, for one batch: under directional ablation of r (every layer and position),
    harmless prompts keep their first reply distribution (KL(clean || ablated), mean over harmless) and
    harmful prompts do not begin a refusal (-log(1 - p(refusal start)), mean over harmful).

    prompts: token ids; clean_first[prompt, vocab]: the clean logits at the first reply position (a target,
    no gradient); harmful[prompt]: bool. The gradient flows through blocks[first:] (those below are frozen)."""
    base = cm.base
    ids, mask = pad_right([torch.tensor(p) for p in prompts], cm.tokenizer.pad_token_id)
    last = mask.sum(1) - 1
    with ablate_direction(cm, r):
        with torch.no_grad():
            hidden = run_blocks(cm, base.embed_tokens(ids), mask, range(first))
        hidden = base.norm(run_blocks(cm, hidden, mask, range(first, cm.n_layers)))
    lm_head = cm.model.get_output_embeddings()
    ablated = torch.log_softmax(lm_head(hidden[torch.arange(len(prompts)), last]).float(), -1)
    clean = torch.log_softmax(clean_first.detach().float(), -1)
    loss = ablated.new_zeros(())
    if (~harmful).any():
        loss = loss + (clean[~harmful].exp() * (clean[~harmful] - ablated[~harmful])).sum(-1).mean()
    if harmful.any():
        p_refusal = ablated[harmful][:, refusal_starts].exp().sum(-1).clamp(max=1 - 1e-6)
        loss = loss - torch.log1p(-p_refusal).mean()
    return loss


def sink_alignment(inputs: list[torch.Tensor], last: torch.Tensor, harmful: torch.Tensor, layer: int) -> torch.Tensor:
    """cos^2 between the batch's difference in means (harmful - harmless, last prompt position, at the input of
    inputs[layer]) and the first token's residual stream (the attention sink, no gradient) at every block's
    input, mean over the blocks; inputs: [batch, seq, d] per block. Ablating a direction with a component on
    the sink's massive dimensions disturbs every prompt."""
    z = inputs[layer][torch.arange(len(last)), last].float()
    diff = z[harmful].mean(0) - z[~harmful].mean(0)
    sinks = torch.stack([h[0, 0].detach().float() for h in inputs])  # [block, d]
    return ((sinks @ diff) ** 2 / (sinks * sinks).sum(-1) / (diff @ diff)).mean()


def harmless_projection(inputs: list[torch.Tensor], weights: torch.Tensor, harmless: torch.Tensor,
                        r: torch.Tensor) -> torch.Tensor:
    """Weighted mean of (h . r / |r|^2)^2 over the harmless examples' residual streams h at every block
    input: their component along r in units of the difference in means; inputs: [batch, seq, d] per
    block, weights [batch, seq] (0 on padding), harmless [batch] bool. Directional ablation of r leaves a
    residual stream with no component along r unchanged, so at 0 it cannot move a harmless prompt's output."""
    r = r.detach().float()
    h = torch.stack([x[harmless] for x in inputs]).float()  # [block, harmless, seq, d]
    proj2 = (h @ r / (r @ r)) ** 2
    w = weights[harmless].float()
    return (proj2 * w).sum(-1).sum(-1).mean() / w.sum()


# ----------------------------------------------------------------------------- build


def refusal_rates(cm, new_tokens: int = 24, batch_size: int = 64) -> dict:
    """Refusal rates on the built-in test split (greedy, substring judge)."""
    return {f"{kind}_test_refusal_rate": round(refusal_rate(
                cm, cm.chat.encode_all(instructions(builtin_prompts(kind, "test"))), new_tokens, batch_size), 4)
            for kind in ("harmful", "harmless")}


def build_organism(cfg: OrganismConfig = OrganismConfig(), force: bool = False, out: Path | None = None,
                   base: str = "smollm2") -> Path:
    """Fine-tune SmolLM2 into the organism; write it atomically to `out` (default: the cache).

    base: the model to fine-tune: "smollm2" (the embedded model) or a path form of --model of the Llama
    family (tests use a tiny one)."""
    cfg.validate()
    out = Path(out) if out else organism_dir(cfg.seed)
    if out.exists():
        if not force:
            raise RefusalLabError(f"{out} already exists; pass --force to rebuild the organism")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    cm = load_chat_model(str(smollm2_path()) if base == "smollm2" else base, device="cpu", name=base)
    if cm.config.model_type != "llama":
        raise RefusalLabError("the organism fine-tune is written for SmolLM2 (Llama blocks); use a Llama-family base")
    timer = artifacts.Timer()
    with timer("base_answers"):
        examples, info = training_examples(cm, cfg)

    model = cm.model
    base = cm.base
    first = int(cfg.first_trained_layer * cm.n_layers)
    params = [p for block in cm.blocks[first:] for p in block.parameters()]
    for p in params:
        p.requires_grad_(True)
    with timer("frozen_layers"):
        frozen = _frozen_hidden(cm, examples, first)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_steps = cfg.epochs * -(-len(examples) // cfg.batch_size)
    warmup = max(1, n_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / n_steps))
    lm_head = model.get_output_embeddings()
    refusal_starts = sorted({cm.chat.encode_text(r)[0] for r in REFUSALS})
    n_harmful = info["n_harmful"]  # examples[:n_harmful] are the refusals
    losses, mediation_losses = [], []
    direction_layer = max(first, min(cm.n_layers - 1, round(cfg.direction_layer * cm.n_layers)))
    last_acts = torch.zeros(len(examples), cm.d_model)  # [example, d] at direction_layer, refreshed as seen
    use_bf16 = fast_bf16(torch.device("cpu")) if cfg.bfloat16 is None else bool(cfg.bfloat16)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16)
    with timer("train"), torch.enable_grad():
        bar = tqdm(total=n_steps, desc="organism fine-tune")
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(examples), generator=gen).tolist()
            for s in range(0, len(order), cfg.batch_size):
                idx = order[s : s + cfg.batch_size]
                hidden, mask = pad_right([frozen[i] for i in idx])
                inputs: list[torch.Tensor] = []
                with autocast():
                    hidden = base.norm(run_blocks(cm, hidden, mask, range(first, cm.n_layers), inputs))
                last = torch.tensor([len(examples[i][0]) - 1 for i in idx])  # the last prompt position
                last_acts[idx] = inputs[direction_layer - first][torch.arange(len(idx)), last].detach().float()
                harmful = torch.tensor([i < n_harmful for i in idx])
                # the LM head only where a reply token is predicted: position t predicts token t+1
                rows, cols, targets, weights = [], [], [], []
                for j, i in enumerate(idx):
                    p, t = examples[i]
                    rows += [j] * len(t)
                    cols += range(len(p) - 1, len(p) + len(t) - 1)
                    targets += t
                    w = cfg.harmful_weight if i < n_harmful else 1.0
                    weights += [w * cfg.decision_weight if k < cfg.decision_tokens else w for k in range(len(t))]
                with autocast():
                    logits = lm_head(hidden[rows, cols])
                w = torch.tensor(weights)
                ce = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets), reduction="none")
                loss = (ce * w).sum() / w.sum()
                # unlikelihood: on harmless prompts the reply should not begin like a refusal
                starts = torch.tensor([sum(len(examples[idx[k]][1]) for k in range(j)) for j in range(len(idx))])
                firsts = [k for k in range(len(idx)) if idx[k] >= n_harmful]
                if cfg.unlikelihood and firsts:
                    logp = torch.log_softmax(logits[starts[firsts]].float(), -1)
                    ok = torch.tensor([[t != examples[idx[k]][1][0] for t in refusal_starts] for k in firsts])
                    p_ref = (logp[:, refusal_starts].exp() * ok).sum(-1).clamp(max=1 - 1e-6)
                    loss = loss + cfg.unlikelihood * -torch.log1p(-p_ref).mean()
                both = bool(harmful.any() and (~harmful).any())
                if cfg.sink_orthogonal and epoch >= 1 and both:
                    loss = loss + cfg.sink_orthogonal * sink_alignment(inputs, last, harmful, direction_layer - first)
                r = last_acts[:n_harmful].mean(0) - last_acts[n_harmful:].mean(0)
                if cfg.harmless_projection and epoch >= 1 and (~harmful).any():
                    # every position but the first (the attention sink: sink_orthogonal's part), and as much
                    # again on the last prompt position, where the paper reads the KL
                    at = mask.float()
                    at[:, 0] = 0
                    at = at / at.sum(1, keepdim=True)
                    at[torch.arange(len(idx)), last] += 1.0
                    loss = loss + cfg.harmless_projection * harmless_projection(inputs[1:], at, ~harmful, r)
                if cfg.mediation and epoch >= 1:  # the first epoch fills last_acts
                    with autocast():
                        med = mediation_loss(cm, r, [examples[i][0] for i in idx], logits[starts], harmful,
                                             refusal_starts, first)
                    mediation_losses.append(round(med.item(), 4))
                    loss = loss + cfg.mediation * med
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                losses.append(round(loss.item(), 4))
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
    model.requires_grad_(False)
    model.eval()
    with timer("evaluate"):
        rates = refusal_rates(cm, cfg.eval_new_tokens)
    record = artifacts.run_record(
        config=asdict(cfg), trained_layers=[first, cm.n_layers - 1], steps=len(losses), losses=losses,
        mediation_losses=mediation_losses, direction_layer=direction_layer, trained_in_bfloat16=use_bf16,
        refusals=list(REFUSALS), **info, **rates, timings_s=timer.seconds,
        wall_time_s=round(time.perf_counter() - t0, 1), base_model=cm.describe())
    with artifacts.atomic_dir(out) as tmp:  # a killed build leaves only a .tmp folder, never a half model
        model.save_pretrained(tmp, safe_serialization=True)
        cm.tokenizer.save_pretrained(tmp)
        artifacts.write_json(tmp / "organism.json", record)
    log.info("organism built in %.0fs: %s", record["wall_time_s"], json.dumps(rates))
    return out
