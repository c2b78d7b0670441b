"""Subcommands train, eval, generate, chat, merge, export and methods.

Each parses its arguments and calls one library function.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .. import peft_format
from ..config import METRIC_NAMES, RunConfig, config_reference, load_run_config, split_config_args
from ..errors import LorakitError
from ..export import MODEL_TARGET, TARGETS, export
from ..export import describe as describe_export
from ..files import check_output
from ..gguf_export import LLAMA_QUANTIZE, export_gguf_model
from ..gguf_export import describe as describe_model_export
from ..gguf_model import OUTTYPES
from ..registry import describe
from ..training.evaluation import _device, generate_answers, measure, stop_token_ids
from ..training.formats import render
from ..training.loop import train
from ..training.runtime import resolve_precision
from ..training.session import AdapterBuild, eval_rows, evaluate, inference_device


def _stderr(line: str) -> None:
    """A log line on stderr, above a progress bar that may be showing (tqdm.write)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


# ---- train --------------------------------------------------------------------------------


def train_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = config_reference()
    p.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG|key=value",
        help="an optional YAML run config, then dotted overrides such as "
        "adapter.method=dora train.max_steps=200 data.train=my.jsonl",
    )


def run_train(args) -> int:
    cfg = load_run_config(*split_config_args(args.items))
    summary = train(cfg, log=_stderr)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # one process of several: the first prints the results
    if summary.get("tuned") is not None:
        print(before_after_table(summary, Path(cfg.output_dir)))
    print(f"adapter: {Path(cfg.output_dir) / 'adapter'}")
    return 0


#: rows of the before/after table, in order, with their number format
TABLE_KEYS = (
    ("exact_match", "{:.4f}"),
    ("normalized_match", "{:.4f}"),
    ("f1", "{:.4f}"),
    ("number", "{:.4f}"),
    ("valid_loss", "{:.4f}"),
    ("valid_perplexity", "{:.3f}"),
    ("general_text_loss", "{:.4f}"),
)


def before_after_table(summary: dict, run_dir: Path | None = None) -> str:
    """The base and tuned metrics side by side, how answers were generated and scored, any
    answers cut by the cap, and where the predictions behind the figures are."""
    base, tuned = summary.get("base") or {}, summary.get("tuned") or {}
    headline = tuned.get("metric")
    rows = [f"{'metric':<24}{'base':>10}{'tuned':>10}"]
    for k, fmt in TABLE_KEYS:
        if k not in tuned:
            continue
        b = fmt.format(base[k]) if k in base else "-"
        name = f"{k} *" if k == headline else k
        rows.append(f"{name:<24}{b:>10}{fmt.format(tuned[k]):>10}")
    gen = tuned.get("generation")
    if gen:
        rows.append(
            f"* headline metric. Answers: greedy, until the model's end-of-turn token "
            f"(at most {gen['max_new_tokens']} new tokens), on {gen['examples']} "
            "held-out examples."
        )
        for label, m in (("base", base), ("tuned", tuned)):
            note = (m.get("generation") or {}).get("cut_note")
            if note:
                rows.append(
                    f"WARNING ({label}): {note}; those answers count as generated "
                    "so far (raise eval.max_new_tokens)."
                )
        where = [
            f"{label} {run_dir / m['predictions'] if run_dir else m['predictions']}"
            for label, m in (("base", base), ("tuned", tuned))
            if m.get("predictions")
        ]
        if where:
            rows.append("predictions: " + ", ".join(where))
    return "\n".join(rows)


# ---- loading an adapter for inference -----------------------------------------------------


def _add_model_arg(
    p: argparse.ArgumentParser,
    dtype_default: str | None = "fp32",
    dtype_help: str = "weights dtype for inference",
) -> None:
    p.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    p.add_argument(
        "--dtype", default=dtype_default, choices=["fp32", "bf16", "fp16"], help=dtype_help
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let transformers run the model repository's code",
    )


def load_for_inference(
    adapter: str | None, model_name: str | None, dtype, trust_remote_code: bool = False
):
    """(model, tokenizer) for an adapter folder (or a full fine-tuned model folder), or the
    base model alone when ``adapter`` is None, read once in ``dtype`` onto the GPU when there
    is one. A QLoRA adapter goes onto the 16-bit base."""
    folder = adapter_folder(adapter) if adapter is not None else None
    return AdapterBuild(
        RunConfig(), dtype, inference_device(), folder, model_name, trust_remote_code
    ).load()


# ---- eval ---------------------------------------------------------------------------------


def eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", nargs="?", help="adapter folder, or a run folder (omit with --base)")
    p.add_argument("--base", help="evaluate this base model alone")
    p.add_argument(
        "--data",
        help="a data file or task:NAME (default: the run's own held-out "
        "rows, recorded in <run>/heldout.json: never rows it trained on)",
    )
    p.add_argument(
        "--metric",
        choices=[*METRIC_NAMES, "none"],
        default=None,
        help="headline metric (default: the run's eval.metric); all are reported",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="examples for the generation metric (default: the run's eval.limit)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="cap on generated tokens per answer (default: longest reference + 16)",
    )
    p.add_argument(
        "--predictions",
        metavar="FILE",
        help="write every answer (prompt, reference, prediction, metrics, cut) "
        "to FILE as JSON lines",
    )
    p.add_argument("--max-seq-len", type=int, default=None)
    _add_model_arg(
        p, dtype_default=None, dtype_help="compute precision (default: the run's, else fp32)"
    )


def adapter_folder(arg: str) -> str:
    """The adapter folder a command line names: the folder itself, or a run folder's
    ``adapter/``; a missing folder is the first thing said."""
    return peft_format.adapter_folder(arg)


def _run_folder(adapter: str | None) -> Path | None:
    """The run folder an adapter belongs to (it holds config.yaml), if any."""
    return peft_format.run_folder(adapter)


def _eval_config(run_dir: Path | None, args):
    """The run's config (or the defaults) with the command line's eval settings on top."""
    cfg = load_run_config(str(run_dir / "config.yaml"), recorded=True) if run_dir else RunConfig()
    ev = {
        "metric": None if args.metric == "none" else args.metric,
        "limit": args.limit,
        "max_new_tokens": args.max_new_tokens,
    }
    upd = {k: v for k, v in ev.items() if v is not None or (k == "metric" and args.metric)}
    if upd:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update=upd)})
    if args.max_seq_len:
        cfg = cfg.model_copy(
            update={"data": cfg.data.model_copy(update={"max_seq_len": args.max_seq_len})}
        )
    return cfg


def run_eval(args) -> int:
    if (args.adapter is None) == (args.base is None):
        raise LorakitError("give either an adapter folder or --base MODEL")
    if args.predictions:
        check_output(args.predictions, "--predictions", folder=False)
    adapter = adapter_folder(args.adapter) if args.adapter is not None else None
    run_dir = _run_folder(args.adapter)
    cfg = _eval_config(run_dir, args)
    dtype = resolve_precision(args.dtype or (cfg.train.precision if run_dir else "fp32"))
    build = AdapterBuild(
        cfg, dtype, inference_device(), adapter, args.base or args.model, args.trust_remote_code
    )
    print(json.dumps(evaluate(build, args.data, run_dir, args.predictions, _stderr)))
    return 0


# ---- generate / chat ----------------------------------------------------------------------


def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help="at most this many tokens; the answer ends at the model's end-of-turn "
        "token before that",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument(
        "--no-chat-template",
        action="store_true",
        help="render the prompt as 'role: content' lines (as lorakit trains on a "
        "tokenizer without a chat template) instead of the chat template",
    )
    _add_model_arg(p)


def generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder, or 'none' with --model for the base model")
    p.add_argument("prompt")
    _gen_args(p)


def _complete(model, tok, messages: list[dict], args) -> str:
    """The answer to ``messages``: the prompt rendered as training and evaluation render it
    (the chat template, or ``role: content`` lines without one), generated until the stop
    tokens evaluation stops on; greedy through evaluation's own generation function, so it
    is the answer ``lorakit eval --predictions`` records."""
    prompt = render(
        tok, messages, add_generation_prompt=True, use_template=not args.no_chat_template
    )
    if args.temperature <= 0:
        return generate_answers(model, tok, [prompt], args.max_new_tokens, batch_size=1)[0].text
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(_device(model))
    stops = stop_token_ids(model, tok)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=args.max_new_tokens,
            do_sample=True,
            temperature=args.temperature,
            eos_token_id=stops or None,
            pad_token_id=tok.pad_token_id,
        )
    row = out[0, enc["input_ids"].shape[1] :].tolist()
    end = next((i for i, t in enumerate(row) if t in stops), len(row))
    return tok.decode(row[:end], skip_special_tokens=True)


def _adapter_or_none(a: str) -> str | None:
    return None if a == "none" else a


def run_generate(args) -> int:
    model, tok = load_for_inference(
        _adapter_or_none(args.adapter), args.model, args.dtype, args.trust_remote_code
    )
    print(_complete(model, tok, [{"role": "user", "content": args.prompt}], args))
    return 0


def chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder, or 'none' with --model for the base model")
    _gen_args(p)


def run_chat(args) -> int:
    model, tok = load_for_inference(
        _adapter_or_none(args.adapter), args.model, args.dtype, args.trust_remote_code
    )
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


def merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("--out", required=True, help="output folder")
    _add_model_arg(p)


def run_merge(args) -> int:
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()):
        raise LorakitError(f"{out} exists and is not empty; choose another --out")
    check_output(out, "--out")
    model, tok = load_for_inference(args.adapter, args.model, args.dtype, args.trust_remote_code)
    if getattr(model, "lorakit_state", None) is None:
        raise LorakitError(f"{args.adapter} is already a full model; nothing to merge")
    peft_format.save_merged(model, out, tok)
    print(f"merged model: {out}")
    return 0


# ---- export -------------------------------------------------------------------------------


def export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter folder, or a run folder")
    p.add_argument(
        "--to",
        required=True,
        choices=[*TARGETS, MODEL_TARGET],
        help="lora: a PEFT LoRA adapter folder; vllm: the same, checked against "
        "vLLM's rules; gguf: a llama.cpp LoRA adapter file; gguf-model: the adapter "
        "merged into its base, as one GGUF model file for llama.cpp and Ollama",
    )
    p.add_argument("--out", required=True, help="the folder (lora, vllm) or .gguf file to write")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--rank",
        type=int,
        help="rank of the SVD for updates that are not B·A "
        "(DoRA); also caps exact layers (default: each layer's own rank)",
    )
    size.add_argument(
        "--energy",
        type=float,
        help="instead of --rank: per layer, the "
        "smallest rank keeping this fraction of the update's spectrum, e.g. 0.999",
    )
    p.add_argument(
        "--outtype",
        choices=[*OUTTYPES, *LLAMA_QUANTIZE],
        help="tensor type of a GGUF file (default: f32 for gguf, f16 for gguf-model); "
        "gguf: f32, f16, bf16, q8_0; gguf-model: also q5_1, q5_0, q4_1, q4_0, and the "
        "K-quants (q4_k_m, ...), which llama.cpp's own quantizer writes (llama-cpp-python)",
    )
    p.add_argument(
        "--ollama",
        action="store_true",
        help="gguf-model: also write an Ollama Modelfile beside the file",
    )
    p.add_argument(
        "--vocab-from",
        metavar="GGUF",
        help="gguf-model: copy the tokenizer from this GGUF file of the base model",
    )
    p.add_argument(
        "--no-heldout",
        action="store_true",
        help="given a run folder, skip the held-out metric of the original and the export",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let transformers run the model repository's code",
    )


def _heldout_evaluator(run_dir: Path):
    """evaluate(model, tok) -> the held-out figures of a run (its heldout.json), in fp32."""
    cfg = load_run_config(str(run_dir / "config.yaml"), recorded=True)
    labels = iter(("original", "export"))

    def evaluate(model, tok) -> dict:
        _, heldout = eval_rows(None, run_dir, cfg, tok, _stderr)
        m = measure(
            model,
            tok,
            heldout,
            cfg.eval,
            cfg.data.max_seq_len,
            torch.float32,
            next(labels, "export"),
            _stderr,
        )
        return {k: v for k, v in m.items() if isinstance(v, (int, float, str))}

    return evaluate


def run_export(args) -> int:
    if args.to == MODEL_TARGET:
        return _run_export_model(args)
    if args.ollama or args.vocab_from is not None:
        raise LorakitError("--ollama and --vocab-from apply to --to gguf-model")
    run_dir = _run_folder(args.adapter) if Path(args.adapter).is_dir() else None
    evaluate = None
    if run_dir is not None and not args.no_heldout and (run_dir / "heldout.json").is_file():
        evaluate = _heldout_evaluator(run_dir)
    report = export(
        args.adapter,
        args.out,
        args.to,
        args.rank,
        args.energy,
        args.outtype or "f32",
        args.model,
        evaluate=evaluate,
        trust_remote_code=args.trust_remote_code,
    )
    print(json.dumps(report.to_dict()) if args.json else "\n".join(describe_export(report)))
    return 0


def _run_export_model(args) -> int:
    if args.rank is not None or args.energy is not None:
        raise LorakitError(
            "--rank and --energy shape adapter exports; --to gguf-model merges exactly"
        )
    report = export_gguf_model(
        args.adapter,
        args.out,
        args.outtype or "f16",
        args.model,
        ollama=args.ollama,
        vocab_from=args.vocab_from,
        trust_remote_code=args.trust_remote_code,
        log=_stderr,
    )
    print(json.dumps(report.to_dict()) if args.json else "\n".join(describe_model_export(report)))
    return 0


# ---- methods ------------------------------------------------------------------------------


def methods_args(p: argparse.ArgumentParser) -> None:
    pass


def run_methods(args) -> int:
    print("\n".join(describe()))
    return 0
