"""Each compare run as a result of PEFT's benchmark: the fields of PEFT's result files.

PEFT's ``method_comparison/MetaMathQA`` benchmark (huggingface/peft) publishes one JSON file
per run with three sections, which its users read and tabulate:

- ``run_info``: ``created_at``, ``total_time``, ``experiment_name``, ``peft_branch``,
  ``train_config`` (model_id, dtype, max_seq_length, batch_size, batch_size_eval, max_steps,
  eval_steps, compile, use_gc, query_template, seed, grad_norm_clip, optimizer_type,
  optimizer_kwargs, lr_scheduler, use_amp, autocast_adapter_dtype, generation_kwargs,
  attn_implementation, init_kv_cache_prefix), ``peft_config`` (the adapter_config.json;
  null for full fine-tuning), ``error_msg``;
- ``train_info``: ``accelerator_memory_reserved_avg``, ``accelerator_memory_max``,
  ``accelerator_memory_reserved_99th`` (bytes), ``train_time`` (s), ``file_size`` (bytes of
  the saved checkpoint), ``num_trainable_params``, ``num_total_params``, ``status``,
  ``metrics`` (a list; the last entry has ``step``, ``test accuracy``, ``train loss``,
  ``train samples``, ``train total tokens``, ``forgetting``);
- ``meta_info``: ``model_info``, ``dataset_info``, ``package_info``
  (``<package>-version`` and ``<package>-commit-hash``), ``system_info`` (system, release,
  version, machine, processor, accelerator), ``pytorch_info``.

:func:`peft_result` fills them from a run's summary.json and config.yaml, nothing
recomputed. Where lorakit measures something else, the field says so in ``lorakit``:
``accelerator_memory_max`` is the CUDA allocator's peak on a GPU (as PEFT's) but the max RSS
on a CPU; ``test accuracy`` is the run's headline metric (``eval.metric``; ``number`` is
GSM8K's last-number accuracy); ``forgetting`` is the change of the loss on lorakit's
held-out general English text (PEFT: held-out Wikipedia text), positive meaning worse, as
PEFT's. Fields lorakit does not measure (the allocator's reserved memory, the model's and
data's Hub revisions) are null. ``meta_info`` describes the machine that wrote the report.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import platform
from pathlib import Path

import torch

#: the packages of PEFT's ``package_info``, and lorakit
PACKAGES = ("transformers", "peft", "datasets", "bitsandbytes", "torch", "lorakit")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def meta_info(cfg: dict) -> dict:
    """PEFT's ``meta_info`` for this machine and the run config ``cfg`` (config.yaml)."""
    data = (cfg.get("data") or {}).get("train")
    return {
        "model_info": {"sha": None, "created_at": None},
        "dataset_info": {
            str(d): {"sha": None, "created_at": None}
            for d in (data if isinstance(data, list) else [data])
        },
        "package_info": {
            k: v
            for pkg in PACKAGES
            for k, v in ((f"{pkg}-version", _version(pkg)), (f"{pkg}-commit-hash", None))
        },
        "system_info": {
            "system": platform.system(),
            "release": platform.release(),
            "version": platform.version(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "accelerator": (
                torch.cuda.get_device_name(0) if torch.cuda.is_available() else _cpu_name()
            ),
        },
        "pytorch_info": torch.__config__.show(),
    }


def _file_size(adapter_dir: Path) -> int | None:
    """Bytes of the saved weights (PEFT: the adapter file; full fine-tuning: the model)."""
    files = sorted(adapter_dir.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def peft_result(
    name: str, row: str, run_dir: Path, summary: dict, cfg: dict, wall_s: float | None, meta: dict
) -> dict:
    """One run (folder ``run_dir``, report row ``row``) in PEFT's result-file layout."""
    tc, dc, ec = (cfg.get(k) or {} for k in ("train", "data", "eval"))
    tuned, base = summary.get("tuned") or {}, summary.get("base") or {}
    metric = tuned.get("metric")
    forgetting = (
        tuned["general_text_loss"] - base["general_text_loss"]
        if "general_text_loss" in tuned and "general_text_loss" in base
        else None
    )
    per_step = tc.get("batch_size", 0) * tc.get("grad_accum", 1) * summary.get("processes", 1)
    adapter_cfg = run_dir / "adapter" / "adapter_config.json"
    done = run_dir / "summary.json"
    created = (
        _dt.datetime.fromtimestamp(done.stat().st_mtime, _dt.timezone.utc).isoformat(
            timespec="seconds"
        )
        if done.exists()
        else None
    )
    precision = summary.get("precision")
    peak = summary.get("peak_memory_mb")
    return {
        "run_info": {
            "created_at": created,
            "total_time": wall_s,
            "experiment_name": f"{summary.get('method')}/{name}",
            "peft_branch": None,
            "train_config": {
                "model_id": cfg.get("model"),
                "dtype": precision,
                "max_seq_length": dc.get("max_seq_len"),
                "batch_size": per_step,
                "batch_size_eval": ec.get("batch_size"),
                "max_steps": summary.get("total_steps"),
                "eval_steps": tc.get("eval_every"),
                "compile": tc.get("compile"),
                "use_gc": tc.get("gradient_checkpointing"),
                "query_template": dc.get("prompt_template"),
                "seed": tc.get("seed"),
                "grad_norm_clip": tc.get("max_grad_norm"),
                "optimizer_type": "AdamW",
                "optimizer_kwargs": {"lr": tc.get("lr"), "weight_decay": tc.get("weight_decay")},
                "lr_scheduler": tc.get("schedule"),
                "use_amp": precision != "float32",
                "autocast_adapter_dtype": True,  # lorakit keeps trainable weights in fp32
                "generation_kwargs": {
                    "max_new_tokens": (tuned.get("generation") or {}).get("max_new_tokens")
                },
                "attn_implementation": None,
                "init_kv_cache_prefix": None,
            },
            "peft_config": (json.loads(adapter_cfg.read_text()) if adapter_cfg.exists() else None),
            "error_msg": "",
        },
        "train_info": {
            "accelerator_memory_reserved_avg": None,
            "accelerator_memory_max": round(peak * 2**20) if peak is not None else None,
            "accelerator_memory_reserved_99th": None,
            "train_time": summary.get("train_time_s"),
            "file_size": _file_size(run_dir / "adapter"),
            "num_trainable_params": summary.get("trainable_params"),
            "num_total_params": summary.get("total_params"),
            "status": "success",
            "metrics": [
                {
                    "step": summary.get("total_steps"),
                    "test accuracy": tuned.get(metric) if metric else None,
                    "train loss": summary.get("final_train_loss"),
                    "train samples": (summary.get("total_steps") or 0) * per_step,
                    "train total tokens": summary.get("train_tokens"),
                    "forgetting": forgetting,
                }
            ],
        },
        "meta_info": meta,
        "lorakit": {
            "run": name,
            "row": row,
            "test_accuracy_metric": metric,
            "accelerator_memory_max": (
                "CUDA allocator peak"
                if torch.cuda.is_available()
                else "max RSS of the training process (CPU)"
            ),
            "exact_memory": summary.get("exact_memory"),
        },
    }
