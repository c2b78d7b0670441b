"""Shared helpers of the benchmark scripts: peak resident memory on Linux, model variants.

Peak memory on CPU: the resident-set high-water mark (VmHWM) is reset through
/proc/self/clear_refs just before the measured work, then read after it; the figure is
VmHWM - VmRSS(before). Each variant runs in its own process so that nothing else lives there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> int:
    """Reset the high-water mark; returns VmRSS (KiB) right after."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS")


def peak_since_mib(rss_before_kib: int) -> float:
    return (status_kib("VmHWM") - rss_before_kib) / 1024


def steady_allocator() -> str:
    """Keep freed memory in the process between steps (glibc: a 2 GiB trim threshold, 256 MiB
    top pad), so that a step does not fault in, page by page, memory the previous step gave
    back to the kernel. On the 2-core VMs measured those faults cost 0.1-0.3 s per step of the
    embedded model and were most of the timing noise, for every variant alike (frozen
    included). Timing only: the peak-memory subprocesses keep glibc's defaults. Returns what
    was set, for the output's header."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-1, 2**31 - 1) == 1 and libc.mallopt(-2, 256 << 20) == 1
    except (OSError, AttributeError):
        ok = False
    return (
        "allocator: glibc trim threshold 2 GiB, top pad 256 MiB (freed memory kept between steps)"
        if ok
        else "allocator: defaults (no glibc mallopt)"
    )


def machine() -> str:
    import platform

    import torch

    cpu, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
        flags = set(next(ln for ln in lines if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pass
    # what bf16 runs on: native instructions, or emulation (much slower than fp32)
    isa = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    cpu += f" ({', '.join(isa) or 'no AVX2'})"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, Python "
        f"{platform.python_version()}"
    )


# Bytes autograd keeps for backward: the library's count (training/memory.py), which a
# training run records in summary.json; the exact memory table uses the same code.
from lorakit.training.memory import SavedBytes  # noqa: E402,F401
