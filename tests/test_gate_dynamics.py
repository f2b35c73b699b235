"""Why RecLoRA's gates start slowly, and the statistic that shows whether they personalize (issue #13).

With the paper's init (every meta-LoRA's B = 0) the first gate gradient is exactly zero: the gates can move only
once the bank has. Gate entropy alone cannot tell whether users get different mixtures; `gate_spread` can.
bench/gate_dynamics.py measures the whole course on a task only the gate input can solve."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.lora import MixtureLoraConfig, build_personalized_model
from trainer.telemetry import gate_stats

COND = 8


def personalized(num_experts: int = 4, temperature: float = 1.0, mode: str = "reclora"):
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    cfg = MixtureLoraConfig(
        mode=mode,
        target_modules=["q_proj", "v_proj"],
        r=4,
        alpha=8.0,
        num_experts=num_experts,
        temperature=temperature,
        gate_dropout=0.0,
        cond_dim=COND,
    )
    return build_personalized_model(base, cfg, seed=0)


def test_gate_spread_is_zero_for_identical_inputs_and_bounded():
    pm = personalized(num_experts=4, temperature=0.05)  # a low temperature: sharp, input-dependent gates
    same = gate_stats(pm, torch.ones(6, COND))
    assert same["gate_spread"] == pytest.approx(0.0, abs=1e-6)
    differ = gate_stats(pm, torch.randn(64, COND, generator=torch.Generator().manual_seed(1)))
    assert 0.05 < differ["gate_spread"] <= 1 - 1 / 4 + 1e-6
    assert differ["gate_entropy"] < math.log(4)
    assert sum(differ[f"expert_load_{i}"] for i in range(4)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("mode", ["reclora", "ilora"])
def test_first_gate_gradient_is_zero_with_the_papers_b_zero_init(mode):
    # Both methods start from B = 0 (RecLoRA's meta-LoRAs, iLoRA's rank blocks): the router's first step is idle.
    pm = personalized(mode=mode)
    gen = torch.Generator().manual_seed(2)
    ids, cond = torch.randint(0, 100, (4, 6), generator=gen), torch.randn(4, COND, generator=gen)
    target = torch.randint(0, 100, (4,), generator=gen)
    opt = torch.optim.AdamW(pm.optimizer_param_groups(1e-2))

    def step() -> tuple[float, float]:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(pm(input_ids=ids, cond=cond).logits[:, -1], target).backward()
        gate = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in pm.gates.parameters()))
        bank = math.sqrt(sum(float(p.grad.pow(2).sum()) for n, p in pm.trainable_parameters().items() if "lora_B" in n))
        opt.step()
        return gate, bank

    gate0, bank0 = step()
    assert gate0 == 0.0 and bank0 > 0  # B = 0: the loss does not depend on the mixture yet, only B learns
    gate1, _ = step()
    assert gate1 > 0  # after one bank update the mixture matters and the gates get a gradient
