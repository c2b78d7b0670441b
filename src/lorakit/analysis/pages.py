"""The pages lorakit writes: the compare report (Markdown, self-contained HTML, PNG plots)
and the helpers the inspect page shares with it (matplotlib on Agg, tables, base64 images).

Every figure of the compare report is read from the runs' summary.json files; nothing is
recomputed here, so the report cannot disagree with the runs.
"""

from __future__ import annotations

import base64
import io as _io
import json
import os
import platform
from pathlib import Path
from typing import Optional

from ..errors import LorakitError


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
    ms = summary.get("method_summary") or {}
    drop = summary.get("lora_drop") or {}
    notes = (f"rank {ms['total_rank']} of {ms['init_total_rank']} (target "
             f"{ms['target_total_rank']})" if "total_rank" in ms else
             f"own LoRA on {len(drop['kept'])} of {len(drop['importance'])} layers"
             if drop.get("kept") is not None and drop.get("importance") else "")
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
    import html

    return html.escape(s)


def _run_cfg(run_dir: Path) -> dict:
    import yaml

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


#: The seed's magnitude/direction figure compares these (DoRA paper, Fig. 2).
DM_DD_METHODS = ("full", "lora", "dora")


def _dm_dd_plot(out: Path, finished: list[str]) -> list[tuple[str, str, str]]:
    """ΔD vs ΔM of full fine-tuning, LoRA and DoRA from ``lorakit inspect`` of each run (its
    ``<run>/inspect/inspect.json``, computed once)."""
    from .inspection import dm_dd_figure, inspect_adapters

    results = []
    for m in [m for m in DM_DD_METHODS if m in finished]:
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


# ---- shared by the report pages (compare and inspect) --------------------------------------

def machine_line() -> str:
    import torch

    dev = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
           else f"CPU ({os.cpu_count()} cores, {platform.machine()})")
    return f"{dev}, torch {torch.__version__}, Python {platform.python_version()}"


def save_png(fig, path: Path) -> str:
    """Save a matplotlib figure as PNG; return it base64-encoded for an <img> data URI."""
    import matplotlib.pyplot as plt

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    path.write_bytes(data)
    return base64.b64encode(data).decode("ascii")


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def html_page(title: str, body: str) -> str:
    import html

    css = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
           "padding:4px 8px;text-align:right}th{background:#eef}td:first-child,"
           "th:first-child{text-align:left}img{max-width:100%;margin:.5em 0}"
           "h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.5em}.note{color:#555}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{css}</style></head><body>\n{body}\n</body></html>\n")


def html_table(header: list[str], rows: list[list[str]]) -> str:
    import html

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
