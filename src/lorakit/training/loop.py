"""The training run: ``lorakit train`` end to end, as one story.

load model -> read and encode data -> apply the method -> (base metrics) -> the method's
``prepare`` hook -> optimize with checkpoints -> save adapter -> tuned metrics -> summary.
Devices, DDP and mixed precision come from accelerate (``accelerate launch --num_processes 2
-m lorakit train ...`` runs two processes; on CPU they talk over gloo). The loop names no
method: what a method does beyond its layers it does through its
:class:`~lorakit.adapters.base.MethodHooks`.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import broadcast, set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .. import inject, models, peft_format
from ..adapters.base import MethodHooks
from ..config import RunConfig
from ..errors import LorakitError
from ..faults import kill_point
from ..files import atomic_dir, check_output, file_errors, read_json, write_json, write_text
from ..quant import compute_dtype_of
from ..registry import get_method
from .batching import (
    Layout,
    StepSampler,
    arrange,
    decide_layout,
    fingerprint,
    micro_batch,
    micro_batch_tokens,
)
from .checkpoint import (
    foreign_checkpoints,
    list_checkpoints,
    load_checkpoint,
    remove_partial,
    save_checkpoint,
    stopped_by_files,
)
from .data import (
    Encoded,
    build_heldout,
    encode,
    heldout_limits,
    heldout_record,
    merge_records,
    read_rows,
    remap,
    split_rows,
    weighted,
)
from .distributed import (
    Strategy,
    any_process,
    clip_grad_norm_,
    load_whole,
    process_bytes,
    requires_gradient_sync,
    reshard,
    resolve_strategy,
    sync_replicated_grads,
    whole_parameters,
)
from .dpo import REFERENCE_FILE, can_disable, precompute_reference
from .evaluation import PREDICTIONS, HeldOut, Share, eval_loss, measure
from .memory import run_exact_memory
from .objective import SFTObjective, make_objective
from .optim import build_optimizer, build_scheduler
from .preference import PREFERENCE, encode_pairs
from .runtime import (
    AUTO_PROBE_STEPS,
    PeakMemory,
    activation_checkpointing,
    cast_frozen,
    compile_decision,
    compile_error_reason,
    compiled_layers,
    dtype_name,
    is_compile_error,
    make_accelerator,
    resolve_precision,
    tracker_config,
)
from .session import ModelBuild

Log = Callable[[str], None]


@dataclass
class Run:
    """Everything a phase of training needs. A method's ``prepare`` hook receives it too and
    uses its services (:meth:`train_phase`, :meth:`batches`, :meth:`reduce_sum`) instead of
    importing the loop."""

    cfg: RunConfig
    model: nn.Module
    tokenizer: Any
    accelerator: Any
    dtype: torch.dtype
    train_examples: list[dict]
    heldout: HeldOut
    out_dir: Path
    log: Log = print
    hooks: MethodHooks = field(default_factory=MethodHooks)
    strategy: Strategy = field(default_factory=lambda: Strategy("single", 1))
    #: rebuilds the model for :meth:`edit_parameters` under FSDP (:meth:`ModelBuild.rebuild`)
    rebuild: Callable[..., tuple[nn.Module, Any]] | None = None
    #: how the training rows became sequences (``data.packing``; batching.py)
    layout: Layout = field(default_factory=lambda: Layout("padded", "false", "not packed"))
    #: what a step minimizes (``train.objective``; objective.py)
    objective: Any = field(default_factory=SFTObjective)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def share(self) -> Share:
        """This process's part of an evaluation (See evaluation.Share)."""
        acc = self.accelerator
        return Share(acc.process_index, acc.num_processes, lockstep=self.strategy.fsdp)

    def edit_parameters(self, edit: Callable[[nn.Module], Any]) -> Any:
        """Run ``edit(model)``, which may replace adapter Parameters (LoRA-drop's sharing), and
        return its result. Under FSDP a sharded model's Parameters cannot be replaced, so the
        model is built again around the trained values, edited whole, then sharded (the
        random state of the edit is this process's as it was at the call)."""
        if not self.strategy.fsdp:
            return edit(self.model)
        self.model, result = self.rebuild(self.model, edit)
        return result

    @property
    def examples_per_step(self) -> int:
        tc = self.cfg.train
        return tc.batch_size * tc.grad_accum * self.accelerator.num_processes

    @property
    def resuming(self) -> bool:
        """True when this run continues an interrupted one (``train.resume`` + a checkpoint)."""
        return self.cfg.train.resume and bool(list_checkpoints(self.out_dir))

    def train_phase(self, examples: list[dict], steps: int, desc: str) -> dict:
        """Optimize the model on ``examples`` for ``steps`` steps (no checkpoints): a method's
        preliminary phase, e.g. LoRA-drop's sample."""
        with activation_checkpointing(self.model, self.cfg.train.gradient_checkpointing):
            return optimize(self, examples, steps, desc=desc)

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """One micro-batch of ``examples`` as the run's layout makes it (batching.micro_batch)."""
        return micro_batch(examples, self.layout, self.tokenizer.pad_token_id)

    def sequences(self, examples: list[dict]) -> list[dict]:
        """The token sequences of ``examples`` (a DPO pair has two)."""
        return [seq for e in examples for seq in self.objective.sequences(e)]

    def sampler(self, examples: list[dict]) -> StepSampler:
        """The run's step sampler over ``examples`` (length-grouped with
        ``data.group_by_length``)."""
        lengths = None
        if self.cfg.data.group_by_length:
            lengths = [sum(len(s["input_ids"]) for s in self.sequences([e])) for e in examples]
        return StepSampler(len(examples), self.examples_per_step, self.cfg.train.seed, lengths)

    def step_tokens(self, examples: list[dict], idx: list[int]) -> tuple[int, int]:
        """(tokens the model processes, of which are rows' tokens) in the global batch
        ``idx``, over every process's micro-batches."""
        bs, total, real = self.cfg.train.batch_size, 0, 0
        for k in range(0, len(idx), bs):
            mb = self.sequences([examples[i] for i in idx[k : k + bs]])
            t, r = micro_batch_tokens(mb, self.layout)
            total, real = total + t, real + r
        return total, real

    def batches(self, examples: list[dict]):
        """This process's share of ``examples``, collated and on the device. Under FSDP every
        process runs as many batches (each forward is a collective): a process with fewer
        gets a repeat marked ``repeat: True``, whose result a caller drops."""
        bs, acc = self.cfg.train.batch_size, self.accelerator
        starts = list(range(0, len(examples), bs))
        for k in self.share.batches(len(starts)):
            i = starts[k if k is not None else 0]
            part = self.sequences(examples[i : i + bs])
            b = {key: v.to(acc.device) for key, v in self.collate(part).items()}
            yield {**b, "repeat": True} if k is None else b

    def reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the processes."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=acc.device)
        return acc.reduce(t, reduction="sum").tolist()


# ---- optimization ---------------------------------------------------------------------------


class BestTracker:
    """The validation loss of the main training, every ``train.eval_every`` steps: the best so
    far, early stopping after ``train.early_stopping_patience`` evaluations without an
    improvement, and with ``train.keep_best`` the best weights (``<out>/best/``, restored
    when training ends). Its state travels in checkpoints, so a resumed run decides the same."""

    BEST = "best"

    def __init__(self, run: Run, state: dict | None = None):
        self.run = run
        s = (state or {}).get("best") or {}
        self.loss: float | None = s.get("loss")
        self.step: int | None = s.get("step")
        self.bad: int = s.get("bad", 0)

    def state(self) -> dict:
        return {"best": {"loss": self.loss, "step": self.step, "bad": self.bad}}

    def update(self, step: int, valid_loss: float | None) -> bool:
        """Record an evaluation (``valid_loss`` is None on the other processes); True when
        training should stop, the same answer on every process."""
        run, tc = self.run, self.run.cfg.train
        stop = 0.0
        better = valid_loss is not None and (self.loss is None or valid_loss < self.loss)
        if tc.keep_best and any_process(better and run.is_main, run.accelerator.device):
            with whole_parameters(run.model) as holder:  # gathered under FSDP
                if holder:
                    with atomic_dir(run.out_dir / self.BEST) as tmp:
                        save_file(
                            {
                                n: p.detach().cpu().contiguous()
                                for n, p in run.model.named_parameters()
                                if p.requires_grad
                            },
                            str(tmp / "trainable.safetensors"),
                        )
        if run.is_main and valid_loss is not None:
            if better:
                self.loss, self.step, self.bad = valid_loss, step, 0
            else:
                self.bad += 1
            pat = tc.early_stopping_patience
            if pat and self.bad >= pat:
                run.log(
                    f"early stopping at step {step}: no better validation loss in {pat} "
                    f"evaluations (best {self.loss:.4f} at step {self.step})"
                )
                stop = 1.0
        flag = torch.tensor([stop], device=run.accelerator.device)
        if run.accelerator.num_processes > 1:
            flag = broadcast(flag, from_process=0)
        return bool(flag.item())

    def restore(self, last_step: int) -> None:
        """Load the best weights (``train.keep_best``) on every process (the main one saved
        them); a no-op change when the last step was the best."""
        run = self.run
        run.accelerator.wait_for_everyone()
        path = run.out_dir / self.BEST / "trainable.safetensors"
        if not path.exists():
            return
        best = load_file(str(path))
        load_whole({n: p for n, p in run.model.named_parameters() if p.requires_grad}, best)
        if self.step is not None and self.step != last_step:
            run.log(
                f"kept the best weights: step {self.step} (validation loss "
                f"{self.loss:.4f}), not the last step's ({last_step})"
            )


def optimize(
    run: Run, examples: list[dict], total_steps: int, checkpoints: bool = False, desc: str = "train"
) -> dict:
    """Train ``run.model`` for ``total_steps`` optimizer steps on ``examples``.

    With ``checkpoints`` the run saves every ``train.save_every`` steps and resumes from the
    last checkpoint when ``train.resume`` is set. Returns timing and loss statistics."""
    tc, acc, model = run.cfg.train, run.accelerator, run.model
    sampler = run.sampler(examples)
    if run.strategy.fsdp:  # See Note: reshard before building the optimizer (distributed.py)
        reshard(model)
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay)
    scheduler = build_scheduler(
        optimizer, tc.schedule, int(tc.warmup_ratio * total_steps), total_steps
    )
    if run.strategy.fsdp:  # sharded by shard_model already; autocast comes from the step
        ddp_model = model
    else:
        ddp_model, optimizer = acc.prepare(model, optimizer)
    state = _resume(run, optimizer, scheduler, total_steps, desc) if checkpoints else {}
    start = state.get("step", 0)
    # the sequences the batches are drawn from (rows, or packs of rows): a resumed run must
    # draw from the same ones to continue at the same row
    sequences = fingerprint(run.sequences(examples))
    if state.get("sequences", sequences) != sequences:
        raise LorakitError(
            f"{run.out_dir}'s checkpoint was trained on other sequences (the data, its "
            "encoding or its packing changed); resume with the same data and settings or "
            "choose another output_dir"
        )
    tracker = (
        BestTracker(run, state)
        if checkpoints and (tc.keep_best or tc.early_stopping_patience)
        else None
    )
    times, losses, tokens_seen, tokens_processed = [], [], 0, 0
    done = start
    bar = tqdm(
        total=total_steps, initial=start, desc=desc, disable=not run.is_main, dynamic_ncols=True
    )
    model.train()
    compiled = contextlib.ExitStack()  # See Note: compiling the decoder layers (runtime.py)
    layers = compiled.enter_context(compiled_layers(model, tc.compile is True, run.log))
    auto = _AutoCompile(run, total_steps - start) if tc.compile == "auto" else None
    try:
        for step in range(start, total_steps):
            t0 = time.perf_counter()
            idx = sampler.indices(step)
            try:
                loss, metrics = _optimizer_step(
                    run, ddp_model, optimizer, scheduler, examples, idx, step, total_steps
                )
            except Exception as exc:
                if not layers or not is_compile_error(exc):
                    raise
                if acc.num_processes > 1:
                    # the other processes are inside the step's collectives: a retry here
                    # alone would pair this process's collectives with theirs wrongly
                    raise LorakitError(
                        f"train.compile failed ({compile_error_reason(exc)}); "
                        "with several processes lorakit does not fall back to "
                        "eager training: set train.compile=false (the last "
                        "good checkpoint is kept)"
                    ) from None
                run.log(
                    f"warning: train.compile failed ({compile_error_reason(exc)}); training eagerly"
                )
                compiled.close()
                layers = []
                optimizer.zero_grad(set_to_none=True)  # it failed before optimizer.step()
                loss, metrics = _optimizer_step(
                    run, ddp_model, optimizer, scheduler, examples, idx, step, total_steps
                )
            dt = time.perf_counter() - t0
            processed, step_tokens = run.step_tokens(examples, idx)
            times.append(dt)
            if auto is not None and auto.decide(times, total_steps - step - 1):
                layers = compiled.enter_context(compiled_layers(model, True, run.log))
            losses.append(loss)
            tokens_seen += step_tokens
            tokens_processed += processed
            lr = scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{step_tokens / dt:.0f}")
            bar.update(1)
            done = step + 1
            vl = _log_step(
                run,
                desc,
                done,
                total_steps,
                {
                    "loss": loss,
                    "lr": lr,
                    "step_time_s": dt,
                    "tokens": tokens_seen,
                    "pad_fraction": 1 - step_tokens / max(1, processed),
                    "real_tokens_per_s": step_tokens / dt,
                    **metrics,
                },
            )
            stop = (
                tracker is not None
                and tc.eval_every
                and done % tc.eval_every == 0
                and tracker.update(done, vl)
            )
            kill_point("after-step", done)  # tests only (lorakit.faults)
            if checkpoints and not stop:
                _maybe_checkpoint(
                    run,
                    done,
                    total_steps,
                    optimizer,
                    scheduler,
                    {**(tracker.state() if tracker else {}), "sequences": sequences},
                )
            if stop:
                break
    finally:
        compiled.close()
        bar.close()  # its line ended: an error message starts a line of its own
    best = {}
    if tracker is not None:
        if tc.keep_best:
            tracker.restore(done)
        best = {
            "best_step": tracker.step,
            "best_valid_loss": tracker.loss,
            "stopped_at": done if done < total_steps else None,
        }
    # drop DDP and the autocast wrapper accelerate put on forward; run.model is what we keep
    if not run.strategy.fsdp:
        acc.unwrap_model(ddp_model, keep_fp32_wrapper=False)
    run.process_bytes = process_bytes(model, optimizer)
    acc.free_memory()
    # "compiled": what ran (not when compiling failed and the run fell back to eager)
    return {
        "steps": done - start,
        **best,
        "compiled": bool(layers),
        "median_step_time_s": statistics.median(times) if times else None,
        "tokens_per_s": tokens_seen / sum(times) if times else None,
        # the rows' own tokens per second (the same figure as tokens_per_s), and the share
        # of what the model processed that was padding
        "real_tokens_per_s": tokens_seen / sum(times) if times else None,
        "pad_fraction": 1 - tokens_seen / tokens_processed if tokens_processed else None,
        "train_time_s": sum(times),
        "train_tokens": tokens_seen,
        "final_train_loss": losses[-1] if losses else None,
        "loss_curve": losses,
    }


class _AutoCompile:
    """``train.compile: auto`` in the loop: decides once, after the probe steps, and logs the
    choice (See Note: train.compile: auto, in runtime.py)."""

    def __init__(self, run: Run, steps: int):
        self.run, self.choice = run, False
        on, why = compile_decision(run.accelerator.device, run.dtype, run.accelerator.num_processes)
        self.pending = on is None and steps > AUTO_PROBE_STEPS
        if not self.pending:
            run.log(f"train.compile auto: eager ({why or 'too few steps to time'})")

    def decide(self, times: list[float], steps_left: int) -> bool:
        """True when the layers should be compiled from the next step on."""
        if not self.pending or len(times) < AUTO_PROBE_STEPS:
            return False
        self.pending = False
        on, why = compile_decision(
            self.run.accelerator.device,
            self.run.dtype,
            self.run.accelerator.num_processes,
            statistics.median(times[1:]),
            steps_left,
        )
        self.run.log(f"train.compile auto: {'compiled' if on else 'eager'} ({why})")
        self.choice = bool(on)
        return self.choice


def _optimizer_step(
    run: Run,
    ddp_model: nn.Module,
    optimizer,
    scheduler,
    examples: list[dict],
    idx: list[int],
    step: int,
    total_steps: int,
) -> tuple[float, dict]:
    """One optimizer step over the global batch ``idx`` (See Note: the loss is normalized by
    the global token count); returns the batch's mean loss (per token for SFT, per pair for
    DPO) and the objective's metrics (DPO's rewards) over the batch."""
    tc, acc, model, objective = run.cfg.train, run.accelerator, run.model, run.objective
    world = acc.num_processes
    n_tokens = objective.count([examples[i] for i in idx])
    micro = [
        idx[
            (j * world + acc.process_index) * tc.batch_size : (j * world + acc.process_index + 1)
            * tc.batch_size
        ]
        for j in range(tc.grad_accum)
    ]
    fsdp = run.strategy.fsdp
    step_loss = torch.zeros((), device=acc.device)
    sums = torch.zeros(len(objective.metrics), dtype=torch.float64, device=acc.device)
    for j, mb in enumerate(micro):
        last = j == len(micro) - 1
        if fsdp:  # FSDP2: reduce-scatter the gradients on the last micro-batch only
            requires_gradient_sync(model, last)
        sync = acc.no_sync(ddp_model) if not last and not fsdp else contextlib.nullcontext()
        with sync:
            # DDP: accelerate's wrapper runs forward under autocast; FSDP: done here
            with acc.autocast() if fsdp else contextlib.nullcontext():
                s, stats = objective.micro_loss(run, ddp_model, model, [examples[i] for i in mb])
            loss = s * world / max(1, n_tokens)
            # outside autocast under every strategy (AdaLoRA's ||AAᵀ - I|| in fp32: in bf16
            # its diagonal 1 - 1 would keep 8 bits)
            reg = run.hooks.regularizer(model)
            if reg is not None:
                loss = loss + reg / len(micro)
            acc.backward(loss)
        step_loss += s.detach()
        if stats is not None:
            sums += stats.to(sums.device)
    if fsdp:
        sync_replicated_grads(model)
    value = acc.reduce(step_loss, reduction="sum").item() / max(1, n_tokens)
    if len(sums) and world > 1:
        sums = acc.reduce(sums, reduction="sum")
    metrics = dict(zip(objective.metrics, (sums / max(1, n_tokens)).tolist()))
    if not math.isfinite(value):
        raise LorakitError(
            f"the loss became {value} at step {step + 1}; stopping "
            "(lower train.lr or use fp32); the last good checkpoint is kept"
        )
    if tc.max_grad_norm:
        if fsdp:
            clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tc.max_grad_norm)
        else:
            acc.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
    optimizer.step()
    run.hooks.after_optimizer_step(model, step + 1, total_steps)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return value, metrics


def _resume(run: Run, optimizer, scheduler, total_steps: int, phase: str) -> dict:
    """The state to start from: {} (step 0), or the last checkpoint's state.json when
    ``train.resume`` is set."""
    if not run.cfg.train.resume:
        return {}
    remove_partial(run.out_dir)
    state: dict = {}
    if list_checkpoints(run.out_dir):
        last = list_checkpoints(run.out_dir)[-1]
        state = load_checkpoint(
            last, run.model, optimizer, scheduler, run.hooks, rank=run.accelerator.process_index
        )
        run.log(f"resumed from {last} (step {state['step']} of {total_steps})")
        if state.get("processes", run.accelerator.num_processes) != run.accelerator.num_processes:
            run.log(
                f"note: the checkpoint was written by {state['processes']} process(es) and "
                f"this run has {run.accelerator.num_processes}: the weights and optimizer "
                "state continue exactly, the remaining batches are drawn for the new "
                "global batch size"
            )
    if run.is_main:
        _truncate_metrics(run.out_dir / "metrics.jsonl", phase, state.get("step", 0))
    return state


def _log_step(run: Run, phase: str, done: int, total: int, row: dict) -> float | None:
    """metrics.jsonl: a line every ``train.log_every`` steps, validation loss every
    ``train.eval_every`` steps (returned; None when not measured or not the main process)."""
    tc, path = run.cfg.train, run.out_dir / "metrics.jsonl"
    if run.is_main and (done % tc.log_every == 0 or done == total):
        _append_jsonl(path, {"phase": phase, "step": done, **row})
        _track(run, phase, done, row)
    if tc.eval_every and done % tc.eval_every == 0 and run.heldout.valid_examples:
        # every process evaluates its share (See evaluation.Share): none waits for another
        vl = eval_loss(
            run.model,
            run.heldout.valid_examples,
            run.tokenizer.pad_token_id,
            dtype=run.dtype,
            share=run.share,
        )
        if not run.is_main:
            return None
        _append_jsonl(path, {"phase": phase, "step": done, "valid_loss": vl})
        _track(run, phase, done, {"valid_loss": vl})
        return vl
    return None


def _track(run: Run, phase: str, step: int, row: dict) -> None:
    """The numbers of ``row`` to the trackers of ``train.report_to`` (as ``phase/key``)."""
    if run.cfg.train.report_to:
        run.accelerator.log(
            {
                f"{phase}/{k}": v
                for k, v in row.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            },
            step=step,
        )


def _maybe_checkpoint(
    run: Run, done: int, total: int, optimizer, scheduler, extra: dict | None = None
) -> None:
    tc = run.cfg.train
    if tc.save_every and done % tc.save_every == 0 and done < total:
        # every process takes part (the gathers of a sharded model); the first one writes
        save_checkpoint(
            run.out_dir,
            done,
            run.model,
            optimizer,
            scheduler,
            run.hooks,
            keep=tc.keep_checkpoints,
            extra=extra,
            rank=run.accelerator.process_index,
            world=run.accelerator.num_processes,
        )
        run.accelerator.wait_for_everyone()


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


# ---- data and the base model ----------------------------------------------------------------


def prepare_data(cfg: RunConfig, tokenizer, log: Log) -> tuple[list[dict], HeldOut, dict]:
    """(train examples, one per row, not yet packed: see :func:`layout_examples`; held-out
    rows; held-out record). The held-out rows are split off before encoding and never
    trained on; the record (``heldout.json`` in the run folder)
    lets ``lorakit eval`` find them again."""
    dc = cfg.data
    files = dc.train_files
    mapping = {"columns": dc.columns, "roles": dc.roles} if dc.columns or dc.roles else None
    examples, records, fmt = [], [], None
    for spec, weight in zip(files, dc.weights or [1.0] * len(files)):
        rows = remap(read_rows(spec, "train", dc.max_seq_len), dc.columns, dc.roles)
        if dc.limit:
            rows.rows = rows.rows[: dc.limit]
        held_lines = None
        if not dc.valid and not spec.startswith("task:"):
            kept, held = split_rows(rows.rows, dc.valid_ratio, cfg.train.seed)
            held_lines = [r["_line"] for r in held]
            rows.rows = kept
        if cfg.train.objective == "dpo":
            max_len, truncation = heldout_limits(cfg, PREFERENCE)
            pairs, kept, skipped = encode_pairs(rows, tokenizer, max_len, truncation)
            enc = Encoded(pairs, PREFERENCE, kept, skipped, rows.source)
        else:
            enc = encode(
                rows, tokenizer, dc.format, dc.max_seq_len, dc.loss_on, truncation=dc.truncation
            )
        if enc.report():
            log(enc.report())
        if fmt is not None and enc.fmt != fmt:
            raise LorakitError(
                f"data.train: {files[0]} is in format {fmt!r} and {spec} in "
                f"{enc.fmt!r}; files trained together must share one format"
            )
        fmt = enc.fmt
        examples += weighted(enc.examples, weight, cfg.train.seed)
        records.append(heldout_record(spec, dc.valid, enc.fmt, held_lines, mapping))
    record = records[0] if len(records) == 1 or dc.valid else merge_records(records)
    max_len, truncation = heldout_limits(cfg, fmt)
    valid, metric_rows, pairs = build_heldout(record, tokenizer, max_len, dc.loss_on, truncation)
    return examples, HeldOut(valid, metric_rows, fmt, pairs, cfg.dpo.beta), record


def layout_examples(
    cfg: RunConfig, model: nn.Module, examples: list[dict], log: Log, objective=None
) -> tuple[list[dict], Layout]:
    """The training sequences of ``examples`` as ``data.packing`` asks for ``model`` and the
    method (batching.decide_layout), and the layout with its counts; logs what ran and why."""
    dc, objective = cfg.data, objective or SFTObjective()
    layout = decide_layout(dc.packing, model, cfg.adapter.s2_attn, cfg.train.objective)
    seqs = arrange(examples, layout, dc.max_seq_len, cfg.train.seed)
    tokens = sum(len(s["input_ids"]) for e in seqs for s in objective.sequences(e))
    layout = layout.counted(len(examples), len(seqs), tokens, dc.max_seq_len)
    log(f"data: {layout.describe()}")
    return seqs, layout


def base_metrics(
    cfg: RunConfig,
    model: nn.Module,
    tokenizer,
    heldout: HeldOut,
    dtype: torch.dtype,
    out: Path,
    log: Log,
    share: Share | None = None,
) -> dict:
    """The base model's figures, measured once per run folder (``base_metrics.json``).

    A model with an adapter is measured with the adapter disabled (so QLoRA's base is its
    4-bit model); a method that wraps no layers is measured before it is applied."""
    cached = out / "base_metrics.json"
    if cached.exists():
        return json.loads(cached.read_text())
    adapted = getattr(model, "lorakit_state", None) is not None
    with inject.disabled(model) if adapted else contextlib.nullcontext():
        metrics = measure(
            model,
            tokenizer,
            heldout,
            cfg.eval,
            cfg.data.max_seq_len,
            dtype,
            "base model",
            log,
            out / PREDICTIONS["base"],
            share,
        )
    if share is None or share.rank == 0:
        write_json(cached, metrics)
    return metrics


# ---- the run --------------------------------------------------------------------------------


def train(cfg: RunConfig, log: Log = print) -> dict:
    """Run a whole training job; returns the summary (also written to summary.json).

    Everything that can be wrong with the input (model, data, adapter config) is found before
    anything is written to ``output_dir``."""
    cfg = _objective_settings(cfg)
    out, tc = Path(cfg.output_dir), cfg.train
    check_output(out, "output_dir")  # an existing file, a folder that cannot be created
    if (out / ".lock").exists():
        _lock(out).close()  # another run using the folder is the first thing to say
    finished = _finished_run(cfg, out, log)
    if finished is not None:
        return finished
    dtype = resolve_precision(tc.precision)
    acc = make_accelerator(dtype, tuple(tc.report_to), out)
    strategy = resolve_strategy(tc.distributed, acc.num_processes)
    log = log if acc.is_main_process else (lambda *_: None)
    peak = PeakMemory()

    # ---- everything below until the lock only reads and checks ----
    method = get_method(cfg.adapter.method)
    build = ModelBuild(cfg, strategy, dtype, acc.device, acc.process_index)
    build.files_ready()
    model, tok = build.load()
    objective = make_objective(cfg)
    if objective.name == "dpo" and cfg.dpo.disable_dropout:
        for m in model.modules():  # the model's own dropout (TRL's disable_dropout)
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    train_ex, heldout, record = prepare_data(cfg, tok, log)
    train_ex, layout = layout_examples(cfg, model, train_ex, log, objective)
    per_step = tc.batch_size * tc.grad_accum * acc.num_processes
    unit = "packed sequences" if layout.sequences != layout.rows else "examples"
    StepSampler(len(train_ex), per_step, tc.seed, unit=unit)  # enough data for one step?
    total = tc.max_steps or max(1, math.ceil(tc.epochs * (len(train_ex) // per_step)))
    set_seed(tc.seed)
    early = method.wraps_layers or strategy.fsdp  # a sharded model is adapted before sharding
    if early:
        build.adapt(model)
    if strategy.fsdp:
        fsdp_units_check(model, strategy)

    lock = _lock(out) if acc.is_main_process else None
    try:
        if acc.is_main_process:
            write_text(
                out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
            )
            write_json(out / "heldout.json", record)
        if tc.report_to:  # accelerate's trackers: tensorboard events in <out>/tensorboard
            acc.init_trackers("tensorboard", config=tracker_config(cfg.model_dump(mode="json")))
        model = build.place(model)
        peak.phase("load")
        run = Run(
            cfg,
            model,
            tok,
            acc,
            dtype,
            train_ex,
            heldout,
            out,
            log,
            method.hooks(),
            strategy,
            rebuild=build.rebuild,
            layout=layout,
            objective=objective,
        )
        base = None
        if cfg.eval.compare_base:
            base = base_metrics(cfg, model, tok, heldout, dtype, out, log, run.share)
        peak.phase("base_eval")
        if not early:
            build.adapt(model)
        run.hooks.prepare(run)  # e.g. LoRA-drop's sample phase and layer selection
        cast_frozen(run.model, dtype)
        if objective.name == "dpo" and (
            cfg.dpo.precompute_ref_log_probs or not can_disable(run.model)
        ):  # See Note: the reference is the model with the adapter off (dpo.py)
            seconds = precompute_reference(run, train_ex, fingerprint(run.sequences(train_ex)))
            run.reference_s = seconds
            how = f"computed once before training ({seconds:.1f} s)" if seconds else "read back"
            n = len(train_ex)
            log(f"dpo: reference log-probabilities of {n} pairs {how} ({REFERENCE_FILE})")
        return _train_and_finish(run, method, total, base, peak)
    except Exception as e:
        stopped_by_files(e, out)  # a full disk: one sentence saying how to continue
        raise
    finally:
        if lock is not None:
            lock.close()


def _objective_settings(cfg: RunConfig) -> RunConfig:
    """The config as the objective runs it: DPO without dropout on the adapter
    (``dpo.disable_dropout``, TRL's default: the policy and its reference then agree at step
    0), recorded so in config.yaml."""
    if cfg.train.objective == "dpo" and cfg.dpo.disable_dropout and cfg.adapter.dropout:
        adapter = cfg.adapter.model_copy(update={"dropout": 0.0})
        return cfg.model_copy(update={"adapter": adapter})
    return cfg


def fsdp_units_check(model: nn.Module, strategy: Strategy) -> None:
    """Refuse, before anything is written, a model FSDP cannot shard."""
    from .distributed import fsdp_units

    fsdp_units(model, strategy)


def _train_and_finish(run: Run, method, total: int, base: dict | None, peak: PeakMemory) -> dict:
    """The main optimization, then the adapter, the tuned figures and summary.json."""
    cfg, acc, out = run.cfg, run.accelerator, run.out_dir
    trainable, n_total = inject.count_parameters(run.model)
    run.log(
        f"{cfg.adapter.method}: {trainable:,} trainable of {n_total:,} parameters "
        f"({100 * trainable / n_total:.3f}%), {len(run.train_examples)} examples, "
        f"{total} steps, {dtype_name(run.dtype)}, {acc.num_processes} process(es), "
        f"{run.strategy.name}"
    )
    if cfg.adapter.quantize:  # which dtype the 4-bit weights compute in, auto or asked for
        run.log(
            f"{cfg.adapter.quantize} base: matmuls in "
            f"{dtype_name(compute_dtype_of(cfg.adapter))} (adapter.quant_compute_dtype: "
            f"{cfg.adapter.quant_compute_dtype})"
        )
    peak.reset()
    with activation_checkpointing(run.model, cfg.train.gradient_checkpointing):
        stats = optimize(run, run.train_examples, total, checkpoints=True)
    peak.phase("train")
    model = run.model
    summary: dict[str, Any] = {
        "method": cfg.adapter.method,
        "model": cfg.model,
        "trainable_params": trainable,
        "total_params": n_total,
        "precision": dtype_name(run.dtype),
        "processes": acc.num_processes,
        "distributed": run.strategy.as_dict(),
        "objective": cfg.train.objective,
        **({"dpo_reference_s": run.reference_s} if hasattr(run, "reference_s") else {}),
        "packing": run.layout.as_dict(),
        "total_steps": total,
        **stats,
    }
    # after the training peak is read (memory.py); under FSDP each process's bytes are
    # process_bytes below, and the exact count of one unsharded step does not apply
    summary["exact_memory"] = None if run.strategy.fsdp else run_exact_memory(run)
    # every process's bytes (its shards under FSDP), in rank order
    summary["process_bytes"] = _gather(run, getattr(run, "process_bytes", {}))
    with whole_parameters(model, trainable_only=not method.save_whole_model()) as holder:
        summary["method_summary"] = run.hooks.summary(model)
        if holder:
            peft_format.save_adapter(
                model,
                out / "adapter",
                base_model_name_or_path=models.resolve_model_path(cfg.model),
                summary={k: v for k, v in summary.items() if k != "loss_curve"},
            )
            if method.save_whole_model():  # a whole model folder wants its tokenizer
                run.tokenizer.save_pretrained(out / "adapter")
    acc.wait_for_everyone()
    peak.reset()
    tuned = measure(
        model,
        run.tokenizer,
        run.heldout,
        cfg.eval,
        cfg.data.max_seq_len,
        run.dtype,
        "tuned model",
        run.log,
        out / PREDICTIONS["tuned"],
        run.share,
    )
    peak.phase("tuned_eval")
    summary.update(peak_memory_mb=peak.overall(), peak_memory_phases_mb=peak.phases)
    if acc.is_main_process:
        summary["tuned"] = tuned
        summary["base"] = base
        write_json(out / "summary.json", summary)
        _track(run, "tuned", total, summary["tuned"])
    acc.wait_for_everyone()
    if cfg.train.report_to:
        acc.end_training()
    return summary


def _gather(run: Run, obj) -> list:
    from .distributed import gather_objects

    return gather_objects(obj, run.accelerator.num_processes)


#: settings that cannot change a run's results (train.compile: only within floating-point
#: rounding): they may differ when a run is resumed or asked for again
_NEUTRAL_KEYS = {
    "train.resume",
    "train.compile",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.report_to",
    "eval.compare_base",
}


def _first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    """The first dotted key whose value differs between two config dumps (None: equal)."""
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            found = _first_difference(va, vb, key + ".")
            if found:
                return found
        elif va != vb and key not in _NEUTRAL_KEYS:
            return key
    return None


def _finished_run(cfg: RunConfig, out: Path, log: Log) -> dict | None:
    """The summary of a finished run asked for again with the same settings (or resumed);
    refuses a folder that holds a run made with other settings, naming the first that
    differs, and a folder with an unfinished run when not resuming."""
    summary_file, recorded_file = out / "summary.json", out / "config.yaml"
    recorded = _recorded_config(recorded_file) if recorded_file.exists() else None
    diff = _first_difference(recorded or {}, cfg.model_dump(mode="json")) if recorded else None
    if summary_file.exists():
        if diff:
            raise LorakitError(
                f"{out} holds a finished run made with another {diff}; choose "
                "another output_dir to train with these settings"
            )
        log(
            f"{out} already holds this finished run (same settings); showing its results "
            "(choose another output_dir to train again)"
        )
        return read_json(summary_file)
    if cfg.train.resume:
        foreign_checkpoints(out)
    if (out / "checkpoints").exists():
        if not cfg.train.resume:
            raise LorakitError(
                f"{out} already holds an unfinished run; set train.resume=true "
                "to continue it or choose another output_dir"
            )
        if diff:
            raise LorakitError(
                f"{out} holds an unfinished run made with another {diff}; "
                "resume it with its own settings or choose another output_dir"
            )
    return None


def _recorded_config(path: Path) -> dict:
    with file_errors("read", path):
        text = path.read_text(encoding="utf-8")
    try:
        recorded = yaml.safe_load(text)
    except yaml.YAMLError:
        recorded = None
    if not isinstance(recorded, dict):
        raise LorakitError(
            f"{path} is not the config lorakit records (damaged?); choose "
            "another output_dir or delete that file"
        )
    return recorded


def _lock(out_dir: Path):
    with file_errors("create", out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        fh = open(out_dir / ".lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise LorakitError(
            f"another lorakit run is using {out_dir}; wait for it or choose another output_dir"
        ) from None
    return fh
