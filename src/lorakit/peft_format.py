"""Adapters on disk in PEFT's layout (docs/adapter-format.md), and merged model export.

A lorakit adapter folder is a PEFT adapter folder: ``adapter_config.json`` (only fields PEFT
knows) and ``adapter_model.safetensors`` with keys ``base_model.model.<module>.<suffix>``
(and a method's model-level tensors, VeRA's ``base_model.vera_A``, under their own keys).
lorakit's own extras (method name, LoRA-drop sharing, ...) go to ``lorakit.json``.
Only safetensors and JSON are ever read or written: no pickle, nothing executed.

This module is the file I/O: what the files hold beyond the fields and tensors every
adapter has is the method's PEFT codec (``Method.peft_fields``, ``options_from_peft``,
``peft_recorded``, ``tensors_from_peft``, ``peft_model_tensors``; adapters/base.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import models
from .config import AdapterConfig, parse, upgrade_recorded
from .errors import LorakitError
from .faults import kill_point
from .files import atomic_dir, read_json, write_json
from .inject import adapter_layers, apply, name_matches, state_of, trained_modules, unload
from .quant import is_quantized
from .registry import all_methods, get_method
from .version import __version__

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
EXTRAS_NAME = "lorakit.json"


# ---- saving -------------------------------------------------------------------------------


def _method(model: nn.Module):
    return get_method(state_of(model).config.method)


def _trained_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights of the modules trained whole, under their keys without PREFIX."""
    return {
        f"{name}.{pname}": p
        for name, wrapper in trained_modules(model)
        for pname, p in wrapper.module.named_parameters()
    }


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter under its PEFT key; shared Parameters written as copies."""
    out = {
        f"{name}.{suffix}": t
        for name, layer in adapter_layers(model)
        for suffix, t in layer.peft_state().items()
    }
    out.update(_trained_tensors(model))
    out = {f"{PREFIX}{key}": t for key, t in out.items()}
    out.update(_method(model).peft_model_tensors(model))  # under their own keys
    return {key: t.detach().to("cpu").contiguous().clone() for key, t in out.items()}


def _target_list(model: nn.Module, targets: list[str]) -> list[str]:
    """Short leaf names when they select exactly the targets again (as PEFT writes for
    "all-linear"), else the full module names."""
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    # PEFT matches names only, on the unwrapped model: the wrappers' own children
    # (``.base_layer``, ``.dropout``) never end in a target's leaf name
    again = [n for n, _ in model.named_modules() if n and name_matches(n, leaves)]
    return leaves if sorted(again) == sorted(targets) else sorted(targets)


def peft_config_dict(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json: the fields PEFT needs and no field it does not know."""
    st = state_of(model)
    method = get_method(st.config.method)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    return {
        "peft_type": method.peft_type,
        "task_type": "CAUSAL_LM",
        "target_modules": _target_list(model, st.targets),
        "modules_to_save": list(st.modules_to_save) or None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        **method.peft_fields(st.config, model),
    }


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    summary: dict | None = None,
) -> Path:
    """Write ``model``'s adapter to ``path`` (atomically) in PEFT's layout.

    For ``method: full`` the whole model is saved as a plain transformers folder."""
    st = state_of(model)
    path = Path(path)
    with atomic_dir(path) as tmp:
        if get_method(st.config.method).save_whole_model():
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            save_file(adapter_tensors(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            kill_point("adapter-save")  # tests only (lorakit.faults)
            write_json(tmp / CONFIG_NAME, peft_config_dict(model, base_model_name_or_path))
            (tmp / "README.md").write_text(_model_card(model, base_model_name_or_path))
        write_json(
            tmp / EXTRAS_NAME,
            {
                "lorakit_version": __version__,
                "method": st.config.method,
                "adapter_config": st.config.model_dump(mode="json"),
                "targets": st.targets,
                "modules_to_save": st.modules_to_save,
                "extras": st.extras,
                "summary": summary or {},
            },
        )
    return path


def _model_card(model: nn.Module, base: str | None) -> str:
    cfg = state_of(model).config
    return (
        f"---\nlibrary_name: peft\nbase_model: {base or 'unknown'}\ntags: [lorakit, "
        f"{cfg.method}]\n---\n\n# {cfg.method} adapter\n\nTrained with lorakit "
        f"({cfg.method}, r={cfg.r}, alpha={cfg.alpha:g}). Load with "
        "`peft.PeftModel.from_pretrained(base, path)` or `lorakit.load_adapter(base, path)`.\n"
    )


# ---- loading ------------------------------------------------------------------------------

_UNSUPPORTED_PEFT_FIELDS = (
    "layers_to_transform",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "exclude_modules",
)


def config_from_peft(pc: dict, where: str) -> AdapterConfig:
    """An AdapterConfig from a PEFT adapter_config.json (fields validated, never evaluated)."""
    claims = [m for m in all_methods() if m.reads_peft(pc)]
    if not claims:
        types = sorted({m.peft_type for m in all_methods() if m.wraps_layers})
        raise LorakitError(
            f"{where}: peft_type {pc.get('peft_type')!r} (with these options) is "
            f"not supported; lorakit loads {' and '.join(types)} adapters"
        )
    for k in _UNSUPPORTED_PEFT_FIELDS:
        if pc.get(k):
            raise LorakitError(f"{where}: the PEFT option {k} is not supported by lorakit")
    if pc.get("bias", "none") != "none":
        raise LorakitError(f"{where}: bias={pc['bias']!r} adapters are not supported")
    method = claims[0]
    d: dict[str, Any] = {
        "method": method.name,
        "target_modules": pc.get("target_modules") or "all-linear",
        "trainable_modules": list(pc.get("modules_to_save") or []),
        **method.options_from_peft(pc),
    }
    if isinstance(d["target_modules"], list):
        d["target_modules"] = sorted(d["target_modules"])
    return parse(AdapterConfig, d, prefix=where)


def read_adapter(path: str | os.PathLike) -> tuple[AdapterConfig, dict, dict[str, torch.Tensor]]:
    """Read and validate an adapter folder: (config, lorakit extras, tensors without prefix)."""
    path = Path(path)
    if not path.is_dir():
        raise LorakitError(f"adapter folder {str(path)!r} does not exist")
    extras = read_json(path / EXTRAS_NAME) if (path / EXTRAS_NAME).exists() else {}
    weights = path / WEIGHTS_NAME
    if not weights.exists():
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            raise LorakitError(
                f"{path} holds only pickle weights, which lorakit never loads "
                "(they can run code); convert them to adapter_model.safetensors"
            )
        raise LorakitError(f"{path} has no {WEIGHTS_NAME}")
    if not (path / CONFIG_NAME).exists():
        raise LorakitError(f"{path} has no {CONFIG_NAME}")
    pc = read_json(path / CONFIG_NAME)
    cfg = config_from_peft(pc, str(path / CONFIG_NAME))  # validated even when lorakit.json
    if extras.get("adapter_config"):  # lorakit's own record is exact (method, targets)
        cfg = parse(
            AdapterConfig,
            upgrade_recorded(extras["adapter_config"]),
            prefix=f"{path / EXTRAS_NAME}",
        )
        if extras.get("targets"):
            cfg = cfg.model_copy(update={"target_modules": list(extras["targets"])})
        if "modules_to_save" in extras:
            cfg = cfg.model_copy(update={"trainable_modules": list(extras["modules_to_save"])})
    try:
        raw = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise LorakitError(f"{weights} is not a valid safetensors file ({e})") from None
    # a layer's key without the prefix; a model-level key (base_model.vera_A) as it is
    tensors = {(k[len(PREFIX) :] if k.startswith(PREFIX) else k): v for k, v in raw.items()}
    tensors = get_method(cfg.method).tensors_from_peft(tensors)
    _check_consistent(path, pc, cfg, tensors)
    return cfg, extras, tensors


def _check_consistent(path: Path, pc: dict, cfg: AdapterConfig, tensors: dict) -> None:
    """adapter_config.json, lorakit.json and the tensors must tell one story: PEFT reads the
    first, lorakit the second, and a disagreement would load differently in each."""
    method = get_method(cfg.method)
    if pc.get("peft_type") != method.peft_type:
        raise LorakitError(
            f"{path / CONFIG_NAME} says peft_type {pc.get('peft_type')!r} but "
            f"lorakit.json records method {cfg.method!r}"
        )
    for key, want in method.peft_recorded(cfg).items():
        if key in pc and pc[key] != want:
            raise LorakitError(
                f"{path / CONFIG_NAME} says {key}={pc[key]!r} but lorakit.json "
                f"records {want!r}; the folder was edited by hand"
            )
    why = method.check_tensors(cfg, tensors)
    if why:
        raise LorakitError(f"{path / WEIGHTS_NAME}: {why}")


def _expected(model: nn.Module) -> dict[str, tuple[int, ...]]:
    exp = {
        f"{name}.{suffix}": shape
        for name, layer in adapter_layers(model)
        for suffix, shape in layer.expected_peft_shapes().items()
    }
    exp.update({key: tuple(p.shape) for key, p in _trained_tensors(model).items()})
    model_level = _method(model).peft_model_tensors(model)
    exp.update({key: tuple(t.shape) for key, t in model_level.items()})
    return exp


def load_state_into(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy adapter tensors into an applied model, naming the first mismatch on failure."""
    expected = _expected(model)
    # PEFT saves the base embedding next to an embedding LoRA ("save_embedding_layers"): the
    # base is the user's; such keys are checked for shape and otherwise ignored.
    base_keys = {k for k in tensors if ".base_layer." in k}
    for key, shape in expected.items():
        if key not in tensors:
            raise LorakitError(
                f"{where} lacks the tensor {key!r} that this model's adapter needs "
                "(is it for another base model?)"
            )
        got = tuple(tensors[key].shape)
        if got != shape:
            raise LorakitError(
                f"{where}: {key!r} has shape {list(got)} but this base model "
                f"expects {list(shape)} (is it for another base model?)"
            )
    unexpected = sorted(set(tensors) - set(expected) - base_keys)
    if unexpected:
        raise LorakitError(
            f"{where} holds {unexpected[0]!r}, which matches no adapted module of "
            "this model (is it for another base model?)"
        )
    for name, layer in adapter_layers(model):
        layer.load_peft_state({s: tensors[f"{name}.{s}"] for s in layer.expected_peft_shapes()})
    with torch.no_grad():
        for key, p in _trained_tensors(model).items():
            p.copy_(tensors[key].to(p.dtype))
    method = _method(model)
    model_level = method.peft_model_tensors(model)
    method.load_peft_model_tensors(model, {key: tensors[key] for key in model_level})


def load_adapter(base: nn.Module, path: str | os.PathLike, **overrides) -> nn.Module:
    """Apply the adapter saved at ``path`` (by lorakit or PEFT) to ``base`` and load its weights.

    ``overrides`` replace config fields (e.g. ``quantize=None`` to load a QLoRA adapter onto the
    16-bit base). On any error the base model is left as it was."""
    cfg, extras, tensors = read_adapter(path)
    if overrides:
        data = cfg.model_dump()
        if overrides.get("method", cfg.method) != cfg.method:  # another method's options go
            data.pop(get_method(cfg.method).options_key, None)
        cfg = parse(AdapterConfig, {**data, **overrides}, prefix="adapter")
    method = get_method(cfg.method)
    if method.save_whole_model():
        raise LorakitError(f"{path} is a whole fine-tuned model; load it with lorakit.load_model")
    apply(base, cfg)
    for p in base.parameters():  # trained weights as training keeps them: fp32, exact
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    try:
        method.hooks().on_load(base, extras, tensors)
        load_state_into(base, tensors, str(Path(path) / WEIGHTS_NAME))
        state_of(base).extras = dict(extras.get("extras") or {})
    except BaseException:
        unload(base, merge_adapters=False)
        raise
    return base


def merge_into_base(model: nn.Module) -> nn.Module:
    """Merge the adapter ``model`` carries into its base weights, in place (every method's own
    exact merge, in fp32): a plain transformers model remains. A QLoRA adapter must sit on the
    16-bit base (see :func:`load_adapter` with ``quantize=None``): 4-bit weights are never
    re-quantized."""
    if any(is_quantized(m) for m in model.modules()):
        raise LorakitError(
            "merging into 4-bit weights would re-quantize them; load the base "
            "model in 16 bits (quantize=None) and merge there"
        )
    return unload(model, merge_adapters=True)


def save_merged(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, dtype: torch.dtype | None = None
) -> Path:
    """Merge the adapter into the base weights and save a plain transformers model folder.

    The model must hold 16-bit or fp32 weights: a QLoRA adapter is merged into the 16-bit base
    (see :func:`load_adapter` with ``quantize=None``), never re-quantized."""
    merge_into_base(model)
    if dtype is not None:
        model.to(dtype)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


# ---- opening a folder for inference -------------------------------------------------------


def is_whole_model(path: str | os.PathLike) -> bool:
    """A plain transformers model folder (full fine-tuning's result, a merged export)."""
    path = Path(path)
    return (path / "config.json").exists() and not (path / CONFIG_NAME).exists()


def recorded_base(path: str | os.PathLike) -> str | None:
    """The base model an adapter (or a whole fine-tuned model) folder records, if any."""
    path = Path(path)
    if is_whole_model(path):
        extras = read_json(path / EXTRAS_NAME) if (path / EXTRAS_NAME).exists() else {}
        return (extras.get("summary") or {}).get("model")
    if not (path / CONFIG_NAME).exists():
        read_adapter(path)  # raises the precise error (pickle only, missing files...)
    return read_json(path / CONFIG_NAME).get("base_model_name_or_path")


def run_folder(path: str | os.PathLike | None) -> Path | None:
    """The run folder an adapter belongs to (it holds config.yaml and adapter/), if any:
    ``path`` itself or its parent."""
    if path:
        for d in (Path(path), Path(path).parent):
            if (d / "config.yaml").is_file() and (d / "adapter").is_dir():
                return d
    return None


def adapter_folder(path: str | os.PathLike) -> str:
    """The adapter folder ``path`` names: the folder itself, or a run folder's ``adapter/``;
    a missing folder is the first thing said."""
    if not Path(path).is_dir():
        what = "is a file, not a folder" if Path(path).exists() else "does not exist"
        raise LorakitError(f"adapter folder {str(path)!r} {what}")
    run_dir = run_folder(path)
    return str(run_dir / "adapter") if run_dir == Path(path) else str(path)


def open_adapter(
    path: str | os.PathLike,
    model_name: str | None = None,
    dtype: str = "fp32",
    trust_remote_code: bool = False,
    device=None,
):
    """(model, tokenizer) for an adapter folder on its base (``model_name`` or the recorded
    one; a QLoRA adapter goes onto the 16-bit base), or a whole model folder; read once, in
    ``dtype``, onto ``device``."""
    path = Path(path)
    if not path.is_dir():
        raise LorakitError(f"adapter folder {str(path)!r} does not exist")
    if is_whole_model(path):
        return models.load_model(
            str(path), dtype=dtype, trust_remote_code=trust_remote_code, device=device
        )
    base_name = model_name or recorded_base(path)
    if not base_name:
        raise LorakitError(f"{path} does not record its base model; pass --model")
    model, tok = models.load_model(
        base_name, dtype=dtype, trust_remote_code=trust_remote_code, device=device
    )
    load_adapter(model, path, quantize=None)
    if device is not None:
        model.to(device)  # the adapter's own tensors
    return model, tok
