"""A table of bad inputs: each gives one sentence naming the problem, exit code 2, no
traceback, and nothing written or changed (issue: reliability and safety)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from tests.conftest import tiny_run_args

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tiny_model_dir):
    """A second tiny model with another width (48): adapters of the first do not fit it, and
    NF4 on CPU refuses its 48-wide inputs."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("other-model")
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.hidden_size, cfg.intermediate_size = 48, 96
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert (
        main(
            [
                "train",
                *tiny_run_args(
                    tiny_model_dir,
                    out,
                    "train.max_steps=1",
                    "eval.compare_base=false",
                    "eval.metric=null",
                ),
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("adapter") / "ad"
    model, _ = lk.load_model(str(tiny_model_dir))
    lk.save_adapter(lk.apply(model, r=4), d, base_model_name_or_path=str(tiny_model_dir))
    return d


def _no_weights(model_dir: Path, tmp: Path) -> Path:
    """A model folder with config.json and tokenizer files but no weights."""
    d = tmp.parent / f"{tmp.name}-noweights"
    if not d.exists():
        d.mkdir()
        for f in model_dir.iterdir():
            if not f.name.endswith(".safetensors"):
                (d / f.name).write_bytes(f.read_bytes())
    return d


def _copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _model_gguf(*extra, adapter=None, prepare=None):
    """``lorakit export ADAPTER --to gguf-model --out <tmp>/m.gguf`` with ``extra`` (each a
    string or ``f(ctx) -> str``); ``adapter(ctx)`` makes the folder to export (default: the
    table's adapter); ``prepare(ctx)`` makes what is in the way."""

    def build(ctx):
        ad = adapter(ctx) if adapter else ctx["adapter"]
        if prepare:
            prepare(ctx)
        more = [x(ctx) if callable(x) else x for x in extra]
        return ["export", str(ad), "--to", "gguf-model", "--out", str(ctx["tmp"] / "m.gguf"), *more]

    return build


def _gpt2_model(ctx) -> Path:
    """A tiny GPT-2 folder (an architecture llama.cpp's model files hold, but lorakit does not
    write) with the table's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    tok = AutoTokenizer.from_pretrained(ctx["model"])
    d = ctx["tmp"] / "gpt2"
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _small_vocab_gguf(ctx) -> Path:
    """A GGUF file whose vocabulary has 3 tokens (another model's)."""
    import gguf

    p = ctx["tmp"] / "other.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


def _whitespace_tokenizer(ctx) -> Path:
    """An adapter on a copy of the table's model whose tokenizer pre-tokenizes on
    whitespace (no pre-tokenizer llama.cpp names), with no llama.cpp tree to convert it."""
    ctx["setenv"]("LLAMA_CPP_SRC", "")
    base = ctx["tmp"] / "ws-model"
    base.mkdir()
    for f in Path(ctx["model"]).iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    tj = json.loads((base / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "WhitespaceSplit"}
    (base / "tokenizer.json").write_text(json.dumps(tj))
    ad = _copy_adapter(ctx["adapter"], ctx["tmp"] / "ws-adapter")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    return ad


def _existing(name: str):
    def make(ctx) -> Path:
        p = ctx["tmp"] / name
        p.write_text("already here\n")
        return p

    return make


# (id, args builder, expected text in the one-line error)
def _train(*extra):
    return lambda ctx: ["train", *tiny_run_args(ctx["model"], ctx["out"], *extra)]


def _data(content: bytes, name="d.jsonl", *extra):
    def build(ctx):
        p = ctx["tmp"] / name
        p.write_bytes(content)
        return ["train", *tiny_run_args(ctx["model"], ctx["out"], f"data.train={p}", *extra)]

    return build


def _yaml_file(content: str):
    def build(ctx):
        p = ctx["tmp"] / "c.yaml"
        p.write_text(content)
        return ["train", str(p), f"output_dir={ctx['out']}"]

    return build


def _adapter(mutate, cmd="eval"):
    def build(ctx):
        d = _copy_adapter(ctx["adapter"], ctx["tmp"] / "bad-adapter")
        mutate(d)
        if cmd == "merge":
            return ["merge", str(d), "--out", str(ctx["out"])]
        return ["eval", str(d), "--data", "task:arithmetic", "--limit", "2"]

    return build


def _rm(name):
    return lambda d: (d / name).unlink()


def _write(name, data: bytes):
    return lambda d: (d / name).write_bytes(data)


def _peft_type(d):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["peft_type"] = "PREFIX_TUNING"
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _config_field(**fields):
    def mutate(d):
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(fields)
        (d / "adapter_config.json").write_text(json.dumps(cfg))

    return mutate


def _no_lorakit_json_and_r(r):
    def mutate(d):
        (d / "lorakit.json").unlink()
        _config_field(r=r)(d)

    return mutate


def _pickle_only(d):
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")


def _a_file(ctx) -> Path:
    """An ordinary file where a folder is expected."""
    f = ctx["tmp"] / "a-file"
    f.write_text("not a folder\n")
    return f


def _read_only_dir(ctx) -> Path:
    d = ctx["tmp"] / "read-only"
    d.mkdir()
    d.chmod(0o555)
    return d


def _model_folder(ctx, keep=("config.json",), config=None, files=None) -> Path:
    """A copy of the tiny model folder with only the files ``keep`` names, its config.json
    updated with ``config``, plus ``files`` ({name: text})."""
    d = ctx["tmp"] / "model-copy"
    d.mkdir()
    for f in ctx["model"].iterdir():
        if f.name in keep or keep == "all":
            (d / f.name).write_bytes(f.read_bytes())
    if config is not None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(config)
        (d / "config.json").write_text(json.dumps(cfg))
    for name, text in (files or {}).items():
        (d / name).write_text(text)
    return d


def _train_model(**kw):
    return lambda ctx: ["train", *tiny_run_args(_model_folder(ctx, **kw), ctx["out"])]


def _train_out(make_out, *extra):
    """train with output_dir=make_out(ctx)."""
    return lambda ctx: ["train", *tiny_run_args(ctx["model"], make_out(ctx), *extra)]


def _run_folder_with(files: dict, *extra):
    """train into a folder that holds ``files`` ({relative name: bytes}) already."""

    def make(ctx):
        d = ctx["tmp"] / "old-run"
        for name, data in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(data)
        return d

    return _train_out(make, *extra)


def _copied_run(mutate):
    """eval of a copy of the finished run folder, changed by ``mutate(folder)``."""

    def build(ctx):
        import shutil

        d = ctx["tmp"] / "run-copy"
        shutil.copytree(ctx["finished"], d)
        mutate(d)
        return ["eval", str(d), "--limit", "2"]

    return build


def _held_lock(ctx):
    """A folder whose .lock another run holds (an flock on another open file)."""
    import fcntl

    d = ctx["tmp"] / "busy"
    d.mkdir()
    fh = open(d / ".lock", "w")
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    ctx["keep"] = fh  # held until the test ends
    return d


AS_ROOT = pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into a read-only folder"
)

CASES = [
    # configs
    ("unknown key", _train("adapter.bogus=1"), "adapter.bogus: unknown key"),
    ("unknown section", _train("trian.lr=1"), "trian: unknown key"),
    ("wrong type", _train("train.lr=fast"), "train.lr"),
    ("r = 0", _train("adapter.r=0"), "adapter.r"),
    ("negative alpha", _train("adapter.alpha=-1"), "adapter.alpha"),
    ("dropout >= 1", _train("adapter.dropout=1.5"), "adapter.dropout"),
    ("unknown method", _train("adapter.method=lorax"), "method must be one of"),
    (
        "adalora target_r > init_r",
        _train("adapter.method=adalora", "adapter.adalora.init_r=4", "adapter.adalora.target_r=8"),
        "target_r must not exceed",
    ),
    (
        "old flat AdaLoRA option",
        _train("adapter.method=adalora", "adapter.target_r=4"),
        "adapter.target_r is now adapter.adalora.target_r",
    ),
    (
        "old flat LoRA-drop option",
        _train("adapter.threshold=0.5"),
        "adapter.threshold is now adapter.lora_drop.threshold",
    ),
    (
        "renamed AdaLoRA option",
        _train("adapter.method=adalora", "adapter.adalora.beta1=0.9"),
        "adapter.adalora.beta1 is now adapter.adalora.sensitivity_beta",
    ),
    (
        "another method's options",
        _train("adapter.method=lora", "adapter.adalora.target_r=4"),
        "holds options of method 'adalora', but adapter.method is 'lora'",
    ),
    (
        "a method's option out of range",
        _train("adapter.method=lora-drop", "adapter.lora_drop.threshold=2"),
        "adapter.lora_drop.threshold",
    ),
    ("target matches nothing", _train("adapter.target_modules=[qkv]"), "matches no module"),
    (
        "S2 ratio that does not fit",
        _train("adapter.s2_attn=true", "adapter.s2_group_ratio=0.3"),
        "s2_group_ratio",
    ),
    ("fp16 on CPU", _train("train.precision=fp16"), "needs a GPU"),
    ("override without =", lambda ctx: ["train", "configs/lora.yaml", "oops"], "not a key=value"),
    (
        "missing config file",
        lambda ctx: ["train", str(ctx["tmp"] / "none.yaml")],
        "cannot read config",
    ),
    ("malformed YAML", _yaml_file("model: [unclosed\n"), "not valid YAML"),
    ("YAML that is not a mapping", _yaml_file("- a\n- b\n"), "must hold a mapping"),
    (
        "model folder missing",
        lambda ctx: ["train", f"model={ctx['tmp'] / 'nomodel'}", f"output_dir={ctx['out']}"],
        "not a model folder",
    ),
    (
        "NF4 on an unsupported layer",
        lambda ctx: ["train", *tiny_run_args(ctx["other"], ctx["out"], "adapter.quantize=nf4")],
        "cannot be stored in NF4",
    ),
    # data
    ("empty data file", _data(b""), "no usable rows"),
    ("only a malformed line", _data(b"{not json\n"), "malformed JSON"),
    ("unknown row format", _data(b'{"foo": 1}\n'), "cannot tell the data format"),
    (
        "chat row without the answer",
        _data(b'{"messages": [{"role": "user", "content": "x"}]}\n'),
        "last message must be the assistant's",
    ),
    ("non-UTF-8 bytes", _data(b'\xff\xfe{"text": "a"}\n'), "not UTF-8"),
    ("unknown file type", _data(b"hello", "d.xml"), "unknown format"),
    ("data file missing", _train("data.train=/nonexistent/d.jsonl"), "does not exist"),
    ("too few examples for a step", _data(b'{"text": "a b c"}\n' * 3), "fewer than one"),
    # preference tuning (docs/preference.md)
    (
        "preference row without rejected",
        _data(b'{"prompt": "q", "chosen": "a"}\n', "d.jsonl", "train.objective=dpo"),
        "needs both chosen and rejected",
    ),
    (
        "chosen equal to rejected",
        _data(
            b'{"prompt": "q", "chosen": "a", "rejected": "a"}\n', "d.jsonl", "train.objective=dpo"
        ),
        "chosen and rejected are the same",
    ),
    (
        "empty completion",
        _data(
            b'{"prompt": "q", "chosen": " ", "rejected": "b"}\n', "d.jsonl", "train.objective=dpo"
        ),
        "completion is empty",
    ),
    (
        "mixed standard and conversational pairs",
        _data(
            b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
            * 2
            + b'{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", '
            b'"content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}\n' * 2,
            "d.jsonl",
            "train.objective=dpo",
        ),
        "use one format",
    ),
    ("dpo settings without the dpo objective", _train("dpo.beta=0.2"), "train.objective is sft"),
    ("negative beta", _train("train.objective=dpo", "dpo.beta=-1"), "dpo.beta"),
    (
        "dpo loss weights not one per loss",
        _train("train.objective=dpo", "dpo.loss=[sigmoid,sft]", "dpo.loss_weights=[1]"),
        "give one weight per loss",
    ),
    # packing (docs/packing.md)
    (
        "packing true with S2-Attn",
        _train("adapter.method=longlora", "data.packing=true"),
        "cannot keep packed rows apart",
    ),
    ("packing not a boolean", _train("data.packing=maybe"), "must be true, false, auto or concat"),
    (
        "max_seq_len within the chat template",
        _train("data.max_seq_len=8"),
        "chat template's own",
    ),
    # adapters
    (
        "adapter folder missing",
        lambda ctx: ["eval", str(ctx["tmp"] / "none"), "--data", "task:arithmetic"],
        "does not exist",
    ),
    (
        "adapter weights missing",
        _adapter(_rm("adapter_model.safetensors")),
        "has no adapter_model.safetensors",
    ),
    ("adapter config missing", _adapter(_rm("adapter_config.json")), "has no adapter_config"),
    ("pickle .bin offered", _adapter(_pickle_only), "pickle"),
    (
        "corrupted safetensors",
        _adapter(_write("adapter_model.safetensors", b"\x00garbage")),
        "not a valid safetensors file",
    ),
    ("adapter config not JSON", _adapter(_write("adapter_config.json", b"{oops")), "cannot read"),
    ("unknown peft_type", _adapter(_peft_type), "PREFIX_TUNING"),
    (
        "wrong base model",
        lambda ctx: [
            "eval",
            str(ctx["adapter"]),
            "--model",
            str(ctx["other"]),
            "--data",
            "task:arithmetic",
        ],
        "has shape",
    ),
    ("merge from a pickle adapter", _adapter(_pickle_only, cmd="merge"), "pickle"),
    (
        "adapter_config r disagrees with lorakit.json",
        _adapter(_config_field(r=8)),
        "says r=8 but lorakit.json records 4",
    ),
    (
        "adapter_config r disagrees with the tensors",
        _adapter(_no_lorakit_json_and_r(8)),
        "has rank 4 but the config gives",
    ),
    ("adapter_config alpha edited", _adapter(_config_field(lora_alpha=99)), "lora_alpha=99"),
    ("missing adapter folder", lambda ctx: ["eval", str(ctx["tmp"] / "nowhere")], "adapter folder"),
    # combinations that cannot work, and patterns that do not compile
    (
        "full fine-tuning over a 4-bit base",
        _train("adapter.method=full", "adapter.quantize=nf4"),
        "quantize: nf4 needs an adapter",
    ),
    (
        "trainable_modules with full fine-tuning",
        _train("adapter.method=full", "adapter.trainable_modules=[norms]"),
        "already trains every weight",
    ),
    (
        "target regex that does not compile",
        _train("adapter.target_modules=q_proj["),
        "not a valid regular expression",
    ),
    (
        "rank_pattern regex that does not compile",
        _train("adapter.rank_pattern={'(q': 2}"),
        "not a valid regular expression",
    ),
    (
        "model folder without weights",
        lambda ctx: ["train", *tiny_run_args(ctx["noweights"], ctx["out"])],
        "no file named model.safetensors",
    ),
    ("mistyped embedded model name", _train("model=smollm2-135"), "did you mean"),
    ("unknown built-in task", _train("data.train=task:nope"), "unknown task 'nope'"),
    ("validation file missing", _train("data.valid=/nonexistent/valid.jsonl"), "does not exist"),
    (
        "resume a finished run with other settings",
        lambda ctx: [
            "train",
            *tiny_run_args(
                ctx["model"],
                ctx["finished"],
                "train.max_steps=1",
                "eval.compare_base=false",
                "eval.metric=null",
                "adapter.r=8",
                "train.resume=true",
            ),
        ],
        "made with another adapter.r",
    ),
    (
        "a method without options given some",
        _train("adapter.method=dora", "adapter.dora.x=1"),
        "unknown key",
    ),
    # the file system: where lorakit writes
    ("output_dir is an existing file", _train_out(_a_file), "is an existing file, not a folder"),
    (
        "output_dir under a file",
        _train_out(lambda ctx: _a_file(ctx) / "run"),
        "cannot be created: ",
    ),
    pytest.param(
        "output_dir in a read-only folder",
        _train_out(lambda ctx: _read_only_dir(ctx) / "run"),
        "is not writable",
        marks=AS_ROOT,
        id="output_dir in a read-only folder",
    ),
    (
        "merge --out is an existing file",
        lambda ctx: ["merge", str(ctx["adapter"]), "--out", str(_a_file(ctx))],
        "is an existing file",
    ),
    (
        "export --out under a file",
        lambda ctx: [
            "export",
            str(ctx["adapter"]),
            "--to",
            "lora",
            "--out",
            str(_a_file(ctx) / "x"),
        ],
        "cannot be created",
    ),
    (
        "export --to gguf --out is a folder",
        lambda ctx: ["export", str(ctx["adapter"]), "--to", "gguf", "--out", str(ctx["tmp"])],
        "is a folder, not a file",
    ),
    (
        "eval --predictions under a file",
        lambda ctx: [
            "eval",
            str(ctx["adapter"]),
            "--data",
            "task:arithmetic",
            "--predictions",
            str(_a_file(ctx) / "p.jsonl"),
        ],
        "cannot be created",
    ),
    (
        "eval --predictions names a folder",
        lambda ctx: [
            "eval",
            str(ctx["adapter"]),
            "--data",
            "task:arithmetic",
            "--predictions",
            str(ctx["tmp"]),
        ],
        "is a folder, not a file",
    ),
    (
        "compare --out is an existing file",
        lambda ctx: [
            "compare",
            f"model={ctx['model']}",
            "--methods",
            "lora",
            "--out",
            str(_a_file(ctx)),
        ],
        "is an existing file",
    ),
    (
        "inspect --out under a file",
        lambda ctx: ["inspect", str(ctx["adapter"]), "--out", str(_a_file(ctx) / "plots")],
        "cannot be created",
    ),
    ("a folder another run is using", _train_out(_held_lock), "another lorakit run is using"),
    # model folders
    (
        "embedded model, its cache under a file",
        lambda ctx: (
            ctx["setenv"]("LORAKIT_CACHE", str(_a_file(ctx) / "cache")),
            ["train", "model=smollm2-135m", f"output_dir={ctx['out']}"],
        )[1],
        "set LORAKIT_CACHE",
    ),
    ("model folder with only config.json", _train_model(), "no tokenizer files"),
    (
        "model folder without a tokenizer",
        _train_model(keep=("config.json", "model.safetensors")),
        "no tokenizer files",
    ),
    (
        "model folder carrying its own code",
        _train_model(
            keep="all",
            config={
                "model_type": "x-custom",
                "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"},
            },
            files={"modeling_x.py": "raise SystemExit('never run')\n"},
        ),
        "set trust_remote_code=true",
    ),
    (
        "model path is a weights file",
        lambda ctx: ["train", *tiny_run_args(ctx["model"] / "model.safetensors", ctx["out"])],
        "is a file, not a model folder",
    ),
    (
        "model config.json not JSON",
        _train_model(keep="all", files={"config.json": "{oops"}),
        "cannot read",
    ),
    (
        "model config.json a JSON list",
        _train_model(keep="all", files={"config.json": "[1]"}),
        "does not hold a JSON object",
    ),
    (
        "unknown model_type",
        _train_model(keep="all", config={"model_type": "no-such-arch"}),
        "cannot load model",
    ),
    # data files other tools write
    (
        "data file is a folder",
        lambda ctx: ["train", *tiny_run_args(ctx["model"], ctx["out"], f"data.train={ctx['tmp']}")],
        "is a folder",
    ),
    (
        "CSV content in a .jsonl file",
        _data(b"instruction,output\nadd 1 and 2,3\n"),
        "comma-separated values",
    ),
    ("a file of blank lines", _data(b"\n\n  \n"), "no usable rows"),
    ("a JSON array in a .jsonl file", _data(b'[{"text": "a b c"}]\n'), "not a JSON object"),
    ("gzip-compressed JSONL", _data(b"\x1f\x8b\x08\x00", "d.jsonl.gz"), "unknown format"),
    (
        "data path through a file",
        lambda ctx: [
            "train",
            *tiny_run_args(ctx["model"], ctx["out"], f"data.train={_a_file(ctx) / 'd.jsonl'}"),
        ],
        "does not exist",
    ),
    (
        "config file is a folder",
        lambda ctx: ["train", str(ctx["tmp"]), f"output_dir={ctx['out']}"],
        "cannot read config",
    ),
    # adapters and run folders
    (
        "adapter path is a file",
        lambda ctx: [
            "eval",
            str(ctx["adapter"] / "adapter_config.json"),
            "--data",
            "task:arithmetic",
        ],
        "is a file, not a folder",
    ),
    ("lorakit.json damaged", _adapter(_write("lorakit.json", b"{half")), "cannot read"),
    (
        "adapter_config.json a JSON list",
        _adapter(_write("adapter_config.json", b"[]")),
        "does not hold a JSON object",
    ),
    (
        "adapter whose recorded base is gone",
        _adapter(_config_field(base_model_name_or_path="/nonexistent/base")),
        "not a model folder",
    ),
    (
        "merge a plain model folder",
        lambda ctx: ["merge", str(ctx["model"]), "--out", str(ctx["out"])],
        "already a full model",
    ),
    (
        "export a plain model folder",
        lambda ctx: ["export", str(ctx["model"]), "--to", "lora", "--out", str(ctx["out"])],
        "whole fine-tuned model",
    ),
    (
        "resume a Hugging Face Trainer's folder",
        _run_folder_with(
            {"checkpoint-500/trainer_state.json": b"{}", "checkpoint-500/optimizer.pt": b"\x80"},
            "train.resume=true",
        ),
        "checkpoints another tool wrote",
    ),
    (
        "run folder with a damaged config.yaml",
        _run_folder_with(
            {"config.yaml": b"model: [", "checkpoints/step-000002/state.json": b"{}"},
            "train.resume=true",
        ),
        "not the config lorakit records",
    ),
    (
        "run folder with a damaged summary.json",
        _run_folder_with({"summary.json": b"{cut"}),
        "cannot read",
    ),
    (
        "eval of a run whose heldout.json is damaged",
        _copied_run(lambda d: (d / "heldout.json").write_text("{cut")),
        "cannot read",
    ),
    # model files for llama.cpp and Ollama (export --to gguf-model)
    (
        "gguf-model of an architecture lorakit does not write",
        _model_gguf(adapter=_gpt2_model),
        "lorakit writes GGUF model files for gemma, gemma2",
    ),
    (
        "gguf-model --out is an existing file",
        _model_gguf(prepare=_existing("m.gguf")),
        "exists; choose another --out",
    ),
    (
        "gguf-model --ollama beside an existing Modelfile",
        _model_gguf("--ollama", prepare=_existing("Modelfile")),
        "Modelfile exists",
    ),
    (
        "gguf-model with --rank",
        _model_gguf("--rank", "4"),
        "--rank and --energy shape adapter exports",
    ),
    (
        "--ollama for an adapter target",
        lambda ctx: [
            "export",
            str(ctx["adapter"]),
            "--to",
            "gguf",
            "--out",
            str(ctx["tmp"] / "a.gguf"),
            "--ollama",
        ],
        "--ollama and --vocab-from apply to --to gguf-model",
    ),
    (
        "gguf-model --vocab-from a missing file",
        _model_gguf("--vocab-from", "/nonexistent/base.gguf"),
        "is not a GGUF file",
    ),
    (
        "gguf-model --vocab-from a file that is not GGUF",
        _model_gguf("--vocab-from", lambda ctx: str(_existing("base.gguf")(ctx))),
        "cannot read the GGUF file",
    ),
    (
        "gguf-model --vocab-from another model's GGUF",
        _model_gguf("--vocab-from", lambda ctx: str(_small_vocab_gguf(ctx))),
        "holds a vocabulary of 3 tokens but this model's embedding has",
    ),
    (
        "gguf-model of a tokenizer lorakit cannot write",
        _model_gguf(adapter=_whitespace_tokenizer),
        "give a GGUF file of the base model with --vocab-from",
    ),
]


def _case_id(case) -> str:
    return case.id if isinstance(case, type(pytest.param(0))) else case[0]


@pytest.mark.parametrize("name,build,needle", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input(
    name,
    build,
    needle,
    tmp_path,
    capsys,
    tiny_model_dir,
    other_model_dir,
    adapter_dir,
    finished_run,
    monkeypatch,
):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    ctx = {
        "model": tiny_model_dir,
        "other": other_model_dir,
        "adapter": adapter_dir,
        "tmp": tmp_path,
        "out": out,
        "noweights": _no_weights(tiny_model_dir, tmp_path),
        "finished": finished_run,
        "setenv": monkeypatch.setenv,
    }
    finished_before = {str(f): f.read_bytes() for f in finished_run.rglob("*") if f.is_file()}
    args = build(ctx)
    made = sorted(p.name for p in tmp_path.iterdir())
    adapter_before = {f.name: f.read_bytes() for f in adapter_dir.iterdir()}
    code = main(args)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("lorakit: error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and needle in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not out.exists(), "an output folder was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == made  # nothing else written
    assert {f.name: f.read_bytes() for f in adapter_dir.iterdir()} == adapter_before
    assert {
        str(f): f.read_bytes() for f in finished_run.rglob("*") if f.is_file()
    } == finished_before  # a finished run is never touched


def test_table_is_large_enough():
    assert len(CASES) >= 70


def test_reported_but_not_fatal(tmp_path, capsys, tiny_model_dir, monkeypatch):
    """A malformed line, a missing field or an overlong line among good rows is skipped and
    reported with its line number; the rest trains."""
    import lorakit.training.data as data

    monkeypatch.setattr(data, "MAX_LINE_BYTES", 200)
    good = b'{"text": "one two three four"}\n'
    p = tmp_path / "d.jsonl"
    p.write_bytes(
        good * 8 + b"{oops\n" + b'{"txt": "x"}\n' + b'{"text": "' + b"a" * 300 + b'"}\n' + good * 8
    )
    code = main(
        [
            "train",
            *tiny_run_args(
                tiny_model_dir,
                tmp_path / "o",
                f"data.train={p}",
                "train.max_steps=1",
                "train.batch_size=2",
                "eval.compare_base=false",
                "eval.metric=null",
            ),
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert "skipped 3 bad row(s)" in err
    assert "line 9: malformed JSON" in err and "line 10: missing field 'text'" in err
    assert "line 11: line longer than" in err


def test_files_other_tools_write_are_read(tmp_path, capsys, tiny_model_dir, adapter_dir):
    """What other tools write and lorakit reads as it is: a JSONL with a byte-order mark (a
    Windows editor) and a trailing blank line gives the rows of the plain file; a Hugging
    Face Trainer's checkpoint folder of a PEFT adapter evaluates, its pickle files
    (optimizer.pt, rng_state.pth) never opened."""
    from lorakit.training.data import read_rows

    rows = b'{"text": "one two"}\n{"text": "three"}\n'
    plain, bom = tmp_path / "plain.jsonl", tmp_path / "bom.jsonl"
    plain.write_bytes(rows)
    bom.write_bytes(b"\xef\xbb\xbf" + rows.replace(b"\n", b"\r\n") + b"\r\n")
    a, b = read_rows(str(plain)), read_rows(str(bom))
    assert a.rows == b.rows and not b.skipped and len(b.rows) == 2

    ckpt = _copy_adapter(adapter_dir, tmp_path / "checkpoint-500")
    (ckpt / "trainer_state.json").write_text('{"global_step": 500}')
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (ckpt / name).write_bytes(b"\x80\x04pickle that must never be loaded")
    data = tmp_path / "qa.jsonl"
    data.write_text(
        '{"instruction": "1+1", "output": "2"}\n{"instruction": "2+2", "output": "4"}\n'
    )
    code = main(["eval", str(ckpt), "--data", str(data), "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["examples"] > 0


def test_every_case_is_in_the_documented_table():
    """docs/bad-inputs.md lists every case of the table, in order, and no other."""
    doc = (REPO / "docs" / "bad-inputs.md").read_text()
    rows = [
        line.split(" | ")[1]
        for line in doc.splitlines()
        if line[:2] == "| " and line.split(" | ")[0][2:].isdigit()
    ]
    assert rows == [_case_id(c) for c in CASES]
