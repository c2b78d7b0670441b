"""The training run: ``lorakit train`` end to end, as one story.

load model -> apply the method -> read and encode data -> (base metrics) -> optimize with
checkpoints -> save adapter -> tuned metrics -> summary. Devices, DDP and mixed precision come
from accelerate (``accelerate launch --num_processes 2 -m lorakit train ...`` runs two
processes; on CPU they talk over gloo).

# Note: the loss is normalized by the global token count
Each micro-batch contributes (sum of its token losses) / (labelled tokens in the whole global
batch) x processes; DDP's gradient mean then gives exactly the token-mean loss of the global
batch, however it is split across processes and accumulation steps. So one process with batch
8 and two processes with batch 4 follow the same curve.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..config import RunConfig
from .data import (IGNORE, StepSampler, build_heldout, collate, encode, heldout_record,
                   read_rows, split_rows)
from ..errors import LorakitError
from .evaluation import (PREDICTIONS, eval_loss, generation_metrics, perplexity,
                       write_predictions)
from .loss import loss_sum

Log = Callable[[str], None]


@dataclass
class Run:
    """Everything a phase of training needs; method hooks (``prepare``) receive it too."""

    cfg: RunConfig
    model: nn.Module
    tokenizer: Any
    accelerator: Any
    dtype: torch.dtype
    train_examples: list[dict]
    valid_examples: list[dict]
    metric_rows: list[dict]  # rows with references for the generation metric (held out)
    fmt: str
    out_dir: Path
    log: Log = print
    hooks: Any = None
    info: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def resolve_precision(precision: str) -> torch.dtype:
    """auto: bf16 on a GPU that has it or a CPU with native bf16 matmuls, else fp32."""
    if precision == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        fast = getattr(torch.backends.mkldnn, "is_available", lambda: False)() and getattr(
            torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return torch.bfloat16 if fast else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Store frozen floating-point weights in the compute dtype (trainables stay fp32)."""
    if dtype == torch.float32:
        return
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool):
    """Recompute activations in backward within the block (transformers' non-reentrant
    checkpointing; ``activation_checkpointing_*`` where transformers has the new name)."""
    if not enabled:
        yield
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        off = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        off = model.gradient_checkpointing_disable
    try:
        yield
    finally:
        off()


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def optimize(run: Run, examples: list[dict], total_steps: int, lr: Optional[float] = None,
             checkpoints: bool = False, desc: str = "train") -> dict:
    """Train ``run.model`` for ``total_steps`` optimizer steps on ``examples``.

    With ``checkpoints`` the run saves every ``train.save_every`` steps and resumes from the
    last checkpoint when ``train.resume`` is set. Returns timing and loss statistics."""
    from tqdm.auto import tqdm

    from .checkpoint import list_checkpoints, load_checkpoint, remove_partial, save_checkpoint
    from .optim import build_optimizer, build_scheduler

    tc, acc, model = run.cfg.train, run.accelerator, run.model
    world = acc.num_processes
    per_step = tc.batch_size * tc.grad_accum * world
    sampler = StepSampler(len(examples), per_step, tc.seed)
    optimizer = build_optimizer(model, lr or tc.lr, tc.weight_decay)
    scheduler = build_scheduler(optimizer, tc.schedule, int(tc.warmup_ratio * total_steps),
                                total_steps)
    ddp_model, optimizer = acc.prepare(model, optimizer)
    start = 0
    metrics_path = run.out_dir / "metrics.jsonl"
    if checkpoints and tc.resume:
        remove_partial(run.out_dir)
        if list_checkpoints(run.out_dir):
            last = list_checkpoints(run.out_dir)[-1]
            start = load_checkpoint(last, model, optimizer, scheduler, run.hooks)["step"]
            run.log(f"resumed from {last} (step {start} of {total_steps})")
        if run.is_main:
            _truncate_metrics(metrics_path, desc, start)
    pad_id = run.tokenizer.pad_token_id
    step_times, tokens_seen, losses = [], 0, []
    bar = tqdm(total=total_steps, initial=start, desc=desc, disable=not run.is_main,
               dynamic_ncols=True)
    model.train()
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        idx = sampler.indices(step)
        n_tokens = sum(sum(1 for t in examples[i]["labels"][1:] if t != IGNORE) for i in idx)
        micro = [idx[(j * world + acc.process_index) * tc.batch_size:
                     (j * world + acc.process_index + 1) * tc.batch_size]
                 for j in range(tc.grad_accum)]
        step_loss = torch.zeros((), device=acc.device)
        for j, mb in enumerate(micro):
            batch = {k: v.to(acc.device) for k, v in collate([examples[i] for i in mb],
                                                             pad_id).items()}
            sync = acc.no_sync(ddp_model) if j < len(micro) - 1 else _null()
            with sync:
                s, _ = loss_sum(ddp_model, batch, model)
                loss = s * world / max(1, n_tokens)
                if run.hooks is not None and hasattr(run.hooks, "regularizer"):
                    reg = run.hooks.regularizer(model)
                    if reg is not None:
                        loss = loss + reg / len(micro)
                acc.backward(loss)
            step_loss += s.detach()
        step_loss = acc.reduce(step_loss, reduction="sum").item() / max(1, n_tokens)
        if not math.isfinite(step_loss):
            raise LorakitError(f"the loss became {step_loss} at step {step + 1}; stopping "
                               "(lower train.lr or use fp32); the last good checkpoint is kept")
        if tc.max_grad_norm:
            acc.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
        optimizer.step()
        if run.hooks is not None and hasattr(run.hooks, "after_optimizer_step"):
            run.hooks.after_optimizer_step(model, step + 1, total_steps)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        step_times.append(dt)
        step_tokens = sum(len(examples[i]["input_ids"]) for i in idx)
        tokens_seen += step_tokens
        losses.append(step_loss)
        lr_now = scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_now:.2e}",
                        tok_s=f"{step_tokens / dt:.0f}")
        bar.update(1)
        done = step + 1
        if run.is_main and (done % tc.log_every == 0 or done == total_steps):
            _append_jsonl(metrics_path, {"phase": desc, "step": done, "loss": step_loss,
                                         "lr": lr_now, "step_time_s": dt, "tokens": tokens_seen})
        if tc.eval_every and done % tc.eval_every == 0 and run.valid_examples and run.is_main:
            vl = eval_loss(model, run.valid_examples, pad_id, dtype=run.dtype)
            _append_jsonl(metrics_path, {"phase": desc, "step": done, "valid_loss": vl})
        if checkpoints and tc.save_every and done % tc.save_every == 0 and done < total_steps:
            if run.is_main:
                save_checkpoint(run.out_dir, done, model, optimizer, scheduler, run.hooks,
                                keep=tc.keep_checkpoints)
            acc.wait_for_everyone()
    bar.close()
    # drop DDP and the autocast wrapper accelerate put on forward; run.model is what we keep
    acc.unwrap_model(ddp_model, keep_fp32_wrapper=False)
    acc.free_memory()
    return {"steps": total_steps - start, "median_step_time_s":
            statistics.median(step_times) if step_times else None,
            "tokens_per_s": tokens_seen / sum(step_times) if step_times else None,
            "final_train_loss": losses[-1] if losses else None,
            "loss_curve": losses}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _truncate_metrics(path: Path, phase: str, step: int) -> None:
    """Drop the lines of ``phase`` after ``step`` (logged by the run that was interrupted)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if row.get("phase") != phase or row.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)


def _append_jsonl(path: Path, obj: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def measure(run: Run, label: str, predictions: Optional[Path] = None) -> dict:
    """Validation loss (and perplexity for plain text), forgetting loss (general text) and
    the generation metrics of run.model; every answer goes to ``predictions`` (JSON lines)."""
    from .data import Rows
    from .tasks import get_task

    model, tok, ec = run.model, run.tokenizer, run.cfg.eval
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    if run.valid_examples:
        out["valid_loss"] = eval_loss(model, run.valid_examples, tok.pad_token_id,
                                      dtype=run.dtype, progress=f"{label}: loss")
        if run.fmt == "text":
            out["valid_perplexity"] = perplexity(out["valid_loss"])
    general = encode(Rows(get_task("general-text").rows("test"), [], "general-text"), tok,
                     "text", run.cfg.data.max_seq_len, train_on_prompt=True)
    out["general_text_loss"] = eval_loss(model, general.examples, tok.pad_token_id,
                                         dtype=run.dtype)
    if ec.metric and run.metric_rows:
        res = generation_metrics(model, tok, run.metric_rows, run.fmt, ec.limit,
                                 ec.batch_size, ec.max_new_tokens, dtype=run.dtype,
                                 progress=f"{label}: answers")
        out.update(res.metrics)
        out["metric"] = ec.metric
        out["generation"] = res.as_dict()
        if predictions is not None:
            write_predictions(predictions, res.predictions)
            out["predictions"] = predictions.name  # beside the run's other files
        if res.cut_note:
            run.log(f"{label}: {res.cut_note} (raise eval.max_new_tokens to let them finish)")
    out["eval_time_s"] = time.perf_counter() - t0
    run.log(f"{label}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items()
                                      if isinstance(v, float) and k != "eval_time_s"))
    return out


def _lock(out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    fh = open(out_dir / ".lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise LorakitError(f"another lorakit run is using {out_dir}; wait for it or choose "
                           "another output_dir") from None
    return fh


def prepare_data(cfg: RunConfig, tokenizer, log: Log) -> tuple[list, list, list, str, dict]:
    """(train examples, valid examples, held-out rows for the metric, format, held-out
    record). The held-out rows are split off before encoding and never trained on; the
    record (``heldout.json`` in the run folder) lets ``lorakit eval`` find them again."""
    dc = cfg.data
    rows = read_rows(dc.train, "train")
    if dc.limit:
        rows.rows = rows.rows[:dc.limit]
    held_lines = None
    if not dc.valid and not dc.train.startswith("task:"):
        kept, held = split_rows(rows.rows, dc.valid_ratio, cfg.train.seed)
        held_lines = [r["_line"] for r in held]
        rows.rows = kept
    enc = encode(rows, tokenizer, dc.format, dc.max_seq_len, dc.train_on_prompt, dc.packing)
    if enc.report():
        log(enc.report())
    record = heldout_record(dc.train, dc.valid, enc.fmt, held_lines)
    valid_ex, metric_rows = build_heldout(record, tokenizer, dc.max_seq_len,
                                          dc.train_on_prompt)
    return enc.examples, valid_ex, metric_rows, enc.fmt, record


def train(cfg: RunConfig, log: Log = print) -> dict:
    """Run a whole training job; returns the summary (also written to summary.json).

    Everything that can be wrong with the input (model, data, adapter config) is found before
    anything is written to ``output_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from .. import inject, models, peft_format
    from ..registry import get_method

    out = Path(cfg.output_dir)
    tc = cfg.train
    if tc.resume and (out / "summary.json").exists():
        log(f"{out} holds a finished run; nothing to resume")
        return json.loads((out / "summary.json").read_text())
    if not tc.resume and ((out / "summary.json").exists() or (out / "checkpoints").exists()):
        raise LorakitError(f"{out} already holds a run; set train.resume=true to continue it "
                           "or choose another output_dir")
    dtype = resolve_precision(tc.precision)
    if dtype == torch.float16 and not torch.cuda.is_available():
        raise LorakitError("train.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps one global state per process; a second in-process run (a notebook,
        # the test suite) may ask for another precision
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    # cpu=True on a machine without CUDA: accelerate then forms a gloo group (MULTI_CPU) when
    # launched with several processes, instead of silently running each one alone.
    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      mixed_precision={torch.float32: "no", torch.bfloat16: "bf16",
                                       torch.float16: "fp16"}[dtype])
    log = log if acc.is_main_process else (lambda *_: None)

    # ---- everything below until the lock only reads and checks ----
    set_seed(tc.seed)
    model, tok = models.load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    train_ex, valid_ex, metric_rows, fmt, heldout = prepare_data(cfg, tok, log)
    per_step = tc.batch_size * tc.grad_accum * acc.num_processes
    StepSampler(len(train_ex), per_step, tc.seed)  # enough data for one step?
    total = tc.max_steps or max(1, math.ceil(tc.epochs * (len(train_ex) // per_step)))
    set_seed(tc.seed)
    full = cfg.adapter.method == "full"
    if not full:
        inject.apply(model, cfg.adapter)

    def run_for(m: nn.Module) -> Run:
        return Run(cfg, m, tok, acc, dtype, train_ex, valid_ex, metric_rows, fmt, out, log)

    lock = _lock(out) if acc.is_main_process else None
    try:
        if acc.is_main_process:
            (out / "config.yaml").write_text(_yaml(cfg))
            _write_json_atomic(out / "heldout.json", heldout)
        model.to(acc.device)
        cast_frozen(model, dtype)  # frozen weights in bf16: the fast path, also for eval
        base_metrics = None
        if cfg.eval.compare_base and acc.is_main_process:
            cached = out / "base_metrics.json"
            if cached.exists():
                base_metrics = json.loads(cached.read_text())
            else:
                with inject.disabled(model):  # the base model's outputs (quantized for QLoRA)
                    base_metrics = measure(run_for(model), "base model",
                                           out / PREDICTIONS["base"])
                _write_json_atomic(cached, base_metrics)
        if full:
            inject.apply(model, cfg.adapter)
        run = run_for(model)
        run.hooks = get_method(cfg.adapter.method).hooks_object()
        if run.hooks is not None and hasattr(run.hooks, "prepare"):
            run.hooks.prepare(run)  # e.g. LoRA-drop's importance phase
            cast_frozen(model, dtype)
        trainable, n_total = inject.count_parameters(model)
        log(f"{cfg.adapter.method}: {trainable:,} trainable of {n_total:,} parameters "
            f"({100 * trainable / n_total:.3f}%), {len(train_ex)} examples, {total} steps, "
            f"{str(dtype).replace('torch.', '')}, {acc.num_processes} process(es)")
        with activation_checkpointing(model, tc.gradient_checkpointing):
            stats = optimize(run, train_ex, total, checkpoints=True)
        summary: dict[str, Any] = {
            "method": cfg.adapter.method, "model": cfg.model,
            "trainable_params": trainable, "total_params": n_total,
            "peak_memory_mb": peak_memory_mb(), "precision": str(dtype).replace("torch.", ""),
            "processes": acc.num_processes, "total_steps": total, **stats, **run.info}
        if run.hooks is not None and hasattr(run.hooks, "summary"):
            summary["method_summary"] = run.hooks.summary(model)
        if acc.is_main_process:
            peft_format.save_adapter(model, out / "adapter", base_model_name_or_path=cfg.model,
                            summary={k: v for k, v in summary.items() if k != "loss_curve"})
            if full:  # a full model folder wants its tokenizer
                tok.save_pretrained(out / "adapter")
            summary["tuned"] = measure(run, "tuned model", out / PREDICTIONS["tuned"])
            summary["base"] = base_metrics
            _write_json_atomic(out / "summary.json", summary)
        acc.wait_for_everyone()
        return summary
    finally:
        if lock is not None:
            lock.close()


def _yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
