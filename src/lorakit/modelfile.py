"""An Ollama Modelfile for an exported GGUF model: ``FROM`` the file, a ``TEMPLATE`` that renders
conversations as the model was trained on them, its stop tokens and default parameters, so that
``ollama create NAME -f Modelfile`` serves it. See docs/export.md.

Note: deriving the TEMPLATE
    Ollama's templates are Go templates, the model's chat template is Jinja (or, for a
    tokenizer without one, lorakit's ``role: content`` lines; training/formats.py ``render``).
    The Jinja is not translated: it is *rendered* with marker contents (training's own
    ``render``), and each role's text before and after its content is read off the result,
    as are the text before the first message, the default system turn a template adds when
    the conversation has none, and the generation prompt. The Go template emits those
    pieces around each message (the layout of Ollama's own templates: ``range .Messages``,
    ``$last``). Before any is written, the pieces are checked: put together for a set of
    conversations (with and without a system turn, several turns, ending on a user or an
    assistant turn) they must give exactly what the chat template renders. A template that
    does not decompose so (it folds the system text into the first user turn, say) gets no
    TEMPLATE line: Ollama then picks its own template from the GGUF's
    ``tokenizer.chat_template``, and the report says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MARK = {
    "system": "LKMARKSYSTEM",
    "user": "LKMARKUSER{}",
    "assistant": "LKMARKASSISTANT{}",
}


def _m(role: str, i: int = 1) -> dict:
    return {"role": role, "content": MARK[role].format(i)}


@dataclass
class Pieces:
    """A chat format as text around each message: ``start`` once at the beginning, a
    ``default_system`` turn when the conversation has no system turn, ``<role>_pre`` and
    ``<role>_post`` around each message, ``gen`` after the last user turn."""

    start: str
    default_system: str
    user_pre: str
    user_post: str
    assistant_pre: str
    assistant_post: str
    gen: str
    system_pre: str | None  # None: the format has no system turn of its own
    system_post: str | None

    def render(self, messages: list[dict], gen: bool) -> str:
        """What the Go template renders (and, with ``gen``, its generation prompt)."""
        out = self.start
        if messages and messages[0]["role"] != "system":
            out += self.default_system
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            if m["role"] == "system":
                out += f"{self.system_pre}{m['content']}{self.system_post}"
            elif m["role"] == "user":
                out += f"{self.user_pre}{m['content']}{self.user_post}"
                out += self.gen if last and gen else ""
            else:
                out += f"{self.assistant_pre}{m['content']}"
                out += self.assistant_post if not last else ""
        return out


def _split(text: str, mark: str) -> tuple[str, str] | None:
    return tuple(text.split(mark)) if text.count(mark) == 1 else None


def derive(render, bos: str | None = None) -> Pieces | None:
    """The ``Pieces`` of the chat format ``render(messages, add_generation_prompt)`` renders,
    or None when it does not decompose into text around each message. ``bos``: a BOS text
    the runtime adds itself (llama.cpp, when the file says add_bos_token), not repeated."""
    u1, a1, u2 = _m("user"), _m("assistant"), _m("user", 2)
    try:
        one, one_gen = render([u1], False), render([u1], True)
        two, three = render([u1, a1], False), render([u1, a1, u2], False)
    except Exception:  # a template that refuses these conversations
        return None
    if not (one_gen.startswith(one) and two.startswith(one) and three.startswith(two)):
        return None
    asst, user = _split(two[len(one) :], a1["content"]), _split(three[len(two) :], u2["content"])
    if asst is None or user is None:
        return None
    turn = user[0] + u1["content"] + user[1]
    if not one.endswith(turn):
        return None
    head = one[: len(one) - len(turn)]
    p = Pieces("", head, *user, *asst, one_gen[len(one) :], None, None)
    try:
        with_system = render([_m("system"), u1], False)
    except Exception:  # a template without system turns (it refuses them)
        with_system = None
    sys_parts = None
    if with_system is not None:
        if not with_system.endswith(turn):
            return None  # the system text is not a turn of its own (folded into the user's)
        sys_parts = _split(with_system[: len(with_system) - len(turn)], MARK["system"])
        if sys_parts is None:
            return None
    if sys_parts is not None:
        before, p.system_post = sys_parts
        if head.startswith(before) and head.endswith(p.system_post) and head != before:
            p.start = bos if bos and before.startswith(bos) else ""  # a default system turn
        else:
            p.start = head  # no default system turn: head is what starts every conversation
        if not before.startswith(p.start):
            return None
        p.system_pre, p.default_system = before[len(p.start) :], head[len(p.start) :]
    else:
        p.start, p.default_system = head, ""
    if bos and p.start.startswith(bos):
        p.start = p.start[len(bos) :]
    return p if _checks(p, render, bos) else None


#: the conversations the pieces are checked on
CONVERSATIONS = (
    [_m("user")],
    [_m("user"), _m("assistant"), _m("user", 2)],
    [_m("user"), _m("assistant")],
    [_m("system"), _m("user")],
    [_m("system"), _m("user"), _m("assistant"), _m("user", 2), _m("assistant", 2)],
)


def _checks(p: Pieces, render, bos: str | None) -> bool:
    for msgs in CONVERSATIONS:
        if p.system_pre is None and msgs[0]["role"] == "system":
            continue
        ends_on_user = msgs[-1]["role"] == "user"
        try:
            want = render(msgs, ends_on_user)
        except Exception:
            return False
        if bos and want.startswith(bos) and not p.start.startswith(bos):
            want = want[len(bos) :]
        got = p.render(msgs, ends_on_user) + ("" if ends_on_user else p.assistant_post)
        if got != want:
            return False
    return True


def _go(text: str) -> str:
    """``text`` as a Go template action printing it (a Go string literal)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(p: Pieces) -> str:
    """The Go template (Ollama's layout: ``range .Messages`` with ``$last``) of ``p``."""
    lines = [_go(p.start)]  # empty without a start
    if p.default_system:
        lines.append(
            '{{- if and .Messages (ne (index .Messages 0).Role "system") }}'
            f"{_go(p.default_system)}{{{{ end }}}}"
        )
    lines.append("{{- range $i, $_ := .Messages }}")
    lines.append("{{- $last := eq (len (slice $.Messages $i)) 1 }}")
    if p.system_pre is not None:
        lines.append(
            f'{{{{- if eq .Role "system" }}}}{_go(p.system_pre)}{{{{ .Content }}}}'
            f"{_go(p.system_post)}"
        )
        lines.append(f'{{{{- else if eq .Role "user" }}}}{_go(p.user_pre)}{{{{ .Content }}}}')
    else:
        lines.append(f'{{{{- if eq .Role "user" }}}}{_go(p.user_pre)}{{{{ .Content }}}}')
    lines[-1] += f"{_go(p.user_post)}{{{{ if $last }}}}{_go(p.gen)}{{{{ end }}}}"
    lines.append(
        f'{{{{- else if eq .Role "assistant" }}}}{_go(p.assistant_pre)}{{{{ .Content }}}}'
        f"{{{{ if not $last }}}}{_go(p.assistant_post)}{{{{ end }}}}"
    )
    lines += ["{{- end }}", "{{- end }}"]
    return "\n".join(line for line in lines if line)


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def modelfile(
    gguf_name: str,
    pieces: Pieces | None,
    stops: list[str],
    sampling: dict[str, float],
) -> str:
    """The Modelfile text: FROM the GGUF file beside it, the TEMPLATE of ``pieces`` (none
    when None), a ``PARAMETER stop`` per stop token, and ``sampling`` (Ollama's parameter
    names) or, without it, greedy decoding as lorakit evaluates."""
    lines = [
        "# Written by lorakit export --ollama. Serve with: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
    ]
    if pieces is not None:
        lines += ["", 'TEMPLATE """' + go_template(pieces) + '"""']
    else:
        lines += [
            "",
            "# No TEMPLATE: the chat template does not decompose into text around each",
            "# message; Ollama picks its own from the GGUF's tokenizer.chat_template.",
        ]
    lines.append("")
    lines += [f"PARAMETER stop {_quoted(s)}" for s in stops]
    if sampling:
        lines.append("# sampling defaults from the model's generation_config.json")
        lines += [f"PARAMETER {k} {v:g}" for k, v in sampling.items()]
    else:
        lines.append("# greedy decoding, as lorakit eval and generate answer")
        lines += ["PARAMETER temperature 0", "PARAMETER repeat_penalty 1"]
    return "\n".join(lines) + "\n"


def sampling_defaults(generation_config) -> dict[str, float]:
    """The sampling parameters a model's generation config sets (when it samples), under
    Ollama's names."""
    if generation_config is None or not getattr(generation_config, "do_sample", False):
        return {}
    names = {
        "temperature": "temperature",
        "top_p": "top_p",
        "top_k": "top_k",
        "min_p": "min_p",
        "repetition_penalty": "repeat_penalty",
    }
    out = {}
    for hf, ollama in names.items():
        v = getattr(generation_config, hf, None)
        if v is not None:
            out[ollama] = float(v)
    return out
