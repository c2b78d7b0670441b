"""Peak resident memory of a CPU training step: what the tensors need vs what glibc keeps.

A LongLoRA training step of the embedded model (SmolLM2-135M; LoRA r 8 / alpha 16 on q, k,
v, o, embeddings and norms trained whole; bf16 autocast where bf16 is native, else fp32;
batch 1; the training loop's loss), with S2-Attn and with full attention, each in its own
process, under two allocator settings:

- ``default``: glibc as it comes. Its mmap threshold is dynamic: once a large block has been
  freed, blocks up to that size (at most 32 MiB) come from the heap, whose free holes stay
  resident between steps.
- ``mmap-1MiB``: ``mallopt(M_MMAP_THRESHOLD, 1 MiB)`` (what the environment variable
  ``MALLOC_MMAP_THRESHOLD_=1048576`` does): every block of 1 MiB or more is its own mapping,
  returned to the kernel when freed, at the cost of a page fault per 4 KiB page when it is
  touched again.

Per run: the peak RSS over the steps (VmHWM, reset after loading), the RSS after the last
step, the median step time after the first step and the minor page faults per step.

    python benchmarks/cpu_allocator.py [--len 2048] [--steps 5] [--rounds 1]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine, reset_peak, status_kib

SETTINGS = {"default": None, "mmap-1MiB": 1 << 20}
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def child(mode: str, setting: str, n: int, steps: int) -> dict:
    threshold = SETTINGS[setting]
    if threshold is not None and ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        raise SystemExit("mallopt(M_MMAP_THRESHOLD) failed: not glibc?")
    import torch

    import lorakit as lk
    from lorakit.training.loop import cast_frozen
    from lorakit.training.loss import loss_sum
    from lorakit.training.runtime import resolve_precision

    torch.manual_seed(0)
    model, _ = lk.load_model("smollm2-135m")
    model.config.use_cache = False
    lk.apply(model, method="longlora", s2_attn=mode == "s2")
    dtype = resolve_precision("auto")
    cast_frozen(model, dtype)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, 49152, (1, n), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    reset_peak()
    faults0, times = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            s, count = loss_sum(model, batch)
        (s / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return {
        "peak": status_kib("VmHWM") / 1024,
        "after": status_kib("VmRSS") / 1024,
        "step": statistics.median(times[1:] or times),
        "faults": faults / steps,
        "dtype": str(dtype).removeprefix("torch."),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--len", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=5, help="training steps per process")
    ap.add_argument("--rounds", type=int, default=1, help="processes per cell (medians)")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "SETTING"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(*a.child, a.len, a.steps)))
        return
    cells = [(m, s) for s in SETTINGS for m in ("full", "s2")]
    runs = {c: [] for c in cells}
    for _ in range(a.rounds):  # one process at a time, cells interleaved
        for mode, setting in cells:
            out = subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--child",
                    mode,
                    setting,
                    "--len",
                    str(a.len),
                    "--steps",
                    str(a.steps),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs[mode, setting].append(json.loads(out.splitlines()[-1]))
    med = {
        c: {k: statistics.median(r[k] for r in rs) for k in ("peak", "after", "step", "faults")}
        for c, rs in runs.items()
    }
    dtype = runs[cells[0]][0]["dtype"]
    print(
        f"# LongLoRA step of SmolLM2-135M, {a.len} tokens, batch 1, {dtype}, {a.steps} steps "
        f"per process, median of {a.rounds}; {machine()}"
    )
    print(
        "| attention | allocator | peak RSS MiB | RSS after MiB | step s | faults/step | "
        "S2/full peak |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode, setting in cells:
        r = med[mode, setting]
        ratio = f"{r['peak'] / med['full', setting]['peak']:.3f}" if mode == "s2" else "-"
        print(
            f"| {mode} | {setting} | {r['peak']:.0f} | {r['after']:.0f} | {r['step']:.2f} | "
            f"{r['faults'] / 1e6:.2f}M | {ratio} |"
        )
    for mode in ("full", "s2"):
        d, m = med[mode, "default"], med[mode, "mmap-1MiB"]
        print(
            f"{mode}: mmap-1MiB / default: peak {m['peak'] / d['peak']:.3f}x, step "
            f"{m['step'] / d['step']:.3f}x"
        )


if __name__ == "__main__":
    main()
