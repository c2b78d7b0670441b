"""``lorakit compare``: every method trained on the same model, data, seed and budget, side by side.

Each method runs as its own ``lorakit train`` process (so its peak memory is its own) into
``<out>/<method>/``, one after another. The folder is resumable: a method whose run holds a
summary.json is not run again, an interrupted one continues from its last checkpoint
(``train.resume=true``), a failed one is retried. The report (``report.md``, a self-contained
``report.html`` and the PNG plots beside them) is rebuilt from the runs' summary.json files
on every call, so it always shows exactly what the runs measured.

Forgetting (after Biderman et al. 2024, "LoRA Learns Less and Forgets Less") is the change of
the loss on held-out general English text that the task does not cover:
``tuned.general_text_loss - base.general_text_loss``; positive means the model got worse there.

# Note: the base model is measured once per distinct base
Every run measures the base model before training (``base_metrics.json`` in its folder), and
train.py reuses that file when it exists. Runs whose base is the same model with the same
data, evaluation and precision (every method here but QLoRA, whose base is the 4-bit model)
would measure the same numbers, so compare copies the first such file into the next run's
folder instead of spending minutes of generation on it again.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from .. import inject, models
from ..config import load_run_config, parse_overrides, split_config_args
from ..errors import LorakitError
from ..files import write_json
from ..registry import METHODS, PRESETS, all_methods, get_method
from ..training.evaluation import PREDICTIONS
from ..training.loop import base_metrics, prepare_data
from ..training.runtime import cast_frozen, resolve_precision
from .report import write_report

#: every registered method, then the presets named after the papers
DEFAULT_METHODS = (*METHODS, *PRESETS)
#: The compare budget, applied only where the user's config and overrides leave the key unset:
#: 9 methods of the embedded model on the built-in task fit in 45 minutes on 2 CPU cores.
COMPARE_DEFAULTS = {"train.max_steps": 150, "eval.limit": 100}
STATE_NAME = "compare.json"

Log = Callable[[str], None]


# ---- which methods can run here ------------------------------------------------------------

def unavailable_reason(cfg) -> Optional[str]:
    """Why the method of run config ``cfg`` cannot run on this machine, or None."""
    if cfg.adapter.quantize:
        try:
            importlib.import_module("bitsandbytes")
        except Exception as e:  # noqa: BLE001 - any import failure means "not here"
            return f"4-bit base weights need bitsandbytes, which does not import ({e})"
    try:
        get_method(cfg.adapter.method)
    except ImportError as e:
        return f"method {cfg.adapter.method!r} cannot be imported ({e})"
    return None


def _has_key(data: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def method_overrides(config: Optional[str], overrides: list[str], method: str,
                     run_dir: Path) -> list[str]:
    """The ``lorakit train`` overrides of one method's run: the compare budget where the user
    set nothing, then the user's overrides, then the method and its folder. An override of a
    method's own options (``adapter.lora_drop.threshold=0.7``) goes to that method's run
    only."""
    user: dict = {}
    if config:
        try:
            user = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            user = {}  # load_run_config reports it properly
    given = parse_overrides(overrides)
    budget = [f"{k}={v}" for k, v in COMPARE_DEFAULTS.items()
              if not _has_key(user, k) and not _has_key(given, k)]
    base = PRESETS.get(method, {}).get("method", method)
    others = {f"adapter.{m.options_key}." for m in all_methods()
              if m.options is not None and m.name != base}
    own = [o for o in overrides if not o.startswith(tuple(others))]
    return [*budget, *own, f"adapter.method={method}", f"output_dir={run_dir}",
            "train.resume=true"]


def _base_key(cfg) -> str:
    """Runs with equal keys measure the same base model (See Note: the base model ...)."""
    a = cfg.adapter
    return json.dumps({"model": cfg.model, "quantize": a.quantize, "dtype": a.quant_compute_dtype,
                       "context_length": a.context_length, "data": cfg.data.model_dump(),
                       "eval": cfg.eval.model_dump(), "precision": cfg.train.precision},
                      sort_keys=True)


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("lorakit: error:"):
            return ln[len("lorakit: error:"):].strip()
    return lines[-1] if lines else "the run failed without a message"


# ---- running -------------------------------------------------------------------------------

def compare(config: Optional[str], overrides: list[str], methods: list[str], out: str | Path,
            log: Log = print, python: str = sys.executable) -> dict:
    """Train each method (skipping finished ones) and write the report; returns the report's
    data (also ``report.json``)."""
    out = Path(out)
    plans = _plans(config, overrides, methods, out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_NAME
    state = json.loads(state_path.read_text()) if state_path.exists() else {"runs": {}}
    t_all = time.perf_counter()
    for i, (m, run_dir, args, cfg) in enumerate(plans, 1):
        tag = f"[{i}/{len(plans)}] {m}"
        if (run_dir / "summary.json").exists():
            log(f"{tag}: finished earlier, not run again")
            state["runs"].setdefault(m, {})["status"] = "done"
            continue
        reason = unavailable_reason(cfg)
        if reason:
            log(f"{tag}: not available here: {reason}")
            state["runs"][m] = {"status": "unavailable", "error": reason}
            continue
        state["runs"][m] = _run_one(tag, m, run_dir, args, cfg, plans, config, out, log,
                                    python)
        write_json(state_path, state)
    state["last_call_wall_s"] = time.perf_counter() - t_all
    write_json(state_path, state)
    report = write_report(out, [m for m, *_ in plans], state)
    log(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return report


def _plans(config: Optional[str], overrides: list[str], methods: list[str], out: Path) -> list:
    """(method, run folder, train overrides, resolved config) of every method: every run's
    config is resolved first, so that a bad override fails before any training."""
    if not methods:
        raise LorakitError("--methods names no method")
    if len(set(methods)) != len(methods):
        raise LorakitError("--methods names a method twice")
    plans = []
    for m in methods:
        run_dir = out / m
        args = method_overrides(config, overrides, m, run_dir)
        cfg = load_run_config(config, args)
        old = run_dir / "config.yaml"
        if old.exists() and yaml.safe_load(old.read_text()) != cfg.model_dump(mode="json"):
            raise LorakitError(f"{run_dir} was run with other settings; use another --out or "
                               "delete that folder")
        plans.append((m, run_dir, args, cfg))
    return plans


def _run_one(tag: str, m: str, run_dir: Path, args: list[str], cfg, plans, config, out: Path,
             log: Log, python: str) -> dict:
    """Measure the base (unless an equal base was measured) and train one method, each in a
    process of its own; returns the method's state record."""
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    cfg_arg = [config] if config else []
    if not _reuse_base(run_dir, cfg, plans):
        log(f"{tag}: measuring the base model")
        with open(logs / f"{m}.base.log", "w", encoding="utf-8") as fh:
            subprocess.run([python, "-m", "lorakit.analysis.compare", "--measure-base",
                            *cfg_arg, *args], stdout=fh, stderr=subprocess.STDOUT)
        # on failure the training run measures the base itself (and reports the error)
    log_file = logs / f"{m}.log"
    log(f"{tag}: training (log: {log_file})")
    t0 = time.perf_counter()
    with open(log_file, "w", encoding="utf-8") as fh:
        rc = subprocess.run([python, "-m", "lorakit", "train", *cfg_arg, *args], stdout=fh,
                            stderr=subprocess.STDOUT,
                            env=dict(os.environ, TOKENIZERS_PARALLELISM="false")).returncode
    wall = time.perf_counter() - t0
    if rc == 0 and (run_dir / "summary.json").exists():
        log(f"{tag}: done in {wall:.0f} s")
        return {"status": "done", "wall_s": wall}
    err = _last_error(log_file.read_text(encoding="utf-8", errors="replace"))
    log(f"{tag}: FAILED ({err})")
    return {"status": "failed", "wall_s": wall, "error": err}


def _reuse_base(run_dir: Path, cfg, plans) -> bool:
    """Put the base metrics of an equal base into ``run_dir``; False if none is measured yet
    (See Note: the base model is measured once per distinct base)."""
    target = run_dir / "base_metrics.json"
    if target.exists() or not cfg.eval.compare_base:
        return True
    key = _base_key(cfg)
    for _, other_dir, _, other_cfg in plans:
        src = other_dir / "base_metrics.json"
        if other_dir != run_dir and src.exists() and _base_key(other_cfg) == key:
            run_dir.mkdir(parents=True, exist_ok=True)
            preds = other_dir / PREDICTIONS["base"]
            if preds.exists():
                shutil.copyfile(preds, run_dir / PREDICTIONS["base"])
            shutil.copyfile(src, target)
            return True
    return False


def measure_base(cfg, log: Log = print) -> dict:
    """The base model's metrics exactly as ``lorakit train`` measures them before training
    (:func:`~lorakit.training.loop.base_metrics`), in ``<output_dir>/base_metrics.json``. Run
    in its own process by :func:`compare`, so that no training run's peak memory includes
    this evaluation."""
    dtype = resolve_precision(cfg.train.precision)
    torch.manual_seed(cfg.train.seed)
    model, tok = models.load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    _, heldout, _ = prepare_data(cfg, tok, log)
    if get_method(cfg.adapter.method).wraps_layers:
        inject.apply(model, cfg.adapter)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    cast_frozen(model, dtype)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return base_metrics(cfg, model, tok, heldout, dtype, out, log)


if __name__ == "__main__":  # python -m lorakit.analysis.compare --measure-base [CONFIG] key=value ...
    if sys.argv[1:2] != ["--measure-base"]:
        sys.exit("usage: python -m lorakit.analysis.compare --measure-base [CONFIG] key=value ...")
    measure_base(load_run_config(*split_config_args(sys.argv[2:])),
                 log=lambda s: print(s, file=sys.stderr, flush=True))
