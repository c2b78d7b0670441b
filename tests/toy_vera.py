"""VeRA as a toy method: everything it needs is in this one file, plus one registry row
(``registry.register("toy-vera", "tests.toy_vera")``, done by tests/integration/
test_toy_method.py). It is a method unlike LoRA: its own PEFT config fields, its own scaling,
and tensors shared by every layer, made after the wrapping and saved once, at model level.

VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024,
arXiv 2310.11454; PEFT ``tuners/vera``): one pair of frozen random matrices, A (r, d_in) and
B (d_out, r) with d_in, d_out the largest over the adapted layers, shared by all of them, and
two trainable vectors per layer:

    y = x W0ᵀ + b + Λ_b B Λ_d A x,    Λ_b = diag(b) (d_out; zeros at init),
                                      Λ_d = diag(d) (r; d_initial at init)

A smaller layer uses the top-left block A[:, :d_in], B[:d_out, :]. A and B are drawn from
``projection_prng_key`` as PEFT draws them (kaiming-uniform, a CPU ``torch.Generator``), so
with ``save_projection: false`` the file holds only b and d and loading draws A and B again.
Saved as PEFT saves VeRA: ``vera_lambda_b`` / ``vera_lambda_d`` per layer and
``base_model.vera_A`` / ``base_model.vera_B`` once; PEFT's ``VeraModel`` loads it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lorakit.adapters.base import (
    AdapterLayer,
    Method,
    copy_into,
    layers_of,
    linear_dims,
    make_dropout,
    state_of,
)
from lorakit.options import MethodOptions

#: model-level keys of the shared projections in adapter_model.safetensors (PEFT's)
SHARED_KEYS = ("base_model.vera_A", "base_model.vera_B")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``_kaiming_init``: U(-b, b), b = sqrt(3)·sqrt(2)/sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)


class VeRAOptions(MethodOptions):
    """``adapter.toy_vera``: VeRA's own options (PEFT's VeraConfig names and defaults)."""

    projection_prng_key: int = Field(0, description="seed of the shared random A and B")
    d_initial: float = Field(
        0.1,
        gt=0,
        description="initial value of every entry of d "
        "(Kopiczko et al. 2024, Table 6c: small values)",
    )
    save_projection: bool = Field(
        True,
        description="write A and B into the adapter file; "
        "false: they are drawn again from projection_prng_key",
    )


class VeRALinear(AdapterLayer):
    """VeRA on ``nn.Linear`` or GPT-2 ``Conv1D``: trainable b (d_out) and d (r); the frozen
    shared ``vera_A`` / ``vera_B`` are given by :meth:`VeRA.after_apply`."""

    adapter_param_names = ("vera_lambda_b", "vera_lambda_d")
    peft_names = {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        d_initial: float = 0.1,
    ):
        super().__init__(base_layer, r, alpha)
        self.in_features, self.out_features = linear_dims(base_layer)
        self.dropout = make_dropout(dropout)
        self.d_initial = float(d_initial)
        for name, p in self.new_adapter_parameters().items():
            setattr(self, name, p)

    def new_adapter_parameters(self) -> dict[str, nn.Parameter]:
        dev = self.base_layer.weight.device
        return {
            "vera_lambda_b": nn.Parameter(torch.zeros(self.out_features, device=dev)),
            "vera_lambda_d": nn.Parameter(torch.full((self.r,), self.d_initial, device=dev)),
        }

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's blocks of the shared A and B."""
        return self.vera_A[:, : self.in_features], self.vera_B[: self.out_features, :]

    def delta_weight(self) -> torch.Tensor:
        a, b = self.projections()
        return (
            (self.vera_lambda_b.float()[:, None] * b.float())
            @ (self.vera_lambda_d.float()[:, None] * a.float())
        ) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.bypass():
            return out
        a, b = self.projections()
        x = self.dropout(x).to(self.vera_lambda_d.dtype)
        h = self.vera_lambda_d * F.linear(x, a.to(x.dtype))
        branch = (self.scaling * self.vera_lambda_b) * F.linear(h, b.to(x.dtype))
        return out + branch.to(out.dtype)


class VeRA(Method):
    name = "toy-vera"
    summary = "VeRA: frozen random A, B shared by every layer, trainable b, d (a test's toy)"
    linear = VeRALinear
    embedding = None
    options = VeRAOptions
    peft_type = "VERA"

    def check(self, cfg) -> None:
        if cfg.rank_pattern or cfg.alpha_pattern or cfg.use_rslora:
            raise ValueError(
                "rank_pattern, alpha_pattern and use_rslora do not apply to "
                "toy-vera: every layer shares one A and B of rank r, and no "
                "alpha scales them"
            )

    def layer_kwargs(self, cls: type, cfg) -> dict:
        return {"dropout": cfg.dropout, "d_initial": cfg.options.d_initial}

    def scaling(self, r: int, alpha: float, cfg) -> float:
        return 1.0  # no alpha: b and d are the scale

    def after_apply(self, model: nn.Module, cfg) -> None:
        """The shared A and B, drawn from the key as PEFT draws them, frozen Parameters that
        every layer holds (one tensor each, whatever ``model.to`` does)."""
        layers = list(layers_of(model, VeRALinear).values())
        if not layers:
            return
        gen = torch.Generator(device="cpu").manual_seed(cfg.options.projection_prng_key)
        d_in = max(layer.in_features for layer in layers)
        d_out = max(layer.out_features for layer in layers)
        a = kaiming_uniform((cfg.r, d_in), gen)
        b = kaiming_uniform((d_out, cfg.r), gen)
        dev = layers[0].base_layer.weight.device
        a, b = (nn.Parameter(t.to(dev), requires_grad=False) for t in (a, b))
        for layer in layers:
            layer.vera_A, layer.vera_B = a, b

    # ---- the PEFT codec: VeraConfig's fields and the model-level projections --------------
    def peft_fields(self, cfg, model: nn.Module) -> dict:
        o = cfg.options
        return {
            **super().peft_fields(cfg, model),
            "vera_dropout": cfg.dropout,
            "projection_prng_key": o.projection_prng_key,
            "d_initial": o.d_initial,
            "save_projection": o.save_projection,
            "init_weights": True,
        }

    def reads_peft(self, pc: dict) -> bool:
        return pc.get("peft_type") == "VERA"

    def options_from_peft(self, pc: dict) -> dict:
        own = ("projection_prng_key", "d_initial", "save_projection")
        return {
            **super().options_from_peft(pc),
            "dropout": pc.get("vera_dropout") or 0.0,
            self.options_key: {k: pc[k] for k in own if pc.get(k) is not None},
        }

    def peft_recorded(self, cfg) -> dict:
        o = cfg.options
        return {
            **super().peft_recorded(cfg),
            "projection_prng_key": o.projection_prng_key,
            "save_projection": o.save_projection,
        }

    def check_tensors(self, cfg, tensors: dict[str, torch.Tensor]) -> str | None:
        for key, t in tensors.items():
            if key.endswith(".vera_lambda_d") and tuple(t.shape) != (cfg.r,):
                return f"{key} has {t.numel()} values but the config gives rank {cfg.r}"
        return None

    def peft_model_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        layers = list(layers_of(model, VeRALinear).values())
        if not layers or not state_of(model).config.options.save_projection:
            return {}
        return dict(zip(SHARED_KEYS, (layers[0].vera_A, layers[0].vera_B)))

    def load_peft_model_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        layers = list(layers_of(model, VeRALinear).values())
        for key, attr in zip(SHARED_KEYS, ("vera_A", "vera_B")):
            if key in tensors:
                copy_into(getattr(layers[0], attr), tensors[key])  # shared: every layer's


METHOD = VeRA()
