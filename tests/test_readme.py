"""The README is a guide that stays true: at most 16 KB, every command documented, links only into the
repository, every experiment saying what it found; docs/configs.md is generated from the config
dataclasses, every field with its default, and is current."""
from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

from refusal.app import configs
from refusal.app.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
shown = configs.shown  # a default as the generated tables write it (tests/test_sweep.py's table too)


def test_readme_is_at_most_16_kb():
    assert len(README.encode("utf-8")) <= 16 * 1024


def test_the_config_tables_are_generated_from_the_dataclasses():
    """docs/configs.md is what `python -m refusal.app.configs` writes now (rerun it after changing a field)."""
    assert configs.PATH.read_text(encoding="utf-8") == configs.configs_markdown(), \
        "docs/configs.md is stale: run `python -m refusal.app.configs`"
    doc = configs.PATH.read_text(encoding="utf-8")
    for cls, _ in configs.CONFIGS:
        section = doc[doc.index(f"## {cls.__name__}\n"):]
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert f"| `{f.name}` | {configs.cell(shown(default))} |" in section, (cls.__name__, f.name)


def test_every_config_dataclass_is_in_the_generated_tables():
    """A dataclass whose fields are options (a config) is listed in refusal.app.configs.CONFIGS."""
    listed = {cls for cls, _ in configs.CONFIGS}
    missing = []
    for pkg in ("refusal", "attacks", "analysis"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            mod = importlib.import_module(name)
            for obj in vars(mod).values():
                if (isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == name
                        and dataclasses.fields(obj) and all("help" in f.metadata for f in dataclasses.fields(obj))
                        and obj not in listed):
                    missing.append(f"{name}.{obj.__name__}")
    assert not missing, f"configs not in refusal.app.configs.CONFIGS: {missing}"


def test_every_command_is_documented():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert re.search(rf"`{name}\b", README), f"`refusal {name}` is not in the README"


def test_links_stay_in_the_repository():
    for target in re.findall(r"\]\(([^)]+)\)", README):
        assert not re.match(r"^[a-z]+:", target), f"the README links outside the repository: {target}"
        path = target.split("#")[0]
        assert (ROOT / path).exists(), f"the README links to a missing file: {target}"


def test_every_experiment_says_what_it_found():
    for path in sorted((ROOT / "experiments").glob("*.py")):
        head = path.read_text(encoding="utf-8")[:1500]
        assert re.search(r"^(Found|Made): ", head, re.M), f"{path.name} does not say what it found"
        assert path.name in (ROOT / "experiments" / "README.md").read_text(encoding="utf-8")
