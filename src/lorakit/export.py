"""Serving what you train: any method's adapter as a plain LoRA adapter (PEFT, vLLM) or as a
llama.cpp LoRA adapter file (GGUF). See docs/export.md.

Servers load one kind of adapter: pairs B (d_out, r), A (r, d_in) per module and ONE scale,
``lora_alpha / r``, with r read from the config (vLLM) or from each tensor (llama.cpp; both
ignore ``rank_pattern`` and ``alpha_pattern``, llama.cpp also ``use_rslora``). So:

1. Each layer's update ΔW (what merging adds to the base weight, fp32) is written as B·A.
   A layer whose method gives exact factors (:meth:`AdapterLayer.lora_factors`: LoRA,
   LoRA-FA and LoRA-drop are B·A already, AdaLoRA's P·diag(λ)·Q over its kept triplets is
   B = P·diag(λ), A = Q) is written exactly; any other layer (DoRA, whose magnitude rescales
   W0's rows) is factored by a truncated SVD of ΔW = merged − base (Eckart–Young: the best
   rank-k approximation in Frobenius norm), at ``rank`` or at the smallest rank that keeps
   ``energy`` of Σσ². PEFT's ``convert_to_lora`` does the same for its non-LoRA tuners.
2. Every layer is padded with zero rows/columns to one rank R (the largest), and the layers'
   own scales (rsLoRA's alpha/√r, per-module alpha and rank patterns, AdaLoRA's
   alpha/(init_r + 1e-5)) are folded into B, so ``lora_alpha / R`` is the trained scale in
   every loader. When all layers share one scale it goes into ``lora_alpha`` and B is unchanged.
3. What is not an adapter cannot become one: modules trained whole (``modules_to_save``:
   LongLoRA's embeddings and norms), RoPE interpolation, full fine-tuning. vLLM refuses the
   first, llama.cpp skips norm tensors in adapters (its loader's "TODO: add support for norm
   vector") and has no place for a trained embedding: those are refused with ``lorakit
   merge`` as the way that works.

The report gives per layer the conversion, the rank and ``||ΔW − BA||_F / ||ΔW||_F`` of the
tensors as written (after the GGUF ``outtype`` rounding), and the largest |Δlogit| between
the original adapter and the export on a few prompts.

References: Hu et al. 2021 (LoRA, arXiv 2106.09685); Eckart & Young 1936; PEFT
``tuners/lora/conversion`` (``convert_to_lora``); llama.cpp ``convert_lora_to_gguf.py`` and
``src/llama-adapter.cpp`` (file layout, names, shapes, scale); vLLM ``lora/peft_helper.py``
(what it accepts).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig
from .errors import LorakitError
from .files import check_output
from .inject import adapter_layers, apply, state_of, trained_modules, unload
from .llamacpp import gguf_plan, gguf_rounding, merge_hint, write_gguf
from .peft_format import (
    adapter_folder,
    is_whole_model,
    open_adapter,
    peft_config_dict,
    save_adapter,
)
from .registry import EXPORT_METHOD

#: plain LoRA, the method every export is written as: the name of the target that writes its
#: PEFT folder (``--to lora``) and llama.cpp's ``adapter.type`` for such a file
PLAIN = EXPORT_METHOD
TARGETS = (PLAIN, "vllm", "gguf")
#: not an adapter: the merged model as one GGUF file (gguf_export.py, a layer above this one)
MODEL_TARGET = "gguf-model"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
#: the values vLLM's ``--max-lora-rank`` accepts (vllm/config/lora.py)
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
#: a layer's own factors count as exact when they give its update within this (relative);
#: fp32 rounding of the product is ~1e-7
EXACT_TOL = 1e-4
#: prompts the largest |Δlogit| is measured on
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Question: what is 12 plus 30?\nAnswer:",
    "Once upon a time, in a small village,",
)


# ---- the report -------------------------------------------------------------------------


@dataclass
class LayerExport:
    """One adapted module: how it was converted (``exact`` or ``svd``), its own rank in the
    export (before padding to the common rank) and ``||ΔW − BA||_F / ||ΔW||_F``."""

    name: str
    conversion: str
    rank: int
    rel_error: float


@dataclass
class ExportReport:
    target: str
    out: str
    method: str
    rank: int
    alpha: float
    outtype: str | None
    layers: list[LayerExport]
    max_abs_dlogit: float | None = None
    prompts: int = 0
    max_lora_rank: int | None = None  # vLLM's --max-lora-rank to serve it with
    heldout: dict | None = None  # {"original": {...}, "export": {...}} given a run folder
    notes: list[str] = field(default_factory=list)

    @property
    def max_rel_error(self) -> float:
        return max((lay.rel_error for lay in self.layers), default=0.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "max_rel_error": self.max_rel_error}


# ---- ΔW as B·A ------------------------------------------------------------------------------


def rel_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """``||ΔW − B A||_F / ||ΔW||_F`` in fp32 (0 when both are zero)."""
    num = torch.linalg.matrix_norm(delta - b.float() @ a.float()).item()
    den = torch.linalg.matrix_norm(delta).item()
    if num == 0:
        return 0.0
    return num / den if den > 0 else float("inf")


def svd_factors(
    delta: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of the truncated SVD of ``delta`` (fp32): rank ``rank``, or the smallest rank
    whose singular values keep ``energy`` of Σσ² (then the relative error is at most
    √(1 − energy)). B = U√Σ, A = √Σ Vᵀ share the singular values evenly, so neither factor
    is far larger than the other (what a 16-bit or 8-bit file rounds)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    if energy is not None:
        sq = s.double().pow(2)
        total = sq.sum()
        k = 0 if total == 0 else int((torch.cumsum(sq, 0) / total < energy).sum()) + 1
    else:
        k = int(rank)
    k = min(k, s.numel())
    root = s[:k].sqrt()
    return (u[:, :k] * root).contiguous(), (root[:, None] * vh[:k]).contiguous()


def _update(layer) -> torch.Tensor:
    with torch.no_grad():
        return layer.update()


@dataclass
class Conversion:
    """The export of every adapted layer: ``factors[name] = (B, A)`` at the common ``rank``,
    with ``alpha / rank`` as the one scale (B already divided by it where a layer's own
    scale differs)."""

    rank: int
    alpha: float
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    layers: list[LayerExport]


def convert(
    model: nn.Module,
    rank: int | None = None,
    energy: float | None = None,
    rounding: Callable[[str, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    | None = None,
) -> Conversion:
    """Plain LoRA factors for every adapter layer of ``model`` (see the module docstring).

    ``rank``: the SVD rank, which also caps an exact layer (one of a higher rank is factored
    by the SVD too); ``energy``: the SVD rank per layer from the spectrum; neither: each SVD
    layer keeps its own rank (``layer.r``). ``rounding(name, B, A)`` gives the factors as the
    file will hold them (the GGUF ``outtype``); the errors are measured after it."""
    if rank is not None and energy is not None:
        raise LorakitError("give --rank or --energy, not both")
    if rank is not None and rank <= 0:
        raise LorakitError(f"--rank must be positive, not {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise LorakitError(f"--energy is a fraction of the spectrum in (0, 1], not {energy}")
    layers = list(adapter_layers(model))
    if not layers:
        raise LorakitError("this adapter wraps no layers; there is nothing to export")
    pieces: dict[str, tuple[torch.Tensor, torch.Tensor, float, str]] = {}
    for name, layer in layers:
        delta = _update(layer)
        f = layer.lora_factors()
        if f is not None:
            b, a, s = f
            if (rank is None or b.shape[1] <= rank) and rel_error(delta, b * s, a) <= EXACT_TOL:
                pieces[name] = (b, a, float(s), "exact")
                continue
        own = f[0].shape[1] if f is not None else layer.r
        b, a = svd_factors(delta, rank if rank is not None else own, energy)
        pieces[name] = (b, a, 1.0, "svd")
    # one scale: the most common layer scale (all of them, usually), folded into B elsewhere
    scale = Counter(p[2] for p in pieces.values()).most_common(1)[0][0]
    r_all = max(1, max(p[0].shape[1] for p in pieces.values()))
    factors, report = {}, []
    for name, layer in layers:
        b, a, s, how = pieces[name]
        k = b.shape[1]
        b = b * (s / scale) if s != scale else b
        b = torch.cat([b, b.new_zeros(b.shape[0], r_all - k)], dim=1)
        a = torch.cat([a, a.new_zeros(r_all - k, a.shape[1])], dim=0)
        if rounding is not None:
            b, a = rounding(name, b, a)
        factors[name] = (b.contiguous(), a.contiguous())
        report.append(LayerExport(name, how, k, rel_error(_update(layer), b * scale, a)))
    return Conversion(r_all, scale * r_all, factors, report)


def install(model: nn.Module, conv: Conversion) -> nn.Module:
    """Replace ``model``'s adapter (any method) by the plain LoRA adapter ``conv`` describes,
    in place; modules trained whole keep their trained values."""
    st = state_of(model)
    cfg = st.config
    trained = {
        name: {pn: p.detach().clone() for pn, p in w.module.named_parameters()}
        for name, w in trained_modules(model)
    }
    targets, whole = list(st.targets), list(st.modules_to_save)
    unload(model, merge_adapters=False)
    apply(
        model,
        AdapterConfig(
            method=EXPORT_METHOD,
            r=conv.rank,
            alpha=conv.alpha,
            dropout=cfg.dropout,
            target_modules=targets,
            trainable_modules=whole,
        ),
    )
    for name, layer in adapter_layers(model):
        layer.set_lora_factors(*conv.factors[name])
    for name, w in trained_modules(model):
        with torch.no_grad():
            for pn, p in w.module.named_parameters():
                p.copy_(trained[name][pn])
    return model


# ---- what each target accepts ----------------------------------------------------------


def vllm_max_lora_rank(r: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds rank ``r`` (None: none does)."""
    return next((m for m in VLLM_MAX_LORA_RANKS if m >= r), None)


def _whole_modules_refusal(modules: Sequence[str], server: str) -> str | None:
    if not modules:
        return None
    return merge_hint(
        f"{server} does not load modules trained whole (modules_to_save: "
        f"{', '.join(modules[:3])}{', ...' if len(modules) > 3 else ''})"
    )


def vllm_problem(pc: dict) -> str | None:
    """Why vLLM would refuse (or misread) the PEFT adapter_config.json ``pc``, in one
    sentence, or None. vLLM (``PEFTHelper``) loads LoRA only, no DoRA, no bias, no
    modules_to_save, reads one ``lora_alpha / r`` (rsLoRA honoured, rank and alpha patterns
    ignored) and needs r within its largest ``--max-lora-rank``."""
    if pc.get("peft_type", "LORA") != "LORA":
        return (
            f"vLLM loads LoRA adapters only, not peft_type {pc.get('peft_type')!r}; "
            "`lorakit export ADAPTER --to vllm` writes one"
        )
    if pc.get("use_dora"):
        return (
            "vLLM does not load DoRA adapters (use_dora); `lorakit export ADAPTER --to "
            "vllm` writes its update as plain LoRA"
        )
    if pc.get("bias", "none") != "none":
        return f"vLLM does not load adapters with trained biases (bias={pc['bias']!r})"
    whole = _whole_modules_refusal(list(pc.get("modules_to_save") or []), "vLLM")
    if whole:
        return whole
    if pc.get("rank_pattern") or pc.get("alpha_pattern"):
        return (
            "vLLM ignores rank_pattern and alpha_pattern and would scale those modules "
            "wrongly; `lorakit export ADAPTER --to vllm` folds them into B"
        )
    r = int(pc.get("r", 8))
    if vllm_max_lora_rank(r) is None:
        return (
            f"rank {r} exceeds vLLM's largest --max-lora-rank "
            f"({VLLM_MAX_LORA_RANKS[-1]}); export with --rank {VLLM_MAX_LORA_RANKS[-1]} "
            "or lower"
        )
    return None


def _refuse_unservable(model: nn.Module, to: str) -> None:
    """What no adapter file of target ``to`` can carry, refused before any work."""
    cfg = state_of(model).config
    if cfg.context_length:
        raise LorakitError(
            merge_hint(
                f"this adapter was trained with RoPE interpolation to "
                f"context_length {cfg.context_length}, which an adapter "
                "file cannot carry"
            )
        )
    server = {"vllm": "vLLM", "gguf": "llama.cpp"}.get(to)
    if server:
        why = _whole_modules_refusal(state_of(model).modules_to_save, server)
        if why:
            raise LorakitError(why)


# ---- the whole export -------------------------------------------------------------------


def _prompt_ids(tokenizer, prompts) -> list[torch.Tensor]:
    if isinstance(prompts, torch.Tensor):
        return [row[None] for row in prompts]
    return [tokenizer(p, return_tensors="pt")["input_ids"] for p in prompts]


@torch.no_grad()
def _logits(model: nn.Module, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    dev = next(model.parameters()).device
    return [model(input_ids=x.to(dev)).logits.float().cpu() for x in ids]


def export_model(
    model: nn.Module,
    out: str | os.PathLike,
    to: str = PLAIN,
    rank: int | None = None,
    energy: float | None = None,
    outtype: str = "f32",
    tokenizer=None,
    prompts: Sequence[str] | torch.Tensor | None = None,
    evaluate: Callable[[nn.Module, Any], dict] | None = None,
    base_model_name_or_path: str | None = None,
) -> ExportReport:
    """Export the adapter ``model`` carries (any method) to ``out`` as ``to``: ``lora`` (a PEFT
    LoRA adapter folder), ``vllm`` (the same, checked against vLLM's rules first) or ``gguf``
    (a llama.cpp adapter file in ``outtype``). ``model`` ends up carrying the export (plain
    LoRA, as written). ``prompts``: strings (with ``tokenizer``) or token ids (a 2-D tensor)
    for the largest |Δlogit|; ``evaluate(model, tokenizer) -> dict`` is run on the original
    and on the export (the held-out metric). Nothing is written unless the whole export succeeds."""
    if to not in TARGETS:
        raise LorakitError(f"--to must be one of {', '.join(TARGETS)}, not {to!r}")
    if outtype not in OUTTYPES:
        raise LorakitError(f"--outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    if outtype != "f32" and to != "gguf":
        raise LorakitError("--outtype applies to --to gguf; a LoRA folder keeps fp32 tensors")
    out = Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise LorakitError(f"{out} exists; choose another --out")
    check_output(out, "--out", folder=to != "gguf")
    st = state_of(model)
    method = st.config.method
    _refuse_unservable(model, to)
    plan = gguf_plan(model) if to == "gguf" else None
    if prompts is None:
        prompts = PROMPTS if tokenizer is not None else None
    ids = _prompt_ids(tokenizer, prompts) if prompts is not None else []
    before = _logits(model, ids)
    heldout = {"original": evaluate(model, tokenizer)} if evaluate else None
    base_name = base_model_name_or_path or getattr(model, "name_or_path", None) or None
    conv = convert(model, rank, energy, gguf_rounding(plan, outtype) if plan else None)
    install(model, conv)
    pc = peft_config_dict(model, base_name)
    report = ExportReport(
        to,
        str(out),
        method,
        conv.rank,
        conv.alpha,
        outtype if to == "gguf" else None,
        conv.layers,
        prompts=len(ids),
    )
    if st.modules_to_save:  # only --to lora gets here with them
        report.notes.append(
            "modules trained whole are kept (modules_to_save): PEFT and lorakit "
            "load them, vLLM and llama.cpp do not (`lorakit merge` for those)"
        )
    if to == "vllm":
        why = vllm_problem(pc)
        if why:
            raise LorakitError(why)
        report.max_lora_rank = vllm_max_lora_rank(conv.rank)
    after = _logits(model, ids)
    if ids:
        report.max_abs_dlogit = max((x - y).abs().max().item() for x, y in zip(before, after))
    if evaluate:
        heldout["export"] = evaluate(model, tokenizer)
        report.heldout = heldout
    if to == "gguf":
        write_gguf(
            conv.factors,
            conv.alpha,
            plan,
            out,
            outtype,
            name=f"{method} adapter of {Path(str(base_name)).name}",
        )
    else:
        save_adapter(model, out, base_name, summary={"export": report.to_dict()})
    return report


def export(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    to: str = PLAIN,
    rank: int | None = None,
    energy: float | None = None,
    outtype: str = "f32",
    model: str | None = None,
    prompts: Sequence[str] | None = None,
    evaluate: Callable[[nn.Module, Any], dict] | None = None,
    trust_remote_code: bool = False,
) -> ExportReport:
    """``lorakit export``: the adapter folder (or run folder) ``adapter``, of any method, as a
    plain LoRA adapter (``to="lora"``), a vLLM-checked one (``"vllm"``) or a llama.cpp GGUF
    adapter file (``"gguf"``) at ``out``. ``model``: the base (default: the one the adapter
    records). The merged model as one GGUF file (``--to gguf-model``) is
    :func:`lorakit.export_gguf_model`. See :func:`export_model` and docs/export.md."""
    if to == MODEL_TARGET:
        raise LorakitError(
            "to='gguf-model' writes the merged model, not an adapter: call "
            "lorakit.export_gguf_model (lorakit export ADAPTER --to gguf-model)"
        )
    path = Path(adapter_folder(adapter))
    if is_whole_model(path):
        raise LorakitError(
            f"{adapter} is a whole fine-tuned model, not an adapter: serve the "
            "folder itself (vLLM) or export it with --to gguf-model (llama.cpp, Ollama)"
        )
    if to not in TARGETS:  # before loading anything
        raise LorakitError(f"--to must be one of {', '.join(TARGETS)}, not {to!r}")
    loaded, tok = open_adapter(path, model, "fp32", trust_remote_code)
    return export_model(
        loaded,
        out,
        to,
        rank,
        energy,
        outtype,
        tok,
        prompts,
        evaluate,
        base_model_name_or_path=model,
    )


def describe(report: ExportReport) -> list[str]:
    """The lines ``lorakit export`` prints."""
    conv = Counter(lay.conversion for lay in report.layers)
    ranks = sorted({lay.rank for lay in report.layers})
    lines = [
        f"{report.target} export of a {report.method} adapter: {report.out}",
        f"rank {report.rank}, lora_alpha {report.alpha:g} "
        f"(scale {report.alpha / report.rank:g})"
        + (f", {report.outtype} tensors" if report.outtype else ""),
        f"layers: {len(report.layers)} ({', '.join(f'{n} {k}' for k, n in conv.items())}); "
        f"ranks {ranks[0]}..{ranks[-1]}"
        if ranks
        else "layers: 0",
    ]
    lines.append(f"{'layer':<48}{'conversion':>11}{'rank':>6}{'rel. error':>12}")
    for lay in report.layers:
        lines.append(f"{lay.name:<48}{lay.conversion:>11}{lay.rank:>6}{lay.rel_error:>12.3e}")
    lines.append(f"largest relative error ||ΔW-BA||/||ΔW||: {report.max_rel_error:.3e}")
    if report.max_abs_dlogit is not None:
        lines.append(
            f"largest |Δlogit| vs the original on {report.prompts} prompts: "
            f"{report.max_abs_dlogit:.3e}"
        )
    if report.heldout:
        o, e = report.heldout["original"], report.heldout["export"]
        metric = o.get("metric")
        if metric and metric in o and metric in e:
            lines.append(f"held-out {metric}: original {o[metric]:.4f}, export {e[metric]:.4f}")
        if "valid_loss" in o and "valid_loss" in e:
            lines.append(
                f"held-out loss: original {o['valid_loss']:.4f}, export {e['valid_loss']:.4f}"
            )
    if report.max_lora_rank is not None:
        lines.append(
            f"serve: vllm serve BASE --enable-lora --lora-modules NAME={report.out} "
            f"--max-lora-rank {report.max_lora_rank}"
        )
    elif report.target == "gguf":
        lines.append(f"serve: llama-cli -m BASE.gguf --lora {report.out}")
    lines.extend(report.notes)
    return lines
