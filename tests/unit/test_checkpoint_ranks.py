"""Each process of a run restores its own RNG states on resume (dropout masks, data
augmentation continue as they would have), and a checkpoint written by fewer processes gives
the extra ones the first process's."""

from __future__ import annotations

import random

import torch
from torch import nn

from lorakit.training.checkpoint import _write_checkpoint, load_checkpoint


def _one_checkpoint(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    states = []
    for seed in (11, 22):  # what two processes held
        torch.manual_seed(seed)
        random.seed(seed)
        v, internal, gauss = random.getstate()
        states.append({"torch": torch.get_rng_state(), "python": [v, list(internal), gauss]})
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    path = tmp_path / "checkpoints" / "step-000001"
    _write_checkpoint(
        path,
        params,
        {},
        {"param_groups": opt.state_dict()["param_groups"], "scalars": {}},
        {},
        states,
        sched,
        1,
        None,
    )
    return path, model, opt, sched, states


def test_each_rank_restores_its_own_rng(tmp_path):
    path, model, opt, sched, states = _one_checkpoint(tmp_path)
    for rank in (0, 1, 3):  # rank 3: the checkpoint had 2 processes; it takes rank 0's
        torch.manual_seed(999)
        random.seed(999)
        load_checkpoint(path, model, opt, sched, rank=rank)
        want = states[rank if rank < 2 else 0]
        assert torch.equal(torch.get_rng_state(), want["torch"])
        assert list(random.getstate()[1]) == want["python"][1]
