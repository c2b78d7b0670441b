"""lorakit vs PEFT vs the frozen-model limit, side by side in one run (`make bench`).

Training step = forward + backward (+ AdamW step and the method's own per-step work) on the
embedded SmolLM2-135M, batch 2 x 256 tokens, r=16 alpha 32 on all seven linear kinds. The
"frozen" limit is the same model with every weight frozen and gradients flowing to the input
embeddings: the work every adapter method must pay. Variants are interleaved (one step of
each per round) so machine drift cancels; medians and ratios are printed.

A variant is ``<library>-<method>`` (or ``frozen``) plus options: ``+fusedloss`` computes the
loss as lorakit's training loop does (lorakit/training/loss.py: no logits tensor; without it,
transformers' own loss), ``+compile`` runs the decoder layers through torch.compile as
``train.compile`` does (lorakit/training/runtime.py), ``+unfolded`` keeps lorakit's A out of
the frozen GEMM (adapters/lora.py, Note: A folded into the frozen GEMM; the default folds
fp32 GEMMs only, so in bf16 the two are the same).

Also in the same run:
- memory you can check: for each method at batch 1 x 1024 tokens, the bytes autograd saves for
  backward and the parameter + gradient + AdamW state bytes (both exact), against the targets;
  and the peak resident memory of a first step in a fresh subprocess (noisy on CPU);
- evaluation throughput: lorakit's answer generation (batched, sorted by length, KV cache)
  against transformers' generate on the same prompts, one prompt at a time and in batches;
- merged-model generation vs the base model, and data collation against the step time.

    python benchmarks/run.py                 # everything (fp32 and bf16), ~30 min on 2 cores
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

import torch

from common import machine, peak_since_mib, reset_peak, steady_allocator
from lorakit.training.memory import state_bytes

VARIANTS = [
    "frozen",
    "frozen+fusedloss",
    "frozen+compile",
    "frozen+fusedloss+compile",
    "lorakit-lora",
    "lorakit-lora+fusedloss",
    "lorakit-lora+fusedloss+compile",
    "peft-lora",
    "lorakit-dora",
    "lorakit-dora+fusedloss+compile",
    "peft-dora",
    "lorakit-lora-fa",
    "lorakit-lora-fa+fusedloss+compile",
    "lorakit-adalora",
    "peft-adalora",
    "lorakit-qlora",
    "peft-qlora",
]
#: the memory table's rows (eager; each the library's own loss, and lorakit's with its loop's)
MEMORY_VARIANTS = [
    "frozen",
    "frozen+fusedloss",
    "lorakit-lora",
    "lorakit-lora+fusedloss",
    "peft-lora",
    "lorakit-lora-fa",
    "lorakit-lora-fa+fusedloss",
    "lorakit-dora",
    "peft-dora",
    "lorakit-adalora",
    "peft-adalora",
    "lorakit-qlora",
    "peft-qlora",
]
BATCH, SEQ, R, ALPHA = 2, 256, 16, 32
MEM_BATCH, MEM_SEQ = 1, 1024  # the memory targets' shape
GIB = 2**30
TOTAL_STEPS = 1000  # AdaLoRA schedule length (the benchmark runs a handful of steps of it)
ROUND_TIMES: dict[str, dict[str, list[float]]] = {}  # every timed step, for --json


def build(variant: str, dtype: torch.dtype, batch: int = BATCH, seq: int = SEQ):
    """(model, step function, optimizer) for one variant; all start from the same base
    weights."""
    import lorakit as lk
    from lorakit.training.loop import cast_frozen
    from lorakit.training.runtime import compiled_layers

    check_variant(variant)
    torch.manual_seed(0)
    model, _ = lk.load_model("smollm2-135m")
    model.config.use_cache = False
    variant, *extras = variant.split("+")
    fused = "fusedloss" in extras  # the training loop's loss (lorakit.training.loss)
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
        if "unfolded" in extras:
            for _, layer in lk.inject.adapter_layers(model):
                layer.fold_a = False
        from lorakit.registry import get_method

        hooks = get_method(lk.inject.state_of(model).config.method).hooks()
    else:
        from peft import AdaLoraConfig, LoraConfig, get_peft_model

        if method == "qlora":
            from lorakit.config import AdapterConfig
            from lorakit.quant import quantize_model

            quantize_model(model, AdapterConfig(quantize="nf4"))
        if method == "adalora":
            cfg = AdaLoraConfig(
                init_r=R,
                target_r=R // 2,
                lora_alpha=ALPHA,
                tinit=10,
                tfinal=10,
                total_step=TOTAL_STEPS,
                target_modules="all-linear",
            )
            peft_adalora = True
        else:
            cfg = LoraConfig(
                r=R, lora_alpha=ALPHA, target_modules="all-linear", use_dora=(method == "dora")
            )
        model = get_peft_model(model, cfg)
    cast_frozen(model, dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW for every variant: lorakit's loop uses it (training/optim.py), and so does
    # transformers' Trainer by default (optim="adamw_torch_fused")
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True) if params else None
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (batch, seq), generator=g)
    state = {"step": 0}
    if "compile" in extras:  # as train.compile does; compiled while `step` lives (a context
        # manager left unreferenced would be collected, and its exit would uncompile)
        state["compiled"] = compiled_layers(model, True)
        state["compiled"].__enter__()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    from lorakit.training.loss import loss_sum

    def step(keep_grads: bool = False):
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
            if not keep_grads:
                opt.zero_grad(set_to_none=True)

    return model, step, opt


def time_steps(variants: list[str], dtype: torch.dtype, rounds: int) -> dict[str, float]:
    built = {}
    for v in variants:
        _, step, _ = built[v] = build(v, dtype)
        step()  # warm-up (kernel selection, allocator; compiling)
        step()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            t = time.perf_counter()
            built[v][1]()
            times[v].append(time.perf_counter() - t)
    ROUND_TIMES[str(dtype)] = times
    return {v: statistics.median(ts) for v, ts in times.items()}


def memory_of(variant: str, dtype: str) -> float:
    """Peak resident MiB of a training step after a warm-up step (which allocates the
    optimizer state and compiles), in a fresh subprocess."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-one", variant, "--dtypes", dtype],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        check=False,
    )
    if out.returncode != 0:
        return float("nan")
    return float(out.stdout.strip().splitlines()[-1])


def _memory_one(variant: str, dtype: torch.dtype) -> None:
    _, step, _ = build(variant, dtype)
    step()
    before = reset_peak()
    step()
    print(f"{peak_since_mib(before):.1f}")


def memory_table(variants: list[str], dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Exact bytes of one training step at MEM_BATCH x MEM_SEQ: saved for backward (the
    model's own parameters left out) and parameter + gradient + optimizer state (after the
    step, gradients kept), in MiB."""
    import gc

    from common import SavedBytes

    out = {}
    for v in variants:
        model, step, opt = build(v, dtype, MEM_BATCH, MEM_SEQ)
        with SavedBytes(exclude=[*model.parameters(), *model.buffers()]) as saved:
            step(keep_grads=True)  # the gradients are counted as state
        out[v] = {"saved_mib": saved.mib, "state_mib": state_bytes(model, opt) / 2**20}
        del model, step, opt
        gc.collect()
    return out


def memory_targets(mem: dict[str, dict[str, float]]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for the memory targets, from the exact figures."""

    def total(v):
        return mem[v]["saved_mib"] + mem[v]["state_mib"]

    rows = []
    if {"lorakit-lora", "peft-lora"} <= mem.keys():
        a, b = total("lorakit-lora"), total("peft-lora")
        rows.append(
            (
                "LoRA <= PEFT LoRA (saved + state, both with transformers' loss)",
                f"{a:.0f} vs {b:.0f} MiB ({a / b:.2f}x)",
                a <= b,
            )
        )
    for v, frozen, limit in (
        ("lorakit-lora+fusedloss", "frozen+fusedloss", 0.5),
        ("lorakit-lora", "frozen", 0.5),
        ("lorakit-lora-fa+fusedloss", "frozen+fusedloss", 0.25),
        ("lorakit-lora-fa", "frozen", 0.25),
    ):
        if {v, frozen} <= mem.keys():
            d = total(v) - total(frozen)
            rows.append(
                (f"{v} <= {frozen} + {limit} GiB", f"+{d / 1024:.3f} GiB", d <= limit * 1024)
            )
    return rows


def eval_throughput(n: int = 64) -> dict[str, float]:
    """Greedy answers to ``n`` held-out prompts of the built-in task, generated tokens per
    second (up to each answer's stop token): lorakit's generate_answers (batches of 32 sorted
    by length, KV cache) vs transformers' generate one prompt at a time and in batches of 32
    in file order, same model (bf16 autocast, as lorakit's evaluation), same stops and cap."""
    import lorakit as lk
    from lorakit.training.data import read_rows
    from lorakit.training.evaluation import (
        autocast_for,
        default_max_new_tokens,
        generate_answers,
        stop_token_ids,
    )
    from lorakit.training.formats import detect_format, prompt_and_answer

    model, tok = lk.load_model("smollm2-135m")
    model.eval()
    rows = read_rows("task:arithmetic", "test").rows[:n]
    pairs = [prompt_and_answer(r, detect_format(r), tok) for r in rows]
    prompts = [p for p, _ in pairs]
    cap = default_max_new_tokens(tok, [a for _, a in pairs])
    stops = stop_token_ids(model, tok)
    dtype = torch.bfloat16

    def answer_tokens(row: list[int]) -> list[int]:
        end = next((k for k, t in enumerate(row) if t in stops), None)
        return row if end is None else row[:end]

    def plain(batch_size: int) -> tuple[int, float, list[str]]:
        side, tok.padding_side = tok.padding_side, "left"
        texts, n_tok, t0 = [], 0, time.perf_counter()
        for s in range(0, len(prompts), batch_size):
            enc = tok(
                prompts[s : s + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            with torch.no_grad(), autocast_for(model, dtype):
                gen = model.generate(
                    **enc,
                    max_new_tokens=cap,
                    do_sample=False,
                    eos_token_id=stops,
                    pad_token_id=tok.pad_token_id,
                )
            for row in gen[:, enc["input_ids"].shape[1] :].tolist():
                body = answer_tokens(row)
                n_tok += len(body)
                texts.append(tok.decode(body, skip_special_tokens=True))
        tok.padding_side = side
        return n_tok, time.perf_counter() - t0, texts

    generate_answers(model, tok, prompts[:4], cap, 4, dtype)  # warm-up
    t0 = time.perf_counter()
    answers = generate_answers(model, tok, prompts, cap, 32, dtype)
    lk_s = time.perf_counter() - t0
    lk_tok = sum(a.n_tokens for a in answers)
    one_tok, one_s, one_txt = plain(1)
    b_tok, b_s, b_txt = plain(32)
    same = sum(a.text == t for a, t in zip(answers, one_txt))
    return {
        "prompts": len(prompts),
        "cap": cap,
        "lorakit_tok_s": lk_tok / lk_s,
        "generate_b1_tok_s": one_tok / one_s,
        "generate_b32_tok_s": b_tok / b_s,
        "lorakit_s": lk_s,
        "generate_b1_s": one_s,
        "generate_b32_s": b_s,
        "same_answers_as_b1": same,
        "tokens": lk_tok,
    }


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
                out = m.generate(
                    ids,
                    max_new_tokens=64,
                    min_new_tokens=64,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            res[name].append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in res.items()}


def collation_share(step_s: float) -> float:
    """Time to read, encode-free collate one training batch of the built-in task, / step."""
    import lorakit as lk
    from lorakit.training.batching import StepSampler, collate
    from lorakit.training.data import encode, read_rows

    _, tok = lk.load_model("smollm2-135m")
    enc = encode(read_rows("task:arithmetic"), tok, "auto", 512)
    sampler = StepSampler(len(enc.examples), 8, 0)
    t = time.perf_counter()
    for s in range(50):
        collate([enc.examples[i] for i in sampler.indices(s)], tok.pad_token_id)
    return (time.perf_counter() - t) / 50 / step_s


def print_step_table(variants: list[str], med: dict[str, float], mem: dict) -> None:
    frozen = med.get("frozen")
    print("| variant | step (s) | x frozen | x frozen+fusedloss | x PEFT | peak MiB |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        peer = "peft-" + v.split("-", 1)[1].split("+")[0] if v.startswith("lorakit-") else None
        vs_f = f"{med[v] / frozen:.3f}" if frozen else "-"
        ff = med.get("frozen+fusedloss")
        vs_ff = f"{med[v] / ff:.3f}" if ff else "-"
        vs_p = f"{med[v] / med[peer]:.2f}" if peer in med else "-"
        m = f"{mem[v]:.0f}" if v in mem else "-"
        print(f"| {v} | {med[v]:.3f} | {vs_f} | {vs_ff} | {vs_p} | {m} |", flush=True)


def print_memory_table(mem: dict[str, dict[str, float]]) -> None:
    print("| variant | saved for backward (MiB) | params + grads + AdamW (MiB) | total (MiB) |")
    print("|---|---|---|---|")
    for v, m in mem.items():
        print(
            f"| {v} | {m['saved_mib']:.1f} | {m['state_mib']:.1f} | "
            f"{m['saved_mib'] + m['state_mib']:.1f} |"
        )
    print("\n| memory target | measured | met |\n|---|---|---|")
    for target, measured, met in memory_targets(mem):
        print(f"| {target} | {measured} | {'yes' if met else 'NO'} |", flush=True)


OPTIONS = ("fusedloss", "compile", "unfolded")
METHODS = {
    "lorakit": ("lora", "dora", "lora-fa", "adalora", "qlora"),
    "peft": ("lora", "dora", "adalora", "qlora"),
}


def check_variant(variant: str) -> None:
    """Exit with one line on a variant :func:`build` would not run as named (an unknown
    option was silently ignored before: the plain variant timed under another name)."""
    name, *extras = variant.split("+")
    kind, _, method = name.partition("-")
    bad = [e for e in extras if e not in OPTIONS]
    if bad or not (name == "frozen" or method in METHODS.get(kind, ())):
        raise SystemExit(
            f"run.py: unknown variant {variant!r} (frozen or "
            f"lorakit-/peft-<method>, options +{', +'.join(OPTIONS)})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--memory-variants", default=",".join(MEMORY_VARIANTS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--no-memory", action="store_true", help="skip the exact memory table")
    ap.add_argument("--no-generation", action="store_true")
    ap.add_argument(
        "--default-allocator",
        action="store_true",
        help="time with glibc's default trimming (see common.steady_allocator)",
    )
    ap.add_argument("--memory-one", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if a.memory_one:
        _memory_one(a.memory_one, dtypes[a.dtypes])
        return
    variants = [v for v in a.variants.split(",") if v]
    for v in [*variants, *(m for m in a.memory_variants.split(",") if m)]:
        check_variant(v)
    alloc = "allocator: defaults" if a.default_allocator else steady_allocator()
    results: dict = {
        "machine": machine(),
        "batch": BATCH,
        "seq": SEQ,
        "r": R,
        "rounds": a.rounds,
        "allocator": alloc,
    }
    print(
        f"# {results['machine']}\n# {alloc}\n# batch {BATCH}x{SEQ}, r={R}, median of "
        f"{a.rounds} interleaved rounds\n",
        flush=True,
    )
    for dname in a.dtypes.split(","):
        med = time_steps(variants, dtypes[dname], a.rounds) if variants else {}
        rss = {} if a.no_rss else {v: memory_of(v, dname) for v in variants}
        results[dname] = {
            "step_s": med,
            "peak_mib": rss,
            "rounds_s": ROUND_TIMES.get(str(dtypes[dname]), {}),
        }
        if variants:
            print(f"## {dname}: training step")
            print_step_table(variants, med, rss)
        if med.get("frozen"):
            print(f"\ncollation: {100 * collation_share(med['frozen']):.2f}% of the frozen step\n")
        if not a.no_memory:
            mem = memory_table(a.memory_variants.split(","), dtypes[dname])
            results[dname]["memory"] = mem
            print(f"## {dname}: memory of one step at batch {MEM_BATCH} x {MEM_SEQ} (exact)")
            print_memory_table(mem)
            print()
    if not a.no_generation:
        ev = eval_throughput()
        results["eval_generation"] = ev
        print(
            f"## evaluation generation ({ev['prompts']} prompts of task:arithmetic, cap "
            f"{ev['cap']} tokens, {ev['tokens']} answer tokens, bf16)\n"
            f"lorakit generate_answers {ev['lorakit_tok_s']:.1f} tok/s "
            f"({ev['lorakit_s']:.1f} s); transformers generate, batch 1: "
            f"{ev['generate_b1_tok_s']:.1f} tok/s ({ev['generate_b1_s']:.1f} s), batch 32 in "
            f"file order: {ev['generate_b32_tok_s']:.1f} tok/s ({ev['generate_b32_s']:.1f} s);"
            f" speed-up vs batch 1 {ev['lorakit_tok_s'] / ev['generate_b1_tok_s']:.2f}x, vs "
            f"batch 32 {ev['lorakit_tok_s'] / ev['generate_b32_tok_s']:.2f}x; answers equal "
            f"to batch 1's: {ev['same_answers_as_b1']}/{ev['prompts']}",
            flush=True,
        )
        gen = generation(a.rounds)
        results["generation_tok_s"] = gen
        print(
            f"merged generation: base {gen['base']:.1f} tok/s, merged {gen['merged']:.1f} "
            f"tok/s, ratio {gen['merged'] / gen['base']:.3f}"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
