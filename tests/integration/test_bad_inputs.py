"""A table of bad inputs: each gives one sentence naming the problem, exit code 2, no
traceback, and nothing written or changed (issue: reliability and safety)."""

from __future__ import annotations

import json
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
    assert main(["train", *tiny_run_args(tiny_model_dir, out, "train.max_steps=1",
                                         "eval.compare_base=false", "eval.metric=null")]) == 0
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


CASES = [
    # configs
    ("unknown key", _train("adapter.bogus=1"), "adapter.bogus: unknown key"),
    ("unknown section", _train("trian.lr=1"), "trian: unknown key"),
    ("wrong type", _train("train.lr=fast"), "train.lr"),
    ("r = 0", _train("adapter.r=0"), "adapter.r"),
    ("negative alpha", _train("adapter.alpha=-1"), "adapter.alpha"),
    ("dropout >= 1", _train("adapter.dropout=1.5"), "adapter.dropout"),
    ("unknown method", _train("adapter.method=lorax"), "method must be one of"),
    ("adalora target_r > init_r", _train("adapter.method=adalora", "adapter.adalora.init_r=4",
                                         "adapter.adalora.target_r=8"), "target_r must not exceed"),
    ("old flat AdaLoRA option", _train("adapter.method=adalora", "adapter.target_r=4"),
     "adapter.target_r is now adapter.adalora.target_r"),
    ("old flat LoRA-drop option", _train("adapter.threshold=0.5"),
     "adapter.threshold is now adapter.lora_drop.threshold"),
    ("renamed AdaLoRA option", _train("adapter.method=adalora", "adapter.adalora.beta1=0.9"),
     "adapter.adalora.beta1 is now adapter.adalora.sensitivity_beta"),
    ("another method's options", _train("adapter.method=lora", "adapter.adalora.target_r=4"),
     "holds options of method 'adalora', but adapter.method is 'lora'"),
    ("a method's option out of range", _train("adapter.method=lora-drop",
                                              "adapter.lora_drop.threshold=2"),
     "adapter.lora_drop.threshold"),
    ("target matches nothing", _train("adapter.target_modules=[qkv]"), "matches no module"),
    ("S2 ratio that does not fit", _train("adapter.s2_attn=true", "adapter.s2_group_ratio=0.3"),
     "s2_group_ratio"),
    ("fp16 on CPU", _train("train.precision=fp16"), "needs a GPU"),
    ("override without =", lambda ctx: ["train", "configs/lora.yaml", "oops"],
     "not a key=value"),
    ("missing config file", lambda ctx: ["train", str(ctx["tmp"] / "none.yaml")],
     "cannot read config"),
    ("malformed YAML", _yaml_file("model: [unclosed\n"), "not valid YAML"),
    ("YAML that is not a mapping", _yaml_file("- a\n- b\n"), "must hold a mapping"),
    ("model folder missing", lambda ctx: ["train", f"model={ctx['tmp'] / 'nomodel'}",
                                          f"output_dir={ctx['out']}"], "not a model folder"),
    ("NF4 on an unsupported layer", lambda ctx: ["train", *tiny_run_args(
        ctx["other"], ctx["out"], "adapter.quantize=nf4")], "cannot be stored in NF4"),
    # data
    ("empty data file", _data(b""), "no usable rows"),
    ("only a malformed line", _data(b"{not json\n"), "malformed JSON"),
    ("unknown row format", _data(b'{"foo": 1}\n'), "cannot tell the data format"),
    ("chat row without the answer", _data(b'{"messages": [{"role": "user", "content": "x"}]}\n'),
     "last message must be the assistant's"),
    ("non-UTF-8 bytes", _data(b'\xff\xfe{"text": "a"}\n'), "not UTF-8"),
    ("unknown file type", _data(b"hello", "d.xml"), "unknown format"),
    ("data file missing", _train("data.train=/nonexistent/d.jsonl"), "does not exist"),
    ("too few examples for a step", _data(b'{"text": "a b c"}\n' * 3), "fewer than one"),
    # adapters
    ("adapter folder missing", lambda ctx: ["eval", str(ctx["tmp"] / "none"), "--data",
                                            "task:arithmetic"], "does not exist"),
    ("adapter weights missing", _adapter(_rm("adapter_model.safetensors")),
     "has no adapter_model.safetensors"),
    ("adapter config missing", _adapter(_rm("adapter_config.json")), "has no adapter_config"),
    ("pickle .bin offered", _adapter(_pickle_only), "pickle"),
    ("corrupted safetensors", _adapter(_write("adapter_model.safetensors", b"\x00garbage")),
     "not a valid safetensors file"),
    ("adapter config not JSON", _adapter(_write("adapter_config.json", b"{oops")),
     "cannot read"),
    ("unknown peft_type", _adapter(_peft_type), "PREFIX_TUNING"),
    ("wrong base model", lambda ctx: ["eval", str(ctx["adapter"]), "--model", str(ctx["other"]),
                                      "--data", "task:arithmetic"], "has shape"),
    ("merge from a pickle adapter", _adapter(_pickle_only, cmd="merge"), "pickle"),
    ("adapter_config r disagrees with lorakit.json", _adapter(_config_field(r=8)),
     "says r=8 but lorakit.json records 4"),
    ("adapter_config r disagrees with the tensors", _adapter(_no_lorakit_json_and_r(8)),
     "has rank 4 but the config gives"),
    ("adapter_config alpha edited", _adapter(_config_field(lora_alpha=99)), "lora_alpha=99"),
    ("missing adapter folder", lambda ctx: ["eval", str(ctx["tmp"] / "nowhere")],
     "adapter folder"),
    # combinations that cannot work, and patterns that do not compile
    ("full fine-tuning over a 4-bit base", _train("adapter.method=full",
                                                  "adapter.quantize=nf4"),
     "quantize: nf4 needs an adapter"),
    ("trainable_modules with full fine-tuning", _train("adapter.method=full",
                                                       "adapter.trainable_modules=[norms]"),
     "already trains every weight"),
    ("target regex that does not compile", _train("adapter.target_modules=q_proj["),
     "not a valid regular expression"),
    ("rank_pattern regex that does not compile", _train("adapter.rank_pattern={'(q': 2}"),
     "not a valid regular expression"),
    ("model folder without weights", lambda ctx: ["train", *tiny_run_args(
        ctx["noweights"], ctx["out"])], "no file named model.safetensors"),
    ("mistyped embedded model name", _train("model=smollm2-135"), "did you mean"),
    ("unknown built-in task", _train("data.train=task:nope"), "unknown task 'nope'"),
    ("validation file missing", _train("data.valid=/nonexistent/valid.jsonl"),
     "does not exist"),
    ("resume a finished run with other settings", lambda ctx: ["train", *tiny_run_args(
        ctx["model"], ctx["finished"], "train.max_steps=1", "eval.compare_base=false",
        "eval.metric=null", "adapter.r=8", "train.resume=true")], "made with another adapter.r"),
    ("a method without options given some", _train("adapter.method=dora",
                                                    "adapter.dora.x=1"),
     "unknown key"),
]


@pytest.mark.parametrize("name,build,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, build, needle, tmp_path, capsys, tiny_model_dir, other_model_dir,
                   adapter_dir, finished_run, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    ctx = {"model": tiny_model_dir, "other": other_model_dir, "adapter": adapter_dir,
           "tmp": tmp_path, "out": out, "noweights": _no_weights(tiny_model_dir, tmp_path),
           "finished": finished_run}
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
    assert {str(f): f.read_bytes() for f in finished_run.rglob("*")
            if f.is_file()} == finished_before  # a finished run is never touched



def test_table_is_large_enough():
    assert len(CASES) >= 50


def test_reported_but_not_fatal(tmp_path, capsys, tiny_model_dir, monkeypatch):
    """A malformed line, a missing field or an overlong line among good rows is skipped and
    reported with its line number; the rest trains."""
    import lorakit.training.data as data

    monkeypatch.setattr(data, "MAX_LINE_BYTES", 200)
    good = b'{"text": "one two three four"}\n'
    p = tmp_path / "d.jsonl"
    p.write_bytes(good * 8 + b"{oops\n" + b'{"txt": "x"}\n' + b'{"text": "' + b"a" * 300
                  + b'"}\n' + good * 8)
    code = main(["train", *tiny_run_args(tiny_model_dir, tmp_path / "o", f"data.train={p}",
                                         "train.max_steps=1", "train.batch_size=2",
                                         "eval.compare_base=false", "eval.metric=null")])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert "skipped 3 bad row(s)" in err
    assert "line 9: malformed JSON" in err and "line 10: missing field 'text'" in err
    assert "line 11: line longer than" in err
