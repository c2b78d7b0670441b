"""The page helpers the compare report and the inspect page share: matplotlib on Agg, PNG
files with their base64 copy for self-contained HTML, HTML and Markdown tables, the machine
line."""

from __future__ import annotations

import base64
import html
import io
import os
import platform
from pathlib import Path

import torch

# ---- shared by the report pages (compare and inspect) --------------------------------------


def machine_line() -> str:
    dev = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    )
    return f"{dev}, torch {torch.__version__}, Python {platform.python_version()}"


def save_png(fig, path: Path) -> str:
    """Save a matplotlib figure as PNG; return it base64-encoded for an <img> data URI."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    path.write_bytes(data)
    return base64.b64encode(data).decode("ascii")


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    # start-up time: matplotlib is imported only when a page with plots is written
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # after use("Agg"), as matplotlib requires

    return plt


def html_page(title: str, body: str) -> str:
    css = (
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
        "padding:4px 8px;text-align:right}th{background:#eef}td:first-child,"
        "th:first-child{text-align:left}img{max-width:100%;margin:.5em 0}"
        "h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.5em}.note{color:#555}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}'
        f"</title><style>{css}</style></head><body>\n{body}\n</body></html>\n"
    )


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
