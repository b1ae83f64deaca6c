"""The CLI's options, built from the config fields that declare them (default, help, choices, bounds in
the help), and the configs built back from parsed options."""
from __future__ import annotations

import argparse
import dataclasses

from refusal.config import check_fields, field_info, field_limits, flag, limits_text
from refusal.errors import RefusalLabError
from refusal.judges import JudgeConfig
from refusal.registry import NAMED_MODELS, SEEDED, ModelConfig
from refusal.app.sweep import SweepConfig


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2, no usage dump
        raise RefusalLabError(f"{self.prog}: {message} (see --help)")


def seconds_or_none(s: str) -> float | None:
    """A time budget in seconds, or 'none' for no budget (its bounds are checked where the config is)."""
    if s.strip().lower() == "none":
        return None
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or 'none', got {s!r}") from None


def positive(name: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v

    return parse


class AppendTuple(argparse.Action):
    """A repeatable option for a tuple field: each use adds its value to the field's default tuple."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, tuple(getattr(namespace, self.dest) or ()) + (values,))


def opt(p: argparse.ArgumentParser, cls, name: str, *flags: str, **kw) -> None:
    """An option for config field `cls.name`: its default, help and choices come from the field
    (refusal.config); its bounds are checked where the config is (check_fields). A bool field is a switch
    that turns it from its default; other types are parsed as the default's type (or `type=`). `flags`
    (default --field-name) and any argparse keyword may be given."""
    default, help_text = field_info(cls, name)
    limits = field_limits(cls, name)
    flags = flags or (flag(name),)
    kw.setdefault("default", default)
    default = kw["default"]  # a command may start from other settings than the field's (the bench's attack)
    if "choices" in limits and not isinstance(default, bool):
        kw.setdefault("choices", limits["choices"])
    if isinstance(default, bool):
        kw.setdefault("action", "store_false" if default else "store_true")
    elif "type" not in kw and "choices" not in kw and default is not None and "action" not in kw:
        kw["type"] = type(default[0]) if isinstance(default, tuple) and default else type(default)
    bounds = limits_text({k: v for k, v in limits.items() if k != "choices"})
    shown = "" if isinstance(default, bool) or default is None else f"default: {default}"
    notes = "; ".join(x for x in (bounds, shown) if x)
    kw.setdefault("help", help_text + (f" ({notes})" if notes else ""))
    kw.setdefault("dest", name)
    p.add_argument(*flags, **kw)


def nested_opts(p: argparse.ArgumentParser, cls, prefix: str) -> None:
    """An option --PREFIX-FIELD (dest PREFIX_FIELD) for every field of a nested config `cls`."""
    for f in dataclasses.fields(cls):
        opt(p, cls, f.name, flag(f"{prefix}_{f.name}"), dest=f"{prefix}_{f.name}")


def nested_config(cls, args, prefix: str):
    """The nested config of `cls` from its --PREFIX-FIELD options (nested_opts), checked with its errors naming
    those options."""
    config = config_from(cls, args, prefix=f"{prefix}_")
    check_fields(config, prefix=f"{prefix}_")
    return config


def config_from(cls, args, prefix: str = "", **changes):
    """A config of `cls` from the parsed options named like its fields, or PREFIX_field for a nested config
    (nested_opts); the others keep their defaults."""
    names = {prefix + f.name: f.name for f in dataclasses.fields(cls)}
    values = {names[k]: v for k, v in vars(args).items() if k in names}
    return cls(**{**values, **changes})


def model_args(p: argparse.ArgumentParser, default: str | None = None, batch_size: int | None = None) -> None:
    """The model options (ModelConfig's fields), and --batch-size (prompts per pass) when the stage has one."""
    names = ", ".join(n + (f" ({n}:SEED: another seed's)" if n in SEEDED else "") for n in NAMED_MODELS)
    p.add_argument("--model", required=default is None, default=default,
                   help=f"{names}, a Hugging Face model folder, a hub id, or a .gguf file"
                        + (f" (default: {default})" if default else ""))
    opt(p, ModelConfig, "device")
    opt(p, ModelConfig, "dtype")
    opt(p, ModelConfig, "chat_template")
    p.add_argument("--chat-template-kwargs", action="append", default=[], metavar="KEY=VALUE",
                   help="an option the chat template reads, e.g. enable_thinking=false (repeatable; recorded)")
    opt(p, ModelConfig, "trust_remote_code")
    if batch_size is not None:
        p.add_argument("--batch-size", type=positive("--batch-size"), default=batch_size,
                       help=f"prompts per forward pass (default: {batch_size})")


def judge_arg(p: argparse.ArgumentParser, what: str = "attack success") -> None:
    default, help_text = field_info(JudgeConfig, "name")
    p.add_argument("--judge", default=default, metavar="NAME", help=f"the judge of {what}: {help_text} (default: {default})")


def parse_template_kwargs(items: list[str]) -> dict:
    """KEY=VALUE options for the chat template; true/false/none and numbers become what they say."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise RefusalLabError(f"--chat-template-kwargs takes KEY=VALUE (e.g. enable_thinking=false), got {item!r}")
        low = value.strip().lower()
        if low in ("true", "false"):
            parsed = low == "true"
        elif low in ("none", "null"):
            parsed = None
        else:
            try:
                parsed = int(value)
            except ValueError:
                try:
                    parsed = float(value)
                except ValueError:
                    parsed = value
        out[key.strip()] = parsed
    return out


def model_config(args) -> ModelConfig:
    """The ModelConfig of the model options."""
    return ModelConfig(model=args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                       chat_template=args.chat_template,
                       chat_template_kwargs=parse_template_kwargs(getattr(args, "chat_template_kwargs", None) or []))


def judge_config_from(options, **overrides) -> JudgeConfig:
    """A JudgeConfig (validated) from the options: `judge` (the name), the model options `device`, `dtype` and
    `trust_remote_code` (an hf: classifier is loaded with them, as the model is), and, where present and not
    None, `hf_format`, `off_topic_threshold` and `max_reply_tokens`; `overrides` set any field."""
    def get(key, default=None):
        value = getattr(options, key, default)
        return default if value is None else value

    fields = dict(name=get("judge", field_info(JudgeConfig, "name")[0]), device=get("device"), dtype=get("dtype"),
                  trust_remote_code=bool(get("trust_remote_code", False)))
    for name in ("hf_format", "off_topic_threshold", "max_reply_tokens"):
        if get(name) is not None:
            fields[name] = get(name)
    fields.update(overrides)
    config = JudgeConfig(**fields)
    config.validate()
    return config


# the sweep's grid options: (flag, SweepConfig field, argparse keywords); a list field's flag is repeatable
SWEEP_OPTIONS = [
    ("--model", "models", dict(action="append")),
    ("--prompts", "prompts", dict(action="append")),
    ("--per-prompt", "per_prompt", dict(action="append_const", const=True)),
    ("--universal", "per_prompt", dict(action="append_const", const=False)),
    ("--max-prompts", "max_prompts", {}),
    ("--engine", "engines", dict(action="append")),
    ("--objective", "objectives", dict(action="append")),
    ("--seed", "seeds", dict(action="append")),
    ("--steps", "steps", {}),
    ("--search-width", "search_width", {}),
    ("--suffix-len", "suffix_len", {}),
    ("--topk", "topk", {}),
    ("--no-early-stop", "early_stop", dict(action="store_const", const=False)),
    ("--eval-prompts", "eval_prompts", {}),
    ("--eval-max-prompts", "eval_max_prompts", {}),
    ("--eval-tokens", "eval_tokens", {}),
    ("--no-transfer", "transfer", dict(action="store_const", const=False)),
    ("--analysis", "analysis", dict(action="store_const", const=True)),
    ("--direction", "direction", {}),
    ("--judge", "judge", dict(metavar="NAME")),
    ("--device", "device", {}),
    ("--dtype", "dtype", {}),
    ("--batch-size", "batch_size", {}),
    ("--cpus-per-task", "cpus_per_task", {}),
    ("--gpus-per-task", "gpus_per_task", dict(type=float)),
    ("--retries", "retries", {}),
]


def sweep_kw(name: str, kw: dict) -> dict:
    """The argparse keywords of a sweep option: its choices and value type read from SweepConfig's field
    (a list field's from its values); its bounds are checked with the config."""
    kw = dict(kw)
    if "const" in kw:
        return kw
    default = field_info(SweepConfig, name)[0]
    limits = field_limits(SweepConfig, name)
    if "choices" in limits:
        kw.setdefault("choices", limits["choices"])
    elif "type" not in kw:
        value = default[0] if isinstance(default, tuple) and default else default
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            kw["type"] = type(value)
    return kw
