"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353;
reference NVlabs/DoRA and PEFT ``tuners/lora/dora.py``).

The adapted weight is a magnitude times a direction (docs/methods/dora.md):

    W' = m ⊙_row V / ||V||_row,    V = W0 + s·BA

with the norm taken over d_in for each OUTPUT row (``dim=1`` of the (d_out, d_in) weight) and
m (d_out) initialized to the row norms of W0, so W' = W0 at step 0. Trainable: m, A, B.
Following §4.3 of the paper, ||V|| is treated as a constant in backward (detached).

Forward without materializing W' (k = m / stopgrad(||V||), x̃ = dropout(x)):

    y = x W0ᵀ + b + (k - 1) ⊙ (x̃ W0ᵀ) + k ⊙ s·x̃ Aᵀ Bᵀ

When dropout is off (or in eval mode) x̃ = x and ``x W0ᵀ`` is the base layer's output minus
its bias: no second matmul with W0. With dropout PEFT recomputes ``x̃ W0ᵀ``; so do we.

# Note: row norms without a weight-sized temporary
||W0 + s·BA||²_row = ||W0||²_row + 2s·rowsum(B ⊙ (W0 Aᵀ)) + s²·rowsum((B·AAᵀ) ⊙ B).
``||W0||²`` is cached (W0 is frozen; the cache is keyed on the weight's storage and version
counter, so an in-place change or a merge invalidates it), ``W0 Aᵀ`` is (d_out, r) and AAᵀ is
(r, r): per forward the only weight-sized tensor is the dequantized W0 of a 4-bit base (a bf16
base is read in row chunks and never copied whole to fp32). PEFT materializes BA and W0 + s·BA
(two weight-sized temporaries, plus a d_in² identity product); see docs/methods/dora.md for
measured time and memory. Rows where V shrank far below W0 lose precision to cancellation in
this sum: those few rows are recomputed directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRA, LoRALinear, _as, at_lora_rate, fused_linear_applies

#: Norms below this are clamped: a zero row (Llama-3.1 o_proj has 511) gives k = m/EPS, and m
#: starts at that row's norm, 0, so k = 0 instead of 0/0 = NaN.
EPS = 1e-12
#: Rows with ||V||² < CANCEL·||W0||² are recomputed exactly (see Note above).
CANCEL = 0.25
#: Elements per chunk when a weight is read in row blocks (16 MB of fp32).
CHUNK_ELEMS = 1 << 22


def _row_chunks(w: torch.Tensor):
    rows = max(1, CHUNK_ELEMS // max(1, w.shape[1]))
    return w.split(rows, dim=0)


@torch.no_grad()
def row_sq_norms(w: torch.Tensor) -> torch.Tensor:
    """fp32 ||w_i||² per row of a (d_out, d_in) matrix, read in row chunks."""
    return torch.cat([c.float().pow(2).sum(dim=1) for c in _row_chunks(w)])


class DoRALinear(LoRALinear):
    """DoRA on ``nn.Linear``, GPT-2 ``Conv1D`` or a bitsandbytes 4-bit linear layer.

    ``lora_magnitude_vector`` (d_out, fp32) is m; ``lora_A``/``lora_B`` are LoRA's.
    """

    adapter_param_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    peft_names = {**LoRALinear.peft_names, "lora_magnitude_vector": "lora_magnitude_vector"}

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ):
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        self._w0_cache: tuple | None = None
        # B = 0 at init, so ||W0 + s·BA|| = ||W0||: m starts at the (dequantized) W0 row norms.
        m = self._w0_sq_norms(self.base_weight_matrix()).sqrt()
        self.lora_magnitude_vector = nn.Parameter(m.to(self.lora_A.device))

    # ---- the norm ------------------------------------------------------------------------
    def _w0_sq_norms(self, w0: torch.Tensor) -> torch.Tensor:
        """||W0||²_row, cached while the base weight's storage and version are unchanged."""
        if torch.compiler.is_compiling() and self._w0_cache is not None:
            # inside a compiled graph the key cannot be read (a data pointer); the cache was
            # brought up to date by before_compile and W0 stays frozen while compiled
            return self._w0_cache[1]
        weight = self.base_layer.weight
        key = (weight.data_ptr(), weight._version, weight.device, w0.dtype)
        if self._w0_cache is None or self._w0_cache[0] != key:
            sq = row_sq_norms(w0)
            self._w0_cache = (key, sq, CANCEL * sq)
        return self._w0_cache[1]

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W0 + s·BA||_row in fp32, detached (See Note: row norms without a weight-sized
        temporary): ||W0||² + rowsum(B ⊙ (2s·W0Aᵀ + s²·B·AAᵀ)), the bracket one addmm. Outside
        autocast: under it, the r-sized products and the bracket would run in bf16 (eight
        casts per call, and the bracket rounded to 8 bits)."""
        w0 = self.base_weight_matrix()
        device = w0.device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return self._weight_norm(w0)
        return self._weight_norm(w0)

    def _weight_norm(self, w0: torch.Tensor) -> torch.Tensor:
        lp = self._parameters
        a, b = _as(lp["lora_A"], torch.float32), _as(lp["lora_B"], torch.float32)
        s = self.scaling
        w0_sq = self._w0_sq_norms(w0)
        # W0 Aᵀ in the weight's own dtype (a bf16 GEMM accumulates in fp32): no fp32 copy of
        # W0 per forward; the cross term is small next to ||W0||², so its rounding is too
        if w0.dtype in (torch.bfloat16, torch.float16):
            w0_at = torch.mm(w0, a.to(w0.dtype).t()).float()
        else:
            chunks = _row_chunks(w0)
            w0_at = (
                torch.mm(_as(chunks[0], torch.float32), a.t())
                if len(chunks) == 1
                else torch.cat([c.float() @ a.T for c in chunks])
            )  # (d_out, r)
        c = torch.addmm(w0_at, b, torch.mm(a, a.t()), beta=2 * s, alpha=s * s)
        sq = torch.linalg.vecdot(b, c).add_(w0_sq)
        # cancellation: W0 ≈ -s·BA in these rows (usually none); compute them directly. In a
        # compiled graph without a branch on their number (a dynamic-size index); eagerly
        # only when there are any (the check costs one comparison, the fix five operators;
        # on a GPU the check is a device-to-host read, so one synchronization per layer and
        # forward: not yet measured there)
        low = sq < self._w0_cache[2]  # CANCEL·||W0||², cached with it
        if torch.compiler.is_compiling() or bool(low.any()):
            bad = low.nonzero().flatten()
            v = w0[bad].float() + s * (b[bad] @ a)
            sq = sq.index_put((bad,), v.pow(2).sum(dim=1))
        return sq.clamp_min_(0).sqrt_()

    def before_compile(self) -> None:
        self._w0_sq_norms(self.base_weight_matrix())

    def magnitude_scale(self) -> torch.Tensor:
        """k = m / stopgrad(||W0 + s·BA||_row), fp32, differentiable in m only."""
        return self._parameters["lora_magnitude_vector"] / self.weight_norm().clamp_min(EPS)

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass():
            return self.base_layer(x)
        if isinstance(self._modules["dropout"], nn.Identity) or not self.training:
            # x̃ = x: y = (k-1)(out - b) + out + k·lora = k·(x W0ᵀ + lora) + b: one multiply
            # (autograd keeps one output-sized tensor, for dk)
            bias = getattr(self._modules["base_layer"], "bias", None)
            dtype = fused_linear_applies(self, x)
            if dtype:
                # V x = x W0ᵀ + s·x Aᵀ Bᵀ as one node, without the bias (See Note: the LoRA
                # linear as one autograd node, in lora.py)
                v = self.fused(x, bias=False, dtype=dtype)
            else:
                out = self.base_layer(x)
                base = out if bias is None else out - bias.to(out.dtype)
                v = self.add_branch(base, x)  # V x = W0 x + s·BA x, one addmm
            k = self.magnitude_scale().to(v.dtype)
            return v * k if bias is None else v * k + bias.to(v.dtype)
        out = self.base_layer(x)
        k = self.magnitude_scale().to(out.dtype)
        x_d = self.dropout(x)
        base_part = F.linear(x_d, self.base_weight_matrix().to(x_d.dtype))
        lora = F.linear(
            F.linear(x_d, self.lora_A.to(x_d.dtype)) * self.scaling, self.lora_B.to(x_d.dtype)
        )
        return out + (k - 1) * base_part.to(out.dtype) + k * lora.to(out.dtype)

    def lora_factors(self):
        """None: W' - W0 = (k - 1) ⊙_row W0 + k ⊙_row s·BA is no product of B and A (the
        magnitude rescales W0's rows), so an export factors it by a truncated SVD."""
        return None

    # ---- merge ------------------------------------------------------------------------------
    # Merging needs ||V|| of the UNmerged weight, which cannot be recovered from W' (its row
    # norms are |m|): keep k from merge time, as PEFT does. Rows with k == 0 (a zero row with
    # m = 0) carry no information in W', so their original values are kept too.
    def merged_weight(self) -> torch.Tensor:
        v = self.base_weight_matrix().float() + self.delta_weight()
        k = self.lora_magnitude_vector.detach().float() / v.norm(dim=1).clamp_min(EPS)
        dead = (k.abs() < torch.finfo(torch.float32).tiny).nonzero().flatten()
        self._merge_state = (k, dead, self.base_weight_matrix()[dead].float().clone())
        return v.mul_(k[:, None])

    def unmerged_weight(self) -> torch.Tensor:
        k, dead, rows = self.__dict__.pop("_merge_state")
        safe = torch.where(k.abs() < torch.finfo(torch.float32).tiny, torch.ones_like(k), k)
        w = self.base_weight_matrix().float() / safe[:, None] - self.delta_weight()
        w[dead] = rows
        return w

    @torch.no_grad()
    def unmerge(self) -> None:
        super().unmerge()
        self.__dict__.pop("_merge_state", None)  # a tied weight is restored without it


class DoRA(LoRA):
    name = "dora"
    summary = "DoRA: magnitude m and direction (W0+sBA)/||.|| (Liu et al. 2024)"
    linear = DoRALinear
    embedding = None
    compare_settings = at_lora_rate(
        "Liu et al. 2024 compare DoRA with LoRA at LoRA's hyper-parameters"
    )

    def peft_fields(self, cfg, model: nn.Module) -> dict:
        return {**super().peft_fields(cfg, model), "use_dora": True}

    def reads_peft(self, pc: dict) -> bool:
        return pc.get("peft_type") == "LORA" and bool(pc.get("use_dora"))

    def tensors_from_peft(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's key for the magnitude may carry ``.weight`` (it is an ``nn.Module`` there);
        adapter names never appear in files."""
        return {
            k.replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): v
            for k, v in tensors.items()
        }


METHOD = DoRA()
