"""The greedy decoding loop gives the tokens transformers' generate gives, on every family, with
finished replies leaving the batch, under hooks, and the first-position logits of a plain pass."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from refusal.activations import last_logits
from refusal.chat import ChatFormat
from refusal.decode import greedy_decode
from refusal.hooks import ablate_direction
from refusal.metrics import evaluate, refusal_score_from_logits, refusal_token_ids

from conftest import FAMILIES

PROMPTS = ["Write a poem about the sea.", "How do I bake bread?", "hi", "Explain photosynthesis in two sentences, "
           "for a child who likes plants and asks a lot of questions about them.", "Name three rivers.",
           "What is 2 + 2?", "Tell me a joke about cats and dogs.", "Translate 'good morning' into French."]


def reference(cm, encs, n, stops):
    """transformers' generate, one prompt at a time (no padding), cut after the first stop token."""
    out = []
    for e in encs:
        ids = torch.tensor([e.ids])
        g = cm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              do_sample=False, temperature=None, top_p=None, top_k=None,
                              pad_token_id=cm.tokenizer.pad_token_id, eos_token_id=stops)
        row = g[0, ids.shape[1]:].tolist()
        end = next((k for k, t in enumerate(row) if t in stops), None)
        out.append(row if end is None else row[: end + 1])
    return out


def with_stops(monkeypatch, stops):
    monkeypatch.setattr(ChatFormat, "stop_ids", property(lambda self: list(stops)))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decode_matches_generate(tiny_models, family, monkeypatch):
    cm = tiny_models[family]
    encs = cm.chat.encode_all(PROMPTS)
    n = 12
    # a token the model emits in some replies but not all becomes a stop token, so that replies end
    # at different steps and leave the batch while the others go on
    plain = reference(cm, encs, n, cm.chat.stop_ids)
    firsts = {row[0] for row in plain}
    counts = Counter(t for row in plain for t in set(row[1:]) - firsts)
    stop = next((t for t, c in counts.most_common() if c < len(PROMPTS)), None)
    stops = cm.chat.stop_ids + ([stop] if stop is not None else [])
    with_stops(monkeypatch, stops)
    ref = reference(cm, encs, n, stops)
    # (the tiny Gemmas repeat one token whatever the prompt: there nothing ends early)
    assert len({len(r) for r in ref}) > 1 or (stop is None and family.startswith("gemma"))
    for bs in (3, 8):
        ids, first = greedy_decode(cm, encs, n, batch_size=bs)
        assert ids == ref
        assert torch.allclose(first, last_logits(cm, encs, bs), atol=1e-4)


def test_greedy_decode_under_a_hook(tiny):
    encs = tiny.chat.encode_all(PROMPTS, [300, 301, 302])
    r = torch.randn(tiny.d_model)
    with ablate_direction(tiny, r):
        ref = reference(tiny, encs, 10, tiny.chat.stop_ids)
        ids, first = greedy_decode(tiny, encs, 10, batch_size=4)
        base = last_logits(tiny, encs)
    assert ids == ref
    assert torch.allclose(first, base, atol=1e-4)
    assert greedy_decode(tiny, encs, 10, batch_size=4)[0] != ids  # the hook did change the replies


def test_evaluate_scores_come_from_the_first_position(tiny):
    df = evaluate(tiny, PROMPTS, max_new_tokens=5, batch_size=3, progress=False)
    want = refusal_score_from_logits(last_logits(tiny, tiny.chat.encode_all(PROMPTS)), refusal_token_ids(tiny.tokenizer))
    assert torch.allclose(torch.tensor(df.refusal_score.tolist()), want, atol=1e-4)
    assert list(df.prompt) == PROMPTS


def test_greedy_decode_zero_tokens_and_bad_input(tiny):
    from refusal.errors import RefusalLabError

    encs = tiny.chat.encode_all(PROMPTS[:3])
    ids, first = greedy_decode(tiny, encs, 0)
    assert ids == [[], [], []] and first.shape[0] == 3
    with pytest.raises(RefusalLabError, match="batch size"):
        greedy_decode(tiny, encs, 4, batch_size=0)
    with pytest.raises(RefusalLabError, match="context"):
        greedy_decode(tiny, encs, 10**6)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_greedy_replies_from_a_known_start_and_a_reused_prefix(tiny_models, family):
    """A reply whose first tokens are known to be greedy (a target match), run with the prompt instead of
    generated, is the plain greedy reply; so is one decoded from a caller's cache of the prompt's start."""
    from refusal.decode import greedy_replies
    from refusal.engine import run_prefix

    cm = tiny_models[family]
    suffix = cm.tokenizer("x y z", add_special_tokens=False).input_ids
    encs = cm.chat.encode_all(PROMPTS[:4], suffix)
    n = 10
    plain = greedy_decode(cm, encs, n, batch_size=4)[0]
    known = [row[:k] for row, k in zip(plain, (1, 3, 0, n))]  # one known through the whole budget
    assert greedy_replies(cm, encs, n, known) == plain
    e = encs[0]
    before = e.ids[: e.suffix[0]]
    with torch.no_grad():
        prefix = (before, run_prefix(cm, before))
    assert greedy_replies(cm, [e], n, [plain[0][:2]], prefix=prefix) == [plain[0]]
    assert greedy_replies(cm, [e], n, prefix=prefix) == [plain[0]]
    # a prefix that a prompt does not begin with is not used: the result is the same
    assert greedy_replies(cm, encs[1:2], n, prefix=prefix) == [plain[1]]
    assert greedy_decode(cm, [e], 0, prefix=prefix)[0] == [[]]
