"""Gates: the stacked RecLoRA gates against per-module reference gates (values, gradients, init, legacy adapters),
one gate forward per step under activation checkpointing, and float32 gates on a bf16 model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest_lora_helpers import ILORA_TARGETS, RECLORA_TARGETS, batch, randomize_bank, tiny_llama
from safetensors.torch import load_file, save_file
from torch import nn

from trainer import export as export_mod
from trainer.gates import (
    STACKED_FROM_PER_MODULE,
    MixtureGates,
    RecLoraGate,
    gate_key,
    stack_legacy_gate_state,
)
from trainer.lora import GATES_FILE, MixtureLoraConfig, build_personalized_model, load_personalized

COND, HIDDEN, EXPERTS = 12, 7, 5
NAMES = [f"model.layers.{i}.self_attn.{m}" for i in range(3) for m in ("q_proj", "v_proj")]


def config(mode: str, **overrides) -> MixtureLoraConfig:
    defaults = {
        "reclora": dict(target_modules=RECLORA_TARGETS, r=4, alpha=8, num_experts=3),
        "ilora": dict(target_modules=ILORA_TARGETS, r=8, alpha=32, num_experts=4),
    }[mode]
    return MixtureLoraConfig(**{"mode": mode, "cond_dim": COND, "gate_dropout": 0.0, **defaults, **overrides})


def per_module_gates(seed: int = 0, dropout: float = 0.0, temperature: float = 1.0) -> nn.ModuleDict:
    """The former layout: one RecLoraGate per module, created in sorted-name order, with non-trivial parameters."""
    torch.manual_seed(seed)
    gates = nn.ModuleDict(
        {gate_key(n): RecLoraGate(COND, EXPERTS, HIDDEN, dropout, temperature) for n in sorted(NAMES)}
    )
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in gates.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    return gates


def legacy_state(gates: nn.ModuleDict) -> dict[str, torch.Tensor]:
    return {f"per_module.{k}": v.detach().clone() for k, v in gates.state_dict().items()}


def stacked(dropout: float = 0.0, temperature: float = 1.0) -> MixtureGates:
    return MixtureGates(
        "reclora", sorted(NAMES), COND, EXPERTS, hidden=HIDDEN, dropout=dropout, temperature=temperature
    )


# ---- stacked gates == M per-module gates --------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_stacked_gates_match_per_module_gates_in_values_and_gradients(temperature):
    reference = per_module_gates(temperature=temperature).train()
    gates = stacked(temperature=temperature).train()
    gates.load_state_dict(legacy_state(reference), strict=True)  # the legacy layout converts on load
    cond = torch.randn(4, COND, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    got = gates(cond)
    assert list(got) == sorted(NAMES)
    weights = torch.randn(len(NAMES), 4, EXPERTS, generator=torch.Generator().manual_seed(4))
    sum((g * w).sum() for g, w in zip(got.values(), weights)).backward()
    want = {n: reference[gate_key(n)](cond) for n in sorted(NAMES)}
    sum((want[n] * w).sum() for n, w in zip(sorted(NAMES), weights)).backward()
    for name in NAMES:
        assert got[name].dtype == torch.float32 and got[name].shape == (4, EXPERTS)
        assert (got[name] - want[name]).abs().max().item() <= 1e-6, name
    for stacked_name, per_module in STACKED_FROM_PER_MODULE.items():
        want_grad = torch.stack([reference.get_submodule(gate_key(n)).get_parameter(per_module).grad for n in NAMES])
        got_grad = getattr(gates, stacked_name).grad
        assert (got_grad - want_grad).abs().max().item() <= 1e-5 * max(1.0, want_grad.abs().max().item()), stacked_name


def test_stacked_gates_are_one_module_with_six_parameters():
    gates = stacked()
    assert [n for n, _ in gates.named_parameters()] == list(STACKED_FROM_PER_MODULE)
    assert [type(m) for m in gates.modules()] == [MixtureGates, nn.Dropout]
    assert gates.w1.shape == (len(NAMES), HIDDEN, COND) and gates.w2.shape == (len(NAMES), EXPERTS, HIDDEN)


def test_stacked_init_equals_the_per_module_init_for_the_same_seed():
    torch.manual_seed(7)
    reference = nn.ModuleDict({gate_key(n): RecLoraGate(COND, EXPERTS, HIDDEN) for n in sorted(NAMES)})
    after_reference = torch.rand(1)
    torch.manual_seed(7)
    gates = stacked()
    assert torch.equal(torch.rand(1), after_reference)  # the same RNG draws, so the rest of the build is unchanged
    want = stack_legacy_gate_state(legacy_state(reference), sorted(NAMES))
    for name, tensor in gates.state_dict().items():
        assert torch.equal(tensor, want[name]), name
    assert not gates.b1.any() and not gates.b2.any() and gates.norm_weight.eq(1).all() and not gates.norm_bias.any()


def test_dropout_draws_an_independent_mask_per_gate():
    gates = stacked(dropout=0.5).train()
    with torch.no_grad():
        gates.w2.zero_()
        gates.w2[:, 0, :] = 1.0  # logit 0 = sum of the surviving hidden units
    out = torch.stack(list(gates(torch.randn(2, COND)).values()))
    assert not torch.allclose(out[0], out[1])  # same parameters, different masks


def test_legacy_state_conversion_names_missing_and_unexpected_keys():
    state = legacy_state(per_module_gates())
    assert set(stack_legacy_gate_state(state, sorted(NAMES))) == set(STACKED_FROM_PER_MODULE)
    assert stack_legacy_gate_state({"w1": torch.ones(1)}, NAMES) == {"w1": torch.ones(1)}  # stacked: as is
    missing = dict(state)
    del missing[f"per_module.{gate_key(NAMES[0])}.net.4.bias"]
    with pytest.raises(ValueError, match="lacks.*net.4.bias"):
        stack_legacy_gate_state(missing, NAMES)
    with pytest.raises(ValueError, match="unexpected"):
        stack_legacy_gate_state({**state, "per_module.other.net.1.weight": torch.ones(1)}, NAMES)
    with pytest.raises(ValueError, match="lacks.*net.4.bias"):  # also through load_state_dict
        stacked().load_state_dict(missing, strict=True)


def test_adapter_saved_with_per_module_gates_still_loads_and_exports(tmp_path):
    model = build_personalized_model(tiny_llama(seed=0), config("reclora")).eval()
    randomize_bank(model)
    with torch.no_grad():
        for p in model.gates.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    model.save_adapter(tmp_path)
    new = load_file(str(tmp_path / GATES_FILE))
    assert set(new) == set(STACKED_FROM_PER_MODULE)
    # Rewrite gates.safetensors as an earlier version did: per_module.<key>.net.{0,1,4}.{weight,bias}.
    names = model.gates.module_names
    old = {
        f"per_module.{gate_key(name)}.{per_module}": new[stacked_name][m].clone()
        for stacked_name, per_module in STACKED_FROM_PER_MODULE.items()
        for m, name in enumerate(names)
    }
    save_file(old, str(tmp_path / GATES_FILE), metadata={"format": "pt"})
    reloaded = load_personalized(tiny_llama(seed=0), tmp_path)
    ids, mask, cond = batch(cond_dim=COND)
    with torch.no_grad():
        assert torch.equal(reloaded(ids, mask, cond).logits, model(ids, mask, cond).logits)
    user = export_mod.export_user_adapter(tmp_path, cond[0].numpy(), tmp_path / "user")
    live = export_mod.export_user_adapter_from_model(model, cond[0], tmp_path / "live")
    for key, tensor in load_file(str(live / "adapter_model.safetensors")).items():
        assert torch.equal(tensor, load_file(str(user / "adapter_model.safetensors"))[key]), key


# ---- one gate forward per step, also when activation checkpointing recomputes the layers ----------------------------
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("mode", ["reclora", "ilora"])
def test_gates_run_once_per_step_under_activation_checkpointing(mode, use_reentrant, monkeypatch):
    model = build_personalized_model(tiny_llama(seed=0), config(mode, gate_dropout=0.1)).train()
    randomize_bank(model)
    model.activation_checkpointing_enable(use_reentrant=use_reentrant)
    calls = {"gates": 0, "layers": 0, "gate_modules": 0}
    step_gates: list[torch.Tensor] = []
    gates_per_checkpoint: list[int] = []

    def count(key):
        def hook(*_):
            calls[key] += 1

        return hook

    def record_gates(_module, _args, output):
        step_gates[:] = list(output.values())

    def counting_checkpoint(function, *args, **kwargs):
        gates_per_checkpoint.append(sum(any(a is g for g in step_gates) for a in args))
        return checkpoint(function, *args, **kwargs)

    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    model.gates.register_forward_hook(count("gates"))
    model.gates.register_forward_hook(record_gates)
    for module in model.gates.modules():  # every module holding gate parameters (ilora: shared.proj)
        if any(True for _ in module.parameters(recurse=False)):
            module.register_forward_hook(count("gate_modules"))
    for layer in model._layers.values():  # the adapted linears (decoder-layer hooks do not fire on recompute)
        layer.register_forward_hook(count("layers"))
    optimizer = torch.optim.SGD(model.optimizer_param_groups(lr=1e-3), lr=1e-3)
    ids, mask, cond = batch(cond_dim=COND)
    for step in range(1, 3):
        for micro in range(2):  # gradient accumulation: one gate forward per micro-batch
            model(ids[micro:], mask[micro:], cond[micro:], labels=ids[micro:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert calls["gates"] == 2 * step and calls["gate_modules"] == 2 * step
        # The layers did run again in backward (non-reentrant recompute may stop early, after the last saved tensor).
        assert calls["layers"] > 2 * step * len(model._layers)
    # Each decoder layer's checkpoint carries only its own layers' gates (reclora: q and v; ilora: the shared one).
    assert gates_per_checkpoint == [2 if mode == "reclora" else 1] * (2 * 2 * 2)
    assert all(p.grad is None for p in model.gates.parameters())  # zero_grad ran; gates did get grads above


# ---- float32 gates on a bf16 model -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["reclora", "ilora"])
def test_gates_stay_float32_on_a_bf16_model(mode):
    fp32 = build_personalized_model(tiny_llama(seed=0), config(mode)).eval()
    randomize_bank(fp32)
    with torch.no_grad():
        for p in fp32.gates.parameters():
            # Non-trivial values that bf16 holds exactly: the bf16 model and this fp32 "master" copy are equal.
            p.copy_((p + torch.randn(p.shape) * 0.3).bfloat16().float())
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)  # what DeepSpeed bf16 does: module.bfloat16(), gates included
    assert all(p.dtype == torch.bfloat16 for p in bf16.gates.parameters())
    ids, mask, cond = batch(cond_dim=COND)
    cond = cond * 3 + 0.7  # values bf16 would round: the gate input must not be cast to the parameters' dtype
    want = fp32.compute_gates(cond)
    with torch.no_grad():
        got = bf16.compute_gates(cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_autocast = bf16.compute_gates(cond)
    for name in want:
        for g in (got[name], got_autocast[name]):
            assert g.dtype == torch.float32, name
            assert (g - want[name]).abs().max().item() <= 1e-6, name
    # The bf16 model runs end to end; the mixture layers cast the fp32 gate to their activation dtype.
    with torch.no_grad():
        logits = bf16(ids, mask, cond).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
