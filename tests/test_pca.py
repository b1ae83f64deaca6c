"""PCA of harmful vs harmless activations on synthetic data with a known answer."""
import numpy as np
import torch

from analysis.pca import first_separating_layer, layer_pca, plot_layer_pca, separation_accuracy


def test_separation_accuracy():
    assert separation_accuracy(np.array([0.1, 0.2, 0.9, 1.0]), np.array([0, 0, 1, 1])) == 1.0
    assert separation_accuracy(np.array([0.9, 1.0, 0.1, 0.2]), np.array([0, 0, 1, 1])) == 1.0  # either sign
    assert separation_accuracy(np.array([0.0, 1.0, 0.0, 1.0]), np.array([0, 0, 1, 1])) == 0.5


def test_layer_pca_finds_the_separating_axis(tmp_path):
    g = torch.Generator().manual_seed(0)
    n, layers, d = 60, 3, 16
    harmful = torch.randn(n, layers, d, generator=g)
    harmless = torch.randn(n, layers, d, generator=g)
    axis = torch.zeros(d)
    axis[3] = 1.0
    harmful[:, 1:] += 8 * axis  # layers 1 and 2 separate along axis 3; layer 0 does not
    df = layer_pca(harmful, harmless, k=3)
    assert list(df.layer) == [0, 1, 2]
    assert df.pc1_separation[0] < 0.8 and (df.pc1_separation[1:] > 0.99).all()
    assert (df.cos_pc1_diff_in_means[1:] > 0.95).all()
    assert (df.ev1[1:] > 0.5).all() and (df[["ev1", "ev2", "ev3"]].diff(axis=1).iloc[:, 1:] <= 1e-12).all().all()
    assert first_separating_layer(df) == 1
    path = plot_layer_pca(df, tmp_path / "pca.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
