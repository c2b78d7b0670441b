"""The compare report: Markdown, a self-contained HTML page and PNG plots.

Every figure is read from the runs' summary.json files; nothing is recomputed here, so the
report cannot disagree with the runs. Method-specific notes come from each method
(:meth:`Method.report_note`).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Optional

import yaml

from ..errors import LorakitError
from ..registry import all_methods, get_method
from .inspection import dm_dd_figure, inspect_adapters
from .pages import html_page, html_table, machine_line, md_table, pyplot, save_png


# ---- the report ----------------------------------------------------------------------------

#: (key, column header, format) of the report's main table, in order; keys index a row dict.
COLUMNS = [("trainable_params", "trainable params", "{:,}"),
           ("trainable_pct", "trainable %", "{:.3f}"),
           ("peak_memory_mb", "peak memory (MB)", "{:.0f}"),
           ("median_step_time_s", "median step (s)", "{:.3f}"),
           ("tokens_per_s", "tokens/s", "{:.0f}"),
           ("exact_match", "exact match", "{:.3f}"),
           ("f1", "token F1", "{:.3f}"),
           ("valid_loss", "eval loss", "{:.4f}"),
           ("forgetting", "forgetting (Δ general loss)", "{:+.4f}"),
           ("final_train_loss", "final train loss", "{:.4f}"),
           ("wall_s", "wall time (s)", "{:.0f}")]


def summary_row(method: str, summary: dict, wall_s: Optional[float] = None) -> dict:
    """One method's figures, taken from its run's summary.json (nothing recomputed)."""
    tuned, base = summary.get("tuned") or {}, summary.get("base") or {}
    forget = None
    if "general_text_loss" in tuned and "general_text_loss" in base:
        forget = tuned["general_text_loss"] - base["general_text_loss"]
    notes = get_method(summary["method"]).report_note(summary.get("method_summary") or {})
    cut = (tuned.get("generation") or {}).get("cut_note")
    if cut:  # never let a capped answer pass for a wrong one silently
        notes = "; ".join(x for x in (notes, f"WARNING: {cut}") if x)
    return {"method": method, "status": "done",
            "trainable_params": summary["trainable_params"],
            "trainable_pct": 100 * summary["trainable_params"] / summary["total_params"],
            "peak_memory_mb": summary.get("peak_memory_mb"),
            "median_step_time_s": summary.get("median_step_time_s"),
            "tokens_per_s": summary.get("tokens_per_s"),
            "exact_match": tuned.get("exact_match"), "f1": tuned.get("f1"),
            "valid_loss": tuned.get("valid_loss"),
            "forgetting": forget, "final_train_loss": summary.get("final_train_loss"),
            "wall_s": wall_s, "loss_curve": summary.get("loss_curve") or [], "notes": notes}


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    return "-" if v is None else fmt.format(v)


def main_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, formatted rows) of the report's table."""
    header = ["method"] + [c[1] for c in COLUMNS] + ["notes"]
    return header, [[r["method"]] + [_cell(r, k, f) for k, _, f in COLUMNS] + [r["notes"]]
                    for r in rows]


def write_report(out: Path, methods: list[str], state: dict) -> dict:
    """report.md, report.html, report.json and the PNG plots in ``out``."""
    rows, missing, base, first = [], [], None, None
    for m in methods:
        rec = state["runs"].get(m, {})
        summ = out / m / "summary.json"
        if summ.exists():
            s = json.loads(summ.read_text())
            first = first or s
            rows.append(summary_row(m, s, rec.get("wall_s")))
            # the 16-bit base: QLoRA's own base is the 4-bit model
            if base is None and s.get("base") and not (
                    _run_cfg(out / m).get("adapter") or {}).get("quantize"):
                base = {"from": m, **s["base"]}
        else:
            missing.append({"method": m, "status": rec.get("status", "not run"),
                            "reason": rec.get("error", "")})
    header, table = main_table(rows)
    setup = _setup_lines(out, first, state, methods)
    pngs = _plots(out, rows) + _dm_dd_plot(out, [r["method"] for r in rows])
    md = ["# lorakit compare", "", *[f"- {ln}" for ln in setup], "", md_table(header, table), ""]
    html_parts = ["<h1>lorakit compare</h1><ul>" + "".join(f"<li>{_esc(ln)}</li>"
                                                           for ln in setup) + "</ul>",
                  html_table(header, table)]
    if base:
        b = [base["from"]] + [_cell(base, k, f) for k, f in (
            ("exact_match", "{:.3f}"), ("valid_loss", "{:.4f}"), ("general_text_loss", "{:.4f}"))]
        bh = ["base model measured in run", "exact match", "eval loss", "general text loss"]
        md += ["Base model before training:", "", md_table(bh, [b]), ""]
        html_parts += ["<h2>Base model before training</h2>", html_table(bh, [b])]
    if missing:
        mh, mr = ["method", "status", "reason"], [[x["method"], x["status"], x["reason"]]
                                                 for x in missing]
        md += ["Methods without results:", "", md_table(mh, mr), ""]
        html_parts += ["<h2>Methods without results</h2>", html_table(mh, mr)]
    md += ["Forgetting: tuned minus base loss on held-out general English text that the task "
           "does not cover (positive: worse). Peak memory: the training process's max RSS on "
           "CPU, the CUDA allocator's peak on GPU.", ""]
    html_parts.append("<p class=\"note\">Forgetting: tuned minus base loss on held-out general "
                      "English text (positive: worse).</p>")
    for name, title, b64 in pngs:
        md += [f"## {title}", "", f"![{title}]({name})", ""]
        html_parts += [f"<h2>{_esc(title)}</h2>",
                       f"<img alt=\"{_esc(title)}\" src=\"data:image/png;base64,{b64}\">"]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    (out / "report.html").write_text(html_page("lorakit compare", "\n".join(html_parts)),
                                     encoding="utf-8")
    report = {"setup": setup, "rows": [{k: v for k, v in r.items() if k != "loss_curve"}
                                       for r in rows], "missing": missing, "base": base}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _esc(s: str) -> str:
    return html.escape(s)


def _run_cfg(run_dir: Path) -> dict:
    p = run_dir / "config.yaml"
    return (yaml.safe_load(p.read_text()) or {}) if p.exists() else {}


def _setup_lines(out: Path, first: Optional[dict], state: dict,
                 methods: list[str]) -> list[str]:
    if first is None:
        return ["no method finished"]
    cfg = _run_cfg(out / first["method"]) if (out / first["method"]).exists() else {}
    tc, dc = cfg.get("train") or {}, cfg.get("data") or {}
    lines = [f"model: {first.get('model')}, data: {dc.get('train')}",
             f"budget: {first.get('total_steps')} steps of batch {tc.get('batch_size')} x "
             f"accumulation {tc.get('grad_accum')}, lr {tc.get('lr')}, seed {tc.get('seed')}, "
             f"{first.get('precision')}, eval limit {(cfg.get('eval') or {}).get('limit')}",
             f"machine: {machine_line()}"]
    walls = [r["wall_s"] for m, r in state["runs"].items() if m in methods and r.get("wall_s")]
    if walls:
        lines.append(f"wall time: {sum(walls):.0f} s in the training processes (each "
                     "method's last attempt), "
                     f"{state.get('last_call_wall_s', 0):.0f} s in the last compare call "
                     "(methods finished earlier are not run again)")
    return lines


def _dm_dd_plot(out: Path, finished: list[str]) -> list[tuple[str, str, str]]:
    """ΔD vs ΔM of full fine-tuning, LoRA and DoRA from ``lorakit inspect`` of each run (its
    ``<run>/inspect/inspect.json``, computed once). The methods are those that declare
    ``Method.dm_dd_figure`` (the DoRA paper's Fig. 2 compares exactly these three)."""
    results = []
    for m in [m.name for m in all_methods() if m.dm_dd_figure and m.name in finished]:
        cached = out / m / "inspect" / "inspect.json"
        try:
            results.append(json.loads(cached.read_text())[0] if cached.exists()
                           else inspect_adapters(out / m / "adapter")[0][0])
        except LorakitError:
            continue  # e.g. the base model is not available here any more
    if not results:
        return []
    title = "magnitude (ΔM) vs direction (ΔD) change per layer"
    return [("dm_dd.png", title, save_png(dm_dd_figure(pyplot(), results), out / "dm_dd.png"))]


def _plots(out: Path, rows: list[dict]) -> list[tuple[str, str, str]]:
    """(file name, title, base64 PNG) for each plot."""
    if not rows:
        return []
    plt = pyplot()
    names = [r["method"] for r in rows]
    found = []
    for key, title, _ in COLUMNS:
        if key in ("trainable_pct", "wall_s") or all(r.get(key) is None for r in rows):
            continue
        vals = [r.get(key) or 0.0 for r in rows]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.bar(names, vals, color="#4c72b0")
        if key == "trainable_params":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=.3)
        found.append((f"{key}.png", title, save_png(fig, out / f"{key}.png")))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        c = r["loss_curve"]
        if c:
            w = max(1, len(c) // 20)  # a moving average: one step's loss is noisy
            sm = [sum(c[max(0, i - w + 1):i + 1]) / len(c[max(0, i - w + 1):i + 1])
                  for i in range(len(c))]
            ax.plot(range(1, len(c) + 1), sm, label=r["method"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_yscale("log")
    ax.grid(alpha=.3)
    ax.legend(fontsize=8)
    ax.set_title("loss curves")
    found.append(("loss_curves.png", "loss curves", save_png(fig, out / "loss_curves.png")))
    return found


