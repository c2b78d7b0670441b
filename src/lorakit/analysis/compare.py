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

# Note: equal settings
A preset changes several things at once: QLoRA is a 4-bit base *and* r 64 on every linear
layer. Its memory claim (Dettmers et al. 2023: the 4-bit base lowers the memory of LoRA
training) is about the base's storage at equal adapter settings, so compare also runs a
preset that declares ``compare_equal`` (registry) with those options at its method's values,
as a row of its own (``qlora.lora-settings``); the preset as published stays a row too.

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
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..config import load_run_config, parse_overrides, split_config_args
from ..errors import LorakitError
from ..files import check_output, file_errors, read_json, write_json
from ..registry import METHODS, PRESETS, all_methods, get_method, preset_options
from ..training.distributed import Strategy
from ..training.evaluation import PREDICTIONS
from ..training.loop import base_metrics, prepare_data
from ..training.runtime import resolve_precision
from ..training.session import ModelBuild, assemble, inference_device
from .report import best_lr_factors, write_report
from .settings import Budget, settings_for

#: presets that compare runs on the long-context suite (LongLoRA), not on the task's short
#: examples unless --methods names them
LONG_PRESETS = tuple(n for n, p in PRESETS.items() if p.get("compare_suite") == "long")
#: every registered method, then the presets named after the papers
DEFAULT_METHODS = tuple(m for m in (*METHODS, *PRESETS) if m not in LONG_PRESETS)
#: The compare budget, applied only where the user's config and overrides leave the key unset:
#: the default compare (every method, both suites) fits in 60 minutes on 2 CPU cores.
COMPARE_DEFAULTS = {"train.max_steps": 150, "eval.limit": 100}
#: ``--quick``: a first look (about 14 min on 2 CPU cores; figures too noisy for the claims)
QUICK_DEFAULTS = {"train.max_steps": 30, "eval.limit": 30}
#: The long-context suite (LongLoRA, Chen et al. 2023): the pass-key task, the same budget
#: for S2-Attn and full attention. These keys are the suite's own (the user's short-task
#: overrides do not change them); ``--long-steps`` and ``--long-len`` do.
LONG_DEFAULTS = {
    "data.train": "task:passkey",
    "data.max_seq_len": 2048,
    "train.batch_size": 1,
    "train.grad_accum": 1,
    "train.max_steps": 30,
    "eval.limit": 30,
    "eval.batch_size": 4,
}
LONG_QUICK = {"data.max_seq_len": 1024, "train.max_steps": 6, "eval.limit": 8}
LONG_PREFIX = "long."
#: the long suite's rows: each long preset as it is, and with full attention in training
LONG_RUNS = {
    f"{LONG_PREFIX}{n}{tail}": (n, extra)
    for n in LONG_PRESETS
    for tail, extra in (("", []), (".full-attn", ["adapter.s2_attn=false"]))
}
#: learning-rate multipliers of ``--lr-sweep`` (1 is the row's own run)
LR_GRID = (0.5, 1.0, 2.0)
STATE_NAME = "compare.json"

Log = Callable[[str], None]


# ---- which methods can run here ------------------------------------------------------------


def unavailable_reason(cfg) -> str | None:
    """Why the method of run config ``cfg`` cannot run on this machine, or None."""
    if cfg.adapter.quantize:
        try:
            importlib.import_module("bitsandbytes")
        except Exception as e:
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


def _user_settings(config: str | None, overrides: list[str]) -> tuple[dict, dict]:
    """(the YAML config's data, the overrides as a nested dict): what the user set."""
    user: dict = {}
    if config:
        try:
            user = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            user = {}  # load_run_config reports it properly
    return user, parse_overrides(overrides)


def method_overrides(
    config: str | None,
    overrides: list[str],
    method: str,
    run_dir: Path,
    defaults: dict | None = None,
    forced: dict | None = None,
    extra: list[str] | None = None,
) -> tuple[list[str], list[tuple[str, object, str]]]:
    """The ``lorakit train`` overrides of one method's run, and the compare settings it got.

    In order: the compare budget (``defaults``) and the method's paper settings
    (:mod:`~lorakit.analysis.settings`) where the user set nothing, then the user's overrides,
    then ``forced`` (a suite's own keys) and ``extra``, then the method and its folder. An
    override of a method's own options (``adapter.lora_drop.threshold=0.7``) goes to that
    method's run only."""
    user, given = _user_settings(config, overrides)

    def unset(k: str) -> bool:
        return not _has_key(user, k) and not _has_key(given, k)

    defaults = COMPARE_DEFAULTS if defaults is None else defaults
    forced = forced or {}
    budget = [f"{k}={v}" for k, v in defaults.items() if unset(k) and k not in forced]
    base = preset_options(method)["method"] if method in PRESETS else method
    others = {
        f"adapter.{m.options_key}."
        for m in all_methods()
        if m.options is not None and m.name != base
    }
    own = [
        o
        for o in overrides
        if not o.startswith(tuple(others)) and o.split("=", 1)[0].strip() not in forced
    ]
    tail = [
        *[f"{k}={v}" for k, v in forced.items()],
        *(extra or []),
        f"adapter.method={method}",
        f"output_dir={run_dir}",
        "train.resume=true",
    ]
    # the paper settings depend on the budget (steps, LoRA's rank): resolve it first
    cfg = load_run_config(config, [*budget, *own, *tail])
    applied = [
        (k, v, src)
        for k, v, src in settings_for(method, Budget(_steps(cfg), cfg.adapter.r))
        if unset(k) and k not in forced
    ]
    paper = [f"{k}={_yaml_value(v)}" for k, v, _ in applied]
    return [*budget, *paper, *own, *tail], applied


def _yaml_value(v) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v)


def _steps(cfg) -> int:
    """The run's optimizer steps: max_steps, or the epochs over the training rows."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    from ..training.data import read_rows

    n = sum(
        len(read_rows(f, "train", cfg.data.max_seq_len).rows) * w
        for f, w in zip(cfg.data.train_files, cfg.data.weights or [1.0] * len(cfg.data.train_files))
    )
    if cfg.data.limit:
        n = min(n, cfg.data.limit)
    per = cfg.train.batch_size * cfg.train.grad_accum
    return max(1, math.ceil(n / per * cfg.train.epochs))


def _base_key(cfg) -> str:
    """Runs with equal keys measure the same base model (See Note: the base model ...)."""
    a = cfg.adapter
    return json.dumps(
        {
            "model": cfg.model,
            "quantize": a.quantize,
            "dtype": a.quant_compute_dtype,
            "context_length": a.context_length,
            "data": cfg.data.model_dump(),
            "eval": cfg.eval.model_dump(),
            "precision": cfg.train.precision,
        },
        sort_keys=True,
    )


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("lorakit: error:"):
            return ln[len("lorakit: error:") :].strip()
    return lines[-1] if lines else "the run failed without a message"


# ---- running -------------------------------------------------------------------------------


@dataclass
class Plan:
    """One training run of a compare: ``row`` is the report row it counts towards (a row is
    the mean of its seeds); ``name`` is its folder under the compare's ``--out``."""

    name: str
    method: str
    row: str
    run_dir: Path
    args: list[str]
    cfg: object
    applied: list = field(default_factory=list)  # compare settings: (key, value, source)
    lr_factor: float = 1.0
    seed_index: int = 0
    extra: list = field(default_factory=list)  # the row's own overrides (its seeds get them)


def compare(
    config: str | None,
    overrides: list[str],
    methods: list[str],
    out: str | Path,
    log: Log = print,
    python: str = sys.executable,
    seeds: int = 1,
    lr_sweep: bool = False,
    long_context: bool = False,
    quick: bool = False,
    long_steps: int | None = None,
    long_len: int | None = None,
) -> dict:
    """Train each method (skipping finished runs) and write the report; returns the report's
    data (also ``report.json``).

    ``seeds``: runs per row (seed, seed+1, ...), the row shows their mean and spread;
    ``lr_sweep``: each row's learning rate times :data:`LR_GRID` first, the best by
    validation loss is the row (and its seeds' rate); ``long_context``: also the pass-key
    suite (:data:`LONG_RUNS`); ``quick``: a short budget (:data:`QUICK_DEFAULTS`)."""
    if seeds < 1:
        raise LorakitError("--seeds must be at least 1")
    out = Path(out)
    spec = _Spec(config, overrides, out, quick, long_steps, long_len)
    check_output(out, "--out")
    plans = spec.first_plans(methods, lr_sweep, long_context)
    with file_errors("create", out):
        out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_NAME
    state = read_json(state_path) if state_path.exists() else {"runs": {}}
    t_all = time.perf_counter()
    _run_plans(plans, state, state_path, config, out, log, python)
    if seeds > 1:
        more = spec.seed_plans(plans, seeds, best_lr_factors(out, plans))
        _run_plans(plans + more, state, state_path, config, out, log, python, only=more)
        plans += more
    state["last_call_wall_s"] = time.perf_counter() - t_all
    write_json(state_path, state)
    with file_errors("write the report into", out):
        report = write_report(out, plans, state)
    log(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return report


class _Spec:
    """Builds the plans of one compare call: every config is resolved when its plan is
    made, so a bad override fails before any training."""

    def __init__(self, config, overrides, out, quick, long_steps, long_len):
        self.config, self.overrides, self.out = config, overrides, out
        self.defaults = QUICK_DEFAULTS if quick else COMPARE_DEFAULTS
        self.long = dict(LONG_DEFAULTS, **(LONG_QUICK if quick else {}))
        if long_steps:
            self.long["train.max_steps"] = long_steps
        if long_len:
            self.long["data.max_seq_len"] = long_len

    def plan(
        self,
        name: str,
        method: str,
        row: str,
        extra: list[str],
        long: bool = False,
        lr_factor: float = 1.0,
        seed_index: int = 0,
    ) -> Plan:
        run_dir = self.out / name
        args, applied = method_overrides(
            self.config,
            self.overrides,
            method,
            run_dir,
            {} if long else self.defaults,
            self.long if long else None,
            extra,
        )
        cfg = load_run_config(self.config, args)
        old = run_dir / "config.yaml"
        if old.exists() and yaml.safe_load(old.read_text()) != cfg.model_dump(mode="json"):
            raise LorakitError(
                f"{run_dir} was run with other settings; use another --out or delete that folder"
            )
        return Plan(
            name, method, row, run_dir, args, cfg, applied, lr_factor, seed_index, list(extra)
        )

    def equal_settings(self, preset: str) -> list[str]:
        """Overrides that give ``preset`` its method's values of the preset's
        ``compare_equal`` keys, as the user's config and overrides resolve them (QLoRA at
        LoRA's rank, alpha, dropout and targets)."""
        base = PRESETS[preset]["method"]
        args, _ = method_overrides(
            self.config, self.overrides, base, self.out / base, self.defaults
        )
        adapter = load_run_config(self.config, args).adapter
        return [
            f"adapter.{k}={json.dumps(getattr(adapter, k))}"
            for k in PRESETS[preset]["compare_equal"]["keys"]
        ]

    def first_plans(self, methods: list[str], lr_sweep: bool, long_context: bool) -> list:
        if not methods:
            raise LorakitError("--methods names no method")
        if len(set(methods)) != len(methods):
            raise LorakitError("--methods names a method twice")
        rows = []
        for m in methods:
            rows.append((m, m, [], False))
            equal = (PRESETS.get(m) or {}).get("compare_equal")
            if equal:  # the same preset at its method's settings (See Note: equal settings)
                rows.append((equal["row"], m, self.equal_settings(m), False))
        if long_context:
            rows += [(r, m, extra, True) for r, (m, extra) in LONG_RUNS.items()]
        plans = []
        for row, method, extra, long in rows:
            main = self.plan(row, method, row, extra, long)
            plans.append(main)
            for f in LR_GRID if lr_sweep else ():
                if f != 1.0:
                    lr = main.cfg.train.lr * f
                    plans.append(
                        self.plan(
                            f"{row}.lr{lr:g}", method, row, [*extra, f"train.lr={lr:g}"], long, f
                        )
                    )
        return plans

    def seed_plans(self, plans: list, seeds: int, best: dict) -> list:
        more = []
        for p in [p for p in plans if p.lr_factor == 1.0]:
            factor = best.get(p.row, 1.0)
            extra = list(p.extra)
            if factor != 1.0:
                extra.append(f"train.lr={p.cfg.train.lr * factor:g}")
            for k in range(1, seeds):
                more.append(
                    self.plan(
                        f"{p.row}.seed{k}",
                        p.method,
                        p.row,
                        [*extra, f"train.seed={p.cfg.train.seed + k}"],
                        p.row.startswith(LONG_PREFIX),
                        factor,
                        k,
                    )
                )
        return more


def _run_plans(
    plans: list,
    state: dict,
    state_path: Path,
    config,
    out: Path,
    log: Log,
    python: str,
    only: list | None = None,
) -> None:
    todo = plans if only is None else only
    for i, p in enumerate(todo, 1):
        tag = f"[{i}/{len(todo)}] {p.name}"
        if (p.run_dir / "summary.json").exists():
            log(f"{tag}: finished earlier, not run again")
            state["runs"].setdefault(p.name, {})["status"] = "done"
            continue
        reason = unavailable_reason(p.cfg)
        if reason:
            log(f"{tag}: not available here: {reason}")
            state["runs"][p.name] = {"status": "unavailable", "error": reason}
            continue
        state["runs"][p.name] = _run_one(tag, p, plans, config, out, log, python)
        write_json(state_path, state)


def _run_one(tag: str, p: Plan, plans: list, config, out: Path, log: Log, python: str) -> dict:
    """Measure the base (unless an equal base was measured) and train one run, each in a
    process of its own; returns the run's state record."""
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    cfg_arg = [config] if config else []
    if not _reuse_base(p.run_dir, p.cfg, plans):
        log(f"{tag}: measuring the base model")
        with open(logs / f"{p.name}.base.log", "w", encoding="utf-8") as fh:
            subprocess.run(
                [python, "-m", "lorakit.analysis.compare", "--measure-base", *cfg_arg, *p.args],
                stdout=fh,
                stderr=subprocess.STDOUT,
                check=False,
            )
        # on failure the training run measures the base itself (and reports the error)
    log_file = logs / f"{p.name}.log"
    log(f"{tag}: training (log: {log_file})")
    t0 = time.perf_counter()
    with open(log_file, "w", encoding="utf-8") as fh:
        rc = subprocess.run(
            [python, "-m", "lorakit", "train", *cfg_arg, *p.args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
            check=False,
        ).returncode
    wall = time.perf_counter() - t0
    if rc == 0 and (p.run_dir / "summary.json").exists():
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
    for other in plans:
        other_dir, src = other.run_dir, other.run_dir / "base_metrics.json"
        if other_dir != run_dir and src.exists() and _base_key(other.cfg) == key:
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
    # the model as the run builds it: read once in the compute dtype, on the device
    build = ModelBuild(cfg, Strategy("single", 1), dtype, inference_device())
    model, tok, (_, heldout, _) = assemble(
        build,
        lambda tok: prepare_data(cfg, tok, log),
        adapt=get_method(cfg.adapter.method).wraps_layers,
    )
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return base_metrics(cfg, model, tok, heldout, dtype, out, log)


if (
    __name__ == "__main__"
):  # python -m lorakit.analysis.compare --measure-base [CONFIG] key=value ...
    if sys.argv[1:2] != ["--measure-base"]:
        sys.exit("usage: python -m lorakit.analysis.compare --measure-base [CONFIG] key=value ...")
    measure_base(
        load_run_config(*split_config_args(sys.argv[2:])),
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
