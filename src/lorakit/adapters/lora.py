"""LoRA: a frozen base plus a trainable low-rank bypass (Hu et al. 2021, arXiv 2106.09685).

    y = x W0ᵀ + b + s · dropout(x) Aᵀ Bᵀ,    s = alpha / r  (rsLoRA: alpha / sqrt(r))

A (r, d_in) ~ kaiming_uniform(a=√5) and B (d_out, r) = 0, so ΔW = s·BA = 0 at step 0
(microsoft/LoRA ``loralib/layers.py``). On ``nn.Embedding`` the roles swap: A = 0,
B ~ N(0, 1), no dropout. Tensor names follow PEFT (``lora_A.weight``, ``lora_embedding_A``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import (AdapterLayer, Method, Setting, copy_into, kaiming_uniform_,
                   linear_dims, make_dropout)


class LoRALinear(AdapterLayer):
    """LoRA on ``nn.Linear``, GPT-2 ``Conv1D`` or a bitsandbytes 4-bit linear layer."""

    adapter_param_names = ("lora_A", "lora_B")
    peft_names = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
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
        return {"lora_A": nn.Parameter(a),
                "lora_B": nn.Parameter(torch.zeros(self.out_features, self.r, device=dev))}

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
        out = self.base_layer(x)
        if self.bypass():
            return out
        return self.add_branch(out, self.dropout(x))

    def add_branch(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + s·x Aᵀ Bᵀ, the scale and the add fused into one addmm (x: already dropped)."""
        h = F.linear(x.to(out.dtype), self.lora_A.to(out.dtype))
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, self.r),
                           self.lora_B.to(out.dtype).t(), alpha=self.scaling)
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
        return {"lora_embedding_A": nn.Parameter(torch.zeros(self.r, vocab, device=dev)),
                "lora_embedding_B": nn.Parameter(nn.init.normal_(
                    torch.empty(dim, self.r, device=dev)))}

    def base_weight_matrix(self) -> torch.Tensor:
        return self.base_layer.weight  # (vocab, dim): the layout ΔW is given in

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling

    def lora_factors(self):
        # ΔW (vocab, dim) = s·(B_e A_e)ᵀ = s·A_eᵀ B_eᵀ
        return (self.lora_embedding_A.detach().float().T, self.lora_embedding_B.detach().float().T,
                self.scaling)

    def set_lora_factors(self, b: torch.Tensor, a: torch.Tensor) -> None:
        copy_into(self.lora_embedding_A, b.T)
        copy_into(self.lora_embedding_B, a.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.bypass():
            return out
        emb = self.base_layer
        after_a = F.embedding(x, self.lora_embedding_A.T, emb.padding_idx, emb.max_norm,
                              emb.norm_type, emb.scale_grad_by_freq, emb.sparse)
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
        return {**super().peft_fields(cfg, model),
                "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_dora": False,
                "use_rslora": cfg.use_rslora, "rank_pattern": dict(cfg.rank_pattern),
                "alpha_pattern": dict(cfg.alpha_pattern), "init_lora_weights": True}

    def options_from_peft(self, pc: dict) -> dict:
        return {**super().options_from_peft(pc),
                "alpha": pc.get("lora_alpha", 8), "dropout": pc.get("lora_dropout", 0.0) or 0.0,
                "use_rslora": bool(pc.get("use_rslora", False)),
                "alpha_pattern": pc.get("alpha_pattern") or {},
                "rank_pattern": pc.get("rank_pattern") or {}}

    def peft_recorded(self, cfg) -> dict:
        return {**super().peft_recorded(cfg), "lora_alpha": cfg.alpha,
                "use_rslora": cfg.use_rslora}


class LoRA(LoraConfigCodec, Method):
    name = "lora"
    summary = "LoRA: frozen base + trainable low-rank B·A bypass (Hu et al. 2021)"
    linear = LoRALinear
    embedding = LoRAEmbedding
    dm_dd_figure = True
    compare_settings = at_lora_rate("Hu et al. 2021 and the QLoRA paper (Dettmers et al. 2023, "
                                    "App. B: 2e-4 for models up to 13B); PEFT's examples")
    #: a PEFT LoRA adapter without lorakit.json is this method's; False for a method PEFT
    #: sees as plain LoRA, which only lorakit.json names (LoRA-FA, LoRA-drop)
    reads_plain_lora = True

    def reads_peft(self, pc: dict) -> bool:
        return self.reads_plain_lora and pc.get("peft_type") == "LORA" and not pc.get("use_dora")


METHOD = LoRA()
