"""Where an eager LoRA step's overhead could go: one decoder layer's seven linears, forward +
backward, on the embedded model's shapes, for each way of computing LoRA that issue #27 asks
to try, against the frozen linears (the limit). Interleaved rounds, medians, ratios.

Shapes: SmolLM2-135M (hidden 576, q 576, k/v 192, gate/up 1536, down 576), 512 tokens
(benchmarks/run.py's batch 2 x 256), r 16. Variants:

- ``frozen``: the seven ``F.linear`` with frozen weights (gradient to the input only);
- ``gemms``: ``frozen`` plus LoRA's six GEMMs per linear (x Aᵀ, h Bᵀ, g B, gᵀ h, dhᵀ x, dh A)
  as bare ``torch.mm`` calls, no autograd, casts or adds: the floor of any implementation
  that computes them one linear at a time;
- ``node``: lorakit's LoRA linear, one autograd node per linear (adapters/lora.py);
- ``shared``: the A's of the linears that read the same input (q/k/v; gate/up) stacked, so x
  is read once for them: h = x [A_q; A_k; A_v]ᵀ forward, one dA GEMM and one dh·A GEMM
  backward (one node per group);
- ``folded``: A stacked under W0 as one weight buffer [W0; A], so the frozen GEMM yields h as
  extra columns (y is then a strided view); backward as ``node``;
- ``folded+bwd``: also dx = [g | dh] [W0; A] as one GEMM (a copy of g into the cat);
- ``bf16-adapter`` (with ``--bf16``): ``node`` with the adapter's GEMMs in bf16 (fp32 base):
  the autocast direction; on a CPU without native bf16 it is emulated (see machine line).

    python benchmarks/lora_layer.py [--rounds 15] [--tokens 512] [--threads N] [--bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from common import machine, steady_allocator
from lorakit.adapters.lora import LoRALinearFunction

HIDDEN, INTER, KV = 576, 1536, 192
GROUPS = [("q", "k", "v"), ("o",), ("gate", "up"), ("down",)]
DIMS = {
    "q": (HIDDEN, HIDDEN),
    "k": (KV, HIDDEN),
    "v": (KV, HIDDEN),
    "o": (HIDDEN, HIDDEN),
    "gate": (INTER, HIDDEN),
    "up": (INTER, HIDDEN),
    "down": (HIDDEN, INTER),
}
R, S = 16, 2.0


class SharedA(torch.autograd.Function):
    """y_i = x W_iᵀ + s·h_i B_iᵀ for linears sharing x, h = x [A_1; ...]ᵀ in one GEMM."""

    @staticmethod
    def forward(ctx, x, s, *wab):
        n = len(wab) // 3
        ws, a_s, bs = wab[:n], wab[n : 2 * n], wab[2 * n :]
        a_cat = torch.cat(a_s)
        h = torch.mm(x, a_cat.t())
        hs = h.split(R, dim=1)
        ys = []
        for w, hi, b in zip(ws, hs, bs):
            y = torch.mm(x, w.t())
            y.addmm_(hi, b.t(), alpha=s)
            ys.append(y)
        ctx.save_for_backward(x, h, a_cat, *ws, *bs)
        ctx.s, ctx.n = s, n
        return tuple(ys)

    @staticmethod
    def backward(ctx, *gs):
        x, h, a_cat, *rest = ctx.saved_tensors
        n, s = ctx.n, ctx.s
        ws, bs = rest[:n], rest[n:]
        hs = h.split(R, dim=1)
        dh = torch.cat([torch.mm(g, b) for g, b in zip(gs, bs)], dim=1).mul_(s)
        dbs = [torch.mm(g.t(), hi).mul_(s) for g, hi in zip(gs, hs)]
        da = torch.mm(dh.t(), x).split(R, dim=0)
        dx = torch.mm(dh, a_cat)
        for g, w in zip(gs, ws):
            dx.addmm_(g, w)
        return (dx, None, *([None] * n), *da, *dbs)


class Folded(torch.autograd.Function):
    """[y | h] = x [W0; A]ᵀ in one GEMM, y += s·h Bᵀ; ``bwd``: dx = [g | dh] [W0; A]."""

    @staticmethod
    def forward(ctx, x, wa, a, b, s, d_out, bwd):
        # wa: the frozen buffer [W0; A] (A's rows hold ``a``'s values); ``a`` gets A's gradient
        yh = torch.mm(x, wa.t())
        y, h = yh[:, :d_out], yh[:, d_out:]
        y.addmm_(h, b.t(), alpha=s)
        ctx.save_for_backward(x, h, wa, b)
        ctx.s, ctx.d_out, ctx.bwd = s, d_out, bwd
        return y

    @staticmethod
    def backward(ctx, g):
        x, h, wa, b = ctx.saved_tensors
        s, d = ctx.s, ctx.d_out
        dh = torch.mm(g, b).mul_(s)
        db = torch.mm(g.t(), h).mul_(s)
        da = torch.mm(dh.t(), x)
        if ctx.bwd:
            dx = torch.mm(torch.cat([g, dh], dim=1), wa)
        else:
            dx = torch.mm(g, wa[:d]).add_(torch.mm(dh, wa[d:]))
        return dx, None, da, db, None, None, None


DTYPE = torch.float32  # --dtype: every tensor's (the node's GEMMs run in it)
_ONES: dict = {}  # the output gradients of ``gemms`` (the other variants backward ones too)


def make(tokens: int):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=g) * scale).to(DTYPE).requires_grad_(grad)

    w = {k: rnd(o, i, scale=0.02) for k, (o, i) in DIMS.items()}
    a = {k: rnd(R, i, scale=0.02, grad=True) for k, (o, i) in DIMS.items()}
    b = {k: rnd(o, R, scale=0.02, grad=True) for k, (o, i) in DIMS.items()}
    x = rnd(tokens, HIDDEN, grad=True)
    xi = rnd(tokens, INTER, grad=True)
    # the folded buffers, built once (in a model W0 would be a view of its buffer)
    wa = {k: torch.cat([w[k], a[k].detach()]) for k in DIMS}
    return w, a, b, x, xi, wa


def layer(variant: str, w, a, b, x, xi, wa):
    """The seven linears' outputs summed into one loss (each output's gradient is ones)."""

    def inp(k):
        return xi if k == "down" else x

    outs = []
    if variant == "frozen":
        outs = [F.linear(inp(k), w[k]) for k in DIMS]
    elif variant == "gemms":  # the floor: frozen + LoRA's six GEMMs per linear, nothing else
        outs = [F.linear(inp(k), w[k]) for k in DIMS]
        with torch.no_grad():
            for k in DIMS:
                xx, aa, bb = inp(k), a[k], b[k]
                g = _ONES.setdefault(
                    (k, xx.dtype), torch.ones(xx.shape[0], bb.shape[0], dtype=xx.dtype)
                )
                h = torch.mm(xx, aa.t())
                torch.mm(h, bb.t())  # y += s·h Bᵀ
                dh = torch.mm(g, bb)
                torch.mm(g.t(), h)  # dB
                torch.mm(dh.t(), xx)  # dA
                torch.mm(dh, aa)  # dx through A
    elif variant in ("node", "bf16-adapter"):
        dt = torch.bfloat16 if variant == "bf16-adapter" else DTYPE
        for k in DIMS:
            if dt == DTYPE:
                outs.append(
                    LoRALinearFunction.apply(inp(k), w[k], None, a[k], b[k], S, DTYPE, None)
                )
            else:  # base fp32, adapter GEMMs bf16
                h = F.linear(inp(k).to(dt), a[k].to(dt))
                outs.append(F.linear(inp(k), w[k]) + S * F.linear(h, b[k].to(dt)).float())
    elif variant == "shared":
        for grp in GROUPS:
            xx = inp(grp[0])
            outs += SharedA.apply(
                xx, S, *[w[k] for k in grp], *[a[k] for k in grp], *[b[k] for k in grp]
            )
    elif variant.startswith("folded"):
        for k in DIMS:
            outs.append(
                Folded.apply(inp(k), wa[k], a[k], b[k], S, w[k].shape[0], variant == "folded+bwd")
            )
    return outs


def timed(variant, tensors) -> float:
    t0 = time.perf_counter()
    outs = layer(variant, *tensors)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    dt = time.perf_counter() - t0
    for t in (*tensors[1].values(), *tensors[2].values(), tensors[3], tensors[4]):
        t.grad = None
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5, help="layer passes per timed sample")
    ap.add_argument("--bf16", action="store_true", help="add the bf16-adapter variant")
    ap.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16"],
        help="every tensor's dtype (bf16: the layer as a bf16 run computes it)",
    )
    ap.add_argument("--check", action="store_true", help="compare gradients with node's")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    alloc = steady_allocator()
    global DTYPE
    DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    variants = ["frozen", "gemms", "node", "shared", "folded", "folded+bwd"] + (
        ["bf16-adapter"] if a.bf16 else []
    )
    tensors = make(a.tokens)
    if a.check:
        ref = None
        for v in variants[2:6]:
            outs = layer(v, *tensors)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            grads = (
                [tensors[3].grad.clone()]
                + [tensors[2][k].grad.clone() for k in DIMS]
                + [tensors[1][k].grad.clone() for k in DIMS]
            )
            timed("frozen", tensors)
            if ref is None:
                ref = grads
            else:
                err = max((g - r).abs().max().item() for g, r in zip(grads, ref))
                print(f"{v}: max |grad - node's| = {err:.2e}")
    for v in variants:  # warm-up
        timed(v, tensors)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(a.rounds):
        for v in variants:
            times[v].append(sum(timed(v, tensors) for _ in range(a.reps)) / a.reps)
    print(f"# {machine()}, {torch.get_num_threads()} threads\n# {alloc}")
    print(
        f"# one decoder layer's 7 linears, {a.tokens} tokens, r {R}, {a.dtype}, forward + "
        "backward,"
        f" median of {a.rounds} rounds x {a.reps} passes\n"
    )
    fz = statistics.median(times["frozen"])
    nd = statistics.median(times["node"])
    print("| variant | ms | x frozen | LoRA overhead vs node |\n|---|---|---|---|")
    for v in variants:
        m = statistics.median(times[v])
        over = "-" if v == "frozen" else f"{(m - fz) / (nd - fz):.2f}"
        print(f"| {v} | {m * 1e3:.2f} | {m / fz:.3f} | {over} |")


if __name__ == "__main__":
    main()
