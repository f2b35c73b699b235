"""Per-sample gates that turn a conditioning vector (frozen recommender state) into expert weights.

RecLoRA: one small MLP per adapted (layer, module), all M of them stored stacked in `MixtureGates` and run as one
batched computation (one ZeRO-3 gather, a handful of kernels instead of ~6*M). iLoRA: one linear gate shared by
every adapted module. Gates see one vector per sample, so every token of a sample shares the same mixture.

Gates always compute in float32 (autocast off, parameters and input upcast), whatever dtype the module was cast to
(DeepSpeed bf16 casts the whole model, gates included): training and prediction see the same fp32 gate values for
the same parameter values. The mixture layers cast the gate to their activation dtype at the point of use.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, as in the per-module gates
# Stacked RecLoRA gate parameters: name -> the per-module RecLoraGate key it stacks (over the sorted module names).
STACKED_FROM_PER_MODULE = {
    "norm_weight": "net.0.weight",  # (M, d_c)
    "norm_bias": "net.0.bias",  # (M, d_c)
    "w1": "net.1.weight",  # (M, hidden, d_c)   nn.Linear orientation (out, in)
    "b1": "net.1.bias",  # (M, hidden)
    "w2": "net.4.weight",  # (M, N, hidden)
    "b2": "net.4.bias",  # (M, N)
}
_LEGACY_KEY = re.compile(r"^per_module\.(?P<module>[^.]+)\.(?P<param>net\.\d+\.(?:weight|bias))$")


def gate_key(module_name: str) -> str:
    """Key of an adapted module ('model.layers.0.self_attn.q_proj') in the legacy per-module layout (no dots)."""
    return module_name.replace(".", "__")


def _fp32_math(x: torch.Tensor) -> torch.autocast:
    """Autocast off on x's device for the gate math (an autocast region would otherwise run the GEMMs in bf16)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class RecLoraGate(nn.Module):
    """One RecLoRA gate as a module: LayerNorm(d_c) -> Linear(d_c, hidden) -> ReLU -> Dropout -> Linear(hidden, N),
    softmax(logits / tau).

    Reference formulation only (bench/mixture_lora.py's authors-style variant and the equivalence tests); the model
    uses the stacked `MixtureGates`, whose legacy adapter layout (`per_module.<key>.net.*`) is this module's.
    """

    def __init__(
        self, cond_dim: int, num_experts: int, hidden: int = 60, dropout: float = 0.1, temperature: float = 1.0
    ) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.net = nn.Sequential(
            nn.LayerNorm(cond_dim),
            nn.Linear(cond_dim, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_experts),
        )
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.zeros_(layer.bias)  # weights keep nn.Linear's kaiming-uniform(a=sqrt(5)) as in RecLoRA

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(cond) / self.temperature, dim=-1)


class _Fp32Linear(nn.Linear):
    """nn.Linear (same state dict) that computes in float32 whatever its parameter dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _fp32_math(x):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)


class ILoraGate(nn.Module):
    """Linear(d_c, K) + softmax(logits / tau) in float32; iLoRA's ResNet1D encoder is an optional code detail
    left out."""

    def __init__(self, cond_dim: int, num_experts: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.proj = _Fp32Linear(cond_dim, num_experts)
        nn.init.zeros_(self.proj.bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.proj(cond) / self.temperature, dim=-1)


class MixtureGates(nn.Module):
    """All gates of one personalized model; forward(cond) -> {adapted module name: (B, N) float32 gate}.

    reclora: the M = len(module_names) gate MLPs are stacked parameters of this module (gate m belongs to
    module_names[m]; see STACKED_FROM_PER_MODULE) and run as one batched computation, so ZeRO-3 gathers them once
    per forward, through this module's forward. ilora: one shared `ILoraGate` submodule.
    """

    def __init__(
        self,
        mode: str,
        module_names: list[str],
        cond_dim: int,
        num_experts: int,
        *,
        hidden: int = 60,
        dropout: float = 0.1,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if cond_dim <= 0:
            raise ValueError(f"cond_dim must be positive for mode {mode!r}, got {cond_dim}")
        self.mode = mode
        self.module_names = list(module_names)
        self.cond_dim = cond_dim
        self.temperature = float(temperature)
        if mode == "reclora":
            m = len(self.module_names)
            if m == 0:
                raise ValueError("mode 'reclora' needs at least one adapted module for its gates")
            self.norm_weight = nn.Parameter(torch.ones(m, cond_dim))
            self.norm_bias = nn.Parameter(torch.zeros(m, cond_dim))
            self.w1 = nn.Parameter(torch.empty(m, hidden, cond_dim))
            self.b1 = nn.Parameter(torch.zeros(m, hidden))
            self.w2 = nn.Parameter(torch.empty(m, num_experts, hidden))
            self.b2 = nn.Parameter(torch.zeros(m, num_experts))
            self.dropout = nn.Dropout(dropout)
            self._init_like_per_module()
            self.register_load_state_dict_pre_hook(_convert_legacy_on_load)
        elif mode == "ilora":
            self.shared = ILoraGate(cond_dim, num_experts, temperature)
        else:
            raise ValueError(f"gates exist only for modes 'reclora' and 'ilora', got {mode!r}")

    @torch.no_grad()
    def _init_like_per_module(self) -> None:
        """Each gate as nn.Linear initialises it: kaiming-uniform(a=sqrt(5)) weights, then zero biases. The RNG is
        consumed in the per-module order (w1, b1 draw, w2, b2 draw per gate), so a seed gives the same values as
        the former per-module gates did."""
        for m in range(len(self.module_names)):
            for weight in (self.w1[m], self.w2[m]):
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                bound = 1.0 / math.sqrt(weight.shape[1])
                torch.empty(weight.shape[0], dtype=weight.dtype).uniform_(-bound, bound)  # nn.Linear's bias draw

    def forward(self, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        if cond.dim() != 2 or cond.shape[-1] != self.cond_dim:
            raise ValueError(f"cond must have shape (batch, {self.cond_dim}), got {tuple(cond.shape)}")
        if self.mode == "ilora":
            shared = self.shared(cond)
            return {name: shared for name in self.module_names}
        gates = self.stacked_forward(cond)  # (M, B, N)
        return dict(zip(self.module_names, gates.unbind(0)))

    def stacked_forward(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, d_c) -> (M, B, N) float32: every RecLoRA gate at once. LayerNorm normalises once (its statistics do
        not depend on the gate), then each gate applies its own affine; two batched GEMMs for the MLPs."""
        with _fp32_math(cond):
            x = F.layer_norm(cond.float(), (self.cond_dim,), eps=LAYER_NORM_EPS)  # (B, d_c)
            h = torch.addcmul(
                self.norm_bias.float().unsqueeze(1), x.unsqueeze(0), self.norm_weight.float().unsqueeze(1)
            )
            h = torch.baddbmm(self.b1.float().unsqueeze(1), h, self.w1.float().transpose(1, 2))  # (M, B, hidden)
            h = self.dropout(torch.relu(h))
            logits = torch.baddbmm(self.b2.float().unsqueeze(1), h, self.w2.float().transpose(1, 2))  # (M, B, N)
            return torch.softmax(logits / self.temperature, dim=-1)


def _convert_legacy_on_load(module: MixtureGates, state_dict: dict, prefix: str, *args, **kwargs) -> None:
    """load_state_dict pre-hook of reclora MixtureGates: a per-module state dict (adapters saved before the gates
    were stacked) is converted in place to the stacked layout, so `load_state_dict(old, strict=True)` just works."""
    legacy = {k[len(prefix) :]: k for k in state_dict if k.startswith(prefix + "per_module.")}
    if not legacy:
        return
    stacked = stack_legacy_gate_state({k: state_dict.pop(full) for k, full in legacy.items()}, module.module_names)
    for key, value in stacked.items():
        state_dict[prefix + key] = value


def stack_legacy_gate_state(state: dict[str, torch.Tensor], module_names: list[str]) -> dict[str, torch.Tensor]:
    """Per-module RecLoRA gate tensors (`per_module.<gate_key(name)>.net.{0,1,4}.{weight,bias}`, the layout before
    the gates were stacked) -> the stacked `MixtureGates` layout, gate m = module_names[m]. Other keys pass through.
    Raises ValueError naming the first missing or unexpected legacy key."""
    out: dict[str, torch.Tensor] = {}
    legacy: dict[tuple[str, str], torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith("per_module."):
            out[key] = value
            continue
        match = _LEGACY_KEY.match(key)
        if match is None:
            raise ValueError(f"unexpected per-module gate key {key!r}")
        legacy[(match["module"], match["param"])] = value
    if not legacy:
        return out
    keys = [gate_key(name) for name in module_names]
    expected = {(k, p) for k in keys for p in STACKED_FROM_PER_MODULE.values()}
    if missing := sorted(expected - set(legacy)):
        raise ValueError(f"per-module gate state lacks {['per_module.%s.%s' % m for m in missing[:3]]}")
    if unexpected := sorted(set(legacy) - expected):
        raise ValueError(f"per-module gate state has unexpected {['per_module.%s.%s' % u for u in unexpected[:3]]}")
    for stacked, param in STACKED_FROM_PER_MODULE.items():
        out[stacked] = torch.stack([legacy[(k, param)] for k in keys])
    return out
