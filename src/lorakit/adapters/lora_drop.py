"""LoRA-drop: LoRA on the layers whose output matters, one shared pair for the rest.

Zhou et al. 2024, *LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation*
(arXiv 2402.07721, COLING 2025; no official code); docs/methods/lora-drop.md:

1. sample ``adapter.lora_drop.sample_ratio`` of the training data and train plain LoRA on it
   briefly;
2. importance of adapted layer i: ``g_i = Σ_tokens ||s·B_i A_i x||²`` (the LoRA branch output
   only, eval mode, no grad, padding excluded), normalized ``I_i = g_i / Σ_j g_j``;
3. keep the smallest set of layers, by descending importance, whose cumulative importance
   reaches ``threshold`` (or the ``top_n`` most important); with ``importance_scope:
   module_type`` this is done within each module type (See Note: importance scope);
4. every other layer of the same module type (same leaf name, e.g. ``q_proj``, and the same
   shapes) shares ONE LoRA pair: the very same ``nn.Parameter`` objects, so the optimizer sees
   it once and its gradient is the sum over the layers that use it;
5. train on the full data, with fresh adapters unless ``carry_over``.

The layers are plain :class:`~lorakit.adapters.lora.LoRALinear` / ``LoRAEmbedding``; this
file only decides and ties. The training loop runs the sample phase for it (``run.train_phase``:
see :meth:`LoRADropHooks.prepare`); nothing here imports the loop. Saved adapters hold each
layer's tensors as separate copies (PEFT loads them as ordinary per-layer LoRA);
``lorakit.json`` records the sharing and :meth:`LoRADropHooks.on_load` ties the copies again.

# Note: importance scope
The paper normalizes over all adapted layers (``importance_scope: global``, the default). The
LoRA outputs of different module types live on different scales: on SmolLM2-135M a few
``down_proj`` layers, whose inputs carry the model's outlier activations, hold ~96% of the total
after the sample phase, so a global threshold of 0.9 keeps 3 of 210 layers. ``module_type``
ranks layers against the others of their own type (the ones they would share a pair with).

# Note: the shared pair under carry_over
With ``carry_over: true`` kept layers keep their sample-phase A and B, but the shared pair
starts fresh (A kaiming, B zero) rather than from the mean of the dropped layers' weights: the
A's start from independent random draws, so their mean shrinks towards zero by ~1/√n, and
mean(B)·mean(A) is not the mean of the B·A products, so "the average" is not an average update.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import LorakitError
from ..files import read_json, write_json
from ..options import MethodOptions
from .base import AdapterLayer, MethodHooks, adapter_layers, state_of
from .lora import LoRA, LoRAEmbedding, at_lora_rate


class LoRADropOptions(MethodOptions):
    """``adapter.lora_drop``: the sample phase and the selection (Zhou et al. 2024)."""

    sample_ratio: float = Field(
        0.1,
        gt=0,
        le=1,
        description="share of the training data used to train LoRA briefly and score the layers",
    )
    threshold: float = Field(
        0.9,
        gt=0,
        le=1,
        description="keep the most important layers until their cumulative importance reaches this",
    )
    top_n: int | None = Field(
        None, gt=0, description="keep a fixed number of layers instead of a threshold"
    )
    carry_over: bool = Field(
        False,
        description="kept layers start the main training from "
        "their sample-phase weights (default: fresh adapters)",
    )
    importance_scope: Literal["global", "module_type"] = Field(
        "global",
        description="normalize importance over all adapted layers, or within each "
        "module type (q_proj, ...) with threshold/top_n applied per type",
    )


RECORD_NAME = "lora_drop.json"  # the decision, kept in the run folder for train.resume


# ---- 1. the sample --------------------------------------------------------------------------


def sample_indices(n: int, ratio: float, per_step: int, seed: int) -> list[int]:
    """``ratio`` of ``n`` examples drawn without replacement (seeded), at least one optimizer
    step's worth (``per_step``) when there are that many."""
    k = min(n, max(per_step, math.ceil(ratio * n)))
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7)  # not the main sampler's stream
    return torch.randperm(n, generator=g)[:k].tolist()


# ---- 2. importance --------------------------------------------------------------------------


def branch_output(layer: AdapterLayer, x: torch.Tensor) -> torch.Tensor:
    """The LoRA branch alone, s·B A x, in fp32 (for an embedding: s·B A[ids])."""
    if isinstance(layer, LoRAEmbedding):
        after_a = F.embedding(x, layer.lora_embedding_A.float().T)
        return F.linear(after_a, layer.lora_embedding_B.float()) * layer.scaling
    if not hasattr(layer, "lora_branch"):
        raise LorakitError(f"LoRA-drop needs LoRA layers; {type(layer).__name__} has no branch")
    return layer.lora_branch(x.float())


@torch.no_grad()
def layer_output_energy(
    model: nn.Module, batches: Iterable[dict], dtype: torch.dtype | None = None
) -> dict[str, float]:
    """Raw ``g_i = Σ ||s·B_i A_i x||²`` over the non-padding tokens of ``batches`` (dicts with
    ``input_ids`` and ``attention_mask``, or packed sequences with ``position_ids`` and
    ``token_mask``; on the model's device), for every adapted layer.

    Eval mode (no dropout), no grad; each layer's input is caught by a forward hook and the
    branch recomputed in fp32 outside autocast, so a bf16 run ranks layers as fp32 would."""
    layers = dict(adapter_layers(model))
    energy = dict.fromkeys(layers, 0.0)
    mask: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, args, output):
            x = args[0]
            with torch.autocast(x.device.type, enabled=False):
                per_token = branch_output(module, x).pow(2).sum(-1)
            m = mask["now"]
            if per_token.shape != m.shape:
                raise LorakitError(
                    f"LoRA-drop cannot line up the input of {name!r} (shape "
                    f"{list(x.shape)}) with the batch's tokens {list(m.shape)}"
                )
            energy[name] += float((per_token.double() * m).sum())

        return hook

    handles = [layer.register_forward_hook(hook_for(n)) for n, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            # a packed batch (training/batching.py) marks its padding in token_mask
            mask["now"] = b.get("token_mask", b.get("attention_mask")).to(torch.float64)
            if b.get("repeat"):  # a repeat a sharded run makes to keep step: counts nothing
                mask["now"] = torch.zeros_like(mask["now"])
            device = b["input_ids"].device.type
            with torch.autocast(
                device,
                dtype=dtype or torch.float32,
                enabled=dtype in (torch.bfloat16, torch.float16),
            ):
                inputs = ("input_ids", "attention_mask", "position_ids")
                model(**{k: b[k] for k in inputs if k in b}, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return energy


def normalize(energy: dict[str, float]) -> dict[str, float]:
    """``I_i = g_i / Σ_j g_j``."""
    total = sum(energy.values())
    if not total > 0:
        raise LorakitError(
            "every LoRA output was zero after LoRA-drop's sample phase, so no "
            "layer ranks above another; raise adapter.lora_drop.sample_ratio or train.lr"
        )
    return {n: g / total for n, g in energy.items()}


# ---- 3. selection ---------------------------------------------------------------------------


def select_layers(
    importance: dict[str, float], threshold: float = 0.9, top_n: int | None = None
) -> list[str]:
    """The kept layers, most important first: the ``top_n`` largest, or else the shortest
    prefix of the descending order whose cumulative importance reaches ``threshold``."""
    order = sorted(importance, key=lambda n: -importance[n])  # stable: ties keep model order
    if top_n is not None:
        return order[:top_n]
    kept, cum = [], 0.0
    for name in order:
        kept.append(name)
        cum += importance[name]
        if cum >= threshold - 1e-9:  # 1e-9: a sum of floats that should be 1.0 may be 0.99..9
            break
    return kept


# ---- 4. sharing -----------------------------------------------------------------------------


def _shapes(layer: AdapterLayer) -> tuple:
    return tuple(tuple(p.shape) for p in layer.adapter_parameters())


def sharing_groups(layers: dict[str, AdapterLayer], kept: Iterable[str]) -> dict[str, list[str]]:
    """Dropped layers by module type: same leaf name, class and adapter shapes. Keys are the
    leaf name (``q_proj``), with the shapes appended where one leaf name has several."""
    kept = set(kept)
    by_type: dict[tuple, list[str]] = {}
    for name, layer in layers.items():
        if name not in kept:
            key = (name.rsplit(".", 1)[-1], type(layer).__name__, _shapes(layer))
            by_type.setdefault(key, []).append(name)
    leaves = [k[0] for k in by_type]
    out = {}
    for (leaf, _, shapes), names in by_type.items():
        label = (
            leaf
            if leaves.count(leaf) == 1
            else leaf + ":" + ",".join("x".join(map(str, s)) for s in shapes)
        )
        out[label] = names
    return out


def tie_groups(model: nn.Module, groups: dict[str, list[str]], refresh: Iterable[str] = ()) -> None:
    """Give each group one fresh pair, set as the very same Parameters on all its layers; the
    layers named in ``refresh`` get fresh Parameters of their own."""
    layers = dict(adapter_layers(model))
    for names in groups.values():
        missing = [n for n in names if n not in layers]
        if missing:
            raise LorakitError(
                f"LoRA-drop shares {missing[0]!r}, which is not an adapted layer "
                "of this model (is the adapter for another base model?)"
            )
        if len({_shapes(layers[n]) for n in names}) > 1:
            raise LorakitError(
                f"LoRA-drop cannot share one pair among {names[0]!r} and layers of other shapes"
            )
    todo = [[n] for n in refresh] + list(groups.values())
    for names in todo:
        pair = layers[names[0]].new_adapter_parameters()
        for n in names:
            for pname, p in pair.items():
                setattr(layers[n], pname, p)


def adapter_numel(model: nn.Module) -> tuple[int, int]:
    """(adapter parameters as stored now, each shared one once; what plain LoRA would have)."""
    seen: set[int] = set()
    unique = plain = 0
    for _, layer in adapter_layers(model):
        for p in layer.adapter_parameters():
            plain += p.numel()
            if id(p) not in seen:
                seen.add(id(p))
                unique += p.numel()
    return unique, plain


def select_per_type(
    importance: dict[str, float], threshold: float = 0.9, top_n: int | None = None
) -> list[str]:
    """``importance_scope: module_type``: within each module type (leaf name) renormalize and
    select as :func:`select_layers` does; the union, most important first."""
    types: dict[str, dict[str, float]] = {}
    for n, v in importance.items():
        types.setdefault(n.rsplit(".", 1)[-1], {})[n] = v
    kept = {
        n
        for t in types.values()
        if sum(t.values()) > 0  # an all-zero type: all share
        for n in select_layers(normalize(t), threshold, top_n)
    }
    return [n for n in sorted(importance, key=lambda n: -importance[n]) if n in kept]


def drop_layers(
    model: nn.Module,
    importance: dict[str, float],
    threshold: float | None = None,
    top_n: int | None = None,
    carry_over: bool | None = None,
    scope: str | None = None,
) -> dict:
    """Steps 3-5 on a model whose LoRA was trained on the sample: select, share, re-initialize.

    Options default to the model's adapter config. Returns the record (also stored under
    ``state_of(model).extras["lora_drop"]``, written to lorakit.json by save_adapter)."""
    st = state_of(model)
    cfg = st.config.options
    threshold = cfg.threshold if threshold is None else threshold
    top_n = cfg.top_n if top_n is None else top_n
    carry_over = cfg.carry_over if carry_over is None else carry_over
    scope = cfg.importance_scope if scope is None else scope
    layers = dict(adapter_layers(model))
    if set(importance) != set(layers):
        raise LorakitError("LoRA-drop's importance must name every adapted layer exactly")
    select = select_per_type if scope == "module_type" else select_layers
    kept = select(importance, threshold, top_n)
    groups = sharing_groups(layers, kept)
    tie_groups(model, groups, refresh=() if carry_over else kept)
    unique, plain = adapter_numel(model)
    record = {
        "threshold": threshold,
        "top_n": top_n,
        "carry_over": carry_over,
        "scope": scope,
        "importance": {n: importance[n] for n in layers},
        "kept": kept,
        "kept_importance": sum(importance[n] for n in kept),
        "shared": groups,
        "adapter_params": unique,
        "lora_adapter_params": plain,
        "param_ratio": unique / plain if plain else 1.0,
    }
    st.extras["lora_drop"] = record
    return record


def summary_lines(record: dict) -> list[str]:
    """A short table for the run's log: per module type, layers, kept, importance share."""
    imp, kept = record["importance"], set(record["kept"])
    types: dict[str, list[str]] = {}
    for n in imp:
        types.setdefault(n.rsplit(".", 1)[-1], []).append(n)
    how = (
        f"top_n {record['top_n']}"
        if record["top_n"] is not None
        else f"threshold {record['threshold']:g}"
    )
    if record.get("scope") == "module_type":
        how += " per module type"
    lines = [
        (
            f"lora-drop: kept {len(kept)} of {len(imp)} layers ({how}, cumulative importance "
            f"{record['kept_importance']:.3f}); {record['adapter_params']:,} adapter parameters "
            f"vs {record['lora_adapter_params']:,} for LoRA ({100 * record['param_ratio']:.1f}%)"
        ),
        f"  {'module':<12}{'layers':>7}{'kept':>6}{'importance':>12}{'max':>8}",
    ]
    for t, names in types.items():
        lines.append(
            f"  {t:<12}{len(names):>7}{sum(n in kept for n in names):>6}"
            f"{sum(imp[n] for n in names):>12.3f}{max(imp[n] for n in names):>8.3f}"
        )
    return lines


# ---- the training loop's hooks --------------------------------------------------------------


class LoRADropHooks(MethodHooks):
    """What ``lorakit train`` calls for ``method: lora-drop``."""

    def prepare(self, run) -> None:
        """Sample phase, importance, selection and sharing, before the main optimization."""
        model = run.model
        opts = run.cfg.adapter.options
        record = self._recorded_decision(run)
        if record is not None:  # resuming: the checkpoint holds the weights, not the decision

            def retie(m: nn.Module) -> None:
                tie_groups(m, record["shared"])
                state_of(m).extras["lora_drop"] = record

            run.edit_parameters(retie)  # under FSDP the model is built again around the ties
            run.log(f"lora-drop: reusing the layer selection in {run.out_dir / RECORD_NAME}")
            return
        idx = sample_indices(
            len(run.train_examples), opts.sample_ratio, run.examples_per_step, run.cfg.train.seed
        )
        sample = [run.train_examples[i] for i in idx]
        steps = max(1, len(sample) // run.examples_per_step)  # one pass over the sample
        run.train_phase(sample, steps, desc="lora-drop sample")
        # each process scores its share of the sample; the sums are added across processes
        energy = layer_output_energy(model, run.batches(sample), dtype=run.dtype)
        energy = dict(zip(energy, run.reduce_sum(list(energy.values()))))
        importance = normalize(energy)
        # the sharing replaces Parameters: through the run, which rebuilds a sharded model
        record = run.edit_parameters(lambda m: drop_layers(m, importance))
        record.update(sample_examples=len(sample), sample_steps=steps)
        for line in summary_lines(record):
            run.log(line)
        if run.is_main:
            write_json(run.out_dir / RECORD_NAME, record)

    @staticmethod
    def _recorded_decision(run) -> dict | None:
        """The decision of an interrupted run that is being resumed, if any."""
        path = run.out_dir / RECORD_NAME
        if not (run.resuming and path.exists()):
            return None
        record = read_json(path)
        o = run.cfg.adapter.options
        if (
            record.get("threshold"),
            record.get("top_n"),
            record.get("carry_over"),
            record.get("scope"),
        ) != (o.threshold, o.top_n, o.carry_over, o.importance_scope):
            raise LorakitError(
                f"{path} was made with other LoRA-drop settings than this "
                "run's; resume with the original adapter config"
            )
        return record

    def summary(self, model: nn.Module) -> dict:
        return dict(state_of(model).extras.get("lora_drop") or {})

    def on_load(self, model: nn.Module, extras: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Tie the saved copies of each shared pair again (called by
        ``peft_format.load_adapter`` after ``apply``, before the tensors are copied in), so
        further training updates one pair."""
        record = (extras.get("extras") or {}).get("lora_drop")
        if not record:
            return  # LoRA-drop applied but never dropped: plain LoRA
        groups = record["shared"]
        for names in groups.values():
            first = names[0]
            for key in [k for k in tensors if k.startswith(first + ".")]:
                suffix = key[len(first) + 1 :]
                for other in names[1:]:
                    t = tensors.get(f"{other}.{suffix}")
                    if t is not None and not torch.equal(t, tensors[key]):
                        raise LorakitError(
                            f"{other!r} and {first!r} share one LoRA pair in lorakit.json but "
                            f"their saved {suffix} differ; load with method='lora' to keep "
                            "them separate"
                        )
        tie_groups(model, groups)


class LoRADrop(LoRA):
    name = "lora-drop"
    summary = (
        "LoRA-drop: LoRA on the layers whose output matters, the rest share one (Zhou et al. 2024)"
    )
    options = LoRADropOptions
    hooks = LoRADropHooks
    dm_dd_figure = False
    compare_settings = at_lora_rate(
        "Zhou et al. 2024 (LoRA-drop) keep LoRA's "
        "hyper-parameters; sample ratio 10% and threshold 0.9 are "
        "lorakit's defaults, the paper's"
    )
    heatmaps = {"importance": ("lora_drop_importance", "LoRA-drop importance")}
    reads_plain_lora = False  # saved as plain per-layer LoRA; lorakit.json restores the sharing

    def report_note(self, method_summary: dict) -> str:
        drop = method_summary
        if drop.get("kept") is None or not drop.get("importance"):
            return ""
        return f"own LoRA on {len(drop['kept'])} of {len(drop['importance'])} layers"

    def inspect_columns(self, record: dict, layers: dict) -> dict:
        drop = (record.get("extras") or {}).get("lora_drop") or {}
        if not drop.get("importance"):
            return {}
        kept = set(drop.get("kept") or [])
        return {
            "importance": {n: drop["importance"].get(n) for n in layers},
            "kept": {n: n in kept for n in layers},
        }


METHOD = LoRADrop()
