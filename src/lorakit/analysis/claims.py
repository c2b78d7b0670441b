"""The claims of the LoRA-family literature, tested on a compare's figures: a verdict each.

Each claim is a function of the compare's rows (one per method and suite, means over seeds,
with their spread) and of the ΔM/ΔD correlations from ``lorakit inspect``; it returns the
figures that test it and a verdict:

- ``holds``, ``does not hold``;
- ``tie``: the claim says one method is better (forgets more, learns faster, beats) and the
  difference is within the spread;
- ``not measured``: a row the claim needs is missing (``--methods`` left it out, it failed).

# Note: what counts as a difference
Two means differ when ``|a - b| > 2 * sqrt(s_a^2 + s_b^2)``, s being each mean's spread: the
standard deviation over seeds when a method ran with several (``--seeds N``), otherwise the
standard error over the evaluation examples (exact match: ``sqrt(p(1 - p) / n)``; forgetting:
of the per-paragraph loss changes). Ratios of memory and time, which have no spread from one
run, differ when they are beyond a tolerance (:data:`TOLERANCE`) measured on this kind of
machine. A "similar quality" claim holds when the quality is within the band or better.

Sources of the claims: Hu et al. 2021 (LoRA), Dettmers et al. 2023 (QLoRA), Hayou et al. 2024
(LoRA+), Zhang et al. 2023 (LoRA-FA), Zhou et al. 2024 (LoRA-drop), Zhang et al. 2023
(AdaLoRA), Liu et al. 2024 (DoRA), Chen et al. 2023 (LongLoRA), Biderman et al. 2024 (LoRA
Learns Less and Forgets Less).
"""

from __future__ import annotations

import math
from collections.abc import Callable

HOLDS, FAILS, TIE, NA = "holds", "does not hold", "tie", "not measured"
#: relative tolerance of a ratio of one run's figures (timing and RSS noise on 2 CPU cores)
TOLERANCE = {"memory": 0.05, "time": 0.10}
#: "several times": full fine-tuning's memory over LoRA's at least this
SEVERAL = 2.0
#: "halves the trainable parameters": LoRA-FA's over LoRA's at most this
HALF = 0.6


def differs(a: float, sa: float | None, b: float, sb: float | None) -> int:
    """+1 if a > b beyond the band, -1 if a < b beyond it, 0 within (See Note: what counts
    as a difference)."""
    band = 2 * math.sqrt((sa or 0.0) ** 2 + (sb or 0.0) ** 2)
    d = a - b
    return 0 if abs(d) <= band else (1 if d > 0 else -1)


def ratio_verdict(ratio: float, below: float, tol: float) -> str:
    """The claim "ratio < below": holds below ``below * (1 - tol)``, does not hold above
    ``below * (1 + tol)``, tie between."""
    if ratio < below * (1 - tol):
        return HOLDS
    if ratio > below * (1 + tol):
        return FAILS
    return TIE


def combine(verdicts: list[str]) -> str:
    """A claim made of parts: not measured if any part is, then does not hold if any part
    fails, then tie if any part ties."""
    for v in (NA, FAILS, TIE):
        if v in verdicts:
            return v
    return HOLDS


def _q(row: dict) -> tuple[float | None, float | None]:
    return row.get("quality"), (row.get("spread") or {}).get("quality")


def _fmt_q(name: str, row: dict) -> str:
    q, s = _q(row)
    return f"{name} {row.get('quality_metric', 'quality')} {q:.3f}" + (
        f" ± {s:.3f}" if s is not None else ""
    )


def similar_quality(a: dict, b: dict) -> str:
    """ "a's quality is similar to (or better than) b's"."""
    qa, sa = _q(a)
    qb, sb = _q(b)
    if qa is None or qb is None:
        return NA
    return FAILS if differs(qa, sa, qb, sb) < 0 else HOLDS


def _needs(rows: dict, *names: str) -> dict | None:
    missing = [n for n in names if n not in rows]
    if missing:
        return {"verdict": NA, "figures": f"no row for {', '.join(missing)}"}
    return None


# ---- the claims ----------------------------------------------------------------------------

# Note: which memory
# A memory verdict is judged on the exact memory (``exact_memory_mib``: parameters, gradients,
# optimizer state and the bytes autograd saves for backward on one micro-batch, counted tensor
# by tensor, training/memory.py) when both rows have it: it measures what the method keeps,
# while the peak (max RSS on CPU, the allocator's peak on GPU) also holds the allocator's and
# the libraries' own buffers (bitsandbytes on CPU dequantizes each 4-bit weight into a fresh
# buffer per matmul). The peak is given beside it, and judges when a row has no exact figure.
# The verdict's figures name the measure it used.


def _memory(a: dict, b: dict, names: tuple[str, str]) -> tuple[float, str]:
    """(a's memory over b's, the figures): by exact memory when both rows have it, else by
    peak memory (See Note: which memory)."""
    peak = (
        f"peak memory {names[0]} {a['peak_memory_mb']:.0f} MB vs {names[1]} "
        f"{b['peak_memory_mb']:.0f} MB: {a['peak_memory_mb'] / b['peak_memory_mb']:.2f}x"
    )
    if a.get("exact_memory_mib") and b.get("exact_memory_mib"):
        r = a["exact_memory_mib"] / b["exact_memory_mib"]
        return r, (
            f"by exact memory (params + grads + optimizer state + saved for backward): "
            f"{names[0]} {a['exact_memory_mib']:.0f} MiB vs {names[1]} "
            f"{b['exact_memory_mib']:.0f} MiB: {r:.2f}x; {peak}"
        )
    return a["peak_memory_mb"] / b["peak_memory_mb"], f"by {peak}"


def full_ft_memory(rows: dict, dm_dd: dict) -> dict:
    if miss := _needs(rows, "full", "lora"):
        return miss
    r, fig = _memory(rows["full"], rows["lora"], ("full", "lora"))
    v = HOLDS if r >= SEVERAL * (1 - TOLERANCE["memory"]) else FAILS
    return {"verdict": v, "figures": f"{fig} (several: >= {SEVERAL:g}x)"}


def full_ft_forgets_more(rows: dict, dm_dd: dict) -> dict:
    if miss := _needs(rows, "full", "lora"):
        return miss
    f, lo = rows["full"].get("forgetting"), rows["lora"].get("forgetting")
    if f is None or lo is None:
        return {"verdict": NA, "figures": "no forgetting figure (general-text loss)"}
    sf, sl = ((rows[m].get("spread") or {}).get("forgetting") for m in ("full", "lora"))
    d = differs(f, sf, lo, sl)
    return {
        "verdict": {1: HOLDS, 0: TIE, -1: FAILS}[d],
        "figures": f"Δ general-text loss full {f:+.4f}"
        + (f" ± {sf:.4f}" if sf else "")
        + f" vs lora {lo:+.4f}"
        + (f" ± {sl:.4f}" if sl else ""),
    }


def lora_close_to_full(rows: dict, dm_dd: dict) -> dict:
    if miss := _needs(rows, "full", "lora"):
        return miss
    return {
        "verdict": similar_quality(rows["lora"], rows["full"]),
        "figures": f"{_fmt_q('lora', rows['lora'])} vs {_fmt_q('full', rows['full'])}",
    }


#: the QLoRA row at LoRA's rank, alpha, dropout and targets (registry: compare_equal)
QLORA_EQUAL = "qlora.lora-settings"


def qlora_less_memory(rows: dict, dm_dd: dict) -> dict:
    """Judged at equal adapter settings (the row :data:`QLORA_EQUAL`): the claim is about
    the 4-bit base's storage, not about the preset's r 64 on every layer."""
    if miss := _needs(rows, QLORA_EQUAL, "lora"):
        return miss
    r, fig = _memory(rows[QLORA_EQUAL], rows["lora"], ("qlora", "lora"))
    return {
        "verdict": ratio_verdict(r, 1.0, TOLERANCE["memory"]),
        "figures": f"{fig} (QLoRA at LoRA's rank, alpha and targets)",
    }


def smoothed(curve: list[float]) -> list[float]:
    """The moving average the report plots (window: 1/20 of the run)."""
    w = max(1, len(curve) // 20)
    return [
        sum(curve[max(0, i - w + 1) : i + 1]) / len(curve[max(0, i - w + 1) : i + 1])
        for i in range(len(curve))
    ]


def steps_to(curve: list[float], target: float) -> int | None:
    """The first step (1-based) whose smoothed loss is at most ``target``; None if never."""
    return next((i + 1 for i, v in enumerate(smoothed(curve)) if v <= target), None)


def loraplus_faster(rows: dict, dm_dd: dict) -> dict:
    if miss := _needs(rows, "lora+", "lora"):
        return miss
    base, plus = rows["lora"].get("loss_curve") or [], rows["lora+"].get("loss_curve") or []
    if not base or not plus:
        return {"verdict": NA, "figures": "no loss curve"}
    target = smoothed(base)[-1]
    n_lora, n_plus = steps_to(base, target), steps_to(plus, target)
    fig = (
        f"steps to LoRA's final training loss {target:.3f} (moving average): lora {n_lora}, "
        f"lora+ {n_plus if n_plus else 'never'}; {_fmt_q('lora+', rows['lora+'])} vs "
        f"{_fmt_q('lora', rows['lora'])}"
    )
    if n_plus is None:
        return {"verdict": FAILS, "figures": fig}
    speed = n_lora / n_plus
    v = (
        HOLDS
        if speed > 1 + TOLERANCE["time"]
        else (FAILS if speed < 1 - TOLERANCE["time"] else TIE)
    )
    return {"verdict": v, "figures": fig + f"; {speed:.2f}x as fast"}


def _smaller_at_similar_quality(rows: dict, name: str, max_params: float, faster: bool) -> dict:
    """``name`` has at most ``max_params`` times LoRA's trainable parameters (strictly fewer
    when 1), a quality within the band or better, and (``faster``) a shorter median step."""
    if miss := _needs(rows, name, "lora"):
        return miss
    m, lo = rows[name], rows["lora"]
    pr = m["trainable_params"] / lo["trainable_params"]
    parts = [HOLDS if pr <= max_params and pr < 1 else FAILS, similar_quality(m, lo)]
    fig = f"trainable params {pr:.3f}x LoRA's"
    if faster:
        tr = m["median_step_time_s"] / lo["median_step_time_s"]
        parts.append(ratio_verdict(tr, 1.0, TOLERANCE["time"]))
        fig += f", median step {tr:.2f}x"
    return {
        "verdict": combine(parts),
        "figures": f"{fig}; {_fmt_q(name, m)} vs {_fmt_q('lora', lo)}",
    }


def lorafa_half_params(rows: dict, dm_dd: dict) -> dict:
    return _smaller_at_similar_quality(rows, "lora-fa", HALF, faster=False)


def loradrop_keeps_quality(rows: dict, dm_dd: dict) -> dict:
    return _smaller_at_similar_quality(rows, "lora-drop", 1.0, faster=True)


def adalora_beats_lora(rows: dict, dm_dd: dict) -> dict:
    if miss := _needs(rows, "adalora", "lora"):
        return miss
    a, lo = rows["adalora"], rows["lora"]
    if (
        a.get("final_rank") is not None
        and lo.get("rank") is not None
        and a["final_rank"] != lo["rank"]
    ):
        return {
            "verdict": NA,
            "figures": f"budgets differ: AdaLoRA's final average rank "
            f"{a['final_rank']} vs LoRA's r {lo['rank']}",
        }
    qa, sa = _q(a)
    ql, sl = _q(lo)
    if qa is None or ql is None:
        return {"verdict": NA, "figures": "no quality metric"}
    d = differs(qa, sa, ql, sl)
    return {
        "verdict": {1: HOLDS, 0: TIE, -1: FAILS}[d],
        "figures": f"{_fmt_q('adalora', a)} vs {_fmt_q('lora', lo)} at the same final rank",
    }


def dora_ft_like(rows: dict, dm_dd: dict) -> dict:
    if not all(m in dm_dd for m in ("dora", "lora")):
        return {"verdict": NA, "figures": "no ΔM/ΔD analysis of both dora and lora"}

    def sign(m: str) -> int:  # the correlation's sign, 0 when not significant
        c, n = dm_dd[m]["corr"], dm_dd[m]["layers"]
        z = 1.96 / math.sqrt(max(1, n - 3))  # Fisher: |atanh r| beyond 1.96 SE
        return 0 if abs(math.atanh(max(-0.999999, min(0.999999, c)))) <= z else (1 if c > 0 else -1)

    fig = (
        ", ".join(f"{m} {dm_dd[m]['corr']:+.2f}" for m in ("lora", "dora", "full") if m in dm_dd)
        + f" (corr(ΔD, ΔM) over {dm_dd['dora']['layers']} layers)"
    )
    if sign("lora") <= 0:
        return {"verdict": FAILS, "figures": fig + "; LoRA's is not positive"}
    return {"verdict": {-1: HOLDS, 0: TIE, 1: FAILS}[sign("dora")], "figures": fig}


def s2_attn_cheaper(rows: dict, dm_dd: dict) -> dict:
    s2, full = "long.longlora", "long.longlora.full-attn"
    if miss := _needs(rows, s2, full):
        return miss
    tr = rows[s2]["median_step_time_s"] / rows[full]["median_step_time_s"]
    mr = rows[s2]["peak_memory_mb"] / rows[full]["peak_memory_mb"]
    parts = [ratio_verdict(tr, 1.0, TOLERANCE["time"]), similar_quality(rows[s2], rows[full])]
    return {
        "verdict": combine(parts),
        "figures": f"median step {tr:.2f}x full attention's, peak memory {mr:.2f}x; "
        f"{_fmt_q('S2-Attn', rows[s2])} vs {_fmt_q('full attention', rows[full])} "
        "(evaluated with full attention)",
    }


#: (id, the claim as the literature makes it, its test)
CLAIMS: list[tuple[str, str, Callable[[dict, dict], dict]]] = [
    ("full-memory", "Full fine-tuning needs several times LoRA's memory", full_ft_memory),
    ("full-forgets", "Full fine-tuning forgets more than LoRA", full_ft_forgets_more),
    ("lora-quality", "LoRA's quality is close to full fine-tuning's", lora_close_to_full),
    ("qlora-memory", "QLoRA needs less memory than LoRA", qlora_less_memory),
    ("loraplus-speed", "LoRA+ learns faster than LoRA", loraplus_faster),
    (
        "lorafa-params",
        "LoRA-FA halves the trainable parameters at similar quality",
        lorafa_half_params,
    ),
    (
        "loradrop",
        "LoRA-drop keeps LoRA's quality with fewer parameters and less time",
        loradrop_keeps_quality,
    ),
    ("adalora", "AdaLoRA beats LoRA at the same parameter budget", adalora_beats_lora),
    (
        "dora-dm-dd",
        (
            "DoRA's magnitude/direction updates correlate negatively, like full "
            "fine-tuning's, where LoRA's correlate positively"
        ),
        dora_ft_like,
    ),
    (
        "s2-attn",
        "S2-Attn trains long context at a fraction of full attention's cost with similar quality",
        s2_attn_cheaper,
    ),
]


def verdicts(rows: dict, dm_dd: dict) -> list[dict]:
    """Every claim with its figures and verdict. ``rows``: row name -> figures (see the
    module docstring); ``dm_dd``: method -> {"corr", "layers"}."""
    out = []
    for cid, text, test in CLAIMS:
        res = test(rows, dm_dd)
        out.append({"id": cid, "claim": text, **res})
    return out
