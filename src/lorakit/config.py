"""Typed configuration: one source of truth for the Python API, YAML files and the CLI.

Every field has a docstring-like description (``Field(description=...)``); ``lorakit train --help``
and the docs are generated from these. Unknown keys and wrong types fail with one sentence
that names the field (see :func:`parse`).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import LorakitError

METHODS = ("lora", "dora", "lora-fa", "adalora", "lora-drop", "full")

# Presets named after the seed document; each expands to a method plus options.
# User-given values always win over the preset's.
PRESETS: dict[str, dict[str, Any]] = {
    # QLoRA (Dettmers et al. 2023, artidoro/qlora qlora.py defaults): NF4 base, r 64, alpha 16,
    # every linear layer but the output head.
    "qlora": {"method": "lora", "quantize": "nf4", "r": 64, "alpha": 16, "dropout": 0.05,
              "target_modules": "all-linear"},
    # LoRA+ (Hayou et al. 2024): B learns lambda times faster than A; PEFT's docs use 16.
    "lora+": {"method": "lora", "loraplus_ratio": 16.0},
    # LongLoRA (Chen et al. 2023): LoRA r 8 / alpha 16 on attention, embeddings and norms
    # trained whole, S2-Attn in training.
    "longlora": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                 "trainable_modules": ["embeddings", "norms"], "s2_attn": True},
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AdapterConfig(_Strict):
    """What to adapt and how. Defaults follow METHODS.md."""

    method: str = Field("lora", description="lora | dora | lora-fa | adalora | lora-drop | full, "
                        "or a preset: qlora | lora+ | longlora")
    r: int = Field(16, gt=0, description="LoRA rank (AdaLoRA: see init_r/target_r)")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; scale = alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA branch input")
    target_modules: Union[str, list[str]] = Field(
        "all-linear", description="list: module name or '.'-suffix; string: full regex; "
        "'all-linear': every linear layer except the output head")
    trainable_modules: list[str] = Field(
        default_factory=list, description="modules trained whole and saved with the adapter "
        "(PEFT modules_to_save); 'embeddings' and 'norms' select the input embeddings and "
        "every normalization layer")
    rank_pattern: dict[str, int] = Field(default_factory=dict,
                                         description="per-module rank: regex -> r")
    alpha_pattern: dict[str, float] = Field(default_factory=dict,
                                            description="per-module alpha: regex -> alpha")
    use_rslora: bool = Field(False, description="scale = alpha / sqrt(r) (rsLoRA)")
    quantize: Optional[Literal["nf4"]] = Field(None, description="'nf4': 4-bit base (QLoRA)")
    quant_compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype the NF4 weights are dequantized to for each matmul")
    loraplus_ratio: Optional[float] = Field(None, gt=0, description="LoRA+: lr_B / lr_A")
    loraplus_lr_embedding: float = Field(1e-6, gt=0,
                                         description="LoRA+: lr of LoRA on embeddings")
    s2_attn: bool = Field(False, description="LongLoRA shifted sparse attention in training")
    s2_group_ratio: float = Field(0.25, gt=0, le=1, description="S2-Attn group size / length")
    context_length: Optional[int] = Field(None, gt=0,
                                          description="RoPE linear interpolation target length")
    # AdaLoRA (Zhang et al. 2023)
    init_r: int = Field(12, gt=0, description="AdaLoRA: initial rank of every matrix")
    target_r: int = Field(8, gt=0, description="AdaLoRA: average final rank")
    tinit: int = Field(0, ge=0, description="AdaLoRA: warm-up steps before pruning")
    tfinal: int = Field(0, ge=0, description="AdaLoRA: final steps at the target budget")
    delta_t: int = Field(10, gt=0, description="AdaLoRA: steps between two maskings")
    beta1: float = Field(0.85, ge=0, lt=1, description="AdaLoRA: sensitivity EMA")
    beta2: float = Field(0.85, ge=0, lt=1, description="AdaLoRA: uncertainty EMA")
    orth_reg_weight: float = Field(0.5, ge=0, description="AdaLoRA: orthogonal regularizer")
    # LoRA-drop (Zhou et al. 2024)
    sample_ratio: float = Field(0.1, gt=0, le=1, description="LoRA-drop: data sampled")
    threshold: float = Field(0.9, gt=0, le=1, description="LoRA-drop: cumulative importance kept")
    top_n: Optional[int] = Field(None, gt=0, description="LoRA-drop: keep a fixed number of layers")
    # LoRA-FA (Zhang et al. 2023)
    lorafa_projection: bool = Field(False, description="LoRA-FA v2 gradient projection of B")

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("method") in PRESETS:
            preset = PRESETS[data["method"]]
            data = {**preset, **{k: v for k, v in data.items() if k != "method"},
                    "method": preset["method"]}
        return data

    @model_validator(mode="after")
    def _check(self) -> "AdapterConfig":
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS + tuple(PRESETS))}, "
                             f"not {self.method!r}")
        if self.method == "adalora" and self.target_r > self.init_r:
            raise ValueError("target_r must not exceed init_r")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules must not be empty")
        for k, v in self.rank_pattern.items():
            if v <= 0:
                raise ValueError(f"rank_pattern[{k!r}] must be > 0")
        for k, v in self.alpha_pattern.items():
            if v <= 0:
                raise ValueError(f"alpha_pattern[{k!r}] must be > 0")
        return self


def validation_message(err: ValidationError, prefix: str = "") -> str:
    """Turn pydantic's multi-line report into one sentence naming the first bad field."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    where = ".".join(p for p in (prefix, loc) if p)
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{where}: {msg}" if where else msg


def parse(model_cls: type[BaseModel], data: dict, prefix: str = "") -> Any:
    """Validate ``data`` into ``model_cls``; raise LorakitError with one sentence on failure."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise LorakitError(f"invalid config: {validation_message(e, prefix)}") from None


def adapter_config(cfg: AdapterConfig | dict | None = None, **kwargs) -> AdapterConfig:
    """Accept an AdapterConfig, a dict or keyword arguments."""
    if isinstance(cfg, AdapterConfig):
        return cfg.model_copy(update=kwargs) if kwargs else cfg
    return parse(AdapterConfig, {**(cfg or {}), **kwargs}, prefix="adapter")
