"""``lorakit export ADAPTER --to gguf-model``: the adapter merged into its base exactly (each
method's own merge in fp32, as ``lorakit merge``: a QLoRA adapter onto the 16-bit base, the
embeddings and norms LongLoRA trains whole, a full fine-tuning run's whole model) and written
as one GGUF model file for llama.cpp and Ollama (gguf_model.py), its tokenizer from the most
faithful source at hand (gguf_vocab.py), and with ``ollama=True`` an Ollama Modelfile beside
it (modelfile.py). See docs/export.md.

This module sits above ``training`` (docs/ARCHITECTURE.md): the Modelfile's template and stop
tokens are the chat rendering and stop tokens training and evaluation use."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from . import models
from .errors import LorakitError
from .export import MODEL_TARGET
from .files import check_output, file_errors, read_json, write_text
from .gguf_model import OUTTYPES, architecture, write_model_gguf
from .gguf_vocab import tokenizer_keys
from .llamacpp import gguf_package
from .modelfile import derive, modelfile, sampling_defaults
from .peft_format import (
    EXTRAS_NAME,
    adapter_folder,
    is_whole_model,
    merge_into_base,
    open_adapter,
    recorded_base,
)
from .registry import all_methods

MODELFILE = "Modelfile"

#: --outtype -> llama.cpp file type written by llama.cpp's own quantizer (llama-cpp-python's
#: ``llama_model_quantize``, what ``llama-quantize`` runs) from an f32 file, with llama.cpp's
#: choice of type per tensor (Q4_K_M keeps the output layer in Q6_K, ...)
LLAMA_QUANTIZE = {
    "q6_k": "Q6_K",
    "q5_k_m": "Q5_K_M",
    "q5_k_s": "Q5_K_S",
    "q4_k_m": "Q4_K_M",
    "q4_k_s": "Q4_K_S",
    "q3_k_l": "Q3_K_L",
    "q3_k_m": "Q3_K_M",
    "q3_k_s": "Q3_K_S",
    "q2_k": "Q2_K",
}


@dataclass
class ModelExport:
    """What ``lorakit export --to gguf-model`` wrote."""

    target: str
    out: str
    method: str
    merged: bool  # an adapter merged into its base (False: a whole fine-tuned model)
    architecture: str
    outtype: str
    tensors: int
    types: dict[str, int]  # ggml tensor type -> how many tensors
    bytes: int
    tokenizer: str  # where the tokenizer keys came from
    modelfile: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _base_folder(name: str | None) -> Path | None:
    """The base model's own folder (a local one, or a Hub id's snapshot in the local cache),
    where llama.cpp's converter finds a SentencePiece tokenizer.model."""
    if not name:
        return None
    if Path(name).is_dir():
        return Path(name)
    cached = try_to_load_from_cache(name, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def _check_architecture(path: Path, base: str | None, trust_remote_code: bool) -> None:
    """Refuse an architecture llama.cpp's file cannot hold before any weight is read."""
    from transformers import AutoConfig

    folder = str(path) if is_whole_model(path) else base
    if folder is None:
        return  # open_adapter says what is missing
    source = models.resolve_model_path(folder)
    with models.loader_errors(folder):
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    architecture(config)


def export_gguf_model(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    outtype: str = "f16",
    model: str | None = None,
    ollama: bool = False,
    vocab_from: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    log: Callable[[str], None] | None = None,
) -> ModelExport:
    """Merge the adapter (or run) folder ``adapter`` into its base (``model``, default the one
    it records; a whole fine-tuned model folder as it is) and write one GGUF model file
    ``out`` in ``outtype`` (``OUTTYPES``: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0,
    written by lorakit; ``LLAMA_QUANTIZE``: K-quants, by llama.cpp's own quantizer from an f32
    file); ``ollama``: also ``Modelfile`` beside it; ``vocab_from``: a GGUF file of the base
    whose tokenizer to copy. Nothing is written unless the whole export succeeds."""
    if outtype not in OUTTYPES and outtype not in LLAMA_QUANTIZE:
        names = ", ".join([*OUTTYPES, *LLAMA_QUANTIZE])
        raise LorakitError(f"--outtype must be one of {names}, not {outtype!r}")
    if outtype in LLAMA_QUANTIZE:
        check_llama_quantize(outtype)
    out = Path(out)
    if out.is_file():
        raise LorakitError(f"{out} exists; choose another --out")
    check_output(out, "--out", folder=False)
    card = out.parent / MODELFILE if ollama else None
    if card is not None and card.exists():
        raise LorakitError(f"{card} exists; choose another --out folder for the Modelfile")
    if vocab_from is not None and not Path(vocab_from).is_file():
        raise LorakitError(f"--vocab-from {vocab_from} is not a GGUF file")
    path = Path(adapter_folder(adapter))
    base = model or recorded_base(path)
    _check_architecture(path, base, trust_remote_code)

    merged, tok = open_adapter(path, model, "fp32", trust_remote_code)
    state = getattr(merged, "lorakit_state", None)
    method = state.config.method if state is not None else _whole_model_method(path)
    if state is not None:
        merge_into_base(merged)
    arch = architecture(merged.config)
    n_vocab = merged.get_input_embeddings().weight.shape[0]
    source = Path(vocab_from) if vocab_from else models.embedded_source(base or str(path))
    vocab, where = tokenizer_keys(
        tok, merged.config, arch.name, n_vocab, source, _base_folder(base)
    )
    text = _modelfile_text(merged, tok, vocab, out.name) if card is not None else None

    name = f"{Path(str(base or path)).name} {method}"
    if outtype in LLAMA_QUANTIZE:
        _write_quantized(merged, out, outtype, vocab, name, log)
        types = _tensor_types(out)
    else:
        types = [t.qtype for t in write_model_gguf(merged, out, outtype, vocab, name, log)]
    report = ModelExport(
        MODEL_TARGET,
        str(out),
        method,
        state is not None,
        arch.name,
        outtype,
        len(types),
        dict(Counter(t.name.lower() for t in types)),
        out.stat().st_size,
        where,
    )
    if card is not None:
        try:
            write_text(card, text[0])
        except BaseException:
            out.unlink(missing_ok=True)  # both files or neither
            raise
        report.modelfile = str(card)
        report.notes += text[1]
    return report


def _write_quantized(merged, out: Path, outtype: str, vocab: dict, name: str, log) -> None:
    """A K-quant file: the f32 file beside ``out`` under a temporary name, then llama.cpp's
    quantizer to another, renamed into place; neither temporary file is left."""
    f32 = out.with_name(f".{out.name}.f32-{os.getpid()}")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        write_model_gguf(merged, f32, "f32", vocab, name=name, log=log)
        if log is not None:
            log(f"quantizing to {outtype} with llama.cpp's quantizer")
        llama_quantize(f32, tmp, outtype)
        with file_errors("write", out):
            os.replace(tmp, out)
    finally:
        f32.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def _tensor_types(out: Path) -> list:
    """The ggml type of each tensor of a GGUF file llama.cpp's quantizer wrote."""
    return [t.tensor_type for t in gguf_package().GGUFReader(str(out)).tensors]


# ---- llama.cpp's own quantizer --------------------------------------------------------------

QUANTIZE = """
import ctypes, os, sys
import llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
p.nthread = os.cpu_count() or 1
src, dst = sys.argv[1].encode(), sys.argv[2].encode()
sys.exit(llama_cpp.llama_model_quantize(src, dst, ctypes.byref(p)))
"""


def check_llama_quantize(outtype: str) -> None:
    """Refuse, before any work, a K-quant outtype without llama.cpp's quantizer at hand."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise LorakitError(
            f"--outtype {outtype} is written by llama.cpp's own quantizer, which needs "
            "llama-cpp-python (pip install llama-cpp-python; it builds llama.cpp); or export "
            "f16 and quantize with llama-quantize or `ollama create --quantize`"
        )


def llama_quantize(src: Path, dst: Path, outtype: str) -> None:
    """Quantize the GGUF file ``src`` to ``dst`` with llama.cpp's ``llama_model_quantize`` (in
    a child process: llama.cpp logs to stderr, and a crash there must not end lorakit)."""
    done = subprocess.run(
        [sys.executable, "-c", QUANTIZE, str(src), str(dst), LLAMA_QUANTIZE[outtype]],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not dst.is_file():
        lines = [x for x in done.stderr.splitlines() if x.strip()]
        last = lines[-1].strip() if lines else f"exit code {done.returncode}"
        raise LorakitError(f"llama.cpp's quantizer could not write {outtype} ({last})")


def _whole_model_method(path: Path) -> str:
    """The method that trained a whole model folder: the one its lorakit.json records, else
    the registry's method that saves whole models."""
    record = path / EXTRAS_NAME
    method = read_json(record).get("method") if record.is_file() else None
    return method or next(m.name for m in all_methods() if m.save_whole_model())


def _modelfile_text(model, tok, vocab: dict, gguf_name: str) -> tuple[str, list[str]]:
    """(the Modelfile, notes): the template derived from the chat format training renders,
    the evaluation's stop tokens, the model's sampling defaults."""
    from .training.evaluation import stop_token_ids
    from .training.formats import render

    adds_bos = vocab.get("tokenizer.ggml.add_bos_token")
    bos = tok.bos_token if adds_bos is not None and adds_bos.value else None
    pieces = derive(lambda msgs, gen: render(tok, msgs, add_generation_prompt=gen), bos)
    stops = [tok.decode([i], skip_special_tokens=False) for i in stop_token_ids(model, tok)]
    text = modelfile(
        gguf_name, pieces, stops, sampling_defaults(getattr(model, "generation_config", None))
    )
    notes = []
    if pieces is None:
        notes.append(
            "the chat template does not decompose into text around each message: the "
            "Modelfile has no TEMPLATE and Ollama picks one from the GGUF's chat template"
        )
    return text, notes


def describe(report: ModelExport) -> list[str]:
    """The lines ``lorakit export --to gguf-model`` prints."""
    types = ", ".join(f"{n} {k}" for k, n in sorted(report.types.items()))
    what = f"{report.method} adapter merged" if report.merged else f"{report.method}, whole model"
    lines = [
        f"gguf-model export ({what}): {report.out}",
        (
            f"llama.cpp architecture {report.architecture}, {report.outtype}: "
            f"{report.tensors} tensors ({types}), {report.bytes / 1e6:.1f} MB"
        ),
        f"tokenizer: {report.tokenizer}",
    ]
    if report.modelfile:
        lines.append(f"Modelfile: {report.modelfile}")
        lines.append(f"serve: ollama create NAME -f {report.modelfile}")
    lines.append(f"serve: llama-cli -m {report.out}")
    lines.extend(report.notes)
    return lines
