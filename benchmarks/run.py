"""lorakit vs PEFT vs the frozen-model limit, side by side in one run (`make bench`).

Training step = forward + backward (+ AdamW step and the method's own per-step work) on the
embedded SmolLM2-135M, batch 2 x 256 tokens, r=16 alpha 32 on all seven linear kinds. The
"frozen" limit is the same model with every weight frozen and gradients flowing to the input
embeddings: the work every adapter method must pay. Variants are interleaved (one step of
each per round) so machine drift cancels; medians and ratios are printed. Peak memory comes
from one subprocess per variant. Also: merged-model generation vs the base model, and data
collation against the step time.

    python benchmarks/run.py                 # everything (fp32 and bf16), ~20 min on 2 cores
    python benchmarks/run.py --dtypes bf16 --rounds 5 --variants frozen,lorakit-lora,peft-lora
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine, peak_since_mib, reset_peak

import torch

VARIANTS = ["frozen", "lorakit-lora", "lorakit-lora+fusedloss", "peft-lora", "lorakit-dora", "peft-dora",
            "lorakit-lora-fa", "lorakit-adalora", "peft-adalora", "lorakit-qlora", "peft-qlora"]
BATCH, SEQ, R, ALPHA = 2, 256, 16, 32
TOTAL_STEPS = 1000  # AdaLoRA schedule length (the benchmark runs a handful of steps of it)


def build(variant: str, dtype: torch.dtype):
    """(model, step function) for one variant; all start from the same base weights."""
    import lorakit as lk
    from lorakit.training.loop import cast_frozen

    torch.manual_seed(0)
    model, _ = lk.load_model("smollm2-135m")
    model.config.use_cache = False
    variant, _, extra = variant.partition("+")
    fused = extra == "fusedloss"  # the training loop's loss (lorakit.training.loss): no logits tensor
    kind, _, method = variant.partition("-")
    hooks, peft_adalora = None, False
    if variant == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    elif kind == "lorakit":
        opts = {"method": method, "r": R, "alpha": ALPHA}
        if method == "qlora":
            opts = {"method": "lora", "r": R, "alpha": ALPHA, "quantize": "nf4"}
        if method == "adalora":
            opts["adalora"] = {"init_r": R, "target_r": R // 2, "tinit": 10, "tfinal": 10}
        lk.apply(model, **opts)
        from lorakit.registry import get_method

        hooks = get_method(lk.inject.state_of(model).config.method).hooks()
    else:
        from peft import AdaLoraConfig, LoraConfig, get_peft_model

        if method == "qlora":
            from lorakit.config import AdapterConfig
            from lorakit.quant import quantize_model

            quantize_model(model, AdapterConfig(quantize="nf4"))
        if method == "adalora":
            cfg = AdaLoraConfig(init_r=R, target_r=R // 2, lora_alpha=ALPHA, tinit=10,
                                tfinal=10, total_step=TOTAL_STEPS, target_modules="all-linear")
            peft_adalora = True
        else:
            cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                             use_dora=(method == "dora"))
        model = get_peft_model(model, cfg)
    cast_frozen(model, dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (BATCH, SEQ), generator=g)
    state = {"step": 0}
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    from lorakit.training.loss import loss_sum

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            if fused:
                s, n = loss_sum(model, batch)
                loss = s / n
            else:
                loss = model(input_ids=ids, labels=ids).loss
            if hooks is not None:
                reg = hooks.regularizer(model)
                loss = loss + reg if reg is not None else loss
        loss.backward()
        if opt is not None:
            opt.step()
            state["step"] += 1
            if hooks is not None:
                hooks.after_optimizer_step(model, state["step"], TOTAL_STEPS)
            if peft_adalora:
                model.base_model.update_and_allocate(state["step"])
            opt.zero_grad(set_to_none=True)
    return model, step


def time_steps(variants: list[str], dtype: torch.dtype, rounds: int) -> dict[str, float]:
    built = {}
    for v in variants:
        _, step = built[v] = build(v, dtype)
        step()  # warm-up (kernel selection, allocator)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            t = time.perf_counter()
            built[v][1]()
            times[v].append(time.perf_counter() - t)
    return {v: statistics.median(ts) for v, ts in times.items()}


def memory_of(variant: str, dtype: str) -> float:
    """Peak MiB of one training step, measured in a fresh subprocess."""
    out = subprocess.run([sys.executable, __file__, "--memory-one", variant, "--dtypes", dtype],
                         capture_output=True, text=True, cwd=Path(__file__).parent)
    if out.returncode != 0:
        return float("nan")
    return float(out.stdout.strip().splitlines()[-1])


def _memory_one(variant: str, dtype: torch.dtype) -> None:
    _, step = build(variant, dtype)
    before = reset_peak()  # the first step: later ones reuse the allocator's cached memory
    step()
    print(f"{peak_since_mib(before):.1f}")


def generation(rounds: int) -> dict[str, float]:
    """Greedy tokens/s, batch 1, 64 new tokens: base model vs lorakit LoRA merged into it."""
    import lorakit as lk

    base, tok = lk.load_model("smollm2-135m")
    merged, _ = lk.load_model("smollm2-135m")
    lk.apply(merged, r=R, alpha=ALPHA)
    for _, layer in lk.inject.adapter_layers(merged):
        torch.nn.init.normal_(layer.lora_B, std=0.01)
    lk.unload(merged, merge_adapters=True)
    ids = tok("The history of the river", return_tensors="pt").input_ids
    res: dict[str, list[float]] = {"base": [], "merged": []}
    for m in (base, merged):
        m.eval()
        m.generate(ids, max_new_tokens=8, do_sample=False)
    for _ in range(rounds):
        for name, m in (("base", base), ("merged", merged)):
            t = time.perf_counter()
            with torch.no_grad():
                out = m.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            res[name].append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in res.items()}


def collation_share(step_s: float) -> float:
    """Time to read, encode-free collate one training batch of the built-in task, / step."""
    import lorakit as lk
    from lorakit.training.data import StepSampler, collate, encode, read_rows

    _, tok = lk.load_model("smollm2-135m")
    enc = encode(read_rows("task:arithmetic"), tok, "auto", 512)
    sampler = StepSampler(len(enc.examples), 8, 0)
    t = time.perf_counter()
    for s in range(50):
        collate([enc.examples[i] for i in sampler.indices(s)], tok.pad_token_id)
    return (time.perf_counter() - t) / 50 / step_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-generation", action="store_true")
    ap.add_argument("--memory-one", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if a.memory_one:
        _memory_one(a.memory_one, dtypes[a.dtypes])
        return
    variants = a.variants.split(",")
    results: dict = {"machine": machine(), "batch": BATCH, "seq": SEQ, "r": R, "rounds": a.rounds}
    print(f"# {results['machine']}\n# batch {BATCH}x{SEQ}, r={R}, median of {a.rounds} "
          "interleaved rounds\n", flush=True)
    for dname in a.dtypes.split(","):
        med = time_steps(variants, dtypes[dname], a.rounds)
        mem = {} if a.no_memory else {v: memory_of(v, dname) for v in variants}
        results[dname] = {"step_s": med, "peak_mib": mem}
        frozen = med.get("frozen")
        print(f"## {dname}\n| variant | step (s) | x frozen | x PEFT | peak MiB |")
        print("|---|---|---|---|---|")
        for v in variants:
            peer = "peft-" + v.split("-", 1)[1].split("+")[0] if v.startswith("lorakit-") else None
            vs_f = f"{med[v] / frozen:.2f}" if frozen else "-"
            vs_p = f"{med[v] / med[peer]:.2f}" if peer in med else "-"
            m = f"{mem[v]:.0f}" if v in mem else "-"
            print(f"| {v} | {med[v]:.3f} | {vs_f} | {vs_p} | {m} |", flush=True)
        if frozen:
            print(f"\ncollation: {100 * collation_share(frozen):.2f}% of the frozen step\n")
    if not a.no_generation:
        gen = generation(a.rounds)
        results["generation_tok_s"] = gen
        print(f"generation: base {gen['base']:.1f} tok/s, merged {gen['merged']:.1f} tok/s, "
              f"ratio {gen['merged'] / gen['base']:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
