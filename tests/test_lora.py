"""Mixture-LoRA (RecLoRA / iLoRA) on PEFT: math against reference formulations, model-level invariants,
activation checkpointing, generation, save/load and per-user export to stock PEFT. CPU, fp32, no mocks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest_lora_helpers import (
    ILORA_TARGETS,
    RECLORA_TARGETS,
    batch,
    max_rel_err,
    randomize_bank,
    ref_ilora_loop,
    ref_reclora_bmm,
    tiny_llama,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from trainer import export as export_mod
from trainer.lora import (
    MixtureLoraConfig,
    MixtureLoraLinear,
    build_personalized_model,
    load_personalized,
    use_per_sample_weights,
)

COND = 12


def config(mode: str, **overrides) -> MixtureLoraConfig:
    defaults = {
        "reclora": dict(target_modules=RECLORA_TARGETS, r=4, alpha=8, num_experts=3),
        "ilora": dict(target_modules=ILORA_TARGETS, r=8, alpha=32, num_experts=4, dropout=0.0),
        "plain": dict(target_modules=RECLORA_TARGETS, r=8, alpha=16, num_experts=1),
    }[mode]
    values = {"mode": mode, "cond_dim": COND, "gate_dropout": 0.0, **defaults, **overrides}
    return MixtureLoraConfig(**values)


class Toy(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d_in, d_out, bias=True)

    def forward(self, x):
        return self.q_proj(x)


def toy_layer(mode: str, num_experts: int, r: int, d_in: int = 24, d_out: int = 40, **overrides):
    cfg = MixtureLoraConfig(
        mode=mode, target_modules=["q_proj"], r=r, alpha=16.0, num_experts=num_experts, cond_dim=4, **overrides
    )
    lora_config = cfg.to_lora_config()
    lora_config.task_type = None  # a bare nn.Module, not a causal LM
    torch.manual_seed(0)
    layer = get_peft_model(Toy(d_in, d_out), lora_config).base_model.model.q_proj
    randomize_bank(layer)
    return cfg, layer


def weights(layer):
    base = layer.base_layer
    return (base.weight, base.bias, layer.lora_A["default"].weight, layer.lora_B["default"].weight)


def random_inputs(num_experts, batch_size=3, tokens=5, d_in=24, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, tokens, d_in, generator=generator)
    gate = torch.softmax(torch.randn(batch_size, num_experts, generator=generator), -1)
    return x, gate


# ---- layer math against the reference formulations ----------------------------------------------------------------
def test_ilora_layer_matches_expert_loop():
    cfg, layer = toy_layer("ilora", num_experts=4, r=8)
    x, gate = random_inputs(4)
    layer.gate = gate
    w0, bias, a, b = weights(layer)
    want = ref_ilora_loop(x, w0, a, b, gate, cfg.scaling, 4) + bias
    assert cfg.scaling == 16.0 / 2  # alpha / (r_total / K)
    assert max_rel_err(layer(x), want) <= 1e-5


@pytest.mark.parametrize("path", ["per_sample", "rank_space", "auto"])
def test_reclora_paths_match_bmm_reference(path):
    cfg, layer = toy_layer("reclora", num_experts=5, r=3, reclora_path=path)
    x, gate = random_inputs(5, tokens=7)
    layer.gate = gate
    w0, bias, a, b = weights(layer)
    want = ref_reclora_bmm(x, w0, a, b, gate, cfg.scaling, 5) + bias
    assert max_rel_err(layer(x), want) <= 1e-5


def test_reclora_paths_agree_in_values_and_gradients():
    results = {}
    for path in ("per_sample", "rank_space"):
        _, layer = toy_layer("reclora", num_experts=4, r=2, reclora_path=path)
        x, gate = random_inputs(4, tokens=6)
        x.requires_grad_(True)
        gate.requires_grad_(True)
        layer.gate = gate
        y = layer(x)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        _, _, a, b = weights(layer)
        results[path] = (y.detach(), x.grad, gate.grad, a.grad, b.grad)
    for got, want in zip(results["per_sample"], results["rank_space"]):
        assert max_rel_err(got, want) <= 1e-5


def test_mix_weights_is_not_mix_outputs():
    # (sum g B)(sum g A) != sum g_k B_k A_k: the two modes must stay distinct.
    _, layer = toy_layer("reclora", num_experts=4, r=2)
    x, gate = random_inputs(4)
    w0, bias, a, b = weights(layer)
    reclora = ref_reclora_bmm(x, w0, a, b, gate, 1.0, 4)
    ilora = ref_ilora_loop(x, w0, a, b, gate, 1.0, 4)
    assert max_rel_err(reclora, ilora) > 1e-2


def test_cost_rule_is_static_in_shapes():
    assert not use_per_sample_weights(1, 16)  # decode step: rank space
    assert use_per_sample_weights(256, 16)  # long prompt: per-sample weights
    assert not any(use_per_sample_weights(t, 1) for t in (1, 64, 4096))  # N = 1 is plain LoRA
    _, layer = toy_layer("reclora", num_experts=16, r=2)
    assert layer._per_sample(256) and not layer._per_sample(1)


def test_layer_without_gate_raises_naming_the_layer():
    _, layer = toy_layer("reclora", num_experts=2, r=2)
    with pytest.raises(RuntimeError, match="q_proj: mixture LoRA layer ran without a gate"):
        layer(torch.randn(2, 3, 24))
    layer.gate = torch.full((3, 2), 0.5)
    with pytest.raises(ValueError, match="gate has 3 rows but the input batch has 2"):
        layer(torch.randn(2, 3, 24))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="divisible by num_experts"):
        MixtureLoraConfig(mode="ilora", target_modules=["q_proj"], r=6, alpha=1, num_experts=4, cond_dim=2)
    with pytest.raises(ValueError, match="cond_dim"):
        MixtureLoraConfig(mode="reclora", target_modules=["q_proj"], r=8, alpha=1, num_experts=4)
    with pytest.raises(ValueError, match="mode must be one of"):
        MixtureLoraConfig(mode="moe", target_modules=["q_proj"], r=8, alpha=1)


# ---- model-level invariants ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["reclora", "ilora", "plain"])
def test_zero_b_gives_base_output_exactly(mode):
    base = tiny_llama(seed=0)
    model = build_personalized_model(tiny_llama(seed=0), config(mode)).eval()
    ids, mask, cond = batch()
    with torch.no_grad():
        assert torch.equal(model(ids, mask, cond).logits, base(input_ids=ids, attention_mask=mask).logits)


def _plain_twin(cfg: MixtureLoraConfig, source) -> nn.Module:
    """Stock PEFT LoRA with the given rank/alpha carrying `source`'s A and B."""
    plain = get_peft_model(
        tiny_llama(seed=0), LoraConfig(r=cfg.total_rank, lora_alpha=cfg.alpha, target_modules=cfg.target_modules)
    )
    state = {k: v for k, v in source.lm.state_dict().items() if "lora_" in k}
    missing = plain.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys
    return plain.eval()


@pytest.mark.parametrize("mode", ["reclora", "ilora"])
def test_single_expert_equals_plain_lora(mode):
    cfg = config(mode, num_experts=1, r=4, alpha=8)
    model = build_personalized_model(tiny_llama(seed=0), cfg).eval()
    randomize_bank(model)
    ids, mask, cond = batch()
    with torch.no_grad():
        got = model(ids, mask, cond).logits
        want = _plain_twin(cfg, model)(input_ids=ids, attention_mask=mask).logits
    assert max_rel_err(got, want) <= 1e-5


def test_ilora_uniform_gate_equals_plain_lora_at_alpha_over_r():
    cfg = config("ilora")
    model = build_personalized_model(tiny_llama(seed=0), cfg).eval()
    randomize_bank(model)
    with torch.no_grad():
        model.gates.shared.proj.weight.zero_()  # bias is 0 at init: softmax(0) = 1/K
    ids, mask, cond = batch()
    with torch.no_grad():
        got = model(ids, mask, cond).logits
        plain = _plain_twin(cfg, model)
        assert plain.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 32 / 8
        want = plain(input_ids=ids, attention_mask=mask).logits
    assert max_rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("mode", ["reclora", "ilora"])
def test_gradients_reach_every_expert_and_gate_but_not_base(mode):
    cfg = config(mode)
    model = build_personalized_model(tiny_llama(seed=0), cfg).train()
    randomize_bank(model)
    ids, mask, cond = batch()
    model(ids, mask, cond, labels=ids).loss.backward()
    trainable = set(model.trainable_parameter_names())
    r, n = cfg.rank_per_expert, cfg.num_experts
    for name, param in model.named_parameters():
        if name not in trainable:
            assert not param.requires_grad and param.grad is None, name
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        if ".lora_A." in name:
            assert all(block.abs().sum() > 0 for block in param.grad.view(n, r, -1)), name
        if ".lora_B." in name:
            assert all(block.abs().sum() > 0 for block in param.grad.view(-1, n, r).unbind(1)), name
    assert any(name.startswith("gates.") for name in trainable)


def test_trainable_list_is_the_single_source():
    model = build_personalized_model(tiny_llama(seed=0), config("reclora"))
    names = model.trainable_parameter_names()
    assert names == sorted(set(names), key=names.index)  # no duplicates
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert all(".lora_A." in n or ".lora_B." in n or n.startswith("gates.") for n in names)
    model.config.gate_lr_mult = 0.3
    groups = model.optimizer_param_groups(lr=1e-3, weight_decay=0.0, gate_weight_decay=1e-5)
    assert groups[1]["lr"] == pytest.approx(3e-4) and groups[1]["weight_decay"] == 1e-5
    assert sum(len(g["params"]) for g in groups) == len(names)


@pytest.mark.parametrize(
    "mode,use_reentrant", [("reclora", False), ("ilora", False), ("reclora", True), ("ilora", True)]
)
def test_activation_checkpointing_gives_same_gradients(mode, use_reentrant):
    # ("ilora", True): one gate tensor shared by every layer; as a closure capture of each reentrant checkpoint it
    # was backpropagated into once per layer ("Trying to backward through the graph a second time").
    cfg = config(mode, dropout=0.1, gate_dropout=0.1)
    grads = {}
    for checkpointing in (False, True):
        model = build_personalized_model(tiny_llama(seed=0), cfg).train()
        randomize_bank(model)
        if checkpointing:
            model.activation_checkpointing_enable(use_reentrant=use_reentrant)
        ids, mask, cond = batch()
        torch.manual_seed(123)  # same dropout masks in both runs (checkpoint replays the RNG state)
        model(ids, mask, cond, labels=ids).loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.trainable_parameters().items()}
        assert all(layer.gate is None for layer in model._layers.values())
    for name, grad in grads[False].items():
        assert max_rel_err(grads[True][name], grad) <= 1e-5, name


def test_plain_hf_checkpointing_fails_loudly_without_the_gate_context():
    model = build_personalized_model(tiny_llama(seed=0), config("reclora")).train()
    model.lm.get_base_model().activation_checkpointing_enable()  # bypasses PersonalizedLM: no gate on recompute
    ids, mask, cond = batch()
    loss = model(ids, mask, cond, labels=ids).loss
    with pytest.raises(RuntimeError, match="ran without a gate"):
        loss.backward()


def test_gates_are_cleared_even_when_forward_fails():
    model = build_personalized_model(tiny_llama(seed=0), config("ilora"))
    ids, mask, cond = batch()
    with pytest.raises(ValueError, match="gate has 3 rows but the input batch has 2"):
        model(ids[:2], mask[:2], cond)  # fails inside the first adapted layer, with the gates set
    assert all(layer.gate is None for layer in model._layers.values())
    with pytest.raises(ValueError, match="needs cond"):
        model(ids, mask, None)


def test_training_steps_reduce_loss():
    model = build_personalized_model(tiny_llama(seed=0), config("reclora")).train()
    optimizer = torch.optim.AdamW(model.optimizer_param_groups(lr=1e-2))
    ids, mask, cond = batch(num=4, length=10)
    losses = []
    for _ in range(5):
        loss = model(ids, mask, cond, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("mode", ["reclora", "ilora"])
def test_generation_uses_one_gate_across_decode_steps(mode):
    model = build_personalized_model(tiny_llama(seed=0), config(mode, reclora_path="auto")).eval()
    randomize_bank(model, std=1.0)
    ids, mask, cond = batch(num=2, length=6)
    out = model.generate(ids, mask, cond, max_new_tokens=4, do_sample=False, pad_token_id=0)
    # Greedy decoding without a KV cache, one full forward per step, must pick the same tokens.
    seq = ids
    with torch.no_grad():
        for _ in range(4):
            logits = model(seq, torch.ones_like(seq), cond).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    beams = model.generate(ids, mask, cond, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    assert beams.shape == (2, 9)
    assert all(layer.gate is None for layer in model._layers.values())


# ---- other architectures --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_causal_lms_with_linear_projections(arch, tmp_path):
    from transformers import (
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    cls, cfg_cls = {"qwen2": (Qwen2ForCausalLM, Qwen2Config), "mistral": (MistralForCausalLM, MistralConfig)}[arch]
    hf_config = cfg_cls(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )

    def fresh():
        torch.manual_seed(0)
        return cls(hf_config).eval()

    model = build_personalized_model(fresh(), config("ilora")).eval()
    randomize_bank(model)
    ids, mask, cond = batch(vocab=128)
    model.save_adapter(tmp_path / "adapter")
    user = export_mod.export_user_adapter(tmp_path / "adapter", cond[0], tmp_path / "user")
    with torch.no_grad():
        got = model(ids[:1], mask[:1], cond[:1]).logits
        want = PeftModel.from_pretrained(fresh(), user).eval()(input_ids=ids[:1], attention_mask=mask[:1]).logits
    assert (got - want).abs().max().item() <= 1e-4


# ---- save / load / export -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["reclora", "ilora", "plain"])
def test_save_load_round_trip_trainable_only(mode, tmp_path):
    model = build_personalized_model(tiny_llama(seed=0), config(mode)).eval()
    randomize_bank(model)
    if model.gates is not None:
        with torch.no_grad():
            for p in model.gates.parameters():
                p.add_(0.1)
    model.save_adapter(tmp_path)
    bank = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert bank and all(".lora_A." in k or ".lora_B." in k for k in bank)
    assert sum(t.numel() for t in bank.values()) + (
        sum(t.numel() for t in load_file(str(tmp_path / "gates.safetensors")).values()) if mode != "plain" else 0
    ) == sum(p.numel() for p in model.trainable_parameters().values())
    meta = json.loads((tmp_path / "mixture_config.json").read_text())
    assert meta["config"]["mode"] == mode
    reloaded = load_personalized(tiny_llama(seed=0), tmp_path)
    ids, mask, cond = batch()
    with torch.no_grad():
        assert torch.equal(reloaded(ids, mask, cond).logits, model(ids, mask, cond).logits)
    if mode == "plain":  # a plain bank is a stock PEFT adapter as is
        stock = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path).eval()
        with torch.no_grad():
            assert torch.equal(stock(input_ids=ids, attention_mask=mask).logits, model(ids, mask, cond).logits)


def test_load_rejects_a_different_config(tmp_path):
    build_personalized_model(tiny_llama(seed=0), config("reclora")).save_adapter(tmp_path)
    other = build_personalized_model(tiny_llama(seed=0), config("reclora", num_experts=2))
    with pytest.raises(ValueError, match="differs from this model"):
        other.load_adapter_weights(tmp_path)


@pytest.mark.parametrize("mode", ["reclora", "ilora"])
def test_per_user_export_loads_in_stock_peft_and_matches(mode, tmp_path):
    model = build_personalized_model(tiny_llama(seed=0), config(mode)).eval()
    randomize_bank(model, std=0.5)
    ids, mask, cond = batch(num=3)
    model.save_adapter(tmp_path / "adapter")
    for user in range(2):
        out = export_mod.export_user_adapter(tmp_path / "adapter", cond[user].numpy(), tmp_path / f"u{user}")
        lora_cfg = json.loads((out / "adapter_config.json").read_text())
        assert lora_cfg["r"] == (8 if mode == "ilora" else 4)
        stock = PeftModel.from_pretrained(tiny_llama(seed=0), out).eval()
        with torch.no_grad():
            want = model(ids[user : user + 1], mask[:1], cond[user : user + 1]).logits
            got = stock(input_ids=ids[user : user + 1], attention_mask=mask[:1]).logits
        assert (got - want).abs().max().item() <= 1e-4
    # The in-memory export writes the same tensors as the folder-based one.
    live = export_mod.export_user_adapter_from_model(model, cond[0], tmp_path / "live")
    for key, tensor in load_file(str(live / "adapter_model.safetensors")).items():
        assert torch.equal(tensor, load_file(str(tmp_path / "u0" / "adapter_model.safetensors"))[key])


def test_export_cli_npy_and_parquet_with_check(tmp_path, capsys):
    base_dir = tmp_path / "base"
    tiny_llama(seed=0).save_pretrained(base_dir)
    model = build_personalized_model(tiny_llama(seed=0), config("reclora")).eval()
    randomize_bank(model, std=0.5)
    model.save_adapter(tmp_path / "adapter")
    cond = np.random.default_rng(0).standard_normal((3, COND)).astype(np.float32)
    np.save(tmp_path / "cond.npy", cond)
    rc = export_mod.main(
        [
            "--adapter",
            str(tmp_path / "adapter"),
            "--cond",
            str(tmp_path / "cond.npy"),
            "--row",
            "1",
            "--out",
            str(tmp_path / "npy"),
            "--base",
            str(base_dir),
            "--check",
        ]
    )
    assert rc == 0 and "max |logit diff|" in capsys.readouterr().out
    table = pa.table(
        {
            "user_id": pa.array([7, 8, 9], pa.int64()),
            "cond": pa.array([row.tolist() for row in cond], pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, tmp_path / "cond.parquet")
    rc = export_mod.main(
        [
            "--adapter",
            str(tmp_path / "adapter"),
            "--cond-parquet",
            str(tmp_path / "cond.parquet"),
            "--user-id",
            "8",
            "--out",
            str(tmp_path / "pq"),
        ]
    )
    assert rc == 0
    for key, tensor in load_file(str(tmp_path / "npy" / "adapter_model.safetensors")).items():
        assert torch.equal(tensor, load_file(str(tmp_path / "pq" / "adapter_model.safetensors"))[key])
    assert json.loads((tmp_path / "pq" / "user_export.json").read_text())["user_id"] == "8"
    with pytest.raises(SystemExit, match="exactly one row"):
        export_mod.main(
            [
                "--adapter",
                str(tmp_path / "adapter"),
                "--cond-parquet",
                str(tmp_path / "cond.parquet"),
                "--user-id",
                "99",
                "--out",
                str(tmp_path / "none"),
            ]
        )


def test_mixture_layers_are_peft_custom_modules():
    model = build_personalized_model(tiny_llama(seed=0), config("reclora"))
    layers = [m for m in model.modules() if isinstance(m, MixtureLoraLinear)]
    assert len(layers) == 2 * len(RECLORA_TARGETS)  # 2 decoder layers x (q, v)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        layers[0].merge()
