"""Suffixes: the tokens a suffix may use, the random baseline suffix, and reading a suffix given as a
suffix.json, a text file, or the text itself."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .chat import Placement
from .errors import RefusalLabError
from .models import ChatModel


def _resolve(spec: str) -> tuple[Path, bool]:
    """The file a suffix spec names (a folder stands for its suffix.json or attack/suffix.json), and
    whether it exists at all (False: the spec is the suffix text itself)."""
    p = Path(spec).expanduser()
    try:
        exists = len(spec) < 4096 and p.exists()
    except OSError:
        exists = False
    if exists and p.is_dir():
        for cand in (p / "suffix.json", p / "attack" / "suffix.json"):
            if cand.is_file():
                return cand, True
        raise RefusalLabError(f"{spec}: no suffix.json in this folder")
    return p, exists


def check_suffix_ids(spec: str, ids: list[int], tokenizer) -> None:
    """Token ids read from a suffix file fit this tokenizer's vocabulary."""
    if ids and max(ids) >= len(tokenizer):
        raise RefusalLabError(f"{spec}: token ids do not fit this model's vocabulary; the suffix was made for another tokenizer")


def suffix_record(spec: str) -> dict | None:
    """The whole suffix.json record a spec names (None when the spec is text or a text file)."""
    p, exists = _resolve(spec)
    if not (exists and p.suffix.lower() == ".json"):
        return None
    load_suffix(str(p))  # validates it
    return json.loads(p.read_text(encoding="utf-8"))


def suffix_placement(spec: str) -> Placement:
    """Where the suffix a spec names goes: what its attack's config recorded (message, system), else after
    the prompt (a text suffix, and attacks from before placements)."""
    record = suffix_record(spec) or {}
    config = record.get("config") if isinstance(record.get("config"), dict) else {}
    placement = Placement.of(config)
    placement.check()
    return placement


def load_suffix(spec: str, tokenizer=None) -> tuple[str, list[int] | None]:
    """Return (suffix text, token ids or None). spec: a suffix.json (or the attack folder holding one),
    a .txt file, or the suffix text itself."""
    if spec is None:
        raise RefusalLabError("no suffix given")
    p, exists = _resolve(spec)
    if exists and p.suffix.lower() == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RefusalLabError(f"{spec}: not valid JSON ({e}); give a suffix.json made by `refusal attack`, or the suffix text") from None
        if not isinstance(data, dict) or not isinstance(data.get("suffix"), str):
            raise RefusalLabError(f"{spec}: not a suffix file (expected a JSON object with a 'suffix' string); give a suffix.json made by `refusal attack`, or the suffix text")
        ids = data.get("token_ids")
        if ids is not None:
            if not (isinstance(ids, list) and all(isinstance(i, int) and i >= 0 for i in ids)):
                raise RefusalLabError(f"{spec}: 'token_ids' must be a list of token ids")
            if tokenizer is not None:
                check_suffix_ids(spec, ids, tokenizer)
        return data["suffix"], ids
    if exists and p.is_file():
        try:
            text = p.read_text(encoding="utf-8").strip("\n")
        except UnicodeDecodeError:
            raise RefusalLabError(f"{spec}: not a UTF-8 text file") from None
        if not text.strip():
            raise RefusalLabError(f"{spec}: suffix file is empty; write the suffix text in it")
        return text, None
    if not spec.strip():
        raise RefusalLabError("the suffix is empty")
    return spec, None


# ----------------------------------------------------------------------------- token choices


def disallowed_token_ids(cm: ChatModel, allow_non_ascii: bool = False) -> torch.Tensor:
    """Token ids a suffix may not use: special and added tokens, ids beyond the tokenizer, and (by
    default) tokens that are not printable ASCII. Cached on the model."""
    key = f"_refusal_lab_disallowed_{allow_non_ascii}"
    if hasattr(cm, key):
        return getattr(cm, key)
    tok = cm.tokenizer
    n_embed = cm.model.get_input_embeddings().weight.shape[0]
    bad = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    bad |= set(range(len(tok), n_embed))
    if not allow_non_ascii:
        texts = tok.batch_decode([[i] for i in range(min(len(tok), n_embed))])
        bad |= {i for i, t in enumerate(texts) if not (t.isascii() and t.isprintable() and t)}
    ids = torch.tensor(sorted(i for i in bad if i < n_embed), dtype=torch.long)
    setattr(cm, key, ids)
    return ids


def retokenizes(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """[n, L] candidate ids -> [n] bool: decoding then encoding gives the same ids (one batched call)."""
    rows = ids.tolist()
    enc = tokenizer(tokenizer.batch_decode(rows), add_special_tokens=False).input_ids
    return torch.tensor([e == r for e, r in zip(enc, rows)], dtype=torch.bool)


def random_suffix_ids(cm: ChatModel, length: int, seed: int = 0, allow_non_ascii: bool = False,
                      tries: int = 1000) -> list[int]:
    """A random suffix of `length` tokens drawn uniformly from the tokens the attack may use, one that
    survives a decode/encode round trip (the baseline an adversarial suffix is compared with)."""
    bad = disallowed_token_ids(cm, allow_non_ascii)
    n_embed = cm.model.get_input_embeddings().weight.shape[0]
    ok = torch.ones(n_embed, dtype=torch.bool)
    ok[bad] = False
    allowed = ok.nonzero().squeeze(1)
    g = torch.Generator().manual_seed(seed)
    ids = None
    for _ in range(tries):
        ids = allowed[torch.randint(len(allowed), (1, length), generator=g)]
        if retokenizes(cm.tokenizer, ids)[0]:
            break
    return ids[0].tolist()
