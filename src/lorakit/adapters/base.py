"""Shared machinery of every method: the adapter layer base class (wrapping, scaling,
merge/unmerge, PEFT state), the :class:`Method` a method module declares and the
:class:`MethodHooks` the training loop drives. Nothing here (or anywhere under ``adapters/``)
imports the training loop.

Layout (everywhere in lorakit): ``W0`` is (d_out, d_in) as in ``nn.Linear`` and ``y = x W0ᵀ + b``;
``A`` is (r, d_in), ``B`` is (d_out, r). GPT-2's ``Conv1D`` stores its weight as (d_in, d_out)
(``fan_in_fan_out``); :meth:`AdapterLayer.base_weight_matrix` always hands out (d_out, d_in).

# Note: merge precision
Merging adds ``ΔW`` to the base weight in fp32 and casts back to the weight's dtype, so a
bf16/fp16 base gets one rounding, not the rounding of a low-precision ``BA`` product. For an
fp32 base, unmerge restores the weight within fp32 rounding (~1e-7 relative).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import LorakitError
from ..module_tree import is_conv1d
from ..quant import dequantized_weight, is_quantized


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear-like module: nn.Linear, Conv1D or a bitsandbytes Linear4bit."""
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    return int(module.in_features), int(module.out_features)


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """alpha / r (Hu et al. 2021), or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def make_dropout(p: float) -> nn.Module:
    """Dropout on the adapter branch input; an Identity (no work at all) when p == 0."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class AdapterLayer(nn.Module):
    """A frozen ``base_layer`` plus a trainable bypass.

    Subclasses define the parameters, :meth:`delta_weight`, :meth:`forward` and the PEFT tensor
    names (:meth:`peft_state` / :meth:`load_peft_state`). Merging, the ``disabled`` switch and
    the weight layout are handled here once.
    """

    #: names of this layer's own adapter parameters (not the base layer's)
    adapter_param_names: tuple[str, ...] = ()
    #: whether the constructor takes ``dropout`` (embeddings do not)
    takes_dropout: bool = True

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, use_rslora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.r = int(r)
        self.alpha = float(alpha)
        # LoRA's rule for a layer built by hand; a method's layers get the method's own
        # (Method.scaling, set by Method.make_layer)
        self.scaling = lora_scaling(self.alpha, self.r, use_rslora)
        self.merged = False
        self.disabled = False

    def __getattr__(self, name: str):
        # Code outside may read ``layer.weight`` etc. of what it thinks is the plain layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    # ---- weight layout -------------------------------------------------------------------
    @property
    def fan_in_fan_out(self) -> bool:
        return is_conv1d(self.base_layer)

    def base_weight_matrix(self) -> torch.Tensor:
        """The base weight in (d_out, d_in) layout, dequantized if needed (a view when possible)."""
        w = dequantized_weight(self.base_layer)
        return w.T if self.fan_in_fan_out else w

    def _write_base_weight(self, new_w: torch.Tensor) -> None:
        """Store a (d_out, d_in) fp32 matrix back into the base layer's weight, in its dtype."""
        if is_quantized(self.base_layer):  # never re-quantize silently (docs/methods/qlora.md)
            raise LorakitError(
                "merging into 4-bit NF4 weights would re-quantize them; load the "
                "adapter onto the 16-bit base model (quantize=None) and merge there"
            )
        weight = self.base_layer.weight
        if new_w.shape != self.base_weight_matrix().shape:
            raise ValueError("merged weight has the wrong shape")
        if self.fan_in_fan_out:
            new_w = new_w.T
        with torch.no_grad():
            weight.copy_(new_w.to(weight.dtype))

    # ---- the adapter's math ----------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """ΔW in (d_out, d_in) layout (for embeddings: (num_embeddings, dim)), fp32."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """What the base weight becomes once merged, fp32, (d_out, d_in). LoRA: W0 + ΔW."""
        return self.base_weight_matrix().float() + self.delta_weight()

    # ---- plain LoRA, for serving (lorakit.export) -------------------------------------------
    def update(self) -> torch.Tensor:
        """What merging adds to the base weight, fp32, :meth:`delta_weight`'s layout: ΔW itself
        where merging adds it (the default :meth:`merged_weight`: no cancellation of two
        weight-sized numbers), else merged − base (DoRA)."""
        if type(self).merged_weight is AdapterLayer.merged_weight:
            return self.delta_weight()
        return self.merged_weight() - self.base_weight_matrix().float()

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(B, A, s)`` with ``s · B @ A`` equal to this layer's whole update
        (:meth:`update`) in :meth:`delta_weight`'s layout, B (rows, k) and
        A (k, cols), k the rank; fp32. None when the update is no such product (DoRA's
        magnitude rescales W0 itself): the exporter then factors merged − base by a truncated
        SVD. The exporter checks the product against the update, so a subclass that changes
        :meth:`delta_weight` but not this falls back to the SVD rather than exporting wrong
        factors."""
        return None

    def set_lora_factors(self, b: torch.Tensor, a: torch.Tensor) -> None:
        """Make the update ``scaling · B @ A`` (B, A as :meth:`lora_factors` gives them, of this
        layer's rank): what a plain LoRA layer does with an export's factors."""
        raise NotImplementedError

    def unmerged_weight(self) -> torch.Tensor:
        """Invert :meth:`merged_weight` from the current (merged) base weight, fp32."""
        return self.base_weight_matrix().float() - self.delta_weight()

    # Note: tied weights
    # An embedding whose weight is shared with the output layer (tie_word_embeddings) must not
    # change the output layer when merged: LoRA adapts the input side only. ``inject`` marks
    # such layers ``tied_weight``; merging gives the base layer its own copy, and unmerging
    # puts the shared Parameter back (restoring the tie exactly).
    tied_weight = False

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight. Idempotent; not tied to train()/eval()."""
        if self.merged:
            return
        new_w = self.merged_weight()
        if self.tied_weight:
            shared = self.base_layer.weight
            self.base_layer.weight = nn.Parameter(shared.detach().clone(), requires_grad=False)
            self._shared_weight = shared
        self._write_base_weight(new_w)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`. Idempotent."""
        if not self.merged:
            return
        shared = self.__dict__.pop("_shared_weight", None)
        if shared is not None:
            self.base_layer.weight = shared
        else:
            self._write_base_weight(self.unmerged_weight())
        self.merged = False

    def before_compile(self) -> None:
        """Bring caches up to date before the layer runs inside a compiled graph, where they
        cannot be checked (DoRA's ||W0||² per row). Default: nothing to do."""

    def bypass(self) -> bool:
        """True when the forward is the base layer's alone (disabled, or already merged)."""
        return self.disabled or self.merged

    # ---- PEFT tensors ----------------------------------------------------------------------
    #: PEFT's tensor suffix -> the name of this layer's parameter saved under it
    peft_names: dict[str, str] = {}

    def peft_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's suffixes (``lora_A.weight``...)."""
        return {suffix: getattr(self, attr) for suffix, attr in self.peft_names.items()}

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors named as in :meth:`peft_state` into this layer (shapes checked by
        peft_format before)."""
        for suffix, attr in self.peft_names.items():
            copy_into(getattr(self, attr), state[suffix])

    def expected_peft_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.peft_state().items()}

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self.adapter_param_names]

    def new_adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Fresh adapter Parameters of this layer's shapes, initialized as a new layer's are
        (LoRA-drop's shared pairs)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """In-place copy keeping the parameter's dtype and device."""
    with torch.no_grad():
        param.copy_(value.to(dtype=param.dtype, device=param.device))


def kaiming_uniform_(t: torch.Tensor) -> torch.Tensor:
    """``nn.Linear``'s default init, as LoRA's A (microsoft/LoRA loralib/layers.py)."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


# ---- what a model carries once adapted ------------------------------------------------------


@dataclass
class LorakitState:
    """What :func:`lorakit.apply` did to a model; kept on the model as ``model.lorakit_state``."""

    config: Any  # the AdapterConfig
    targets: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    extras: dict = field(default_factory=dict)  # method-specific, saved in lorakit.json


def state_of(model: nn.Module) -> LorakitState:
    st = getattr(model, "lorakit_state", None)
    if st is None:
        raise LorakitError("this model has no lorakit adapter; call lorakit.apply first")
    return st


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """(name, layer) of every adapter layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def layers_of(model: nn.Module, cls: type) -> dict[str, Any]:
    """{name: layer} of the adapter layers of class ``cls``."""
    return {n: m for n, m in adapter_layers(model) if isinstance(m, cls)}


# ---- the method boundary ---------------------------------------------------------------------


class MethodHooks:
    """What the training loop calls on a method, once per run; every hook is a no-op here.

    ``run`` (for :meth:`prepare`) is the loop's view of the run: ``run.model``, ``run.log``,
    ``run.out_dir``, ``run.train_examples``, ``run.train_phase(examples, steps, desc)``,
    ``run.batches(examples)``, ``run.resuming``, ``run.reduce_sum(values)``."""

    def prepare(self, run) -> None:
        """Before the main optimization (LoRA-drop's sample phase and layer selection)."""

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to each micro-batch's loss (AdaLoRA's orthogonality), or None."""
        return None

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """After ``optimizer.step()``, before ``zero_grad()``; ``step`` = optimizer steps done."""

    def state_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The method's own training state for checkpoints (safetensors)."""
        return {}

    def load_state_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_tensors` on resume."""

    def on_load(self, model: nn.Module, extras: dict, tensors: dict[str, torch.Tensor]) -> None:
        """After ``apply`` and before an adapter's tensors are copied in (resize, re-tie)."""

    def summary(self, model: nn.Module) -> dict:
        """The method's figures for summary.json (``method_summary``)."""
        return {}


@dataclass(frozen=True)
class Budget:
    """What a compare setting can depend on: the run's optimizer steps and LoRA's rank."""

    steps: int
    r: int


@dataclass(frozen=True)
class Setting:
    """A value ``lorakit compare`` gives a method where the user's config leaves ``key``
    unset, with its ``source`` (the paper or reference implementation). ``value`` is a
    constant or a function of the :class:`Budget`, whose docstring says what it is."""

    key: str
    value: Any
    source: str

    def resolve(self, budget: Budget) -> Any:
        return self.value(budget) if callable(self.value) else self.value

    def shown(self) -> str:
        return self.value.__doc__ if callable(self.value) else str(self.value)


def budget_fraction(f: float, minimum: int = 0):
    """A setting of ``f`` times the run's steps (at least ``minimum``)."""

    def value(b: Budget) -> int:
        return max(minimum, round(f * b.steps))

    value.__doc__ = f"{f:.0%} of the steps"
    return value


class Method:
    """A fine-tuning method, as the registry lists it. One instance per method module
    (``METHOD = ...``); subclasses override what differs from plain LoRA.

    - layers: ``linear`` / ``embedding`` classes (None: that kind cannot be adapted);
    - ``options``: a pydantic model of the method's own options, read from
      ``adapter.<options_key>`` (an option of another method is an error);
    - ``hooks``: the :class:`MethodHooks` subclass the training loop drives;
    - the scaling rule of its layers (:meth:`scaling`) and what happens once every target is
      wrapped (:meth:`after_apply`: a tensor all layers share, a rewrite of the base);
    - its PEFT codec, both ways (``peft_format.py`` only reads and writes the files): the
      config fields (:meth:`peft_fields`, :meth:`reads_peft`, :meth:`options_from_peft`,
      :meth:`peft_recorded`), tensor names (:meth:`tensors_from_peft`, the layers'
      ``peft_names``) and the model-level tensors no layer holds
      (:meth:`peft_model_tensors`, :meth:`load_peft_model_tensors`);
    - reports: :meth:`report_note` and :meth:`inspect_columns`."""

    name: str = ""
    summary: str = ""
    linear: type | None = None
    embedding: type | None = None
    options: type | None = None
    hooks: type = MethodHooks
    peft_type: str = "LORA"
    #: adapter_config.json's ``r`` is the adapter's rank (PEFT's AdaLoRA writes a placeholder)
    peft_r_is_rank: bool = True
    #: False for full fine-tuning: nothing is wrapped, every weight trains
    wraps_layers: bool = True
    #: inspect's heatmaps: column of :meth:`inspect_columns` -> (file prefix, title)
    heatmaps: dict[str, tuple[str, str]] = {}
    #: drawn in compare's magnitude/direction figure (the DoRA paper's Fig. 2: full
    #: fine-tuning, LoRA and DoRA)
    dm_dd_figure: bool = False
    #: what ``lorakit compare`` gives this method where the user leaves a key unset: the
    #: values of its paper, each with its source (docs/compare.md prints them)
    compare_settings: tuple[Setting, ...] = ()

    @property
    def options_key(self) -> str:
        """``adapter.<key>`` holds the options: the name with '-' as '_' (``lora_drop``)."""
        return self.name.replace("-", "_")

    # ---- config -------------------------------------------------------------------------
    def check(self, cfg) -> None:
        """Reject a combination of common options this method cannot use (ValueError)."""

    def initial_rank(self, cfg) -> int:
        """The rank of a new layer before ``rank_pattern``."""
        return cfg.r

    def make_layer(self, module: nn.Module, kind: str, name: str, cfg) -> AdapterLayer:
        """The adapter layer for ``module`` (``kind``: "linear" or "embedding")."""
        cls = self.linear if kind == "linear" else self.embedding
        if cls is None:
            raise LorakitError(
                f"method {self.name!r} cannot adapt the {kind} layer {name!r}; "
                "leave it out of adapter.target_modules"
            )
        r = pattern_value(cfg.rank_pattern, name, self.initial_rank(cfg))
        alpha = pattern_value(cfg.alpha_pattern, name, cfg.alpha)
        layer = cls(module, r, alpha, **self.layer_kwargs(cls, cfg))
        layer.scaling = self.scaling(layer.r, layer.alpha, cfg)
        return layer

    def layer_kwargs(self, cls: type, cfg) -> dict:
        """Keyword arguments of the layer class beyond (base_layer, r, alpha)."""
        kw = {"use_rslora": cfg.use_rslora}
        if cls.takes_dropout:
            kw["dropout"] = cfg.dropout
        return kw

    def scaling(self, r: int, alpha: float, cfg) -> float:
        """The scale ``s`` of a new layer of rank ``r`` and ``alpha`` (after the patterns),
        which :meth:`make_layer` gives the layer as ``layer.scaling``. Default: LoRA's
        alpha / r, or alpha / sqrt(r) with ``use_rslora`` (:func:`lora_scaling`)."""
        return lora_scaling(alpha, r, cfg.use_rslora)

    def after_apply(self, model: nn.Module, cfg) -> None:
        """Called by ``inject.apply`` once every target is wrapped and the model carries its
        ``lorakit_state``: make what the layers share (VeRA's frozen random projections), or
        rewrite the base (PiSSA's principal components). Runs again when an adapter is
        loaded, before its tensors are copied in. An error here undoes the whole ``apply``."""

    # ---- the PEFT codec: adapter_config.json and the tensor file, both ways ---------------
    # peft_format.py reads and writes the files; what they hold is the method's. It writes
    # the fields every PEFT config has (peft_type, task_type, target_modules,
    # modules_to_save, base_model_name_or_path, inference_mode) and the tensors of layers
    # (``peft_names``) and of modules trained whole, under ``base_model.model.<module>.``.
    def peft_fields(self, cfg, model: nn.Module) -> dict:
        """The rest of adapter_config.json: the method's fields (DoRA adds ``use_dora``).
        Default: ``r``, ``bias`` and ``fan_in_fan_out``, which PEFT's configs of layer
        methods share."""
        return {
            "r": cfg.r,
            "bias": "none",
            "fan_in_fan_out": any(m.fan_in_fan_out for _, m in adapter_layers(model)),
        }

    def reads_peft(self, pc: dict) -> bool:
        """True if a PEFT adapter_config.json is this method's."""
        return False

    def options_from_peft(self, pc: dict) -> dict:
        """AdapterConfig fields from the method's fields of a PEFT config: common ones
        (``r``, ``alpha``, ...) and ``{options_key: {...}}``. Default: ``r``."""
        return {"r": pc.get("r", 8)}

    def peft_recorded(self, cfg) -> dict:
        """adapter_config.json keys and the values ``cfg`` (lorakit.json's record) gives them:
        a folder where they differ was edited by hand, and PEFT and lorakit would load it
        differently. Default: ``r`` where it is the rank (:attr:`peft_r_is_rank`)."""
        return {"r": cfg.r} if self.peft_r_is_rank else {}

    def tensors_from_peft(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The file's tensors (``base_model.model.`` taken off the layers' keys) under the
        names :meth:`load_peft_model_tensors` and the layers' ``peft_names`` use: where PEFT
        writes a name several ways (DoRA's magnitude). Default: as they are."""
        return tensors

    def peft_model_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors of the model, not of one layer, under their whole key in the file
        (VeRA's ``base_model.vera_A``); also what a loaded file must hold. Default: none."""
        return {}

    def load_peft_model_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy :meth:`peft_model_tensors`' keys, read from a file (shapes checked), into
        the model."""

    def check_tensors(self, cfg, tensors: dict[str, torch.Tensor]) -> str | None:
        """Why an adapter file's tensors disagree with its config (None: they agree). Default:
        each LoRA A's rank equals the configured rank of its module (``rank_pattern``)."""
        for key, t in tensors.items():
            for suffix in (".lora_A.weight", ".lora_embedding_A"):
                if key.endswith(suffix):
                    module = key[: -len(suffix)]
                    want = pattern_value(cfg.rank_pattern, module, self.initial_rank(cfg))
                    if t.ndim != 2 or t.shape[0] != want:
                        return (
                            f"{key} has rank {t.shape[0] if t.ndim else 0} but the config "
                            f"gives {module!r} rank {want}"
                        )
        return None

    def save_whole_model(self) -> bool:
        """True when the result is a whole model folder, not an adapter (full fine-tuning)."""
        return not self.wraps_layers

    # ---- reports ------------------------------------------------------------------------
    def report_note(self, method_summary: dict) -> str:
        """One line for the compare table's notes from summary.json's ``method_summary``."""
        return ""

    def inspect_columns(self, record: dict, layers: dict) -> dict[str, dict[str, Any]]:
        """Per-layer figures for ``lorakit inspect``: {column: {layer name: value}} from the
        adapter's lorakit.json (``record``) and its loaded layers."""
        return {}


def pattern_value(patterns: dict, name: str, default):
    """``rank_pattern``/``alpha_pattern``: the first key ``k`` with ``(.*\\.)?(k)$`` matching."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
