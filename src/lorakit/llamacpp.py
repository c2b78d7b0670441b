"""llama.cpp LoRA adapter files (GGUF), written as llama.cpp's own converter writes them.

Layout (llama.cpp ``convert_lora_to_gguf.py`` and ``src/llama-adapter.cpp``): ``general.type =
adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``; per adapted module two tensors
``<llama.cpp base name>.lora_a`` (r, d_in) and ``.lora_b`` (d_out, r), named through the
``gguf`` package's tensor-name map for the base's architecture; for Llama-style bases the rows
of q/k's B are permuted from HF's rotate-half order to llama.cpp's interleaved RoPE layout; an
embedding's pair is flipped. Tensors are stored in the ``outtype`` (q8_0 falls back to f16
where the row length is not a multiple of 32, as the converter does). See docs/export.md.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import LorakitError
from .files import file_errors
from .inject import adapter_layers
from .registry import EXPORT_METHOD

#: HF ``model_type`` -> (llama.cpp architecture, whether llama.cpp's converter permutes the
#: rows of q_proj/k_proj for its RoPE layout: ``LlamaModel.permute`` in convert_hf_to_gguf).
#: Only architectures whose converter changes nothing else about a linear layer are listed.
GGUF_ARCHS = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}


def merge_hint(what: str) -> str:
    """``what`` cannot be served as an adapter, and the way that works."""
    return (
        f"{what}; serve the adapter merged into its base: `lorakit export ADAPTER --to "
        "gguf-model` (llama.cpp, Ollama) or `lorakit merge ADAPTER --out DIR` (vLLM)"
    )


# ---- GGUF (llama.cpp) -----------------------------------------------------------------------


def gguf_package():
    """The ``gguf`` package (llama.cpp's own Python reader and writer, gguf-py on PyPI)."""
    try:
        import gguf
    except ImportError:
        raise LorakitError("GGUF export needs the gguf package (pip install gguf)") from None
    return gguf


def _qtype(outtype: str):
    gguf = gguf_package()
    return {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[outtype]


def gguf_encode(x: torch.Tensor, outtype: str):
    """(array, ggml type) as llama.cpp's converter stores a LoRA tensor: in ``outtype``, and
    in f16 where q8_0 does not fit the row length (blocks of 32), as the converter falls back."""
    gguf = gguf_package()
    data = x.detach().float().cpu().numpy()
    qtype = _qtype(outtype)
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        qtype = gguf.GGMLQuantizationType.F16
        return gguf.quants.quantize(data, qtype), qtype


def _gguf_decode(arr, qtype) -> torch.Tensor:
    return torch.from_numpy(gguf_package().quants.dequantize(arr, qtype).copy()).float()


@dataclass
class GGUFPlan:
    """Where each adapted module goes in a llama.cpp adapter file."""

    arch: str
    names: dict[str, str]  # module -> llama.cpp tensor base name (``blk.0.attn_q.weight``)
    embedding: set[str]  # modules that are embeddings (llama.cpp flips their A and B)
    permute: dict[str, int]  # module -> heads for the q/k RoPE row permutation


def gguf_plan(model: nn.Module) -> GGUFPlan:
    """Map the adapted modules to llama.cpp's tensor names (``gguf.get_tensor_name_map``) for
    the base's architecture, or refuse in one sentence."""
    gguf = gguf_package()
    config = model.config
    mtype = getattr(config, "model_type", None)
    if mtype not in GGUF_ARCHS:
        raise LorakitError(
            merge_hint(
                f"lorakit writes llama.cpp adapters for {', '.join(sorted(GGUF_ARCHS))} bases, "
                f"not {mtype!r}"
            )
        )
    arch_name, permutes = GGUF_ARCHS[mtype]
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    tmap = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names, emb, perm = {}, set(), {}
    for name, layer in adapter_layers(model):
        if layer.fan_in_fan_out:
            raise LorakitError(
                merge_hint(
                    f"{name!r} is a transposed (Conv1D) layer, which lorakit does not write to GGUF"
                )
            )
        out = tmap.get_name(name + ".weight", try_suffixes=(".weight",))
        if out is None:
            raise LorakitError(
                merge_hint(
                    f"llama.cpp has no tensor for the adapted module "
                    f"{name!r} of this {arch_name} model"
                )
            )
        if out == "output.weight" and tied:
            raise LorakitError(
                merge_hint(
                    f"{name!r} is tied to the input embeddings, and "
                    "llama.cpp's base file has no separate output "
                    "layer for its adapter"
                )
            )
        names[name] = out
        if isinstance(layer.base_layer, nn.Embedding):
            emb.add(name)
        if permutes and name.endswith("q_proj"):
            perm[name] = n_head
        elif permutes and name.endswith("k_proj"):
            perm[name] = n_kv
    return GGUFPlan(arch_name, names, emb, perm)


def rope_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from HF's rotate-half order to llama.cpp's interleaved one,
    per head (``LlamaModel.permute`` in llama.cpp's convert_hf_to_gguf)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _file_pair(plan: GGUFPlan, name: str, b: torch.Tensor, a: torch.Tensor):
    """(lora_a, lora_b) in the file's orientation, HF row order: A (r, d_in), B (d_out, r)
    for a linear layer; an embedding's A and B are flipped (llama.cpp's ``llm_build_inp_embd``:
    lora_a (vocab, r), lora_b (dim, r))."""
    return (b, a.T) if name in plan.embedding else (a, b)


def gguf_rounding(plan: GGUFPlan, outtype: str):
    """The ``rounding`` for :func:`lorakit.export.convert`: factors as the file holds them,
    read back."""

    def rounding(name: str, b: torch.Tensor, a: torch.Tensor):
        la, lb = (_gguf_decode(*gguf_encode(t, outtype)) for t in _file_pair(plan, name, b, a))
        return (la, lb.T) if name in plan.embedding else (lb, la)

    return rounding


@contextlib.contextmanager
def gguf_file(out: Path, arch: str):
    """A ``GGUFWriter`` for ``arch`` on a temporary sibling of ``out``: the block writes the
    file through it, which is then synced and renamed into place; on any error the temporary
    file is removed and ``out`` is untouched. A file-system error (a full disk) is one
    sentence about ``out``."""
    gguf = gguf_package()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with file_errors("write", out):
        out.parent.mkdir(parents=True, exist_ok=True)  # --out newdir/a.gguf
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            yield writer
            for f in writer.fout or ():
                f.flush()
                os.fsync(f.fileno())
            writer.close()
            os.replace(tmp, out)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise


def write_gguf(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    alpha: float,
    plan: GGUFPlan,
    out: Path,
    outtype: str,
    name: str | None = None,
) -> Path:
    """A llama.cpp LoRA adapter file as its converter writes one: ``general.type = adapter``,
    ``adapter.type = lora``, ``adapter.lora.alpha``, tensors ``<base name>.lora_a`` /
    ``.lora_b``. Written to a temporary name, renamed into place when complete."""
    gguf = gguf_package()
    with gguf_file(out, plan.arch) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, EXPORT_METHOD)
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if name:
            writer.add_name(name)
        arrays = []
        for module, (b, a) in factors.items():
            if module in plan.permute:
                b = rope_permute(b, plan.permute[module])
            la, lb = _file_pair(plan, module, b, a)
            for suffix, t in ((".lora_a", la), (".lora_b", lb)):
                arr, qtype = gguf_encode(t.contiguous(), outtype)
                writer.add_tensor_info(
                    plan.names[module] + suffix, arr.shape, arr.dtype, arr.nbytes, raw_dtype=qtype
                )
                arrays.append(arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for arr in arrays:
            write_tensor(writer, arr)
    return out


class _PythonWrite:
    """An array as ``GGUFWriter.write_tensor_data`` takes it (``nbytes``, ``tofile``), written
    through the Python file object: numpy's own ``tofile`` reports a short write (a full disk)
    as an OSError without its errno, which could not be told from any other failure."""

    def __init__(self, arr: np.ndarray):
        self.arr = np.ascontiguousarray(arr)
        self.nbytes = self.arr.nbytes

    def tofile(self, f) -> None:
        f.write(memoryview(self.arr).cast("B"))


def write_tensor(writer, arr: np.ndarray) -> None:
    """The next tensor's data (in the order of the tensor index already written)."""
    writer.write_tensor_data(_PythonWrite(arr))
