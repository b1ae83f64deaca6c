"""Reliability: every CLI command meets bad input with one clear line and exit status 2,
writes nothing half-way, survives SIGKILL and Ctrl-C, reproduces itself, loads safely, and does not
crash on random bytes or Unicode. All on the tiny random Llama with the real tokenizer."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from refusal import artifacts
from refusal.app.cli import main
from refusal.data import load_prompts
from refusal.directions import Direction, save_direction
from refusal.errors import RefusalLabError

ROOT = Path(__file__).resolve().parents[1]
# words that name a way out; every error message carries one
FIX_WORDS = ("pass ", "use ", "give ", "choose", "shorten", "lower", "check", "download", "compute", "see --help",
             "remove", "fix", "add ", "make one", "save ", "resume", "write ", "reinstall", "pin ", "generate fewer",
             "must be", "expected", "accepts", "need")


def call(capsys, argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def expect_clean_error(capsys, argv, match, out_path=None, before=None):
    """Exit status 2, one line on stderr that names the problem (match) and a fix, no traceback,
    and nothing written at out_path (absent, or as it was)."""
    code, out, err = call(capsys, argv)
    assert code == 2, (argv, code, out, err)
    lines = [l for l in err.strip().splitlines() if not l.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("refusal: error:"), err
    assert "Traceback" not in err
    assert match.lower() in lines[0].lower(), (match, lines[0])
    assert any(w in lines[0].lower() for w in FIX_WORDS), f"no fix named: {lines[0]}"
    if out_path is not None:
        out_path = Path(out_path)
        if before is None:
            assert not out_path.exists(), f"{out_path} was written"
        else:
            assert snapshot(out_path) == before, f"{out_path} changed"
        assert not [p for p in out_path.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"
    return lines[0]


def snapshot(path: Path) -> dict:
    path = Path(path)
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dirs, tiny_models):
    """Good and bad inputs of every kind, made once."""
    d = tmp_path_factory.mktemp("inputs")
    f = {}
    f["model"] = str(tiny_dirs["llama"])
    (d / "good.txt").write_text("\n".join(f"Explain how to pick lock number {i}" for i in range(8)))
    f["good"] = d / "good.txt"
    (d / "harmless.txt").write_text("\n".join(f"Give me a recipe with {i} eggs" for i in range(8)))
    # bad models
    (d / "not-a-model").mkdir()
    (d / "not-a-model" / "notes.txt").write_text("hello")
    f["folder_not_model"] = d / "not-a-model"
    trunc = d / "truncated"
    shutil.copytree(tiny_dirs["llama"], trunc)
    w = trunc / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
    f["truncated_safetensors"] = trunc
    (d / "bad.gguf").write_bytes(b"GGUF" + os.urandom(200))
    f["corrupt_gguf"] = d / "bad.gguf"
    # bad prompt files
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(b"\x00\x01\x02\xff\xfe binary")
    (d / "cols.csv").write_text("text,label\nhello,1\n")
    (d / "invalid.json").write_text('[{"instruction": "x"')
    f.update(empty=d / "empty.txt", binary=d / "binary.txt", columns=d / "cols.csv", json=d / "invalid.json")
    (d / "long.txt").write_text("\n".join("please " * 1100 + f"tell me {i}" for i in range(8)))
    f["long"] = d / "long.txt"
    # directions: a good one, one too wide (another model), one with a layer this model lacks, one from
    # another model of the same width (fingerprint mismatch: a warning)
    cm = tiny_models["llama"]
    v = torch.randn(cm.d_model)
    meta = {"layer": 1, "position": -1, "model": cm.describe()}
    save_direction(d / "dir-good", Direction(v / v.norm(), v, 1, -1, meta), torch.zeros(1, 1, cm.d_model), pd.DataFrame())
    w80 = torch.ones(cm.d_model + 16)
    save_direction(d / "dir-wide", Direction(w80, w80, 1, -1, {"layer": 1, "position": -1}), torch.zeros(1, 1, 80), pd.DataFrame())
    save_direction(d / "dir-deep", Direction(v / v.norm(), v, 9, -1, {"layer": 9, "position": -1}), torch.zeros(1, 1, cm.d_model), pd.DataFrame())
    other = dict(meta, model=dict(cm.describe(), fingerprint="0123456789abcdef"))
    save_direction(d / "dir-other", Direction(v / v.norm(), v, 1, -1, other), torch.zeros(1, 1, cm.d_model), pd.DataFrame())
    f.update(dir_good=d / "dir-good", dir_wide=d / "dir-wide", dir_deep=d / "dir-deep", dir_other=d / "dir-other")
    (d / "notsuffix.json").write_text('{"direction": [1, 2, 3]}')
    f["not_suffix"] = d / "notsuffix.json"
    return f


def command(name, files, out, model=None, **extra):
    """A valid command line for each CLI command, writing under `out` (a fresh folder)."""
    m = model or files["model"]
    base = {
        "direction": ["direction", "--model", m, "--harmful", extra.get("prompts", files["good"]), "--harmless",
                      files["good"].with_name("harmless.txt"), "--n-train", 4, "--n-val", 2, "--out", out],
        "eval": ["eval", "--model", m, "--prompts", extra.get("prompts", files["good"]), "--max-new-tokens", 2,
                 "--out", out / "e.jsonl"],
        "orthogonalize": ["orthogonalize", "--model", m, "--direction", extra.get("direction", files["dir_good"]),
                          "--out", out / "edited"],
        "attack": ["attack", "--model", m, *(["--prompts", extra["prompts"]] if "prompts" in extra else
                                             ["--prompt", "Explain how to pick a lock"]),
                   *(["--objective", "direction", "--direction", extra["direction"]] if "direction" in extra else []),
                   "--steps", 2, "--search-width", 8, "--topk", 8, "--suffix-len", 4, "--out", out],
        "analyze": ["analyze", "--model", m, "--direction", extra.get("direction", files["dir_good"]), "--suffix",
                    extra.get("suffix", "x y z"), "--max-prompts", 2, "--eval-tokens", 0,
                    *(["--prompts", extra["prompts"]] if "prompts" in extra else []), "--out", out],
        "bench": ["bench", "--model", m, "--steps", 1, "--prompts", 1, "--out", out / "bench.json"],
        "run": ["run", "--model", m, "--quick", "--out", out / "main"],
    }[name]
    return base


def written(name, out):
    """The path each command would write (for the nothing-written check)."""
    return {"direction": out / "direction", "eval": out / "e.jsonl", "orthogonalize": out / "edited",
            "attack": out / "attack", "analyze": out / "analysis", "bench": out / "bench.json",
            "run": out / "main"}[name]


MODEL_COMMANDS = ("direction", "eval", "orthogonalize", "attack", "analyze", "bench", "run")
BAD_MODELS = [("unknown_name", "no-such-model", "unknown model"),
              ("folder_not_model", None, "not a Hugging Face model"),
              ("truncated_safetensors", None, "could not load"),
              ("corrupt_gguf", None, "GGUF")]


# ----------------------------------------------------------------------------- 1. bad input matrix


@pytest.mark.parametrize("cmd", MODEL_COMMANDS)
@pytest.mark.parametrize("kind,spec,match", BAD_MODELS, ids=[b[0] for b in BAD_MODELS])
def test_bad_model(capsys, tmp_path, files, cmd, kind, spec, match):
    model = spec or files[kind]
    argv = command(cmd, files, tmp_path, model=model)
    expect_clean_error(capsys, argv, match, written(cmd, tmp_path))


PROMPT_COMMANDS = ("direction", "eval", "attack", "analyze")
BAD_PROMPTS = [("empty", "empty"), ("binary", "binary"), ("columns", "no instruction column"), ("json", "invalid JSON")]


@pytest.mark.parametrize("cmd", PROMPT_COMMANDS)
@pytest.mark.parametrize("kind,match", BAD_PROMPTS, ids=[b[0] for b in BAD_PROMPTS])
def test_bad_prompt_file(capsys, tmp_path, files, cmd, kind, match):
    argv = command(cmd, files, tmp_path, prompts=files[kind])
    expect_clean_error(capsys, argv, match, written(cmd, tmp_path))


@pytest.mark.parametrize("cmd", PROMPT_COMMANDS)
def test_prompt_longer_than_context(capsys, tmp_path, files, cmd):
    argv = command(cmd, files, tmp_path, prompts=files["long"])
    expect_clean_error(capsys, argv, "context", written(cmd, tmp_path))


def test_attack_prompt_longer_than_context(capsys, tmp_path, files):
    argv = ["attack", "--model", files["model"], "--prompt", "please " * 1100, "--steps", 1, "--out", tmp_path]
    expect_clean_error(capsys, argv, "context", tmp_path / "attack")


DIRECTION_COMMANDS = {
    "eval_ablate": lambda f, out, d: ["eval", "--model", f["model"], "--prompts", f["good"], "--ablate", d,
                                      "--out", out / "e.jsonl"],
    "eval_actadd": lambda f, out, d: ["eval", "--model", f["model"], "--prompts", f["good"], "--actadd", d,
                                      "--out", out / "e.jsonl"],
    "orthogonalize": lambda f, out, d: command("orthogonalize", f, out, direction=d),
    "attack": lambda f, out, d: command("attack", f, out, direction=d),
    "analyze": lambda f, out, d: command("analyze", f, out, direction=d),
}
DIRECTION_OUT = {"eval_ablate": "e.jsonl", "eval_actadd": "e.jsonl", "orthogonalize": "edited", "attack": "attack",
                 "analyze": "analysis"}


@pytest.mark.parametrize("cmd", DIRECTION_COMMANDS)
@pytest.mark.parametrize("kind,match", [("dir_wide", "dimension"), ("dir_deep", "out of range"),
                                        ("missing", "not found"), ("not_direction", "not a refusal-lab direction")])
def test_bad_direction(capsys, tmp_path, files, cmd, kind, match):
    if kind == "missing":
        d = tmp_path / "nowhere"
    elif kind == "not_direction":
        d = tmp_path / "fake"
        artifacts.save_tensors(d / "direction.safetensors", {"weights": torch.ones(3, 3)})
        artifacts.write_json(d / "direction.json", {"layer": 1, "position": -1})
    else:
        d = files[kind]
    out = tmp_path / "out"
    out.mkdir()
    expect_clean_error(capsys, DIRECTION_COMMANDS[cmd](files, out, d), match, out / DIRECTION_OUT[cmd])


def test_direction_from_another_model_warns_and_goes_on(capsys, caplog, tmp_path, files):
    code, out, err = call(capsys, ["eval", "--model", files["model"], "--prompts", files["good"], "--ablate",
                                   files["dir_other"], "--max-new-tokens", 2, "--out", tmp_path / "e.jsonl"])
    assert code == 0, err
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "computed on another model" in r.getMessage()]
    assert len(warned) == 1 and "Traceback" not in err
    assert (tmp_path / "e.jsonl").is_file()


@pytest.mark.parametrize("cmd", ("eval", "analyze"))
def test_suffix_file_that_is_not_a_suffix(capsys, tmp_path, files, cmd):
    if cmd == "eval":
        argv = ["eval", "--model", files["model"], "--prompts", files["good"], "--suffix", files["not_suffix"],
                "--out", tmp_path / "e.jsonl"]
    else:
        argv = command("analyze", files, tmp_path, suffix=files["not_suffix"])
    expect_clean_error(capsys, argv, "not a suffix", tmp_path / ("e.jsonl" if cmd == "eval" else "analysis"))


def test_suffix_from_another_tokenizer(capsys, tmp_path, files):
    (tmp_path / "s.json").write_text(json.dumps({"suffix": "x", "token_ids": [10 ** 7]}))
    argv = ["eval", "--model", files["model"], "--prompts", files["good"], "--suffix", tmp_path / "s.json",
            "--out", tmp_path / "e.jsonl"]
    expect_clean_error(capsys, argv, "vocabulary", tmp_path / "e.jsonl")


OUT_OF_RANGE = [
    ("attack", ["--steps", "0"], "--steps"),
    ("attack", ["--steps", "-3"], "--steps"),
    ("attack", ["--steps", "many"], "--steps"),
    ("attack", ["--search-width", "0"], "--search-width"),
    ("attack", ["--topk", "0"], "--topk"),
    ("attack", ["--topk", "100000000"], "--topk"),
    ("attack", ["--suffix-len", "0"], "--suffix-len"),
    ("attack", ["--suffix-len", "5000"], "--suffix-len"),
    ("attack", ["--success-rate", "1.5"], "--success-rate"),
    ("attack", ["--direction-weight", "nan"], "--direction-weight"),
    ("attack", ["--screen-dtype", "int4"], "--screen-dtype"),
    ("attack", ["--rescore", "0"], "--rescore"),
    ("direction", ["--layer", "99", "--position", "-1"], "--layer 99 is out of range"),
    ("direction", ["--layer", "-1", "--position", "-1"], "--layer -1 is out of range"),
    ("direction", ["--layer", "1", "--position", "-99"], "--position -99 is out of range"),
    ("direction", ["--layer", "1", "--position", "0"], "--position 0 is out of range"),
    ("direction", ["--layer", "1"], "both --layer and --position"),
    ("direction", ["--n-train", "0"], "--n-train"),
    ("eval", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("eval", ["--max-new-tokens", "5000"], "context"),
    ("eval", ["--batch-size", "0"], "--batch-size"),
    ("analyze", ["--top-k", "0"], "--top-k"),
    ("analyze", ["--eval-tokens", "-1"], "--eval-tokens"),
    ("bench", ["--steps", "0"], "--steps"),
    ("bench", ["--engines", "native,gcg2"], "unknown engine"),
]


@pytest.mark.parametrize("cmd,extra,match", OUT_OF_RANGE, ids=[f"{c}{''.join(e)}" for c, e, _ in OUT_OF_RANGE])
def test_out_of_range_numbers(capsys, tmp_path, files, cmd, extra, match):
    argv = [str(a) for a in command(cmd, files, tmp_path)]
    argv = argv[:-2] + extra + argv[-2:]  # before --out OUT
    expect_clean_error(capsys, argv, match, written(cmd, tmp_path))


def test_direction_can_be_pinned(capsys, tmp_path, files):
    argv = [str(a) for a in command("direction", files, tmp_path)]
    code, out, err = call(capsys, argv[:-2] + ["--layer", "1", "--position", "-2"] + argv[-2:])
    assert code == 0, err
    rec = json.loads((tmp_path / "direction" / "direction.json").read_text())
    assert (rec["layer"], rec["position"]) == (1, -2) and rec["selection"].startswith("PINNED")
    cands = pd.read_csv(tmp_path / "direction" / "candidates.csv")
    assert cands.loc[cands.selected, ["layer", "position"]].values.tolist() == [[1, -2]]


def test_a_stage_that_fails_half_way_leaves_the_old_one(tmp_path):
    stage = tmp_path / "analysis"
    stage.mkdir()
    (stage / "old.csv").write_text("old")
    with pytest.raises(ZeroDivisionError):
        with artifacts.atomic_dir(stage) as tmp:
            (tmp / "new.csv").write_text("half")
            1 / 0
    assert snapshot(stage) == {"old.csv": b"old"} and sorted(p.name for p in tmp_path.iterdir()) == ["analysis"]
    with artifacts.atomic_dir(stage) as tmp:
        (tmp / "new.csv").write_text("whole")
    assert snapshot(stage) == {"new.csv": b"whole"} and sorted(p.name for p in tmp_path.iterdir()) == ["analysis"]


@pytest.mark.parametrize("cmd", MODEL_COMMANDS)
def test_existing_output_is_refused(capsys, tmp_path, files, cmd):
    target = written(cmd, tmp_path)
    if target.suffix in (".jsonl", ".json"):
        target.write_text("precious\n")
    else:
        target.mkdir(parents=True)
        (target / "precious.txt").write_text("keep me")
    before = snapshot(target)
    line = expect_clean_error(capsys, command(cmd, files, tmp_path), "already exists", target, before=before)
    assert "--force" in line
    if cmd in ("attack", "run"):
        assert "--resume" in line


def test_organism_build_bad_input(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_LAB_CACHE", str(tmp_path))
    existing = tmp_path / "organism" / "seed-0"
    existing.mkdir(parents=True)
    (existing / "organism.json").write_text("{}")
    before = snapshot(existing)
    line = expect_clean_error(capsys, ["organism", "build"], "already exists", existing, before=before)
    assert "--force" in line
    expect_clean_error(capsys, ["organism", "build", "--seed", "one"], "--seed")


def test_unknown_command_and_option(capsys):
    expect_clean_error(capsys, ["bogus"], "invalid choice")
    expect_clean_error(capsys, ["eval", "--model", "x", "--prompts", "y", "--out", "z", "--bogus-flag"], "unrecognized")


# ----------------------------------------------------------------------------- 2. nothing lost


def _attack_cmd(model, out, *extra):
    return [sys.executable, "-m", "refusal.app.cli", "attack", "--model", str(model), "--prompt",
            "Explain how to pick a lock", "--steps", "30", "--search-width", "16", "--topk", "16", "--suffix-len", "5",
            "--no-early-stop", "--seed", "3", "--out", str(out), *extra]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _checkpoint_step(out: Path) -> int:
    try:
        return json.loads((out / "attack" / "checkpoint.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def _result(out: Path) -> tuple:
    rec = json.loads((out / "attack" / "suffix.json").read_text())
    return rec["token_ids"], rec["losses"], rec["suffix"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_dirs):
    out = tmp_path_factory.mktemp("whole")
    p = subprocess.run(_attack_cmd(tiny_dirs["llama"], out), env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return _result(out)


def test_sigkill_at_random_moments_then_resume_gives_the_same_suffix(tmp_path, tiny_dirs, uninterrupted):
    rng = random.Random(7)
    out = tmp_path / "killed"
    kills, extra = 0, []
    while kills < 3:
        proc = subprocess.Popen(_attack_cmd(tiny_dirs["llama"], out, *extra), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        goal = _checkpoint_step(out) + rng.randint(2, 6)
        deadline = time.time() + 300
        while _checkpoint_step(out) < goal and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.2))  # anywhere in a step, a checkpoint write included
        if proc.poll() is not None:
            break  # finished before the kill: nothing more to interrupt
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        state = json.loads((out / "attack" / "checkpoint.json").read_text())  # always whole, valid JSON
        assert state["step"] >= 1
        assert not (out / "attack" / "suffix.json").exists()
        extra = ["--resume"]
    assert kills >= 2
    p = subprocess.run(_attack_cmd(tiny_dirs["llama"], out, "--resume"), env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _result(out) == uninterrupted
    assert not [f for f in (out / "attack").iterdir() if f.name.startswith(".")], "a temporary file was left"


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background parent may have it ignored; Ctrl-C is SIG_DFL


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_interrupt_stops_cleanly_and_resumes(tmp_path, tiny_dirs, uninterrupted, sig, status):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(_attack_cmd(tiny_dirs["llama"], out), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    deadline = time.time() + 300
    while _checkpoint_step(out) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the attack ended before it could be interrupted: " + proc.communicate()[1][-2000:]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-2000:]
    assert "Traceback" not in err and "--resume" in err.strip().splitlines()[-1]
    assert _checkpoint_step(out) >= 4
    p = subprocess.run(_attack_cmd(tiny_dirs["llama"], out, "--resume"), env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _result(out) == uninterrupted


def test_run_folders_record_what_made_them(capsys, tmp_path, files, tiny_models):
    cm = tiny_models["llama"]
    argv = [str(a) for a in command("direction", files, tmp_path / "r")]
    assert call(capsys, argv)[0] == 0
    rec = json.loads((tmp_path / "r" / "direction" / "direction.json").read_text())
    assert rec["command"] == ["refusal", *argv]
    assert rec["versions"]["torch"] and rec["versions"]["transformers"]
    assert rec["model"]["fingerprint"] == cm.fingerprint
    argv = [str(a) for a in command("attack", files, tmp_path / "r")]
    assert call(capsys, argv)[0] == 0
    for name in ("attack.json", "suffix.json"):
        rec = json.loads((tmp_path / "r" / "attack" / name).read_text())
        assert rec["model"]["fingerprint"] == cm.fingerprint
    rec = json.loads((tmp_path / "r" / "attack" / "attack.json").read_text())
    assert rec["command"] == ["refusal", *argv] and {"torch", "transformers", "nanogcg"} <= set(rec["versions"])
    assert not [p for p in (tmp_path / "r").rglob(".*")], "temporary files left behind"


# ----------------------------------------------------------------------------- 3. reproducibility


def test_same_command_same_direction_bitwise(capsys, tmp_path, files):
    for name in ("a", "b"):
        assert call(capsys, command("direction", files, tmp_path / name))[0] == 0
    a = artifacts.load_tensors(tmp_path / "a" / "direction" / "direction.safetensors")
    b = artifacts.load_tensors(tmp_path / "b" / "direction" / "direction.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca = pd.read_csv(tmp_path / "a" / "direction" / "candidates.csv")
    cb = pd.read_csv(tmp_path / "b" / "direction" / "candidates.csv")
    pd.testing.assert_frame_equal(ca, cb)


def test_same_command_same_suffix(capsys, tmp_path, files):
    for name in ("a", "b"):
        assert call(capsys, command("attack", files, tmp_path / name) + ["--seed", "5"])[0] == 0
    assert _result(tmp_path / "a") == _result(tmp_path / "b")


def test_organism_recipe_is_deterministic(tmp_path, tiny_dirs):
    """The organism build (its whole recipe: base answers, frozen layers, fine-tune, evaluation), run twice
    on a tiny Llama base, writes bitwise-identical weights."""
    from dataclasses import replace

    from refusal.organism import OrganismConfig, build_organism

    cfg = replace(OrganismConfig(), epochs=2, eval_new_tokens=2, answer_tokens=2)  # the second epoch's terms too
    paths = [build_organism(cfg, out=tmp_path / n, base=str(tiny_dirs["llama"])) for n in ("a", "b")]
    a = artifacts.load_tensors(paths[0] / "model.safetensors")
    b = artifacts.load_tensors(paths[1] / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((p / "organism.json").read_text()) for p in paths)
    assert ra["losses"] == rb["losses"] and ra["data_hash"] == rb["data_hash"]


# ----------------------------------------------------------------------------- 4. safe loading


def test_no_unsafe_loading_in_the_code():
    """No pickle, no eval/exec, torch.load only with weights_only=True, remote code never forced on."""
    import ast

    for path in [*ROOT.glob("refusal/**/*.py"), *ROOT.glob("attacks/*.py"), *ROOT.glob("analysis/*.py"),
                 *ROOT.glob("experiments/*.py")]:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "pickle":
                # the error a refused pickle raises may be caught; nothing that unpickles may be imported
                assert [a.name for a in node.names] == ["UnpicklingError"], path
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names), path
            if isinstance(node, ast.Call):
                fn = ast.unparse(node.func)
                assert fn not in ("eval", "exec", "pickle.load", "pickle.loads", "os.system"), (path, fn)
                if fn.endswith("torch.load"):
                    kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    assert kw.get("weights_only") == "True", (path, node.lineno)
                for k in node.keywords:
                    if k.arg == "trust_remote_code":
                        assert ast.unparse(k.value) != "True", (path, node.lineno)
                    if k.arg == "shell":
                        assert ast.unparse(k.value) != "True", (path, node.lineno)


def test_model_code_is_not_run_without_trust_remote_code(capsys, tmp_path, tiny_dirs):
    d = tmp_path / "custom"
    shutil.copytree(tiny_dirs["llama"], d)
    marker = tmp_path / "code-ran"
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    line = expect_clean_error(capsys, ["eval", "--model", d, "--prompts", "harmful:test", "--out", tmp_path / "e.jsonl"],
                              "own python code", tmp_path / "e.jsonl")
    assert "--trust-remote-code" in line
    assert not marker.exists()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_weights_are_not_executed(capsys, tmp_path, tiny_dirs):
    """A model folder whose weights are a malicious pickle: loading fails cleanly and the pickle's code never runs
    (PyTorch files are read with weights_only=True)."""
    d = tmp_path / "pickled"
    shutil.copytree(tiny_dirs["llama"], d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pickle-ran"
    torch.save({"model.embed_tokens.weight": _Evil(marker)}, d / "pytorch_model.bin")
    expect_clean_error(capsys, ["eval", "--model", d, "--prompts", "harmful:test", "--out", tmp_path / "e.jsonl"],
                       "could not load", tmp_path / "e.jsonl")
    assert not marker.exists()


def test_paths_in_prompt_files_are_text(tmp_path, tiny):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    lines = [str(secret), "../../../etc/passwd", "file:///etc/passwd", "harmful:test", "$(touch pwned)",
             "`rm -rf ~`", "{{ config }}", "~/.ssh/id_rsa"]
    for ext, text in ((".txt", "\n".join(lines)), (".json", json.dumps(lines)),
                      (".jsonl", "\n".join(json.dumps({"prompt": l}) for l in lines)),
                      (".csv", "goal\n" + "\n".join(json.dumps(l) for l in lines))):
        f = tmp_path / f"p{ext}"
        f.write_text(text)
        got = [p.instruction for p in load_prompts(f)]
        assert got == lines, ext
        for g in got:
            assert "TOP SECRET" not in tiny.chat.render(g)
    assert not (Path.cwd() / "pwned").exists()


# ----------------------------------------------------------------------------- 5. fuzz


def test_fuzz_prompt_loaders_and_chat_formatting(tmp_path, tiny):
    """Random bytes and random Unicode (control characters, right-to-left marks, lone surrogates, emoji,
    very long lines) through every loader and the chat formatting: a result or a RefusalLabError, nothing else."""
    rng = random.Random(1234)
    pool = ([chr(c) for c in range(32)] + ["\x7f", "\u200f", "\u202e", "\u202b", "\ufeff", "\u0627", "\u05d0", "\u4e2d",
            "\U0001f600", "\U0010ffff", "\ud800", "\udfff", "\u0301", "\u2028"] + list("abc xyz,;.\"'{}[]:\\\t\n"))
    outcomes = {"ok": 0, "error": 0}

    def attempt(fn):
        try:
            fn()
            outcomes["ok"] += 1
        except RefusalLabError as e:
            assert str(e) and "\n" not in str(e).strip(), repr(str(e))
            outcomes["error"] += 1

    def load_and_format(path):
        for p in load_prompts(path):
            enc = tiny.chat.encode(p.instruction, "x y")
            assert enc.ids[enc.instruction[0]:enc.instruction[1]] or not p.instruction.strip()

    for i in range(150):
        n = rng.choice([0, 1, 7, 300, 20000])
        data = bytes(rng.getrandbits(8) for _ in range(n))
        if i % 5 == 0:  # mostly-text bytes get further into the parsers
            data = "".join(rng.choice(pool[20:]) for _ in range(n)).encode("utf-8", "surrogatepass")
        for ext in (".txt", ".json", ".jsonl", ".csv"):
            f = tmp_path / f"b{i}{ext}"
            f.write_bytes(data)
            attempt(lambda f=f: load_and_format(f))
    for i in range(150):
        text = "".join(rng.choice(pool) for _ in range(rng.choice([1, 12, 400, 4000])))
        attempt(lambda text=text: tiny.chat.encode(text, text[:20]))
        for ext, body in ((".txt", text), (".json", json.dumps([text])), (".jsonl", json.dumps({"goal": text})),
                          (".csv", "goal\n" + json.dumps(text))):
            f = tmp_path / f"u{i}{ext}"
            f.write_bytes(body.encode("utf-8", "surrogatepass"))
            attempt(lambda f=f: load_and_format(f))
    line = "\u202eright to left " * 20000  # one very long right-to-left line
    f = tmp_path / "long.txt"
    f.write_text(line)
    attempt(lambda: load_and_format(f))
    assert outcomes["ok"] > 50 and outcomes["error"] > 50, outcomes


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_keep_the_permissions_a_plain_write_gets(tmp_path, umask):
    """Artifacts written through the atomic helpers get 0666 / 0777 less the umask, as a plain write would:
    not the temporary file's 0600 (a run folder shared with a group stays readable to it)."""
    old = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        (tmp_path / "plain_dir").mkdir()
        artifacts.write_text(tmp_path / "a.txt", "x")
        artifacts.write_json(tmp_path / "a.json", {"a": 1})
        artifacts.save_tensors(tmp_path / "a.safetensors", {"t": torch.zeros(2)})
        with artifacts.atomic_dir(tmp_path / "stage") as tmp:
            artifacts.write_text(tmp / "inner.txt", "x")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(plain) == 0o666 & ~umask
    for name in ("a.txt", "a.json", "a.safetensors", "stage/inner.txt"):
        assert mode(tmp_path / name) == mode(plain), name
    assert mode(tmp_path / "stage") == mode(tmp_path / "plain_dir") == 0o777 & ~umask
