"""report.json carries each run as a result of PEFT's benchmark (method_comparison/MetaMathQA):
PEFT's field names, with the values of the run's summary.json."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main
from tests.conftest import tiny_run_args

#: PEFT's result-file layout (huggingface/peft method_comparison/MetaMathQA/results/*.json)
PEFT_FIELDS = {
    "run_info": {
        "created_at",
        "total_time",
        "experiment_name",
        "peft_branch",
        "train_config",
        "peft_config",
        "error_msg",
    },
    "train_info": {
        "accelerator_memory_reserved_avg",
        "accelerator_memory_max",
        "accelerator_memory_reserved_99th",
        "train_time",
        "file_size",
        "num_trainable_params",
        "num_total_params",
        "status",
        "metrics",
    },
    "meta_info": {"model_info", "dataset_info", "package_info", "system_info", "pytorch_info"},
}
TRAIN_CONFIG = {
    "model_id",
    "dtype",
    "max_seq_length",
    "batch_size",
    "batch_size_eval",
    "max_steps",
    "eval_steps",
    "compile",
    "use_gc",
    "query_template",
    "seed",
    "grad_norm_clip",
    "optimizer_type",
    "optimizer_kwargs",
    "lr_scheduler",
    "use_amp",
    "autocast_adapter_dtype",
    "generation_kwargs",
    "attn_implementation",
    "init_kv_cache_prefix",
}
FINAL_METRICS = {
    "step",
    "test accuracy",
    "train loss",
    "train samples",
    "train total tokens",
    "forgetting",
}
SYSTEM_INFO = {"system", "release", "version", "machine", "processor", "accelerator"}


def test_report_json_has_peft_result_fields_with_the_runs_values(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "cmp"
    args = [a for a in tiny_run_args(tiny_model_dir, "x") if not a.startswith("output_dir")]
    assert (
        main(
            [
                "compare",
                "--methods",
                "lora",
                "--seeds",
                "1",
                "--no-long",
                "--out",
                str(out),
                *args,
                "eval.metric=number",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    (res,) = report["peft_results"]
    s = json.loads((out / "lora" / "summary.json").read_text())
    for section, fields in PEFT_FIELDS.items():
        assert fields <= set(res[section]), (section, fields - set(res[section]))
    run, train = res["run_info"], res["train_info"]
    assert set(run["train_config"]) == TRAIN_CONFIG
    assert SYSTEM_INFO <= set(res["meta_info"]["system_info"])
    assert res["meta_info"]["package_info"]["torch-version"]
    final = train["metrics"][-1]
    assert set(final) == FINAL_METRICS
    # the values are the run's
    assert train["num_trainable_params"] == s["trainable_params"]
    assert train["num_total_params"] == s["total_params"]
    assert train["accelerator_memory_max"] == round(s["peak_memory_mb"] * 2**20)
    assert train["train_time"] == s["train_time_s"] and 0 < s["train_time_s"]
    assert (
        train["file_size"]
        == (out / "lora" / "adapter" / "adapter_model.safetensors").stat().st_size
    )
    assert train["status"] == "success" and run["error_msg"] == ""
    assert run["peft_config"]["peft_type"] == "LORA" and run["peft_config"]["r"] == 4
    assert run["train_config"]["max_steps"] == s["total_steps"] == final["step"] == 6
    assert run["train_config"]["batch_size"] == 4 and final["train samples"] == 24
    assert run["train_config"]["optimizer_kwargs"]["lr"] == 1e-3
    assert final["test accuracy"] == s["tuned"]["number"]
    assert final["train loss"] == s["final_train_loss"]
    assert final["train total tokens"] == s["train_tokens"] > 0
    assert final["forgetting"] == pytest.approx(
        s["tuned"]["general_text_loss"] - s["base"]["general_text_loss"]
    )
    assert res["lorakit"]["row"] == "lora" and res["lorakit"]["test_accuracy_metric"] == "number"
