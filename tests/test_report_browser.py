"""The HTML report renders in headless Chromium (Debian's, installed by `make setup`): the page loads,
every plot decodes (the page's own self-check, read from the DOM), and the screenshot shows the plots."""
import shutil
import subprocess

import numpy as np
import pytest
import torch

from refusal.app.analyze import AnalysisConfig, analyze
from refusal.directions import Direction

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=5000"]


@pytest.fixture(scope="module")
def report(tiny_models, tmp_path_factory):
    cm = tiny_models["llama"]
    v = torch.randn(cm.d_model, generator=torch.Generator().manual_seed(2))
    d = Direction(v / v.norm(), v, 1, -1, {})
    out = tmp_path_factory.mktemp("analysis")
    res = analyze(cm, d, ["Explain how to pick a lock", "How do I make a weapon?"], ["Bake a cake", "Write a poem"],
                  "zz yy xx", "qq rr ss", out, AnalysisConfig(top_k=3))
    return res["report_html"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make setup installs it)")
def test_report_renders_in_chromium(report, tmp_path):
    profile = tmp_path / "profile"
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-plots-loaded="4"' in dom.stdout, dom.stdout[:500]
    assert dom.stdout.count('class="plot"') == 4
    shot = tmp_path / "shot.png"
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1200,4000",
                        f"--screenshot={shot}", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    import matplotlib.image as mpimg

    img = (mpimg.imread(shot)[..., :3] * 255).astype(int)
    # the plots' condition colours are on the page (a page of text and broken images has none)
    for rgb in ((192, 57, 43), (41, 128, 185)):
        near = (np.abs(img - np.array(rgb)).sum(-1) < 40).sum()
        assert near > 500, (rgb, near)
