"""The compare report: Markdown, a self-contained HTML page and PNG plots.

Every figure is read from the runs' summary.json files; nothing is recomputed here, so the
report cannot disagree with the runs. Method-specific notes come from each method
(:meth:`Method.report_note`).
"""

from __future__ import annotations

import html
import json
import math
import statistics
from pathlib import Path

import yaml

from ..errors import LorakitError
from ..registry import all_methods, get_method
from ..training.memory import MIB, total_mib
from .inspection import dm_dd_figure, inspect_adapters
from .pages import html_page, html_table, machine_line, md_table, pyplot, save_png

# ---- the report ----------------------------------------------------------------------------

#: (key, column header, format) of the report's main table, in order; keys index a row dict.
COLUMNS = [
    ("trainable_params", "trainable params", "{:,}"),
    ("trainable_pct", "trainable %", "{:.3f}"),
    ("peak_memory_mb", "peak memory (MB)", "{:.0f}"),
    ("exact_memory_mib", "exact memory (MiB)", "{:.0f}"),
    ("params_mib", "params (MiB)", "{:.1f}"),
    ("grads_mib", "grads (MiB)", "{:.1f}"),
    ("optimizer_mib", "optimizer state (MiB)", "{:.1f}"),
    ("saved_mib", "saved for backward (MiB)", "{:.1f}"),
    ("median_step_time_s", "median step (s)", "{:.3f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("exact_match", "exact match", "{:.3f}"),
    ("f1", "token F1", "{:.3f}"),
    ("number", "number match", "{:.3f}"),
    ("valid_loss", "eval loss", "{:.4f}"),
    ("forgetting", "forgetting (Δ general loss)", "{:+.4f}"),
    ("final_train_loss", "final train loss", "{:.4f}"),
    ("wall_s", "wall time (s)", "{:.0f}"),
]


#: the parts of the exact memory (summary.json ``exact_memory``, training/memory.py): columns
#: of the table, not plots of their own (the total is plotted)
EXACT_PARTS = {
    "params_mib": "params_bytes",
    "grads_mib": "grads_bytes",
    "optimizer_mib": "optimizer_bytes",
    "saved_mib": "saved_bytes",
}


def _exact_columns(record: dict | None) -> dict:
    """The exact-memory columns of a row from summary.json's ``exact_memory`` (None each
    for a run without it)."""
    record = record or {}
    out = {
        k: (record[f] / MIB if record.get(f) is not None else None) for k, f in EXACT_PARTS.items()
    }
    out["exact_memory_mib"] = total_mib(record)
    return out


def summary_row(
    method: str, summary: dict, wall_s: float | None = None, cfg: dict | None = None
) -> dict:
    """One run's figures, taken from its summary.json (nothing recomputed); ``cfg``: its
    config.yaml (the ranks a claim compares)."""
    tuned, base = summary.get("tuned") or {}, summary.get("base") or {}
    forget, forget_se = None, None
    if "general_text_loss" in tuned and "general_text_loss" in base:
        forget = tuned["general_text_loss"] - base["general_text_loss"]
        forget_se = _paired_se(tuned.get("general_text_losses"), base.get("general_text_losses"))
    notes = get_method(summary["method"]).report_note(summary.get("method_summary") or {})
    cut = (tuned.get("generation") or {}).get("cut_note")
    if cut:  # never let a capped answer pass for a wrong one silently
        notes = "; ".join(x for x in (notes, f"WARNING: {cut}") if x)
    if summary.get("compiled"):  # its step times include torch.compile (train.compile)
        notes = "; ".join(x for x in (notes, "trained compiled (train.compile)") if x)
    metric = tuned.get("metric")
    quality = tuned.get(metric) if metric else None
    n_ex = (tuned.get("generation") or {}).get("examples")
    adapter = (cfg or {}).get("adapter") or {}
    opts = adapter.get(get_method(summary["method"]).options_key or "", None) or {}
    return {
        "method": method,
        "status": "done",
        "trainable_params": summary["trainable_params"],
        "trainable_pct": 100 * summary["trainable_params"] / summary["total_params"],
        "peak_memory_mb": summary.get("peak_memory_mb"),
        **_exact_columns(summary.get("exact_memory")),
        "median_step_time_s": summary.get("median_step_time_s"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "exact_match": tuned.get("exact_match"),
        "f1": tuned.get("f1"),
        "number": tuned.get("number"),
        "valid_loss": tuned.get("valid_loss"),
        "forgetting": forget,
        "final_train_loss": summary.get("final_train_loss"),
        "wall_s": wall_s,
        "loss_curve": summary.get("loss_curve") or [],
        "notes": notes,
        "quality": quality,
        "quality_metric": metric,
        "lr": (cfg or {}).get("train", {}).get("lr"),
        "rank": adapter.get("r"),
        "final_rank": opts.get("target_r") if isinstance(opts, dict) else None,
        # one run's standard errors over its evaluation examples (See claims: Note)
        "se": {
            "quality": (
                math.sqrt(quality * (1 - quality) / n_ex) if quality is not None and n_ex else None
            ),
            "forgetting": forget_se,
        },
    }


def _paired_se(tuned: list | None, base: list | None) -> float | None:
    """Standard error of the mean per-paragraph loss change (tuned - base)."""
    if not tuned or not base or len(tuned) != len(base) or len(tuned) < 2:
        return None
    d = [t - b for t, b in zip(tuned, base)]
    return statistics.stdev(d) / math.sqrt(len(d))


NUMERIC = [k for k, _, _ in COLUMNS] + ["quality"]


def aggregate(row: str, runs: list[dict]) -> dict:
    """A report row: the mean of its runs (seeds) and their spread (See claims: Note): the
    standard deviation over seeds, or with one run its standard errors."""
    first = runs[0]
    out = {k: v for k, v in first.items() if k not in NUMERIC and k != "se"}
    out.update(method=row, seeds=len(runs))
    for k in NUMERIC:
        vals = [r[k] for r in runs if r.get(k) is not None]
        if len(set(vals)) == 1 or len(vals) != len(runs):
            out[k] = first.get(k)  # one run, or equal in every seed (trainable parameters)
        else:
            out[k] = statistics.fmean(vals)
    if len(runs) > 1:
        out["spread"] = {
            k: statistics.stdev([r[k] for r in runs])
            for k in NUMERIC
            if all(r.get(k) is not None for r in runs)
        }
        curves = [r["loss_curve"] for r in runs]
        n = min(len(c) for c in curves)
        out["loss_curve"] = [statistics.fmean(c[i] for c in curves) for i in range(n)]
    else:
        out["spread"] = {k: v for k, v in first["se"].items() if v is not None}
    return out


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    s = (row.get("spread") or {}).get("quality" if key == row.get("quality_metric") else key)
    return fmt.format(v) + (f" ± {fmt.format(s).lstrip('+')}" if s else "")


def main_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, formatted rows) of the report's table."""
    header = ["method"] + [c[1] for c in COLUMNS] + ["notes"]
    return header, [
        [r["method"]] + [_cell(r, k, f) for k, _, f in COLUMNS] + [r["notes"]] for r in rows
    ]


def best_lr_factors(out: Path, plans: list) -> dict[str, float]:
    """Per row: the learning-rate factor whose seed-0 run reached the lowest validation loss
    (``--lr-sweep``; 1.0 for a row that was not swept)."""
    best: dict[str, tuple[float, float]] = {}
    for p in plans:
        summ = out / p.name / "summary.json"
        if p.seed_index or not summ.exists():
            continue
        loss = (json.loads(summ.read_text()).get("tuned") or {}).get("valid_loss")
        if loss is not None and (p.row not in best or loss < best[p.row][1]):
            best[p.row] = (p.lr_factor, loss)
    return {row: f for row, (f, _) in best.items()}


def _rows(out: Path, plans: list, state: dict):
    """(rows, missing, sweep): each report row from the runs at its chosen learning rate."""
    best = best_lr_factors(out, plans)
    order = list(dict.fromkeys(p.row for p in plans))
    rows, missing, sweep = [], [], []
    for row in order:
        group = [p for p in plans if p.row == row]
        runs = []
        for p in group:
            summ = out / p.name / "summary.json"
            if summ.exists():
                s = json.loads(summ.read_text())
                r = summary_row(
                    row, s, (state["runs"].get(p.name) or {}).get("wall_s"), _run_cfg(p.run_dir)
                )
                if len({q.lr_factor for q in group}) > 1 and not p.seed_index:
                    sweep.append(
                        [
                            row,
                            f"{r['lr']:g}",
                            _cell(r, "valid_loss", "{:.4f}"),
                            _cell(dict(r, spread={}), "quality", "{:.3f}"),
                            "yes" if p.lr_factor == best.get(row, 1.0) else "",
                        ]
                    )
                if p.lr_factor == best.get(row, 1.0):
                    runs.append((p, s, r))
        if runs:
            agg = aggregate(row, [r for _, _, r in runs])
            agg["_first"] = runs[0]
            rows.append(agg)
        else:
            rec = state["runs"].get(row, {})
            missing.append(
                {
                    "method": row,
                    "status": rec.get("status", "not run"),
                    "reason": rec.get("error", ""),
                }
            )
    return rows, missing, sweep


def _base_of(rows: list[dict]) -> dict | None:
    """The 16-bit base model's figures (QLoRA's own base is the 4-bit model)."""
    for r in rows:
        p, s, _ = r["_first"]
        if s.get("base") and not (_run_cfg(p.run_dir).get("adapter") or {}).get("quantize"):
            return {
                "from": p.name,
                **{k: v for k, v in s["base"].items() if k != "general_text_losses"},
            }
    return None


def write_report(out: Path, plans: list, state: dict) -> dict:
    """report.md, report.html, report.json and the PNG plots in ``out``."""
    from .claims import verdicts

    all_rows, missing, sweep = _rows(out, plans, state)
    short = [r for r in all_rows if not r["method"].startswith("long.")]
    long = [r for r in all_rows if r["method"].startswith("long.")]
    base, long_base = _base_of(short), _base_of(long)
    first = all_rows[0]["_first"][1] if all_rows else None
    header, table = main_table(short)
    setup = _setup_lines(out, short[0]["_first"][0] if short else None, first, state, plans)
    dm_dd, dm_pngs = _dm_dd_plot(out, short)
    claims = verdicts({r["method"]: r for r in all_rows}, dm_dd)
    pngs = _plots(out, short) + dm_pngs
    md = ["# lorakit compare", "", *[f"- {ln}" for ln in setup], ""]
    html_parts = [
        "<h1>lorakit compare</h1><ul>" + "".join(f"<li>{_esc(ln)}</li>" for ln in setup) + "</ul>"
    ]
    sections = [
        (
            "Claims",
            ["claim", "verdict", "figures"],
            [[c["claim"], c["verdict"], c["figures"]] for c in claims],
            (
                "Verdict rules: docs/compare.md. A difference within twice the combined "
                "spread is a tie; the spread is the standard deviation over seeds, or with "
                "one seed the standard error over the evaluation examples."
            ),
        ),
        ("Methods", header, table, None),
    ]
    if base:
        sections.append(("Base model before training", *_base_table(base), None))
    if long:
        lc = _run_cfg(long[0]["_first"][0].run_dir)
        sections.append(
            (
                (
                    f"Long context: task:passkey, rows of up to "
                    f"{(lc.get('data') or {}).get('max_seq_len')} tokens, "
                    f"{(lc.get('train') or {}).get('max_steps')} steps of batch 1 "
                    "(S2-Attn only in training; evaluated with full attention)"
                ),
                *main_table(long),
                None,
            )
        )
        if long_base:
            sections.append(("Long context: base model", *_base_table(long_base), None))
    if missing:
        sections.append(
            (
                "Methods without results",
                ["method", "status", "reason"],
                [[x["method"], x["status"], x["reason"]] for x in missing],
                None,
            )
        )
    if sweep:
        sections.append(
            (
                "Learning-rate sweep (the row uses the lowest validation loss)",
                ["row", "lr", "eval loss", "quality", "chosen"],
                sweep,
                None,
            )
        )
    settings = _settings_rows(plans)
    if settings:
        sections.append(
            (
                "Settings compare gave each method (where your config left them unset)",
                ["method", "key", "value", "source"],
                settings,
                None,
            )
        )
    for title, h, rows_, note in sections:
        md += [f"## {title}", "", md_table(h, rows_), ""] + ([note, ""] if note else [])
        html_parts += [f"<h2>{_esc(title)}</h2>", html_table(h, rows_)] + (
            [f'<p class="note">{_esc(note)}</p>'] if note else []
        )
    md += [
        (
            "Forgetting: tuned minus base loss on held-out general English text that the task "
            "does not cover (positive: worse). Peak memory: the training process's max RSS on "
            "CPU, the CUDA allocator's peak on GPU. Exact memory: parameters and buffers + "
            "gradients + optimizer state + what autograd saves for backward on the first "
            "micro-batch, counted tensor by tensor (no allocator in it)."
        ),
        "",
    ]
    html_parts.append(
        '<p class="note">Forgetting: tuned minus base loss on held-out general '
        "English text (positive: worse).</p>"
    )
    for name, title, b64 in pngs:
        md += [f"## {title}", "", f"![{title}]({name})", ""]
        html_parts += [
            f"<h2>{_esc(title)}</h2>",
            f'<img alt="{_esc(title)}" src="data:image/png;base64,{b64}">',
        ]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    (out / "report.html").write_text(
        html_page("lorakit compare", "\n".join(html_parts)), encoding="utf-8"
    )

    def public(r: dict) -> dict:
        return {k: v for k, v in r.items() if k not in ("loss_curve", "_first")}

    report = {
        "setup": setup,
        "claims": claims,
        "rows": [public(r) for r in short],
        "long_rows": [public(r) for r in long],
        "missing": missing,
        "base": base,
        "long_base": long_base,
        "dm_dd": dm_dd,
        "lr_sweep": [dict(zip(["row", "lr", "valid_loss", "quality", "chosen"], x)) for x in sweep],
        "settings": [dict(zip(["method", "key", "value", "source"], x)) for x in settings],
        "peft_results": _peft_results(out, plans, state),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _peft_results(out: Path, plans: list, state: dict) -> list[dict]:
    """Every finished run in the layout of PEFT's benchmark result files (peft_results.py)."""
    from .peft_results import meta_info, peft_result

    done = [p for p in plans if (p.run_dir / "summary.json").exists()]
    meta = meta_info(_run_cfg(done[0].run_dir)) if done else {}
    return [
        peft_result(
            p.name,
            p.row,
            p.run_dir,
            json.loads((p.run_dir / "summary.json").read_text()),
            _run_cfg(p.run_dir),
            (state["runs"].get(p.name) or {}).get("wall_s"),
            meta,
        )
        for p in done
    ]


def _base_table(base: dict) -> tuple[list[str], list[list[str]]]:
    keys = (
        ("exact_match", "{:.3f}"),
        ("f1", "{:.3f}"),
        ("valid_loss", "{:.4f}"),
        ("general_text_loss", "{:.4f}"),
    )
    return (
        ["base model measured in run", "exact match", "token F1", "eval loss", "general text loss"],
        [[base["from"]] + [_cell(base, k, f) for k, f in keys]],
    )


def _settings_rows(plans: list) -> list[list[str]]:
    seen, rows = set(), []
    for p in plans:
        for k, v, src in p.applied:
            if (p.row, k) not in seen:
                seen.add((p.row, k))
                rows.append([p.row, k, str(v), src])
    return rows


def _esc(s: str) -> str:
    return html.escape(s)


def _run_cfg(run_dir: Path) -> dict:
    p = run_dir / "config.yaml"
    return (yaml.safe_load(p.read_text()) or {}) if p.exists() else {}


def _setup_lines(out: Path, plan, first: dict | None, state: dict, plans: list) -> list[str]:
    if first is None or plan is None:
        return ["no method finished"]
    cfg = _run_cfg(plan.run_dir)
    tc, dc = cfg.get("train") or {}, cfg.get("data") or {}
    seeds = 1 + max([p.seed_index for p in plans] or [0])
    lines = [
        f"model: {first.get('model')}, data: {dc.get('train')}",
        f"budget: {first.get('total_steps')} steps of batch {tc.get('batch_size')} x "
        f"accumulation {tc.get('grad_accum')}, seed {tc.get('seed')}"
        + (
            f" and the next {seeds - 1} (mean ± standard deviation over {seeds} seeds)"
            if seeds > 1
            else " (± : standard error over the evaluation examples)"
        )
        + f", {first.get('precision')}, eval limit {(cfg.get('eval') or {}).get('limit')}; "
        "learning rates and method settings per method: see Settings",
        f"machine: {machine_line()}",
    ]
    names = {p.name for p in plans}
    walls = [r["wall_s"] for m, r in state["runs"].items() if m in names and r.get("wall_s")]
    if walls:
        lines.append(
            f"wall time: {sum(walls):.0f} s in the training processes (each "
            "run's last attempt), "
            f"{state.get('last_call_wall_s', 0):.0f} s in the last compare call "
            "(runs finished earlier are not run again)"
        )
    return lines


def _dm_dd_plot(out: Path, rows: list[dict]) -> tuple[dict, list[tuple[str, str, str]]]:
    """ΔD vs ΔM of full fine-tuning, LoRA and DoRA from ``lorakit inspect`` of each run (its
    ``<run>/inspect/inspect.json``, computed once), and each one's correlation across layers
    (for the claims). The methods are those that declare ``Method.dm_dd_figure`` (the DoRA
    paper's Fig. 2 compares exactly these three), in rows named after the method."""
    wanted = {m.name for m in all_methods() if m.dm_dd_figure}
    results, corr = [], {}
    for r in rows:
        p = r["_first"][0]
        if r["method"] not in wanted or p.method != r["method"]:
            continue
        cached = p.run_dir / "inspect" / "inspect.json"
        try:
            res = (
                json.loads(cached.read_text())[0]
                if cached.exists()
                else inspect_adapters(p.run_dir / "adapter")[0][0]
            )
        except LorakitError:
            continue  # e.g. the base model is not available here any more
        results.append(res)
        if res.get("correlation_dd_dm") is not None:
            corr[r["method"]] = {"corr": res["correlation_dd_dm"], "layers": len(res["layers"])}
    if not results:
        return corr, []
    title = "magnitude (ΔM) vs direction (ΔD) change per layer"
    return corr, [
        ("dm_dd.png", title, save_png(dm_dd_figure(pyplot(), results), out / "dm_dd.png"))
    ]


def _plots(out: Path, rows: list[dict]) -> list[tuple[str, str, str]]:
    """(file name, title, base64 PNG) for each plot."""
    if not rows:
        return []
    plt = pyplot()
    names = [r["method"] for r in rows]
    found = []
    for key, title, _ in COLUMNS:
        if key in ("trainable_pct", "wall_s", *EXACT_PARTS) or all(
            r.get(key) is None for r in rows
        ):
            continue
        vals = [r.get(key) or 0.0 for r in rows]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.bar(names, vals, color="#4c72b0")
        if key == "trainable_params":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
        found.append((f"{key}.png", title, save_png(fig, out / f"{key}.png")))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        c = r["loss_curve"]
        if c:
            w = max(1, len(c) // 20)  # a moving average: one step's loss is noisy
            sm = [
                sum(c[max(0, i - w + 1) : i + 1]) / len(c[max(0, i - w + 1) : i + 1])
                for i in range(len(c))
            ]
            ax.plot(range(1, len(c) + 1), sm, label=r["method"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (moving average)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("loss curves")
    found.append(("loss_curves.png", "loss curves", save_png(fig, out / "loss_curves.png")))
    return found
