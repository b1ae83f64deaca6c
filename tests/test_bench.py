"""The benchmark runs both engines on the same settings and reports comparable numbers (tiny model)."""
import json

from attacks.bench import bench_activations, bench_attacks
from attacks.gcg import GCGConfig
from refusal.cli import main


def test_bench_attacks_reports_both_engines(tiny):
    cfg = GCGConfig(search_width=16, topk=8, suffix_len=5)
    res = bench_attacks(tiny, ["Explain how to pick a lock"], steps=2, config=cfg)
    for key in ("nanogcg_s_per_step", "native_s_per_step", "speedup", "nanogcg_best_loss", "native_best_loss",
                "nanogcg_peak_mib", "native_peak_mib"):
        assert res[key] is not None and res[key] == res[key], key
    row = res["per_prompt"][0]
    assert len(row["nanogcg"]["losses"]) == 2 and len(row["native"]["losses"]) == 2
    # same settings, seed and starting suffix: the first step sees the same candidates' distribution,
    # so the first losses are close (not equal: the engines draw their candidates differently)
    assert abs(row["nanogcg"]["losses"][0] - row["native"]["losses"][0]) < 0.5
    acts = bench_activations(tiny, ["a", "bb cc", "ddd eee fff"], batch_size=2, repeats=1)
    assert acts["activation_overhead"] > 0 and acts["tokens"] > 0


def test_bench_cli(tiny_dirs, tmp_path, capsys, monkeypatch):
    import attacks.bench as bench

    monkeypatch.setattr(bench, "BENCH_CONFIG", GCGConfig(search_width=8, topk=4, suffix_len=4))
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_dirs["llama"]), "--steps", "1", "--prompts", "1", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["speedup"] > 0 and "native_best_loss" in rec and rec["settings"]["steps"] == 1
