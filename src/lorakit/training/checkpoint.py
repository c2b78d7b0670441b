"""Training checkpoints: safetensors for every tensor, JSON for everything else, written
atomically (temporary folder + rename), the last K kept; exact resume.

A checkpoint folder ``checkpoints/step-000120`` holds:
- ``trainable.safetensors``: every trainable parameter by name;
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors and hyper-parameters;
- ``hooks.safetensors``: method state (AdaLoRA's importance averages), if any;
- ``state.json``: step, scheduler, Python/torch RNG states (torch's as a tensor file), one
  of each per process.
Folders whose names start with '.' are unfinished writes and are never read.

Every tensor is written whole, whatever the run's strategy: under FSDP each process's shards
are gathered before the first process writes, and on resume each process cuts its shard out
of the whole tensors again. So a checkpoint does not depend on the process count, and a run
may be resumed with another one (the data order is a function of the global batch, which
then changes: the resumed run says so).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import LorakitError
from ..faults import kill_point
from ..files import atomic_dir, file_error, write_json
from ..sharding import full, is_sharded, like

_STEP = re.compile(r"^step-(\d+)$")


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of the whole tensor (gathered when sharded: every process calls this)."""
    return full(t.detach()).cpu().contiguous()


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = _whole(v)
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
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if p.is_dir() and (m := _STEP.match(p.name)) and (p / "state.json").exists()
    ]
    return [p for _, p in sorted(found)]


def resume_hint(out_dir: Path) -> str:
    """How to continue a run that stopped (a full disk, Ctrl-C): from its last checkpoint,
    or from the start when none was written yet."""
    done = list_checkpoints(out_dir)
    if not done:
        return "run the same command again (no checkpoint had been written yet)"
    step = int(_STEP.match(done[-1].name).group(1))
    return f"continue with train.resume=true (from the checkpoint of step {step}, which is intact)"


def stopped_by_files(e: BaseException, out_dir: Path) -> None:
    """Raise, for a file-system error ``e`` while a run writes into ``out_dir`` (a full disk
    while saving a checkpoint or the adapter), one sentence saying what failed and how to
    continue; return for any other error."""
    err = file_error(e)
    if err is not None:
        raise LorakitError(f"{err}, then {resume_hint(out_dir)}") from None


def foreign_checkpoints(out_dir: Path) -> None:
    """Refuse to resume a folder whose checkpoints another tool wrote (a Hugging Face
    Trainer's ``checkpoint-N`` folders): lorakit resumes only its own."""
    out_dir = Path(out_dir)
    theirs = (
        sorted(p.name for p in out_dir.glob("checkpoint-*") if p.is_dir())
        if out_dir.is_dir()
        else []
    )
    if theirs and not list_checkpoints(out_dir):
        raise LorakitError(
            f"{out_dir} holds checkpoints another tool wrote ({theirs[0]}, a "
            "Hugging Face Trainer's layout); lorakit resumes only its own "
            "(checkpoints/step-N): choose another output_dir"
        )


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    hooks=None,
    keep: int = 2,
    extra: dict | None = None,
    rank: int = 0,
    world: int = 1,
) -> Path | None:
    """Write checkpoint ``step``. With several processes every one calls this (sharded tensors
    are gathered, and each process's RNG state is collected); process ``rank`` 0 writes."""
    params = {n: _whole(p) for n, p in model.named_parameters() if p.requires_grad}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    method_state = hooks.state_tensors(model) if hooks is not None else {}
    method_state = {k: _whole(v) for k, v in method_state.items()}
    rngs = _rng_states(world)
    if rank != 0:
        return None
    path = Path(out_dir) / "checkpoints" / f"step-{step:06d}"
    # a failed write (a full disk) leaves no trace and the previous checkpoints whole: the
    # folder is renamed into place complete (atomic_dir), and only then are old ones deleted
    _write_checkpoint(
        path, params, opt_tensors, opt_meta, method_state, rngs, scheduler, step, extra
    )
    for old in list_checkpoints(out_dir)[:-keep]:
        # rename first (atomic): a kill during the deletion leaves a '.'-folder, never a
        # checkpoint with missing files that would look complete
        trash = old.with_name(f".{old.name}.deleting")
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return path


def _rng_states(world: int) -> list[dict]:
    """Each process's RNG states (torch CPU, CUDA, Python), in rank order."""
    mine = {"torch": torch.get_rng_state(), "python": _python_state()}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state()
    if world == 1:
        return [mine]
    import torch.distributed as dist

    out: list = [None] * world
    dist.all_gather_object(out, mine)
    return out


def _python_state() -> list:
    v, internal, gauss = random.getstate()
    return [v, list(internal), gauss]


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


def _write_checkpoint(
    path, params, opt_tensors, opt_meta, method_state, rngs, scheduler, step, extra
):
    with atomic_dir(path) as tmp:
        save_file(params, str(tmp / "trainable.safetensors"))
        kill_point("checkpoint-write", step)  # tests only (lorakit.faults)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        write_json(tmp / "optimizer.json", opt_meta)
        if method_state:
            save_file(method_state, str(tmp / "hooks.safetensors"))
        rng = {}
        for i, r in enumerate(rngs):
            rng["torch" if i == 0 else f"torch.rank{i}"] = r["torch"]
            if "cuda" in r:
                rng[f"cuda.rank{i}"] = r["cuda"]
        save_file(rng, str(tmp / "rng.safetensors"))
        write_json(
            tmp / "state.json",
            {
                "step": step,
                "scheduler": scheduler.state_dict(),
                "python_rng": rngs[0]["python"],
                "python_rng_ranks": [r["python"] for r in rngs],
                "processes": len(rngs),
                **(extra or {}),
            },
        )


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    hooks=None,
    rank: int = 0,
) -> dict:
    """Restore everything :func:`save_checkpoint` wrote; returns state.json's content. Each
    process restores its own RNG states (process ``rank``'s, or the first process's when the
    checkpoint was written by fewer processes) and cuts its shards out of the whole tensors."""
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
        raise LorakitError(
            f"checkpoint {path} does not fit this run (parameter {diff!r} "
            "differs); was the config changed?"
        )
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(like(params[n].to(p.dtype), p))
    if hooks is not None and (path / "hooks.safetensors").exists():
        hooks.load_state_tensors(model, load_file(str(path / "hooks.safetensors")))
    try:
        optimizer.load_state_dict(_laid_out(_unflatten_optimizer(opt_t, opt_meta), optimizer))
    except (ValueError, KeyError) as e:
        raise LorakitError(
            f"checkpoint {path}: its optimizer state does not fit this run "
            f"({e}); resume with the settings it was made with"
        ) from None
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng.get(f"torch.rank{rank}", rng["torch"]) if rank else rng["torch"])
    cuda = rng.get(f"cuda.rank{rank}") if f"cuda.rank{rank}" in rng else rng.get("cuda.rank0")
    if torch.cuda.is_available() and cuda is not None:
        torch.cuda.set_rng_state(cuda)
    ranks = state.get("python_rng_ranks") or [state["python_rng"]]
    v, internal, gauss = ranks[rank] if rank < len(ranks) else ranks[0]
    random.setstate((v, tuple(internal), gauss))
    return state


def _laid_out(sd: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state dict with each whole state tensor laid out as its parameter is
    (sharded under FSDP), so ``load_state_dict`` gets what the optimizer itself would hold."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, st in sd["state"].items():
        p = params[int(idx)] if int(idx) < len(params) else None
        if p is None or not is_sharded(p):
            continue
        for k, v in st.items():
            if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape):
                st[k] = like(v.to(p.dtype if v.is_floating_point() else v.dtype), p)
    return sd
