"""4-bit NF4 base weights through bitsandbytes (QLoRA, Dettmers et al. 2023, arXiv 2305.14314).

The base model's linear layers are replaced by bitsandbytes ``Linear4bit`` (``quant_type="nf4"``,
double quantization on): each weight is stored as 4-bit NormalFloat codes in blocks of 64
values sharing one absmax, and those absmaxes are themselves stored 8-bit in blocks of 256
(Dettmers et al. 2023, §2; docs/methods/qlora.md). Each matmul dequantizes the weight to the
compute dtype (bf16 where it is native, else fp32); backward gives only dL/dx. Everything else
stays as loaded: embeddings, norms, the output head, and the adapters (fp32 master weights, see
``adapters/lora.py``).

Backend: bitsandbytes, on CPU and CUDA. torchao's NF4 is not bit-identical to bitsandbytes'
(its absmax scalers are quantized linearly), and PEFT/transformers read bitsandbytes' layout.

bitsandbytes is imported lazily: a run without ``quantize`` never touches it.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import LorakitError
from .module_tree import is_conv1d, output_layer, set_submodule

#: NF4's 16 code values (Dettmers et al. 2023, Appendix E; bitsandbytes ``get_4bit_type("nf4")``,
#: rounded to 4 decimals): asymmetric, with exact -1, 0 and +1.
NF4_CODE = (
    -1.0,
    -0.6962,
    -0.5251,
    -0.3949,
    -0.2844,
    -0.1848,
    -0.0911,
    0.0,
    0.0796,
    0.1609,
    0.2461,
    0.3379,
    0.4407,
    0.5626,
    0.7230,
    1.0,
)

BLOCKSIZE = 64  # values per absmax (bitsandbytes' default for 4-bit, as in QLoRA)


# Note: CPU block size
# bitsandbytes 0.50's CPU NF4 dequantize kernel (used by the forward, the backward and
# ``dequantize_4bit``) indexes absmax per row, as if no 64-value block crossed a row boundary,
# while quantization blocks the flattened weight. With in_features % 64 != 0 it reads the wrong
# (or out-of-range) absmax: relative errors near 1.0 instead of NF4's ~0.15. Real models have
# in_features a multiple of 64 (SmolLM2: 576, 1536); for the others on CPU (tiny test models)
# lorakit uses blocks of 32 when in_features allows it, and refuses otherwise.


def native_bf16() -> bool:
    """Whether bf16 matmuls run natively here: a GPU of compute capability 8.0 or later
    (A100, H100, RTX 30xx; not the emulated bf16 of a T4 or V100), or a CPU with AVX-512 BF16
    or AMX. Elsewhere bf16 is emulated, slower than fp32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return (
        getattr(torch.backends.mkldnn, "is_available", lambda: False)()
        and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    )


def compute_dtype_of(cfg) -> torch.dtype:
    """``adapter.quant_compute_dtype`` as a dtype; ``auto``: bf16 where it is native, else
    fp32 (on an AVX2-only CPU a bf16 dequantize-and-matmul step was measured ~27x slower
    than the fp32 LoRA step)."""
    name = cfg.quant_compute_dtype
    if name == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    return getattr(torch, name)


def blocksize_for(d_in: int, device: torch.device) -> int:
    """Values per absmax for a layer with ``d_in`` inputs quantized on ``device``."""
    if device.type != "cpu" or d_in % BLOCKSIZE == 0:
        return BLOCKSIZE
    if d_in % 32 == 0:
        return 32
    raise LorakitError(
        f"a linear layer with in_features={d_in} cannot be stored in NF4 on CPU "
        "(bitsandbytes' CPU kernel needs a multiple of 32); quantize on CUDA or "
        "leave quantize unset"
    )


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer."""
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and hasattr(
        module.weight, "quant_state"
    )


def _unpack_cpu_inference_layout(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference repacking, if it happened (See Note: CPU fast path)."""
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # optional dependency: bitsandbytes is imported only by a 4-bit run
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            module.weight.data, state
        )
        module.quant_state = module.weight.quant_state


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense tensor: the parameter itself, or NF4 dequantized.

    The dequantized weight comes in the dtype the layer was quantized from (fp32 for lorakit's
    fp32 loads), so merges and norms computed from it (DoRA) do not round it to bf16 first."""
    if is_quantized(module):
        import bitsandbytes.functional as bnbf  # optional dependency (4-bit runs only)

        _unpack_cpu_inference_layout(module)
        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return module.weight


def require_bitsandbytes():
    """The bitsandbytes module, or a LorakitError saying how to get it."""
    try:
        import bitsandbytes  # optional dependency (4-bit runs only)
    except ImportError:
        raise LorakitError(
            "quantize: nf4 needs the bitsandbytes package; install it with "
            "`pip install bitsandbytes` or remove the quantize option"
        ) from None
    return bitsandbytes


# Note: CPU fast path
# On CPUs with AVX512-BF16, bitsandbytes' Linear4bit repacks its weight in place the first time
# it runs in eval mode without grad: a different nibble layout, and absmax stored plain bf16
# (no double quantization, and rounded). After that the forward no longer equals the training
# forward, ``dequantize_4bit`` on the weight returns garbage, and the stats use more memory.
# lorakit switches that path off on the layers it creates, so one layer computes one function
# in train and eval; ``dequantized_weight`` still undoes the repacking on layers made elsewhere.


def nf4_linear(module: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` (NF4, double quantization) computing what ``module`` does.

    ``module`` is an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight (d_in, d_out), transposed here
    to ``Linear4bit``'s (d_out, d_in)). The weight is quantized on the device it lives on, from
    its own dtype (fp32 stays the source: one rounding, to NF4, not two)."""
    bnb = require_bitsandbytes()
    weight = module.weight.detach()
    if is_conv1d(module):
        weight = weight.T
    d_out, d_in = weight.shape
    bias = getattr(module, "bias", None)
    # Built on the meta device: no throw-away random init of a d_out x d_in fp32 weight.
    new = bnb.nn.Linear4bit(
        d_in,
        d_out,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=True,
        quant_type="nf4",
        device="meta",
    )
    blocksize = blocksize_for(d_in, weight.device)  # See Note: CPU block size
    param = bnb.nn.Params4bit(
        weight.contiguous(),
        requires_grad=False,
        blocksize=blocksize,
        compress_statistics=True,
        quant_type="nf4",
        module=new,
    )
    new.weight = param.to(weight.device)  # .to() on a not-yet-quantized Params4bit quantizes
    if bias is not None:
        # bitsandbytes casts the bias to the compute dtype in its first forward; do it now so
        # the layer's dtype (and its memory) is the same before and after that forward.
        new.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
    new.support_avx512bf16_for_cpu = False  # See Note: CPU fast path
    new.train(module.training)
    return new


def _share_code_tables(state, tables: dict) -> None:
    """Point the layer's constant code tables (NF4's 16 values, the 256-entry 8-bit table of
    double quantization) at one copy per device: bitsandbytes gives every layer its own."""
    for owner in (state, getattr(state, "state2", None)):
        if owner is None:
            continue
        key = (len(owner.code), owner.code.device)
        first = tables.setdefault(key, owner.code)
        if first is not owner.code and torch.equal(first, owner.code):
            owner.code = first


def quantize_model(model: nn.Module, cfg) -> nn.Module:
    """Replace every linear layer of ``model`` except the output head by an NF4 ``Linear4bit``.

    In place, layer by layer (the 16-bit weight of one layer is freed before the next is
    quantized), once every layer has been checked: on an error the model is unchanged.
    Embeddings, norms and the output layer are left as they are; layers that are already
    bitsandbytes 4-bit are kept. ``cfg.quant_compute_dtype`` (default auto: bf16 where it is
    native) is the dtype each weight is dequantized to for its matmul."""
    require_bitsandbytes()
    compute_dtype = compute_dtype_of(cfg)
    output = output_layer(model)
    chosen = []
    for name, module in model.named_modules():
        if module is output or is_quantized(module):
            continue
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            continue
        if type(module) is not nn.Linear and not is_conv1d(module):
            raise LorakitError(
                f"layer {name!r} is a {type(module).__name__}, which NF4 "
                "quantization cannot take; load the model with plain 16/32-bit "
                "nn.Linear layers before using quantize: nf4"
            )
        if not module.weight.is_floating_point() or module.weight.is_meta:
            raise LorakitError(
                f"layer {name!r} holds {module.weight.dtype} weights on "
                f"{module.weight.device}; load the model's real 16/32-bit "
                "weights before using quantize: nf4"
            )
        d_in = module.weight.shape[0] if is_conv1d(module) else module.in_features
        blocksize_for(d_in, module.weight.device)  # refuse before changing anything
        chosen.append(name)
    tables: dict = {}
    for name in chosen:
        new = nf4_linear(model.get_submodule(name), compute_dtype)
        _share_code_tables(new.weight.quant_state, tables)
        set_submodule(model, name, new)
    if not chosen and not any(is_quantized(m) for m in model.modules()):
        raise LorakitError(
            "quantize: nf4 found no linear layer to quantize in this model "
            "(only nn.Linear and GPT-2 Conv1D layers can be stored in NF4)"
        )
    return model


def weight_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a linear layer's weight occupies; for NF4: the packed codes and every
    quantization statistic (absmax codes, their absmax, the offset, both code tables)."""
    if not is_quantized(module):
        return [module.weight]
    state = module.weight.quant_state
    tensors = [module.weight.data, state.absmax, state.code]
    if getattr(state, "nested", False):
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def linear_weight_bytes(model: nn.Module, skip_output: bool = True) -> int:
    """Bytes held by every linear layer's weight (without the output head when
    ``skip_output``); a tensor shared by several layers (a code table) is counted once."""
    output = output_layer(model) if skip_output else None
    seen: dict[tuple, int] = {}
    for module in model.modules():
        if module is output or not (isinstance(module, nn.Linear) or is_conv1d(module)):
            continue
        for t in weight_tensors(module):
            seen[(t.device, t.data_ptr())] = t.numel() * t.element_size()
    return sum(seen.values())
