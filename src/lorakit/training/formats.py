"""Row formats: what a row of training data says, as one conversation or as plain text.

``data.format: auto`` detects the format from the first usable row's fields:

- ``chat``: ``{"messages": [{"role", "content"}, ...]}`` (OpenAI / TRL); ``content`` is a string
  or a list of parts ``[{"type": "text", "text": ...}]``;
- ``sharegpt``: ``{"conversations": [{"from", "value"}, ...], "system"?, "tools"?}``
  (LLaMA-Factory, axolotl): roles ``human``/``gpt``/``system``/``function_call``/``observation``
  and their OpenAI names;
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?}`` (``history``: earlier
  ``[question, answer]`` turns, as LLaMA-Factory writes them);
- ``prompt_completion``: ``{"prompt", "completion"}``, plain strings, or lists of messages
  (TRL's conversational prompt/completion);
- ``text``: ``{"text"}``.

lorakit trains on text: a row with an image, audio or other non-text part is skipped with
that reason, never trained as text. ``tools`` (a list, or a JSON string of one) is passed to
the chat template, which renders it where the model's template has a place for it.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import LorakitError

FORMAT_FIELDS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}


class RowError(ValueError):
    """Why a row cannot be used (it is skipped and reported with its line number)."""


def detect_format(row: dict) -> str:
    for fmt, fields in FORMAT_FIELDS.items():
        if all(f in row for f in fields):
            return fmt
    keys = ", ".join(sorted(k for k in row if k != "_line"))
    raise LorakitError(
        f"cannot tell the data format from the fields ({keys}); expected "
        "messages, conversations, instruction/output, prompt/completion or text"
    )


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RowError("message content must be text or a list of text parts")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif (
            isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        ):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise RowError(f"a {kind!s} content part (lorakit trains on text only)")
    return "".join(texts)


def _messages(
    msgs: Any, role_key: str = "role", content_key: str = "content", roles: dict | None = None
) -> list[dict]:
    if (
        not isinstance(msgs, list)
        or not msgs
        or not all(isinstance(m, dict) and role_key in m and content_key in m for m in msgs)
    ):
        raise RowError(f"messages must be a list of {{{role_key}, {content_key}}}")
    out = []
    for m in msgs:
        role = m[role_key] if roles is None else roles.get(m[role_key])
        if role is None:
            raise RowError(f"unknown role {m[role_key]!r}")
        out.append({"role": role, "content": _text(m[content_key])})
    return out


def conversation(row: dict, fmt: str) -> tuple[list[dict], list | None] | None:
    """(messages, tools) of a conversational row, or None for plain text formats."""
    if fmt == "chat":
        msgs = _messages(row["messages"])
    elif fmt == "sharegpt":
        msgs = _messages(row["conversations"], "from", "value", SHAREGPT_ROLES)
    elif fmt == "alpaca":
        msgs = []
        for turn in row.get("history") or []:
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
                raise RowError("history must be a list of [question, answer] pairs")
            msgs += [
                {"role": "user", "content": _text(turn[0])},
                {"role": "assistant", "content": _text(turn[1])},
            ]
        user = _text(row["instruction"]) + (f"\n\n{row['input']}" if row.get("input") else "")
        msgs += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(row["output"])},
        ]
    elif fmt == "prompt_completion" and isinstance(row["prompt"], list):
        msgs = _messages(row["prompt"]) + _messages(row["completion"])
    else:
        return None
    if row.get("system") and fmt in ("sharegpt", "alpaca") and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": _text(row["system"])}, *msgs]
    if msgs[-1]["role"] != "assistant":
        raise RowError("the last message must be the assistant's")
    return msgs, _tools(row.get("tools"))


def _tools(tools: Any) -> list | None:
    if not tools:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RowError("tools is not valid JSON") from None
    if not isinstance(tools, list):
        raise RowError("tools must be a list of tool definitions")
    return tools


def check_row(row: dict, fmt: str) -> str | None:
    """Why ``row`` cannot be used in format ``fmt`` (None: it can)."""
    for f in FORMAT_FIELDS[fmt]:
        if f not in row or row[f] is None:
            return f"missing field {f!r}"
    try:
        conv = conversation(row, fmt)
    except RowError as e:
        return str(e)
    if conv is None and not all(isinstance(row[f], str) for f in FORMAT_FIELDS[fmt]):
        return "fields must be strings"
    return None


def render(
    tokenizer,
    messages: list[dict],
    tools: list | None = None,
    add_generation_prompt: bool = False,
    use_template: bool = True,
) -> str:
    """The conversation as the model sees it: its chat template, or ``role: content`` lines
    for a tokenizer without one (or with ``use_template=False``)."""
    if use_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def prompt_and_answer(row: dict, fmt: str, tokenizer) -> tuple[str, str]:
    """(prompt text, reference answer text): the generation metric's input and target (the
    last assistant turn of a conversation)."""
    conv = conversation(row, fmt)
    if conv is not None:
        msgs, tools = conv
        return render(tokenizer, msgs[:-1], tools, add_generation_prompt=True), msgs[-1]["content"]
    if fmt == "prompt_completion":
        return row["prompt"], row["completion"]
    return "", row["text"]


def assistant_spans(
    tokenizer, messages: list[dict], tools: list | None = None
) -> tuple[str, list[tuple[int, int]]] | None:
    """(rendered conversation, character spans of every assistant turn, its end-of-turn
    marker included), or None when the template rewrites earlier turns (each prefix of the
    conversation must render as a prefix of the whole)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    full = render(tokenizer, messages, tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], tools, add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], tools)
        if not (full.startswith(before) and full.startswith(upto) and len(upto) > len(before)):
            return None
        spans.append((len(before), len(upto)))
    return full, spans
