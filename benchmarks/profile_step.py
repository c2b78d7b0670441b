"""Where a training step's time goes: torch profiler over one step of each variant, operator
self-times side by side (``benchmarks/run.py``'s variants, same model and batch).

    python benchmarks/profile_step.py --dtype fp32 frozen+fusedloss lorakit-lora+fusedloss

``--counts``: calls per step of each operator instead of self times (deterministic, so it can be
compared on a loaded machine: what overhead a change removes, not how long it took).
``--stacks OP``: where the variant calls operator OP from (Python stacks, 5 frames, by count).
"""

from __future__ import annotations

import argparse
import collections

import torch

from common import machine, steady_allocator
from run import build


def profile(
    variant: str, dtype: torch.dtype, steps: int, counts: bool = False, stacks: str = ""
) -> dict[str, float]:
    """{operator: self CPU ms per step}, median-free: the sum over ``steps`` steps / steps
    (``counts``: {operator: calls per step}; ``stacks``: print where OP is called from)."""
    _, step, _ = build(variant, dtype)
    step()
    step()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], with_stack=bool(stacks)
    ) as prof:
        for _ in range(steps):
            step()
    if stacks:
        rows = [ev for ev in prof.key_averages(group_by_stack_n=5) if ev.key == stacks]
        for ev in sorted(rows, key=lambda e: -e.count)[:8]:
            print(f"{variant}: {ev.count / steps:.0f} calls per step from")
            print("\n".join(f"    {frame}" for frame in ev.stack))
    out: dict[str, float] = collections.defaultdict(float)
    for ev in prof.key_averages():
        out[ev.key] += (ev.count if counts else ev.self_cpu_time_total / 1000) / steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs=2, help="reference and variant")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--counts", action="store_true", help="calls per step, not self times")
    ap.add_argument("--stacks", default="", metavar="OP", help="where OP is called from")
    a = ap.parse_args()
    alloc = steady_allocator()  # as benchmarks/run.py times its steps
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    ref, var = (profile(v, dtype, a.steps, a.counts, a.stacks) for v in a.variants)
    unit = "calls" if a.counts else "ms"
    what = "operator calls" if a.counts else "self CPU ms"
    print(f"# {machine()}\n# {alloc}\n# {a.dtype}, {what} per step, {a.steps} steps profiled\n")
    print(
        f"total: {a.variants[0]} {sum(ref.values()):.0f} {unit}, {a.variants[1]} "
        f"{sum(var.values()):.0f} {unit} (+{sum(var.values()) - sum(ref.values()):.0f})\n"
    )
    print(f"| operator | {a.variants[0]} | {a.variants[1]} | difference |\n|---|---|---|---|")
    keys = sorted(set(ref) | set(var), key=lambda k: -abs(var.get(k, 0) - ref.get(k, 0)))
    for k in keys[: a.top]:
        r, v = ref.get(k, 0.0), var.get(k, 0.0)
        print(f"| {k} | {r:.1f} | {v:.1f} | {v - r:+.1f} |")


if __name__ == "__main__":
    main()
