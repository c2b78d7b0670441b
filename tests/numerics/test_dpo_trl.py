"""DPO against TRL's DPOTrainer (trl 1.16, the reference; a test dependency), fp32, on the
tiny Llama with SmolLM2's tokenizer and chat template and a LoRA adapter (r 4, q/v):

- the token ids of every pair equal TRL's, in the four formats (standard and conversational,
  explicit and implicit prompt);
- at step 0, from the same adapter weights (B non-zero, so policy and reference differ) and
  the same batch: the loss, each pair's chosen and rejected rewards and every LoRA gradient
  within 1e-5, for the sigmoid and ipo losses (and robust with label smoothing);
- the loss curve of 10 steps (``lorakit train train.objective=dpo`` against
  ``DPOTrainer.train``, the same pair order) within 1e-4 relative, and TRL's metrics.

TRL's settings that change its numbers, and what this test sets: ``bf16=False`` (its default
is bf16 autocast, even on CPU), ``use_cpu=True``, the learning rate (its default 1e-6 moves
nothing), a linear schedule without warm-up (TRL's default; lorakit's is cosine), the pair
order (TRL's seedable sampler draws ``randperm(N, seed + epoch)``, lorakit's
``randperm(N, seed * 1000003 + epoch)``: ``data_seed`` is set to match), no gradient
checkpointing (the same numbers in fp32, slower). Everything else is TRL's default.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.config import load_run_config
from lorakit.training.data import Rows
from lorakit.training.dpo import DPOObjective, pair_metric_sums
from lorakit.training.preference import encode_pairs
from tests.conftest import tiny_run_args

trl = pytest.importorskip("trl", reason="TRL (the DPO reference) is a test dependency")

RAW = [
    ("What color is the sky?", "It is blue.", "It is green and purple."),
    ("Name a fruit.", "An apple.", "A chair."),
    ("What is two plus two?", "Two plus two is four.", "Five."),
    ("Say hello in French.", "Bonjour.", "Hola, amigo, como estas?"),
    ("Which animal barks?", "A dog barks.", "A fish barks loudly every morning."),
    ("What do bees make?", "Bees make honey.", "Bees make cars."),
    ("How many legs does a spider have?", "Eight.", "A spider has three legs."),
    ("What is the capital of France?", "Paris is the capital of France.", "London."),
]
SEED = 1  # lorakit's train.seed; TRL's data_seed = SEED * 1000003 gives the same pair order
TOL = 1e-5


def _pairs(fmt: str) -> list[dict]:
    out = []
    for p, c, r in RAW:
        user = [{"role": "user", "content": p}]
        if fmt == "standard":
            out.append({"prompt": p, "chosen": " " + c, "rejected": " " + r})
        elif fmt == "standard_implicit":
            out.append({"chosen": p + " " + c, "rejected": p + " " + r})
        elif fmt == "conversational":
            out.append(
                {
                    "prompt": user,
                    "chosen": [{"role": "assistant", "content": c}],
                    "rejected": [{"role": "assistant", "content": r}],
                }
            )
        else:
            out.append(
                {
                    "chosen": user + [{"role": "assistant", "content": c}],
                    "rejected": user + [{"role": "assistant", "content": r}],
                }
            )
    return out


def _trainer(
    model_dir: Path,
    out: Path,
    pairs: list[dict],
    loss: str | list[str],
    eps: float = 0.0,
    order="random",
    weights: list[float] | None = None,
):
    """TRL's DPOTrainer with a LoRA whose B is non-zero (seeded) before step 0; ``order``:
    ``random`` (lorakit's order, through data_seed) or ``sequential`` (pairs 0, 1 first)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    cfg = DPOConfig(
        output_dir=str(out / "trl"),
        bf16=False,
        use_cpu=True,
        max_steps=10,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=0,
        data_seed=SEED * 1_000_003,
        train_sampling_strategy=order,
        gradient_checkpointing=False,
        beta=0.1,
        loss_type=[loss] if isinstance(loss, str) else loss,
        loss_weights=weights,
        label_smoothing=eps,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, bias="none"
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = DPOTrainer(
        model=model,
        args=cfg,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tok,
        peft_config=lora,
    )
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    trainer.model.save_pretrained(str(out / "initial"))
    return trainer, tok


def _ours(model_dir: Path, adapter: Path):
    base, tok = lk.load_model(str(model_dir))
    return lk.load_adapter(base, str(adapter)).train(), tok


class _Run:
    """What DPOObjective.micro_loss needs of a training run."""

    def __init__(self, tok):
        from types import SimpleNamespace

        from lorakit.training.batching import collate

        self.accelerator = SimpleNamespace(device=torch.device("cpu"))
        self.collate = lambda seqs: collate(seqs, tok.pad_token_id)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.mark.parametrize(
    "fmt", ["standard", "standard_implicit", "conversational", "conversational_implicit"]
)
def test_pairs_become_the_token_ids_trl_makes(model_dir, tmp_path, fmt):
    pairs = _pairs(fmt)
    trainer, tok = _trainer(model_dir, tmp_path, pairs, "sigmoid")
    ours, _, skipped = encode_pairs(Rows([dict(p) for p in pairs], [], "pairs"), tok, 1024)
    assert not skipped
    for i, pair in enumerate(ours):
        theirs = trainer.train_dataset[i]
        prompt = list(theirs["prompt_ids"])
        for side in ("chosen", "rejected"):
            ids, labels = pair[side]["input_ids"], pair[side]["labels"]
            assert ids == prompt + list(theirs[f"{side}_ids"]), (fmt, i, side)
            assert labels[: len(prompt)] == [-100] * len(prompt)
            assert labels[len(prompt) :] == list(theirs[f"{side}_ids"])


@pytest.mark.parametrize(
    "loss,eps,weights",
    [
        ("sigmoid", 0.0, None),
        ("ipo", 0.0, None),
        ("robust", 0.1, None),
        (["sigmoid", "sft"], 0.0, [1.0, 0.5]),  # RPO: DPO plus the chosen answers' NLL
    ],
)
def test_step_zero_loss_rewards_and_gradients_equal_trl(model_dir, tmp_path, loss, eps, weights):
    pairs = _pairs("conversational")
    trainer, tok = _trainer(
        model_dir, tmp_path, pairs, loss, eps, order="sequential", weights=weights
    )
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.train()
    their_loss = trainer.compute_loss(model, batch)
    their_loss.backward()
    theirs = {
        n.replace("base_model.model.", "").replace(".default", "").removesuffix(".weight"): p.grad
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    metrics = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items()}

    ours, _ = _ours(model_dir, tmp_path / "initial")
    # the first batch of TRL's sequential sampler: pairs 0 and 1
    encoded, _, _ = encode_pairs(Rows([dict(p) for p in pairs[:2]], [], "pairs"), tok, 1024)
    cfg = load_run_config(
        None,
        [
            "train.objective=dpo",
            f"dpo.loss={loss if isinstance(loss, str) else '[' + ','.join(loss) + ']'}",
            f"dpo.label_smoothing={eps}",
            f"dpo.loss_weights={weights if weights else 'null'}",
        ],
    )
    objective = DPOObjective(cfg.dpo)
    s, sums = objective.micro_loss(_Run(tok), ours, ours, encoded)
    mean = s / len(encoded)
    mean.backward()
    assert abs(mean.item() - their_loss.item()) <= TOL * max(1.0, abs(their_loss.item()))
    for name, value in zip(objective.metrics, (sums / len(encoded)).tolist()):
        assert abs(value - metrics[name]) <= TOL * max(1.0, abs(metrics[name])), name
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads.keys() == theirs.keys()
    for n, g in grads.items():
        assert (g - theirs[n]).abs().max() <= TOL, n


@pytest.mark.slow  # two trainings of 10 steps each, TRL's and lorakit's
@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_ten_steps_follow_trls_loss_curve(model_dir, tmp_path, capsys, loss):
    pairs = _pairs("conversational")
    trainer, _ = _trainer(model_dir, tmp_path, pairs, loss)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "ours"
    args = tiny_run_args(
        model_dir,
        out,
        "train.objective=dpo",
        f"dpo.loss={loss}",
        f"data.train={data}",
        "data.valid_ratio=0",
        f"train.init_adapter={tmp_path / 'initial'}",
        "adapter.target_modules=[q_proj,v_proj]",
        "adapter.alpha=8",
        "adapter.dropout=0",
        "train.batch_size=2",
        "train.max_steps=10",
        "train.lr=1e-2",
        "train.schedule=linear",
        "train.warmup_ratio=0",
        f"train.seed={SEED}",
        "train.save_every=0",
        "eval.compare_base=false",
    )
    assert main(["train", *args]) == 0, capsys.readouterr().err[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ours = [r for r in rows if r.get("phase") == "train"]
    assert len(ours) == len(logs) == 10
    for a, b in zip(ours, logs):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a["step"], a, b)
        for name in ("rewards/chosen", "rewards/margins", "rewards/accuracies"):
            assert abs(a[name] - b[name]) <= 1e-4 * max(1.0, abs(b[name])), (name, a, b)


def test_metric_sums_are_trls_means():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    rc, rr = torch.tensor([-3.5, -5.0]), torch.tensor([-3.0, -4.5])
    sums = pair_metric_sums(pc, pr, rc, rr, beta=0.1) / 2
    assert sums.tolist() == pytest.approx([0.025, -0.025, 0.5, 0.05, -4.0, -4.0])
