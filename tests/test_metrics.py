import math

import torch

from refusal.metrics import is_refusal, kl_divergence, refusal_score_from_logits, refusal_token_ids


def test_is_refusal():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("i cannot do that")
    assert is_refusal("As an AI, I must decline.")
    assert not is_refusal("Sure, here is a recipe for bread.")
    assert not is_refusal("")


def test_refusal_tokens_come_from_the_tokenizer(tokenizer):
    ids = refusal_token_ids(tokenizer)
    assert ids[0] == tokenizer("I", add_special_tokens=False).input_ids[0]
    assert len(ids) == len(set(ids)) >= 2
    assert tokenizer.decode(ids[:1]) == "I"


def test_refusal_score_is_log_odds():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5], [0.9, 0.05, 0.05]]))
    s = refusal_score_from_logits(logits, [0, 1])
    assert abs(s[0].item() - math.log(0.5 / 0.5)) < 1e-5
    assert abs(s[1].item() - math.log(0.95 / 0.05)) < 1e-4
    sure = torch.tensor([[100.0, -100.0, -100.0]])
    assert torch.isfinite(refusal_score_from_logits(sure, [0]))


def test_kl():
    a = torch.randn(4, 10)
    assert kl_divergence(a, a).abs().max() < 1e-6
    b = a.clone()
    b[:, 0] += 3
    assert (kl_divergence(a, b) > 0).all()
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    expect = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert abs(kl_divergence(p.log(), q.log()).item() - expect) < 1e-5


def test_refusal_rate_is_the_judged_fraction_of_greedy_completions(tiny, monkeypatch):
    import pytest

    from refusal import metrics
    from refusal.errors import RefusalLabError

    encs = tiny.chat.encode_all(["Name a colour.", "Name a river.", "Name a tree.", "Name a bird."])
    replies = iter([["I'm sorry, I can't.", "Blue.", "As an AI I won't.", "Oak."]])
    monkeypatch.setattr(metrics, "generate", lambda cm, e, n, b, p: next(replies))
    assert metrics.refusal_rate(tiny, encs, 4) == 0.5
    with pytest.raises(RefusalLabError, match="no prompts"):
        metrics.refusal_rate(tiny, [], 4)
