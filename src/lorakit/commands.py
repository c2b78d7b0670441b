"""Subcommands beyond ``methods``: train, eval, generate, chat, merge.

Each parses its arguments and calls the library; heavy imports happen inside ``run_*``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from .cli import command
from .errors import LorakitError


# ---- train --------------------------------------------------------------------------------

@command("train", "fine-tune a model: lorakit train [CONFIG.yaml] [section.key=value ...]")
def _train_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = config_reference()
    p.add_argument("items", nargs="*", metavar="CONFIG|key=value",
                   help="an optional YAML run config, then dotted overrides such as "
                        "adapter.method=dora train.max_steps=200 data.train=my.jsonl")


def config_reference() -> str:
    """Every run-config key with its default and description, from the pydantic models (the
    single source of truth for YAML files, overrides and this help)."""
    from .config import RunConfig

    lines = ["run config keys (YAML sections, or section.key=value overrides):"]
    for name, f in RunConfig.model_fields.items():
        sub = getattr(f.annotation, "model_fields", None)
        if sub is None:
            lines.append(f"  {name} = {f.default!r}: {f.description}")
            continue
        for k, sf in sub.items():
            default = sf.default_factory() if sf.default_factory else sf.default
            lines.append(f"  {name}.{k} = {default!r}: {sf.description}")
    return "\n".join(lines)


def split_config_args(items: list[str]) -> tuple[Optional[str], list[str]]:
    path, overrides = None, []
    for i, item in enumerate(items):
        if "=" not in item:
            if i != 0:
                raise LorakitError(f"{item!r} is not a key=value override (a config file must "
                                   "come first)")
            path = item
        else:
            overrides.append(item)
    return path, overrides


def run_train(args) -> int:
    from .config import load_run_config
    from .train import train

    cfg = load_run_config(*split_config_args(args.items))
    summary = train(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    if summary.get("tuned") is not None:
        print(before_after_table(summary))
    print(f"adapter: {Path(cfg.output_dir) / 'adapter'}")
    return 0


def before_after_table(summary: dict) -> str:
    base, tuned = summary.get("base") or {}, summary.get("tuned") or {}
    keys = [k for k in ("exact_match", "valid_loss", "general_text_loss") if k in tuned]
    rows = [f"{'metric':<20}{'base':>10}{'tuned':>10}"]
    for k in keys:
        b = f"{base[k]:.4f}" if k in base else "-"
        rows.append(f"{k:<20}{b:>10}{tuned[k]:>10.4f}")
    return "\n".join(rows)


# ---- loading an adapter for inference -----------------------------------------------------

def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="weights dtype for inference")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the model repository's code")


def load_for_inference(adapter: Optional[str], model_name: Optional[str], dtype: str,
                       trust_remote_code: bool = False):
    """(model, tokenizer) for an adapter folder (or a full fine-tuned model folder), or the
    base model alone when ``adapter`` is None. A QLoRA adapter goes onto the 16-bit base."""
    from . import io, models

    if adapter is None:
        if not model_name:
            raise LorakitError("name a model with --model (or --base)")
        return models.load_model(model_name, dtype=dtype, trust_remote_code=trust_remote_code)
    path = Path(adapter)
    if not path.is_dir():
        raise LorakitError(f"adapter folder {adapter!r} does not exist")
    if (path / "config.json").exists() and not (path / io.CONFIG_NAME).exists():
        return models.load_model(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    if not (path / io.CONFIG_NAME).exists():
        io.read_adapter(path)  # raises the precise error (pickle only, missing files...)
    base_name = model_name or io.read_json(path / io.CONFIG_NAME).get("base_model_name_or_path")
    if not base_name:
        raise LorakitError(f"{adapter} does not record its base model; pass --model")
    model, tok = models.load_model(base_name, dtype=dtype, trust_remote_code=trust_remote_code)
    io.load_adapter(model, path, quantize=None)
    return model, tok


# ---- eval ---------------------------------------------------------------------------------

@command("eval", "evaluate an adapter (or --base MODEL): loss and the task metric, as JSON")
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", nargs="?", help="adapter folder (omit with --base)")
    p.add_argument("--base", help="evaluate this base model alone")
    p.add_argument("--data", help="a data file or task:NAME (default: the run's training data)")
    p.add_argument("--metric", choices=["exact_match", "none"], default=None,
                   help="generation metric (default: exact_match for tasks, none for files)")
    p.add_argument("--limit", type=int, default=200, help="examples for the metric")
    p.add_argument("--max-seq-len", type=int, default=512)
    _add_model_arg(p)


def _run_data_spec(adapter: Optional[str]) -> Optional[str]:
    if adapter:
        cfg_file = Path(adapter).parent / "config.yaml"
        if cfg_file.exists():
            import yaml

            return ((yaml.safe_load(cfg_file.read_text()) or {}).get("data") or {}).get("train")
    return None


def run_eval(args) -> int:
    from .data import Rows, encode, read_rows
    from .evaluate import eval_loss, exact_match

    if (args.adapter is None) == (args.base is None):
        raise LorakitError("give either an adapter folder or --base MODEL")
    spec = args.data or _run_data_spec(args.adapter)
    if not spec:
        raise LorakitError("say which data to evaluate on with --data FILE or --data task:NAME")
    model, tok = load_for_inference(args.adapter, args.base or args.model, args.dtype,
                                    args.trust_remote_code)
    rows = read_rows(spec, "test")
    enc = encode(rows, tok, "auto", args.max_seq_len)
    result = {"data": spec, "examples": len(enc.examples),
              "loss": eval_loss(model, enc.examples, tok.pad_token_id)}
    metric = args.metric or ("exact_match" if spec.startswith("task:") else "none")
    if metric == "exact_match":
        if enc.fmt == "text":
            raise LorakitError("exact_match needs rows with a reference answer, not plain text")
        result["exact_match"] = exact_match(model, tok, enc.rows, enc.fmt, args.limit)
    if enc.skipped:
        result["skipped_rows"] = len(enc.skipped)
        print(Rows(enc.rows, enc.skipped, spec).report(), file=sys.stderr)
    print(json.dumps(result))
    return 0


# ---- generate / chat ----------------------------------------------------------------------

def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--no-chat-template", action="store_true",
                   help="send the prompt as raw text")
    _add_model_arg(p)


@command("generate", "generate a completion: lorakit generate ADAPTER \"prompt\"")
def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder, or 'none' with --model for the base model")
    p.add_argument("prompt")
    _gen_args(p)


def _complete(model, tok, messages: list[dict], args) -> str:
    import torch

    if args.no_chat_template or not getattr(tok, "chat_template", None):
        text = "\n".join(m["content"] for m in messages)
    else:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    kw = {"do_sample": args.temperature > 0}
    if args.temperature > 0:
        kw["temperature"] = args.temperature
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens,
                             pad_token_id=tok.pad_token_id, **kw)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _adapter_or_none(a: str) -> Optional[str]:
    return None if a == "none" else a


def run_generate(args) -> int:
    model, tok = load_for_inference(_adapter_or_none(args.adapter), args.model, args.dtype,
                                    args.trust_remote_code)
    print(_complete(model, tok, [{"role": "user", "content": args.prompt}], args))
    return 0


@command("chat", "chat with an adapter in the terminal (empty line or Ctrl-D ends)")
def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder, or 'none' with --model for the base model")
    _gen_args(p)


def run_chat(args) -> int:
    model, tok = load_for_inference(_adapter_or_none(args.adapter), args.model, args.dtype,
                                    args.trust_remote_code)
    history: list[dict] = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        reply = _complete(model, tok, history, args)
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}", flush=True)
    return 0


# ---- merge --------------------------------------------------------------------------------

@command("merge", "merge an adapter into its base and save a plain transformers model folder")
def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("--out", required=True, help="output folder")
    _add_model_arg(p)


def run_merge(args) -> int:
    from .io import save_merged

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise LorakitError(f"{out} exists and is not empty; choose another --out")
    model, tok = load_for_inference(args.adapter, args.model, args.dtype, args.trust_remote_code)
    if getattr(model, "lorakit_state", None) is None:
        raise LorakitError(f"{args.adapter} is already a full model; nothing to merge")
    save_merged(model, out, tok)
    print(f"merged model: {out}")
    return 0
