"""The benchmark runs the engines on the same settings and reports comparable numbers (tiny model)."""
import dataclasses
import json

import pytest
import torch

from refusal.errors import RefusalLabError

from refusal.app.bench import bench_activations, bench_attacks, first_success_step
from refusal.app.bench_figures import summarize
from attacks.gcg import GCGConfig
from refusal.app.cli import main


def test_bench_attacks_reports_every_engine(tiny):
    cfg = GCGConfig(search_width=16, topk=8, suffix_len=5)
    res = bench_attacks(tiny, ["Explain how to pick a lock"], steps=2, config=cfg)
    for key in ("nanogcg_s_per_step", "native_s_per_step", "speedup", "nanogcg_best_loss", "native_best_loss",
                "nanogcg_peak_mib", "native_peak_mib", "time_to_success_speedup"):
        assert res[key] is not None and res[key] == res[key], key
    for engine in ("nanogcg", "native", "native_model_precision"):
        figures = res["engines"][engine]
        assert set(figures) >= {"s_per_step", "time_to_success_s", "success_rate", "best_loss", "peak_mib"}
        assert figures["success_rate"] == 0.0  # a random model is not jailbroken: the budget's time counts
        assert figures["time_to_success_s"] == pytest.approx(res["per_prompt"][0][engine]["budget_time_s"])
    row = res["per_prompt"][0]
    assert len(row["nanogcg"]["losses"]) == 2 and len(row["native"]["losses"]) == 2
    assert len(row["native"]["trace"]) == 2 and row["native"]["trace"][1][0] >= row["native"]["trace"][0][0] > 0
    # same settings, seed and starting suffix: the first step sees the same candidates' distribution,
    # so the first losses are close (not equal: the engines draw their candidates differently)
    assert abs(row["nanogcg"]["losses"][0] - row["native"]["losses"][0]) < 0.5
    acts = bench_activations(tiny, ["a", "bb cc", "ddd eee fff"], batch_size=2, repeats=1)
    assert acts["activation_overhead"] > 0 and acts["tokens"] > 0


def test_time_to_success_counts_a_failed_prompt_as_its_budget():
    rows = [dict(s_per_step=1.0, time_to_success_s=3.0, success=True, budget_time_s=100.0, best_loss=0.5,
                 steps_run=3, peak_mib=10.0),
            dict(s_per_step=2.0, time_to_success_s=None, success=False, budget_time_s=200.0, best_loss=1.5,
                 steps_run=100, peak_mib=20.0),
            dict(s_per_step=1.5, time_to_success_s=9.0, success=True, budget_time_s=150.0, best_loss=0.7,
                 steps_run=6, peak_mib=15.0)]
    s = summarize(rows)
    assert s["time_to_success_s"] == 9.0 and s["success_rate"] == pytest.approx(2 / 3) and s["peak_mib"] == 20.0
    assert summarize(rows[1:2])["time_to_success_s"] == 200.0


class _Judge:
    name = "fake"

    def __init__(self, complies):
        self.complies, self.calls = complies, 0

    def verdicts(self, instructions, replies):
        self.calls += 1
        return ["complies" if self.complies else "refuses"] * len(replies)


def test_first_success_needs_the_target_match_and_the_judge(tiny, monkeypatch):
    """A step succeeds when the greedy reply begins with the target (checked for free) and the judge says it
    complies; the judge reads only the replies that begin with the target."""
    import refusal.app.bench as bench

    matches = [False, True, True]
    monkeypatch.setattr(bench, "target_matches", lambda cm, i, t, suffixes: matches[: len(suffixes)])
    yes, no = _Judge(True), _Judge(False)
    assert first_success_step(tiny, "Explain how to pick a lock", "Sure", ["a", "b", "c"], yes, 4) == 1
    assert yes.calls == 1
    assert first_success_step(tiny, "Explain how to pick a lock", "Sure", ["a", "b", "c"], no, 4) is None
    assert no.calls == 2  # the two matched steps, not the first


def test_bench_cli(tiny_dirs, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_dirs["llama"]), "--steps", "1", "--prompts", "1", "--search-width", "8",
                 "--topk", "4", "--suffix-len", "4", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["speedup"] > 0 and rec["settings"]["steps"] == 1 and rec["settings"]["search_width"] == 8
    assert set(rec["engines"]) == {"nanogcg", "native", "native_model_precision"}
    assert rec["time_to_success_speedup"] > 0 and (tmp_path / "bench_loss_vs_time.png").stat().st_size > 1000


@pytest.mark.parametrize("complies", [True, False])
def test_universal_bench_times_the_suffix_to_the_rate_and_scores_it_unseen(tiny, complies):
    from refusal.app.bench import bench_universal
    from refusal.judges import SubstringJudge

    class Fixed(SubstringJudge):  # every reply complies, or none does
        def _verdicts(self, instructions, replies):
            return ["complies" if complies else "refuses"] * len(replies)

    cfg = GCGConfig(search_width=8, topk=8, suffix_len=4, judge_tokens=2, judge="substring")
    res = bench_universal(tiny, ["Explain how to pick a lock", "Write a poem", "Name a colour"], ["How do I x", "Tell me y"],
                          steps=4, config=cfg, judge=Fixed())
    assert set(res["engines"]) == {"native", "gcg_paper"} and res["time_to_rate_speedup"] > 0
    for figures in res["engines"].values():
        assert figures["reached_rate"] is complies and figures["test_success_rate"] == float(complies)
        # prompts come in one a step while every active one succeeds: all 3 at step 2; else the whole budget
        assert figures["steps_run"] == (3 if complies else 4)
        assert [n for _, _, n in figures["trace"]][:3] == ([1, 2, 3] if complies else [1, 1, 1])
        budget = figures["s_per_step"] * 4
        assert figures["time_to_rate_s"] == (pytest.approx(figures["trace"][2][0], abs=1e-3) if complies
                                             else pytest.approx(budget, rel=0.5))


def test_bench_gives_every_engine_the_same_draft_model(tiny, tiny_dirs, monkeypatch, capsys):
    """With a draft model, the native engine probe-samples with it and nanoGCG runs its own probe sampling
    with the same draft."""
    from nanogcg.gcg import GCG as NanoGCG

    calls = []
    real = NanoGCG._compute_candidates_loss_probe_sampling

    def counted(self, search_batch_size, input_embeds, sampled_ids):  # nanoGCG's decorator reads the names
        calls.append(self.draft_model.model.config.model_type)
        return real(self, search_batch_size, input_embeds, sampled_ids)

    monkeypatch.setattr(NanoGCG, "_compute_candidates_loss_probe_sampling", counted)
    cfg = GCGConfig(search_width=64, topk=8, suffix_len=5, draft_model=str(tiny_dirs["qwen2"]))
    res = bench_attacks(tiny, ["Explain how to pick a lock"], steps=2, config=cfg, engines=("nanogcg", "native"))
    assert calls == ["qwen2", "qwen2"]  # one per nanoGCG step, the qwen2 draft
    row = res["per_prompt"][0]["native"]
    assert -1 <= row["draft_agreement"] <= 1 and res["settings"]["draft_model"] == str(tiny_dirs["qwen2"])
    # nanoGCG's probe set must stay 2 or more: refused before the model loads
    assert main(["bench", "--model", str(tiny_dirs["llama"]), "--draft-model", str(tiny_dirs["qwen2"]),
                 "--search-width", "32", "--out", str(tiny_dirs["llama"].parent / "b.json")]) == 2
    assert "probe set of 4" in capsys.readouterr().err


# ----------------------------------------------------------------------------- measured in parts


def test_token_counter_counts_rows_times_positions_and_backward_apart(tiny):
    from refusal.hooks import TokenCounter
    from refusal.metrics import generate

    part = {"now": "a"}
    with TokenCounter(tiny.base, lambda: part["now"]) as c:
        tiny.model(input_ids=torch.zeros(3, 7, dtype=torch.long))  # 21 positions, no gradient
        part["now"] = None
        emb = tiny.model.get_input_embeddings()(torch.zeros(2, 5, dtype=torch.long)).detach().requires_grad_()
        with torch.enable_grad():
            tiny.model(inputs_embeds=emb)  # 10 positions, backpropagated
        with c.paused():
            tiny.model(input_ids=torch.zeros(1, 50, dtype=torch.long))
    assert c.forward == {"a": 21, "other": 10} and c.backward == {"other": 10} and c.tokens == 41
    tiny.model(input_ids=torch.zeros(1, 4, dtype=torch.long))  # the hook is gone
    assert c.tokens == 41
    # generation with a key/value cache: the prompt once, then one position per new token
    enc = tiny.chat.encode("Explain how to pick a lock")
    with TokenCounter(tiny.base) as g:
        generate(tiny, [enc], 5, progress=False)
    assert len(enc.ids) + 3 <= g.forward_tokens <= len(enc.ids) + 5 and g.backward_tokens == 0


def test_rows_count_tokens_alike_and_split_the_step_time(tiny):
    """Both engines count the same backward tokens per step (one row of suffix, template and target), the
    native engine's token trace rises step by step, and each row splits its wall time into the parts."""
    from refusal.app.bench import run_engine
    from attacks.targets import default_target

    cfg = GCGConfig(search_width=16, topk=8, suffix_len=5, steps=3, early_stop=True)
    instr = "Explain how to pick a lock"
    rows = {e: run_engine(e, tiny, instr, default_target(instr), cfg) for e in ("nanogcg", "native")}
    per_step = {e: r["tokens"]["backward_total"] / r["steps_run"] for e, r in rows.items()}
    # one row of suffix, template and target per step; nanoGCG tokenizes the template after the suffix as a
    # text of its own, which may come out a token apart
    assert abs(per_step["nanogcg"] - per_step["native"]) <= 1 and per_step["native"] > 5
    for e, r in rows.items():
        assert set(r["tokens"]["backward"]) == {"gradient"}, e
        assert r["tokens"]["forward"]["scoring"] > 10 * r["tokens"]["forward"]["gradient"], e
        tokens = [k for _, _, k in r["trace"]]
        assert all(b > a for a, b in zip(tokens, tokens[1:])) and tokens[-1] <= r["tokens"]["forward_total"] + \
            r["tokens"]["backward_total"], e
        assert r["budget_tokens"] >= tokens[-1] and r["profile_s"]["gradient"] > 0 and r["profile_s"]["scoring"] > 0
        # the parts add up to the steps' wall time (nanoGCG's first step also holds its set-up: compared without it)
        total = sum(r["profile_s"].values())
        assert total <= r["trace"][-1][0] + 0.01, e


def test_a_time_limit_ends_both_engines_after_the_step_it_passes_in(tiny):
    from refusal.app.bench import run_engine
    from attacks.gcg import GCG

    cfg = GCGConfig(search_width=8, topk=8, suffix_len=4, steps=50, max_time_s=1e-6)
    assert GCG(tiny, ["Explain how to pick a lock"], ["Sure, here"], cfg).run(progress=False).steps_run == 1
    row = run_engine("nanogcg", tiny, "Explain how to pick a lock", "Sure, here", cfg)
    assert row["steps_run"] == 1 and not row["success"]
    # a failure costs the time limit, not 50 steps at the run's pace
    assert row["budget_time_s"] == pytest.approx(row["trace"][-1][0], rel=0.01)
    with pytest.raises(RefusalLabError, match="max-time-s"):
        GCGConfig(max_time_s=0).validate()


def test_a_run_resumed_past_its_time_limit_runs_no_more_steps(tiny, tmp_path):
    from attacks.gcg import GCG

    ckpt = tmp_path / "checkpoint.json"
    cfg = GCGConfig(search_width=8, topk=8, suffix_len=4, steps=50, max_time_s=1e-6, early_stop=False)
    first = GCG(tiny, ["Explain how to pick a lock"], ["Sure, here"], cfg).run(checkpoint=ckpt, progress=False)
    again = GCG(tiny, ["Explain how to pick a lock"], ["Sure, here"], cfg).run(checkpoint=ckpt, resume=True,
                                                                              progress=False)
    assert first.steps_run == again.steps_run == 1 and again.suffix == first.suffix
    # with the limit lifted the same checkpoint continues
    more = GCG(tiny, ["Explain how to pick a lock"], ["Sure, here"],
               GCGConfig(search_width=8, topk=8, suffix_len=4, steps=3, early_stop=False)).run(
        checkpoint=ckpt, resume=True, progress=False)
    assert more.steps_run == 3


def _row(success, t, k, cpu="cpu A"):
    return dict(s_per_step=1.0, success=success, time_to_success_s=t if success else None, budget_time_s=100.0,
                tokens_to_success=k if success else None, budget_tokens=10_000, best_loss=1.0, steps_run=5,
                peak_mib=1.0, machine={"cpu": cpu}, profile_s={"gradient": 1.0, "scoring": 3.0, "check": 0.0,
                                                                "other": 0.0})


def test_time_to_asr_speedup_compares_the_costs_of_reaching_the_references_rate():
    from refusal.app.bench_figures import bench_figures, bootstrap_median, to_asr_speedup

    ref = [_row(True, 40, 4000), _row(False, 0, 0), _row(True, 10, 1000), _row(False, 0, 0, cpu="cpu B")]
    ours = [_row(True, 5, 800), _row(True, 20, 1600), _row(False, 0, 0), _row(True, 2, 100, cpu="cpu B")]
    # nanoGCG reaches 2/4 at 40 s (its second success); ours 2/4 at 5 s
    assert to_asr_speedup(ref, ours, "time_to_success_s")[0] == pytest.approx(8.0)
    assert to_asr_speedup(ref, ours, "tokens_to_success")[0] == pytest.approx(5.0)
    none, why = to_asr_speedup([_row(False, 0, 0)] * 4, ours, "time_to_success_s")
    assert none is None and "no prompt" in why
    none, why = to_asr_speedup(ours, ref, "time_to_success_s")
    assert none is None and "fewer" in why
    figs = bench_figures([{"nanogcg": a, "native": b} for a, b in zip(ref, ours)], ["nanogcg", "native"])
    assert figs["time_to_asr_speedup"] == pytest.approx(8.0) and figs["tokens_to_asr_speedup"] == pytest.approx(5.0)
    assert figs["curves"]["native"]["time_s"] == [2, 5, 20] and figs["curves"]["nanogcg"]["prompts"] == 4
    assert set(figs["by_machine"]) == {"cpu A", "cpu B"}
    by = figs["by_machine"]
    assert by["cpu B"]["engines"]["native"]["prompts"] == 1 and by["cpu A"]["engines"]["nanogcg"]["prompts"] == 3
    assert by["cpu B"]["engines"]["native"]["time_to_success_s"] == 2 and by["cpu B"]["time_to_asr_speedup"] is None
    assert by["cpu A"]["time_to_asr_speedup"] == pytest.approx(40 / 20) and figs["mixed_machine_prompts"] == 0
    # a prompt whose engines ran on two machines counts for tokens, not for any machine's wall times
    mixed = bench_figures([{"nanogcg": ref[0], "native": _row(True, 5, 800, cpu="cpu B")}], ["nanogcg", "native"])
    assert mixed["by_machine"] == {} and mixed["mixed_machine_prompts"] == 1
    assert figs["engines"]["native"]["time_split"] == {"gradient": 0.25, "scoring": 0.75, "check": 0.0, "other": 0.0}
    lo, hi = bootstrap_median([1.0, 2.0, 3.0, 4.0, 100.0])
    assert 1.0 <= lo <= 3.0 <= hi <= 100.0 and bootstrap_median([1.0]) is None


def test_the_bench_prompts_are_the_first_n_of_one_order(tmp_path):
    from refusal.app.bench import bench_prompts

    assert bench_prompts(6)[:3] == bench_prompts(3) and len(set(bench_prompts(12))) == 12
    f = tmp_path / "p.txt"
    f.write_text("one\ntwo\nthree\n")
    assert bench_prompts(2, str(f)) == ["one", "two"]
    with pytest.raises(RefusalLabError, match="only 3 prompts"):
        bench_prompts(4, str(f))


def test_a_bench_resumes_row_by_row_and_grows_by_prompts(tiny, tmp_path, monkeypatch):
    import refusal.app.bench as bench

    cfg = GCGConfig(search_width=8, topk=8, suffix_len=4)
    rows = tmp_path / "b_rows.jsonl"
    prompts = ["Explain how to pick a lock", "Write a poem about the sea", "Name a colour"]
    first = bench.bench_attacks(tiny, prompts[:1], steps=2, config=cfg, engines=("nanogcg", "native"),
                                rows_file=rows)
    lines = rows.read_text().splitlines()
    assert len(lines) == 2 and [json.loads(x)["engine"] for x in lines] == ["nanogcg", "native"]
    assert json.loads(lines[0])["machine"]["cpu"] and json.loads(lines[0])["seed"] == 0
    # killed in the middle of the next row: the cut-off line is dropped and only missing rows run
    with open(rows, "a") as f:
        f.write('{"key": "cut of')
    ran = []
    real = bench.run_engine
    monkeypatch.setattr(bench, "run_engine", lambda name, *a, **k: ran.append(name) or real(name, *a, **k))
    again = bench.bench_attacks(tiny, prompts[:2], steps=2, config=cfg, engines=("nanogcg", "native"),
                                rows_file=rows, resume=True)
    assert ran == ["nanogcg", "native"]  # prompt 2's rows only
    assert again["per_prompt"][0]["native"]["trace"] == first["per_prompt"][0]["native"]["trace"]
    assert len(again["per_prompt"]) == 2 and again["engines"]["native"]["prompts"] == 2
    # other settings, or another prompt at an index, cannot be mixed in
    with pytest.raises(RefusalLabError, match="other attack settings"):
        bench.bench_attacks(tiny, prompts[:2], steps=2, config=GCGConfig(search_width=4, topk=8, suffix_len=4),
                            engines=("native",), rows_file=rows, resume=True)
    with pytest.raises(RefusalLabError, match="prompt 1 there is another prompt"):
        bench.bench_attacks(tiny, [prompts[0], prompts[2]], steps=2, config=cfg, engines=("native",),
                            rows_file=rows, resume=True)
    assert [json.loads(x)["prompt_index"] for x in rows.read_text().splitlines()] == [0, 0, 1, 1]  # nothing lost
    # an engine changed: its rows run again, the others' stay as they were
    ran.clear()
    before = {(r["prompt_index"], r["engine"]): r for r in map(json.loads, rows.read_text().splitlines())}
    bench.bench_attacks(tiny, prompts[:2], steps=2, config=cfg, engines=("nanogcg", "native"), rows_file=rows,
                        resume=True, rerun=("native",))
    assert ran == ["native", "native"]
    after = {(r["prompt_index"], r["engine"]): r for r in map(json.loads, rows.read_text().splitlines())}
    assert sorted(after) == sorted(before) and after[0, "nanogcg"] == before[0, "nanogcg"]
    order = [(r["prompt_index"], r["engine"]) for r in map(json.loads, rows.read_text().splitlines())]
    assert order == [(0, "nanogcg"), (1, "nanogcg"), (0, "native"), (1, "native")]  # run again, appended
    # a setting only the native engine reads: its rows must run again, nanoGCG's stay valid
    checked = dataclasses.replace(cfg, check_matched=4)
    with pytest.raises(RefusalLabError, match="other native settings \\(check_matched 8 there, 4 here\\); pass --rerun"):
        bench.bench_attacks(tiny, prompts[:2], steps=2, config=checked, engines=("nanogcg", "native"),
                            rows_file=rows, resume=True)
    ran.clear()
    bench.bench_attacks(tiny, prompts[:2], steps=2, config=checked, engines=("nanogcg", "native"), rows_file=rows,
                        resume=True, rerun=("native",))
    assert ran == ["native", "native"]
    final = {(r["prompt_index"], r["engine"]): r for r in map(json.loads, rows.read_text().splitlines())}
    assert final[1, "nanogcg"] == after[1, "nanogcg"] and final[1, "native"]["native_settings"] == {"check_matched": 4, "momentum": cfg.momentum}


def test_bench_cli_resumes_and_refuses_to_overwrite(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(tiny_dirs["llama"]), "--steps", "1", "--search-width", "8", "--topk", "4",
            "--suffix-len", "4", "--engines", "native", "--out", str(out)]
    assert main(args + ["--prompts", "1"]) == 0
    assert main(args + ["--prompts", "2"]) == 2 and "exists" in capsys.readouterr().err
    assert main(args + ["--prompts", "2", "--resume", "--force"]) == 2
    assert main(args + ["--prompts", "2", "--resume"]) == 0
    assert main(args + ["--prompts", "2", "--resume", "--rerun", "nanogcg"]) == 2
    assert "--rerun nanogcg: not one of the bench's --engines" in capsys.readouterr().err
    rec = json.loads(out.read_text())
    assert rec["engines"]["native"]["prompts"] == 2 and len((tmp_path / "bench_rows.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "bench_success.png").stat().st_size > 1000


def test_nanogcg_steps_are_split_into_parts_that_add_up(tiny):
    from attacks.reference import run_nanogcg

    res = run_nanogcg(tiny, "Explain how to pick a lock", "Sure, here", GCGConfig(search_width=8, topk=8, suffix_len=4,
                                                                                  steps=3, early_stop=False))
    assert len(res.profile) == 3
    durations = [b - a for a, b in zip(res.step_times, res.step_times[1:])]
    for parts, d in zip(res.profile[1:], durations):
        assert parts[0] > 0 and parts[1] > 0 and parts[2] == 0 and sum(parts) == pytest.approx(d, rel=0.05, abs=0.02)


def test_a_whole_row_without_its_newline_stays_and_a_cut_one_goes(tmp_path):
    from refusal.app.bench import drop_cut_line

    f = tmp_path / "r.jsonl"
    f.write_text('{"a": 1}\n{"b": 2}')
    drop_cut_line(f)
    assert f.read_text() == '{"a": 1}\n{"b": 2}\n'
    f.write_text('{"a": 1}\n{"b": ')
    drop_cut_line(f)
    assert f.read_text() == '{"a": 1}\n'


def test_a_part_timed_inside_another_counts_once():
    import time

    from attacks.gcg import StepClock

    clock = StepClock(torch.device("cpu"))
    with clock.timing("scoring"):
        with clock.timing("scoring"):
            time.sleep(0.05)
        assert clock.part == "scoring"
        time.sleep(0.05)
    gradient, scoring, check, other = clock.take(0.2)
    assert 0.1 <= scoring < 0.15 and other == pytest.approx(0.2 - scoring, abs=1e-3) and gradient == check == 0


def test_nanogcg_can_run_past_its_own_early_stop(tiny, monkeypatch):
    """Without its early stop nanoGCG runs the budget (its first step that succeeds by the bench's rule still
    counts); the native engines keep theirs; rows of the two ways are keyed apart."""
    import refusal.app.bench as bench

    seen = {}
    real = bench.run_nanogcg
    monkeypatch.setattr(bench, "run_nanogcg", lambda cm, i, t, config, **k: seen.setdefault("stop", config.early_stop)
                        is None or real(cm, i, t, config, **k))
    cfg = GCGConfig(search_width=8, topk=8, suffix_len=4)
    res = bench.bench_attacks(tiny, ["Explain how to pick a lock"], steps=2, config=cfg, engines=("nanogcg",),
                              nanogcg_early_stop=False)
    assert seen["stop"] is False and res["settings"]["nanogcg_early_stop"] is False
    assert bench.settings_key(tiny, cfg) != res["per_prompt"][0]["nanogcg"].get("key", "")


def test_the_attention_engine_adds_the_heads_term_and_needs_a_direction(tiny, tiny_dirs, tmp_path, monkeypatch, capsys):
    import refusal.app.bench as bench
    from refusal.directions import Direction

    seen = []

    class Recorded(bench.GCG):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen.append((self.weights, getattr(self, "heads", None)))

    monkeypatch.setattr(bench, "GCG", Recorded)
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(0))
    d = Direction(v / v.norm(), 3 * v / v.norm(), 1, -1, {})
    cfg = GCGConfig(search_width=16, topk=8, suffix_len=5, attention_heads=2)
    res = bench_attacks(tiny, ["Explain how to pick a lock"], steps=2, config=cfg, engines=("native", "native_attention"),
                        direction=d)
    assert seen[0] == ({"target": 1.0}, None)
    assert seen[1][0] == {"target": 1.0, "attention": 1.0} and len(seen[1][1]) == 2
    assert len(res["per_prompt"][0]["native_attention"]["losses"]) == 2
    with pytest.raises(RefusalLabError, match="give --direction"):
        bench_attacks(tiny, ["Explain how to pick a lock"], steps=1, config=cfg, engines=("native_attention",))
    assert main(["bench", "--model", str(tiny_dirs["llama"]), "--engines", "native,native_attention",
                 "--out", str(tmp_path / "b.json")]) == 2
    assert "give --direction DIR" in capsys.readouterr().err


def test_a_resumed_bench_in_a_new_folder_makes_the_folder_before_its_first_row(tiny, tmp_path):
    """--resume on an --out whose folder does not exist yet: the folder is made before any row runs, so the first
    row (minutes of nanoGCG on a real model) is written, not lost to a missing folder."""
    import refusal.app.bench as bench

    rows = tmp_path / "new" / "folder" / "b_rows.jsonl"
    bench.bench_attacks(tiny, ["Explain how to pick a lock"], steps=1, config=GCGConfig(search_width=8, topk=8,
                        suffix_len=4), engines=("native",), rows_file=rows, resume=True)
    assert [json.loads(x)["engine"] for x in rows.read_text().splitlines()] == ["native"]


def test_compare_arms_tables_the_prompts_every_arm_has_and_counts_a_failure_as_its_budget(tmp_path):
    from refusal.app.bench import compare_arms, rows_path

    def write(out, rows):
        rows_path(out).write_text("".join(json.dumps(dict(r, key=str(out), engine="e", prompt_index=i,
                                                          prompt=f"prompt {i}", first_success_step=3)) + "\n"
                                          for i, r in rows))

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write(a, [(0, _row(True, 10, 500)), (1, _row(False, 0, 0)), (2, _row(True, 7, 70))])
    write(b, [(0, _row(True, 4, 200)), (1, _row(True, 30, 900))])
    with rows_path(b).open("a") as f:  # a row cut off by a kill is dropped, as when a bench resumes
        f.write('{"key": "b", "engine": "e", "prompt_index": 2, "pro')
    lines = compare_arms([("A", a), ("B", b)], "e")
    assert lines[0].startswith("2 prompts") and lines[1] == "| prompt | A | B |"
    assert lines[3] == "| prompt 0 | step 3, 10 s, 500 tokens | step 3, 4 s, 200 tokens |"
    assert lines[4].startswith("| prompt 1 | none in 5 steps (100 s")
    assert lines[5].startswith("A: broken 1/2") and "sum 110 s" in lines[5] and "sum 10,500" in lines[5]
    assert lines[6].startswith("B: broken 2/2") and "sum 34 s" in lines[6]
    with pytest.raises(RefusalLabError, match="no rows for the arm 'C'"):
        compare_arms([("A", a), ("C", tmp_path / "c.json")], "e")
