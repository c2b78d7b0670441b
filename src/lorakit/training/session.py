"""How a run's model and data are put together, for training, for the base measurement of
``lorakit compare`` and for ``lorakit eval``: one :class:`ModelBuild` (read once in the
compute dtype, adapted, placed or sharded) and :func:`assemble`, the order every measurement
follows (load, read the data with the tokenizer, adapt, place). An evaluation's model comes
from an adapter folder (:class:`AdapterBuild`); its rows from :func:`eval_rows`."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import inject, models, peft_format
from ..config import RunConfig
from ..errors import LorakitError
from ..files import read_json
from ..registry import get_method
from ..sharding import full
from .data import Rows, build_heldout, encode, heldout_limits, read_rows, remap
from .distributed import Strategy, full_state, shard_model
from .evaluation import HeldOut, measure
from .preference import as_chat_row, encode_pairs, is_preference
from .runtime import cast_frozen, cast_trainable, dtype_name

Log = Callable[[str], None]


class ModelBuild:
    """How this run's model is made, once or again (LoRA-drop under FSDP builds it twice):
    loaded in the compute dtype where it will run, adapted, placed or sharded.

    Loading (See Note: FSDP2 in lorakit, distributed.py): one process, or DDP: each process
    reads the weights once, in the compute dtype (frozen weights bf16 from the start; a
    method that trains every weight loads fp32 master weights), onto its own device. FSDP
    with sharded loading: process 0 reads the weights, the others build the model on the meta
    device and receive their shards; a 4-bit base is read and quantized by every process."""

    def __init__(
        self,
        cfg: RunConfig,
        strategy: Strategy,
        dtype: torch.dtype,
        device: torch.device,
        rank: int = 0,
    ):
        self.cfg, self.strategy, self.dtype, self.device = cfg, strategy, dtype, device
        self.main = rank == 0
        method = get_method(cfg.adapter.method)
        # trainable weights are fp32 masters: a method that trains every weight loads fp32
        self.load_dtype = dtype if method.wraps_layers else torch.float32
        self.meta = strategy.fsdp and strategy.sharded_loading and not cfg.adapter.quantize
        self._state: dict | None = None

    def files_ready(self) -> None:
        """Once per run, before any :meth:`load`: with several processes the first converts
        the embedded model's files (a one-time cache) while the others wait for it."""
        if self.strategy.processes > 1 and self.cfg.model in models.EMBEDDED:
            if self.main:
                models.resolve_model_path(self.cfg.model, self.load_dtype)
            torch.distributed.barrier()

    def load(self, meta: bool | None = None) -> tuple[nn.Module, Any]:
        cfg = self.cfg
        on_meta = self.meta and not self.main if meta is None else meta
        device = None if self.strategy.fsdp else self.device
        if cfg.adapter.quantize and not on_meta:
            # See Note: reading a 4-bit base (models.py): NF4 as it is read, on the device
            loaded = models.load_quantized(
                cfg.model, cfg.adapter, self.load_dtype, cfg.trust_remote_code, device
            )
            if loaded is not None:
                return loaded
            if self.main:  # never silently: say which path ran
                print(
                    "note: this checkpoint cannot be read tensor by tensor (no safetensors "
                    "files, or tensor names other than the model's); loading it whole, then "
                    "quantizing to NF4",
                    file=sys.stderr,
                )
        return models.load_model(
            cfg.model,
            dtype=self.load_dtype,
            trust_remote_code=cfg.trust_remote_code,
            device=device,
            meta=on_meta,
        )

    def adapt(self, model: nn.Module) -> nn.Module:
        """Apply the method; trainable weights in fp32 (their master copies), started from
        ``train.init_adapter``'s weights when it names a saved adapter."""
        meta = _on_meta(model)
        with torch.device("meta") if meta else contextlib.nullcontext():
            inject.apply(model, self.cfg.adapter)
        cast_trainable(model, torch.float32)
        if self.cfg.train.init_adapter and not meta:  # a meta twin gets process 0's weights
            path = self.cfg.train.init_adapter
            _, extras, tensors = peft_format.read_adapter(path)
            get_method(self.cfg.adapter.method).hooks().on_load(model, extras, tensors)
            peft_format.load_state_into(model, tensors, f"train.init_adapter {path}")
        return model

    def place(self, model: nn.Module, edits: tuple = ()) -> nn.Module:
        """On the device (frozen weights in the compute dtype), or sharded under FSDP.
        ``edits``: what was done to ``model`` after :meth:`adapt` (LoRA-drop's sharing), done
        again to the meta twin process 0 shards, so both have one structure."""
        cast_frozen(model, self.dtype)
        if not self.strategy.fsdp:
            return model.to(self.device)
        state = None
        if self.meta and self.main:
            # process 0 keeps its whole weights (CPU) for the broadcast and shards a meta twin
            # built the same way, so that no device ever holds the whole model
            state = full_state(model)
            with torch.random.fork_rng(devices=[]):
                twin, _ = self.load(meta=True)
                self.adapt(twin)
                for edit in edits:
                    edit(twin)
            if hasattr(model, "lorakit_state"):  # what the method recorded (the same object)
                twin.lorakit_state.extras = model.lorakit_state.extras
            cast_frozen(twin, self.dtype)
            model = twin
        model = shard_model(model, self.strategy, self.device, state)
        del state
        models.release_freed_memory()  # the whole weights process 0 broadcast are gone
        return model

    def rebuild(
        self, current: nn.Module, edit: Callable[[nn.Module], Any]
    ) -> tuple[nn.Module, Any]:
        """A new sharded model holding ``current``'s trained values, after ``edit`` (which
        replaces Parameters: a sharded model's cannot be). The edit draws from the random
        state this process had at the call, as it would on an unsharded model."""
        trained = {
            n: full(p.detach()).cpu() for n, p in current.named_parameters() if p.requires_grad
        }  # a collective: every process calls it
        rng = torch.get_rng_state()
        model, _ = self.load()
        self.adapt(model)
        if not _on_meta(model):
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in trained:
                        p.copy_(trained[n].to(p.dtype))
        del trained
        torch.set_rng_state(rng)
        result = edit(model)
        return self.place(model, edits=(edit,)), result


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


class AdapterBuild(ModelBuild):
    """The model an evaluation or inference measures: an adapter folder on its base (or a
    whole model folder; a QLoRA adapter goes onto the 16-bit base), or a base model alone
    when ``adapter`` is None, read once in ``dtype`` onto ``device``. Nothing is applied:
    the adapter folder carries its method."""

    def __init__(
        self,
        cfg: RunConfig,
        dtype,
        device: torch.device,
        adapter: str | None,
        model_name: str | None,
        trust_remote_code: bool = False,
    ):
        super().__init__(cfg, Strategy("single", 1), dtype, device)
        self.adapter, self.model_name, self.trust = adapter, model_name, trust_remote_code
        self.load_dtype, self.meta = dtype, False

    def load(self, meta: bool | None = None) -> tuple[nn.Module, Any]:
        if self.adapter is None:
            if not self.model_name:
                raise LorakitError("name a model with --model (or --base)")
            return models.load_model(
                self.model_name, dtype=self.dtype, trust_remote_code=self.trust, device=self.device
            )
        return peft_format.open_adapter(
            self.adapter, self.model_name, self.dtype, self.trust, self.device
        )

    def adapt(self, model: nn.Module) -> nn.Module:
        return model


def assemble(
    build: ModelBuild, read_data: Callable[[Any], Any], adapt: bool = True
) -> tuple[nn.Module, Any, Any]:
    """(model, tokenizer, data) of a measurement, in the order a run makes them: the model
    read once in the compute dtype (``build.load``), ``read_data(tokenizer)``, the method
    applied (``build.adapt``; skipped with ``adapt=False``: a method that wraps no layers is
    measured as the base before it is applied), the frozen weights cast to the compute dtype
    and on the device (``build.place``)."""
    model, tok = build.load()
    data = read_data(tok)
    if adapt:
        build.adapt(model)
    return build.place(model), tok, data


def eval_rows(
    spec: str | None, run_dir: Path | None, cfg: RunConfig, tok, log: Log = print
) -> tuple[dict, HeldOut]:
    """(what was evaluated, the held-out rows) of ``lorakit eval``: the data file or task
    ``spec`` (every row; a task's test split), else the held-out rows a run recorded in
    ``<run_dir>/heldout.json``, never rows it trained on."""
    if spec:
        rows = remap(
            read_rows(spec, "test", cfg.data.max_seq_len), cfg.data.columns, cfg.data.roles
        )
        what = {"data": spec, "split": "test" if spec.startswith("task:") else "all"}
        if is_preference(rows.rows[0]):
            return what, preference_heldout(rows, cfg, tok, log)
        # the loss covers what the run trained on
        enc = encode(
            rows,
            tok,
            "auto",
            cfg.data.max_seq_len,
            cfg.data.loss_on,
            truncation=cfg.data.truncation,
        )
        if enc.skipped:
            log(Rows(enc.rows, enc.skipped, spec).report())
        return what, HeldOut(enc.examples, enc.rows if enc.fmt != "text" else [], enc.fmt)
    if run_dir is None:
        raise LorakitError("say which data to evaluate on with --data FILE or --data task:NAME")
    record_file = run_dir / "heldout.json"
    if not record_file.is_file():
        raise LorakitError(
            f"{run_dir} does not record its held-out rows (trained by an older "
            "lorakit); pass --data"
        )
    record = read_json(record_file)
    max_len, truncation = heldout_limits(cfg, record["format"])
    valid, metric_rows, pairs = build_heldout(record, tok, max_len, cfg.data.loss_on, truncation)
    v = record["valid"] if isinstance(record["valid"], dict) else record["valid"][0]
    files = [p["data"] for p in record["valid"]] if isinstance(record["valid"], list) else v["data"]
    what = {"data": files, "split": v["split"] if v["lines"] is None else "held-out rows"}
    if record.get("metric"):
        m = record["metric"] if isinstance(record["metric"], dict) else record["metric"][0]
        what["metric_split"] = m["split"]
    return what, HeldOut(valid, metric_rows, record["format"], pairs, cfg.dpo.beta)


def preference_heldout(rows: Rows, cfg: RunConfig, tok, log: Log = print) -> HeldOut:
    """The held-out figures' data of preference rows: every pair, their chosen sides for the
    validation loss and their prompts with the chosen answers for the generation metric."""
    max_len, truncation = heldout_limits(cfg, "preference")
    pairs, kept, skipped = encode_pairs(rows, tok, max_len, truncation)
    if skipped:
        log(Rows(kept, skipped, rows.source).report())
    chats = [c for c in map(as_chat_row, kept) if c is not None]
    return HeldOut([p["chosen"] for p in pairs], chats, "preference", pairs, cfg.dpo.beta)


def evaluate(
    build: ModelBuild,
    data: str | None,
    run_dir: Path | None,
    predictions: str | None = None,
    log: Log = print,
) -> dict:
    """``lorakit eval``'s figures (the JSON it prints): the model ``build`` makes, measured
    in its compute dtype on the rows of ``data`` or of the run's held-out record
    (:func:`eval_rows`), every answer written to ``predictions`` when given."""
    cfg = build.cfg
    model, tok, (what, heldout) = assemble(
        build, lambda tok: eval_rows(data, run_dir, cfg, tok, log)
    )
    adapter = getattr(build, "adapter", None)
    m = measure(
        model,
        tok,
        heldout,
        cfg.eval,
        cfg.data.max_seq_len,
        build.dtype,
        "adapter" if adapter else "base model",
        log,
        Path(predictions) if predictions else None,
    )
    if "predictions" in m:
        m["predictions"] = predictions
    loss, gen = m.pop("valid_loss", None), m.pop("generation", {})
    if gen:
        gen["metric_examples"] = gen.pop("examples")
    return {
        **what,
        "dtype": dtype_name(build.dtype),
        "examples": len(heldout.valid_examples),
        "loss": loss,
        **m,
        **gen,
    }


def inference_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
