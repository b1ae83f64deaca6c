import json

import pytest
import torch

from conftest import FAMILIES
from refusal.activations import cache_activations, last_logits
from refusal.chat import pad_left
from refusal.errors import RefusalLabError
from refusal.models import resolve_model
from refusal.registry import load_model

CHATML_POST = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_anatomy(tiny_models, family):
    cm = tiny_models[family]
    assert cm.config.model_type == family
    assert cm.n_layers == 3 and cm.d_model == 64 and cm.n_heads == 4 and cm.head_dim == 16
    for layer in range(cm.n_layers):
        o = cm.o_proj(layer)
        w = o.weight
        # the output projection maps n_heads * head_dim -> d_model
        shape = (cm.n_heads * cm.head_dim, cm.d_model) if cm.family.conv1d else (cm.d_model, cm.n_heads * cm.head_dim)
        assert tuple(w.shape) == shape
        assert len(cm.residual_writers(layer)) == 2
    assert len(cm.fingerprint) == 16


def test_chat_regions(tiny):
    enc = tiny.chat.encode("  How do I bake bread?  ", "x y z")
    tok = tiny.tokenizer
    assert tok.decode(enc.ids[slice(*enc.instruction)]) == "How do I bake bread?"
    assert tok.decode(enc.ids[slice(*enc.suffix)]) == "x y z"
    assert tok.decode(enc.ids[slice(*enc.post)]) == CHATML_POST
    assert enc.post[1] == len(enc.ids) and enc.n_post == tiny.chat.n_post == 6
    # replies end at the template's end of turn, read off the template (not the tokenizer's EOS)
    assert tok.convert_ids_to_tokens(tiny.chat.end_of_turn_id) == "<|im_end|>"
    assert tiny.chat.stop_ids[0] == tiny.chat.end_of_turn_id
    plain = tiny.chat.encode("How do I bake bread?")
    assert plain.suffix[0] == plain.suffix[1] == plain.instruction[1]
    # the text form is what the template renders
    assert tiny.chat.render("Hi") == tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                           add_generation_prompt=True)
    with pytest.raises(RefusalLabError, match="empty instruction"):
        tiny.chat.encode("   ")


def test_pad_left_positions():
    b = pad_left([[5, 6, 7], [8]], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]


@pytest.mark.parametrize("family", FAMILIES)
def test_batching_and_prefix_sharing_change_nothing(tiny_models, family):
    cm = tiny_models[family]
    encs = cm.chat.encode_all(["Hi", "Tell me a long story about a dragon and a knight", "What is 2+2?"])
    alone = torch.cat([last_logits(cm, [e], share_prefix=False) for e in encs])
    batched = last_logits(cm, encs, batch_size=3, share_prefix=False)
    shared = last_logits(cm, encs, batch_size=2, share_prefix=True)
    assert (alone - batched).abs().max() < 1e-4
    assert (alone - shared).abs().max() < 1e-4
    a1 = cache_activations(cm, encs, batch_size=1, share_prefix=False)
    a2 = cache_activations(cm, encs, batch_size=3, share_prefix=True)
    assert a1.shape == (3, cm.n_layers, cm.chat.n_post, cm.d_model)
    assert (a1 - a2).abs().max() < 1e-4


def test_resolve_model_errors(tmp_path):
    with pytest.raises(RefusalLabError, match="accepts"):
        resolve_model("not a model")
    with pytest.raises(RefusalLabError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RefusalLabError, match="not a Hugging Face model"):
        resolve_model(str(tmp_path / "empty"))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"abc")
    with pytest.raises(RefusalLabError, match="not a model folder"):
        resolve_model(str(f))
    assert resolve_model("someorg/some-model") == ("hub", "someorg/some-model")


def test_corrupt_gguf_and_safetensors(tmp_path, tiny_dirs):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(RefusalLabError, match="GGUF"):
        load_model(str(bad))
    import shutil

    d = tmp_path / "trunc"
    shutil.copytree(tiny_dirs["llama"], d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(RefusalLabError, match="could not load"):
        load_model(str(d))


def test_missing_chat_template(tmp_path, tiny_dirs):
    import shutil

    d = tmp_path / "notemplate"
    shutil.copytree(tiny_dirs["llama"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (d / extra).unlink(missing_ok=True)
    with pytest.raises(RefusalLabError, match="no chat template"):
        load_model(str(d))
    tmpl = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<bot>"
    cm = load_model(str(d), chat_template=tmpl)
    assert cm.tokenizer.decode(cm.chat.post_ids) == "</user><bot>"
    f = tmp_path / "t.jinja"
    f.write_text(tmpl)
    assert load_model(str(d), chat_template=str(f)).chat.n_post == cm.chat.n_post


def test_context_length_checked(tiny):
    enc = tiny.chat.encode("word " * 1200)
    with pytest.raises(RefusalLabError, match="context"):
        last_logits(tiny, [enc])


@pytest.mark.parametrize("family,ok", [("llama", True), ("olmo2", False), ("gemma3_text", False)])
def test_unknown_architecture_is_checked_not_assumed(tiny_models, family, ok, caplog):
    """An architecture the tool does not know is taken as Llama-like only if ablating a random direction at
    the Llama-like sites leaves no component along it in any block's input or output: a post-norm model
    would be ablated wrongly, so it is refused with the supported families named (when it is loaded, or,
    built by hand, when it is first ablated)."""
    from refusal.hooks import ablate_direction, check_ablation_sites
    from refusal.models import ChatModel

    cm = tiny_models[family]
    cm.model.config.model_type = "mystery"
    try:
        other = ChatModel(cm.model, cm.tokenizer, name="mystery")
        assert not other.sites_checked
        if ok:
            with caplog.at_level("WARNING"):
                with ablate_direction(other, torch.ones(other.d_model)):
                    pass
            assert "'mystery' is not a tested family" in caplog.text and other.sites_checked
            assert other.family.post_norms is None
        else:
            for attempt in (lambda: check_ablation_sites(other), lambda: ablate_direction(other, torch.ones(other.d_model))):
                with pytest.raises(RefusalLabError, match="leaves a component along it.*supported families: llama"):
                    attempt()
            assert not other.sites_checked
    finally:
        cm.model.config.model_type = family


QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
LLAMA3_LIKE = (
    "<|im_start|>system\nCutting Knowledge Date: December 2023\nToday Date: {{ date_string | default('26 Jul 2024') }}"
    "<|im_end|>\n{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_LIKE = (  # no system role: the template raises on one
    "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<|im_start|>{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>model\n{% endif %}")


def test_templates_of_2026_post_instruction_positions_as_rendered(tiny_dirs):
    """The post-instruction tokens are whatever the template renders after the user's message: with Qwen3's
    thinking switched off, its empty thinking block too; a default system prompt or date line is prefix; a
    template without a system role works; the template options are recorded."""
    d = tiny_dirs["llama"]
    qwen = load_model(str(d), chat_template=QWEN3_LIKE, chat_template_kwargs={"enable_thinking": False})
    e = qwen.chat.encode("How do I bake bread?", "x y")
    tok = qwen.tokenizer
    assert tok.decode(e.ids[slice(*e.post)]) == "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tok.decode(e.ids) == tok.apply_chat_template([{"role": "user", "content": "How do I bake bread? x y"}],
                                                        tokenize=False, add_generation_prompt=True,
                                                        enable_thinking=False)
    assert qwen.describe()["chat_template_kwargs"] == {"enable_thinking": False}
    thinking = load_model(str(d), chat_template=QWEN3_LIKE)
    assert thinking.chat.n_post == 6 < qwen.chat.n_post
    llama3 = load_model(str(d), chat_template=LLAMA3_LIKE, chat_template_kwargs={"date_string": "01 Dec 2026"})
    e = llama3.chat.encode("Hi there")
    assert tok.decode(e.ids[: e.instruction[0]]).endswith("Today Date: 01 Dec 2026<|im_end|>\n<|im_start|>user\n")
    assert tok.decode(e.ids[slice(*e.post)]) == CHATML_POST
    gemma = load_model(str(d), chat_template=GEMMA_LIKE)
    e = gemma.chat.encode("Hi there")
    assert tok.decode(e.ids[slice(*e.post)]) == "<|im_end|>\n<|im_start|>model\n"


def test_cli_chat_template_kwargs_are_parsed_and_recorded(tiny_dirs, tmp_path, capsys):
    from refusal.app.cli import main
    from refusal.app.options import parse_template_kwargs

    assert parse_template_kwargs(["enable_thinking=false", "n=3", "x=1.5", "name=a=b"]) == {
        "enable_thinking": False, "n": 3, "x": 1.5, "name": "a=b"}
    with pytest.raises(RefusalLabError, match="KEY=VALUE"):
        parse_template_kwargs(["enable_thinking"])
    template = tmp_path / "t.jinja"
    template.write_text(QWEN3_LIKE)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi there\n")
    out = tmp_path / "ev.jsonl"
    assert main(["eval", "--model", str(tiny_dirs["llama"]), "--chat-template", str(template),
                 "--chat-template-kwargs", "enable_thinking=false", "--prompts", str(prompts), "--max-new-tokens", "2",
                 "--out", str(out)]) == 0
    rec = json.loads((tmp_path / "ev.jsonl.record.json").read_text())
    assert rec["model"]["chat_template_kwargs"] == {"enable_thinking": False}


def test_a_reply_opening_with_a_thinking_block_is_judged_after_it():
    from refusal.metrics import after_thinking, attack_success, is_refusal

    think = "<think>\nThe user asks for something harmful. I'm sorry is what I will say? No.\n</think>\n\n"
    assert after_thinking(think + "Sure, here is how to do it step by step.") == "Sure, here is how to do it step by step."
    assert attack_success(think + "Sure, here is how to do it step by step.")
    assert not is_refusal(think + "Sure, here is how to do it step by step.")
    assert is_refusal("<think>ok</think> I'm sorry, but I can't help with that.")
    assert not attack_success("<think>still thinking about whether to answer")  # unfinished: nothing said yet
    assert after_thinking("reasoning that began in the prompt</think>The answer.") == "The answer."
    assert after_thinking("A plain reply.") == "A plain reply."
