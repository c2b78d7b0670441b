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


def machine() -> str:
    import platform

    import torch

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, Python "
            f"{platform.python_version()}")


class SavedBytes:
    """Bytes autograd keeps for backward inside the block (``saved_tensors_hooks``), each
    storage counted once (q/k/v share their input), storages of ``exclude`` (the model's own
    parameters, counted as state instead) left out. Exact and independent of the allocator."""

    def __init__(self, exclude=()):
        import torch

        self.seen: dict[int, int] = {}
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        st = t.untyped_storage()
        if st.data_ptr() not in self.exclude and st.device.type != "meta":
            self.seen[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    @property
    def mib(self) -> float:
        return sum(self.seen.values()) / 2**20
