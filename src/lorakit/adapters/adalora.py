"""AdaLoRA: SVD-form adapters whose rank budget moves to the matrices that matter
(Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
arXiv 2303.10512; reference QingruZhang/AdaLoRA and PEFT's port, ``peft/tuners/adalora``).

    y = x W0ᵀ + b + dropout(x) (A ⊙ E)ᵀ Bᵀ · alpha / (ranknum + 1e-5)

A = Q (r, d_in) and B = P (d_out, r) hold the singular vectors, E = Λ (r, 1) the singular values.
E = 0 and A, B ~ N(0, 0.02²) at init (PEFT ``AdaLoraLayer.reset_lora_parameters``). ``ranknum``
is the rank a layer starts with (``init_r``) and stays so after pruning: the scale never changes.

Training adds γ·mean over all A and B of ||AAᵀ - I||_F and ||BᵀB - I||_F (:func:`orthogonal_
regularizer`), and after every optimizer step the :class:`RankAllocator` scores each triplet
(E_i, A_i·, B_·i) and zeroes the E_i of the least important ones down to a shrinking global
budget (docs/methods/adalora.md). The training loop drives both through :class:`AdaLoRAHooks`;
a user never calls the allocator by hand (PEFT's most common AdaLoRA complaint, #432/#1327).

Saved in PEFT's ADALORA layout: ``lora_A``/``lora_B``/``lora_E`` (no ``.weight``) pruned to the
kept ranks, and ``rank_pattern`` = {"<module>.lora_E": [kept?] * init_r} in adapter_config.json.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..errors import LorakitError
from ..options import MethodOptions
from ..sharding import full, like
from .base import (
    AdapterLayer,
    Budget,
    Method,
    MethodHooks,
    Setting,
    budget_fraction,
    layers_of,
    linear_dims,
    make_dropout,
    state_of,
)
from .lora import LoraConfigCodec


class AdaLoRAOptions(MethodOptions):
    """``adapter.adalora``: the rank budget and its schedule (Zhang et al. 2023, §3.2;
    defaults of PEFT's AdaLoraConfig)."""

    init_r: int = Field(12, gt=0, description="initial rank of every matrix")
    target_r: int = Field(8, gt=0, description="average final rank")
    tinit: int = Field(0, ge=0, description="warm-up steps before pruning")
    tfinal: int = Field(0, ge=0, description="final steps at the target budget")
    delta_t: int = Field(10, gt=0, description="steps between two maskings")
    sensitivity_beta: float = Field(
        0.85, ge=0, lt=1, description="EMA rate of the sensitivity |p·grad| (the paper's β1)"
    )
    uncertainty_beta: float = Field(
        0.85, ge=0, lt=1, description="EMA rate of the sensitivity's uncertainty (the paper's β2)"
    )
    orth_reg_weight: float = Field(0.5, ge=0, description="weight γ of the orthogonal regularizer")

    RENAMED: ClassVar[dict[str, str]] = {
        "beta1": "sensitivity_beta",
        "beta2": "uncertainty_beta",
        "deltaT": "delta_t",
    }

    @model_validator(mode="after")
    def _budget(self) -> AdaLoRAOptions:
        if self.target_r > self.init_r:
            raise ValueError("target_r must not exceed init_r")
        return self


def adalora_scaling(alpha: float, ranknum: float) -> float:
    """PEFT's AdaLoRA scale: alpha / (initial rank + 1e-5), kept when the rank is pruned."""
    return alpha / (ranknum + 1e-5)


class AdaLoRALinear(AdapterLayer):
    """AdaLoRA's SVD-form adapter on ``nn.Linear``, GPT-2 ``Conv1D`` or a 4-bit linear layer.

    ``rank_mask`` (bool, one entry per row of A) says which triplets the allocator keeps; the
    masked ones have E_i = 0 right after a masking step and are dropped when saving.
    """

    adapter_param_names = ("lora_A", "lora_B", "lora_E")
    peft_names = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_E": "lora_E"}

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base_layer, r, alpha)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.dropout = make_dropout(dropout)
        # PEFT: scaling = lora_alpha, divided by ranknum + 1e-5 in the forward; ranknum is the
        # initial rank and is kept when a layer is resized to its pruned rank.
        self.ranknum = float(self.r)
        self.scaling = adalora_scaling(self.alpha, self.ranknum)
        self._make_parameters(self.r)
        with torch.no_grad():
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def _make_parameters(self, r: int) -> None:
        dev = self.base_layer.weight.device
        self.r = r
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, device=dev))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))
        self.register_buffer(
            "rank_mask", torch.ones(r, dtype=torch.bool, device=dev), persistent=False
        )

    def set_rank(self, r: int) -> None:
        """Re-shape to rank ``r`` (zeros) before loading a pruned adapter; ranknum is kept."""
        if not 0 <= r <= self.ranknum:
            raise ValueError(f"rank {r} outside [0, {self.ranknum:g}]")
        self._make_parameters(r)

    @property
    def rank(self) -> int:
        """The number of triplets the allocator keeps."""
        return int(self.rank_mask.sum())

    def rank_pattern(self) -> list[bool]:
        """PEFT's ``rank_pattern`` entry: one flag per initial rank (rows dropped by an earlier
        pruning count as not kept)."""
        return self.rank_mask.tolist() + [False] * (int(self.ranknum) - self.r)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float())) * self.scaling

    def lora_factors(self):
        """Exact: ΔW = s·P·diag(λ)·Q, so B = P·diag(λ), A = Q over the triplets with λ_i ≠ 0
        (the kept ones: the allocator zeroes a masked triplet's λ_i, which then adds
        nothing)."""
        keep = self.lora_E.detach().view(-1) != 0
        e = self.lora_E.detach().float()[keep].view(1, -1)
        return (
            self.lora_B.detach().float()[:, keep] * e,
            self.lora_A.detach().float()[keep],
            self.scaling,
        )

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        a = (self.lora_A * self.lora_E).to(x.dtype)
        return F.linear(F.linear(self.dropout(x), a) * self.scaling, self.lora_B.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.bypass():
            return out
        return out + self.lora_branch(x).to(out.dtype)

    def peft_state(self) -> dict[str, torch.Tensor]:
        """The kept triplets only (PEFT saves AdaLoRA pruned to its rank_pattern)."""
        keep = self.rank_mask
        if bool(keep.all()):
            return super().peft_state()
        return {
            "lora_A": self.lora_A[keep],
            "lora_B": self.lora_B[:, keep],
            "lora_E": self.lora_E[keep],
        }

    def expected_peft_shapes(self) -> dict[str, tuple[int, ...]]:
        # What load_peft_state copies into: the layer's current shape (the on_load hook has
        # already resized it to the saved rank).
        return {k: tuple(getattr(self, k).shape) for k in self.peft_names}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_peft_state(state)
        self.rank_mask.fill_(True)

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, kept={self.rank}, ranknum={self.ranknum:g}, alpha={self.alpha:g}, "
            f"scaling={self.scaling:g}"
        )


def adalora_layers(model: nn.Module) -> dict[str, AdaLoRALinear]:
    return layers_of(model, AdaLoRALinear)


def orthogonal_regularizer(model: nn.Module, weight: float) -> torch.Tensor | None:
    """γ · mean over every A and every B of ||AAᵀ - I||_F, ||BᵀB - I||_F.

    As PEFT's ``AdaLoraModel.forward``: one mean over the 2·(#layers) matrices, not a mean per
    kind. Returns None when there is nothing to regularize or γ = 0."""
    terms = []
    for layer in adalora_layers(model).values():
        a, b = full(layer.lora_A), full(layer.lora_B)  # whole matrices under FSDP
        for cov in (a @ a.T, b.T @ b):
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
    if not terms or weight == 0:
        return None
    return weight * (torch.stack(terms).sum() / len(terms))


class RankAllocator:
    """AdaLoRA's budget schedule and importance-based masking (PEFT ``RankAllocator``).

    Importance per entry, once per optimizer step: I = |p ⊙ ∇p|, Ī ← β1 Ī + (1-β1) I,
    Ū ← β2 Ū + (1-β2) |I - Ī|, s = Ī·Ū. A triplet's score S_i = s(E_i) + mean_j s(A_ij) +
    mean_j s(B_ji). Budget b(t): b0 up to t_init, then b_T + (b0 - b_T)(1 - (t - t_init) /
    (T - t_init - t_final))³ (truncated to an int), masking every ΔT steps; at t = T - t_final
    a last masking at b_T freezes the pattern, re-applied every step after.

    ``step`` counts optimizer steps done, 1..T (PEFT's ``global_step``): with t_final = 0 the
    final masking is on the last step.
    """

    def __init__(self, layers: dict[str, AdaLoRALinear], cfg: AdaLoRAOptions, total_steps: int):
        if not cfg.tinit < total_steps - cfg.tfinal:
            raise LorakitError(
                f"adalora needs a budgeting phase: adapter.adalora.tinit ({cfg.tinit}) must be "
                f"less than the run's {total_steps} optimizer steps minus adapter.adalora.tfinal "
                f"({cfg.tfinal})"
            )
        self.layers = layers
        self.cfg = cfg
        self.total_steps = int(total_steps)
        self.init_budget = sum(layer.r for layer in layers.values())
        self.target_budget = cfg.target_r * len(layers)
        self.budget = self.init_budget
        self._ema_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self._ema_unc: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask) at ``step`` (PEFT ``budget_schedule``)."""
        tinit, tfinal, total = self.cfg.tinit, self.cfg.tfinal, self.total_steps
        if step <= tinit:
            return self.init_budget, False
        if step > total - tfinal:
            return self.target_budget, True
        mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
        budget = int((self.init_budget - self.target_budget) * (mul_coeff**3) + self.target_budget)
        return budget, step % self.cfg.delta_t == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        b1, b2 = self.cfg.sensitivity_beta, self.cfg.uncertainty_beta
        for name, layer in self.layers.items():
            for pname in layer.adapter_param_names:
                p = getattr(layer, pname)
                key = (name, pname)
                ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                avg = self._ema_ipt.get(key, torch.zeros_like(p))
                unc = self._ema_unc.get(key, torch.zeros_like(p))
                # same expression order as PEFT: the masks must agree bit for bit
                avg = b1 * avg + (1 - b1) * ipt
                self._ema_ipt[key] = avg
                self._ema_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """S_i per layer, shape (r,)."""
        out = {}
        for name, layer in self.layers.items():
            # whole tensors under FSDP: every process computes the same scores and masks
            s = {
                p: full(self._ema_ipt[(name, p)] * self._ema_unc[(name, p)])
                for p in layer.adapter_param_names
            }
            # A is (r, d_in): mean over a row; B is (d_out, r): mean over a column.
            out[name] = s["lora_E"].view(-1) + (s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0))
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Zero E_i of every triplet scoring at or below the (b0 - budget)-th smallest score."""
        scores = self.triplet_scores()
        k = self.init_budget - budget
        if k <= 0:  # b_T == b0 (or a larger budget): nothing to prune; kthvalue(k=0) would fail
            for layer in self.layers.values():
                layer.rank_mask.fill_(True)
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values.item()
        for name, layer in self.layers.items():
            layer.rank_mask.copy_(scores[name] > threshold)
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        for layer in self.layers.values():
            layer.lora_E.masked_fill_(like(~layer.rank_mask.view(-1, 1), layer.lora_E), 0.0)

    def step(self, step: int) -> int:
        """PEFT ``AdaLoraModel.update_and_allocate``; returns the budget in force."""
        final_start = self.total_steps - self.cfg.tfinal
        if step < final_start:
            self.update_importance()
            budget, mask_now = self.budget_schedule(step)
            if mask_now:
                self.mask_to_budget(budget)
                self.budget = budget
        elif step == final_start:  # the last allocation: scores frozen from here on
            self.mask_to_budget(self.target_budget)
            self.budget = self.target_budget
            self._ema_ipt.clear()
            self._ema_unc.clear()
        else:
            self.apply_masks()
        return self.budget


class AdaLoRAHooks(MethodHooks):
    """What the training loop calls for ``method: adalora`` (registry ``hooks=``).

    One instance per run: it holds the allocator's importance averages (saved in checkpoints
    through :meth:`state_tensors` / :meth:`load_state_tensors`)."""

    def __init__(self):
        self.allocator: RankAllocator | None = None

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        return orthogonal_regularizer(model, state_of(model).config.options.orth_reg_weight)

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """After ``optimizer.step()``, before ``zero_grad()``; ``step`` = optimizer steps done."""
        st = state_of(model)
        if self.allocator is None or self.allocator.total_steps != total_steps:
            self.allocator = RankAllocator(adalora_layers(model), st.config.options, total_steps)
        budget = self.allocator.step(step)
        st.extras["adalora"] = {
            "total_step": int(total_steps),
            "step": int(step),
            "budget": int(budget),
        }

    # Checkpoint/resume (checkpoint.py): the importance averages, the masks, the schedule.
    def state_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {f"{n}.rank_mask": m.rank_mask for n, m in adalora_layers(model).items()}
        alloc = self.allocator
        if alloc is not None:
            out["allocator.total_steps"] = torch.tensor(alloc.total_steps)
            out["allocator.budget"] = torch.tensor(alloc.budget)
            for (n, p), t in alloc._ema_ipt.items():
                out[f"{n}.{p}.ema_ipt"] = t
            for (n, p), t in alloc._ema_unc.items():
                out[f"{n}.{p}.ema_unc"] = t
        return out

    def load_state_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        layers = adalora_layers(model)
        for n, m in layers.items():
            if f"{n}.rank_mask" in tensors:
                m.rank_mask.copy_(tensors[f"{n}.rank_mask"])
        if "allocator.total_steps" not in tensors:
            return
        alloc = RankAllocator(
            layers, state_of(model).config.options, int(tensors["allocator.total_steps"])
        )
        alloc.budget = int(tensors["allocator.budget"])
        for n, m in layers.items():
            for p in m.adapter_param_names:
                ref = getattr(m, p)  # laid out as the parameter is (a shard under FSDP)
                if f"{n}.{p}.ema_ipt" in tensors:
                    alloc._ema_ipt[(n, p)] = like(tensors[f"{n}.{p}.ema_ipt"], ref)
                    alloc._ema_unc[(n, p)] = like(tensors[f"{n}.{p}.ema_unc"], ref)
        self.allocator = alloc

    def summary(self, model: nn.Module) -> dict:
        """Kept rank of every adapted module and the totals (summary.json, the run's table)."""
        layers = adalora_layers(model)
        ranks = {n: layer.rank for n, layer in layers.items()}
        opts = state_of(model).config.options
        return {
            "ranks": ranks,
            "total_rank": sum(ranks.values()),
            "init_total_rank": int(sum(layer.ranknum for layer in layers.values())),
            "target_total_rank": opts.target_r * len(layers),
        }

    def on_load(self, model: nn.Module, extras: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Shrink each layer to the rank saved in the file (PEFT's rank_pattern pruning); a
        tensor larger than init_r is left for io's shape check to report."""
        for name, layer in adalora_layers(model).items():
            saved = tensors.get(f"{name}.lora_E")
            if saved is not None and saved.ndim == 2 and saved.shape[0] < layer.r:
                layer.set_rank(int(saved.shape[0]))


def _init_r(b: Budget) -> int:
    """1.5 x LoRA's rank"""
    return math.ceil(1.5 * b.r)


def _target_r(b: Budget) -> int:
    """LoRA's rank"""
    return b.r


class AdaLoRA(LoraConfigCodec, Method):
    name = "adalora"
    summary = (
        "AdaLoRA: SVD-form adapters, rank budget moves to important matrices (Zhang et al. 2023)"
    )
    linear = AdaLoRALinear
    options = AdaLoRAOptions
    hooks = AdaLoRAHooks
    compare_settings = (
        Setting(
            "train.lr",
            1e-3,
            "Zhang et al. 2023 (AdaLoRA) App.: 5e-4 to 1.2e-3; its "
            "N(0, 0.02) factors start far smaller than LoRA's",
        ),
        Setting(
            "adapter.adalora.target_r",
            _target_r,
            "equal final budget: AdaLoRA's comparisons with LoRA are at the same parameter count",
        ),
        Setting("adapter.adalora.init_r", _init_r, "AdaLoRA/PEFT: init_r 12 for target_r 8 (1.5x)"),
        Setting(
            "adapter.adalora.tinit",
            budget_fraction(0.1),
            "AdaLoRA's GLUE runs: warm-up about 10% of training",
        ),
        Setting(
            "adapter.adalora.tfinal",
            budget_fraction(0.3),
            "AdaLoRA's GLUE runs: the last 30-60% of training at the final budget",
        ),
        Setting(
            "adapter.adalora.delta_t",
            budget_fraction(0.02, minimum=1),
            "rank reallocated about 30 times during the budget schedule (paper: every 100 steps)",
        ),
        Setting("adapter.adalora.orth_reg_weight", 0.1, "Zhang et al. 2023: gamma 0.1"),
    )
    peft_type = "ADALORA"
    peft_r_is_rank = False
    heatmaps = {"adalora_rank": ("adalora_ranks", "AdaLoRA kept rank")}

    def check(self, cfg) -> None:
        if cfg.rank_pattern:
            raise ValueError(
                "rank_pattern does not apply to adalora: every matrix starts at "
                "adalora.init_r and the rank allocator sets the final ranks"
            )
        if cfg.use_rslora:
            raise ValueError("use_rslora does not apply to adalora, whose scale is alpha / init_r")

    def initial_rank(self, cfg) -> int:
        return cfg.options.init_r

    def layer_kwargs(self, cls: type, cfg) -> dict:
        return {"dropout": cfg.dropout}

    def scaling(self, r: int, alpha: float, cfg) -> float:
        return adalora_scaling(alpha, float(r))

    def peft_fields(self, cfg, model: nn.Module) -> dict:
        o = cfg.options
        total = (state_of(model).extras.get("adalora") or {}).get("total_step")
        return {
            **super().peft_fields(cfg, model),  # LoraConfig's, which AdaLoraConfig extends
            # PEFT's AdaLoRA ignores r and warns unless it has LoraConfig's default, 8.
            "r": 8,
            "init_r": o.init_r,
            "target_r": o.target_r,
            "tinit": o.tinit,
            "tfinal": o.tfinal,
            "deltaT": o.delta_t,
            "beta1": o.sensitivity_beta,
            "beta2": o.uncertainty_beta,
            "orth_reg_weight": o.orth_reg_weight,
            # PEFT refuses a config without a budgeting phase (tinit < total_step - tfinal).
            "total_step": int(total or o.tinit + o.tfinal + 1),
            "rank_pattern": {
                f"{n}.lora_E": layer.rank_pattern() for n, layer in adalora_layers(model).items()
            },
        }

    def reads_peft(self, pc: dict) -> bool:
        return pc.get("peft_type") == "ADALORA"

    def check_tensors(self, cfg, tensors: dict) -> str | None:
        too_big = [
            k
            for k, t in tensors.items()
            if k.endswith(".lora_E") and t.shape[0] > cfg.options.init_r
        ]
        if too_big:
            return (
                f"{too_big[0]} has rank {tensors[too_big[0]].shape[0]}, more than "
                f"adalora.init_r = {cfg.options.init_r}"
            )
        return None  # pruned ranks vary per layer: the on_load hook resizes to them

    def options_from_peft(self, pc: dict) -> dict:
        names = {
            "init_r": "init_r",
            "target_r": "target_r",
            "tinit": "tinit",
            "tfinal": "tfinal",
            "deltaT": "delta_t",
            "beta1": "sensitivity_beta",
            "beta2": "uncertainty_beta",
            "orth_reg_weight": "orth_reg_weight",
        }
        # PEFT's rank_pattern here is the kept-triplet mask, not ranks: on_load resizes
        return {
            **super().options_from_peft(pc),
            "rank_pattern": {},
            self.options_key: {
                ours: pc[theirs] for theirs, ours in names.items() if pc.get(theirs) is not None
            },
        }

    def report_note(self, method_summary: dict) -> str:
        ms = method_summary
        if "total_rank" not in ms:
            return ""
        return (
            f"rank {ms['total_rank']} of {ms['init_total_rank']} (target {ms['target_total_rank']})"
        )

    def inspect_columns(self, record: dict, layers: dict) -> dict:
        ranks = ((record.get("summary") or {}).get("method_summary") or {}).get("ranks") or {}
        return {
            "adalora_rank": {
                n: ranks.get(n, getattr(layer, "rank", None)) for n, layer in layers.items()
            }
        }


METHOD = AdaLoRA()
