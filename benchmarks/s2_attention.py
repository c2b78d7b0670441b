"""S2-Attn vs full causal attention: time and memory of the attention function alone.

Forward + backward of one attention call with SmolLM2-135M's shapes (9 query heads, 3 kv
heads, head dim 64, batch 1) at 2k, 4k and 8k tokens. Full attention is PyTorch SDPA with
``is_causal`` and grouped-query attention, what transformers' "sdpa" path runs; S2-Attn is
:func:`lorakit.attention.s2.s2_attention` with G = N/4. Repetitions are interleaved
(N, method, N, method, ...) so drift in machine load hits both alike; medians are reported.

Memory: on CUDA the peak allocated during forward+backward above the inputs; on every device
the bytes saved for backward (what a training step keeps per attention layer).

LongLoRA (Chen et al. 2023) reports attention at 8192 tokens costing 16x that at 2048 for full
attention and ~4x with S2-Attn (group ratio 1/4), i.e. S2/full ~ 1/4 at 8k.

``--model``: the same end to end, a whole training step (forward, backward, AdamW) of LoRA
r=16 on every linear layer of the embedded model (SmolLM2-135M), batch 1, with S2-Attn
against full attention ("sdpa"): step time and the bytes autograd keeps for backward (the
library's count, lorakit.training.memory.SavedBytes; the model's own weights left out).

    python benchmarks/s2_attention.py [--lengths 2048,4096,8192] [--reps 5] [--device cuda]
    python benchmarks/s2_attention.py --model [--lengths 2048,4096,8192] [--reps 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from common import SavedBytes
from lorakit.attention.s2 import s2_attention

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def full_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def s2(q, k, v):
    return s2_attention(q, k, v, group_size=q.shape[2] // 4)


METHODS = {"full": full_causal, "s2": s2}


def inputs(n, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)

    # the layout transformers passes: (b, heads, n, d) views of (b, n, heads, d) projections
    def make(h):
        return torch.randn(1, n, h, HEAD_DIM, generator=g).to(device, dtype).requires_grad_()

    return [make(h).transpose(1, 2) for h in (HEADS, KV_HEADS, KV_HEADS)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(fn, q, k, v):
    out = fn(q, k, v)
    out.backward(torch.ones_like(out))
    return out


def time_once(fn, n, device, dtype) -> float:
    q, k, v = inputs(n, device, dtype)
    sync(device)
    t0 = time.perf_counter()
    step(fn, q, k, v)
    sync(device)
    return time.perf_counter() - t0


def saved_bytes(fn, n, device, dtype) -> int:
    """Unique bytes autograd keeps for backward (inputs excluded)."""
    q, k, v = inputs(n, device, dtype)
    skip = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(q, k, v)
    return sum(seen.values())


def peak_bytes(fn, n, device, dtype) -> int | None:
    if device.type != "cuda":
        return None
    q, k, v = inputs(n, device, dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(fn, q, k, v)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def machine(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads (torch {torch.__version__})"
    )


def model_step(s2: bool, n: int, device, dtype):
    """(step function, model) of LoRA r=16 on the embedded model with or without S2-Attn."""
    import lorakit as lk
    from lorakit.training.loop import cast_frozen
    from lorakit.training.loss import loss_sum

    torch.manual_seed(0)
    model, _ = lk.load_model("smollm2-135m")
    model.config.use_cache = False
    lk.apply(model, method="lora", r=16, alpha=32, s2_attn=s2, context_length=n)
    cast_frozen(model, dtype)
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, 49152, (1, n), generator=torch.Generator().manual_seed(1)).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            s, count = loss_sum(model, batch)
        (s / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def model_main(lengths, reps, device, dtype) -> None:
    """The --model table: whole training steps, S2-Attn against full attention."""
    rows = []
    for n in lengths:
        built = {m: model_step(m == "s2", n, device, dtype) for m in METHODS}
        saved = {}
        for m, (step, model) in built.items():
            with SavedBytes(exclude=[*model.parameters(), *model.buffers()]) as sb:
                step()  # also the warm-up
            saved[m] = sb.nbytes
        times = {m: [] for m in METHODS}
        for _ in range(reps):
            for m, (step, _) in built.items():
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                times[m].append(time.perf_counter() - t0)
        rows.append((n, {m: statistics.median(t) for m, t in times.items()}, saved))
        del built
    print(
        f"# S2-Attn vs full attention, whole LoRA training step of SmolLM2-135M (r=16, all "
        f"linear layers), batch 1, G = N/4; {machine(device)}, "
        f"{str(dtype).removeprefix('torch.')}, median of {reps}"
    )
    print("| tokens | full s | S2 s | S2/full time | full saved MiB | S2 saved MiB |")
    print("|---|---|---|---|---|---|")
    for n, med, saved in rows:
        print(
            f"| {n} | {med['full']:.2f} | {med['s2']:.2f} | {med['s2'] / med['full']:.2f} | "
            f"{saved['full'] / 2**20:.1f} | {saved['s2'] / 2**20:.1f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on cuda)")
    ap.add_argument(
        "--model",
        action="store_true",
        help="whole training steps of the embedded model instead of the attention function alone",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.model:
        return model_main(lengths, args.reps, device, dtype)

    for n in lengths:  # warm-up: kernels, allocator
        for fn in METHODS.values():
            time_once(fn, n, device, dtype)
    times = {(n, m): [] for n in lengths for m in METHODS}
    for _ in range(args.reps):
        for n in lengths:
            for m, fn in METHODS.items():
                times[(n, m)].append(time_once(fn, n, device, dtype))

    print(
        f"# S2-Attn vs full causal attention, fwd+bwd of attention alone; {machine(device)}, "
        f"{str(dtype).removeprefix('torch.')}, {HEADS} q heads / {KV_HEADS} kv heads / dim "
        f"{HEAD_DIM}, batch 1, G = N/4, median of {args.reps}"
    )
    print(
        "| tokens | full ms | S2 ms | S2/full time | full saved MiB | S2 saved MiB | "
        "full peak MiB | S2 peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    first = {}
    for n in lengths:
        med = {m: statistics.median(times[(n, m)]) for m in METHODS}
        first.setdefault("full", med["full"])
        first.setdefault("s2", med["s2"])
        saved = {m: saved_bytes(fn, n, device, dtype) for m, fn in METHODS.items()}
        peak = {m: peak_bytes(fn, n, device, dtype) for m, fn in METHODS.items()}
        print(
            f"| {n} | {med['full'] * 1e3:.1f} | {med['s2'] * 1e3:.1f} | "
            f"{med['s2'] / med['full']:.2f} | {mib(saved['full'])} | {mib(saved['s2'])} | "
            f"{mib(peak['full'])} | {mib(peak['s2'])} |"
        )
    n0, n1 = lengths[0], lengths[-1]
    print(
        f"\ngrowth {n0} -> {n1} tokens: "
        f"full x{statistics.median(times[(n1, 'full')]) / first['full']:.1f}, "
        f"S2 x{statistics.median(times[(n1, 's2')]) / first['s2']:.1f} "
        f"(quadratic: x{(n1 / n0) ** 2:.0f}; S2 at {n1} vs full at {n0}: "
        f"x{statistics.median(times[(n1, 's2')]) / first['full']:.1f}, ideal x{n1 / n0:.0f})"
    )


if __name__ == "__main__":
    main()
