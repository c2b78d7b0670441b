"""The method boundary: a new method is one module plus one registry row. The toy method
below (LoRA with a learned scalar gate) is written to a file by the test, registered, trained
with ``lorakit train``, saved and loaded again; no other module of lorakit changes."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from lorakit import registry
from lorakit.adapters.base import layers_of
from lorakit.cli import main
from tests.conftest import tiny_run_args

SRC = Path(__file__).resolve().parents[2] / "src" / "lorakit"

TOY = '''"""Gated LoRA, a toy method: y = W0 x + b + g · s · B A x with a learned scalar gate g."""

import torch
from pydantic import Field
from torch import nn

from lorakit.adapters.base import MethodHooks, copy_into, layers_of
from lorakit.adapters.lora import LoRA, LoRALinear
from lorakit.config import MethodOptions


class GatedOptions(MethodOptions):
    gate_init: float = Field(1.0, description="initial value of the gate")


class GatedLoRALinear(LoRALinear):
    adapter_param_names = ("lora_A", "lora_B", "lora_gate")

    def __init__(self, base_layer, r, alpha, dropout=0.0, use_rslora=False, gate_init=1.0):
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        self.lora_gate = nn.Parameter(torch.tensor([float(gate_init)]))

    def delta_weight(self):
        return super().delta_weight() * self.lora_gate.float()

    def forward(self, x):
        out = self.base_layer(x)
        if self.bypass():
            return out
        return out + self.lora_gate.to(out.dtype) * self.lora_branch(x).to(out.dtype)

    def peft_state(self):
        return {**super().peft_state(), "lora_gate": self.lora_gate}

    def load_peft_state(self, state):
        super().load_peft_state(state)
        copy_into(self.lora_gate, state["lora_gate"])


class GatedHooks(MethodHooks):
    def summary(self, model):
        gates = [float(m.lora_gate) for m in layers_of(model, GatedLoRALinear).values()]
        return {"mean_gate": sum(gates) / len(gates)}


class GatedLoRA(LoRA):
    name = "gated-lora"
    summary = "Gated LoRA: LoRA times a learned scalar gate (a test's toy)"
    linear = GatedLoRALinear
    embedding = None
    options = GatedOptions
    hooks = GatedHooks
    dm_dd_figure = False

    def reads_peft(self, pc):
        return False

    def layer_kwargs(self, cls, cfg):
        return {**super().layer_kwargs(cls, cfg), "gate_init": cfg.options.gate_init}

    def report_note(self, method_summary):
        return f"mean gate {method_summary['mean_gate']:.3f}"


METHOD = GatedLoRA()
'''


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    (tmp_path / "gated_lora_toy.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.METHODS, "gated-lora", "gated_lora_toy")  # the one row
    import gated_lora_toy

    return gated_lora_toy


def test_a_new_method_is_one_file_and_one_registry_row(
    toy_method, tiny_model_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny_run_args(
                    tiny_model_dir,
                    out,
                    "adapter.method=gated-lora",
                    "adapter.gated_lora.gate_init=0.5",
                    "eval.compare_base=false",
                ),
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "gated-lora" and summary["trainable_params"] > 0
    gate = summary["method_summary"]["mean_gate"]
    assert abs(gate - 0.5) > 1e-6  # the gate trained, from the option's initial value
    saved = {
        k: v
        for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items()
        if k.endswith("lora_gate")
    }
    assert saved and sum(float(v) for v in saved.values()) / len(saved) == pytest.approx(gate)

    base, _ = lk.load_model(str(tiny_model_dir))
    model = lk.load_adapter(base, out / "adapter").eval()
    layers = layers_of(model, toy_method.GatedLoRALinear)
    assert len(layers) == len(saved)
    for name, layer in layers.items():
        assert torch.equal(layer.lora_gate.detach(), saved[f"base_model.model.{name}.lora_gate"])
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with lk.disabled(model):
            plain = model(input_ids=ids).logits
        lk.merge(model)
        merged = model(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-6
    assert (adapted - merged).abs().max() <= 1e-5

    capsys.readouterr()
    assert main(["methods"]) == 0
    assert "gated-lora" in capsys.readouterr().out
    assert (
        main(
            [
                "train",
                *tiny_run_args(tiny_model_dir, tmp_path / "bad", "adapter.gated_lora.gate_init=2"),
            ]
        )
        == 2
    )
    assert "holds options of method 'gated-lora'" in capsys.readouterr().err


def _imports(path: Path) -> list[str]:
    """Absolute lorakit module names imported anywhere in ``path`` (resolving relative ones)."""
    pkg = ".".join(["lorakit", *path.relative_to(SRC).parent.parts])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found += [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return [m for m in found if m.startswith("lorakit")]


def _from_package_init(path: Path) -> list[str]:
    """What ``path`` takes from the package ``__init__`` (``import lorakit``, ``from lorakit
    import X`` / ``from .. import X`` where X is not a submodule)."""
    pkg = ["lorakit", *path.relative_to(SRC).parent.parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name == "lorakit"]
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            if mod == "lorakit":
                found += [
                    f"from lorakit import {a.name}"
                    for a in node.names
                    if not (
                        (SRC / f"{a.name}.py").is_file() or (SRC / a.name / "__init__.py").is_file()
                    )
                ]
    return found


def test_layers_below_loop_above():
    """adapters/ imports nothing from training, analysis or cli, nor config or the registry
    (config runs method code while it validates: an edge back would be a loop the import graph
    hides); no engine module imports the CLI; no module imports the package ``__init__``;
    only registry.py and a method's own module name a method."""
    for f in (SRC / "adapters").glob("*.py"):
        bad = [
            m
            for m in _imports(f)
            if m.startswith(
                (
                    "lorakit.training",
                    "lorakit.analysis",
                    "lorakit.cli",
                    "lorakit.peft_format",
                    "lorakit.inject",
                    "lorakit.config",
                    "lorakit.registry",
                )
            )
        ]
        assert not bad, (f.name, bad)
    for f in SRC.rglob("*.py"):
        if f != SRC / "__init__.py":
            assert not _from_package_init(f), (str(f.relative_to(SRC)), _from_package_init(f))
    for f in SRC.rglob("*.py"):
        if "cli" not in f.relative_to(SRC).parts and f.name != "__main__.py":
            assert not [m for m in _imports(f) if m.startswith("lorakit.cli")], f
    names = list(registry.METHODS)
    for f in SRC.rglob("*.py"):
        rel = f.relative_to(SRC)
        if rel.parts[0] == "adapters" or rel.name == "registry.py":
            continue
        if rel == Path("analysis/claims.py"):
            continue  # the literature's claims about named methods; a new method needs none
        strings = [
            n.value
            for n in ast.walk(ast.parse(f.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        ]
        assert not [s for s in strings if s in names], (
            str(rel),
            [s for s in strings if s in names],
        )


#: docs/ARCHITECTURE.md's layers, bottom up: a module imports only from its own row or below
LAYERS = [
    (
        "options",
        "version",
        "files",
        "module_tree",
        "errors",
        "sharding",
        "faults",
        "quant",
        "models",
    ),
    ("adapters",),
    ("registry",),
    ("config",),
    ("inject", "attention", "peft_format"),
    ("export", "llamacpp", "gguf_model", "gguf_vocab", "modelfile"),
    ("training",),
    ("gguf_export",),
    ("analysis",),
    ("cli",),
    ("__init__", "__main__"),
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    rows = [i for i, row in enumerate(LAYERS) if top in row]
    assert rows, f"{top} is in no layer of docs/ARCHITECTURE.md (nor of LAYERS here)"
    return rows[0]


def test_imports_follow_the_layers_of_the_architecture_doc():
    for f in SRC.rglob("*.py"):
        rel = f.relative_to(SRC)
        own = _layer(".".join(["lorakit", *rel.with_suffix("").parts]))
        up = sorted({m for m in _imports(f) if m != "lorakit" and _layer(m) > own})
        assert not up, (str(rel), up)


def test_adapters_recorded_with_flat_options_still_load(tmp_path):
    """lorakit 0.1 wrote every method's options flat into lorakit.json: such adapters load,
    with the chosen method's options moved into its section."""
    from tests.conftest import tiny_model, train_steps

    model = train_steps(
        lk.apply(tiny_model("llama"), method="adalora", r=4, adalora={"init_r": 6, "target_r": 3})
    )
    lk.save_adapter(model, tmp_path / "ad")
    path = tmp_path / "ad" / "lorakit.json"
    record = json.loads(path.read_text())
    cfg = record["adapter_config"]
    flat = {
        **{k: v for k, v in cfg.items() if k != "adalora"},
        **cfg["adalora"],
        "beta1": cfg["adalora"]["sensitivity_beta"],
        "threshold": 0.9,
        "top_n": None,
        "lorafa_projection": False,
    }
    del flat["sensitivity_beta"]
    record["adapter_config"] = flat
    path.write_text(json.dumps(record))
    loaded = lk.load_adapter(tiny_model("llama"), tmp_path / "ad")
    opts = loaded.lorakit_state.config.options
    assert (opts.init_r, opts.target_r, opts.sensitivity_beta) == (6, 3, 0.85)
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        assert torch.allclose(
            loaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-6
        )
