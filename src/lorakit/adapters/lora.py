"""LoRA: a frozen base plus a trainable low-rank bypass (Hu et al. 2021, arXiv 2106.09685).

    y = x W0ᵀ + b + s · dropout(x) Aᵀ Bᵀ,    s = alpha / r  (rsLoRA: alpha / sqrt(r))

A (r, d_in) ~ kaiming_uniform(a=√5) and B (d_out, r) = 0, so ΔW = s·BA = 0 at step 0
(microsoft/LoRA ``loralib/layers.py``). On ``nn.Embedding`` the roles swap: A = 0,
B ~ N(0, 1), no dropout. Tensor names follow PEFT (``lora_A.weight``, ``lora_embedding_A``).

# Note: the LoRA linear as one autograd node
Without dropout the whole layer is :class:`LoRALinearFunction`, forward and backward written
out (h = x Aᵀ, r values per token; g = dL/dy):

    y = x W0ᵀ + b + s·h Bᵀ
    dh = s·g B,   dB = s·gᵀ h,   dA = dhᵀ x,   dx = g W0 + dh A      (no dW0: W0 is frozen)

It saves x and h (what autograd through the plain ops saves too) and the weights, and
replaces the plain graph's nodes per layer (the linears, the casts of A and B and their
backward copies, reshapes, transposes, the sum of the two input gradients) by one. Each
product is the plain ops' own (same GEMMs, same operand order, same roundings), so outputs
and gradients are theirs bit for bit (with A folded into the W0 GEMM, below: within one
rounding of h). With A frozen (LoRA-FA) dA is skipped and x is not
saved.
The GEMMs run in the dtype the plain ops would use (autocast's, else the input's), the
adapter's fp32 master weights are cast once per forward and their gradients come back fp32.
Used where that is exactly the layer: a plain ``nn.Linear``/``Conv1D`` base with plain tensors
(not a 4-bit base or a sharded DTensor), no hooks on it, no active dropout, and eager (in a
compiled graph inductor fuses the plain ops itself); else the plain ops.
The output is returned as a tensor of its own (not a view of the Function's buffer), so code
that modifies a projection's output in place keeps working.
Per call, the layer also pays a fixed Python and dispatch cost, which at the embedded model's
shapes (210 adapted linears) is a few percent of a step: the layer reads its modules' dicts
directly rather than through ``nn.Module.__getattr__`` (~1 us each, 17 per call before),
decides the dtype once, calls the node's C++ ``apply`` (skipping ``Function.apply``'s Python
wrapper where no torch.func transform is active) and applies the scale as the GEMM's alpha
where it is a power of two (the default alpha = 2r: s = 2), one operator instead of a GEMM
and a multiply, with the same numbers: scaling by 2^k is exact. Measured against the previous
code in one process (benchmarks/lora_call_overhead.py's shapes, AVX-512 EPYC): 225 -> 160 us
per linear over a frozen ``nn.Linear`` folded, 170 -> 123 unfolded.

# Note: A folded into the frozen GEMM
h = x Aᵀ is a GEMM with r (16) output columns: on a CPU it runs far below the big GEMM's
rate and reads x a second time (issue #27's profile: the skinny GEMMs were two thirds of the
eager LoRA step's overhead). A training layer therefore keeps W0 and a copy of A stacked in
one weight buffer, [W0; A] of (d_out + r, d_in); the base Parameter's storage becomes the
first d_out rows of it (the Parameter object is kept, so tied weights stay tied), and one
GEMM yields [x W0ᵀ | h]. The copy of A is refreshed at every forward while A trains (r·d_in
values; a fused optimizer such as AdamW(fused=True) updates A without bumping its version
counter, so no cheaper test of "A changed" is sound), and for a frozen A when its version
or storage changed (a load). Backward is the node's.
Each output element is the same dot product over d_in as in the separate GEMMs, but a BLAS
may pick another kernel (another summation order) for r columns alone than for d_out + r: on
the AMD EPYCs measured, fp32 results were equal bit for bit at 512 tokens of the embedded
model's shapes and differed in the last bits of h at a dozen tokens or r 4. So folded, the
node equals the plain ops within one rounding of h, unfolded bit for bit
(tests/unit/test_lora_function.py, both).
Folded where: training (autograd on: evaluation and generation keep the separate GEMMs, so
their outputs are the plain ops' and PEFT's bit for bit), a plain ``nn.Linear`` base (not
Conv1D: its (d_in, d_out) storage cannot take rows), fp32 GEMMs only (base weight and
compute dtype fp32: no gain measured in bf16, below), outside inference mode, and not under
FSDP2 (which gathers, frees and re-allocates the unsharded weight's storage itself: sharding
turns the fold off). Cost: one more copy of A per
layer, in W0's dtype. Moving the model (``.to``) gives W0 a new storage; the fold is rebuilt
at the next forward. :func:`lorakit.unload` gives W0 its own storage back. ``fold_a = False``
on a layer (or on the class) turns it off (benchmarks/run.py's ``+unfolded``).
Measured (benchmarks/RESULTS.md): on one decoder layer's seven linears it removed 81% of the
node's overhead on an AVX2-only EPYC (fp32) and 22% on an AVX-512 BF16 one (bf16), none in
fp32 there; in the whole training step of the embedded model on the AVX-512 machine folded
and unfolded steps were equal within the noise in both precisions; on the AVX2 machine the
whole fp32 step was too (within that VM's +-10% noise: benchmarks/RESULTS.md). With the
real layer against itself unfolded (benchmarks/lora_fold.py: 45 interleaved rounds, one
process, 512 tokens) on a second AVX-512 BF16 EPYC, folded was slower at all four of the
model's shapes in bf16 (by 2-11%, ~64 ms of a ~2 s step if it added up), in fp32 from 6%
slower to 4% faster; yet in the whole bf16 step there (19 interleaved rounds) folded and
unfolded were again equal within the noise (1.22x and 1.24x the frozen step). With the two
AVX-512 machines' per-layer figures disagreeing and no whole-step gain in 16-bit on either,
16-bit GEMMs (bf16 training, and every CUDA run, where the fold was never measured) take the
plain node: ``fold_dtypes`` (the benchmark widens it); fp32 keeps the fold, where the AVX2
machine measured its per-layer gain. A layer that stops folding (W0 cast to bf16) drops its
old buffer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from ..module_tree import is_conv1d
from .base import (
    AdapterLayer,
    Method,
    Setting,
    copy_into,
    kaiming_uniform_,
    linear_dims,
    make_dropout,
)

_PLAIN = (torch.Tensor, nn.Parameter)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer's GEMM runs in for input ``x``: autocast's, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call where it is one already (a dispatch saved per use)."""
    return t if t.dtype == dtype else t.to(dtype)


class LoRALinearFunction(torch.autograd.Function):
    """y = x W0ᵀ + b + s·(x Aᵀ) Bᵀ as one node (See Note: the LoRA linear as one autograd
    node). ``w0`` (d_out, d_in) is frozen; ``a``/``b`` may be frozen (no gradient, and A
    frozen: x is not saved); ``grad_b_fn`` maps B's gradient (LoRA-FA v2's projection)."""

    @staticmethod
    def forward(
        ctx,
        x,
        w0,
        bias,
        a,
        b,
        scaling: float,
        dtype: torch.dtype,
        grad_b_fn: Callable | None = None,
        fold: torch.Tensor | None = None,
    ):
        x2 = _as(x.reshape(-1, x.shape[-1]), dtype)
        b_ = _as(b, dtype)
        if fold is None:
            w, a_ = _as(w0, dtype), _as(a, dtype)
            h = torch.mm(x2, a_.t())
            y = torch.mm(x2, w.t()) if bias is None else torch.addmm(_as(bias, dtype), x2, w.t())
        else:  # See Note: A folded into the frozen GEMM
            # the buffer is in the compute dtype (LoRALinear.folded): save the Parameters
            # themselves, as unfolded
            d, w, a_ = w0.shape[0], w0, _as(a, dtype)
            yh = (
                torch.mm(x2, fold.t())
                if bias is None
                else torch.addmm(
                    torch.cat([_as(bias, dtype), bias.new_zeros(fold.shape[0] - d, dtype=dtype)]),
                    x2,
                    fold.t(),
                )
            )
            y, h = yh[:, :d], yh[:, d:].contiguous()  # h alone saved: not yh's storage
        y.addmm_(h, b_.t(), alpha=scaling)
        ctx.save_for_backward(x2 if a.requires_grad else None, h, w, a_, b_)
        ctx.scaling, ctx.grad_b_fn = scaling, grad_b_fn
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype, a.dtype, b.dtype)
        # not y.view: a view made inside a Function may not be modified in place afterwards
        return _unsafe_view(y, (*x.shape[:-1], y.shape[-1]))

    @staticmethod
    def backward(ctx, grad):
        x2, h, w, a_, b_ = ctx.saved_tensors
        s = ctx.scaling
        x_dtype, bias_dtype, a_dtype, b_dtype = ctx.dtypes
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g = _as(grad.reshape(-1, grad.shape[-1]), h.dtype)
        dx = dbias = da = db = None
        dh = _scaled_mm(g, b_, s) if (need_x or need_a) else None
        if need_b:
            db = _as(_scaled_mm(g.t(), h, s), b_dtype)
            if ctx.grad_b_fn is not None:  # in B's (master) dtype: no rounding to bf16 after
                db = ctx.grad_b_fn(db)
        if need_a:
            da = _as(torch.mm(dh.t(), x2), a_dtype)
        if need_bias:
            dbias = _as(g.sum(0), bias_dtype)
        if need_x:
            # two GEMMs and an add, not one GEMM accumulated into the other: in bf16 that
            # would round once instead of three times, no longer the plain ops' numbers; the
            # add in x's dtype (under autocast the plain ops cast each part back before it)
            dx = _as(torch.mm(g, w), x_dtype).add_(_as(torch.mm(dh, a_), x_dtype))
            dx = dx.view(*grad.shape[:-1], w.shape[1])
        return dx, None, dbias, da, db, None, None, None, None


_unsafe_view = torch.ops.aten._unsafe_view.default
#: the C++ ``apply`` under ``Function.apply``'s Python wrapper, which (outside torch.func
#: transforms, where it routes the call through functorch) only binds default arguments for
#: a ``setup_context`` this Function does not have and unwraps tensors of finished transforms
_apply_node = super(torch.autograd.Function, LoRALinearFunction).apply
#: private torch API: where a torch release lacks it, every call takes ``Function.apply``
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)


def lora_linear_node(*args) -> torch.Tensor:
    """``LoRALinearFunction.apply(*args)``, ~7 us cheaper per call outside torch.func."""
    if _transforms_active is None or _transforms_active():
        return LoRALinearFunction.apply(*args)
    return _apply_node(*args)


_ZEROS: dict = {}


def _scaled_mm(m1: torch.Tensor, m2: torch.Tensor, s: float) -> torch.Tensor:
    """s · (m1 @ m2) as autograd's backward of ``addmm(..., alpha=s)`` computes it (the
    product, then the scale), bit for bit: one GEMM with the scale as its alpha where s is a
    power of two (multiplying the accumulator or the rounded product by 2^k is exact, so the
    two are equal), else the GEMM and a multiply; s = 1: the GEMM alone."""
    if s == 1.0:
        return torch.mm(m1, m2)
    if s > 0 and math.frexp(s)[0] == 0.5:
        key = (m1.dtype, m1.device)
        z = _ZEROS.get(key)
        if z is None:
            z = _ZEROS[key] = torch.zeros((), dtype=m1.dtype, device=m1.device)
        return torch.addmm(z, m1, m2, beta=0, alpha=s)  # beta 0: the zero is never read
    return torch.mm(m1, m2).mul_(s)


def fused_linear_applies(layer: AdapterLayer, x: torch.Tensor) -> torch.dtype | None:
    """The dtype :class:`LoRALinearFunction` runs ``layer`` on ``x`` in, where it is exactly
    the layer (See Note: the LoRA linear as one autograd node), else None: dropout inactive,
    a plain dense base without hooks or a forward of its own, plain tensors, the base weight
    frozen, and dtypes the plain ops would accept. Reads the modules' dicts directly (this
    runs at every call of every adapted linear: ``nn.Module.__getattr__`` costs ~1 us)."""
    if torch.compiler.is_compiling():
        return None  # train.compile: inductor fuses the plain ops itself
    mods = layer._modules
    base = mods["base_layer"]
    if layer.training and not isinstance(mods["dropout"], nn.Identity):
        return None
    if type(base) is not nn.Linear and not is_conv1d(base):
        return None
    if (
        base._forward_hooks
        or base._forward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or base._backward_hooks
        or base._backward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
        or "forward" in base.__dict__
    ):
        # the Function skips base_layer.__call__: its hooks, and a forward replaced on the
        # instance (accelerate's offload hooks move the weight in first), would not run
        return None
    bp, lp = base._parameters, layer._parameters
    w = bp.get("weight")  # None: a weight not registered as a Parameter (a plain attribute)
    if (
        type(w) not in _PLAIN
        or w.requires_grad
        or type(x) not in _PLAIN
        or not x.is_floating_point()
    ):
        return None
    bias = bp.get("bias")
    if (
        (bias is not None and type(bias) not in _PLAIN)
        or type(lp["lora_A"]) not in _PLAIN
        or type(lp["lora_B"]) not in _PLAIN
    ):
        return None
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtype = x.dtype
    return dtype if w.dtype == dtype else None


class _Fold(list):
    """[buffer, A's key, the buffer's A rows, W0's rows] of a folded layer; a deep copy of the
    layer gets none (its W0 is a copy of its own, and the copy folds again when it trains)
    rather than a stale buffer."""

    def __deepcopy__(self, memo):
        return None


class LoRALinear(AdapterLayer):
    """LoRA on ``nn.Linear``, GPT-2 ``Conv1D`` or a bitsandbytes 4-bit linear layer."""

    adapter_param_names = ("lora_A", "lora_B")
    peft_names = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}
    #: keep A folded into the frozen GEMM's weight (See Note: A folded into the frozen GEMM)
    fold_a = True
    #: the compute dtypes it is folded in (16-bit: no measured gain, same Note)
    fold_dtypes: tuple = (torch.float32,)

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ):
        super().__init__(base_layer, r, alpha, use_rslora)
        self.in_features, self.out_features = linear_dims(base_layer)
        # Adapter weights are fp32 master weights whatever the base dtype; the forward casts
        # them to the activation dtype (a cheap r-sized cast, never a d-sized one).
        for name, p in self.new_adapter_parameters().items():
            setattr(self, name, p)
        self.dropout = make_dropout(dropout)

    def new_adapter_parameters(self) -> dict[str, nn.Parameter]:
        dev = self.base_layer.weight.device
        a = kaiming_uniform_(torch.empty(self.r, self.in_features, device=dev))
        return {
            "lora_A": nn.Parameter(a),
            "lora_B": nn.Parameter(torch.zeros(self.out_features, self.r, device=dev)),
        }

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def lora_factors(self):
        return self.lora_B.detach().float(), self.lora_A.detach().float(), self.scaling

    def set_lora_factors(self, b: torch.Tensor, a: torch.Tensor) -> None:
        copy_into(self.lora_B, b)
        copy_into(self.lora_A, a)

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """s · dropout(x) Aᵀ Bᵀ; the scale is applied to the r-sized intermediate."""
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return F.linear(F.linear(self.dropout(x), a) * self.scaling, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.disabled or self.merged):  # self.bypass(), without the call
            dtype = fused_linear_applies(self, x)
            if dtype:
                return self.fused(x, dtype=dtype)
        out = self.base_layer(x)
        if self.bypass():
            return out
        return self.add_branch(out, self.dropout(x))

    def fused(
        self, x: torch.Tensor, bias: bool = True, grad_b_fn=None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """x W0ᵀ (+ b) + s·x Aᵀ Bᵀ by :class:`LoRALinearFunction`, in ``dtype`` (what
        :func:`fused_linear_applies` returned; by default computed again)."""
        if dtype is None:
            dtype = compute_dtype(x)
        base = self._modules["base_layer"]
        bp, lp = base._parameters, self._parameters
        w, a = bp["weight"], lp["lora_A"]
        if type(base) is nn.Linear:
            fold = self.folded(dtype, w, a)
        else:  # Conv1D: (d_in, d_out) storage, never folded
            w, fold = w.T, None
        return lora_linear_node(
            x,
            w,
            bp.get("bias") if bias else None,
            a,
            lp["lora_B"],
            self.scaling,
            dtype,
            grad_b_fn,
            fold,
        )

    def folded(
        self, dtype: torch.dtype, w: torch.Tensor | None = None, a: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The [W0; A] buffer (See Note: A folded into the frozen GEMM), built on first use and
        rebuilt when W0 was given another storage; A's rows copied from A at each call while A
        trains. None where the layer is not folded. ``w``/``a``: the base weight and A, where
        the caller has them."""
        base = self._modules["base_layer"]
        if w is None:
            w, a = base._parameters["weight"], self._parameters["lora_A"]
        if (
            not (self.fold_a and torch.is_grad_enabled())
            or dtype not in self.fold_dtypes
            or (type(base) is not nn.Linear or type(w) is not nn.Parameter or w.dtype != dtype)
        ):
            if "_fold" in self.__dict__ and w.data_ptr() != self.__dict__["_fold"][3]:
                # W0 was given another storage (e.g. cast to bf16) and this layer no longer
                # folds: do not keep the old weight-sized buffer alive
                del self.__dict__["_fold"]
            return None
        st = self.__dict__.get("_fold")
        # W0 still lives in the buffer: its first element is the buffer's (the buffer is kept
        # alive here, so no other tensor can start at that address), same dtype and rows
        stale = (
            st is None
            or w.data_ptr() != st[3]
            or w.dtype != st[0].dtype
            or w.shape[0] + self.r != st[0].shape[0]
            or w.shape[1] != st[0].shape[1]
        )
        if stale or a.requires_grad or st[1] != (a.data_ptr(), a._version):
            if torch.is_inference_mode_enabled() or w.is_inference():
                return None  # an inference-mode buffer could not be used by autograd later
            with torch.no_grad():
                if stale:
                    d = w.shape[0]
                    buf = w.new_empty((d + self.r, w.shape[1]))
                    buf[:d].copy_(w)
                    w.data = buf[:d]  # the Parameter object stays (ties, optimizer, names)
                    st = self.__dict__["_fold"] = _Fold([buf, None, buf[d:], buf.data_ptr()])
                st[2].copy_(a)
                st[1] = (a.data_ptr(), a._version)
        return st[0]

    def unfold(self) -> None:
        """Give W0 a storage of its own again (:func:`lorakit.unload`)."""
        st = self.__dict__.pop("_fold", None)
        w = self.base_layer.weight
        if st is not None and w.data_ptr() == st[0].data_ptr():
            with torch.no_grad():
                w.data = w.detach().clone()

    def add_branch(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + s·x Aᵀ Bᵀ, the scale and the add fused into one addmm (x: already dropped)."""
        h = F.linear(x.to(out.dtype), self.lora_A.to(out.dtype))
        flat = torch.addmm(
            out.reshape(-1, out.shape[-1]),
            h.reshape(-1, self.r),
            self.lora_B.to(out.dtype).t(),
            alpha=self.scaling,
        )
        return flat.view(out.shape)


class LoRAEmbedding(AdapterLayer):
    """LoRA on ``nn.Embedding``: y = E[x] + s · Aᵀ[x] Bᵀ (A: (r, vocab), B: (dim, r))."""

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B")
    peft_names = {"lora_embedding_A": "lora_embedding_A", "lora_embedding_B": "lora_embedding_B"}
    takes_dropout = False

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, use_rslora: bool = False):
        super().__init__(base_layer, r, alpha, use_rslora)
        for name, p in self.new_adapter_parameters().items():
            setattr(self, name, p)

    def new_adapter_parameters(self) -> dict[str, nn.Parameter]:
        vocab, dim = self.base_layer.weight.shape
        dev = self.base_layer.weight.device
        return {
            "lora_embedding_A": nn.Parameter(torch.zeros(self.r, vocab, device=dev)),
            "lora_embedding_B": nn.Parameter(nn.init.normal_(torch.empty(dim, self.r, device=dev))),
        }

    def base_weight_matrix(self) -> torch.Tensor:
        return self.base_layer.weight  # (vocab, dim): the layout ΔW is given in

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling

    def lora_factors(self):
        # ΔW (vocab, dim) = s·(B_e A_e)ᵀ = s·A_eᵀ B_eᵀ
        return (
            self.lora_embedding_A.detach().float().T,
            self.lora_embedding_B.detach().float().T,
            self.scaling,
        )

    def set_lora_factors(self, b: torch.Tensor, a: torch.Tensor) -> None:
        copy_into(self.lora_embedding_A, b.T)
        copy_into(self.lora_embedding_B, a.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.bypass():
            return out
        emb = self.base_layer
        after_a = F.embedding(
            x,
            self.lora_embedding_A.T,
            emb.padding_idx,
            emb.max_norm,
            emb.norm_type,
            emb.scale_grad_by_freq,
            emb.sparse,
        )
        b = self.lora_embedding_B.to(after_a.dtype)
        return out + (F.linear(after_a, b) * self.scaling).to(out.dtype)


#: LoRA's learning rate, at which the LoRA family's papers compare their methods with it
LORA_LR = 2e-4


def at_lora_rate(source: str) -> tuple[Setting, ...]:
    """``compare_settings`` of a method trained at LoRA's rate, as ``source`` says."""
    return (Setting("train.lr", LORA_LR, source),)


class LoraConfigCodec:
    """PEFT's ``LoraConfig`` fields, both ways, for a :class:`Method` (a mixin: PEFT's
    ``AdaLoraConfig`` extends ``LoraConfig``, lorakit's AdaLoRA is no LoRA subclass)."""

    def peft_fields(self, cfg, model: nn.Module) -> dict:
        return {
            **super().peft_fields(cfg, model),
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "use_dora": False,
            "use_rslora": cfg.use_rslora,
            "rank_pattern": dict(cfg.rank_pattern),
            "alpha_pattern": dict(cfg.alpha_pattern),
            "init_lora_weights": True,
        }

    def options_from_peft(self, pc: dict) -> dict:
        return {
            **super().options_from_peft(pc),
            "alpha": pc.get("lora_alpha", 8),
            "dropout": pc.get("lora_dropout", 0.0) or 0.0,
            "use_rslora": bool(pc.get("use_rslora", False)),
            "alpha_pattern": pc.get("alpha_pattern") or {},
            "rank_pattern": pc.get("rank_pattern") or {},
        }

    def peft_recorded(self, cfg) -> dict:
        return {**super().peft_recorded(cfg), "lora_alpha": cfg.alpha, "use_rslora": cfg.use_rslora}


class LoRA(LoraConfigCodec, Method):
    name = "lora"
    summary = "LoRA: frozen base + trainable low-rank B·A bypass (Hu et al. 2021)"
    linear = LoRALinear
    embedding = LoRAEmbedding
    dm_dd_figure = True
    compare_settings = at_lora_rate(
        "Hu et al. 2021 and the QLoRA paper (Dettmers et al. 2023, "
        "App. B: 2e-4 for models up to 13B); PEFT's examples"
    )
    #: a PEFT LoRA adapter without lorakit.json is this method's; False for a method PEFT
    #: sees as plain LoRA, which only lorakit.json names (LoRA-FA, LoRA-drop)
    reads_plain_lora = True

    def reads_peft(self, pc: dict) -> bool:
        return self.reads_plain_lora and pc.get("peft_type") == "LORA" and not pc.get("use_dora")


METHOD = LoRA()
