"""``lorakit export --to gguf-model``: the merged model as one GGUF file, read back.

Default run (no llama.cpp needed): every method's file read back with the ``gguf`` package's
reader equals its merged model tensor for tensor (in llama.cpp's layout, undone here);
transformers' own GGUF reader gives the merged model's logits; each outtype rounds as its
type; the tokenizer sources, the Ollama Modelfile, atomic writing and a full disk.
Slow, with llama.cpp (llama-cpp-python, built from source) and its source tree
(``LLAMA_CPP_SRC``): llama.cpp's logits per architecture and file type, the same file as
llama.cpp's own ``convert_hf_to_gguf.py`` writes, greedy answers of trained runs of the
embedded model, and the memory peak."""

from __future__ import annotations

import copy
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.gguf_vocab import PRE_TOKENIZERS, from_gguf, pre_tokenizer
from lorakit.modelfile import derive, go_template
from lorakit.models import embedded_gguf_file, embedded_source
from lorakit.peft_format import merge_into_base, open_adapter
from lorakit.training.formats import render
from tests.conftest import load_llama_cpp, tiny_run_args, train_steps

REPO = Path(__file__).resolve().parents[2]
PROMPT = "<|im_start|>user\nWhat is 12 plus 30? Answer briefly.<|im_end|>\n<|im_start|>assistant\n"

# ---- tiny models of each architecture, with the embedded model's real tokenizer -----------


def _arch_config(arch: str, tok):
    common = {
        "vocab_size": len(tok),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    # llama.cpp scales attention by 1/sqrt(head_dim)
    gemma = {"head_dim": 16, "query_pre_attn_scalar": 16}
    return {
        "llama": lambda: transformers.LlamaConfig(**common, tie_word_embeddings=True),
        # Llama 3.1's RoPE: frequencies divided by rope_freqs (theta 500000 makes them differ)
        "llama3": lambda: transformers.LlamaConfig(
            **common,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        "mistral": lambda: transformers.MistralConfig(
            **common, tie_word_embeddings=False, sliding_window=None
        ),
        "qwen2": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=False),
        # head_dim 32 is not hidden/heads: the file must say so (attention.key_length)
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True),
        "gemma": lambda: transformers.GemmaConfig(**common, head_dim=16),
        "gemma2": lambda: transformers.Gemma2Config(**common, **gemma),
        "gemma3": lambda: transformers.Gemma3TextConfig(**common, **gemma),
    }[arch]()


ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]


def _model_dirs(tmp_path_factory, tok, tag: str):
    """arch -> a saved tiny random model of that architecture with tokenizer ``tok``."""
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            d = tmp_path_factory.mktemp(f"{tag}-{arch}")
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(_arch_config(arch, tok)).save_pretrained(d)
            tok.save_pretrained(d)
            made[arch] = d
        return made[arch]

    return get


#: a byte-level BPE tokenizer of 320 tokens (GPT-2's pre-tokenizer, ChatML's special tokens
#: and chat template): what a real one is to the file, at a fraction of the cost to write,
#: read and compare 49152 tokens (the default run's tests use it)
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _small_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(
        [PROMPT, "Once upon a time, in a small village, 12 + 30 = 42."] * 8, trainer
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, _smollm2_once):
    """arch -> a tiny model with the embedded model's real tokenizer (llama.cpp's tests)."""
    return _model_dirs(tmp_path_factory, _smollm2_once[1], "tiny")


@pytest.fixture(scope="module")
def small_dirs(tmp_path_factory):
    """arch -> a tiny model with the small BPE tokenizer (the default run's tests)."""
    return _model_dirs(tmp_path_factory, _small_tokenizer(), "small")


def _adapter(base: Path, out: Path, method: str = "lora", **opts) -> Path:
    model, tok = lk.load_model(str(base))
    lk.apply(model, method=method, r=4, alpha=8, **opts)
    train_steps(model, steps=2)
    lk.save_adapter(model, out, base_model_name_or_path=str(base))
    if method == "full":
        tok.save_pretrained(out)  # a whole model folder carries its tokenizer, as a run's does
    return out


def _merged(adapter: Path):
    """The model the export merges: lorakit's own merge of the folder (test_merge_export.py
    checks it against the unmerged adapter)."""
    model, tok = open_adapter(adapter, None, "fp32")
    if getattr(model, "lorakit_state", None) is not None:
        merge_into_base(model)
    return model.eval(), tok


def _export(adapter: Path, out: Path, *extra: str) -> None:
    assert main(["export", str(adapter), "--to", "gguf-model", "--out", str(out), *extra]) == 0


# ---- the file read back -----------------------------------------------------------------


def _unpermute(x: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's interleaved RoPE rows back to HF's rotate-half order."""
    return (
        x.reshape(heads, x.shape[0] // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
    )


def _file_tensors(path: Path) -> dict[str, tuple[np.ndarray, object]]:
    """name -> (values as float32 in torch's dimension order, ggml type)."""
    out = {}
    for t in _reader(path).tensors:
        shape = [int(n) for n in reversed(t.shape)]
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        out[t.name] = (np.asarray(values, dtype=np.float32), t.tensor_type)
    return out


_READERS: dict[tuple[str, int], gguf.GGUFReader] = {}


def _reader(path: Path) -> gguf.GGUFReader:
    """One reader per file written (reading 49152 tokens' keys takes a while)."""
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _READERS:
        _READERS.clear()
        _READERS[key] = gguf.GGUFReader(str(path))
    return _READERS[key]


def _field(path: Path, key: str):
    f = _reader(path).fields.get(key)
    return None if f is None else f.contents()


def _expected(model) -> dict[str, np.ndarray]:
    """The merged model's tensors under llama.cpp's names (gguf-py's name map), each stored
    once (a tied output layer is the embedding)."""
    cfg = model.config
    arch = {"mistral": "llama", "gemma3_text": "gemma3"}.get(cfg.model_type, cfg.model_type)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen or (arch in ("gemma", "gemma2") and name == "lm_head.weight"):
            continue
        seen.add(t.data_ptr())
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = t.detach().numpy()
    return out


def _as_hf(name: str, x: np.ndarray, config) -> np.ndarray:
    """A file tensor back in transformers' layout: q/k rows unpermuted (Llama, Mistral), the
    Gemma norm offset taken off."""
    if config.model_type in ("llama", "mistral"):
        if name.endswith("attn_q.weight"):
            return _unpermute(x, config.num_attention_heads)
        if name.endswith("attn_k.weight"):
            return _unpermute(x, config.num_key_value_heads)
    if config.model_type.startswith("gemma") and name.endswith("norm.weight"):
        return x - 1.0
    return x


# every method: (method, apply options)
METHODS = {
    "lora": ("lora", {}),
    "qlora": ("qlora", {}),
    "lora+": ("lora+", {}),
    "lora-fa": ("lora-fa", {}),
    "lora-drop": ("lora-drop", {}),
    "adalora": ("adalora", {"adalora": {"init_r": 6, "target_r": 4}}),
    "dora": ("dora", {}),
    "longlora": ("longlora", {"context_length": 1024}),
    "full": ("full", {}),
}


@pytest.mark.parametrize("case", list(METHODS))
def test_file_holds_the_merged_model(case, small_dirs, tmp_path):
    """Every tensor of the f32 file equals the merged model's, exactly, and nothing else is
    in it; for LongLoRA the trained embedding and norms and the RoPE interpolation too."""
    method, opts = METHODS[case]
    ad = _adapter(small_dirs("llama"), tmp_path / "ad", method, **opts)
    out = tmp_path / "m.gguf"
    _export(ad, out, "--outtype", "f32")
    model, _ = _merged(ad)
    want, got = _expected(model), _file_tensors(out)
    assert set(got) == set(want)
    for name, (x, qtype) in got.items():
        assert qtype == gguf.GGMLQuantizationType.F32, name
        assert np.array_equal(_as_hf(name, x, model.config), want[name]), name
    assert _field(out, "general.architecture") == "llama"
    assert _field(out, "general.type") == "model"
    assert _field(out, "llama.block_count") == model.config.num_hidden_layers
    if case == "longlora":
        assert _field(out, "llama.rope.scaling.type") == "linear"
        assert _field(out, "llama.rope.scaling.factor") == pytest.approx(1024 / 512)
        base, _ = lk.load_model(str(small_dirs("llama")))
        emb = base.get_input_embeddings().weight.detach().numpy()
        assert not np.array_equal(got["token_embd.weight"][0], emb)  # trained whole


def test_outtypes_round_as_their_type(small_dirs, tmp_path):
    """f16 and bf16 weights are the merged weights rounded once to that type; q8_0, q5_1,
    q5_0, q4_1 and q4_0 are gguf-py's quantization of them (the slow test below finds it
    bit for bit llama.cpp's), q8_0 within about half a step of each block; norms stay f32,
    as the converter keeps them."""
    ad = _adapter(small_dirs("llama"), tmp_path / "ad")
    model, _ = _merged(ad)
    want = _expected(model)
    floats = {"f16": torch.float16, "bf16": torch.bfloat16}
    for outtype in ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"):
        out = tmp_path / f"m-{outtype}.gguf"
        _export(ad, out, "--outtype", outtype)
        for name, (x, qtype) in _file_tensors(out).items():
            ref = torch.from_numpy(want[name])
            hf = torch.from_numpy(_as_hf(name, x, model.config).copy())
            if x.ndim == 1:
                assert qtype == gguf.GGMLQuantizationType.F32 and torch.equal(hf, ref), name
                continue
            assert qtype.name.lower() == outtype, name
            if outtype in floats:
                assert torch.equal(hf, ref.to(floats[outtype]).float()), name
                continue
            # the file's blocks hold the merged weights in llama.cpp's layout: quantize that
            layout = torch.from_numpy(x)  # as stored, compared with the stored layout
            stored = _as_file(name, ref.numpy(), model.config)
            once = gguf.quants.dequantize(gguf.quants.quantize(stored, qtype), qtype)
            assert np.array_equal(layout.numpy(), once), name
            if outtype == "q8_0":  # 32 int8 values times an f16 scale of about max|x|/127
                step = ref.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
                assert ((hf - ref).reshape(-1, 32).abs() <= 0.57 * step + 1e-9).all(), name
        ftype = gguf.LlamaFileType[f"MOSTLY_{outtype.upper()}"]
        assert _field(out, "general.file_type") == int(ftype)


def _as_file(name: str, x: np.ndarray, config) -> np.ndarray:
    """A transformers tensor in the file's layout (the inverse of ``_as_hf``)."""
    if config.model_type in ("llama", "mistral") and name.endswith(
        ("attn_q.weight", "attn_k.weight")
    ):
        heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
        return (
            x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:])
            .swapaxes(1, 2)
            .reshape(x.shape)
        )
    return x


def test_k_quants_without_llama_cpp_are_one_sentence(small_dirs, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else real(n, *a)
    )
    ad = _adapter(small_dirs("llama"), tmp_path / "ad")
    with pytest.raises(LorakitError, match="--outtype q4_k_m is written by llama.cpp's own"):
        lk.export_gguf_model(ad, tmp_path / "m.gguf", "q4_k_m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_transformers_reads_the_merged_model_back(arch, small_dirs, tmp_path):
    """transformers' own GGUF reader (an implementation independent of lorakit's writer, which
    undoes llama.cpp's q/k permutation itself) gives the merged model's logits."""
    ad = _adapter(small_dirs(arch), tmp_path / "ad")
    _export(ad, tmp_path / "m.gguf", "--outtype", "f32")
    model, tok = _merged(ad)
    ids = torch.tensor([tok(PROMPT, add_special_tokens=False)["input_ids"]])
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, back.eval()(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_keys(arch, small_dirs, tmp_path):
    """The model keys llama.cpp reads for each architecture, from the config."""
    ad = _adapter(small_dirs(arch), tmp_path / "ad")
    out = tmp_path / "m.gguf"
    _export(ad, out, "--outtype", "f32")
    cfg, _ = _merged(ad)
    cfg = cfg.config
    name = _field(out, "general.architecture")
    assert name == {"mistral": "llama", "llama3": "llama"}.get(arch, arch)
    assert _field(out, f"{name}.embedding_length") == cfg.hidden_size
    assert _field(out, f"{name}.attention.head_count_kv") == cfg.num_key_value_heads
    if arch == "qwen3":
        assert _field(out, "qwen3.attention.key_length") == 32
    if arch == "gemma2":
        assert _field(out, "gemma2.attn_logit_softcapping") == cfg.attn_logit_softcapping
    if arch in ("llama", "llama3", "mistral"):
        assert _field(out, "llama.rope.dimension_count") == 16
    freqs = _file_tensors(out).get("rope_freqs.weight")
    if arch == "llama3":  # 1 for short wavelengths, 8 for long ones, smooth in between
        assert freqs is not None and freqs[0][0] == 1 and freqs[0][-1] == 8
        assert ((freqs[0] > 1) & (freqs[0] < 8)).any()
    else:
        assert freqs is None
    tokens = _field(out, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size


def test_unsupported_architecture_is_refused_before_anything(tmp_path, _smollm2_once):
    _, tok = _smollm2_once
    d = tmp_path / "gpt2"
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    with pytest.raises(LorakitError, match="lorakit writes GGUF model files for gemma, "):
        lk.export_gguf_model(d, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_a_gemma_llama_cpp_would_scale_otherwise_is_refused(tmp_path):
    """llama.cpp scales Gemma 2/3 attention by 1/sqrt(head_dim) (27B: hidden/heads), the
    model by query_pre_attn_scalar: a model where they differ is refused, not mis-served."""
    from lorakit.gguf_model import architecture

    cfg = _arch_config("gemma2", _small_tokenizer())
    assert architecture(cfg).name == "gemma2"
    cfg.query_pre_attn_scalar = 256
    with pytest.raises(LorakitError, match=r"scales this gemma2 model's attention by 1/sqrt\(16\)"):
        architecture(cfg)


# ---- the tokenizer ------------------------------------------------------------------------


def _bytelevel(regex: str | None = None, digits: bool = False) -> dict:
    parts = []
    if regex:
        parts.append({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"})
    if digits:
        parts.append({"type": "Digits", "individual_digits": True})
    parts.append({"type": "ByteLevel", "add_prefix_space": False, "use_regex": regex is None})
    pre = parts[0] if len(parts) == 1 else {"type": "Sequence", "pretokenizers": parts}
    return {"model": {"type": "BPE"}, "pre_tokenizer": pre}


def test_pre_tokenizers_named_from_their_definition():
    from lorakit.gguf_vocab import LLAMA3_SPLIT, QWEN2_SPLIT

    assert pre_tokenizer(_bytelevel()) == "gpt-2"
    assert pre_tokenizer(_bytelevel(digits=True)) == "smollm"
    assert pre_tokenizer(_bytelevel(LLAMA3_SPLIT)) == "llama-bpe"
    assert pre_tokenizer(_bytelevel(QWEN2_SPLIT)) == "qwen2"
    assert pre_tokenizer(_bytelevel(QWEN2_SPLIT.replace(r"\p{N}|", r"\p{N}{1,2}|"))) is None
    spm = {"model": {"type": "BPE", "byte_fallback": True}, "pre_tokenizer": None}
    assert pre_tokenizer(spm) is None
    assert set(PRE_TOKENIZERS.values()) == {"gpt-2", "smollm", "llama-bpe", "qwen2"}


def test_a_gguf_files_tokenizer_is_copied_unchanged(tmp_path):
    """Every ``tokenizer.*`` key of a GGUF file, of every value type, copied byte for byte
    (strings as bytes, invalid UTF-8 too); the token count must be the model's."""
    src = tmp_path / "base.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([b"<s>", b"\xc4\xa0the", b"\xff\xfe", "é"])  # one not UTF-8
    w.add_token_types([3, 1, 6, 1])
    w.add_token_merges(["\u0120 t", "h e"])
    w.add_bos_token_id(0)
    w.add_add_bos_token(False)
    w.add_float32("tokenizer.ggml.some_float", 0.5)
    w.add_chat_template("{{ messages }}")
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    keys = from_gguf(src, 4)
    assert "llama.block_count" not in keys and len(keys) == 9
    out = tmp_path / "copy.gguf"
    w = gguf.GGUFWriter(str(out), "llama")
    for key, v in keys.items():
        w.add_key_value(key, v.value, v.type, v.sub_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    a, b = gguf.GGUFReader(str(src)).fields, gguf.GGUFReader(str(out)).fields
    for key in keys:
        assert a[key].types == b[key].types, key
        assert [bytes(p) for p in a[key].parts[1:]] == [bytes(p) for p in b[key].parts[1:]], key
    with pytest.raises(LorakitError, match="holds a vocabulary of 4 tokens but this model's"):
        from_gguf(src, 96)


@pytest.mark.slow
def test_embedded_model_keeps_its_own_gguf_tokenizer(_smollm2_once):
    """The embedded model's tokenizer keys are its GGUF file's (SmolLM's pre-tokenizer, 48900
    merges, special ids, chat template), whatever folder names the model."""
    model, _ = _smollm2_once
    src = embedded_gguf_file("smollm2-135m")
    assert embedded_source("smollm2-135m") == src
    assert embedded_source(model.name_or_path) == src
    assert embedded_source("/some/other/model") is None
    keys = from_gguf(src, 49152)
    assert keys["tokenizer.ggml.pre"].value == b"smollm"
    assert len(keys["tokenizer.ggml.tokens"].value) == 49152
    assert len(keys["tokenizer.ggml.merges"].value) == 48900
    assert (
        keys["tokenizer.ggml.bos_token_id"].value,
        keys["tokenizer.ggml.eos_token_id"].value,
    ) == (1, 2)
    assert keys["tokenizer.ggml.add_bos_token"].value is False
    assert keys["tokenizer.chat_template"].value.startswith(b"{% for message in messages %}")


def test_a_tokenizer_lorakit_cannot_write_is_one_sentence(small_dirs, tmp_path, monkeypatch):
    """A pre-tokenizer lorakit does not name, without a llama.cpp tree: one sentence naming
    the two ways that work; nothing written. --vocab-from a GGUF file of the same
    vocabulary (here a file of the same base) then works."""
    monkeypatch.delenv("LLAMA_CPP_SRC", raising=False)
    _export(_adapter(small_dirs("llama"), tmp_path / "plain"), tmp_path / "base.gguf")
    base = _whitespace_tokenizer_copy(small_dirs("llama"), tmp_path / "base")
    ad = _adapter(base, tmp_path / "ad")
    with pytest.raises(LorakitError, match="give a GGUF file of the base model with --vocab-from"):
        lk.export_gguf_model(ad, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    r = lk.export_gguf_model(ad, tmp_path / "m.gguf", vocab_from=tmp_path / "base.gguf")
    assert r.tokenizer == f"the GGUF file {tmp_path / 'base.gguf'}"
    assert _field(tmp_path / "m.gguf", "tokenizer.ggml.tokens") == _field(
        tmp_path / "base.gguf", "tokenizer.ggml.tokens"
    )


def _whitespace_tokenizer_copy(src: Path, dst: Path) -> Path:
    """A copy of a model folder whose tokenizer pre-tokenizes on whitespace (a pre-tokenizer
    llama.cpp has no name for)."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    tj = json.loads((dst / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "WhitespaceSplit"}
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    return dst


# ---- Ollama -------------------------------------------------------------------------------


def test_modelfile_beside_the_file(small_dirs, tmp_path):
    """The Modelfile: FROM the file beside it, a TEMPLATE printing the chat template's pieces,
    the end-of-turn stop token, greedy decoding (the model's generation config does not
    sample)."""
    ad = _adapter(small_dirs("llama"), tmp_path / "ad")
    out = tmp_path / "served" / "model.gguf"
    _export(ad, out, "--ollama")
    text = (out.parent / "Modelfile").read_text()
    lines = text.splitlines()
    assert "FROM ./model.gguf" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert "PARAMETER temperature 0" in lines and "PARAMETER repeat_penalty 1" in lines
    user = (
        '{{- else if eq .Role "user" }}{{ "<|im_start|>user\\n" }}{{ .Content }}'
        '{{ "<|im_end|>\\n" }}{{ if $last }}{{ "<|im_start|>assistant\\n" }}{{ end }}'
    )
    assert user in lines
    assert 'TEMPLATE """{{- range $i, $_ := .Messages }}' in text  # no default system turn
    assert text.count('"""') == 2


def test_template_pieces_of_the_embedded_chat_template(_smollm2_once):
    """The embedded model's chat template in pieces: its default system turn, each role's
    text around its content; put together they reproduce the template on conversations
    beyond the ones the pieces were checked on."""
    _, tok = _smollm2_once
    pieces = derive(lambda m, g: render(tok, m, add_generation_prompt=g))
    assert pieces.default_system == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
        "Hugging Face<|im_end|>\n"
    )
    assert (pieces.user_pre, pieces.user_post) == ("<|im_start|>user\n", "<|im_end|>\n")
    assert pieces.gen == pieces.assistant_pre == "<|im_start|>assistant\n"
    template = go_template(pieces)
    assert '(ne (index .Messages 0).Role "system") }}{{ "<|im_start|>system\\nYou are' in template
    conversations = [
        [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"}]
        + [{"role": "user", "content": " d "}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"}],
    ]
    for msgs in conversations:
        assert pieces.render(msgs, True) == render(tok, msgs, add_generation_prompt=True)


def test_modelfile_without_a_chat_template_uses_lorakits_role_lines():
    class Plain:
        chat_template = None

    pieces = derive(lambda m, g: render(Plain(), m, add_generation_prompt=g))
    assert (pieces.user_pre, pieces.user_post, pieces.gen) == ("user: ", "\n", "assistant: ")
    assert (pieces.system_pre, pieces.default_system, pieces.start) == ("system: ", "", "")


def test_templates_without_a_system_turn_of_their_own():
    """A template that folds the system text into the first user turn (Gemma 3's) is not
    text around each message: no TEMPLATE, Ollama picks its own. One that refuses a system
    turn (Gemma 1/2's) gets a TEMPLATE without it; a BOS the runtime adds is left out."""

    def folding(messages, gen):
        sys_text = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
        out = ""
        for i, m in enumerate(x for x in messages if x["role"] != "system"):
            role = "model" if m["role"] == "assistant" else "user"
            prefix = sys_text if i == 0 else ""
            out += f"<start_of_turn>{role}\n{prefix}{m['content']}<end_of_turn>\n"
        return out + ("<start_of_turn>model\n" if gen else "")

    assert derive(folding) is None

    def no_system(messages, gen):  # Gemma 1/2: a system turn raises; BOS written by the template
        if messages[0]["role"] == "system":
            raise ValueError("System role not supported")
        return "<bos>" + folding(messages, gen)

    pieces = derive(no_system, bos="<bos>")  # llama.cpp adds the BOS: not in the template
    assert pieces.system_pre is None and pieces.start == ""
    assert pieces.user_pre == "<start_of_turn>user\n" and pieces.gen == "<start_of_turn>model\n"
    template = go_template(pieces)
    assert '{{- if eq .Role "user" }}' in template and '"system"' not in template
    assert "<bos>" not in template
    with_bos = derive(no_system)  # a runtime that adds no BOS: the template writes it
    assert with_bos.start == "<bos>" and go_template(with_bos).startswith('{{ "<bos>" }}')


# ---- writing: atomic, a full disk ---------------------------------------------------------


def test_full_disk_is_one_sentence_and_leaves_nothing(small_dirs, tmp_path, capsys, monkeypatch):
    ad = _adapter(small_dirs("llama"), tmp_path / "ad")
    out = tmp_path / "served" / "m.gguf"
    written = []
    real = gguf.GGUFWriter.write_tensor_data

    def fill_up(self, tensor, *a, **k):  # the fourth tensor finds the disk full
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(1)
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fill_up)
    code = main(["export", str(ad), "--to", "gguf-model", "--out", str(out), "--ollama"])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("lorakit: error:")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert f"cannot write {out}: no space left on the disk; free some disk space" in lines[0]
    assert list(out.parent.iterdir()) == []  # no file, no temporary file, no Modelfile


@pytest.mark.parametrize("where", [pytest.param("tokenizer", marks=pytest.mark.slow), "model"])
def test_file_size_limit_is_one_sentence(where, tiny_model_dir, small_dirs, tmp_path):
    """Real failing writes: the process may not write files over a limit (RLIMIT_FSIZE): 1 MB
    stops the embedded tokenizer's temporary files (2 MB), 64 KB the small model's file in
    the middle of its tensor data. Each is one sentence, exit code 2, nothing left."""
    base = tiny_model_dir if where == "tokenizer" else small_dirs("llama")
    ad = _adapter(base, tmp_path / "ad")
    out = tmp_path / "m.gguf"
    limit = 1 << 20 if where == "tokenizer" else 64 << 10
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from lorakit.cli import main\n"
        f"sys.exit(main(['export', {str(ad)!r}, '--to', 'gguf-model', '--out', {str(out)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    lines = [x for x in done.stderr.splitlines() if x.startswith("lorakit: error:")]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert "the file is larger than the disk or the process's file-size limit allows" in lines[0]
    path = "lorakit-vocab-" if where == "tokenizer" else f"cannot write {out}: "
    assert path in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


def test_cli_export_of_a_run_folder(small_dirs, tmp_path, capsys):
    run = tmp_path / "run"
    args = tiny_run_args(small_dirs("llama"), run, "eval.compare_base=false", "eval.metric=null")
    assert main(["train", *args]) == 0
    out = tmp_path / "served" / "tuned.gguf"
    capsys.readouterr()
    assert main(["export", str(run), "--to", "gguf-model", "--out", str(out), "--ollama"]) == 0
    printed = capsys.readouterr().out
    assert f"gguf-model export (lora adapter merged): {out}" in printed
    assert f"serve: ollama create NAME -f {out.parent / 'Modelfile'}" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "tuned.gguf"]
    assert (
        main(
            ["export", str(run), "--to", "gguf-model", "--out", str(tmp_path / "j.gguf"), "--json"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["outtype"] == "f16" and report["architecture"] == "llama"
    assert (
        report["types"] == {"f16": 15, "f32": 5}
        and report["bytes"] == (tmp_path / "j.gguf").stat().st_size
    )


# ---- llama.cpp itself (slow) --------------------------------------------------------------


def _llama_cpp():
    return pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python is not installed (it builds llama.cpp from source; "
        "`make test-all` installs it)",
    )


def _llama_cpp_logits(llama_cpp, path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position, with an f32 KV cache (its default f16 cache
    rounds keys and values, which is llama.cpp's arithmetic, not the file)."""
    llm = load_llama_cpp(
        llama_cpp, path, n_ctx=256, n_threads=1, logits_all=True, type_k=0, type_v=0
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def _rounded(model, path: Path):
    """A copy of ``model`` holding the weights as the file holds them (read back,
    dequantized): the file type's own rounding, computed by transformers."""
    back = {
        name: torch.from_numpy(_as_hf(name, x, model.config).copy())
        for name, (x, _) in _file_tensors(path).items()
    }
    arch = {"mistral": "llama", "gemma3_text": "gemma3"}.get(model.config.model_type)
    arch_id = next(
        k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == (arch or model.config.model_type)
    )
    names = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for hf_name, p in rounded.state_dict(keep_vars=True).items():
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name in back:  # a tied output layer is the embedding
                p.copy_(back[name])
    return rounded


#: llama.cpp vs lorakit, largest |Δlogit| allowed per file type: f32 is the merged model
#: exactly, llama.cpp's own f32 arithmetic (and its tabulated GELU, Gemma) aside; a 16-bit
#: file differs by its rounding, which llama.cpp's 16-bit activations about double
F32_TOL = 1e-3
ROUNDING_FACTOR = 3.0


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "f16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_gives_lorakits_logits(arch, outtype, arch_dirs, tmp_path):
    llama_cpp = _llama_cpp()
    ad = _adapter(arch_dirs(arch), tmp_path / "ad")
    out = tmp_path / "m.gguf"
    _export(ad, out, "--outtype", outtype)
    model, tok = _merged(ad)
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = _llama_cpp_logits(llama_cpp, out, ids)
    diff = float(np.abs(got - want).max())
    if outtype == "f32":
        print(f"{arch} {outtype}: max|dlogit| {diff:.2e}")
        assert diff <= F32_TOL, diff
    else:
        with torch.no_grad():
            rounded = _rounded(model, out)(input_ids=torch.tensor([ids])).logits[0].numpy()
        rounding = float(np.abs(rounded - want).max())
        print(f"{arch} {outtype}: max|dlogit| {diff:.2e}, the file's rounding alone {rounding:.2e}")
        assert rounding > 0 and diff <= ROUNDING_FACTOR * rounding + F32_TOL, (diff, rounding)
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.slow
def test_llama_cpp_applies_longloras_rope_interpolation(arch_dirs, tmp_path):
    """LongLoRA's RoPE interpolation (context 512 -> 1024: linear factor 2) and its
    embeddings and norms trained whole, in llama.cpp: the f32 file's logits are lorakit's."""
    llama_cpp = _llama_cpp()
    ad = _adapter(arch_dirs("llama"), tmp_path / "ad", "longlora", context_length=1024)
    out = tmp_path / "m.gguf"
    _export(ad, out, "--outtype", "f32")
    model, tok = _merged(ad)
    ids = tok(PROMPT * 4, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = _llama_cpp_logits(llama_cpp, out, ids)
    assert float(np.abs(got - want).max()) <= F32_TOL


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["q5_1", "q5_0", "q4_1", "q4_0"])
def test_gguf_py_quantization_is_llama_cpps(outtype, tiny_model_dir, tmp_path):
    """lorakit's q5_1, q5_0, q4_1 and q4_0 files (gguf-py's quantizers) and llama.cpp's own
    quantizer run on lorakit's f32 file with ``pure`` (every weight in that type, as
    ``llama-quantize --pure``): the same tensors, bit for bit."""
    _llama_cpp()
    from lorakit.gguf_export import QUANTIZE

    ad = _adapter(tiny_model_dir, tmp_path / "ad")
    _export(ad, tmp_path / "f32.gguf", "--outtype", "f32")
    _export(ad, tmp_path / "ours.gguf", "--outtype", outtype)
    pure = QUANTIZE.replace("p.nthread", "p.pure = True\np.nthread")
    args = [str(tmp_path / "f32.gguf"), str(tmp_path / "theirs.gguf"), outtype.upper()]
    done = subprocess.run([sys.executable, "-c", pure, *args], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "ours.gguf")).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "theirs.gguf")).tensors}
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type, name
        assert np.array_equal(ours[name].data.view(np.uint8), t.data.view(np.uint8)), name


@pytest.mark.slow
def test_k_quants_by_llama_cpps_quantizer(arch_dirs, tmp_path, _smollm2_once):
    """--outtype q4_k_m: llama.cpp's own quantizer on lorakit's f32 file, with its choice of
    type per tensor (rows of 256, here 256 wide); llama.cpp serves it, its next-token choices
    mostly lorakit's (4-bit weights), and no temporary file is left."""
    llama_cpp = _llama_cpp()
    _, tok = _smollm2_once
    d = tmp_path / "wide"
    cfg = _arch_config("llama", tok)
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 256, 512, 64
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    ad = _adapter(d, tmp_path / "ad")
    out = tmp_path / "served" / "m.gguf"
    _export(ad, out, "--outtype", "q4_k_m")
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]
    assert _field(out, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert {"Q4_K", "Q6_K"} <= types, types
    model, _ = _merged(ad)
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = _llama_cpp_logits(llama_cpp, out, ids)
    same = float((got.argmax(-1) == want.argmax(-1)).mean())
    print(f"q4_k_m: max|dlogit| {np.abs(got - want).max():.2e}, same next token {same:.2f}")
    assert same >= 0.8


# ---- the same file as llama.cpp's converter (slow, needs its source tree) -------------------

#: runs llama.cpp's convert_hf_to_gguf.py on a merged folder. The test models carry
#: SmolLM2's byte-level BPE tokenizer, which the converter can only name by the hash of a
#: released tokenizer: it is told the name lorakit's file gives, and Gemma 1/2 (whose
#: converter reads a SentencePiece tokenizer.model) write it as the BPE vocabulary it is.
CONVERTER = """
import runpy, sys
src, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [src + "/gguf-py", src]
from conversion.base import TextModel
from conversion.gemma import GemmaModel, Gemma2Model
TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
GemmaModel.set_vocab = Gemma2Model.set_vocab = TextModel._set_vocab_gpt2
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[3:]]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""

#: keys that may differ: the model's name and size label, which the converter takes from
#: the folder and counts itself
METADATA = ("general.name", "general.size_label")


def _llama_cpp_src() -> Path:
    src = Path(os.environ.get("LLAMA_CPP_SRC", "/nonexistent"))
    if not (src / "convert_hf_to_gguf.py").is_file():
        pytest.skip(
            "no llama.cpp source tree: set LLAMA_CPP_SRC (make test-all unpacks the one "
            "inside the llama-cpp-python source package)"
        )
    pytest.importorskip("sentencepiece", reason="llama.cpp's converter imports sentencepiece")
    return src


def _keys(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_same_file_as_llama_cpps_converter(arch, outtype, arch_dirs, tmp_path):
    """lorakit's file and convert_hf_to_gguf.py's file of the ``lorakit merge`` folder: the
    same keys and values (the name aside), the same tensors, bit for bit."""
    src = _llama_cpp_src()
    ad = _adapter(arch_dirs(arch), tmp_path / "ad")
    ours = tmp_path / "ours.gguf"
    _export(ad, ours, "--outtype", outtype)
    assert main(["merge", str(ad), "--out", str(tmp_path / "merged")]) == 0
    pre = _field(ours, "tokenizer.ggml.pre")
    done = subprocess.run(
        [sys.executable, "-c", CONVERTER, str(src), pre, str(tmp_path / "merged")]
        + ["--outfile", str(tmp_path / "theirs.gguf"), "--outtype", outtype],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _keys(ours), _keys(tmp_path / "theirs.gguf")
    if "tokenizer.ggml.add_bos_token" not in b:  # llama.cpp's default for these: false
        assert a.pop("tokenizer.ggml.add_bos_token") is False
    for key in METADATA:
        a.pop(key, None)
        b.pop(key, None)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key
    ta = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "theirs.gguf")).tensors}
    assert ta.keys() == tb.keys()
    for name, t in tb.items():
        assert ta[name].tensor_type == t.tensor_type, name
        assert list(ta[name].shape) == list(t.shape), name
        assert np.array_equal(ta[name].data.view(np.uint8), t.data.view(np.uint8)), name


@pytest.mark.slow
def test_a_sentencepiece_tokenizer_through_llama_cpps_converter(tmp_path, monkeypatch):
    """A tokenizer lorakit does not write itself (SentencePiece, as Llama 2's, Mistral's and
    Gemma's): with LLAMA_CPP_SRC, convert_hf_to_gguf.py --vocab-only writes it from the base
    folder's tokenizer.model, and llama.cpp tokenizes text as transformers does."""
    src = _llama_cpp_src()
    llama_cpp = _llama_cpp()
    import sentencepiece
    from transformers import AutoTokenizer

    monkeypatch.setenv("LLAMA_CPP_SRC", str(src))
    texts = [PROMPT, "Once upon a time, in a small village, a fox lived.", "The capital is Paris."]
    (tmp_path / "corpus.txt").write_text("\n".join(texts * 20))
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    (base / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"})
    )
    tok = AutoTokenizer.from_pretrained(base)
    cfg = _arch_config("llama", tok)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    tok.save_pretrained(base)  # tokenizer.json beside tokenizer.model, as on the Hub
    ad = _adapter(base, tmp_path / "ad")
    out = tmp_path / "m.gguf"
    report = lk.export_gguf_model(ad, out, "f32")
    assert report.tokenizer == f"llama.cpp's converter ({src})"
    assert _field(out, "tokenizer.ggml.model") == "llama"
    llm = load_llama_cpp(llama_cpp, out, n_ctx=256, n_threads=1, vocab_only=True)
    try:
        for text in [*texts, "fox 1234 Paris?"]:
            want = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
    finally:
        llm.close()


# ---- trained runs of the embedded model, served by llama.cpp (slow) ---------------------------

#: run overrides per method: a short training that moves the answers off the base model's
AGREEMENT_RUNS = {
    "lora": ["adapter.method=lora", "adapter.r=8", "adapter.alpha=16", "train.lr=1e-3"],
    "dora": ["adapter.method=dora", "adapter.r=8", "adapter.alpha=16", "train.lr=1e-3"],
    "adalora": ["adapter.method=adalora", "adapter.alpha=16", "train.lr=1e-3"],
    "full": ["adapter.method=full", "train.lr=2e-5"],
}
AGREEMENT = 0.95


def _answers(
    llama_cpp, path: Path, prompts: list[str], tok, stops: set[int], cap: int, own_tokens: bool
):
    """llama.cpp's greedy answers: from the prompt tokens lorakit used, or (``own_tokens``)
    from llama.cpp's own tokenization of the prompt text, as a server receives it."""
    llm = load_llama_cpp(llama_cpp, path, n_ctx=1024, n_threads=1, seed=0)
    out = []
    try:
        for prompt in prompts:
            if own_tokens:
                ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            else:
                ids = tok(prompt, add_special_tokens=False)["input_ids"]
            body: list[int] = []
            for t in llm.generate(
                ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True
            ):
                if t in stops or len(body) >= cap:
                    break
                body.append(t)
            out.append(tok.decode(body, skip_special_tokens=True).strip())
    finally:
        llm.close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", list(AGREEMENT_RUNS))
def test_llama_cpp_answers_like_lorakit(method, tmp_path, capsys):
    """A short run of the embedded model (40 held-out answers, greedy, lorakit's own
    predictions.jsonl), exported as f32 and f16 model files: llama.cpp's greedy answers
    from the same prompt tokens agree with lorakit's on at least 95%; also measured with
    llama.cpp tokenizing the prompt text itself (the file's own tokenizer)."""
    from lorakit.training.evaluation import stop_token_ids

    llama_cpp = _llama_cpp()
    run = tmp_path / "run"
    args = ["train", "model=smollm2-135m", f"output_dir={run}", "train.precision=fp32"]
    args += ["train.max_steps=30", "train.batch_size=4", "eval.limit=40", "eval.compare_base=false"]
    assert main(args + AGREEMENT_RUNS[method]) == 0
    model, tok = lk.load_model("smollm2-135m")
    stops = set(stop_token_ids(model, tok))
    del model
    cap = json.loads((run / "summary.json").read_text())["tuned"]["generation"]["max_new_tokens"]
    preds = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    prompts, theirs = [p["prompt"] for p in preds], [p["prediction"].strip() for p in preds]
    figures = {}
    for outtype in ("f32", "f16"):
        out = tmp_path / f"{method}-{outtype}.gguf"
        _export(run, out, "--outtype", outtype)
        for own in (False, True):
            got = _answers(llama_cpp, out, prompts, tok, stops, cap, own)
            figures[(outtype, own)] = sum(a == b for a, b in zip(got, theirs))
        out.unlink()
    with capsys.disabled():
        print(
            f"\n{method}: {len(preds)} answers; agree (lorakit's prompt tokens / llama.cpp's "
            f"tokenization): f32 {figures[('f32', False)]}/{figures[('f32', True)]}, "
            f"f16 {figures[('f16', False)]}/{figures[('f16', True)]}"
        )
    assert len(preds) >= 40
    for outtype in ("f32", "f16"):
        assert figures[(outtype, False)] >= AGREEMENT * len(preds), figures


# ---- memory (slow) ------------------------------------------------------------------------

MEMORY_PROBE = """
import json, sys
import lorakit.gguf_export as ge
import lorakit.gguf_model as gm

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

seen = {}
write = gm.write_model_gguf

def measured(model, *a, **k):
    tensors = gm.stored_once(model)
    seen["model_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
    seen["largest_tensor_bytes"] = max(t.numel() * t.element_size() for t in tensors.values())
    seen["peak_before_writing"] = status("VmHWM")
    seen["rss_before_writing"] = status("VmRSS")
    reset_peak()
    plan = write(model, *a, **k)
    seen["peak_while_writing"] = status("VmHWM")
    return plan

ge.write_model_gguf = measured
seen["rss_after_imports"] = status("VmRSS")
ge.export_gguf_model(sys.argv[1], sys.argv[2], sys.argv[3])
print(json.dumps(seen))
"""


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_memory_is_the_merged_model_plus_one_tensor(outtype, smollm2, tmp_path, capsys):
    """Peak RSS while the file is written (the embedded model, a LoRA adapter, in a fresh
    process): the merged model already in memory plus at most a few copies of its largest
    tensor (the token embedding), whatever the file's size."""
    model, _ = smollm2
    lk.apply(model, method="lora", r=8, alpha=16)
    train_steps(model, steps=1)
    lk.save_adapter(model, tmp_path / "ad")
    del model
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            MEMORY_PROBE,
            str(tmp_path / "ad"),
            str(tmp_path / "m.gguf"),
            outtype,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    file_bytes = (tmp_path / "m.gguf").stat().st_size
    extra = m["peak_while_writing"] - m["rss_before_writing"]
    with capsys.disabled():
        mb = {k: round(v / 2**20) for k, v in m.items()}
        print(f"\n{outtype}: {mb} MiB; file {file_bytes >> 20} MiB; writing adds {extra >> 20} MiB")
    largest = m["largest_tensor_bytes"]
    assert extra <= 4 * largest + (64 << 20), m
    ceiling = m["rss_after_imports"] + m["model_bytes"] + 4 * largest + (256 << 20)
    assert m["peak_while_writing"] <= ceiling, m
