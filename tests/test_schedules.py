"""The learning-rate schedules are Hugging Face's: the same multiplier at every step as transformers.get_scheduler."""
import math

import pytest
import torch
from transformers import get_scheduler

from immunize.lightning_modules.modeling.optim import build_scheduler

HF_NAME = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def lrs(make, steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("schedule", sorted(HF_NAME))
@pytest.mark.parametrize("total,ratio", [(1, 0.0), (10, 0.0), (10, 0.1), (7, 0.1), (50, 0.25), (3, 0.5), (100, 0.03)])
def test_every_step_matches_transformers_get_scheduler(schedule, total, ratio):
    warmup = math.ceil(total * ratio)  # what transformers' Trainer passes for warmup_ratio
    ours = lrs(lambda opt: build_scheduler(opt, schedule, total, ratio), total + 2)
    theirs = lrs(lambda opt: get_scheduler(HF_NAME[schedule], opt, num_warmup_steps=warmup,
                                           num_training_steps=total), total + 2)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    if warmup:
        assert ours[0] == 0.0  # warmup starts from 0, not from lr / warmup_steps
