"""Typed configuration: one source of truth for the Python API, YAML files and the CLI.

Every field has a docstring-like description (``Field(description=...)``); ``lorakit train --help``
and the docs are generated from these. Unknown keys and wrong types fail with one sentence
that names the field (see :func:`parse`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .errors import LorakitError
from .options import MethodOptions
from .options import Strict as _Strict
from .registry import DEFAULT_METHOD, METHODS, PRESETS, all_methods, get_method, preset_options

#: Options that cannot work together: (test on (config, method), the one-sentence reason).
#: A method's own restrictions on common options are its ``Method.check``.
COMBINATIONS: list[tuple[Callable[[Any, Any], bool], str]] = [
    (
        lambda c, m: not m.wraps_layers and c.quantize is not None,
        (
            "quantize: nf4 needs an adapter to train: a method that trains every weight cannot "
            "train 4-bit weights (use it without quantize, or an adapter method)"
        ),
    ),
    (
        lambda c, m: not m.wraps_layers and bool(c.trainable_modules),
        "trainable_modules adds modules to an adapter; this method already trains every weight",
    ),
    (
        lambda c, m: not m.wraps_layers and (bool(c.rank_pattern) or bool(c.alpha_pattern)),
        "rank_pattern/alpha_pattern set adapter ranks; this method has no adapter",
    ),
]


class AdapterConfig(_Strict):
    """What to adapt and how: the options every method shares, plus the chosen method's own
    options under ``adapter.<method>`` (``adapter.adalora.target_r``; the method's module
    declares them). Defaults follow each method's paper (docs/methods/)."""

    method: str = Field(
        DEFAULT_METHOD,
        description="a registered method (lorakit methods lists them), "
        "or a preset: qlora | lora+ | longlora",
    )
    r: int = Field(16, gt=0, description="LoRA rank (AdaLoRA: see adalora.init_r/target_r)")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; scale = alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA branch input")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="list: module name or '.'-suffix; string: full regex; "
        "'all-linear': every linear layer except the output head",
    )
    trainable_modules: list[str] = Field(
        default_factory=list,
        description="modules trained whole and saved with the adapter "
        "(PEFT modules_to_save); 'embeddings' and 'norms' select the input embeddings and "
        "every normalization layer",
    )
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="per-module rank: regex -> r"
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="per-module alpha: regex -> alpha"
    )
    use_rslora: bool = Field(False, description="scale = alpha / sqrt(r) (rsLoRA)")
    quantize: Literal["nf4"] | None = Field(None, description="'nf4': 4-bit base (QLoRA)")
    quant_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="dtype the NF4 weights are dequantized to for each matmul "
        "(auto: bfloat16 where bf16 is native, else float32)",
    )
    loraplus_ratio: float | None = Field(None, gt=0, description="LoRA+: lr_B / lr_A")
    loraplus_lr_embedding: float = Field(1e-6, gt=0, description="LoRA+: lr of LoRA on embeddings")
    s2_attn: bool = Field(False, description="LongLoRA shifted sparse attention in training")
    s2_group_ratio: float = Field(0.25, gt=0, le=1, description="S2-Attn group size / length")
    context_length: int | None = Field(
        None, gt=0, description="RoPE linear interpolation target length"
    )
    options: Any | None = Field(
        None, exclude=True, description="the method's own options (written adapter.<method>: {...})"
    )

    @model_validator(mode="before")
    @classmethod
    def _method_and_options(cls, data: Any) -> Any:
        """Expand a preset; move ``adapter.<method>`` into ``options``, parsed with the
        method's own options model; refuse another method's section and old flat names."""
        if not isinstance(data, dict):
            return data
        if data.get("method") in PRESETS:
            preset = preset_options(data["method"])
            data = {
                **preset,
                **{k: v for k, v in data.items() if k != "method"},
                "method": preset["method"],
            }
        data = dict(data)
        name = data.get("method", DEFAULT_METHOD)
        if name not in METHODS:
            raise ValueError(
                f"method must be one of {', '.join([*METHODS, *PRESETS])}, not {name!r}"
            )
        method = get_method(name)
        raw = data.pop("options", None)
        owners = {m.options_key: m for m in all_methods() if m.options is not None}
        for key in [k for k in data if k not in cls.model_fields]:
            if key in owners:
                if key != method.options_key:
                    raise LorakitError(
                        f"invalid config: adapter.{key} holds options of method "
                        f"{owners[key].name!r}, but adapter.method is {name!r}"
                    )
                raw = data.pop(key)
                continue
            for m in owners.values():
                new = m.options.RENAMED.get(key, key if key in m.options.model_fields else None)
                if new is not None:
                    raise LorakitError(
                        f"invalid config: adapter.{key} is now adapter.{m.options_key}.{new}"
                    )
        if isinstance(raw, MethodOptions) and not isinstance(raw, method.options or ()):
            raw = None  # another method's parsed options: the method was just changed
        if method.options is None:
            if raw:
                raise LorakitError(f"invalid config: method {name!r} has no options of its own")
            data["options"] = None  # explicit: an assignment re-validates from this dict
            return data
        if isinstance(raw, method.options):
            data["options"] = raw
            return data
        if raw is not None and not isinstance(raw, dict):
            raise LorakitError(
                f"invalid config: adapter.{method.options_key} must be a mapping of options"
            )
        raw = dict(raw or {})
        for old, new in method.options.RENAMED.items():
            if old in raw:
                raise LorakitError(
                    f"invalid config: adapter.{method.options_key}.{old} is now "
                    f"adapter.{method.options_key}.{new}"
                )
        try:
            data["options"] = method.options.model_validate(raw)
        except ValidationError as e:
            raise LorakitError(
                "invalid config: "
                + validation_message(e, f"adapter.{method.options_key}", method.options)
            ) from None
        return data

    @model_validator(mode="after")
    def _check(self) -> AdapterConfig:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules must not be empty")
        regexes = (
            [("target_modules", self.target_modules)]
            if isinstance(self.target_modules, str) and self.target_modules != "all-linear"
            else []
        )
        regexes += [
            (f"{field}[{k!r}]", k)
            for field in ("rank_pattern", "alpha_pattern")
            for k in getattr(self, field)
        ]
        for where, pattern in regexes:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{where} is not a valid regular expression ({e})") from None
        for k, v in self.rank_pattern.items():
            if v <= 0:
                raise ValueError(f"rank_pattern[{k!r}] must be > 0")
        for k, v in self.alpha_pattern.items():
            if v <= 0:
                raise ValueError(f"alpha_pattern[{k!r}] must be > 0")
        method = get_method(self.method)
        for applies, why in COMBINATIONS:
            if applies(self, method):
                raise ValueError(why)
        method.check(self)
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict:
        """The method's options go back under ``adapter.<method>`` (round-trips through YAML)."""
        out = handler(self)
        if self.options is not None and isinstance(out, dict):
            out[get_method(self.method).options_key] = self.options.model_dump()
        return out


def upgrade_recorded(adapter: dict) -> dict:
    """An adapter config recorded by lorakit 0.1 (method options flat in ``adapter``) in the
    current form: the chosen method's options moved into ``adapter.<method>``, other methods'
    (recorded defaults) dropped. For files lorakit wrote itself (lorakit.json, a run's
    config.yaml); a user's own config gets the one-sentence error instead."""
    data = dict(adapter)
    name = PRESETS.get(data.get("method"), {}).get("method", data.get("method", DEFAULT_METHOD))
    if name not in METHODS:
        return data
    own = get_method(name)
    for m in all_methods():
        if m.options is None:
            continue
        flat = dict(m.options.RENAMED)
        flat.update({f: f for f in m.options.model_fields})
        moved = {
            flat[k]: data.pop(k)
            for k in list(data)
            if k in flat and k not in AdapterConfig.model_fields
        }
        if m is own and moved:
            data[m.options_key] = {**moved, **(data.get(m.options_key) or {})}
    return data


#: Keys of LLaMA-Factory, TRL/transformers and axolotl configs -> what lorakit calls them
PEER_KEYS = {
    "num_train_epochs": "train.epochs",
    "learning_rate": "train.lr",
    "lr_scheduler_type": "train.schedule",
    "per_device_train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "warmup_ratio": "train.warmup_ratio",
    "max_grad_norm": "train.max_grad_norm",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "lora_rank": "adapter.r",
    "lora_r": "adapter.r",
    "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout",
    "lora_target": "adapter.target_modules",
    "lora_target_modules": "adapter.target_modules",
    "finetuning_type": "adapter.method",
    "use_dora": "adapter.method (dora)",
    "quantization_bit": "adapter.quantize (nf4)",
    "load_in_4bit": "adapter.quantize (nf4)",
    "model_name_or_path": "model",
    "base_model": "model",
    "dataset": "data.train",
    "datasets": "data.train",
    "cutoff_len": "data.max_seq_len",
    "sequence_len": "data.max_seq_len",
    "max_seq_length": "data.max_seq_len",
    "report_to": "metrics.jsonl in the run folder (trackers are not supported yet)",
}


def _unknown_key_hint(model_cls: type | None, loc: tuple) -> str:
    """ "; lorakit calls it X" for a peer's key, "; did you mean X?" for a near miss."""
    key = str(loc[-1])
    if key in PEER_KEYS:
        return f"; lorakit calls it {PEER_KEYS[key]}"
    for part in loc[:-1]:  # the section the key was found in
        field = getattr(model_cls, "model_fields", {}).get(part)
        model_cls = getattr(field, "annotation", None)
    known = [k for k, f in getattr(model_cls, "model_fields", {}).items() if not f.exclude]
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
    return f"; did you mean {near[0]!r}?" if near else ""


def validation_message(
    err: ValidationError, prefix: str = "", model_cls: type | None = None
) -> str:
    """Turn pydantic's multi-line report into one sentence naming the first bad field."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    where = ".".join(p for p in (prefix, loc) if p)
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key" + _unknown_key_hint(model_cls, tuple(first["loc"]))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{where}: {msg}" if where else msg


def parse(model_cls: type[BaseModel], data: dict, prefix: str = "") -> Any:
    """Validate ``data`` into ``model_cls``; raise LorakitError with one sentence on failure."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise LorakitError(f"invalid config: {validation_message(e, prefix, model_cls)}") from None


def adapter_config(cfg: AdapterConfig | dict | None = None, **kwargs) -> AdapterConfig:
    """Accept an AdapterConfig, a dict or keyword arguments."""
    if isinstance(cfg, AdapterConfig):
        return cfg.model_copy(update=kwargs) if kwargs else cfg
    return parse(AdapterConfig, {**(cfg or {}), **kwargs}, prefix="adapter")


# ---- the run configuration (lorakit train) ---------------------------------------------------


class DataConfig(_Strict):
    """Where the examples come from and how they become token sequences."""

    train: str | list[str] = Field(
        "task:arithmetic",
        description="a .jsonl/.json/.csv/.parquet/.txt file, task:NAME for a "
        "built-in task, or a list of files (in one format) trained together",
    )
    weights: list[float] | None = Field(
        None,
        description="with several train files: how many times each file's examples are "
        "used (2: twice; 0.5: a random half); default 1 each",
    )
    valid: str | None = Field(
        None,
        description="validation file; default: the task's "
        "validation split, or valid_ratio of the training file",
    )
    valid_ratio: float = Field(
        0.05, ge=0, lt=1, description="held out of train when valid is not given"
    )
    format: Literal["auto", "chat", "sharegpt", "alpaca", "prompt_completion", "text"] = Field(
        "auto",
        description="row format; auto detects messages / conversations / instruction "
        "/ prompt / text",
    )
    columns: dict[str, str | list[str]] = Field(
        default_factory=dict,
        description="lorakit's field name -> the file's (as "
        "LLaMA-Factory's dataset_info): {messages: dialog, role: speaker, content: text}, "
        "{instruction: question, output: answer}; a list: the first field a row has; a row "
        "field may be a template of the file's fields: {prompt: 'Question: {query}'}",
    )
    roles: dict[str, str] = Field(
        default_factory=dict,
        description="the file's role names -> user, assistant, system "
        "or tool: {Q: user, A: assistant}",
    )
    max_seq_len: int = Field(512, gt=0, description="longer examples are truncated")
    truncation: Literal["right", "left"] = Field(
        "right",
        description="which end of a longer example is cut: right keeps its start; "
        "left keeps its end (the answer and the end of a long prompt)",
    )
    packing: bool | Literal["auto", "concat"] = Field(
        "auto",
        description="true: pack whole rows into max_seq_len sequences, each row attending "
        "to itself only; false: one row per sequence, padded; concat: rows concatenated and "
        "cut into max_seq_len blocks (plain-text corpora); auto: true where the model and "
        "method keep packed rows apart, else false (docs/packing.md)",
    )
    group_by_length: bool = Field(
        False,
        description="unpacked rows: put rows of similar length in the same step (less "
        "padding); the steps' order stays random",
    )
    train_on: Literal["all_assistant", "last_assistant", "all"] = Field(
        "all_assistant",
        description="conversations: the loss on every assistant turn, on "
        "the last one, or on every token",
    )
    train_on_prompt: bool = Field(
        False, description="also compute the loss on prompt tokens (the same as train_on: all)"
    )
    limit: int | None = Field(None, gt=0, description="use only the first N training rows")

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_value(cls, v: Any) -> Any:
        if isinstance(v, bool) or v in ("auto", "concat"):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        raise ValueError(f"must be true, false, auto or concat, not {v!r}")

    @model_validator(mode="after")
    def _sources(self) -> DataConfig:
        files = [self.train] if isinstance(self.train, str) else self.train
        if not files:
            raise ValueError("data.train names no file")
        if len(files) > 1 and any(f.startswith("task:") for f in files):
            raise ValueError("data.train: a built-in task cannot be listed with other sources")
        if self.weights is not None:
            if len(self.weights) != len(files):
                raise ValueError(
                    f"data.weights has {len(self.weights)} values for {len(files)} train file(s)"
                )
            if any(w <= 0 for w in self.weights):
                raise ValueError("data.weights must be positive")
        return self

    @property
    def train_files(self) -> list[str]:
        return [self.train] if isinstance(self.train, str) else list(self.train)

    @property
    def loss_on(self) -> str:
        """What the loss covers: ``train_on``, or every token with ``train_on_prompt``."""
        return "all" if self.train_on_prompt else self.train_on


class TrainConfig(_Strict):
    """The optimization loop."""

    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="lr decay after warm-up"
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="fraction of steps warming up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null: off")
    epochs: float = Field(1.0, gt=0, description="passes over the data (when max_steps is null)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs")
    batch_size: int = Field(8, gt=0, description="examples per micro-batch per process")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the hardware runs it fast, else fp32"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward")
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="how several processes share the model: ddp (a whole copy each), "
        "fsdp (FSDP2: each holds a shard of every weight), auto (what the launcher asked for: "
        "fsdp under an accelerate FSDP config, else ddp)",
    )
    compile: Literal["auto"] | bool = Field(
        "auto",
        description="torch.compile each decoder layer for training (inductor: needs a "
        "C++ compiler on CPU); falls back to eager with a warning where compiling fails. auto: "
        "eager for the first steps, then compiled where the measured gain pays back the "
        "compile time over the steps left (CPU, one process); the log says which and why",
    )
    seed: int = Field(0, description="seed for init, data order and dropout")
    objective: Literal["sft", "dpo"] = Field(
        "sft",
        description="sft: next-token loss on the answers; dpo: Direct Preference "
        "Optimization on chosen/rejected pairs (the dpo section; docs/preference.md)",
    )
    init_adapter: str | None = Field(
        None,
        description="start from the weights of a saved adapter folder (lorakit or PEFT) "
        "instead of a fresh initialization; its method, rank and targets must match adapter.*",
    )
    eval_every: int = Field(0, ge=0, description="validation loss every N steps (0: at the end)")
    save_every: int = Field(50, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, gt=0, description="how many recent checkpoints to keep")
    log_every: int = Field(1, gt=0, description="metrics.jsonl line every N steps")
    resume: bool = Field(False, description="continue from the last checkpoint in output_dir")
    early_stopping_patience: int | None = Field(
        None,
        gt=0,
        description="stop after this many evaluations (every eval_every steps) "
        "without a lower validation loss",
    )
    keep_best: bool = Field(
        False,
        description="end with the weights of the lowest validation "
        "loss (evaluated every eval_every steps), not the last step's",
    )
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list,
        description="experiment trackers, through accelerate: "
        "tensorboard (events in <output_dir>/tensorboard; pip install 'lorakit[tensorboard]') "
        "and/or wandb; metrics.jsonl is always written",
    )

    @model_validator(mode="after")
    def _validation_every(self) -> TrainConfig:
        for key in ("early_stopping_patience", "keep_best"):
            if getattr(self, key) and not self.eval_every:
                raise ValueError(
                    f"train.{key} needs train.eval_every > 0 (how often the "
                    "validation loss is measured)"
                )
        return self


#: the generation metrics (lorakit.training.evaluation computes each; docs/evaluation.md)
METRIC_NAMES = ("exact_match", "normalized_match", "f1", "number")


class EvalConfig(_Strict):
    """Evaluation after training (and by lorakit eval). Answers are generated greedily until
    the model ends them (EOS / end-of-turn); every metric is computed and reported."""

    metric: Literal[METRIC_NAMES] | None = Field(
        "exact_match",
        description="headline generation metric on the held-out rows with "
        "references (a task's test split, or the validation rows); all of them are computed "
        "and reported; null: loss only",
    )
    limit: int = Field(200, gt=0, description="examples for the generation metric")
    batch_size: int = Field(32, gt=0, description="examples per generation batch")
    max_new_tokens: int | None = Field(
        None,
        gt=0,
        description="cap on generated tokens per answer; null: the longest "
        "reference answer in tokens + 16 (at most 1024). Answers cut by the cap are reported",
    )
    compare_base: bool = Field(True, description="also evaluate the base model (before/after)")
    precision: Literal["fp32", "train"] = Field(
        "fp32",
        description="fp32: every evaluation figure in fp32 (the frozen weights upcast "
        "for it), so answers do not depend on batch_size or the CPU's bf16 kernels; train: "
        "the run's precision",
    )


DPOLoss = Literal["sigmoid", "ipo", "robust", "sft"]


class DPOConfig(_Strict):
    """Preference tuning (train.objective: dpo), with TRL's DPOConfig names and defaults."""

    beta: float = Field(
        0.1, gt=0, description="how far from the reference the policy may move (DPO's β)"
    )
    loss: DPOLoss | list[DPOLoss] = Field(
        "sigmoid",
        description="sigmoid: DPO's -log σ(βΔ); ipo: (Δ/len - 1/(2β))²; robust: label-smoothed "
        "sigmoid for noisy preferences; sft: the chosen completions' mean token NLL; a list "
        "adds its losses, weighted by loss_weights (TRL's loss_type; [sigmoid, sft] is RPO)",
    )
    loss_weights: list[float] | None = Field(
        None, description="one weight per loss of the list (TRL's loss_weights); null: 1 each"
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="the assumed share of flipped preferences (robust loss only, as in TRL)",
    )
    max_length: int | None = Field(
        None,
        gt=0,
        description="prompt + completion tokens kept per sequence; null: data.max_seq_len",
    )
    truncation_mode: Literal["keep_start", "keep_end"] = Field(
        "keep_start",
        description="keep_start cuts the end of a longer sequence (pairs whose prompt alone "
        "fills max_length are dropped); keep_end cuts its start",
    )
    precompute_ref_log_probs: bool = Field(
        False,
        description="compute the reference log-probabilities once before training "
        "(always so for method full, which has no adapter to switch off)",
    )
    disable_dropout: bool = Field(
        True, description="train without dropout, so the policy and reference agree at step 0"
    )

    @property
    def terms(self) -> list[tuple[str, float]]:
        """(loss, weight) of each term the DPO loss adds."""
        names = [self.loss] if isinstance(self.loss, str) else self.loss
        return list(zip(names, self.loss_weights or [1.0] * len(names)))

    @model_validator(mode="after")
    def _losses(self) -> DPOConfig:
        names = [self.loss] if isinstance(self.loss, str) else self.loss
        if not names or len(set(names)) != len(names):
            raise ValueError(f"loss must name each loss once, not {names}")
        if self.loss_weights is not None and len(self.loss_weights) != len(names):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} value(s) for {len(names)} loss(es) "
                f"({', '.join(names)}): give one weight per loss"
            )
        if self.loss_weights is not None and any(w < 0 for w in self.loss_weights):
            raise ValueError("loss_weights must not be negative")
        if self.label_smoothing and "robust" not in names:
            raise ValueError(
                f"label_smoothing applies to loss robust only (TRL ignores it for "
                f"{'/'.join(names)}); set dpo.loss=robust or leave label_smoothing at 0"
            )
        return self


class RunConfig(_Strict):
    """A whole run: ``lorakit train CONFIG.yaml key=value ...``."""

    model: str = Field("smollm2-135m", description="embedded name, HF id or local folder")
    trust_remote_code: bool = Field(
        False,
        description="let transformers run the model repository's code (only for models you trust)",
    )
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    output_dir: str = Field("runs/default", description="where the run writes everything")

    @model_validator(mode="after")
    def _objective(self) -> RunConfig:
        default = DPOConfig()
        changed = [k for k in DPOConfig.model_fields if getattr(self.dpo, k) != getattr(default, k)]
        if changed and self.train.objective != "dpo":
            raise ValueError(
                f"dpo.{changed[0]} is set but train.objective is {self.train.objective}; "
                "set train.objective=dpo to tune on preference pairs"
            )
        return self


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise LorakitError(f"invalid override {dotted!r}: {p!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.max_steps=200", "adapter.target_modules=[q_proj,v_proj]"]`` -> nested dict.

    Values are read as YAML scalars/lists (safe_load: data only, never code)."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise LorakitError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(out, key.strip(), value)
    return out


def _deep_merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def load_run_config(
    path: str | None = None, overrides: list[str] | None = None, recorded: bool = False
) -> RunConfig:
    """Read a YAML run config (optional) and apply ``key=value`` overrides, validated.

    ``recorded``: the file is a run's own config.yaml, possibly written by an older lorakit
    (see :func:`upgrade_recorded`)."""
    data: dict = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise LorakitError(f"cannot read config {path}: {e.strerror}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise LorakitError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise LorakitError(f"{path} must hold a mapping of sections (model, adapter, ...)")
    if recorded and isinstance(data.get("adapter"), dict):
        data["adapter"] = upgrade_recorded(data["adapter"])
    data = _deep_merge(data, parse_overrides(overrides or []))
    return parse(RunConfig, data)


def split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.yaml] key=value ...`` (the command line of train and compare) ->
    (path, overrides)."""
    path, overrides = None, []
    for i, item in enumerate(items):
        if "=" not in item:
            if i != 0:
                raise LorakitError(
                    f"{item!r} is not a key=value override (a config file must come first)"
                )
            path = item
        else:
            overrides.append(item)
    return path, overrides


def config_reference() -> str:
    """Every run-config key with its default and description, from the pydantic models (the
    single source of truth for YAML files, overrides and ``lorakit train --help``), each
    method's own options included."""

    def field_lines(prefix: str, fields: dict) -> list[str]:
        out = []
        for k, f in fields.items():
            if f.exclude:
                continue
            default = f.default_factory() if f.default_factory else f.default
            out.append(f"  {prefix}{k} = {default!r}: {f.description}")
        return out

    lines = ["run config keys (YAML sections, or section.key=value overrides):"]
    for name, f in RunConfig.model_fields.items():
        sub = getattr(f.annotation, "model_fields", None)
        if sub is None:
            lines.append(f"  {name} = {f.default!r}: {f.description}")
            continue
        lines += field_lines(f"{name}.", sub)
        if f.annotation is AdapterConfig:
            for m in all_methods():
                if m.options is not None:
                    lines += field_lines(f"adapter.{m.options_key}.", m.options.model_fields)
    return "\n".join(lines)
