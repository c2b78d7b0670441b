"""The tokenizer of a GGUF model file: its ``tokenizer.*`` keys (vocabulary, pre-tokenizer,
merges, special tokens, chat template), from the most faithful source at hand.

Note: where the tokenizer comes from
    1. A GGUF file of the base model: ``--vocab-from FILE``, or by default the embedded
       model's own GGUF (the file lorakit read the embedded model from). Its ``tokenizer.*``
       keys are copied as they are: what llama.cpp already runs that model with. Rebuilding
       them from transformers' tokenizer would not give the original: transformers' GGUF
       reader drops SmolLM's digit-splitting pre-tokenizer, for one.
    2. A byte-level BPE tokenizer (tokenizer.json) whose pre-tokenizer llama.cpp implements
       under a name lorakit recognises from tokenizer.json itself (GPT-2's, SmolLM's, Llama
       3's, Qwen2's; ``PRE_TOKENIZERS``): written with gguf-py as convert_hf_to_gguf.py's
       ``_set_vocab_gpt2`` writes one (tokens and token types from the tokenizer; merges,
       special token ids, add_bos/add_eos and the chat template from gguf-py's
       ``SpecialVocab``). The converter names the pre-tokenizer by hashing the tokenizer's
       output against a table of released models instead, so it stops on a tokenizer it has
       not seen (any retrained or converted one); the pre-tokenizer's own definition does not.
    3. llama.cpp's converter itself, ``convert_hf_to_gguf.py --vocab-only``, when the
       environment variable ``LLAMA_CPP_SRC`` names a llama.cpp source tree: any tokenizer it
       knows (SentencePiece vocabularies: Llama 2, Mistral, Gemma), its keys copied.
    Otherwise one sentence says which to provide.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import LorakitError
from .files import file_errors
from .llamacpp import gguf_package

#: tokenizer.json pre-tokenizers -> llama.cpp's name for the same pre-tokenizer
#: (src/llama-vocab.cpp, whose comments quote these regexes "from tokenizer.json")
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    (("ByteLevel", True, False),): "gpt-2",
    (("Digits", True), ("ByteLevel", True, False)): "smollm",
    (("Split", LLAMA3_SPLIT, "Isolated", False), ("ByteLevel", False, False)): "llama-bpe",
    (("Split", QWEN2_SPLIT, "Isolated", False), ("ByteLevel", False, False)): "qwen2",
}


def _part(p: dict) -> tuple:
    kind = p.get("type")
    if kind == "ByteLevel":
        return (kind, bool(p.get("use_regex", True)), bool(p.get("add_prefix_space", False)))
    if kind == "Digits":
        return (kind, bool(p.get("individual_digits", False)))
    if kind == "Split":
        pattern = p.get("pattern") or {}
        return (kind, pattern.get("Regex"), p.get("behavior"), bool(p.get("invert", False)))
    return (kind,)


def pre_tokenizer(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, or None (another
    model type, byte fallback, or a pre-tokenizer not in ``PRE_TOKENIZERS``)."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        return None
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return PRE_TOKENIZERS.get(tuple(_part(p) for p in parts))


# ---- 1. a GGUF file of the base model ---------------------------------------------------


def field_value(field):
    """A ``GGUFReader`` field as a ``gguf.GGUFValue`` to write again (strings as bytes, so
    that any token, valid UTF-8 or not, is copied unchanged)."""
    gguf = gguf_package()
    kind = gguf.GGUFValueType
    main = field.types[0]
    if main == kind.ARRAY:
        sub = field.types[-1]
        if sub == kind.STRING:
            return gguf.GGUFValue([bytes(field.parts[i]) for i in field.data], main, sub)
        values = [x for i in field.data for x in field.parts[i].tolist()]
        return gguf.GGUFValue(values, main, sub)
    if main == kind.STRING:
        return gguf.GGUFValue(bytes(field.parts[-1]), main)
    return gguf.GGUFValue(field.parts[-1].tolist()[0], main)


def from_gguf(path: Path, n_vocab: int) -> dict:
    """The ``tokenizer.*`` keys of a GGUF file, which must hold ``n_vocab`` tokens."""
    gguf = gguf_package()
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise LorakitError(f"cannot read the GGUF file {path} ({e})") from None
    keys = {k: field_value(f) for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tokens = keys.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise LorakitError(f"{path} holds no tokenizer (tokenizer.ggml.tokens)")
    if len(tokens.value) != n_vocab:
        raise LorakitError(
            f"{path} holds a vocabulary of {len(tokens.value)} tokens but this model's "
            f"embedding has {n_vocab} rows: it is not this model's tokenizer"
        )
    return keys


# ---- 2. a byte-level BPE tokenizer, written with gguf-py ------------------------------------


def _looks_special(text: str) -> bool:
    """Added tokens that are control tokens though not flagged special (the converter's
    ``does_token_look_special``)."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def bpe_tokens(tok, n_vocab: int) -> tuple[list[str], list[int]]:
    """(tokens, ggml token types) of a byte-level BPE tokenizer, ``n_vocab`` of them (ids the
    tokenizer lacks are ``[PAD<id>]``), as the converter's ``get_vocab_base`` lists them."""
    kind = gguf_package().TokenType
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added, decoder = tok.get_added_vocab(), tok.added_tokens_decoder
    if reverse and max(reverse) >= n_vocab:
        raise LorakitError(
            f"the tokenizer has ids up to {max(reverse)} but the model's embedding has only "
            f"{n_vocab} rows"
        )
    tokens, types = [], []
    for i in range(n_vocab):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(kind.UNUSED)
        elif text in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                text = tok.decode(tok.encode(text, add_special_tokens=False))
            if decoder[i].special or _looks_special(text):
                types.append(kind.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(kind.USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(text)
            types.append(kind.NORMAL)
    return tokens, types


def _adds_bos(tok) -> bool:
    """Whether the tokenizer puts BOS before a text it encodes."""
    return tok.bos_token_id is not None and tok("x")["input_ids"][:1] == [tok.bos_token_id]


def from_bpe(folder: Path, tok, arch: str, n_vocab: int) -> dict | None:
    """The keys of a byte-level BPE tokenizer saved in ``folder`` (tokenizer.json,
    tokenizer_config.json, config.json), or None when its pre-tokenizer has no name here."""
    gguf = gguf_package()
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    pre = pre_tokenizer(json.loads(path.read_text(encoding="utf-8")))
    if pre is None:
        return None
    w = gguf.GGUFWriter(None, arch)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    tokens, types = bpe_tokens(tok, n_vocab)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    # llama.cpp's default for add_bos differs by pre-tokenizer: say what the tokenizer does
    special.add_special_token.setdefault("bos", _adds_bos(tok))
    special.add_to_gguf(w, quiet=True)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    if arch == "llama" and isinstance(config.get("add_prefix_space"), bool):
        w.add_add_space_prefix(config["add_prefix_space"])  # LlamaModel.set_vocab
    return {k: v for k, v in w.kv_data[0].items() if k.startswith("tokenizer.")}


# ---- 3. llama.cpp's converter ---------------------------------------------------------------


def llama_cpp_source() -> Path | None:
    """The llama.cpp source tree ``LLAMA_CPP_SRC`` names, if it holds convert_hf_to_gguf.py."""
    src = os.environ.get("LLAMA_CPP_SRC")
    if src and (Path(src) / "convert_hf_to_gguf.py").is_file():
        return Path(src)
    return None


def from_converter(folder: Path, src: Path, n_vocab: int) -> dict:
    """The keys llama.cpp's ``convert_hf_to_gguf.py --vocab-only`` writes for ``folder``."""
    out = folder / "vocab.gguf"
    env = {**os.environ, "PYTHONPATH": f"{src / 'gguf-py'}{os.pathsep}{src}"}
    done = subprocess.run(
        [sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--vocab-only"]
        + ["--outfile", str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not out.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise LorakitError(
            f"llama.cpp's convert_hf_to_gguf.py ({src}) could not write this tokenizer: {last}"
        )
    return from_gguf(out, n_vocab)


# ---- the source in use ---------------------------------------------------------------------


def tokenizer_keys(
    tok, config, arch: str, n_vocab: int, gguf_source: Path | None, base_folder: Path | None
) -> tuple[dict, str]:
    """(the ``tokenizer.*`` keys for a model file, where they came from): a GGUF file of the
    base when there is one (``gguf_source``), else the tokenizer written by lorakit (byte-level
    BPE with a known pre-tokenizer), else llama.cpp's converter (``LLAMA_CPP_SRC``).
    ``base_folder``: the base model's own folder, whose tokenizer.model the converter reads."""
    if gguf_source is not None:
        return from_gguf(gguf_source, n_vocab), f"the GGUF file {gguf_source}"
    with tempfile.TemporaryDirectory(prefix="lorakit-vocab-") as d:
        folder = Path(d)
        with file_errors("write", folder, fix="free space in the temporary folder (TMPDIR)"):
            tok.save_pretrained(folder)
            config.save_pretrained(folder)
        keys = from_bpe(folder, tok, arch, n_vocab)
        if keys is not None:
            return keys, "the tokenizer (byte-level BPE, written by lorakit with gguf-py)"
        src = llama_cpp_source()
        if src is not None:
            spm = base_folder / "tokenizer.model" if base_folder else None
            if spm is not None and spm.is_file():
                shutil.copy(spm, folder / "tokenizer.model")
            return from_converter(folder, src, n_vocab), f"llama.cpp's converter ({src})"
    raise LorakitError(
        "lorakit writes byte-level BPE tokenizers with the pre-tokenizers of GPT-2, SmolLM, "
        "Llama 3 and Qwen2, not this one; give a GGUF file of the base model with "
        "--vocab-from, or set LLAMA_CPP_SRC to a llama.cpp source tree so that its "
        "convert_hf_to_gguf.py writes the vocabulary"
    )
