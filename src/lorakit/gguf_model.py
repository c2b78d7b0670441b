"""A whole model as one GGUF file: the merged model (any method) in the layout of llama.cpp's
``convert_hf_to_gguf.py``, the file llama.cpp and Ollama run. See docs/export.md.

Note: the route
    llama.cpp's converter is a class per architecture (``conversion/llama.py``, ``qwen.py``,
    ``gemma.py``) over gguf-py's ``TensorNameMap`` (tensor names), ``GGUFWriter`` (keys and
    tensors) and vocabulary writers. lorakit writes the same file itself through the same
    gguf-py (the ``gguf`` package, a dependency) instead of running the converter:

    1. the converter is not installable: it ships only with llama.cpp's source (also inside
       the llama-cpp-python source package on PyPI), which ``pip install lorakit`` users lack,
       and it needs packages lorakit does not (sentencepiece, even for a BPE tokenizer);
    2. it reads a model folder, so the merged model would first be written out whole, in fp32
       to stay exact (4 bytes a parameter on disk), then read back; written from memory, the
       file streams one tensor at a time (memory: the merged model plus one tensor);
    3. its byte-level BPE vocabulary writer names the pre-tokenizer by hashing the tokenizer's
       output against a table of released models, and stops on a tokenizer not in it (one
       retrained or extended); lorakit reads the pre-tokenizer's definition (gguf_vocab.py).

    What lorakit writes is checked against the converter: for every architecture in
    ``ARCHS`` the same model keys and the same tensors (names, shapes, types, and values bit
    for bit) as convert_hf_to_gguf.py writes for the ``lorakit merge`` folder
    (tests/integration/test_export_model_gguf.py, with a llama.cpp source tree), and
    llama.cpp's own runtime gives lorakit's logits. Per architecture only what the converter
    does differently is declared here: the q/k row permutation of Llama-style RoPE
    (``LlamaModel.permute``), Gemma's RMSNorm offset (HF scales by 1 + w, llama.cpp by w),
    Gemma 1/2's dropped output layer, and each class's ``set_gguf_parameters``.

Tensor types follow the converter's ``prepare_tensors``: 1-D tensors, norms and biases in f32,
every other weight in the outtype, f16 where a row does not split into the outtype's blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import LorakitError
from .llamacpp import gguf_file, gguf_package, rope_permute, write_tensor

#: --outtype -> (ggml tensor type, llama.cpp file type) names in the gguf package: the types
#: llama.cpp's converter writes, then those gguf-py also quantizes (every weight in the type,
#: as ``llama-quantize --pure`` writes them)
OUTTYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}


# ---- the model keys of each architecture (set_gguf_parameters) -----------------------------


def _rope(hp: dict) -> tuple[dict, float | None]:
    """(the full-attention layers' RoPE parameters, the sliding-window layers' rope_theta),
    gathered as ``TextModel.__init__`` does from transformers' ``rope_parameters`` (or the
    older ``rope_scaling`` and top-level ``rope_theta``)."""
    rp = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    swa = (rp.get("sliding_attention") or {}).get("rope_theta")
    if "full_attention" not in rp and "sliding_attention" not in rp:
        swa = hp.get("rope_local_base_freq", swa)
        if "rope_theta" not in rp and hp.get("rope_theta") is not None:
            rp["rope_theta"] = hp["rope_theta"]
        if "rope_type" not in rp and rp.get("type") is not None:
            rp["rope_type"] = rp["type"]
    return rp.get("full_attention", rp), swa


def _rope_scaling(w, hp: dict, arch: str) -> None:
    full, _ = _rope(hp)
    kind, factor = full.get("rope_type"), full.get("factor")
    if kind in (None, "default") or (kind == "llama3" and arch == "llama"):
        return  # llama3: a rope_freqs tensor (_rope_freqs)
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf_package().RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf_package().RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
        for key, add in (
            ("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
        ):
            if full.get(key) is not None:
                add(full[key])
    else:
        raise LorakitError(
            f"this model's RoPE scaling {kind!r} is not one lorakit writes for llama.cpp's "
            f"{arch} (linear, yarn{', llama3' if arch == 'llama' else ''})"
        )


def _text_keys(w, hp: dict, arch: str) -> None:
    """``TextModel.set_gguf_parameters``: the keys a decoder of these architectures carries."""
    w.add_block_count(hp["num_hidden_layers"])
    for key, add in (
        ("max_position_embeddings", w.add_context_length),
        ("hidden_size", w.add_embedding_length),
        ("intermediate_size", w.add_feed_forward_length),
        ("num_attention_heads", w.add_head_count),
        ("num_key_value_heads", w.add_head_count_kv),
    ):
        if hp.get(key) is not None:
            add(hp[key])
    _rope_scaling(w, hp, arch)
    full, swa = _rope(hp)
    if full.get("rope_theta") is not None:
        w.add_rope_freq_base(full["rope_theta"])
    if swa is not None:
        w.add_rope_freq_base_swa(swa)
    if hp.get("rms_norm_eps") is not None:
        w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])


def _head_dim(hp: dict) -> int:
    return hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]


def _llama_keys(w, hp: dict, arch: str) -> None:
    """``LlamaModel.set_gguf_parameters`` (Llama, Mistral, SmolLM)."""
    _text_keys(w, hp, arch)
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(_head_dim(hp))


def _gemma_keys(w, hp: dict, arch: str) -> None:
    """``GemmaModel.set_gguf_parameters`` (and Gemma2Model's, which adds the soft caps and the
    sliding window)."""
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_block_count(hp["num_hidden_layers"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp.get("num_key_value_heads") or hp["num_attention_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(hp["attn_logit_softcapping"])
        w.add_final_logit_softcapping(hp["final_logit_softcapping"])
        w.add_sliding_window(hp["sliding_window"])


def _gemma3_keys(w, hp: dict, arch: str) -> None:
    """``Gemma3Model.set_gguf_parameters``: the decoder's keys, the final soft cap when set
    and the sliding window unless every layer is global."""
    _text_keys(w, hp, arch)
    if hp.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    if hp.get("sliding_window_pattern") != 1:
        w.add_sliding_window(hp["sliding_window"])


@dataclass(frozen=True)
class Arch:
    """A transformers ``model_type`` as llama.cpp stores it (convert_hf_to_gguf.py's class)."""

    name: str  # llama.cpp's architecture (gguf.MODEL_ARCH_NAMES)
    keys: Callable[[object, dict, str], None] = _text_keys
    permute_qk: bool = False  # LlamaModel.undo_permute: q/k rows in llama.cpp's RoPE order
    norm_shift: float = 0.0  # Gemma's RMSNorm scales by (1 + w), llama.cpp's by w
    output_is_embedding: bool = False  # Gemma 1/2: lm_head skipped, the embedding serves


ARCHS = {
    "llama": Arch("llama", _llama_keys, permute_qk=True),
    "mistral": Arch("llama", _llama_keys, permute_qk=True),
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3"),
    "gemma": Arch("gemma", _gemma_keys, norm_shift=1.0, output_is_embedding=True),
    "gemma2": Arch("gemma2", _gemma_keys, norm_shift=1.0, output_is_embedding=True),
    "gemma3_text": Arch("gemma3", _gemma3_keys, norm_shift=1.0),
}


#: llama.cpp's Gemma 2 and 3 scale attention by 1/sqrt(head_dim), except the 27B models
#: (found by their layer count), which it scales by 1/sqrt(hidden/heads)
#: (``f_attention_scale`` in src/llama-model.cpp); transformers by query_pre_attn_scalar
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def architecture(config) -> Arch:
    """The llama.cpp architecture of a transformers config, or one sentence naming those
    lorakit writes (or saying what llama.cpp would compute otherwise)."""
    mtype = getattr(config, "model_type", None)
    if mtype not in ARCHS:
        raise LorakitError(
            f"lorakit writes GGUF model files for {', '.join(sorted(ARCHS))} models, not "
            f"{mtype!r}; merge with `lorakit merge` and convert that folder with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if mtype in GEMMA_27B_LAYERS and scalar is not None:
        big = config.num_hidden_layers == GEMMA_27B_LAYERS[mtype]
        used = config.hidden_size // config.num_attention_heads if big else config.head_dim
        if scalar != used:
            raise LorakitError(
                f"llama.cpp scales this {mtype} model's attention by 1/sqrt({used}), but "
                f"its query_pre_attn_scalar is {scalar}: llama.cpp would not compute it"
            )
    return ARCHS[mtype]


def _old_gguf(arch: str) -> str:
    from importlib.metadata import version

    return (
        f"the gguf package {version('gguf')} cannot write llama.cpp's {arch} model files "
        "(lorakit is tested with gguf 0.19); pip install -U gguf"
    )


def hparams(config) -> dict:
    """The config as ``save_pretrained`` writes config.json: what the converter reads."""
    return config.to_diff_dict()


# ---- the tensors --------------------------------------------------------------------------


@dataclass
class Tensor:
    """One tensor of the file: its name, its shape (torch order), its ggml type and how to
    compute it (fp32, in llama.cpp's layout) when it is written."""

    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        block, size = gguf_package().GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape, dtype=np.int64)) // block * size


def stored_once(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as ``save_pretrained`` keeps them: each storage once, under its
    first name (a tied output layer is the input embedding)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def file_qtype(name: str, shape: tuple[int, ...], outtype: str):
    """The ggml type the converter stores a tensor in: f32 for 1-D tensors, norms and
    anything but a ``.weight``; else the outtype, or f16 where a row does not split into its
    blocks."""
    gguf = gguf_package()
    q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return q.F32
    qtype = q[OUTTYPES[outtype][0]]
    return qtype if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else q.F16


def _rope_freqs(hp: dict) -> torch.Tensor | None:
    """Llama 3's RoPE frequency factors (``rope_type: llama3``) as the ``rope_freqs`` tensor
    llama.cpp divides the frequencies by: 1 for short wavelengths, ``factor`` for long ones,
    smoothly in between (Meta's Llama 3.1 reference; LlamaModel.generate_extra_tensors)."""
    full, _ = _rope(hp)
    if str(full.get("rope_type", "")).lower() != "llama3":
        return None
    dim = _head_dim(hp)
    base = full.get("rope_theta", 10000.0)
    factor = full.get("factor", 8.0)
    low, high = full.get("low_freq_factor", 1.0), full.get("high_freq_factor", 4.0)
    old = full.get("original_max_position_embeddings", 8192)
    # in fp32 throughout, as transformers' and the converter's own computations are
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    longer = torch.where(wavelen > old / low, torch.tensor(float(factor)), between)
    return torch.where(wavelen < old / high, torch.tensor(1.0), longer)


def tensor_plan(model: nn.Module, outtype: str) -> list[Tensor]:
    """Every tensor of the model file, in the converter's order (generated tensors first,
    then the model's), names from gguf-py's ``TensorNameMap``; nothing computed yet."""
    gguf = gguf_package()
    arch = architecture(model.config)
    hp = hparams(model.config)
    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.name), None)
    if arch_id is None:
        raise LorakitError(_old_gguf(arch.name))
    names = gguf.get_tensor_name_map(arch_id, int(hp["num_hidden_layers"]))
    plan = []
    freqs = _rope_freqs(hp) if arch.name == "llama" else None
    if freqs is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.append(Tensor(name, tuple(freqs.shape), gguf.GGMLQuantizationType.F32, lambda: freqs))
    tensors = stored_once(model)
    embedding = model.get_input_embeddings().weight
    for hf_name, t in tensors.items():
        if arch.output_is_embedding and hf_name == "lm_head.weight":
            if not torch.equal(t, embedding):
                raise LorakitError(
                    f"llama.cpp's {arch.name} uses the input embedding as its output layer, "
                    "but this model's lm_head differs from it (trained or untied)"
                )
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LorakitError(
                f"llama.cpp's {arch.name} architecture has no tensor for this model's {hf_name!r}"
            )
        shape = tuple(t.shape)
        plan.append(
            Tensor(name, shape, file_qtype(name, shape, outtype), _loader(t, hf_name, arch, hp))
        )
    return plan


def _loader(t: torch.Tensor, hf_name: str, arch: Arch, hp: dict) -> Callable[[], torch.Tensor]:
    """The tensor in llama.cpp's layout, computed when written: q/k rows permuted for
    Llama-style RoPE, Gemma's norm offset added."""

    def load() -> torch.Tensor:
        x = t.detach().float()
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            x = rope_permute(x, hp["num_attention_heads"])
        elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            x = rope_permute(x, hp.get("num_key_value_heads") or hp["num_attention_heads"])
        if arch.norm_shift and hf_name.endswith("norm.weight"):
            x = x + arch.norm_shift
        return x

    return load


def encode(t: Tensor) -> np.ndarray:
    """The tensor's bytes in its ggml type (gguf-py's quantizers)."""
    data = t.load().contiguous().numpy()
    return gguf_package().quants.quantize(data, t.qtype)


# ---- the file -------------------------------------------------------------------------------


def write_model_gguf(
    model: nn.Module,
    out: Path,
    outtype: str,
    vocab: dict,
    name: str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Tensor]:
    """Write the (merged, plain transformers) ``model`` to ``out`` as a GGUF model file in
    ``outtype``, with the tokenizer keys ``vocab`` ({key: gguf.GGUFValue}, gguf_vocab.py).

    Streamed: the tensor index first (shapes and types are known without computing
    anything), then each tensor computed, encoded and written in turn, so memory stays the
    model plus one tensor. Atomic: a temporary file renamed into place when complete."""
    gguf = gguf_package()
    arch = architecture(model.config)
    plan = tensor_plan(model, outtype)
    with gguf_file(out, arch.name) as w:
        w.add_type(gguf.GGUFType.MODEL)
        if name:
            w.add_name(name)
        try:
            arch.keys(w, hparams(model.config), arch.name)
        except AttributeError:  # a GGUFWriter without a key this architecture needs
            raise LorakitError(_old_gguf(arch.name)) from None
        w.add_file_type(gguf.LlamaFileType[OUTTYPES[outtype][1]])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, v in vocab.items():
            w.add_key_value(key, v.value, v.type, v.sub_type)
        for t in plan:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in _progress(plan, log):
            write_tensor(w, encode(t))
    return plan


def _progress(plan: list[Tensor], log) -> Iterator[Tensor]:
    step = max(1, len(plan) // 10)
    for i, t in enumerate(plan):
        if log is not None and i % step == 0:
            log(f"writing tensor {i + 1} of {len(plan)} ({t.name})")
        yield t
