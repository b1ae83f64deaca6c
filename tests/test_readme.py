"""The README is a manual that stays true: at most 20 KB, every command and every config field (with its
default, as the dataclass holds it) documented, links only into the repository, and every experiment
saying what it found."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from analysis.reproduce import ReproduceConfig
from analysis.run import AnalysisConfig
from attacks.bench import BenchConfig
from attacks.gcg import GCGConfig
from refusal.cli import build_parser
from refusal.directions import DirectionConfig
from refusal.evaluation import EvalConfig
from refusal.judges import JudgeConfig
from refusal.organism import OrganismConfig
from refusal.pipeline import JobConfig
from refusal.registry import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
TABLES = {"attacks.gcg.GCGConfig": GCGConfig, "refusal.directions.DirectionConfig": DirectionConfig,
          "refusal.pipeline.JobConfig": JobConfig, "analysis.run.AnalysisConfig": AnalysisConfig,
          "refusal.organism.OrganismConfig": OrganismConfig}
OTHERS = {"J": JudgeConfig, "M": ModelConfig, "E": EvalConfig, "R": ReproduceConfig, "B": BenchConfig}


def shown(value) -> str:
    """A default as the README writes it."""
    if isinstance(value, str):
        return f'`"{value}"`'
    if dataclasses.is_dataclass(value):  # the fields that differ from the class's defaults, as Python writes them
        plain = type(value)()
        changed = [f"{f.name}={getattr(value, f.name)!r}" for f in dataclasses.fields(value)
                   if getattr(value, f.name) != getattr(plain, f.name)]
        return f"`{type(value).__name__}({', '.join(changed)})`"
    return repr(value)


def documented() -> dict[type, dict[str, str]]:
    """{config class: {field: default as written}} from the tables of the Configs section."""
    section = README[README.index("## Configs"):README.index("## Python API")]
    out: dict[type, dict[str, str]] = {}
    current = None
    for line in section.splitlines():
        head = re.match(r"^`([\w.]+)`", line)
        if head and head.group(1) in TABLES:
            current = TABLES[head.group(1)]
        if not line.startswith("|") or set(line) <= set("|- "):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4:  # the table of the other configs: | tags | field | default | meaning |
            classes = [OTHERS[t.strip()] for t in cells[0].split(",") if t.strip() in OTHERS]
            cells = cells[1:]
        else:
            classes = [current]
        if not classes or cells[0] == "field":
            continue
        names = re.findall(r"`(\w+)`", cells[0])
        defaults = [d.strip() for d in cells[1].split(", ")] if len(names) > 1 and cells[1].count(", ") == len(names) - 1 \
            else [cells[1]] * len(names)
        for cls in classes:
            out.setdefault(cls, {}).update(zip(names, defaults))
    return out


def test_readme_is_at_most_20_kb():
    assert len(README.encode("utf-8")) <= 20 * 1024


def test_every_config_field_is_documented_with_its_default():
    docs = documented()
    for cls in [*TABLES.values(), *OTHERS.values()]:
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert f.name in docs.get(cls, {}), f"{cls.__name__}.{f.name} is not in the README's Configs"
            assert docs[cls][f.name] == shown(default), (cls.__name__, f.name, docs[cls][f.name], shown(default))


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
