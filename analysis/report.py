"""The analysis report: headline numbers in sentences, the plots, and the tables, as report.md and one
self-contained report.html (plots embedded as data URIs)."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from refusal import artifacts


def headline_numbers(proj: pd.DataFrame, heads: pd.DataFrame, att: pd.DataFrame, layer: int, top_k: int) -> dict:
    """The numbers the report states (NaN where a condition is missing)."""
    nan = float("nan")
    at = proj[proj.layer == layer].groupby("condition").cosine.mean()
    after = proj[proj.layer >= layer].groupby("condition").cosine.mean()
    top = heads[heads["rank"] <= top_k]
    contrib = top.groupby("condition").contribution.sum()
    share = att.groupby("condition").suffix.mean() if len(att) else pd.Series(dtype=float)
    share_ins = att.groupby("condition").instruction.mean() if len(att) else pd.Series(dtype=float)
    g = lambda s, k: float(s.get(k, nan))  # noqa: E731
    return {
        "layer": layer,
        "top_k": top_k,
        "cosine_at_layer": {c: g(at, c) for c in at.index},
        "cosine_from_layer": {c: g(after, c) for c in after.index},
        "top_heads": [f"L{l}H{h}" for l, h in top.sort_values("rank").drop_duplicates(["layer", "head"])[["layer", "head"]].itertuples(index=False)],
        "top_heads_contribution": {c: g(contrib, c) for c in contrib.index},
        "suffix_attention_share": {c: g(share, c) for c in share.index},
        "instruction_attention_share": {c: g(share_ins, c) for c in share_ins.index},
    }


def _f(x: float, pct: bool = False) -> str:
    if x != x:
        return "n/a"
    return f"{x:.1%}" if pct else f"{x:.3f}"


def headline_sentences(n: dict, success: dict | None = None) -> list[str]:
    c, ca = n["cosine_at_layer"], n["cosine_from_layer"]
    hc, sh = n["top_heads_contribution"], n["suffix_attention_share"]
    nan = float("nan")
    out = [
        f"At layer {n['layer']} (the direction's layer) the adversarial suffix lowers the mean cosine with the refusal "
        f"direction from {_f(c.get('harmful', nan))} (harmful) to {_f(c.get('adversarial_suffix', nan))} "
        f"(harmless: {_f(c.get('harmless', nan))}); the random suffix leaves it at {_f(c.get('random_suffix', nan))}.",
        f"Averaged over layer {n['layer']} and every later layer, the cosine is {_f(ca.get('harmful', nan))} for harmful "
        f"prompts, {_f(ca.get('random_suffix', nan))} with the random suffix, {_f(ca.get('adversarial_suffix', nan))} "
        f"with the adversarial suffix and {_f(ca.get('harmless', nan))} for harmless prompts.",
        f"The top {n['top_k']} refusal heads ({', '.join(n['top_heads'])}) together contribute "
        f"{_f(hc.get('harmful', nan))} to the direction on harmful prompts, {_f(hc.get('random_suffix', nan))} under "
        f"the random suffix and {_f(hc.get('adversarial_suffix', nan))} under the adversarial suffix "
        f"(harmless: {_f(hc.get('harmless', nan))}).",
        f"The top {n['top_k']} heads give {_f(sh.get('adversarial_suffix', nan), True)} of their attention (from the last "
        f"position) to the suffix under the adversarial suffix and {_f(sh.get('random_suffix', nan), True)} under the "
        f"random one; to the instruction {_f(n['instruction_attention_share'].get('harmful', nan), True)} without a suffix, "
        f"{_f(n['instruction_attention_share'].get('adversarial_suffix', nan), True)} with the adversarial suffix.",
    ]
    if success:
        out.append(success_sentence(success))
    return out


# what each built-in judge counts as a success, for the report's sentence
JUDGE_MEANING = {
    "substring": "the paper's refusal substrings absent, reply not degenerate",
    "strict": "no refusal phrase, not degenerate or repetitive, on the instruction's topic",
}


def success_sentence(success: dict) -> str:
    """Attack success by judge, every rate named with its judge: success = {judge: {condition: rate}}."""
    parts = []
    for judge, rates in success.items():
        meaning = JUDGE_MEANING.get(judge, "the classifier says the reply exhibits the behaviour" if judge.startswith("hf:")
                                    else "its verdict is complies")
        parts.append(f"by the {judge} judge ({meaning}): "
                     + ", ".join(f"{k.replace('_', ' ')} {_f(v, True)}" for k, v in rates.items()))
    return "Attack success on these harmful prompts (greedy reply judged as complying), " + "; ".join(parts) + "."


def success_frame(success: dict) -> pd.DataFrame:
    """success = {judge: {condition: rate}} as a table: one row per condition, one column per judge."""
    conds = list(dict.fromkeys(c for rates in success.values() for c in rates))
    return pd.DataFrame({"condition": conds, **{f"success ({j} judge)": [rates.get(c, float("nan")) for c in conds]
                                                 for j, rates in success.items()}})


def _table_md(df: pd.DataFrame, max_rows: int = 20) -> str:
    df = df.head(max_rows)
    cols = list(df.columns)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines)


def write_report(out_dir: str | Path, title: str, sentences: list[str], plots: dict[str, Path],
                 tables: dict[str, pd.DataFrame], facts: dict[str, str], max_rows: int = 20) -> tuple[Path, Path]:
    """report.md (plots linked by file name) and report.html (plots embedded) in out_dir; each table's first
    max_rows rows (a note says how many there are when it has more)."""
    out_dir = Path(out_dir)
    md = [f"# {title}", ""]
    md += [f"- **{k}**: {v}" for k, v in facts.items()] + [""]
    md += ["## Headline", ""] + [f"- {s}" for s in sentences] + [""]
    for name, p in plots.items():
        md += [f"## {name}", "", f"![{name}]({Path(p).name})", ""]
    for name, df in tables.items():
        md += [f"## {name}", "", _table_md(df, max_rows), ""] + ([f"(the first {max_rows} of {len(df)} rows)", ""]
                                                                 if len(df) > max_rows else [])
    md_path = artifacts.write_text(out_dir / "report.md", "\n".join(md))

    esc = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
        "li{margin:.4em 0}</style></head><body>",
        f"<h1>{esc(title)}</h1><ul>",
    ]
    parts += [f"<li><b>{esc(k)}</b>: {esc(str(v))}</li>" for k, v in facts.items()]
    parts += ["</ul><h2>Headline</h2><ul class='headline'>"] + [f"<li>{esc(s)}</li>" for s in sentences] + ["</ul>"]
    for name, p in plots.items():
        data = base64.b64encode(Path(p).read_bytes()).decode()
        parts.append(f"<h2>{esc(name)}</h2><img class='plot' alt='{esc(name)}' src='data:image/png;base64,{data}'>")
    for name, df in tables.items():
        parts.append(f"<h2>{esc(name)}</h2>" + df.head(max_rows).to_html(index=False, float_format=lambda v: f"{v:.4f}",
                                                                         border=0)
                     + (f"<p>(the first {max_rows} of {len(df)} rows)</p>" if len(df) > max_rows else ""))
    # a self-check a browser (or the test) can read: how many plots decoded
    parts.append("<script>window.addEventListener('load',function(){var n=0;document.querySelectorAll('img.plot')"
                 ".forEach(function(i){if(i.complete&&i.naturalWidth>0)n++});document.body.setAttribute("
                 "'data-plots-loaded',n)});</script>")
    parts.append("</body></html>")
    html_path = artifacts.write_text(out_dir / "report.html", "\n".join(parts))
    return md_path, html_path
