"""A judge from its name or config (loaded once per process), and verdicts added to a table of replies."""
from __future__ import annotations

import functools

from ..errors import RefusalLabError
from .base import DEFAULT_JUDGE, Judge, JudgeConfig, check_judge_name
from .hf import HFJudge
from .strict import StrictJudge
from .substring import SubstringJudge, attack_success

def load_judge(config: JudgeConfig | str | Judge | None = None) -> Judge:
    """A judge from its config or name (None: the default, strict). Judges are loaded once per process and
    config (the MiniLM embedder and classifier models are reused)."""
    if isinstance(config, Judge):
        return config
    if config is None:
        config = JudgeConfig()
    elif isinstance(config, str):
        config = JudgeConfig(name=config)
    elif not isinstance(config, JudgeConfig):
        raise RefusalLabError(f"a judge is given by name or JudgeConfig, not {type(config).__name__}")
    config.validate()
    return _load(config)


@functools.lru_cache(maxsize=4)
def _load(config: JudgeConfig) -> Judge:
    if config.name == "substring":
        return SubstringJudge()
    if config.name == "strict":
        return StrictJudge(config)
    return HFJudge(config)


def check_loaded_judge(judge: Judge | None, config: JudgeConfig) -> None:
    """A one-line error when `judge`, a judge already loaded and handed over to be reused, is not a Judge or
    not the one `config` names (None: nothing handed over, nothing to check)."""
    if judge is None:
        return
    if not isinstance(judge, Judge):
        raise RefusalLabError(f"a loaded judge (refusal.judges.load_judge) is expected, not {type(judge).__name__}; "
                              "a judge's name and options go into the config")
    if judge.name != config.name.strip():
        raise RefusalLabError(f"the judge given ({judge.name}) is not the config's ({config.name})")


def judge_name(config: JudgeConfig | str | Judge | None) -> str:
    """The name of the judge a config or name stands for, without loading it."""
    if isinstance(config, Judge):
        return config.name
    if isinstance(config, JudgeConfig):
        return check_judge_name(config.name)
    return check_judge_name(DEFAULT_JUDGE if config is None else config)


def add_verdicts(df, judge: JudgeConfig | str | Judge | None = None):
    """Columns added to (or replaced in) a DataFrame of `prompt` (instruction) and `completion` (reply) rows:
    substring_success (the paper's judge: attack_success), judge (the name of `judge`, default
    strict), verdict, success (verdict == complies). Returns the same DataFrame."""
    j = load_judge(judge)
    verdicts = j.verdicts([str(x) for x in df["prompt"]], [str(x) for x in df["completion"]]) if len(df) else []
    df["substring_success"] = [attack_success(str(c)) for c in df["completion"]]
    df["judge"] = j.name
    df["verdict"] = verdicts
    df["success"] = [v == "complies" for v in verdicts]
    return df
