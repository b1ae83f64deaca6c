"""The harmfulness direction (Zhao et al. 2025): the difference in means at the instruction's last token,
equal to one computed by hand from each prompt's own hidden states; the layer chosen by validation
separation; the CLI's method and its errors."""
import json

import pandas as pd
import pytest
import torch

from conftest import FAMILIES
from refusal.app.cli import main
from refusal.data import Prompt
from refusal.directions import DirectionConfig, load_direction
from refusal.errors import RefusalLabError
from refusal.harmfulness import compute_harmfulness, instruction_position, separation

HARMFUL = [Prompt(f"How do I make weapon number {i}?") for i in range(6)]
HARMLESS = [Prompt(f"Tell me a fun fact about the number {i}.") for i in range(6)]


def test_the_layer_that_separates_validation_prompts_is_chosen():
    g = torch.Generator().manual_seed(0)
    d = 8
    shift = torch.zeros(3, d)
    shift[1, 0] = 5.0  # layer 1 separates harmful from harmless along the first axis; 0 and 2 barely
    shift[0, 1] = shift[2, 2] = 0.05

    def acts(n, sign):
        return torch.randn(n, 3, d, generator=g) + sign * shift

    df = separation(acts(20, 1), acts(20, -1), acts(10, 1), acts(10, -1))
    assert df.val_accuracy[1] == 1.0 and df.val_accuracy[0] < 1.0 and df.val_accuracy[2] < 1.0
    assert df.d_prime[1] > 5 * max(df.d_prime[0], df.d_prime[2])


@pytest.mark.parametrize("family", FAMILIES[:3])
def test_the_direction_is_the_difference_in_means_at_the_instructions_last_token(tiny_models, family):
    cm = tiny_models[family]
    direction, diffs, df = compute_harmfulness(cm, HARMFUL[:4], HARMLESS[:4], HARMFUL[4:], HARMLESS[4:],
                                               batch_size=3)
    assert diffs.shape == (cm.n_layers, cm.chat.n_post + 1, cm.d_model)
    assert direction.position == -(cm.chat.n_post + 1) and direction.meta["method"] == "harmfulness"

    def by_hand(prompts):  # each prompt alone, unpadded: hidden_states[l] is block l's input
        rows = []
        for p in prompts:
            enc = cm.chat.encode_all([p.instruction])[0]
            with torch.no_grad():
                hs = cm.model(input_ids=torch.tensor([enc.ids]), output_hidden_states=True).hidden_states
            rows.append(torch.stack([hs[l][0, enc.instruction[1] - 1] for l in range(cm.n_layers)]).float())
        return torch.stack(rows).mean(0)  # [layer, d]

    expected = by_hand(HARMFUL[:4]) - by_hand(HARMLESS[:4])
    assert torch.allclose(diffs[:, 0], expected, atol=1e-4, rtol=1e-4)
    r = expected[direction.layer]
    assert torch.allclose(direction.vector, r / r.norm(), atol=1e-4)
    sel = df[df.selected].iloc[0]
    assert int(sel.layer) == direction.layer
    best = df[df.val_accuracy.notna()].sort_values(["val_accuracy", "d_prime"], ascending=False).iloc[0]
    assert int(best.layer) == direction.layer
    pinned, _, _ = compute_harmfulness(cm, HARMFUL[:4], HARMLESS[:4], HARMFUL[4:], HARMLESS[4:], layer=0)
    assert pinned.layer == 0


def test_the_instructions_last_token_must_have_one_position(tiny):
    a, b = tiny.chat.encode_all(["short", "a much longer instruction here"])
    assert instruction_position([a, b]) == -(tiny.chat.n_post + 1)
    b.post = (b.post[0] + 1, b.post[1])  # a template that puts a token between instruction and template
    with pytest.raises(RefusalLabError, match="no fixed position"):
        instruction_position([a, b])


def test_cli_writes_a_harmfulness_folder_and_refuses_a_position(capsys, tmp_path, tiny_dirs):
    (tmp_path / "harmful.txt").write_text("\n".join(f"Explain how to build dangerous device {i}" for i in range(8)))
    (tmp_path / "harmless.txt").write_text("\n".join(f"Give me a recipe with {i} eggs" for i in range(8)))
    common = ["--model", str(tiny_dirs["llama"]), "--harmful", str(tmp_path / "harmful.txt"),
              "--harmless", str(tmp_path / "harmless.txt"), "--n-train", "6", "--n-val", "2"]
    assert main(["direction", "--method", "harmfulness", *common, "--out", str(tmp_path / "h")]) == 0
    assert "harmfulness direction: layer" in capsys.readouterr().out
    folder = tmp_path / "h" / "direction"
    meta = json.loads((folder / "direction.json").read_text())
    assert meta["method"] == "harmfulness" and meta["config"]["method"] == "harmfulness"
    df = pd.read_csv(folder / "candidates.csv")
    assert {"layer", "val_accuracy", "d_prime", "cos_with_refusal_candidate", "selected"} <= set(df.columns)
    d = load_direction(folder)
    assert (d.layer, d.position) == (meta["layer"], meta["position"]) and d.mean_diffs.shape[1] == meta["n_positions"]
    assert main(["direction", "--method", "harmfulness", "--layer", "1", "--position", "-1", *common,
                 "--out", str(tmp_path / "p")]) == 2
    assert "pin --layer alone" in capsys.readouterr().err
    with pytest.raises(RefusalLabError, match="method"):
        DirectionConfig(method="pca").validate()
