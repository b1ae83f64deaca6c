"""The native GCG engine (Zou et al. 2023, "Universal and Transferable Adversarial Attacks on Aligned
Language Models"), written for refusal-lab.

One step: the gradient of the loss with respect to the one-hot suffix tokens gives, for every suffix
position, the top-k most promising replacement tokens; `search_width` candidates each replace
`n_replace` random positions with random picks from those; every candidate's exact loss is computed
in batched forward passes, and the best one becomes the new suffix.

Objectives (all minimised):
  target     cross-entropy of the target reply ("Sure, here is ...") after the prompt, as GCG;
  direction  the scalar projection of the last prompt position's residual stream onto the refusal
             direction, averaged over the direction's layer and every layer after it, in units of the
             harmful-minus-harmless mean difference at the direction's layer (harmful prompts sit
             near +1 above harmless ones). Needs no target and no logits;
  attention  minus the share of attention the top refusal heads (ranked, as the analysis ranks them, by
             their direct contribution to the direction on the attacked prompts without a suffix) give
             from the last prompt position to the adversarial string, averaged over the heads;
  mixed      target_weight * target + direction_weight * direction + attention_weight * attention
             (a term of weight 0 is not computed).

Universal suffixes: one suffix for many prompts, the loss averaged over the active prompts; prompts
are added one at a time as in the GCG paper, when the active ones all succeed (or after `patience`
steps without progress).

Ensembles (the GCG paper's transfer recipe): with `ensemble`, the same prompts run on other models of the
same tokenizer, and every (prompt, model) pair is one more slot whose loss joins the mean and whose token
gradient joins the sum; a prompt is added with all its models at once, and success counts the pairs.

Speed (see `refusal bench`): the key/value cache of each prompt's text before the suffix is computed
once; candidates that change the suffix first at position p reuse the cache of the current suffix up
to p and run only the tokens from p on; duplicate candidates are dropped; the LM head runs only at
the target positions; candidates that do not survive a decode/encode round trip are filtered in one
batched tokenizer call. The state after every step is a small JSON checkpoint (suffix, histories and
the random generator's state), so a killed run resumes to exactly the same result.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from refusal import artifacts
from refusal.artifacts import hash_strings
from refusal.directions import check_direction
from refusal.capture import capture_last_position
from refusal.engine import cache_fits, eager_attention, expand_cache, max_batch_tokens, run_prefix
from refusal.heads import contributions, heads_table, top_heads
from refusal.errors import RefusalLabError
from refusal.hooks import capture_hooks, hooked
from refusal.judges import check_loaded_judge, load_judge
from refusal.decode import greedy_replies
from refusal.metrics import reply_texts
from refusal.hardware import fast_bf16
from refusal.models import ChatModel
from refusal.registry import load_model
from refusal.suffix import disallowed_token_ids, retokenizes

# the settings live in their own module; re-exported here, where scripts have always imported them
from .gcg_config import (OBJECTIVES, SCREEN_DTYPES, SUCCESS_CHECKS, TARGET_LOSSES, TERMS,  # noqa: F401
                         GCGConfig, comparable_config, config_dict)

log = logging.getLogger(__name__)

CW_MARGIN = 1.0  # the cw loss of a target token stops falling once its logit leads every other by this
CHECKPOINT_VERSION = 1
# a forward pass costs about as much as this many extra tokens; used to decide how candidates are
# bucketed. CPU: measured on SmolLM2-135M on 2 cores (a 1-row pass of 42 tokens takes as long as about
# 80 tokens in a large pass; planning with 64 made a width-128 step 20% faster than with 600, 256 was in
# between). CUDA (and other accelerators): launches cost more than tokens (not measured).
OVERHEAD_TOKENS = {"cpu": 64, "cuda": 600}


@dataclass
class AttackResult:
    suffix: str
    token_ids: list[int]
    best_loss: float
    best_step: int
    losses: list[float]  # per step: the chosen candidate's loss on the active prompts
    success: list[float]  # per step: share of active prompts that succeed with the chosen suffix
    n_active: list[int]
    suffixes: list[str]
    steps_run: int
    stopped_early: bool
    elapsed_s: float
    success_flags: list[bool] = field(default_factory=list)  # of the best suffix, per prompt (active ones)
    step_times: list[float] = field(default_factory=list)  # per step: seconds since the start when it ended
    agreement: list[float] = field(default_factory=list)  # probe sampling, per step: the draft's rank agreement
    # per step: seconds in each of STEP_PARTS (a part an engine does not have is 0), the rest of the step last
    profile: list[list[float]] = field(default_factory=list)


# the parts a step's wall time is split into (steps.csv, the bench): the token gradient, candidate scoring
# (forward passes over candidates, rescoring and combined candidates included), success checking
# (generating replies and judging them); "other" (sampling, filtering, bookkeeping) is the rest of the step
STEP_PARTS = ("gradient", "scoring", "check")


class StepClock:
    """Wall time of the parts of a step. `part` names the part running now (None between parts), so that a
    counter of tokens can attribute them; `take` returns the seconds per part since the last take."""

    def __init__(self, device: torch.device, on_take: Callable[[], None] | None = None):
        self.cuda = device.type == "cuda"
        self.part: str | None = None
        self.seconds = dict.fromkeys(STEP_PARTS, 0.0)
        self.on_take = on_take  # called at every step's end (take): a token counter's mark

    @contextlib.contextmanager
    def timing(self, part: str):
        if self.part is not None:  # inside a part already (nanoGCG's probe sampling scores inside its scoring)
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        t0, self.part = time.perf_counter(), part
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[part] += time.perf_counter() - t0
            self.part = None

    def reset(self) -> None:
        """Forget the parts timed so far (work before the first step)."""
        self.seconds = dict.fromkeys(STEP_PARTS, 0.0)

    def take(self, step_s: float) -> list[float]:
        """[gradient, scoring, check, other] seconds of a step that took `step_s`; the clock starts again."""
        parts = [self.seconds[p] for p in STEP_PARTS]
        self.seconds = dict.fromkeys(STEP_PARTS, 0.0)
        if self.on_take is not None:
            self.on_take()
        return [round(x, 4) for x in parts + [max(0.0, step_s - sum(parts))]]


# ----------------------------------------------------------------------------- precision


def screening_dtype(screen: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The lower precision candidates are screened in, or None (the model's own precision throughout)."""
    if screen == "model":
        return None
    if screen == "auto":
        return torch.bfloat16 if model_dtype == torch.float32 and fast_bf16(device) else None
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16}[screen]
    return None if dt == model_dtype else dt


@contextlib.contextmanager
def low_precision(weights: dict, dtype: torch.dtype, device_type: str):
    """Autocast to `dtype`, with the Linear weights given (parameter -> its copy in `dtype`, made once by
    `low_precision_weights`) swapped in, so they are not cast again at every call; restored after."""
    saved = [(p, p.data) for p in weights]
    try:
        for p, w in weights.items():
            p.data = w
        with torch.autocast(device_type, dtype=dtype):
            yield
    finally:
        for p, w in saved:
            p.data = w


def low_precision_weights(model: torch.nn.Module, dtype: torch.dtype) -> dict:
    """Copies in `dtype` of the model's Linear weights (the tied LM head included), keyed by parameter."""
    out = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.weight not in out:
            out[m.weight] = m.weight.detach().to(dtype)
    return out


# ----------------------------------------------------------------------------- tokens


def initial_suffix_ids(cm: ChatModel, length: int, init: str | None = None) -> list[int]:
    """Token ids of the starting suffix: `init` tokenized, or "x x x ... x" of `length` tokens."""
    tok = cm.tokenizer
    if init is not None:
        ids = tok(init, add_special_tokens=False).input_ids
        if not ids:
            raise RefusalLabError("the initial suffix is empty")
        return list(ids)
    ids = tok("x" + " x" * (length - 1), add_special_tokens=False).input_ids
    if len(ids) != length:
        ids = tok("x", add_special_tokens=False).input_ids[:1] * length
    return list(ids)


def universal_patience(steps: int, n_prompts: int) -> int:
    """The patience of a universal attack: its steps shared among its prompts, half each (at least 3), so that
    every prompt is added within the budget even when none succeeds."""
    return max(3, steps // (2 * n_prompts))


def sample_candidates(ids: torch.Tensor, grad: torch.Tensor, search_width: int, topk: int, n_replace: int,
                      not_allowed: torch.Tensor | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """GCG candidates [search_width, L]: each replaces n_replace random positions of ids [L] with random
    picks from the top-k tokens of the negative gradient [L, vocab] at that position (as nanogcg's
    sample_ids_from_grad, with an explicit random generator so that runs can be resumed exactly)."""
    grad = grad.clone()
    if not_allowed is not None and len(not_allowed):
        grad[:, not_allowed.to(grad.device)] = float("inf")
    top = (-grad).topk(topk, dim=1).indices.cpu()  # [L, topk]
    L = ids.shape[0]
    pos = torch.argsort(torch.rand((search_width, L), generator=generator), dim=1)[:, :n_replace]  # [w, n_replace]
    pick = torch.randint(0, topk, (search_width, n_replace, 1), generator=generator)
    vals = torch.gather(top[pos], 2, pick).squeeze(2)  # [w, n_replace]
    return ids.cpu().repeat(search_width, 1).scatter_(1, pos, vals)


# ----------------------------------------------------------------------------- the engine


def load_draft(cm: ChatModel, spec: str | ChatModel, role: str = "draft model") -> ChatModel:
    """The draft model of probe sampling, or a model of an ensemble (`role`): any --model form, or a loaded
    ChatModel, on the attacked model's device and in its precision; it must share the attacked model's
    tokenizer (candidates are token ids)."""
    other = spec if isinstance(spec, ChatModel) else load_model(spec, device=str(cm.device), dtype=cm.dtype)
    if other.tokenizer.get_vocab() != cm.tokenizer.get_vocab():
        raise RefusalLabError(f"the {role} {other.name} has another tokenizer than {cm.name}; a suffix's token ids "
                              "must mean the same on both (a model of the same family)")
    if other.model.get_input_embeddings().num_embeddings != cm.model.get_input_embeddings().num_embeddings:
        raise RefusalLabError(f"the {role} {other.name} has {other.model.get_input_embeddings().num_embeddings} "
                              f"embedding rows, {cm.name} {cm.model.get_input_embeddings().num_embeddings}; their "
                              "token gradients cannot be summed")
    return other


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks of x [n] from 0, ties given their average rank (as Spearman's rho needs)."""
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[x.argsort()] = torch.arange(len(x), dtype=torch.float64)
    _, group = torch.unique(x, return_inverse=True)
    total = torch.zeros(int(group.max()) + 1, dtype=torch.float64).index_add_(0, group, ranks)
    return (total / torch.bincount(group).double())[group]


def rank_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two loss vectors [n] (0 when n < 2 or either is constant)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    if len(a) < 2 or (a == a[0]).all() or (b == b[0]).all():
        return 0.0
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def refusal_heads(cm: ChatModel, instructions: Sequence[str], direction, k: int) -> list[tuple[int, int]]:
    """The top k (layer, head) by mean direct contribution to the direction at the last position of the
    prompts without a suffix (refusal.heads, as the analysis ranks them)."""
    cap = capture_last_position(cm, cm.chat.encode_all(list(instructions)), attention=False)
    return top_heads(heads_table({"harmful": contributions(cm, cap.z, direction.vector)}, k), k)


class _Slot:
    """One prompt: the fixed token pieces around the suffix, the target, and the cache of the text
    before the suffix."""

    def __init__(self, engine: "GCG", instruction: str, target: str | None):
        cm = engine.cm
        self.engine = engine  # the engine of the model this prompt runs on (an ensemble has several)
        L = engine.suffix_len
        enc = cm.chat.encode(instruction, [0] * L, engine.placement)
        self.instruction = instruction
        self.target = target
        self.before = enc.ids[: enc.suffix[0]]  # everything before the string and everything after it
        self.post = enc.ids[enc.suffix[1]:]
        self.target_ids = cm.tokenizer(target, add_special_tokens=False).input_ids if target else []
        if engine.needs_target and not self.target_ids:
            raise RefusalLabError(f"the target for {instruction[:40]!r} is empty; give a target or use --objective direction")
        total = len(enc.ids) + len(self.target_ids)
        if total > cm.max_context:
            raise RefusalLabError(f"prompt, suffix and target are {total} tokens, more than the model's context {cm.max_context}; "
                                  "shorten the prompt or the target, or lower --suffix-len")
        dev = cm.device
        self.post_t = torch.tensor(self.post, device=dev)
        self.target_t = torch.tensor(self.target_ids, device=dev, dtype=torch.long)
        self.cache = None  # of the text before the suffix [1 row]
        if engine.use_cache:
            with torch.no_grad():
                self.cache = run_prefix(cm, self.before)


class GCG:
    """The GCG loop over one or more prompts (one suffix for all of them)."""

    def __init__(self, cm: ChatModel, instructions: Sequence[str], targets: Sequence[str | None] | None,
                 config: GCGConfig, direction=None, judge=None, draft: ChatModel | None = None,
                 clock: StepClock | None = None, ensemble: Sequence[ChatModel] | None = None):
        """clock: the StepClock the steps are timed on (default: a new one).
        ensemble: the models of config.ensemble, loaded (default: loaded from config.ensemble).
        judge: config.judge already loaded (a Judge, reused; it must be the judge config.judge names); default:
        loaded from config.judge.
        draft: the draft model of probe sampling, loaded (default: loaded from config.draft_model)."""
        config.validate()
        if not instructions:
            raise RefusalLabError("no prompts to attack")
        self.cm, self.config = cm, config
        self.weights = config.weights
        self.needs_target = "target" in self.weights
        self.needs_direction = "direction" in self.weights
        self.needs_attention = "attention" in self.weights
        if (self.needs_direction or self.needs_attention) and direction is None:
            raise RefusalLabError(f"the {config.objective} objective needs a refusal direction (--direction DIR)")
        targets = list(targets) if targets is not None else [None] * len(instructions)
        if len(targets) != len(instructions):
            raise RefusalLabError(f"{len(instructions)} prompts but {len(targets)} targets")
        if self.needs_target and any(not t for t in targets):
            raise RefusalLabError(f"the {config.objective} objective needs a target for every prompt")
        self.init_ids = initial_suffix_ids(cm, config.suffix_len, config.suffix_init)
        self.suffix_len = len(self.init_ids)
        # candidates reuse cached positions, which sliding-window layers may have dropped: then recompute
        self.placement = config.placement
        longest = max(len(cm.chat.encode(i, [0] * self.suffix_len, self.placement)) for i in instructions)
        self.use_cache = cache_fits(cm, longest)
        self.embed = cm.model.get_input_embeddings()
        self.not_allowed = disallowed_token_ids(cm, config.allow_non_ascii)
        n_allowed = self.embed.num_embeddings - len(set(self.not_allowed.tolist()))
        if config.topk > n_allowed:
            raise RefusalLabError(f"--topk {config.topk} is more than the {n_allowed} tokens a suffix may use; lower it")
        if config.suffix_len >= cm.max_context:
            raise RefusalLabError(f"--suffix-len {config.suffix_len} does not fit the model's context of {cm.max_context}")
        if direction is not None:
            check_direction(direction, cm)
            # r [d] unit: the loss is the signed projection; a subspace's orthonormal basis [k, d]: the norm of
            # the projection onto it
            self.r = (direction.basis if direction.k > 1 else direction.vector / direction.vector.norm())
            self.r = self.r.to(cm.device, torch.float32)
            self.dir_layers = list(range(direction.layer, cm.n_layers))
            scale = float(direction.mean_diff.float().norm())
            self.dir_scale = scale if scale > 0 else 1.0
        if self.needs_attention:
            self.heads = refusal_heads(cm, instructions, direction, config.attention_heads)
        self.slots = [_Slot(self, i, t) for i, t in zip(instructions, targets)]
        self.clock = clock or StepClock(cm.device)
        self.single = len(instructions) == 1
        # a step's success per prompt (config.success_check): the target match (teacher-forced, computed with
        # the candidates' losses: free), the judge's verdict on the greedy reply, or the judge's verdict only
        # where the target matched; without a target, the judge's verdict
        check = config.success_check
        if check == "auto":  # several prompts: every reply judged, so that prompts are added as they comply
            check = "target+judge" if len(instructions) == 1 else "judge"
        self.check = check if self.needs_target else "judge"
        self.judge = self.check != "target"  # whether the judge is consulted
        self._judge = None
        check_loaded_judge(judge, config.judge)
        if self.judge:
            # loaded (or a bad judge refused) before any step runs
            self._judge = judge if judge is not None else load_judge(config.judge)
        self.screen = screening_dtype(config.screen_dtype, cm.dtype, cm.device)
        self._screen_weights = low_precision_weights(cm.model, self.screen) if self.screen is not None else {}
        # probe sampling: the same prompts and targets on the draft model, which only scores candidates
        self.draft = None
        if config.draft_model is not None or draft is not None:
            if not self.needs_target or config.objective != "target":
                raise RefusalLabError("probe sampling (a draft model) needs --objective target")
            draft = load_draft(cm, draft if draft is not None else config.draft_model)
            if config.draft_model is None:  # the draft named in the config, so in the run's signature
                self.config = config = dataclasses.replace(config, draft_model=draft.name)
            self.draft = GCG(draft, instructions, targets, dataclasses.replace(
                config, draft_model=None, success_check="target", multi_coordinate=1), direction=None)
        # an ensemble: the same prompts on each other model, slots ordered prompt by prompt (a prompt's
        # models are added together); a member's own engine scores, differentiates and judges its slots
        models = list(ensemble) if ensemble is not None else list(config.ensemble)
        if models and set(self.weights) != {"target"}:
            raise RefusalLabError("an ensemble sums the target loss over models; use --objective target")
        self.members = [GCG(load_draft(cm, m, "ensemble model"), instructions, targets,
                            dataclasses.replace(config, ensemble=()), judge=self._judge, clock=self.clock)
                        for m in models]
        if models and ensemble is not None and not config.ensemble:  # the models named in the config, so in
            self.config = config = dataclasses.replace(config, ensemble=tuple(m.name if isinstance(m, ChatModel)
                                                                                   else m for m in models))
        self.group = 1 + len(self.members)  # slots per prompt
        # more than the chosen candidate judged: one prompt on one model, where its target matched
        self.check_others = config.check_matched > 1 and self.check == "target+judge" and len(self.slots) == 1 \
            and not self.members
        if self.members:
            self.slots = [s for i, own in enumerate(self.slots) for s in (own, *(m.slots[i] for m in self.members))]

    def screening(self):
        """The context candidates and the token gradient are computed in (the screening precision, or
        nothing)."""
        if self.members:
            stack = contextlib.ExitStack()
            for engine in (self, *self.members):
                stack.enter_context(engine._own_screening())
            return stack
        return self._own_screening()

    def _own_screening(self):
        if self.screen is None:
            return contextlib.nullcontext()
        return low_precision(self._screen_weights, self.screen, self.cm.device.type)

    def all_losses(self, ids: torch.Tensor, cands: torch.Tensor, slots: Sequence[_Slot]) -> tuple[torch.Tensor, list]:
        """Mean loss over `slots` [n] and each slot's target match [n] of every candidate, in the
        current precision."""
        total = torch.zeros(len(cands), device=self.cm.device)
        matches = []
        for slot in slots:
            l, m = slot.engine.candidate_losses(ids, cands, slot)
            total += l.to(total.device)
            matches.append(m.to(total.device))
        return total / len(slots), matches

    def combined_candidates(self, ids: torch.Tensor, cands: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """The multi-coordinate update (I-GCG, Jia et al. 2024): the changes of the best candidates, in order
        of their loss and at positions no better one already changed, applied together to the current
        suffix: the suffixes with the best 2, 3, ..., multi_coordinate of them [<= m - 1, L] (those that
        re-tokenize to themselves, when filter_ids)."""
        m = self.config.multi_coordinate
        taken: set[int] = set()
        changes: list[tuple[list[int], torch.Tensor]] = []
        for i in losses.argsort().tolist():
            pos = (cands[i] != ids).nonzero().flatten().tolist()
            if not pos or taken & set(pos):
                continue
            taken |= set(pos)
            changes.append((pos, cands[i, pos]))
            if len(changes) == m:
                break
        out, cur = [], ids.clone()
        for k, (pos, vals) in enumerate(changes):
            cur[pos] = vals
            if k:
                out.append(cur.clone())
        if not out:
            return cands[:0]
        combos = torch.stack(out)
        if self.config.filter_ids:
            combos = combos[retokenizes(self.cm.tokenizer, combos)]
        return combos

    def best_candidate(self, ids: torch.Tensor, cands: torch.Tensor, slots: Sequence[_Slot]) -> tuple[int, float, list[bool]]:
        """The index of the candidate with the lowest loss, its loss and its target match per slot. With a
        screening precision: every candidate is scored in it, the best `rescore` again in the model's
        precision, and the best of those is chosen (its loss is the model-precision one)."""
        i, loss, flags, _ = self.choose(ids, cands, slots, combine=False)
        return i, loss, flags

    def probe_sampled_losses(self, ids: torch.Tensor, cands: torch.Tensor, slots: Sequence[_Slot],
                             gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Probe sampling (Zhao et al. 2024, as nanoGCG 0.3.0 does it): the draft model scores every
        candidate [n, L]; the attacked model a random probe set of n // probe_sampling_factor of them and
        the draft's best max(1, (1 - alpha) * n / probe_r), where alpha = (1 + Spearman's rho) / 2 is the
        draft's rank agreement with the attacked model on the probe set. Returns the candidates the
        attacked model scored [k, L], their mean losses [k] and target matches (one [k] per slot), in the
        current precision; the agreement (rho) is kept in self.last_agreement."""
        cfg, n = self.config, len(cands)
        index = {id(s): i for i, s in enumerate(self.slots)}
        draft_slots = [self.draft.slots[index[id(s)]] for s in slots]
        with self.draft.screening():
            draft_loss, _ = self.draft.all_losses(ids, cands, draft_slots)
        draft_loss = draft_loss.to(self.cm.device)
        # indices on the CPU, where the candidates are
        perm = torch.randperm(n, generator=gen if gen is not None else torch.Generator().manual_seed(cfg.seed))
        probe = perm[: max(1, n // cfg.probe_sampling_factor)]
        probe_loss, probe_m = self.all_losses(ids, cands[probe], slots)
        rho = rank_agreement(probe_loss, draft_loss[probe])
        alpha = (1 + rho) / 2
        k = max(1, min(n, int((1 - alpha) * n / cfg.probe_r)))
        best = draft_loss.topk(k, largest=False).indices.cpu()
        best = best[~torch.isin(best, probe)]
        self.last_agreement = rho
        if not len(best):
            return cands[probe], probe_loss, probe_m
        best_loss, best_m = self.all_losses(ids, cands[best], slots)
        return (cands[torch.cat([probe, best])], torch.cat([probe_loss, best_loss]),
                [torch.cat([a, b]) for a, b in zip(probe_m, best_m)])

    def choose(self, ids: torch.Tensor, cands: torch.Tensor, slots: Sequence[_Slot],
               combine: bool = True, gen: torch.Generator | None = None) -> tuple[int, float, list[bool], torch.Tensor]:
        """best_candidate over the candidates (with a draft model: over those probe sampling keeps) and, with
        config.multi_coordinate > 1 (and `combine`), their combined_candidates scored beside them; returns
        the index into the candidates searched (scored and combined: [k, L], the fourth item) as well.
        gen: the generator of probe sampling's probe set."""
        scored = self.screen_slots(slots, gen) if combine else slots  # all of them, or a random subset
        with self.screening():
            if self.draft is not None:
                cands, total, matches = self.probe_sampled_losses(ids, cands, scored, gen)
            else:
                total, matches = self.all_losses(ids, cands, scored)
            if combine and self.config.multi_coordinate > 1:
                combos = self.combined_candidates(ids, cands, total)
                if len(combos):
                    more, more_m = self.all_losses(ids, combos, scored)
                    cands, total = torch.cat([cands, combos.to(cands.device)]), torch.cat([total, more])
                    matches = [torch.cat([a, b]) for a, b in zip(matches, more_m)]
        if self.screen is not None or len(scored) < len(slots):
            # screened (in a lower precision, or on some of the prompts): the best, and the best that match
            # the target where preferred, scored again in the model's precision on every active prompt
            k = min(self.config.rescore, len(cands))
            top = total.topk(k, largest=False).indices
            if self.config.prefer_target_match:
                matched = torch.stack(matches).all(0).nonzero().flatten()
                matched = matched[total[matched].argsort()[:k]]
                top = torch.cat([top, matched[~torch.isin(matched, top)]])
            exact, exact_m = self.all_losses(ids, cands[top.to(cands.device)], slots)
            j = self.pick(exact, exact_m)
            self.last_scored = (top.to(cands.device), exact, torch.stack(exact_m).all(0))
            return int(top[j]), float(exact[j]), [bool(m[j]) for m in exact_m], cands
        i = self.pick(total, matches)
        self.last_scored = (torch.arange(len(cands), device=cands.device), total, torch.stack(matches).all(0))
        return i, float(total[i]), [bool(m[i]) for m in matches], cands

    def matched_others(self, chosen: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last choose()'s candidates other than `chosen` whose greedy reply begins with the target on every
        prompt, by the model's precision: at most k of them, lowest loss first, as indices into the candidates it
        searched [<= k] and their losses [<= k]."""
        index, losses, matched = self.last_scored
        keep = matched & (index != chosen)
        index, losses = index[keep], losses[keep]
        order = losses.argsort()[:k]
        return index[order], losses[order]

    def screen_slots(self, slots: Sequence[_Slot], gen: torch.Generator | None) -> list[_Slot]:
        """The prompts every candidate is scored on: all of `slots`, or config.screen_prompts of them drawn
        at random (from `gen`, so a resumed run draws the same) when there are more active prompts."""
        n = self.config.screen_prompts
        if not n or len(slots) <= n:
            return list(slots)
        pick = torch.randperm(len(slots), generator=gen)[:n].sort().values
        return [slots[int(i)] for i in pick]

    def pick(self, losses: torch.Tensor, matches: list[torch.Tensor]) -> int:
        """The index of the lowest loss [n]; with config.prefer_target_match, the lowest among the candidates
        whose greedy reply begins with the target on every prompt (matches: one [n] bool per prompt), when
        there is one."""
        if self.config.prefer_target_match and self.needs_target:
            matched = torch.stack(matches).all(0)
            if matched.any():
                return int(torch.where(matched, losses, torch.full_like(losses, float("inf"))).argmin())
        return int(losses.argmin())

    # ---- one forward over suffix pieces of one prompt

    def _forward(self, slot: _Slot, start: int, embeds: torch.Tensor | None = None, ids: torch.Tensor | None = None,
                 cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss [n] and target match [n] of rows whose suffix from position `start` on is given (as ids
        [n, L-start] or embeddings [n, L-start, d]); the cache holds everything before."""
        cm = self.cm
        n = (embeds if embeds is not None else ids).shape[0]
        n_tgt = len(slot.target_ids) if self.needs_target else 0
        tail_ids = torch.cat([slot.post_t, slot.target_t[:n_tgt]])
        if embeds is not None:
            x = torch.cat([embeds, self.embed(tail_ids)[None].expand(n, -1, -1)], 1)
            kw = {"inputs_embeds": x}
        else:
            x = torch.cat([ids.to(cm.device), tail_ids[None].expand(n, -1)], 1)
            kw = {"input_ids": x}
        T = x.shape[1]
        if self.use_cache:
            offset = len(slot.before) + start
            kw["cache"] = expand_cache(cache if cache is not None else slot.cache, n, offset)
            kw["use_cache"] = True
        else:  # no cache: run the whole prompt
            assert start == 0
            kw["use_cache"] = False
            head = torch.tensor(slot.before, device=cm.device)
            if embeds is not None:
                kw["inputs_embeds"] = torch.cat([self.embed(head)[None].expand(n, -1, -1), kw["inputs_embeds"]], 1)
            else:
                kw["input_ids"] = torch.cat([head[None].expand(n, -1), kw["input_ids"]], 1)
            offset, T = 0, T + len(slot.before)
        kw["position_ids"] = torch.arange(offset, offset + T, device=cm.device)[None].expand(n, -1)
        last = T - n_tgt - 1  # the last prompt position (predicts the first reply token)
        store: dict[int, torch.Tensor] = {}  # layer -> residual [n, d] at the last prompt position (with its graph)
        capture = capture_hooks(cm, store, self.dir_layers, lambda: last, keep_graph=True) if self.needs_direction else []
        if self.needs_attention:
            kw["output_attentions"] = True
        with hooked(capture), (eager_attention(cm) if self.needs_attention else contextlib.nullcontext()):
            out = cm.base(**kw)
        hidden = out.last_hidden_state
        loss = torch.zeros(n, device=cm.device, dtype=torch.float32)
        match = torch.ones(n, dtype=torch.bool, device=cm.device)
        if self.needs_target:
            h = hidden[:, last:T - 1].reshape(n * n_tgt, -1)  # 2-D: one matmul, not a batched one
            logits = cm.logits_from_hidden(h).float().view(n, n_tgt, -1)  # [n, n_tgt, vocab]
            tgt = slot.target_t[None].expand(n, -1)
            tgt_logit = logits.gather(-1, tgt[..., None])[..., 0]  # [n, n_tgt]
            if self.config.target_loss == "cw":  # the margin of the best other token over the target's
                other = logits.scatter(-1, tgt[..., None], float("-inf")).amax(-1)
                per_token = (other - tgt_logit).clamp_min(-CW_MARGIN)
            else:  # cross-entropy as logsumexp - target logit: the same numbers without writing log-softmax out
                per_token = torch.logsumexp(logits, -1) - tgt_logit
            loss = loss + per_token.mean(1)
            match = (logits.argmax(-1) == tgt).all(1)
        if self.needs_target:
            loss = loss * self.weights["target"]
        if self.needs_direction:
            along = [store[l].float() @ self.r if self.r.ndim == 1 else (store[l].float() @ self.r.T).norm(dim=-1)
                     for l in self.dir_layers]  # each [n]
            proj = torch.stack(along, 1).mean(1) / self.dir_scale
            loss = loss + self.weights["direction"] * proj
        if self.needs_attention:  # keys are absolute positions (cached ones first): the string's are fixed
            s0 = len(slot.before)
            share = torch.stack([out.attentions[l][:, h, last, s0:s0 + self.suffix_len].float().sum(-1)
                                 for l, h in self.heads], 1).mean(1)  # [n]
            loss = loss - self.weights["attention"] * share
        return loss, match

    def token_gradient(self, ids: torch.Tensor, slots: Sequence[_Slot]) -> torch.Tensor:
        """Sum over `slots` of the gradient of each prompt's loss w.r.t. the one-hot suffix [L, vocab],
        each normalised to unit norm (as the GCG reference code does for several prompts)."""
        total = None
        for slot in slots:
            g = slot.engine.slot_gradient(ids, slot).to(self.embed.weight.device)
            total = g if total is None else total + g
        return total

    def slot_gradient(self, ids: torch.Tensor, slot: _Slot) -> torch.Tensor:
        """The gradient of one prompt's loss w.r.t. the one-hot suffix [L, vocab], scaled to unit norm."""
        W = self.embed.weight
        with torch.enable_grad():
            onehot = torch.nn.functional.one_hot(ids.to(W.device), W.shape[0]).to(W.dtype).requires_grad_()
            loss, _ = self._forward(slot, 0, embeds=(onehot @ W)[None])
            (g,) = torch.autograd.grad(loss.sum(), [onehot])
        return g / g.norm(dim=-1, keepdim=True).clamp_min(1e-20)

    @staticmethod
    def plan_buckets(first: list[int], sizes: list[int], L: int, tail: int, overhead_tokens: int,
                     max_tokens: int) -> list[tuple[int, int]]:
        """Split the groups of candidates whose first change is at positions first[0] < first[1] < ...
        (sizes[g] candidates each) into consecutive buckets; a bucket starting at group i recomputes every
        member from position first[i] on. Chosen to minimise recomputed tokens + a per-pass overhead
        (dynamic programming over the group boundaries). Returns (start group, end group) pairs."""
        G = len(first)
        best = [0.0] + [float("inf")] * G
        cut = [0] * (G + 1)
        for j in range(1, G + 1):
            n = 0
            for i in range(j - 1, -1, -1):
                n += sizes[i]
                tokens = n * (L - first[i] + tail)
                if tokens > max_tokens and i < j - 1:
                    break
                c = best[i] + tokens + overhead_tokens
                if c < best[j]:
                    best[j], cut[j] = c, i
        out, j = [], G
        while j > 0:
            out.append((cut[j], j))
            j = cut[j]
        return out[::-1]

    @torch.no_grad()
    def candidate_losses(self, current: torch.Tensor, cands: torch.Tensor, slot: _Slot) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss [n] and target match [n] of every candidate suffix [n, L] on one prompt."""
        cm = self.cm
        n, L = cands.shape
        tail = len(slot.post) + (len(slot.target_ids) if self.needs_target else 0)
        max_tokens = max_batch_tokens(cm, len(slot.target_ids) / max(1, L + tail))
        bs = self.config.batch_size or max(1, max_tokens // (L + tail))
        loss = torch.empty(n, device=cm.device)
        match = torch.empty(n, dtype=torch.bool, device=cm.device)
        if not (self.use_cache and self.config.reuse_suffix_cache):
            for i in range(0, n, bs):
                loss[i:i + bs], match[i:i + bs] = self._forward(slot, 0, ids=cands[i:i + bs])
            return loss, match
        # the cache of the current suffix: a candidate whose first change is at p reuses its first p
        # tokens; candidates are bucketed by p so that each forward pass is large enough to be efficient
        pos = torch.arange(len(slot.before), len(slot.before) + L, device=cm.device)[None]
        past = cm.base(input_ids=current[None].to(cm.device), position_ids=pos, cache=expand_cache(slot.cache, 1),
                       use_cache=True).cache
        diff = cands != current[None]
        first = torch.where(diff.any(1), diff.float().argmax(1), torch.full((n,), L - 1)).tolist()
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(first):
            groups.setdefault(p, []).append(i)
        ps = sorted(groups)
        cap = bs * (L + tail) if self.config.batch_size else max_tokens
        for gi, gj in self.plan_buckets(ps, [len(groups[p]) for p in ps], L, tail,
                                              OVERHEAD_TOKENS.get(cm.device.type, OVERHEAD_TOKENS["cuda"]), cap):
            p = ps[gi]
            idx = torch.tensor([i for q in ps[gi:gj] for i in groups[q]])
            for j in range(0, len(idx), bs):
                sel = idx[j:j + bs]
                loss[sel], match[sel] = self._forward(slot, p, ids=cands[sel, p:], cache=past)
        return loss, match

    # ---- success

    def judge_success(self, ids: Sequence[int], slots: Sequence[_Slot], target_matched: bool = False) -> list[bool]:
        """Whether the judge (config.judge) says each prompt's greedy reply, with suffix `ids`, complies.
        target_matched: every reply is known to begin with its prompt's target (teacher-forced), so only
        what follows the target is generated. One prompt reuses its cache of the text before the suffix.
        An ensemble's slots are judged on their own models."""
        if any(s.engine is not self for s in slots):
            verdicts: dict[int, bool] = {}
            for engine in (self, *self.members):
                mine = [s for s in slots if s.engine is engine]
                if mine:
                    verdicts.update(zip(map(id, mine), engine.judge_success(ids, mine, target_matched)))
            return [verdicts[id(s)] for s in slots]
        return self._verdicts(slots, [list(ids)] * len(slots), target_matched)

    def _verdicts(self, slots: Sequence[_Slot], suffixes: Sequence[Sequence[int]], target_matched: bool) -> list[bool]:
        """Whether the judge says the greedy reply of each (prompt, suffix) pair complies, from one batched
        generation (only what follows the target where target_matched); pairs that all share one prompt reuse its
        cache of the text before the suffix."""
        judge = self._judge or load_judge(self.config.judge)
        encs = [self.cm.chat.encode(s.instruction, list(ids), self.placement) for s, ids in zip(slots, suffixes)]
        one = len({id(s) for s in slots}) == 1
        prefix = (slots[0].before, slots[0].cache) if one else None
        known = [s.target_ids for s in slots] if target_matched else None
        reply_ids = greedy_replies(self.cm, encs, self.config.judge_tokens, known, prefix=prefix)
        replies = reply_texts(self.cm, reply_ids)
        return [v == "complies" for v in judge.verdicts([s.instruction for s in slots], replies)]

    # ---- the loop

    def run(self, checkpoint: str | Path | None = None, resume: bool = False,
            on_step: Callable[[dict], None] | None = None, progress: bool = True) -> AttackResult:
        """The attack: per step, the token gradient, candidates sampled from it and filtered, the best one
        selected, its success checked, the state checkpointed (to `checkpoint`, whose state `resume`
        continues from). on_step gets each step's figures."""
        cfg = self.config
        state, gen = self.start(checkpoint if resume else None)
        ids = torch.tensor(state.ids, dtype=torch.long)
        momentum = state.momentum_tensor() if state.momentum else None  # [L, vocab] float32, MAC's running gradient
        bar = tqdm(total=cfg.steps, initial=state.step, desc="gcg", disable=not progress, leave=False)
        t0 = time.perf_counter() - state.elapsed
        try:
            # a time limit ends the run after the step that crosses it (and a resumed run past it at once)
            while state.step < cfg.steps and not state.done and not (
                    cfg.max_time_s is not None and state.elapsed >= cfg.max_time_s):
                step_start = time.perf_counter()
                active = self.slots[: state.n_active]
                with self.clock.timing("gradient"), self.screening():
                    grad = self.token_gradient(ids, active).float()  # [L, vocab]
                    if cfg.momentum:  # MAC: the sampling gradient carries the previous steps' with weight mu
                        if momentum is not None:
                            if momentum.shape != grad.shape:
                                raise RefusalLabError(
                                    f"the checkpoint's momentum is {list(momentum.shape)}, this run's gradient "
                                    f"{list(grad.shape)}; resume with the same model and settings")
                            grad = cfg.momentum * momentum.to(grad.device) + (1 - cfg.momentum) * grad
                        momentum = grad
                with torch.no_grad():
                    cands = self.filtered(sample_candidates(ids, grad, cfg.search_width, cfg.topk, cfg.n_replace,
                                                            self.not_allowed, gen), state.step)
                    with self.clock.timing("scoring"):
                        best_i, loss, target_match, searched = self.choose(ids, cands, active, gen=gen)
                    ids = searched[best_i].clone()
                with self.clock.timing("check"):
                    if self.check_others and all(target_match):
                        others, other_losses = self.matched_others(best_i, cfg.check_matched - 1)
                        flags, which = self.first_complying(ids, searched[others.to(searched.device)], active)
                        if which > 0:  # the chosen candidate refused, another complied: it becomes the suffix
                            ids, loss = searched[int(others[which - 1])].clone(), float(other_losses[which - 1])
                    else:
                        flags = self.success_flags(ids, active, target_match)
                text = self.cm.tokenizer.decode(ids.tolist())
                state.record(ids.tolist(), text, loss, flags, len(active), len(self.slots), cfg, self.group,
                             agreement=self.last_agreement if self.draft is not None else None)
                state.elapsed = time.perf_counter() - t0
                state.times.append(round(state.elapsed, 4))
                state.profile.append(self.clock.take(time.perf_counter() - step_start))
                state.rng = base64.b64encode(gen.get_state().numpy().tobytes()).decode()
                if checkpoint is not None:
                    if momentum is not None:
                        state.keep_momentum(momentum)
                    artifacts.write_json(checkpoint, state.to_json())
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", ok=f"{sum(flags)}/{len(flags)}", suffix=text[:40])
                if on_step is not None:
                    on_step(dict(step=state.step - 1, loss=loss, success=state.success[-1], n_active=len(active),
                                 suffix=text, elapsed_s=state.elapsed))
        finally:
            bar.close()
        return state.result(self.cm.tokenizer)

    def start(self, checkpoint: str | Path | None) -> tuple["LoopState", torch.Generator]:
        """The loop's state and candidate generator: from the checkpoint at `checkpoint` (when it is a file,
        checked to be this run's), else new."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        sig = self.signature()
        judge = cfg.judge.key if self.judge else None
        if checkpoint is None or not Path(checkpoint).is_file():
            n_active = self.group if (cfg.progressive and not self.single) else len(self.slots)
            return LoopState(signature=sig, judge=judge, ids=list(self.init_ids), n_active=n_active), gen
        state = LoopState.from_json(artifacts.read_json(checkpoint), checkpoint)
        if len(state.ids) != self.suffix_len:
            raise RefusalLabError(f"{checkpoint}: the checkpoint's suffix has {len(state.ids)} tokens, this run "
                                  f"{self.suffix_len}; resume with the same settings, or pass --force to start over")
        if state.signature != sig:
            self._check_resumable(state.signature, state.judge, checkpoint)
            state.signature = sig
        state.judge = judge
        gen.set_state(torch.frombuffer(bytearray(base64.b64decode(state.rng)), dtype=torch.uint8))
        return state, gen

    def filtered(self, cands: torch.Tensor, step: int) -> torch.Tensor:
        """Candidates [n, L] without duplicates (config.dedupe) and without those that do not re-tokenize to
        themselves (config.filter_ids; all are kept if none does)."""
        if self.config.dedupe:
            cands = torch.unique(cands, dim=0)
        if self.config.filter_ids:
            keep = retokenizes(self.cm.tokenizer, cands)
            if keep.any():
                return cands[keep]
            log.warning("no candidate re-tokenizes to itself at step %d; keeping them all", step)
        return cands

    def success_flags(self, ids: torch.Tensor, active: Sequence[_Slot], target_match: list[bool]) -> list[bool]:
        """Per active prompt, whether suffix `ids` succeeds by the run's check (self.check): the target match,
        the judge's verdict, or the judge's verdict on the replies that begin with the target."""
        if self.check == "target":
            return list(target_match)
        if self.check == "judge":
            return self.judge_success(ids.tolist(), active)
        matched = [s for s, m in zip(active, target_match) if m]
        verdicts = iter(self.judge_success(ids.tolist(), matched, target_matched=True) if matched else [])
        return [bool(m) and next(verdicts) for m in target_match]

    def first_complying(self, ids: torch.Tensor, others: torch.Tensor, active: Sequence[_Slot]) -> tuple[list[bool], int]:
        """One prompt whose chosen suffix `ids` [L] and `others` [m, L] all begin their greedy replies with the
        target: the judge's verdicts on all of them from one batched generation (what follows the target, from
        the cache of the text before the suffix). Returns the success flags and which one to keep: 0 (the chosen
        one) unless it refused and one of the others complied (1 + its index, the first in their order)."""
        rows = [ids.tolist()] + others.tolist()
        complies = self._verdicts([active[0]] * len(rows), rows, target_matched=True)
        which = 0 if complies[0] else next((i for i, c in enumerate(complies) if c), 0)
        return [complies[which]], which

    def signature(self) -> str:
        """A hash of everything that decides the run's course except the number of steps: the judge only
        where the attack judges success (universal, or no target; one prompt with a target is checked by
        its target, so its judge does not change the run)."""
        return self._signature(self.config.judge.key if self.judge else None)

    def _signature(self, judge: str | None) -> str:
        """The signature with `judge` (a JudgeConfig.key) as the config's judge (None: the judge left out)."""
        cfg = config_dict(self.config)
        cfg["judge"] = judge
        cfg = comparable_config(cfg)
        cfg.pop("steps")
        cfg.pop("max_time_s", None)  # a time limit ends a run; it does not change its steps
        if judge is None:
            cfg.pop("judge", None)
        items = [repr(sorted(cfg.items())), repr(self.init_ids), self.cm.fingerprint]
        items += [f"{s.instruction}\x00{s.target}" for s in self.slots]
        items += [m.cm.fingerprint for m in self.members]
        if self.draft is not None:
            items.append(f"draft {self.draft.cm.fingerprint}")
        return hash_strings(items)

    def _check_resumable(self, signature: str, recorded: str | None, checkpoint) -> None:
        """A checkpoint whose signature is not this run's: resumable if only its judge differs and this run
        does not judge (checkpoints from before the judge was left out of such runs' signature); an error
        naming the judge if only the judge differs; otherwise an error naming prompts, targets, settings."""
        candidates = [j for j in dict.fromkeys([recorded, "substring", "strict"]) if isinstance(j, str) and j]
        made = next((j for j in candidates if self._signature(j) == signature), None)
        if made is not None and not self.judge:
            return
        if made is not None and made != self.config.judge.key:
            raise RefusalLabError(f"{checkpoint}: the unfinished attack there was judged by the {made} judge, this run "
                                  f"by the {self.config.judge.key} judge; pass --judge {made} to resume it, --force to "
                                  "start over, or choose another --out")
        raise RefusalLabError(f"{checkpoint}: the checkpoint was made with other prompts, targets or settings; "
                              "start a new run (another --out, or --force) instead of --resume")


@dataclass
class LoopState:
    """Everything the GCG loop carries from one step to the next; its JSON (to_json) is the checkpoint, and
    a checkpoint of another CHECKPOINT_VERSION is refused rather than guessed at."""

    signature: str  # GCG.signature(): the run a checkpoint belongs to
    ids: list[int]  # the current suffix
    n_active: int  # prompts being optimized (universal attacks add them one at a time)
    judge: str | None = None  # the judge (JudgeConfig.key) where the run judges success (older checkpoints lack it)
    step: int = 0  # steps done
    last_add: int = 0  # the step at which the last prompt was added
    losses: list[float] = field(default_factory=list)  # per step: the chosen candidate's loss
    success: list[float] = field(default_factory=list)  # per step: the share of active prompts that succeed
    n_active_hist: list[int] = field(default_factory=list)  # per step: active prompts
    suffixes: list[str] = field(default_factory=list)  # per step: the chosen suffix's text
    best: dict | None = None  # the best suffix so far: key [active, rate, -loss], ids, loss, step, flags
    elapsed: float = 0.0  # seconds of attack so far (over resumed parts)
    done: bool = False  # succeeded and stopped early
    times: list[float] = field(default_factory=list)  # per step: elapsed at its end
    profile: list[list[float]] = field(default_factory=list)  # per step: seconds per part (STEP_PARTS, other)
    agreement: list[float] = field(default_factory=list)  # probe sampling, per step
    rng: str = ""  # the candidate generator's state (base64)
    momentum: str = ""  # MAC: the last step's sampling gradient [L, vocab], float32 bytes (base64; "" without)
    version: int = CHECKPOINT_VERSION

    def record(self, ids: list[int], text: str, loss: float, flags: list[bool], n_active: int, n_prompts: int,
               config: GCGConfig, group: int = 1, agreement: float | None = None) -> None:
        """One step's outcome: its histories, the best suffix so far (the most active prompts, then the
        highest success rate, then the lowest loss), and the schedule: done when every prompt is active
        and the rate is reached (with early_stop), else the next prompt (its `group` slots: one per model
        of an ensemble) added on success or after `patience` steps."""
        rate = sum(flags) / len(flags)
        step = self.step
        self.losses.append(loss)
        self.success.append(rate)
        self.n_active_hist.append(n_active)
        self.suffixes.append(text)
        if agreement is not None:
            self.agreement.append(round(agreement, 4))
        key = [n_active, rate, -loss]
        if self.best is None or key > self.best["key"]:
            self.best = dict(key=key, ids=list(ids), loss=loss, step=step, flags=flags)
        self.ids = list(ids)
        self.step = step + 1
        all_active = n_active == n_prompts
        if rate >= config.success_rate and all_active and config.early_stop:
            self.done = True
        elif not all_active and (rate >= config.success_rate
                                 or (config.patience and step + 1 - self.last_add >= config.patience)):
            self.n_active += group
            self.last_add = step + 1

    def keep_momentum(self, grad: torch.Tensor) -> None:
        """Keep the sampling gradient [L, vocab] in the checkpoint (exactly, so a resumed run matches)."""
        self.momentum = base64.b64encode(grad.detach().float().cpu().contiguous().numpy().tobytes()).decode()

    def momentum_tensor(self) -> torch.Tensor:
        """The kept sampling gradient [L, vocab] (float32, on the CPU)."""
        flat = torch.frombuffer(bytearray(base64.b64decode(self.momentum)), dtype=torch.float32)
        if flat.numel() % len(self.ids):
            raise RefusalLabError(f"the checkpoint's momentum has {flat.numel()} values, not a multiple of its "
                                  f"suffix's {len(self.ids)} tokens; remove it or start without --resume")
        return flat.view(len(self.ids), -1)

    def result(self, tokenizer) -> AttackResult:
        best = self.best
        return AttackResult(
            suffix=tokenizer.decode(best["ids"]), token_ids=best["ids"], best_loss=best["loss"], best_step=best["step"],
            losses=self.losses, success=self.success, n_active=self.n_active_hist, suffixes=self.suffixes,
            steps_run=self.step, stopped_early=self.done, elapsed_s=self.elapsed, success_flags=best["flags"],
            step_times=self.times, agreement=self.agreement, profile=self.profile)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data, path) -> "LoopState":
        """The state a checkpoint holds; a one-line error for a file that is not one of this version."""
        if not isinstance(data, dict) or data.get("version") != CHECKPOINT_VERSION or "rng" not in data:
            found = data.get("version") if isinstance(data, dict) else None
            raise RefusalLabError(f"{path}: not a refusal-lab attack checkpoint of version {CHECKPOINT_VERSION}"
                                  + (f" (version {found})" if found is not None else "")
                                  + "; remove it or start without --resume")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as e:  # a field missing
            raise RefusalLabError(f"{path}: an incomplete attack checkpoint ({e}); remove it or start without "
                                  "--resume") from e
