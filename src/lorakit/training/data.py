"""Datasets -> token sequences with prompt masking and truncation (batches: ``batching.py``).

Rows come from a built-in task (``task:NAME``) or a local file. JSONL is read line by line
(``json.loads``: data only) so that a malformed line is reported with its number and skipped
while the rest is used; JSON arrays, CSV and Parquet are read with ``datasets``.

The row formats (chat, sharegpt, alpaca, prompt/completion, text) are in ``formats.py``. A
conversation is rendered with the tokenizer's chat template and the loss is on every assistant
turn (``data.train_on``), found as character spans of the rendered text and mapped to tokens
through the tokenizer's offsets; plain text trains on every token.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LorakitError
from ..files import file_errors
from .formats import (
    assistant_spans,
    check_row,
    conversation,
    detect_format,
    prompt_and_answer,
    render,
)
from .tasks import get_task

IGNORE = -100
MAX_LINE_BYTES = 16 * 2**20  # a JSONL line longer than this is skipped and reported


@dataclass
class Rows:
    """Usable rows plus the skipped ones: [(line number, reason)]."""

    rows: list[dict]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    source: str = ""

    def report(self) -> str | None:
        if not self.skipped:
            return None
        shown = "; ".join(f"line {n}: {why}" for n, why in self.skipped[:5])
        more = f" (and {len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
        return f"{self.source}: skipped {len(self.skipped)} bad row(s): {shown}{more}"


def _read_jsonl(path: Path) -> Rows:
    rows, skipped = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if len(raw) > MAX_LINE_BYTES:
                skipped.append((n, f"line longer than {MAX_LINE_BYTES // 2**20} MiB"))
                continue
            try:  # a byte-order mark, as some Windows editors write, starts the first line
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8").strip()
            except UnicodeDecodeError:
                skipped.append((n, "not UTF-8"))
                continue
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.append((n, f"malformed JSON ({e.msg})"))
                continue
            if not isinstance(obj, dict):
                skipped.append((n, "not a JSON object"))
                continue
            obj["_line"] = n
            rows.append(obj)
    if not rows and skipped and all("malformed JSON" in why for _, why in skipped):
        with open(path, "rb") as f:
            first = f.readline().decode("utf-8", "replace")
        if "," in first and not first.lstrip().startswith(("{", "[")):
            raise LorakitError(
                f"data file {str(path)!r} holds comma-separated values, not JSON "
                "lines; name it .csv (its header row names the fields)"
            )
    return Rows(rows, skipped, str(path))


def _read_txt(path: Path) -> Rows:
    """Plain text: each paragraph (separated by blank lines) is one ``{"text"}`` row, its
    line number that of its first line; a file without blank lines is one row."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LorakitError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows, para, start = [], [], 0
    for n, line in enumerate(text.splitlines() + [""], 1):
        if line.strip():
            start = start or n
            para.append(line.rstrip())
        elif para:
            rows.append({"text": "\n".join(para), "_line": start})
            para, start = [], 0
    return Rows(rows, [], str(path))


#: what a Hugging Face Hub dataset id looks like (``name`` or ``org/name``), with an optional
#: configuration (``:main``) and split (``@test``): ``openai/gsm8k:main@test``
HUB_ID = re.compile(
    r"(?P<id>[A-Za-z0-9][\w.-]*(/[\w.-]+)?)(:(?P<config>[\w.-]+))?"
    r"(@(?P<split>[\w.-]+))?"
)


def _read_hub(spec: str, split: str) -> Rows:
    """A split of a Hub dataset through ``datasets.load_dataset`` (its local cache when
    offline): ``ID[:CONFIG][@SPLIT]``, the ``train`` split unless ``@SPLIT`` names another;
    held-out rows come from ``data.valid_ratio`` as for a file, unless ``data.valid`` names
    a split of its own (``openai/gsm8k:main@test``)."""
    import datasets  # start-up time: slow to import, and only Hub ids and some files need it

    datasets.disable_progress_bars()
    m = HUB_ID.fullmatch(spec)
    try:
        ds = datasets.load_dataset(m["id"], m["config"], split=m["split"] or "train")
    except Exception as e:  # datasets raises many types: offline, not found, gated
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        why = (
            "it is not in the local Hugging Face datasets cache and the Hub is offline"
            if offline or "offline" in first.lower() or "connect" in first.lower()
            else first
        )
        raise LorakitError(
            f"{spec!r} is not a local file, and as a Hub dataset it cannot be loaded: {why}"
        ) from None
    return Rows([dict(r, _line=i + 1) for i, r in enumerate(ds)], [], spec)


def read_rows(spec: str, split: str = "train", max_len: int | None = None) -> Rows:
    """Rows of a built-in task split or of a local data file; ``max_len`` (the run's
    ``data.max_seq_len``) sets the lengths of a task whose rows follow it (``passkey``)."""
    if spec.startswith("task:"):
        rows = get_task(spec[5:]).rows(split, max_len=max_len)
        return Rows([dict(r, _line=i + 1) for i, r in enumerate(rows)], [], spec)
    path = Path(spec)
    if not path.is_file():
        if HUB_ID.fullmatch(spec) and not path.suffix and not path.exists():
            return _read_hub(spec, split)
        if path.is_dir():
            raise LorakitError(
                f"data file {spec!r} is a folder; name a .jsonl, .json, .csv, .parquet or .txt file"
            )
        raise LorakitError(f"data file {spec!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with file_errors("read", path):
            out = _read_jsonl(path)
    elif suffix == ".txt":
        with file_errors("read", path):
            out = _read_txt(path)
    elif suffix in (".json", ".csv", ".parquet"):
        import datasets  # start-up time: slow to import, and only these formats need it

        datasets.disable_progress_bars()
        kind = {".json": "json", ".csv": "csv", ".parquet": "parquet"}[suffix]
        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as e:  # datasets raises many types for unreadable files
            raise LorakitError(f"cannot read {spec}: {str(e).splitlines()[0][:200]}") from None
        out = Rows([dict(r, _line=i + 1) for i, r in enumerate(ds)], [], str(path))
    else:
        raise LorakitError(
            f"data file {spec!r} has an unknown format; use .jsonl, .json, .csv, .parquet or .txt"
        )
    if not out.rows:
        raise LorakitError(
            f"data file {spec!r} has no usable rows" + (f" ({out.report()})" if out.skipped else "")
        )
    return out


#: fields ``data.columns`` may rename: a row's own, and those of each message in it
ROW_FIELDS = (
    "messages",
    "conversations",
    "instruction",
    "input",
    "output",
    "system",
    "history",
    "prompt",
    "completion",
    "text",
    "tools",
)
MESSAGE_FIELDS = ("role", "content", "from", "value")


def _alternatives(theirs) -> list[str]:
    return list(theirs) if isinstance(theirs, (list, tuple)) else [theirs]


def _fill(row: dict, ours: str, theirs) -> None:
    """Set ``row[ours]`` from the first alternative of a ``data.columns`` entry the row has:
    a field name (renamed), or a template of the row's fields (``"Question: {query}"``,
    filled with :meth:`str.format`)."""
    for alt in _alternatives(theirs):
        if "{" not in alt:
            if alt in row:
                row[ours] = row.pop(alt)
                return
            continue
        fields = [f for _, f, _, _ in string.Formatter().parse(alt) if f is not None]
        if all(f in row for f in fields):
            row[ours] = alt.format_map({f: row[f] for f in fields})
            return


def remap(rows: Rows, columns: dict, roles: dict[str, str]) -> Rows:
    """``rows`` with the file's field and role names mapped to lorakit's (``data.columns``:
    lorakit name -> the file's, or a list of alternatives, the first the row has; a row
    field may also be a template of the file's fields, ``{prompt: "Question: {query}"}``;
    ``data.roles``: the file's role -> user/assistant/...)."""
    unknown = sorted(set(columns) - set(ROW_FIELDS) - set(MESSAGE_FIELDS))
    if unknown:
        raise LorakitError(
            f"data.columns: {unknown[0]!r} is not a field lorakit reads; "
            f"map one of {', '.join(ROW_FIELDS + MESSAGE_FIELDS)}"
        )
    if not columns and not roles:
        return rows
    top = {ours: theirs for ours, theirs in columns.items() if ours in ROW_FIELDS}
    inner = {
        t: ours
        for ours, theirs in columns.items()
        if ours in MESSAGE_FIELDS
        for t in _alternatives(theirs)
    }

    def message(m: Any) -> Any:
        if not isinstance(m, dict):
            return m
        m = {inner.get(k, k): v for k, v in m.items()}
        for key in ("role", "from"):
            if key in m and isinstance(m[key], str):
                m[key] = roles.get(m[key], m[key])
        return m

    out = []
    for row in rows.rows:
        row = dict(row)
        for ours, theirs in top.items():
            if ours not in row:
                _fill(row, ours, theirs)
        for key in ("messages", "conversations", "prompt", "completion"):
            if isinstance(row.get(key), list):
                row[key] = [message(m) for m in row[key]]
        out.append(row)
    return Rows(out, rows.skipped, rows.source)


def encode_row(
    row: dict,
    fmt: str,
    tokenizer,
    max_len: int,
    train_on: str = "all_assistant",
    truncation: str = "right",
) -> dict | None:
    """input_ids and labels: the loss is on every assistant turn (``all_assistant``), the last
    one (``last_assistant``) or every token (``all``); None if nothing to learn survives
    truncation. Prompt tokens get the label -100. A row longer than ``max_len`` loses its
    end (``truncation="right"``) or its beginning (``"left"``: the answer and the end of the
    prompt stay)."""
    conv = conversation(row, fmt)
    if conv is not None and train_on != "all" and getattr(tokenizer, "is_fast", False):
        marked = assistant_spans(tokenizer, *conv)
        if marked is not None:
            full, spans = marked
            return _labelled(
                tokenizer,
                full,
                spans[-1:] if train_on == "last_assistant" else spans,
                max_len,
                truncation,
            )
    prompt, answer = prompt_and_answer(row, fmt, tokenizer)
    full = prompt + answer + (tokenizer.eos_token or "")
    if conv is not None and getattr(tokenizer, "chat_template", None):
        rendered = render(tokenizer, *conv)
        if rendered.startswith(prompt):  # else a template that rewrites history: the above
            full = rendered
    span = [(0, len(full))] if train_on == "all" else [(len(prompt), len(full))]
    return _labelled(tokenizer, full, span, max_len, truncation)


def _labelled(
    tokenizer, text: str, spans: list[tuple[int, int]], max_len: int, truncation: str = "right"
) -> dict | None:
    """Tokenize ``text``; a token is labelled when it starts inside one of ``spans``."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if not ids:
        return None
    labels = [t if any(a <= s < b for a, b in spans) else IGNORE for t, (s, _) in zip(ids, offsets)]
    bos = (
        tokenizer.bos_token_id is not None
        and getattr(tokenizer, "add_bos_token", False)
        and ids[0] != tokenizer.bos_token_id
    )
    if truncation == "left" and len(ids) + bos > max_len:
        keep = max_len - bos  # the last tokens, after the BOS token the model expects first
        ids, labels = ids[len(ids) - keep :], labels[len(labels) - keep :]
    if bos:
        ids, labels = [tokenizer.bos_token_id] + ids, [IGNORE] + labels
    ids, labels = ids[:max_len], labels[:max_len]
    if all(t == IGNORE for t in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}


@dataclass
class Encoded:
    examples: list[dict]
    fmt: str
    rows: list[dict]
    skipped: list[tuple[int, str]]
    source: str

    def report(self) -> str | None:
        return Rows(self.rows, self.skipped, self.source).report()


def encode(
    rows: Rows,
    tokenizer,
    fmt: str = "auto",
    max_len: int = 512,
    train_on: str = "all_assistant",
    truncation: str = "right",
) -> Encoded:
    """Check, render and tokenize rows; bad rows are skipped and reported with line numbers."""
    fmt = detect_format(rows.rows[0]) if fmt == "auto" else fmt
    _check_room(rows.rows[0], fmt, tokenizer, max_len)
    examples, kept, skipped = [], [], list(rows.skipped)
    for row in rows.rows:
        why = check_row(row, fmt)
        ex = None if why else encode_row(row, fmt, tokenizer, max_len, train_on, truncation)
        if ex is None:
            skipped.append((row.get("_line", 0), why or "nothing left to learn after truncation"))
            continue
        examples.append(ex)
        kept.append(row)
    if not examples:
        raise LorakitError(
            f"{rows.source}: no usable rows in format {fmt!r}"
            + (f" ({Rows([], skipped, rows.source).report()})" if skipped else "")
        )
    return Encoded(examples, fmt, kept, sorted(skipped), rows.source)


def _check_room(row: dict, fmt: str, tokenizer, max_len: int) -> None:
    """Refuse a ``max_len`` that the chat template's own tokens (an empty user turn and an
    empty answer) already fill: no conversation could keep a token to learn."""
    if not getattr(tokenizer, "chat_template", None):
        return
    try:
        conv = conversation(row, fmt)
    except Exception:  # a bad first row is reported with the others
        return
    if conv is None:
        return
    empty = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    try:
        text = render(tokenizer, empty)
    except Exception:  # a template that refuses an empty exchange: no figure to check
        return
    own = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if max_len <= own:
        raise LorakitError(
            f"data.max_seq_len ({max_len}) is not longer than the chat template's own "
            f"{own} tokens (an empty question and answer), so no conversation keeps a token "
            "to learn; raise data.max_seq_len"
        )


def split_rows(rows: list[dict], ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A deterministic held-out split of ``ratio`` of the rows (at least one row when
    ratio > 0), made before encoding so that no held-out row is ever trained on, packed or
    not."""
    if ratio <= 0 or len(rows) < 2:
        return rows, []
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    held = set(idx[: max(1, int(len(rows) * ratio))])
    return ([r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)])


def select_lines(rows: Rows, lines: list[int] | None) -> Rows:
    """The rows whose ``_line`` is in ``lines`` (all rows when ``lines`` is None)."""
    if lines is None:
        return rows
    keep = set(lines)
    return Rows([r for r in rows.rows if r.get("_line") in keep], [], rows.source)


# ---- the held-out rows of a run ---------------------------------------------------------


def heldout_record(
    train_spec: str,
    valid_spec: str | None,
    fmt: str,
    valid_lines: list[int] | None,
    mapping: dict | None = None,
) -> dict:
    """Which rows a run holds out, as written to ``<run>/heldout.json``.

    ``valid``: the rows of the validation loss; ``metric``: the rows the generation metric
    is computed on (a built-in task's test split; otherwise the validation rows, when they
    have reference answers). ``lines`` are 1-based row numbers in the source (None: all)."""
    if valid_spec:
        valid = {"data": valid_spec, "split": "valid", "lines": None}
    elif train_spec.startswith("task:"):
        valid = {"data": train_spec, "split": "valid", "lines": None}
    else:
        valid = {"data": train_spec, "split": "train", "lines": valid_lines}
    if train_spec.startswith("task:") and not valid_spec:
        metric: dict | None = {"data": train_spec, "split": "test", "lines": None}
    else:
        metric = dict(valid) if fmt != "text" and (valid_spec or valid_lines) else None
    return {
        "format": fmt,
        "valid": valid,
        "metric": metric,
        **({"mapping": mapping} if mapping else {}),
    }


def merge_records(records: list[dict]) -> dict:
    """The held-out record of several training files: each file's rows, in order."""
    metric = [r["metric"] for r in records if r.get("metric")]
    return {**records[0], "valid": [r["valid"] for r in records], "metric": metric or None}


def weighted(examples: list[dict], weight: float, seed: int) -> list[dict]:
    """``examples`` used ``weight`` times: whole repeats, then a seeded random share."""
    whole, frac = int(weight), weight - int(weight)
    extra = random.Random(seed).sample(examples, round(frac * len(examples))) if frac else []
    return examples * whole + extra


def heldout_limits(cfg, fmt: str) -> tuple[int, str]:
    """(max length, truncation) that held-out rows of format ``fmt`` are encoded with under
    the run config ``cfg``: DPO's for preference pairs, else the data section's."""
    if fmt == "preference":
        return cfg.dpo.max_length or cfg.data.max_seq_len, cfg.dpo.truncation_mode
    return cfg.data.max_seq_len, cfg.data.truncation


def build_heldout(
    record: dict,
    tokenizer,
    max_len: int,
    train_on: str = "all_assistant",
    truncation: str = "right",
) -> tuple[list[dict], list[dict], list[dict]]:
    """(validation examples, rows for the generation metric, preference pairs) of a held-out
    record; the same call serves the training run and a later ``lorakit eval`` of its
    adapter. A record of several training files lists each file's held-out rows. Preference
    data (DPO; ``truncation``: its truncation_mode) gives the pairs of the metric rows, their
    chosen sides as validation examples and their prompts with the chosen answers as the
    generation metric's rows."""
    fmt, mapping = record["format"], record.get("mapping") or {}

    def read(part: dict | list | None) -> list[Rows]:
        out = []
        for p in part if isinstance(part, list) else [part] if part else []:
            if p["lines"] is None or p["lines"]:
                rows = select_lines(read_rows(p["data"], p["split"], max_len), p["lines"])
                rows = remap(rows, mapping.get("columns", {}), mapping.get("roles", {}))
                if rows.rows:
                    out.append(rows)
        return out

    if fmt == "preference":
        from .preference import as_chat_row, encode_pairs

        valid = [
            p["chosen"]
            for rows in read(record["valid"])
            for p in encode_pairs(rows, tokenizer, max_len, truncation)[0]
        ]
        pairs, metric_rows = [], []
        for rows in read(record.get("metric")):
            encoded, kept, _ = encode_pairs(rows, tokenizer, max_len, truncation)
            pairs += encoded
            metric_rows += [c for c in map(as_chat_row, kept) if c is not None]
        return valid, metric_rows, pairs

    def encoded(part: dict | list | None) -> list[Encoded]:
        return [
            encode(r, tokenizer, fmt, max_len, train_on, truncation=truncation) for r in read(part)
        ]

    valid = [ex for e in encoded(record["valid"]) for ex in e.examples]
    metric_rows = [r for e in encoded(record.get("metric")) for r in e.rows]
    return valid, metric_rows, []
