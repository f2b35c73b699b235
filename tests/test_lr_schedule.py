"""The LR schedule comes from transformers.get_scheduler: warmup, then linear / cosine decay to the floor over
the schedule's steps (RecLoRA: linear over schedule_epochs, no warmup), or constant."""

from __future__ import annotations

import math
import types

import pytest
import torch

from trainer.engine import lr_scheduler


def _multipliers(schedule: str, warmup_ratio: float, min_lr_ratio: float, total: int = 100) -> list[float]:
    t = types.SimpleNamespace(schedule=schedule, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=3e-4)
    sched = lr_scheduler(opt, t, total)
    seen = []
    for _ in range(total + 1):
        seen.append(opt.param_groups[0]["lr"] / 3e-4)
        opt.step()
        sched.step()
    return seen


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_linear_decay_without_warmup(floor):
    m = _multipliers("linear", 0.0, floor)
    assert m[0] == pytest.approx(1.0)
    for k in (25, 50, 75, 100):
        assert m[k] == pytest.approx(floor + (1 - floor) * (1 - k / 100), abs=1e-9)


def test_cosine_to_a_floor_after_warmup():
    m = _multipliers("cosine", 0.1, 0.2)
    assert m[0] == 0.0 and m[5] == pytest.approx(0.5) and m[10] == pytest.approx(1.0)
    for k in (10, 55, 100):
        p = (k - 10) / 90
        assert m[k] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * p)), abs=1e-9)


def test_constant_after_warmup():
    m = _multipliers("constant", 0.2, 0.0)
    assert m[10] == pytest.approx(0.5) and all(x == pytest.approx(1.0) for x in m[20:])
