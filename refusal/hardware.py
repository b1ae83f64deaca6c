"""The hardware a run computes on: whether bfloat16 is fast here, and the machine a timing names.

`REFUSAL_LAB_BFLOAT16` (auto | on | off, default auto) decides for the whole process where bfloat16 is
used to save time: the organism's fine-tune and GCG's candidate screening. auto measures the CPU (below);
off computes in float32 throughout, to see on a CPU with fast bfloat16 what a CPU without it does; on
uses bfloat16 even where the measurement says it is slow.
"""
from __future__ import annotations

import logging
import os
import platform
import time

import torch

from . import artifacts
from .errors import RefusalLabError
from .models import cache_dir

log = logging.getLogger(__name__)

BFLOAT16_SETTING = "REFUSAL_LAB_BFLOAT16"
BFLOAT16_CHOICES = ("auto", "on", "off")
BFLOAT16_HELP = ("where bfloat16 saves time (the organism's fine-tune, GCG's candidate screening): auto where this "
                 "CPU multiplies it fast (measured once) or the GPU supports it; off: float32 throughout, to measure "
                 "on any CPU what one without fast bfloat16 does; on: bfloat16 even where it is slow")


def bfloat16_setting() -> str:
    """The `REFUSAL_LAB_BFLOAT16` setting: auto (default), on or off; a one-line error for anything else."""
    value = os.environ.get(BFLOAT16_SETTING, "auto").strip().lower() or "auto"
    if value not in BFLOAT16_CHOICES:
        raise RefusalLabError(f"{BFLOAT16_SETTING}={value!r}: choose one of {', '.join(BFLOAT16_CHOICES)}")
    return value


# bfloat16 counts as fast on a CPU when its matrix products run at least this many times float32's
BF16_SPEEDUP_NEEDED = 1.3


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products are much faster than float32 here: as `REFUSAL_LAB_BFLOAT16` says when
    it is on or off; else (auto) CUDA: the GPU supports bf16.
    CPU: only where the CPU has bfloat16 instructions (AMX or AVX-512 BF16), and there measured, since the
    instructions alone do not make it fast (a 2-core Sapphire Rapids with AMX: 2.8 TFLOPS against 0.18;
    a 2-core Xeon with AVX-512 BF16 but no AMX: 133 GFLOP/s against 161). The measurement (about 0.3 s
    on 2 cores) is made once per machine, torch version and thread count, and kept in the project cache."""
    setting = bfloat16_setting()
    if setting != "auto":
        return setting == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    if not any(getattr(cpu, c, lambda: False)() for c in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")):
        return False
    return cpu_bf16_speedup() >= BF16_SPEEDUP_NEEDED


_BF16_SPEEDUP: dict[str, float] = {}


def cpu_bf16_speedup() -> float:
    """bfloat16 matrix-product throughput over float32's on this CPU (best of 5, a [512, 1024] x [1024, 1024]
    product, the size of a small model's projections), measured once and cached in the project cache
    (`cpu-bf16.json`, keyed by the CPU, torch version and thread count)."""
    amx = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", lambda: False)()
    key = (f"{_cpu_name()}|{platform.machine()}|{'AMX' if amx else 'no AMX'}|torch {torch.__version__}|"
           f"{torch.get_num_threads()} threads")
    if key in _BF16_SPEEDUP:
        return _BF16_SPEEDUP[key]
    path = cache_dir() / "cpu-bf16.json"
    try:
        known = artifacts.read_json(path) if path.is_file() else {}
    except RefusalLabError:
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), (int, float)):
        _BF16_SPEEDUP[key] = float(known[key])
        return _BF16_SPEEDUP[key]

    def best_time(dtype: torch.dtype) -> float:
        g = torch.Generator().manual_seed(0)
        a = torch.randn(512, 1024, generator=g).to(dtype)
        b = torch.randn(1024, 1024, generator=g).to(dtype)
        a @ b  # warm up
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            times.append(time.perf_counter() - t0)
        return min(times)

    speedup = best_time(torch.float32) / best_time(torch.bfloat16)
    _BF16_SPEEDUP[key] = speedup
    known[key] = round(speedup, 3)
    try:
        artifacts.write_json(path, known)
    except OSError as e:  # a read-only cache: measured again next time
        log.debug("could not keep the bfloat16 measurement in %s: %s", path, e)
    log.info("bfloat16 matrix products run %.2fx float32's on this CPU", speedup)
    return speedup


def _cpu_name() -> str:
    """The CPU's model name, family and model number (Linux; several CPUs share one model name), or the
    platform's processor string."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k in ("model name", "cpu family", "model") and k not in fields:
                    fields[k] = v.strip()
                if not k:  # the first processor's block ends
                    break
    except OSError:
        pass
    if fields:
        return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    return platform.processor() or "unknown cpu"


# CPU features that decide how fast the attacks run: bfloat16 and int8 matrix products, AMX tiles
MACHINE_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def machine_info(device: torch.device | str = "cpu") -> dict:
    """The machine a timing was taken on: the CPU's model name (as lscpu gives it, with family and model),
    which of MACHINE_FLAGS it has, torch's threads and version, and the device (a GPU's name)."""
    device = torch.device(device)
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k.strip() == "flags":
                    flags = set(v.split())
                    break
    except OSError:
        pass
    return dict(cpu=_cpu_name(), cpu_flags=[x for x in MACHINE_FLAGS if x in flags], threads=torch.get_num_threads(),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                torch=torch.__version__)


def machine_line(machine: dict) -> str:
    """machine_info's record as one line for a report: the CPU, its flags, torch's threads, the device."""
    flags = ", ".join(machine.get("cpu_flags") or []) or "none of the flags that matter here"
    return f"{machine['cpu']} ({flags}), {machine['threads']} threads, {machine['device']}"
