"""trainer.telemetry's throughput accounting: model FLOPs of a LoRA step (hand count and a FLOP counter),
the spec-peak table, and MFU."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from trainer import telemetry


def small_config(**kw) -> LlamaConfig:
    base = dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=500,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return LlamaConfig(**base)


def test_step_flops_hand_count():
    c = small_config()
    d, d_kv, ff, layers, vocab = 64, 16, 160, 3, 500  # d_kv = 2 kv heads x head dim 8
    n_frozen = layers * (d * d + d * d_kv + d * d_kv + d * d + 3 * d * ff)  # q, k, v, o, gate, up, down
    assert telemetry.frozen_linear_params(c) == n_frozen
    trainable = 1234
    lengths, head = [10, 30], [3, 3]  # two sequences' real lengths; LM head on 3 positions each
    tokens, seq_sq = sum(lengths), sum(s * s for s in lengths)
    want = (4 * n_frozen + 6 * trainable) * tokens + 12 * layers * d * seq_sq + 4 * vocab * d * sum(head)
    assert telemetry.step_flops(c, tokens, seq_sq, sum(head), trainable) == want
    # per token of uniform sequences
    per = telemetry.flops_per_token(c, 20, 3, trainable)
    assert per == pytest.approx(((4 * n_frozen + 6 * trainable) * 20 + 12 * layers * d * 400 + 4 * vocab * d * 3) / 20)


def test_head_dim_from_config():
    """A config whose head_dim is not hidden / heads (Gemma-style) counts the projections it really has."""
    c = small_config(head_dim=16)  # 8 heads x 16 = 128 wide attention on a 64 hidden
    layers, d, ff = 3, 64, 160
    assert telemetry.frozen_linear_params(c) == layers * (2 * d * 128 + 2 * d * 32 + 3 * d * ff)


def test_step_flops_matches_a_flop_counter():
    """Forward + backward of a frozen base with a trainable LoRA, counted by torch's FlopCounterMode, agrees
    with step_flops (the counter does not see layer 0's skipped input gradient or the elementwise ops)."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaForCausalLM

    c = small_config(attn_implementation="eager")
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(c), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seq, batch, keep = 64, 2, 3
    ids = torch.randint(0, 500, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, logits_to_keep=keep)
        out.logits.float().sum().backward()
    counted = counter.get_total_flops()
    model_flops = telemetry.step_flops(c, batch * seq, batch * seq * seq, batch * keep, trainable)
    assert counted == pytest.approx(model_flops, rel=0.05), (counted, model_flops)


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H200", 989),
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100 80GB PCIe", 312),
        ("NVIDIA L40S", 362),
        ("NVIDIA L4", 121),
        ("NVIDIA A10", 125),
        ("NVIDIA A10G", None),
        ("Tesla T4", None),
        ("", None),
    ],
)
def test_spec_peak_lookup(name, tflops):
    got = telemetry.spec_peak_flops(name)
    assert got == (None if tflops is None else tflops * 1e12)


def test_device_peaks_override_and_cpu():
    assert telemetry.device_peaks("cpu", measured=1e11) == {"spec": None, "measured": 1e11}
    assert telemetry.device_peaks("cpu", peak_tflops=2.0, measured=1e11) == {"spec": 2e12, "measured": 1e11}
    assert telemetry.device_peaks("cpu")["measured"] > 0  # timed fp32 matmul


def test_mfu():
    assert telemetry.mfu(5e14, 1e15, world=2) == 0.25
    assert telemetry.mfu(5e14, None) is None


def test_measuring_the_peak_leaves_the_training_rng_alone():
    # It runs after the seed (or the restored RNG state) on every worker: a draw from the global generator
    # would make a resumed run differ from the uninterrupted one.
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    telemetry.measured_peak_flops("cpu", n=64, reps=1)
    assert torch.equal(torch.rand(4), expected)
