"""Training checkpoints: safetensors for every tensor, JSON for everything else, written
atomically (temporary folder + rename), the last K kept; exact resume.

A checkpoint folder ``checkpoints/step-000120`` holds:
- ``trainable.safetensors``: every trainable parameter by name;
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors and hyper-parameters;
- ``hooks.safetensors``: method state (AdaLoRA's importance averages), if any;
- ``state.json``: step, scheduler, Python/torch RNG states (torch's as a tensor file).
Folders whose names start with '.' are unfinished writes and are never read.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import LorakitError
from ..faults import kill_point
from ..files import atomic_dir, write_json

_STEP = re.compile(r"^step-(\d+)$")


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def list_checkpoints(out_dir: Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP.match(p.name)) and (p / "state.json").exists()]
    return [p for _, p in sorted(found)]


def save_checkpoint(out_dir: Path, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, hooks=None,
                    keep: int = 2, extra: Optional[dict] = None) -> Path:
    params = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
              if p.requires_grad}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    path = Path(out_dir) / "checkpoints" / f"step-{step:06d}"
    try:
        _write_checkpoint(path, params, opt_tensors, opt_meta, model, scheduler, hooks, step,
                          extra)
    except OSError as e:
        raise LorakitError(f"could not write checkpoint {path} ({e.strerror or e}); the previous "
                           "checkpoint is intact") from None
    for old in list_checkpoints(out_dir)[:-keep]:
        # rename first (atomic): a kill during the deletion leaves a '.'-folder, never a
        # checkpoint with missing files that would look complete
        trash = old.with_name(f".{old.name}.deleting")
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return path


def remove_partial(out_dir: Path) -> None:
    """Delete what an interrupted write or deletion left behind ('.'-folders of checkpoints,
    and of the adapter folder)."""
    root = Path(out_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)
    for p in Path(out_dir).glob(".adapter.*"):
        shutil.rmtree(p, ignore_errors=True)


def _write_checkpoint(path, params, opt_tensors, opt_meta, model, scheduler, hooks, step, extra):
    with atomic_dir(path) as tmp:
        save_file(params, str(tmp / "trainable.safetensors"))
        kill_point("checkpoint-write", step)  # tests only (lorakit.faults)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "optimizer.json", opt_meta)
        method_state = hooks.state_tensors(model) if hooks is not None else {}
        if method_state:
            save_file({k: v.detach().cpu().contiguous() for k, v in method_state.items()},
                      str(tmp / "hooks.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        py_state = random.getstate()
        write_json(tmp / "state.json", {
            "step": step, "scheduler": scheduler.state_dict(),
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
            **(extra or {})})


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    hooks=None) -> dict:
    """Restore everything :func:`save_checkpoint` wrote; returns state.json's content."""
    try:
        state = json.loads((path / "state.json").read_text())
        params = load_file(str(path / "trainable.safetensors"))
        opt_t = load_file(str(path / "optimizer.safetensors"))
        opt_meta = json.loads((path / "optimizer.json").read_text())
        rng = load_file(str(path / "rng.safetensors"))
    except Exception as e:  # any unreadable piece: say which checkpoint
        raise LorakitError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(own) != set(params):
        diff = sorted(set(own) ^ set(params))[0]
        raise LorakitError(f"checkpoint {path} does not fit this run (parameter {diff!r} "
                           "differs); was the config changed?")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(params[n])
    if hooks is not None and (path / "hooks.safetensors").exists():
        hooks.load_state_tensors(model, load_file(str(path / "hooks.safetensors")))
    optimizer.load_state_dict(_unflatten_optimizer(opt_t, opt_meta))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    v, internal, gauss = state["python_rng"]
    random.setstate((v, tuple(internal), gauss))
    return state
