"""``lorakit export``: every method's adapter as plain LoRA (loaded back in PEFT), vLLM's rules,
and llama.cpp GGUF files read back with the ``gguf`` package's reader. Tiny random models."""

from __future__ import annotations

import copy
import json

import gguf
import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import lorakit as lk
from lorakit.adapters.base import adapter_layers
from lorakit.adapters.lora_drop import drop_layers
from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.export import VLLM_MAX_LORA_RANKS, export_model, vllm_max_lora_rank, vllm_problem
from lorakit.llamacpp import rope_permute
from tests.conftest import batch, tiny_model, tiny_run_args, train_steps

EXACT = 1e-5  # logits, exact conversions
SVD_FULL = 1e-4  # logits, DoRA at full rank


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _adalora_pruned(model):
    """Prune a third of AdaLoRA's triplets as its allocator does (mask, E_i = 0)."""
    for i, (_, layer) in enumerate(adapter_layers(model)):
        layer.rank_mask[i % layer.r :: 3] = False
        layer.lora_E.data[~layer.rank_mask] = 0.0
    return model


_adalora_pruned.after = True


def _lora_drop_shared(model):
    """LoRA-drop's decision on made-up importances: most layers share one pair per type."""
    names = [n for n, _ in adapter_layers(model)]
    drop_layers(model, {n: float(i + 1) for i, n in enumerate(names)}, threshold=0.3)
    return model


# (method, options, preparation, --rank, logits tolerance)
CASES = {
    "lora": ("lora", {}, None, None, EXACT),
    "lora-rslora-patterns": (
        "lora",
        {"use_rslora": True, "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"o_proj": 3.0}},
        None,
        None,
        EXACT,
    ),
    "lora-embedding": (
        "lora",
        {"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
        None,
        None,
        EXACT,
    ),
    "lora-fa": ("lora-fa", {}, None, None, EXACT),
    "lora-drop": ("lora-drop", {}, _lora_drop_shared, None, EXACT),
    "adalora": ("adalora", {"adalora": {"init_r": 6, "target_r": 4}}, _adalora_pruned, None, EXACT),
    "dora-full-rank": ("dora", {}, None, 64, SVD_FULL),
    "qlora": ("qlora", {"quant_compute_dtype": "float32"}, None, None, EXACT),
    "lora+": ("lora+", {}, None, None, EXACT),
    "longlora": ("longlora", {}, None, None, EXACT),
}


def _serving_base(model):
    """The plain tiny model the export is served on. A 4-bit run's base is its NF4 weights:
    the served base holds them dequantized (what the 4-bit layers multiply by), so the
    comparison measures the adapter, not the quantization."""
    base = tiny_model("llama")
    modules = dict(base.named_modules())
    for name, layer in adapter_layers(model):
        with torch.no_grad():
            modules[name].weight.copy_(layer.base_weight_matrix())
    return base


def _trained(method, opts, prep, arch="llama"):
    """A trained adapter; ``prep`` runs before training (LoRA-drop's sharing) or, marked
    ``after``, after it (AdaLoRA's final masking)."""
    opts = {"target_modules": "all-linear", **opts}
    model = lk.apply(tiny_model(arch), method=method, r=4, alpha=8, **opts)
    if prep and not getattr(prep, "after", False):
        prep(model)
    train_steps(model)
    if prep and getattr(prep, "after", False):
        prep(model)
    return model


def _direct_updates(model) -> dict[str, torch.Tensor]:
    """ΔW of every layer from each method's definition, in float64: s·BA (LoRA, LoRA-FA,
    LoRA-drop; embeddings (B_e A_e)ᵀ), s·P·diag(λ)·Q (AdaLoRA), m ⊙ V/||V||_row - W0 with
    V = W0 + s·BA (DoRA)."""
    out = {}
    for name, layer in adapter_layers(model):
        p = {n: t.detach().double() for n, t in layer.named_parameters(recurse=False)}
        s = layer.scaling
        if "lora_magnitude_vector" in p:
            w0 = layer.base_weight_matrix().double()
            v = w0 + s * p["lora_B"] @ p["lora_A"]
            out[name] = (p["lora_magnitude_vector"] / v.norm(dim=1))[:, None] * v - w0
        elif "lora_E" in p:
            out[name] = s * p["lora_B"] @ (p["lora_A"] * p["lora_E"])
        elif "lora_embedding_A" in p:
            out[name] = s * (p["lora_embedding_B"] @ p["lora_embedding_A"]).T
        else:
            out[name] = s * p["lora_B"] @ p["lora_A"]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_export_to_lora_loads_in_peft_as_plain_lora(case, tmp_path):
    method, opts, prep, rank, tol = CASES[case]
    model = _trained(method, opts, prep)
    original = copy.deepcopy(model)
    ids = batch()
    ours = _logits(model, ids)
    report = export_model(model, tmp_path / "ex", "lora", rank=rank, prompts=ids)

    pc = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert pc["peft_type"] == "LORA" and not pc["use_dora"] and not pc["use_rslora"]
    assert pc["r"] == report.rank and not pc["rank_pattern"] and not pc["alpha_pattern"]
    peft_model = PeftModel.from_pretrained(_serving_base(original), tmp_path / "ex").eval()
    assert (ours - _logits(peft_model, ids)).abs().max().item() <= tol
    assert report.max_abs_dlogit <= tol
    # lorakit reads the export back too, as plain LoRA
    again = lk.load_adapter(_serving_base(original), tmp_path / "ex")
    assert again.lorakit_state.config.method == "lora"
    assert (ours - _logits(again, ids)).abs().max().item() <= tol

    # the reported error per layer is ||ΔW - s·BA|| / ||ΔW|| of the written tensors
    tensors = load_file(str(tmp_path / "ex" / "adapter_model.safetensors"))
    scale = pc["lora_alpha"] / pc["r"]
    for lay, (name, delta) in zip(report.layers, _direct_updates(original).items()):
        assert lay.name == name
        key = f"base_model.model.{name}"
        if f"{key}.lora_A.weight" in tensors:
            ba = tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()
        else:  # embedding: ΔW = (B_e A_e)ᵀ
            ba = (
                tensors[f"{key}.lora_embedding_B"].double()
                @ tensors[f"{key}.lora_embedding_A"].double()
            ).T
        direct = ((delta - scale * ba).norm() / delta.norm()).item()
        assert lay.rel_error == pytest.approx(direct, rel=1e-2, abs=2e-7)
        assert lay.conversion == ("svd" if method == "dora" else "exact")
        assert lay.rel_error <= 1e-5


def test_gpt2_conv1d_layers_export_in_their_layout(tmp_path):
    """GPT-2's Conv1D stores its weight transposed; the SVD of DoRA's update must not be."""
    model = _trained("dora", {"target_modules": ["c_attn", "c_proj", "c_fc"]}, None, "gpt2")
    ids = batch()
    ours = _logits(model, ids)
    report = export_model(model, tmp_path / "ex", "lora", rank=128)
    pc = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert pc["fan_in_fan_out"] is True
    peft_model = PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path / "ex").eval()
    assert (ours - _logits(peft_model, ids)).abs().max().item() <= SVD_FULL
    assert report.max_rel_error <= 1e-5


def test_dora_truncated_svd_error_is_the_spectrum_tail(tmp_path):
    """At rank k the error is √(Σ_{i>k} σ²/Σσ²) of ΔW (Eckart–Young); --energy picks the
    smallest rank that keeps that much of Σσ², layer by layer."""
    model = _trained("dora", {}, None)
    deltas = _direct_updates(model)
    twin = copy.deepcopy(model)
    report = export_model(model, tmp_path / "r2", "lora", rank=2)
    for lay in report.layers:
        s = torch.linalg.svdvals(deltas[lay.name].double())
        assert lay.rank == 2
        assert lay.rel_error == pytest.approx(
            (s[2:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-3
        )
    report = export_model(twin, tmp_path / "e", "lora", energy=0.9)
    for lay in report.layers:
        sq = torch.linalg.svdvals(deltas[lay.name].double()).square()
        kept = sq.cumsum(0) / sq.sum()
        assert kept[lay.rank - 1] >= 0.9 and (lay.rank == 1 or kept[lay.rank - 2] < 0.9)
        assert lay.rel_error <= (1 - 0.9) ** 0.5 + 1e-6
    assert report.rank == max(lay.rank for lay in report.layers)  # padded to one rank


def test_rank_caps_an_exact_layer(tmp_path):
    model = _trained("lora", {}, None)
    report = export_model(model, tmp_path / "ex", "lora", rank=2)
    assert report.rank == 2 and {lay.conversion for lay in report.layers} == {"svd"}


# ---- vLLM ---------------------------------------------------------------------------------


def test_vllm_export_says_which_max_lora_rank(tmp_path):
    model = _trained("dora", {}, None)
    report = export_model(model, tmp_path / "v", "vllm", rank=12)
    assert report.max_lora_rank == 16
    pc = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert vllm_problem(pc) is None
    assert [vllm_max_lora_rank(r) for r in (1, 8, 9, 300, 512, 513)] == [8, 8, 16, 320, 512, None]


VLLM_REFUSED = {
    "dora": ({"use_dora": True}, "DoRA"),
    "bias": ({"bias": "lora_only"}, "bias"),
    "modules_to_save": ({"modules_to_save": ["model.embed_tokens"]}, "lorakit merge"),
    "patterns": ({"rank_pattern": {"k_proj": 2}}, "rank_pattern"),
    "rank": ({"r": 1024}, "--rank 512"),
    "adalora": ({"peft_type": "ADALORA"}, "LoRA adapters only"),
}


@pytest.mark.parametrize("case", list(VLLM_REFUSED))
def test_vllm_rules_refuse_in_one_sentence(case):
    fields, words = VLLM_REFUSED[case]
    why = vllm_problem({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "bias": "none", **fields})
    assert why and words in why
    assert "\n" not in why and ". " not in why.rstrip(".")
    assert max(VLLM_MAX_LORA_RANKS) == 512


def test_trained_whole_modules_are_refused_for_servers_kept_for_peft(tmp_path):
    opts = {"target_modules": ["q_proj", "v_proj"], "trainable_modules": ["embeddings", "norms"]}
    for to, out in (("vllm", tmp_path / "v"), ("gguf", tmp_path / "a.gguf")):
        model = _trained("lora", opts, None)
        with pytest.raises(LorakitError, match="modules trained whole.*lorakit merge"):
            export_model(model, out, to)
        assert not out.exists() and not list(tmp_path.iterdir())  # nothing written
    model = _trained("lora", opts, None)
    ids = batch()
    ours = _logits(model, ids)
    report = export_model(model, tmp_path / "p", "lora")
    pc = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert pc["modules_to_save"]
    assert "modules trained whole are kept" in " ".join(report.notes)
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "p").eval()
    assert (ours - _logits(peft_model, ids)).abs().max().item() <= EXACT


# ---- GGUF -------------------------------------------------------------------------------


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize(
    "arch,outtype", [("llama", "f32"), ("llama", "f16"), ("qwen2", "bf16"), ("qwen2", "q8_0")]
)
def test_gguf_read_back_equals_the_lora_tensors(arch, outtype, tmp_path):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "embed_tokens"]
    model = _trained("lora", {"target_modules": targets, "use_rslora": True}, None, arch)
    lora_twin = copy.deepcopy(model)
    report = export_model(model, tmp_path / "a.gguf", "gguf", outtype=outtype)
    export_model(lora_twin, tmp_path / "lora", "lora")
    pc = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    lora = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))

    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    assert _field(reader, "general.type") == "adapter"
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, "adapter.type") == "lora"
    assert _field(reader, "adapter.lora.alpha") == pytest.approx(pc["lora_alpha"])
    assert report.alpha == pytest.approx(pc["lora_alpha"]) and report.rank == pc["r"]
    got = {t.name: t for t in reader.tensors}
    cfg = tiny_model(arch).config
    want_names = set()
    for i in range(cfg.num_hidden_layers):
        for leaf in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_down"):
            want_names |= {f"blk.{i}.{leaf}.weight.lora_a", f"blk.{i}.{leaf}.weight.lora_b"}
    want_names |= {"token_embd.weight.lora_a", "token_embd.weight.lora_b"}
    assert set(got) == want_names

    tol = {"f32": 0, "f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2}[outtype]
    gmap = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "down_proj": "ffn_down",
    }
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    for i in range(cfg.num_hidden_layers):
        for mod, leaf in gmap.items():
            part = "self_attn" if mod.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{i}.{part}.{mod}"
            a, b = lora[f"{key}.lora_A.weight"], lora[f"{key}.lora_B.weight"]
            if arch == "llama" and mod in heads:  # llama.cpp's RoPE row order
                b = rope_permute(b, heads[mod])
            for suffix, want in ((".lora_a", a), (".lora_b", b)):
                t = got[f"blk.{i}.{leaf}.weight{suffix}"]
                # ggml lists dimensions fastest first: the reverse of torch's shape
                assert list(t.shape) == list(reversed(want.shape))
                vals = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
                assert vals.shape == want.shape
                assert (vals - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())
    # the embedding's pair is flipped as llama.cpp's converter writes it
    key = "base_model.model.model.embed_tokens"
    ea = gguf.quants.dequantize(
        got["token_embd.weight.lora_a"].data, got["token_embd.weight.lora_a"].tensor_type
    )
    assert ea.shape == tuple(lora[f"{key}.lora_embedding_A"].T.shape)
    # the report measures the file's own (rounded) values
    assert report.outtype == outtype and report.max_rel_error <= (
        1e-6 if outtype == "f32" else 5e-2
    )


def test_rope_permute_is_undone_by_transformers_gguf_reader():
    """transformers reads llama.cpp's q/k rows back with the inverse permutation."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(32, 5)
    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for name, heads in (("blk.0.attn_q.weight", 4), ("blk.0.attn_k.weight", 2)):
        back = proc.process(rope_permute(w, heads).numpy(), name).weights
        assert np.array_equal(back, w.numpy())


def test_gguf_refusals_are_one_sentence(tmp_path):
    model = _trained("lora", {"target_modules": ["c_attn"]}, None, "gpt2")
    with pytest.raises(LorakitError, match="not 'gpt2'") as e:
        export_model(model, tmp_path / "a.gguf", "gguf")
    assert "\n" not in str(e.value) and "lorakit merge" in str(e.value)
    model = _trained("lora", {}, None)
    with pytest.raises(LorakitError, match="--outtype applies to --to gguf"):
        export_model(model, tmp_path / "x", "lora", outtype="f16")
    (tmp_path / "taken.gguf").write_bytes(b"x")
    with pytest.raises(LorakitError, match="exists"):
        export_model(model, tmp_path / "taken.gguf", "gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]


# ---- the command line -----------------------------------------------------------------------


def test_cli_export_of_an_adapter_folder(tiny_model_dir, tmp_path, capsys):
    model, _ = lk.load_model(str(tiny_model_dir))
    model = train_steps(lk.apply(model, method="dora", r=4, alpha=8))
    lk.save_adapter(model, tmp_path / "ad", base_model_name_or_path=str(tiny_model_dir))
    assert (
        main(
            [
                "export",
                str(tmp_path / "ad"),
                "--to",
                "vllm",
                "--out",
                str(tmp_path / "v"),
                "--rank",
                "8",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "--max-lora-rank 8" in printed and "largest |Δlogit|" in printed
    assert (
        main(
            [
                "export",
                str(tmp_path / "ad"),
                "--to",
                "gguf",
                "--out",
                str(tmp_path / "a.gguf"),
                "--outtype",
                "q8_0",
                "--energy",
                "0.99",
                "--json",
            ]
        )
        == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert rep["outtype"] == "q8_0" and rep["heldout"] is None
    assert gguf.GGUFReader(str(tmp_path / "a.gguf")).fields["adapter.type"].contents() == "lora"
    # the same out again: refused, the file left as it was
    size = (tmp_path / "a.gguf").stat().st_size
    assert (
        main(["export", str(tmp_path / "ad"), "--to", "gguf", "--out", str(tmp_path / "a.gguf")])
        == 2
    )
    assert "exists" in capsys.readouterr().err and (tmp_path / "a.gguf").stat().st_size == size


@pytest.mark.slow
def test_cli_export_of_a_run_folder(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *tiny_run_args(
                    tiny_model_dir,
                    run,
                    "adapter.method=dora",
                    "train.max_steps=2",
                    "eval.limit=4",
                    "eval.compare_base=false",
                ),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "export",
                str(run),
                "--to",
                "vllm",
                "--out",
                str(tmp_path / "v"),
                "--rank",
                "8",
                "--json",
            ]
        )
        == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert rep["method"] == "dora" and rep["rank"] == 8 and rep["max_lora_rank"] == 8
    assert rep["heldout"]["original"]["metric"] == rep["heldout"]["export"]["metric"]
    assert "valid_loss" in rep["heldout"]["export"]
    assert (tmp_path / "v" / "adapter_config.json").is_file()
    assert (
        main(
            [
                "export",
                str(run / "adapter"),
                "--to",
                "gguf",
                "--out",
                str(tmp_path / "a.gguf"),
                "--outtype",
                "q8_0",
                "--energy",
                "0.99",
                "--no-heldout",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "largest |Δlogit|" in printed and "llama-cli" in printed
    assert "held-out" not in printed


def test_cli_refusals_exit_2_with_one_line(tmp_path, capsys):
    full = tmp_path / "full"  # what full fine-tuning (or lorakit merge) writes
    tiny_model("llama").save_pretrained(full)
    capsys.readouterr()
    assert main(["export", str(full), "--to", "lora", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "whole fine-tuned model" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    assert (
        main(["export", str(tmp_path / "nope"), "--to", "lora", "--out", str(tmp_path / "x")]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
