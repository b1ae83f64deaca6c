"""A setting is declared once: its field's type, bounds and choices are what the validation, the CLI's
options and docs/configs.md read; every config checks its fields the same way."""
from __future__ import annotations

import dataclasses

import pytest

from attacks.gcg import GCGConfig
from refusal.config import check_fields, field_limits, flag, limits_text, option
from refusal.directions import DirectionConfig
from refusal.errors import RefusalLabError
from refusal.app.cli import build_parser
from refusal.app.configs import CONFIGS
from refusal.app.sweep import SweepConfig, sweep_config


@dataclasses.dataclass(frozen=True)
class Inner:
    k: int = option(3, "a count", ge=1)


@dataclasses.dataclass(frozen=True)
class Outer:
    n: int = option(1, "a count", ge=1)
    rate: float = option(0.5, "a share", gt=0, le=1)
    mode: str = option("a", "a mode", choices=("a", "b"))
    maybe: int | None = option(None, "an optional count", ge=0)
    many: tuple[int, ...] = option((1, 2), "counts", ge=1)
    inner: Inner = option(help="nested", factory=Inner)


@pytest.mark.parametrize("changes, message", [
    (dict(n=0), "--n must be >= 1, got 0"),
    (dict(n=True), "--n must be an integer, got True"),
    (dict(n="2"), "--n must be an integer, got '2'"),
    (dict(rate=0.0), "--rate must be > 0 and <= 1, got 0.0"),
    (dict(rate=float("nan")), "--rate must be a finite number"),
    (dict(mode="c"), "unknown --mode 'c'; use one of a, b"),
    (dict(maybe=-1), "--maybe must be >= 0, got -1"),
    (dict(many=(1, 0)), "--many must be >= 1, got 0"),
    (dict(many=3), "--many must be a list of values"),
    (dict(inner=Inner(k=0)), "--k must be >= 1, got 0"),
])
def test_every_field_is_checked_against_its_declaration(changes, message):
    check_fields(Outer())  # the defaults pass
    check_fields(Outer(maybe=None, rate=1, many=[3]))  # None where allowed, an int for a float, a list for a tuple
    with pytest.raises(RefusalLabError) as e:
        check_fields(Outer(**changes))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_file_s_values_are_named_by_their_keys():
    with pytest.raises(RefusalLabError, match=r"^s\.toml: inner\.k must be >= 1, got 0$"):
        check_fields(Outer(inner=Inner(k=0)), where="s.toml")
    with pytest.raises(RefusalLabError, match="the sweep: steps must be an integer, got '3'"):
        sweep_config({"models": ["smollm2"], "steps": ["3"]})
    with pytest.raises(RefusalLabError, match="the sweep: direction_search.n_val must be >= 1"):
        sweep_config({"models": ["smollm2"], "direction_search": {"n_val": 0}})


def test_every_config_s_defaults_pass_and_its_limits_are_shown():
    for cls, _ in CONFIGS:
        check_fields(cls())
    assert limits_text(field_limits(GCGConfig, "success_rate")) == "> 0, <= 1"
    assert limits_text(field_limits(GCGConfig, "objective")) == "one of target, direction, attention, mixed"
    assert flag("search_width") == "--search-width"


def test_the_cli_reads_choices_and_bounds_from_the_fields(capsys):
    parser = build_parser()
    attack = next(a for a in parser._actions if a.dest == "command").choices["attack"]
    by_dest = {a.dest: a for a in attack._actions}
    assert tuple(by_dest["objective"].choices) == field_limits(GCGConfig, "objective")["choices"]
    assert ">= 1" in by_dest["search_width"].help
    sweep = next(a for a in parser._actions if a.dest == "command").choices["sweep"]
    engines = next(a for a in sweep._actions if a.dest == "engines")
    assert tuple(engines.choices) == field_limits(SweepConfig, "engines")["choices"]


def test_configs_check_their_fields_in_validate():
    with pytest.raises(RefusalLabError, match="--kl-threshold must be > 0"):
        DirectionConfig(kl_threshold=0.0).validate()
    with pytest.raises(RefusalLabError, match="--multi-coordinate must be >= 1"):
        GCGConfig(multi_coordinate=0).validate()


def test_the_sweep_s_judge_is_a_judge_config_given_by_name_or_table():
    from refusal.judges import JudgeConfig

    assert SweepConfig(judge="substring").judge == JudgeConfig(name="substring")
    by_name = sweep_config({"models": ["smollm2"], "judge": "substring"})
    by_table = sweep_config({"models": ["smollm2"], "judge": {"name": "strict", "off_topic_threshold": 0.3}})
    assert by_name.judge.name == "substring" and by_table.judge == JudgeConfig(name="strict", off_topic_threshold=0.3)
    with pytest.raises(RefusalLabError, match="unknown judge key 'nme'"):
        sweep_config({"models": ["smollm2"], "judge": {"nme": "strict"}})
    with pytest.raises(RefusalLabError, match="the sweep: judge.off_topic_threshold must be >= 0 and < 1"):
        sweep_config({"models": ["smollm2"], "judge": {"off_topic_threshold": 2.0}})
