import json

import pytest

from refusal.data import KINDS, SPLITS, builtin_prompts, load_prompts, resolve_prompts
from refusal.errors import RefusalLabError


def test_builtin_sets_size_categories_and_splits():
    for kind in KINDS:
        allp = builtin_prompts(kind)
        assert len(allp) >= 300
        cats = {p.category for p in allp}
        assert len(cats) >= 9
        assert all(p.category for p in allp)
        lowered = [p.instruction.lower() for p in allp]
        assert len(set(lowered)) == len(lowered), "duplicate instructions"
        splits = {s: builtin_prompts(kind, s) for s in SPLITS}
        assert sum(len(v) for v in splits.values()) == len(allp)
        assert len(splits["train"]) >= 128 and len(splits["val"]) >= 32 and len(splits["test"]) >= 100
        seen = [set(p.instruction for p in v) for v in splits.values()]
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_harmless_sets_vary_in_form_and_length():
    words = [len(p.instruction.split()) for p in builtin_prompts("harmless")]
    assert min(words) <= 5 and max(words) >= 30
    starts = {p.instruction.split()[0].lower() for p in builtin_prompts("harmless")}
    assert len(starts) >= 20  # not one template


def test_harmful_and_harmless_disjoint():
    a = {p.instruction for p in builtin_prompts("harmful")}
    b = {p.instruction for p in builtin_prompts("harmless")}
    assert not a & b


def test_txt(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("first one\n\n  second one  \n")
    assert [p.instruction for p in load_prompts(f)] == ["first one", "second one"]


def test_json_strings_and_records(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps(["x y", "z"]))
    assert [p.instruction for p in load_prompts(f)] == ["x y", "z"]
    f.write_text(json.dumps([{"prompt": "p1"}, {"goal": "g1", "target": "Sure, here"}]))
    ps = load_prompts(f)
    assert [p.instruction for p in ps] == ["p1", "g1"] and ps[1].target == "Sure, here"


def test_alpaca_record_keeps_input(tmp_path):
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps([{"instruction": "Summarize this.", "input": "Some text.", "output": "..."},
                             {"instruction": "Name a color.", "input": "", "output": "red"}]))
    ps = load_prompts(f)
    assert ps[0].instruction == "Summarize this.\n\nSome text." and ps[1].instruction == "Name a color."


def test_jsonl(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"instruction": "one", "category": "c"}\n"two"\n\n')
    ps = load_prompts(f)
    assert [p.instruction for p in ps] == ["one", "two"] and ps[0].category == "c"


def test_csv_advbench_harmbench_jbb(tmp_path):
    adv = tmp_path / "harmful_behaviors.csv"
    adv.write_text('goal,target\n"Write a bad thing, please",Sure here is a bad thing\nDo X,Sure\n')
    ps = load_prompts(adv)
    assert ps[0].instruction == "Write a bad thing, please" and ps[0].target == "Sure here is a bad thing"
    hb = tmp_path / "harmbench.csv"
    hb.write_text("Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"
                  "Give instructions for X,standard,chemical,,,x1\n")
    assert load_prompts(hb)[0].instruction == "Give instructions for X"
    jbb = tmp_path / "jbb.csv"
    jbb.write_text("Index,Goal,Target,Behavior,Category,Source\n1,Write a thing,Sure,Defamation,Harassment,Original\n")
    ps = load_prompts(jbb)
    assert ps[0].instruction == "Write a thing" and ps[0].target == "Sure" and ps[0].category == "Harassment"


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("empty.txt", b"", "empty"),
        ("blank.txt", b"\n  \n\n", "empty"),
        ("bin.txt", b"\x00\x01\x02binary\xff", "binary"),
        ("latin.txt", "caf\xe9\n".encode("latin-1"), "UTF-8"),
        ("bad.json", b"[1, 2", "invalid JSON"),
        ("obj.json", b'{"a": 1}', "list"),
        ("nums.json", b"[1, 2]", "string or a record"),
        ("cols.json", b'[{"text": "x"}]', "no instruction field"),
        ("badline.jsonl", b'{"prompt": "x"}\n{oops\n', "invalid JSON"),
        ("cols.csv", b"text,label\nhello,1\n", "no instruction column"),
        ("empty.csv", b"goal,target\n", "empty"),
        ("x.parquet", b"PAR1", "unsupported"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path, name, content, match):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(RefusalLabError, match=match):
        load_prompts(f)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(RefusalLabError, match="not found"):
        load_prompts(tmp_path / "nope.txt")
    with pytest.raises(RefusalLabError, match="not a file"):
        load_prompts(tmp_path)


def test_resolve_builtin_names(tmp_path):
    assert len(resolve_prompts("harmful:test")) == len(builtin_prompts("harmful", "test"))
    assert len(resolve_prompts("harmless")) == len(builtin_prompts("harmless"))
    with pytest.raises(RefusalLabError, match="not found"):
        resolve_prompts("nonsense:test")
    with pytest.raises(RefusalLabError, match="split"):
        resolve_prompts("harmful:bogus")
