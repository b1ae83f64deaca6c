"""heretic 1.4.0 driven without a terminal, for how_abliteration_compares_with_heretic.py.

Made: heretic's studies of the organism (its journal) and the edited weights of every trial on its
front, which how_abliteration_compares_with_heretic.py scores alike with refusal-lab's.

This file runs only under heretic's own venv (which that experiment makes); refusal-lab never imports it,
and it imports nothing of refusal-lab's.

    python heretic_driver.py search HERETIC_FLAGS...
        heretic's own run (`heretic --model ...`), its menus answered: a study the journal already holds is
        continued (heretic's "Continue the previous run"), and the final "which trial" menu exits, since
        every trial is in the journal by then. Run it in the study's folder (heretic reads ./config.toml).
    python heretic_driver.py export JOURNAL OUT_DIR
        every trial on heretic's Pareto front (its refusals and KL as heretic counted them) applied by
        heretic's own code to the model its study names, with the study's own settings, and the weights it
        edits saved merged (base + LoRA) as OUT_DIR/trial-N.safetensors, keyed by the model's parameter
        names, with OUT_DIR/front.json listing the trials. Every edit heretic makes is a LoRA on a linear
        layer's weight, so these tensors are heretic's edited model exactly.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def search(flags: list[str]) -> None:
    import heretic.main as hm

    def answer(message: str, choices: list):
        values = [getattr(c, "value", c) for c in choices]
        if message.startswith("How would you like to proceed") and "continue" in values:
            return "continue"  # an interrupted study: continue it (a finished one: show it, then exit)
        return ""  # the final trial menu: exit

    hm.prompt_select = answer
    sys.argv = ["heretic", *flags]
    hm.run()


def front_trials(study) -> list:
    """heretic's own Pareto front: sorted by (refusals, KL), each trial with a lower KL than all before it."""
    from optuna.trial import TrialState
    done = sorted((t for t in study.trials if t.state == TrialState.COMPLETE),
                  key=lambda t: (t.user_attrs["refusals"], t.user_attrs["kl_divergence"]))
    front, lowest = [], float("inf")
    for t in done:
        if t.user_attrs["kl_divergence"] < lowest:
            lowest = t.user_attrs["kl_divergence"]
            front.append(t)
    return front


def export(journal: str, out_dir: str) -> None:
    import optuna
    import torch
    import torch.nn.functional as F
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from safetensors.torch import save_file
    from heretic.config import Settings
    from heretic.model import AbliterationParameters, Model
    from heretic.utils import load_prompts

    torch.set_grad_enabled(False)
    sys.argv = sys.argv[:1]  # heretic's Settings parse the command line too, even when given a study's JSON
    study = optuna.load_study(study_name="heretic", storage=JournalStorage(JournalFileBackend(journal)))
    settings = Settings.model_validate_json(study.user_attrs["settings"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = Model(settings)
    # the per-layer directions as heretic's run() computes them from its study's settings
    good = model.get_residuals_mean(load_prompts(settings, settings.good_prompts))
    bad = model.get_residuals_mean(load_prompts(settings, settings.bad_prompts))
    directions = F.normalize(bad - good, p=2, dim=1)
    if settings.orthogonalize_direction:
        good_dirs = F.normalize(good, p=2, dim=1)
        directions = F.normalize(directions - torch.sum(directions * good_dirs, dim=1, keepdim=True) * good_dirs,
                                 p=2, dim=1)
    rows = []
    for t in front_trials(study):
        path = out / f"trial-{t.number}.safetensors"
        rows.append({"trial": t.number, "refusals": t.user_attrs["refusals"],
                     "n_bad_prompts": t.user_attrs["n_bad_prompts"], "kl": t.user_attrs["kl_divergence"],
                     "direction_index": t.user_attrs["direction_index"], "parameters": t.user_attrs["parameters"],
                     "params": t.params, "weights": path.name})
        if path.is_file():
            continue
        model.reset_model()
        model.abliterate(directions, t.user_attrs["direction_index"],
                         {k: AbliterationParameters(**v) for k, v in t.user_attrs["parameters"].items()})
        merged = {}
        for name, module in model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                weight = module.base_layer.weight.detach().float() + module.get_delta_weight("default").float()
                merged[name.removeprefix("base_model.model.") + ".weight"] = weight.contiguous()
        save_file(merged, str(path))
    (out / "front.json").write_text(json.dumps({"settings": json.loads(study.user_attrs["settings"]),
                                                "n_trials": len(study.trials), "front": rows}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "search":
        search(sys.argv[2:])
    elif len(sys.argv) == 4 and sys.argv[1] == "export":
        export(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
