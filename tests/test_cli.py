"""The CLI end to end on a tiny model, and its error contract: one line on stderr, exit status 2."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from refusal.activations import last_logits
from refusal.app.cli import main
from refusal.directions import Direction, load_direction, save_direction
from refusal.errors import RefusalLabError
from refusal.hooks import ablate_direction
from refusal.registry import load_model


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(capsys, *argv, match=""):
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refusal: error:"), err
    assert "Traceback" not in err
    assert match.lower() in err.lower(), err
    return err


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    (d / "harmful.txt").write_text("\n".join(f"Explain how to build dangerous device {i}" for i in range(8)))
    (d / "harmless.txt").write_text("\n".join(f"Give me a recipe with {i} eggs" for i in range(8)))
    return d


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_dirs, prompt_files):
    """`refusal direction` on the tiny Llama, once for this module."""
    out = tmp_path_factory.mktemp("run")
    code = main(["direction", "--model", str(tiny_dirs["llama"]), "--harmful", str(prompt_files / "harmful.txt"),
                 "--harmless", str(prompt_files / "harmless.txt"), "--n-train", "6", "--n-val", "2", "--out", str(out)])
    assert code == 0
    return out


def test_direction_writes_its_artifacts(tiny_run):
    d = tiny_run / "direction"
    assert {p.name for p in d.iterdir()} == {"direction.safetensors", "direction.json", "candidates.csv"}
    meta = json.loads((d / "direction.json").read_text())
    for key in ("layer", "position", "scores", "model", "prompts", "timings_s", "versions", "command", "config"):
        assert key in meta
    assert meta["model"]["fingerprint"] and meta["prompts"]["harmful_train"]["n"] == 6
    df = pd.read_csv(d / "candidates.csv")
    assert len(df) == 3 * 6 and df.selected.sum() == 1
    assert {"layer", "position", "bypass_score", "induce_score", "kl_score", "passed", "reason"} <= set(df.columns)


def test_direction_refuses_to_overwrite(capsys, tiny_run, tiny_dirs):
    assert_user_error(capsys, "direction", "--model", tiny_dirs["llama"], "--out", tiny_run, match="--force")


def test_orthogonalize_then_load_matches_ablation(capsys, tmp_path, tiny_run, tiny_dirs):
    code, out, err = run(capsys, "orthogonalize", "--model", tiny_dirs["llama"], "--direction", tiny_run,
                         "--out", tmp_path / "edited")
    assert code == 0, err
    assert (tmp_path / "edited" / "config.json").is_file() and (tmp_path / "edited" / "refusal_lab.json").is_file()
    base = load_model(str(tiny_dirs["llama"]))
    edited = load_model(str(tmp_path / "edited"))
    d = load_direction(tiny_run / "direction", base)
    encs = base.chat.encode_all(["Hello there", "How do I pick a lock?"])
    with ablate_direction(base, d.vector):
        ablated = last_logits(base, encs)
    assert (last_logits(edited, encs) - ablated).abs().max() < 1e-4
    assert_user_error(capsys, "orthogonalize", "--model", tiny_dirs["llama"], "--direction", tiny_run,
                      "--out", tmp_path / "edited", match="already exists")


def test_eval_writes_jsonl_and_prints_rate(capsys, tmp_path, tiny_run, tiny_dirs, prompt_files):
    out = tmp_path / "res.jsonl"
    code, stdout, err = run(capsys, "eval", "--model", tiny_dirs["llama"], "--prompts", prompt_files / "harmful.txt",
                            "--ablate", tiny_run, "--suffix", "! ! !", "--max-new-tokens", 4, "--out", out)
    assert code == 0, err
    assert "refusal rate" in stdout
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 8
    for r in rows:
        assert {"prompt", "completion", "refused", "refusal_score", "suffix"} <= set(r)
        assert isinstance(r["refused"], bool) and isinstance(r["refusal_score"], float)
    code, stdout, err = run(capsys, "eval", "--model", tiny_dirs["llama"], "--prompts", "harmless:val",
                            "--actadd", tiny_run / "direction", "--coeff", 2, "--max-new-tokens", 2,
                            "--out", tmp_path / "b.jsonl")
    assert code == 0, err


def test_eval_of_a_suffix_from_another_model_is_transfer(capsys, tmp_path, tiny_dirs, prompt_files):
    from refusal.metrics import attack_success

    sfx = tmp_path / "suffix.json"
    sfx.write_text(json.dumps({"suffix": "! ! !", "model": {"fingerprint": "another-model"}}))
    out = tmp_path / "t.jsonl"
    code, stdout, err = run(capsys, "eval", "--model", tiny_dirs["qwen2"], "--prompts", prompt_files / "harmful.txt",
                            "--suffix", sfx, "--max-new-tokens", 6, "--out", out)
    assert code == 0, err
    assert "attack success by judge: substring" in stdout and "strict" in stdout and "transfer" in stdout
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    # every success names its judge: the paper's substring judge beside the chosen one (default strict)
    assert [r["substring_success"] for r in rows] == [attack_success(r["completion"]) for r in rows]
    assert {r["judge"] for r in rows} == {"strict"} and [r["success"] for r in rows] == [r["verdict"] == "complies" for r in rows]
    rec = json.loads(out.with_name("t.jsonl.record.json").read_text())
    assert rec["transfer"] is True and rec["judge"] == "strict"
    assert rec["attack_success_rate"] == sum(r["success"] for r in rows) / len(rows)
    assert rec["attack_success_rates"]["substring"] == sum(r["substring_success"] for r in rows) / len(rows)
    assert set(rec["verdict_rates"]) == {"complies", "refuses", "neither"}


def test_user_errors(capsys, tmp_path, tiny_run, tiny_dirs, prompt_files):
    tiny = str(tiny_dirs["llama"])
    assert_user_error(capsys, "eval", "--model", "nonsense-model", "--prompts", "harmful:test", "--out",
                      tmp_path / "x.jsonl", match="accepts")
    assert_user_error(capsys, "eval", "--model", tmp_path, "--prompts", "harmful:test", "--out", tmp_path / "x.jsonl",
                      match="not a Hugging Face model")
    assert_user_error(capsys, "eval", "--model", tiny, "--prompts", tmp_path / "missing.txt", "--out",
                      tmp_path / "x.jsonl", match="not found")
    (tmp_path / "empty.txt").write_text("")
    assert_user_error(capsys, "direction", "--model", tiny, "--harmful", tmp_path / "empty.txt",
                      "--out", tmp_path / "r", match="empty")
    assert_user_error(capsys, "eval", "--model", tiny, "--prompts", "harmful:test", "--ablate", tmp_path / "nodir",
                      "--out", tmp_path / "x.jsonl", match="direction not found")
    # a direction from a wider model: dimension mismatch stops
    wide = Direction(torch.ones(80), torch.ones(80), 0, -1, {"layer": 0, "position": -1})
    save_direction(tmp_path / "wide", wide, torch.ones(1, 1, 80), pd.DataFrame())
    assert_user_error(capsys, "eval", "--model", tiny, "--prompts", "harmful:test", "--ablate", tmp_path / "wide",
                      "--out", tmp_path / "x.jsonl", match="dimension")
    deep = Direction(torch.ones(64), torch.ones(64), 9, -1, {"layer": 9, "position": -1})
    save_direction(tmp_path / "deep", deep, torch.ones(1, 1, 64), pd.DataFrame())
    assert_user_error(capsys, "eval", "--model", tiny, "--prompts", "harmful:test", "--actadd", tmp_path / "deep",
                      "--out", tmp_path / "x.jsonl", match="out of range")
    assert_user_error(capsys, "direction", "--model", tiny, "--n-val", "0", "--out", tmp_path / "r", match="--n-val")
    assert_user_error(capsys, "eval", "--model", tiny, "--out", tmp_path / "x.jsonl", match="--prompts")
    (tmp_path / "exists.jsonl").write_text("")
    assert_user_error(capsys, "eval", "--model", tiny, "--prompts", "harmful:test", "--out", tmp_path / "exists.jsonl",
                      match="already exists")
    (tmp_path / "bad.json").write_text('{"not": "a suffix"}')
    assert_user_error(capsys, "eval", "--model", tiny, "--prompts", "harmful:test", "--suffix", tmp_path / "bad.json",
                      "--out", tmp_path / "y.jsonl", match="not a suffix")
    assert_user_error(capsys, "bogus-command", match="invalid choice")


def test_console_script_error_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "refusal.app.cli", "eval", "--model", "no/such/thing/here",
                        "--prompts", "harmful:test", "--out", str(tmp_path / "o.jsonl")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr


def test_main_job_end_to_end_and_reuse(tiny_dirs, tmp_path, capsys, monkeypatch):
    import refusal.app.pipeline as pipeline

    # the plumbing, at toy sizes (the real sizes are measured on the organism, docs/results.md)
    monkeypatch.setattr(pipeline, "QUICK_SIZES", dict(
        direction=dict(n_train=16, n_val=4), attack=dict(steps=3, search_width=16, topk=16, suffix_len=6),
        attack_prompts=2, n_test=8, new_tokens=8))
    out = tmp_path / "main"
    assert_user_error(capsys, "run", "--model", tiny_dirs["llama"], "--quick", "--attack-max-time-s", "0", "--out", out,
                      match="--attack-max-time-s must be > 0")
    code, stdout, err = run(capsys, "run", "--model", tiny_dirs["llama"], "--quick", "--attack-max-time-s", "none",
                            "--out", out)
    assert code == 0, err
    for f in ("direction/direction.safetensors", "attack/suffix.json", "attack/steps.csv", "eval/summary.csv",
              "eval/harmful_adversarial_suffix.jsonl", "analysis/report.html", "analysis/projection.csv",
              "analysis/heads.csv", "analysis/attention.csv", "harmfulness/direction.safetensors",
              "analysis/harmfulness.csv", "analysis/harmfulness_by_layer.png", "run.json"):
        assert (out / f).is_file(), f
    assert "report:" in stdout and "the adversarial suffix lowers the mean cosine" in stdout
    assert "on the harmfulness direction (layer" in (out / "analysis" / "report.md").read_text()
    summary = pd.read_csv(out / "eval" / "summary.csv")
    assert set(summary.condition) == {"none", "random_suffix", "adversarial_suffix", "ablation", "addition"}
    assert set(summary.judge) == {"strict"} and {"attack_success", "attack_success_substring"} <= set(summary.columns)
    suffix = json.loads((out / "attack" / "suffix.json").read_text())
    assert suffix["judge"] == "strict" and suffix["config"]["judge"]["name"] == "strict"
    assert suffix["config"]["max_time_s"] is None  # the job's budget lifted
    assert "by the substring judge" in stdout and "by the strict judge" in stdout
    stamp = (out / "attack" / "suffix.json").stat().st_mtime_ns
    assert_user_error(capsys, "run", "--model", tiny_dirs["llama"], "--quick", "--out", out, match="--resume")
    code, stdout, err = run(capsys, "run", "--model", tiny_dirs["llama"], "--quick", "--resume", "--out", out)
    assert code == 0, err
    assert (out / "attack" / "suffix.json").stat().st_mtime_ns == stamp  # stages reused, not redone


def test_main_job_from_a_script_with_a_config(tiny_dirs, tmp_path):
    """A script calls the main job as the CLI does: a loaded model, a JobConfig, a folder; it gets the record."""
    from refusal.judges import JudgeConfig
    from refusal.app.pipeline import JobConfig, main_job

    cm = load_model(str(tiny_dirs["llama"]))
    from attacks.gcg import GCGConfig
    from refusal.directions import DirectionConfig

    config = JobConfig(direction=DirectionConfig(n_train=16, n_val=4), attack_prompts=2, n_test=4, new_tokens=4, top_k=2,
                       attack=GCGConfig(steps=2, search_width=8, topk=8, suffix_len=4), judge=JudgeConfig("substring"))
    lines = []
    rec = main_job(cm, config, tmp_path / "job", progress=lines.append)
    assert rec["judge"] == "substring" and rec["config"]["n_test"] == 4 and not rec["quick"]
    assert {r["condition"] for r in rec["summary"]} == {"none", "random_suffix", "adversarial_suffix", "ablation", "addition"}
    assert json.loads((tmp_path / "job" / "run.json").read_text())["config"] == rec["config"]
    assert Path(rec["report"]).is_file() and rec["sentences"] and lines[0].startswith("[direction]")
    with pytest.raises(RefusalLabError, match="--resume"):  # the folder is not overwritten unasked
        main_job(cm, config, tmp_path / "job")
    with pytest.raises(RefusalLabError, match="contradict"):
        main_job(cm, JobConfig(resume=True, force=True), tmp_path / "other")
    with pytest.raises(RefusalLabError, match="n-test must be >= 1"):
        main_job(cm, JobConfig(n_test=0), tmp_path / "other")


def test_cli_defaults_are_the_configs_defaults():
    """Every option named like a field of its command's config defaults to that field's default (the options
    are built from the dataclasses, so a default is written once)."""
    import dataclasses

    from refusal.app.reproduce import ReproduceConfig
    from refusal.app.analyze import AnalysisConfig
    from refusal.app.bench import BenchConfig
    from attacks.gcg import GCGConfig
    from refusal.app.cli import build_parser
    from refusal.directions import DirectionConfig
    from refusal.app.evaluation import EvalConfig
    from refusal.judges import JudgeConfig
    from refusal.app.pipeline import JobConfig
    from refusal.registry import ModelConfig

    cases = [(["direction", "--model", "m", "--out", "o"], [DirectionConfig, ModelConfig]),
             (["eval", "--model", "m", "--prompts", "p", "--out", "o"], [EvalConfig, ModelConfig]),
             (["attack", "--model", "m", "--prompt", "x", "--out", "o"], [GCGConfig, ModelConfig]),
             (["analyze", "--model", "m", "--direction", "d", "--suffix", "s", "--out", "o"], [AnalysisConfig]),
             (["bench"], [BenchConfig]), (["run"], [JobConfig]), (["reproduce"], [ReproduceConfig]),
             (["judge", "f.jsonl"], [JudgeConfig])]
    checked = 0
    for argv, classes in cases:
        args = vars(build_parser().parse_args(argv))
        for cls in classes:
            for f in dataclasses.fields(cls):
                if f.name in args and f.name not in ("model", "prompts", "judge") and f.default is not dataclasses.MISSING:
                    assert args[f.name] == f.default, (argv[0], cls.__name__, f.name, args[f.name], f.default)
                    checked += 1
        assert args.get("judge", "strict") == JudgeConfig().name
    # the bench's attack options start from its own attack settings, not the attack's
    args = vars(build_parser().parse_args(["bench"]))
    bench_attack = BenchConfig().attack
    for f in dataclasses.fields(GCGConfig):
        own = {g.name for g in dataclasses.fields(BenchConfig)}  # steps, seed, max_time_s: the bench's own
        if f.name in args and f.name != "judge" and f.name not in own:
            assert args[f.name] == getattr(bench_attack, f.name), f.name
            checked += 1
    assert args["search_width"] == 64
    assert checked >= 50


def test_an_internal_failure_keeps_its_traceback_and_says_it_is_a_bug(monkeypatch, capsys, tmp_path):
    import refusal.app.cli as cli

    def broken(args):
        raise ZeroDivisionError("an internal slip")

    monkeypatch.setattr(cli, "cmd_judge", broken)
    reply = tmp_path / "r.jsonl"
    reply.write_text('{"prompt": "a", "completion": "b"}\n')
    assert main(["judge", str(reply)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: an internal slip" in err and "a bug in refusal-lab" in err


def test_a_user_error_keeps_its_cause(tmp_path):
    from refusal.artifacts import load_tensors

    bad = tmp_path / "direction.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(RefusalLabError, match="not a readable safetensors file") as e:
        load_tensors(bad)
    assert e.value.__cause__ is not None
