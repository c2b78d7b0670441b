"""Preference pairs for DPO: TRL's data formats -> token ids, exactly as TRL builds them.

A row holds a prompt and two completions, ``chosen`` (preferred) and ``rejected``, in one of
TRL's preference formats (``trl.data_utils``; docs/preference.md):

- standard: ``{"prompt": str, "chosen": str, "rejected": str}``;
- conversational: the same keys holding lists of messages (``[{"role", "content"}]``): the
  prompt's turns, then the chosen and the rejected answer turn(s);
- implicit prompt: no ``prompt`` key; chosen and rejected hold the whole text or
  conversation, and the prompt is their common beginning (TRL's ``extract_prompt``: the
  leading messages both share, or for strings the longest common prefix of characters, a
  space before the first difference going to the completions).

Tokens, as TRL 1.16's ``DPOTrainer`` makes them (checked against it in
tests/numerics/test_dpo_trl.py): the prompt and each prompt+completion are tokenized
separately, the chat template rendering a conversational prompt with the generation prompt
and a whole conversation without; a string's completion gets the EOS token appended as text;
the completion is what follows the longest common token prefix of the prompt and the two
prompt+completion sequences (the shorter of the two). A conversation is rendered with the
model's chat template as SFT renders it (``formats.render``). Only completion tokens are
scored (their labels; the prompt's are -100). Pairs whose prompt alone reaches
``max_length`` are dropped; longer sequences are cut at ``max_length`` from the end
(``keep_start``) or the start (``keep_end``).
"""

from __future__ import annotations

from typing import Any

from ..errors import LorakitError
from .data import IGNORE, Rows
from .formats import RowError, _messages, render

#: the held-out record's format name for preference data
PREFERENCE = "preference"


def is_preference(row: dict) -> bool:
    return "chosen" in row or "rejected" in row


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def row_kind(row: dict) -> str:
    """``conversational`` or ``standard``; a :class:`RowError` for a row that is neither."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise RowError(f"a preference row needs both chosen and rejected ({key} is missing)")
    values = [row[k] for k in ("prompt", "chosen", "rejected") if k in row]
    if all(isinstance(v, str) for v in values):
        return "standard"
    if all(_is_conversation(v) for v in values):
        return "conversational"
    raise RowError("prompt, chosen and rejected must all be strings or all be lists of messages")


def extract_prompt(chosen, rejected) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of an implicit-prompt row: TRL's ``extract_prompt``, quirks
    included (when one is a prefix of the other, the prompt stops one item short of it)."""
    n = min(len(chosen), len(rejected))
    idx = max(0, n - 1)
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i - 1 if chosen[i - 1] == " " else i
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def split_pair(row: dict, kind: str) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) of a row, checked: a :class:`RowError` says what is wrong."""
    if "prompt" in row:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
    if kind == "conversational":
        prompt = _messages(prompt) if prompt else []
        chosen, rejected = _messages(chosen), _messages(rejected)
    if chosen == rejected:
        raise RowError("chosen and rejected are the same")
    for name, c in (("chosen", chosen), ("rejected", rejected)):
        text = c if isinstance(c, str) else "".join(m["content"] for m in c)
        if not text.strip():
            raise RowError(f"the {name} completion is empty")
    return prompt, chosen, rejected


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def encode_pair(
    row: dict, kind: str, tokenizer, max_length: int, truncation_mode: str = "keep_start"
) -> dict | None:
    """``{"chosen": {input_ids, labels}, "rejected": {...}}`` of one row (See the module
    docstring), or None when its prompt alone reaches ``max_length``."""
    prompt, chosen, rejected = split_pair(row, kind)
    if kind == "conversational":
        # apply_chat_template(tokenize=True) renders, then tokenizes without special tokens
        p_ids = _ids(tokenizer, render(tokenizer, prompt, add_generation_prompt=True), False)
        c_ids = _ids(tokenizer, render(tokenizer, prompt + chosen), False)
        r_ids = _ids(tokenizer, render(tokenizer, prompt + rejected), False)
    else:
        eos = tokenizer.eos_token or ""
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        p_ids = _ids(tokenizer, prompt, True)
        c_ids = _ids(tokenizer, prompt + chosen, True)
        r_ids = _ids(tokenizer, prompt + rejected, True)
    n = min(_common_prefix(p_ids, c_ids), _common_prefix(p_ids, r_ids))
    if max_length and n >= max_length and truncation_mode == "keep_start":
        return None
    out = {}
    for name, ids in (("chosen", c_ids), ("rejected", r_ids)):
        labels = [IGNORE] * n + ids[n:]
        if max_length and len(ids) > max_length:
            cut = (
                slice(None, max_length)
                if truncation_mode == "keep_start"
                else slice(-max_length, None)
            )
            ids, labels = ids[cut], labels[cut]
        if all(t == IGNORE for t in labels[1:]):
            return None
        out[name] = {"input_ids": ids, "labels": labels}
    return out


def encode_pairs(
    rows: Rows, tokenizer, max_length: int, truncation_mode: str = "keep_start"
) -> tuple[list[dict], list[dict], list[tuple[int, str]]]:
    """(encoded pairs, the rows they came from, skipped rows with reasons). All rows must be
    of one kind: standard or conversational (one sentence otherwise)."""
    kinds: dict[str, int] = {}
    pairs, kept, skipped = [], [], list(rows.skipped)
    for row in rows.rows:
        line = row.get("_line", 0)
        try:
            kind = row_kind(row)
            kinds.setdefault(kind, line)
            enc = encode_pair(row, kind, tokenizer, max_length, truncation_mode)
        except RowError as e:
            skipped.append((line, str(e)))
            continue
        if enc is None:
            skipped.append((line, f"the prompt fills max_length ({max_length} tokens)"))
            continue
        pairs.append(enc)
        kept.append(row)
    if len(kinds) > 1:
        (a, la), (b, lb) = sorted(kinds.items(), key=lambda kv: kv[1])
        raise LorakitError(
            f"{rows.source} mixes {a} preference rows (line {la}) with {b} ones (line {lb}); "
            "use one format: strings or lists of messages"
        )
    if not pairs:
        report = Rows([], skipped, rows.source).report()
        raise LorakitError(
            f"{rows.source}: no usable preference pairs" + (f" ({report})" if report else "")
        )
    return pairs, kept, sorted(skipped)


def as_chat_row(row: dict) -> dict | None:
    """The prompt and chosen answer of a conversational pair as a chat row (for generation
    metrics: the chosen answer is the reference), or None for other rows."""
    try:
        kind = row_kind(row)
        prompt, chosen, _ = split_pair(row, kind)
    except RowError:
        return None
    if kind != "conversational" or not prompt or chosen[-1]["role"] != "assistant":
        return None
    return {"messages": prompt + chosen, "_line": row.get("_line", 0)}
