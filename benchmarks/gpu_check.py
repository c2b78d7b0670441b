"""The first CUDA run, prepared: one script that checks lorakit's GPU path and prints one table.

Run it where a GPU is (``bash benchmarks/gpu_check.sh``; about 5-8 minutes on one H100/H200
class GPU, the multi-GPU rows only with 2+ GPUs):

- LoRA and DoRA training step in bf16 against PEFT's and the frozen model's (tokens/s, ratios)
  on the embedded model;
- how many operators of one LoRA and one DoRA training step read a device value on the host
  (each a GPU synchronization; DoRA's cancellation check reads one per layer and forward);
- peak memory after loading and after 3 training steps for LoRA and QLoRA on the embedded
  model and on a ~1B Llama config built from random weights (no Hub);
- NF4 dequantization of one 4096x4096 layer on CUDA against the CPU (time, and equal values);
- S2-Attn taking the flash kernel (``sdpa_kernel(FLASH_ATTENTION)`` raises when it cannot);
- ``train.compile`` on DoRA for 3 steps (loss equal to eager within 1e-2 in bf16);
- packed rows against each row alone (``data.packing``): SDPA in fp32, and flash-attention 2
  over one flattened row in bf16 where ``flash_attn`` is installed;
- one DPO micro-batch with the reference from the adapter switched off (ln 2 at B = 0);
- with 2 GPUs: an FSDP2 run over NCCL (``accelerate launch``) of AdaLoRA and LoRA-drop, whose
  masks and layer selection are then compared with one process's.

``--dry-run`` runs every check on the CPU at toy sizes (a tiny random Llama): the test suite
runs it so that the script itself is known to work before a GPU is lent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch

import lorakit as lk
from common import machine

ROWS: list[tuple[str, str, str]] = []  # (check, figure, verdict)


def row(check: str, figure: str, ok: bool | None) -> None:
    ROWS.append((check, figure, "ok" if ok else ("FAIL" if ok is False else "-")))


def device(dry: bool) -> torch.device:
    return torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")


def tiny_llama(dry: bool, big: bool = False):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if dry:
        cfg = LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    elif big:  # ~1.1B parameters (TinyLlama-1.1B's shape), random weights
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
        )
    else:
        return None
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


def base_model(dry: bool):
    model = tiny_llama(dry)
    if model is None:
        model, _ = lk.load_model("smollm2-135m", dtype="bf16", device=device(dry))
    return model.to(device(dry))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def step_tokens_per_s(model, dev, steps: int, batch: int, seq: int) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=dev)
    model.train()
    times = []
    for i in range(steps + 1):
        sync(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(dev)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    times.sort()
    return batch * seq / times[len(times) // 2]


def check_step_speed(dry: bool) -> None:
    from peft import LoraConfig, get_peft_model

    dev = device(dry)
    steps, batch, seq = (2, 2, 32) if dry else (10, 8, 1024)
    results = {}
    frozen = base_model(dry)
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen.get_input_embeddings().weight.requires_grad_(True)  # so backward runs through it
    results["frozen"] = step_tokens_per_s(frozen, dev, steps, batch, seq)
    del frozen
    for method in ("lora", "dora"):
        ours = lk.apply(base_model(dry), method=method, r=16, alpha=32, target_modules="all-linear")
        results[method] = step_tokens_per_s(ours, dev, steps, batch, seq)
        del ours
        theirs = get_peft_model(
            base_model(dry),
            LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=method == "dora"),
        )
        results[f"peft-{method}"] = step_tokens_per_s(theirs, dev, steps, batch, seq)
        del theirs
    for method in ("lora", "dora"):
        r = results["frozen"] / results[method]
        rp = results["frozen"] / results[f"peft-{method}"]
        row(
            f"{method} step, bf16",
            f"{results[method]:.0f} tok/s; {r:.2f}x frozen, PEFT {rp:.2f}x frozen",
            None if dry else results[method] >= results[f"peft-{method}"] * 0.95,
        )


#: operators that read a device value on the host: on a GPU each waits for the GPU to finish
#: the work queued so far (a synchronization)
HOST_READS = (
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.masked_select",
    "aten.equal",
    "aten.unique",
)


def host_reads_per_step(model, dev, batch: int, seq: int) -> int:
    """How many operators of one bf16 forward and backward read a device value on the host
    (:data:`HOST_READS`, or a copy to the CPU), counted at the dispatcher, so on any device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            to_host = (
                func.overloadpacket is torch.ops.aten._to_copy
                and args[0].device.type != "cpu"
                and (kwargs or {}).get("device") == torch.device("cpu")
            )
            if to_host or str(func.overloadpacket) in HOST_READS:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=dev)
    model.train()
    for counted in (False, True):  # the first step warms up (lazy state, caches)
        with Count() if counted else contextlib.nullcontext():
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        # AdamW outside the count: its step counts are host tensors it reads by design
        opt.step()
        opt.zero_grad(set_to_none=True)
    return Count.n


def check_host_reads(dry: bool) -> None:
    """Synchronizations per training step: DoRA's cancellation check reads one value per
    layer and forward (adapters/dora.py); the others should read none."""
    dev = device(dry)
    counts = {}
    for method in ("lora", "dora"):
        model = lk.apply(
            base_model(dry), method=method, r=16, alpha=32, target_modules="all-linear"
        )
        counts[method] = host_reads_per_step(model, dev, 2, 32 if dry else 256)
        del model
    row(
        "host reads per bf16 step (GPU syncs)",
        ", ".join(f"{m} {n}" for m, n in counts.items()),
        None,
    )


def peak_mb(dev) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    from common import status_kib

    return status_kib("VmHWM") / 1024


def reset_peak(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def check_memory(dry: bool) -> None:
    dev = device(dry)
    for name, big in (("embedded", False), ("1B random", True)):
        if dry and big:
            continue
        for quant in (None, "nf4"):
            reset_peak(dev)
            model = tiny_llama(dry, big) if (dry or big) else None
            if model is None:
                model, _ = lk.load_model("smollm2-135m", dtype="bf16", device=dev)
            model = model.to(dev)
            lk.apply(model, method="lora", r=16, target_modules="all-linear", quantize=quant)
            loaded = peak_mb(dev)
            step_tokens_per_s(model, dev, 3, 2 if dry else 4, 32 if dry else 512)
            trained = peak_mb(dev)
            row(
                f"memory {name} {'qlora' if quant else 'lora'}",
                f"after load {loaded:.0f} MiB, after 3 steps {trained:.0f} MiB",
                None,
            )
            del model


def check_nf4(dry: bool) -> None:
    import bitsandbytes.functional as bnbf

    n = 256 if dry else 4096
    w = torch.randn(n, n, dtype=torch.bfloat16)
    out = {}
    for dev in ["cpu"] + ([] if dry or not torch.cuda.is_available() else ["cuda"]):
        q, state = bnbf.quantize_4bit(
            w.to(dev), quant_type="nf4", blocksize=64, compress_statistics=True
        )
        sync(torch.device(dev))
        t0 = time.perf_counter()
        for _ in range(10):
            d = bnbf.dequantize_4bit(q, state)
        sync(torch.device(dev))
        out[dev] = ((time.perf_counter() - t0) / 10, d.float().cpu())
    fig = ", ".join(f"{k} {v[0] * 1e3:.2f} ms" for k, v in out.items())
    same = len(out) == 1 or torch.allclose(out["cpu"][1], out["cuda"][1], atol=1e-2)
    row(f"NF4 dequantize {n}x{n}", fig, same)


def check_flash_s2(dry: bool) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = device(dry)
    model = lk.apply(
        base_model(dry), method="lora", r=8, target_modules=["q_proj", "v_proj"], s2_attn=True
    )
    ids = torch.randint(0, model.config.vocab_size, (1, 64 if dry else 4096), device=dev)
    model.train()
    backend = SDPBackend.MATH if dev.type == "cpu" else SDPBackend.FLASH_ATTENTION
    try:
        with sdpa_kernel(backend), torch.autocast(dev.type, dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        row("S2-Attn on the flash kernel", f"{backend.name}, {ids.shape[1]} tokens", True)
    except RuntimeError as e:
        row("S2-Attn on the flash kernel", f"{backend.name}: {str(e)[:80]}", False)


def check_packing(dry: bool) -> None:
    """Packed rows (data.packing) against each row alone, fp32 logits: SDPA with the mask
    transformers builds from the positions, and flash-attention 2 (varlen over one flattened
    row, bf16) where the flash_attn package is installed."""
    from lorakit.training.batching import collate, model_inputs, pack_rows

    dev = device(dry)
    g = torch.Generator().manual_seed(0)
    lengths = [7, 19, 3, 30, 11] if dry else [70, 190, 30, 300, 110]
    impls = ["sdpa"]
    if not dry:
        try:
            import flash_attn  # noqa: F401  (only whether it is there)

            impls.append("flash_attention_2")
        except ImportError:
            row("packing, flash_attention_2", "flash_attn not installed: not run", None)
    for impl in impls:
        model = base_model(dry)
        model.config._attn_implementation = impl
        dtype = torch.bfloat16 if impl.startswith("flash") else torch.float32
        model = lk.apply(model, method="lora", r=8).to(dev, dtype).eval()
        rows = []
        for n in lengths:
            ids = torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
            rows.append({"input_ids": ids, "labels": ids})
        packs = pack_rows(rows, max(lengths) * 2)
        flat = impl.startswith("flash")
        batch = {k: v.to(dev) for k, v in collate(packs, 0, flat=flat).items()}
        with torch.no_grad():
            logits = model(**model_inputs(batch), use_cache=False).logits.float()
            worst, k, p = 0.0, 0, 0
            for pk in packs:
                for n in pk["lengths"]:
                    seg = batch["input_ids"][p if not flat else 0, k : k + n]
                    alone = model(input_ids=seg[None]).logits[0].float()
                    got = logits[p if not flat else 0, k : k + n]
                    worst = max(worst, (alone - got).abs().max().item())
                    k += n
                if not flat:
                    p, k = p + 1, 0
        tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
        row(
            f"packing, {impl}",
            f"largest logit gap, packed vs alone: {worst:.2e} ({dtype})",
            worst <= tol,
        )


def check_dpo(dry: bool) -> None:
    """One DPO micro-batch on the device: at initialization (B = 0) the policy is its
    reference (the adapter switched off), so the loss is ln 2 and the rewards 0."""
    import math

    from lorakit.config import load_run_config
    from lorakit.training.batching import collate
    from lorakit.training.dpo import DPOObjective

    dev = device(dry)
    model = lk.apply(base_model(dry), method="lora", r=8).to(dev).train()
    g = torch.Generator().manual_seed(1)

    def seq(n: int) -> dict:
        ids = torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
        return {"input_ids": ids, "labels": [-100] * 4 + ids[4:]}

    pairs = [{"chosen": seq(20), "rejected": seq(25)} for _ in range(4)]

    class Run:  # what DPOObjective.micro_loss uses of a training run
        accelerator = type("A", (), {"device": dev})()

        @staticmethod
        def collate(seqs):
            return collate(seqs, 0)

    objective = DPOObjective(load_run_config(None, ["train.objective=dpo"]).dpo)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=not dry):
        s, sums = objective.micro_loss(Run, model, model, pairs)
    (s / len(pairs)).backward()
    loss = s.item() / len(pairs)
    ok = abs(loss - math.log(2)) < 1e-3 and abs(sums[0].item()) < 1e-6
    row("DPO step, reference: adapter off", f"loss {loss:.5f} (ln 2 = 0.69315)", ok)


def check_compile(dry: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        curves = {}
        for compiled in (False, True):
            out = Path(tmp) / f"c{compiled}"
            model = _tiny_dir(Path(tmp)) if dry else "smollm2-135m"
            r = _lorakit(
                [
                    "train",
                    f"model={model}",
                    f"output_dir={out}",
                    "adapter.method=dora",
                    "train.max_steps=3",
                    "train.batch_size=2",
                    "eval.compare_base=false",
                    "eval.metric=null",
                    "data.limit=32",
                    f"train.compile={str(compiled).lower()}",
                    "train.save_every=0",
                    "train.precision=fp32" if dry else "train.precision=bf16",
                ]
            )
            curves[compiled] = (
                [
                    json.loads(x)["loss"]
                    for x in (out / "metrics.jsonl").read_text().splitlines()
                    if '"loss"' in x
                ]
                if r.returncode == 0
                else None
            )
        ok = (
            None not in curves.values()
            and max(abs(a - b) for a, b in zip(curves[False], curves[True])) <= 1e-2
        )
        row("train.compile DoRA 3 steps", f"eager {curves[False]}, compiled {curves[True]}", ok)


def _tiny_dir(root: Path) -> Path:
    d = root / "tiny"
    if not d.exists():
        _, tok = lk.load_model("smollm2-135m")
        from transformers import AutoModelForCausalLM, LlamaConfig

        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
        AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
        tok.save_pretrained(d)
    return d


def _lorakit(args: list[str], launch: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    cmd = [*(launch or [sys.executable]), "-m", "lorakit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)


def check_fsdp_two(dry: bool) -> None:
    gpus = torch.cuda.device_count() if not dry else 0
    if not dry and gpus < 2:
        row("FSDP2 over NCCL, 2 GPUs", "one GPU: not run", None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "fsdp.yaml"
        cfg.write_text(
            "distributed_type: FSDP\nfsdp_config: {fsdp_version: 2}\n"
            f"num_machines: 1\nnum_processes: 2\nuse_cpu: {str(dry).lower()}\n"
            "mixed_precision: 'no'\n"
        )
        launcher = [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--config_file",
            str(cfg),
        ]
        model = str(_tiny_dir(Path(tmp))) if dry else "smollm2-135m"
        for method, extra in (
            (
                "adalora",
                [
                    "adapter.adalora.tinit=0",
                    "adapter.adalora.tfinal=0",
                    "adapter.adalora.delta_t=1",
                ],
            ),
            ("lora-drop", []),
        ):
            summaries = []
            for n, (launch, bs) in enumerate(((None, 4), (launcher, 2))):
                out = Path(tmp) / f"{method}{n}"
                r = _lorakit(
                    [
                        "train",
                        f"model={model}",
                        f"output_dir={out}",
                        f"adapter.method={method}",
                        *extra,
                        "train.max_steps=4",
                        f"train.batch_size={bs}",
                        "eval.compare_base=false",
                        "eval.metric=null",
                        "data.limit=64",
                        "train.save_every=0",
                        "train.precision=fp32",
                    ],
                    launch,
                )
                summaries.append(
                    json.loads((out / "summary.json").read_text())["method_summary"]
                    if r.returncode == 0
                    else {"error": r.stderr[-300:]}
                )
            key = "ranks" if method == "adalora" else "kept"
            same = summaries[0].get(key) == summaries[1].get(key) and key in summaries[0]
            row(
                f"FSDP2 {method}: {key} equal to one process's",
                "equal" if same else str(summaries[1])[:120],
                same,
            )


CHECKS = [
    check_step_speed,
    check_host_reads,
    check_memory,
    check_nf4,
    check_flash_s2,
    check_compile,
    check_packing,
    check_dpo,
    check_fsdp_two,
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="every check on the CPU at toy sizes (what the test suite runs)",
    )
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run to check the script on the CPU")
        return 2
    torch.manual_seed(0)
    t0 = time.perf_counter()
    for check in CHECKS:
        try:
            check(args.dry_run)
        except Exception as e:
            row(check.__name__, f"{type(e).__name__}: {str(e)[:100]}", False)
    print(
        f"# gpu_check{' --dry-run' if args.dry_run else ''}: {machine()}, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    print("| check | figure | verdict |\n|---|---|---|")
    for r in ROWS:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    return 1 if any(r[2] == "FAIL" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
