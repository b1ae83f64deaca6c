"""Run folders and artifacts: atomic writes, JSON records, hashes, versions.

Every artifact is safetensors, JSON, CSV or PNG/HTML, never pickle.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import RefusalLabError

log = logging.getLogger(__name__)


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds. The file gets
    the permissions a plain write would give it (0666 less the umask), not the temporary file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON (NaN and infinities become null), written atomically."""
    return write_text(path, json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False) + "\n")


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise RefusalLabError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RefusalLabError(f"{path}: not valid JSON ({e})") from None


def write_csv(path: str | os.PathLike, df) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Path(path)


def save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def load_tensors(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RefusalLabError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:  # a corrupt or truncated file
        raise RefusalLabError(f"{path}: not a readable safetensors file ({e})") from e


def hash_strings(items: list[str]) -> str:
    """Order-sensitive hash of a list of strings (a prompt set)."""
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("torch", "transformers", "nanogcg", "numpy", "pandas", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    try:
        out["refusal-lab"] = version("refusal-lab")
    except PackageNotFoundError:
        out["refusal-lab"] = None
    return out


COMMAND: list[str] | None = None  # set by the CLI to the command line it was given


def run_record(**fields: Any) -> dict:
    """What made an artifact: command line, versions, time, plus the caller's fields."""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": COMMAND if COMMAND is not None else sys.argv,
        "versions": versions(),
        **fields,
    }


def check_out(path: str | os.PathLike, force: bool = False, resume: bool = False,
              fix: str = "pass --force to overwrite it or choose another --out") -> Path:
    """Refuse an output path that exists (a file, or a non-empty folder) unless force or resume.

    Writes nothing: call it before anything slow, so that a bad --out fails at once."""
    path = Path(path)
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise RefusalLabError(f"{path} exists and is not a file or folder; choose another --out")
    taken = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if taken and not (force or resume):
        raise RefusalLabError(f"{path} already exists; {fix}")
    return path


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block succeeds it replaces `path` (whatever
    was there), so a failed or killed stage never leaves a half-written folder under the real name. The folder
    gets the permissions a plain mkdir would give it (0777 less the umask), not the temporary one's 0700."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.is_dir():
            old = path.parent / f".{path.name}.old{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if path.exists():
                path.unlink()
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_stage_dir(path: str | os.PathLike, force: bool = False, resume: bool = False) -> Path:
    """Create a stage folder; refuse to overwrite a non-empty one unless force (or resume)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RefusalLabError(f"{path} exists and is not a folder; choose another --out")
    check_out(path, force=force, resume=resume)
    if force and not resume and path.is_dir():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


class Timer:
    """Collects named wall-clock timings: `with timer("stage"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)
