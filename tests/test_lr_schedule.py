"""The LR schedule comes from transformers.get_scheduler: warmup, then linear / cosine decay to the floor over
the schedule's steps (RecLoRA: linear over schedule_epochs, no warmup), or constant."""

from __future__ import annotations

import math
import types

import numpy as np
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


def test_weight_decay_reaches_router_and_projector_only():
    """trainer.weight_decay decays the gates (router) and the hybrid projector, never the LoRA bank."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.hybrid import HybridLM
    from trainer.lora import MixtureLoraConfig, build_personalized_model

    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    )
    cfg = MixtureLoraConfig(
        mode="ilora", target_modules=["q_proj", "v_proj"], r=4, alpha=8, num_experts=2, cond_dim=8, gate_lr_mult=0.3
    )
    pm = build_personalized_model(base, cfg)
    groups = pm.optimizer_param_groups(1e-3, weight_decay=0.0, gate_weight_decay=1e-5)
    assert [g["weight_decay"] for g in groups] == [0.0, 1e-5] and groups[1]["lr"] == pytest.approx(3e-4)
    hybrid = HybridLM(pm, np.arange(5), torch.zeros(5, 8), slot_token_ids=[1, 2], text_token_id=3)
    groups = hybrid.optimizer_param_groups(1e-3, weight_decay=0.0, gate_weight_decay=1e-5)
    assert [g["weight_decay"] for g in groups] == [0.0, 1e-5, 1e-5] and groups[2]["name"] == "projector"
