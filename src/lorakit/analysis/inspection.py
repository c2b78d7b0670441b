"""``lorakit inspect``: what an adapter changed, layer by layer.

For every adapted layer, with W0 the base weight and W' the weight once merged (both
(d_out, d_in), fp32; for a full fine-tune, the tuned model's weight):

- ``||ΔW||_F`` with ΔW = W' - W0 (LoRA: s·BA; DoRA: the change the magnitude makes too),
  and ``||ΔW||_F / ||W0||_F``;
- effective rank of ΔW, ``exp(H(p))`` with p the singular values normalized to sum 1
  (Roy & Vetterli 2007), and the numeric rank, #{σ > 1e-3·σ_max};
- the magnitude/direction analysis of the DoRA paper (Liu et al. 2024, §2 and Fig. 2;
  docs/methods/dora.md): ``ΔM = mean_rows |m' - ||W0||_row|`` with m' = ||W'||_row (for DoRA
  exactly the trained magnitude m) and ``ΔD = mean_rows (1 - cos(W'_row, W0_row))``; plotted
  as ΔD (x) against ΔM (y), one point per layer. The paper finds a positive slope for LoRA and a
  negative one for full fine-tuning and DoRA; the text output gives the correlation;
- each method's own per-layer figures (``Method.inspect_columns``: AdaLoRA's kept rank per
  matrix, LoRA-drop's importance per layer and which layers kept their own LoRA, from
  lorakit.json).

``--vs OTHER`` analyses a second adapter of the same base and overlays it in every plot.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from .. import models
from ..adapters.base import adapter_layers
from ..errors import LorakitError
from ..files import check_output, file_errors, read_json
from ..peft_format import EXTRAS_NAME, is_whole_model, open_adapter, read_adapter, recorded_base
from ..registry import all_methods, get_method
from .pages import html_page, html_table, pyplot, save_png

RANK_TOL = 1e-3


@torch.no_grad()
def layer_stats(w0: torch.Tensor, w1: torch.Tensor) -> dict:
    """The per-layer figures of the module docstring for base ``w0`` and adapted ``w1``."""
    w0, w1 = w0.double(), w1.double()
    d = w1 - w0
    sv = torch.linalg.svdvals(d)
    total = float(sv.sum())
    if total > 0:
        p = sv[sv > 0] / total
        eff = math.exp(float(-(p * p.log()).sum()))
        rank = int((sv > RANK_TOL * sv[0]).sum())
    else:
        eff, rank = 0.0, 0
    m0, m1 = w0.norm(dim=1), w1.norm(dim=1)
    rows = m0 > 0  # an all-zero base row has no direction to compare with
    cos = (w0 * w1).sum(dim=1)[rows] / (m0[rows] * m1[rows]).clamp_min(1e-30)
    return {
        "delta_norm": float(d.norm()),
        "rel_delta_norm": float(d.norm() / w0.norm()),
        "effective_rank": eff,
        "numeric_rank": rank,
        "delta_m": float((m1 - m0).abs().mean()),
        "delta_d": float((1 - cos).mean()) if rows.any() else 0.0,
    }


def _layer_index(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None


def _weight_pairs(path: Path, model_name: str | None):
    """(method, lorakit.json, iterator of (module name, W0, W', layer or None))."""
    extras = read_json(path / EXTRAS_NAME) if (path / EXTRAS_NAME).exists() else {}
    if is_whole_model(path):
        base_name = model_name or recorded_base(path)
        if not base_name:
            raise LorakitError(
                f"{path} is a whole model that does not record its base; pass --model"
            )
        base, _ = models.load_model(base_name, dtype="fp32")
        tuned, _ = models.load_model(str(path), dtype="fp32")
        tuned_mods = dict(tuned.named_modules())
        out_emb = base.get_output_embeddings()

        def full_pairs():
            for name, mod in base.named_modules():
                if isinstance(mod, torch.nn.Linear) and mod is not out_emb:
                    yield name, mod.weight, tuned_mods[name].weight, None

        method = extras.get("method") or next(m.name for m in all_methods() if m.save_whole_model())
        return method, extras, full_pairs()
    model, _ = open_adapter(path, model_name)
    method = extras.get("method") or read_adapter(path)[0].method

    def adapter_pairs():
        for name, layer in adapter_layers(model):
            if isinstance(layer.base_layer, torch.nn.Embedding):
                continue  # an embedding's rows are tokens: ΔM/ΔD per output row means nothing
            yield name, layer.base_weight_matrix(), layer.merged_weight(), layer

    return method, extras, adapter_pairs()


@torch.no_grad()
def analyze(path: str | Path, model_name: str | None = None) -> dict:
    """Per-layer figures of the adapter (or full fine-tuned model folder) at ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise LorakitError(f"adapter folder {str(path)!r} does not exist")
    method, extras, pairs = _weight_pairs(path, model_name)
    pairs = list(pairs)
    columns = get_method(method).inspect_columns(
        extras, {name: layer for name, _, _, layer in pairs if layer is not None}
    )
    layers = []
    for name, w0, w1, _ in pairs:
        rec = {
            "name": name,
            "module": name.rsplit(".", 1)[-1],
            "index": _layer_index(name),
            "shape": list(w0.shape),
            **layer_stats(w0.float(), w1.float()),
        }
        rec.update({col: values[name] for col, values in columns.items() if name in values})
        layers.append(rec)
    if not layers:
        raise LorakitError(f"{path} adapts no linear layer to analyse")
    dd = [x["delta_d"] for x in layers]
    dm = [x["delta_m"] for x in layers]
    return {
        "adapter": str(path),
        "method": method,
        "layers": layers,
        "columns": list(columns),
        "correlation_dd_dm": _pearson(dd, dm),
    }


def _pearson(x: list[float], y: list[float]) -> float | None:
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    return sxy / (sx * sy) if sx > 0 and sy > 0 else None


# ---- text ------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def text_report(res: dict) -> str:
    extra = [c for c in res.get("columns", []) if any(c in x for x in res["layers"])]
    head = (
        f"{'layer':<44}{'shape':>12}{'||dW||':>10}{'rel':>9}{'effrank':>9}{'rank':>6}"
        f"{'dM':>10}{'dD':>10}" + "".join(f"{c:>14}" for c in extra)
    )
    lines = [f"{res['adapter']} ({res['method']}), {len(res['layers'])} layers", head]
    for x in res["layers"]:
        shape = "x".join(str(s) for s in x["shape"])
        ln = (
            f"{x['name'][-44:]:<44}{shape:>12}{x['delta_norm']:>10.4g}"
            f"{x['rel_delta_norm']:>9.3g}{x['effective_rank']:>9.2f}{x['numeric_rank']:>6}"
            f"{x['delta_m']:>10.3g}{x['delta_d']:>10.3g}"
        )
        lines.append(ln + "".join(f"{_fmt(x.get(c)):>14}" for c in extra))
    total = math.sqrt(sum(x["delta_norm"] ** 2 for x in res["layers"]))
    corr = res["correlation_dd_dm"]
    lines.append(
        f"total ||dW||_F {total:.4g}; mean effective rank "
        f"{sum(x['effective_rank'] for x in res['layers']) / len(res['layers']):.2f}; "
        f"correlation of dD and dM across layers "
        f"{'n/a' if corr is None else f'{corr:+.3f}'} (DoRA paper: LoRA positive, "
        "full fine-tuning and DoRA negative)"
    )
    return "\n".join(lines)


# ---- plots -----------------------------------------------------------------------------------


def _label(res: dict) -> str:
    run = Path(res["adapter"]).resolve().parent.name
    return res["method"] if run == res["method"] else f"{res['method']} ({run})"


def _per_layer_plot(plt, results: list[dict], key: str, title: str):
    fig, ax = plt.subplots(figsize=(8, 4))
    styles = ["-", "--", ":", "-."]
    for k, res in enumerate(results):
        by_mod: dict[str, list] = {}
        for i, x in enumerate(res["layers"]):
            by_mod.setdefault(x["module"], []).append(
                (x["index"] if x["index"] is not None else i, x[key])
            )
        for mod, pts in sorted(by_mod.items()):
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                styles[k % 4],
                marker=".",
                label=f"{mod} · {_label(res)}" if len(results) > 1 else mod,
            )
    ax.set_xlabel("layer")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def _heatmap(plt, res: dict, key: str, title: str):
    mods = sorted({x["module"] for x in res["layers"]})
    idx = sorted({x["index"] for x in res["layers"] if x["index"] is not None})
    grid = [[float("nan")] * len(idx) for _ in mods]
    for x in res["layers"]:
        if x["index"] is not None and x.get(key) is not None:
            grid[mods.index(x["module"])][idx.index(x["index"])] = float(x[key])
    fig, ax = plt.subplots(figsize=(max(6, len(idx) * 0.3), 0.5 * len(mods) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(mods)), mods)
    ax.set_xticks(range(len(idx)), idx, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return fig


def dm_dd_figure(plt, results: list[dict]):
    """The seed's figure: ΔD (x) against ΔM (y), one point per layer, one colour per adapter."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for res in results:
        corr = res["correlation_dd_dm"]
        ax.scatter(
            [x["delta_d"] for x in res["layers"]],
            [x["delta_m"] for x in res["layers"]],
            s=14,
            alpha=0.75,
            label=f"{_label(res)}, r = " + ("n/a" if corr is None else f"{corr:+.2f}"),
        )
    ax.set_xlabel("ΔD: mean (1 - cos(W'_row, W0_row))")
    ax.set_ylabel("ΔM: mean |m' - ||W0||_row|")
    ax.set_title("magnitude vs direction change, one point per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def write_outputs(results: list[dict], out: Path) -> list[str]:
    """PNG plots, inspect.txt, inspect.json and a self-contained inspect.html in ``out``;
    returns the PNG file names."""
    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    figs = [
        (
            "delta_norm.png",
            "||ΔW||_F per layer",
            _per_layer_plot(plt, results, "delta_norm", "||ΔW||_F per layer"),
        ),
        (
            "effective_rank.png",
            "effective rank of ΔW per layer",
            _per_layer_plot(plt, results, "effective_rank", "effective rank of ΔW"),
        ),
    ]
    fig = dm_dd_figure(plt, results)
    figs.append(("dm_dd.png", "magnitude (ΔM) vs direction (ΔD) change", fig))
    for res in results:
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", res["method"])
        for col, (prefix, title) in get_method(res["method"]).heatmaps.items():
            if any(x.get(col) is not None for x in res["layers"]):
                figs.append(
                    (
                        f"{prefix}_{tag}.png",
                        f"{title} ({_label(res)})",
                        _heatmap(plt, res, col, title),
                    )
                )
    body = ["<h1>lorakit inspect</h1>"]
    for res in results:
        hdr = ["layer", "||ΔW||_F", "rel", "effective rank", "rank", "ΔM", "ΔD"]
        rows = [
            [
                x["name"],
                f"{x['delta_norm']:.4g}",
                f"{x['rel_delta_norm']:.3g}",
                f"{x['effective_rank']:.2f}",
                x["numeric_rank"],
                f"{x['delta_m']:.3g}",
                f"{x['delta_d']:.3g}",
            ]
            for x in res["layers"]
        ]
        body += [f"<h2>{_label(res)}</h2>", html_table(hdr, rows)]
    for name, title, f in figs:
        body += [
            f"<h2>{title}</h2>",
            f'<img alt="{title}" src="data:image/png;base64,{save_png(f, out / name)}">',
        ]
    (out / "inspect.html").write_text(
        html_page("lorakit inspect", "\n".join(body)), encoding="utf-8"
    )
    (out / "inspect.txt").write_text(
        "\n\n".join(text_report(r) for r in results) + "\n", encoding="utf-8"
    )
    (out / "inspect.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return [name for name, _, _ in figs]


def inspect_adapters(
    path: str | Path,
    vs: str | Path | None = None,
    out: str | Path | None = None,
    model_name: str | None = None,
) -> tuple[list[dict], Path]:
    """Analyse ``path`` (and ``vs``) and write the outputs; default folder: ``inspect`` next
    to the adapter (the run folder for a lorakit run)."""
    out_dir = Path(out) if out else Path(path).resolve().parent / "inspect"
    check_output(out_dir, "--out")
    results = [analyze(path, model_name)]
    if vs is not None:
        results.append(analyze(vs, model_name))
    with file_errors("write", out_dir):
        write_outputs(results, out_dir)
    return results, out_dir
