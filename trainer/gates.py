"""Per-sample gates that turn a conditioning vector (frozen recommender state) into expert weights.

RecLoRA: one small MLP per adapted (layer, module). iLoRA: one linear gate shared by every adapted module.
Gates see one vector per sample, so every token of a sample shares the same mixture.
"""

from __future__ import annotations

import torch
from torch import nn


def gate_key(module_name: str) -> str:
    """ModuleDict key for an adapted module ('model.layers.0.self_attn.q_proj'): keys may not contain dots."""
    return module_name.replace(".", "__")


class RecLoraGate(nn.Module):
    """LayerNorm(d_c) -> Linear(d_c, hidden) -> ReLU -> Dropout -> Linear(hidden, N), softmax(logits / tau)."""

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


class ILoraGate(nn.Module):
    """Linear(d_c, K) + softmax(logits / tau); iLoRA's ResNet1D encoder is an optional code detail left out."""

    def __init__(self, cond_dim: int, num_experts: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.proj = nn.Linear(cond_dim, num_experts)
        nn.init.zeros_(self.proj.bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.proj(cond) / self.temperature, dim=-1)


class MixtureGates(nn.Module):
    """All gates of one personalized model; forward(cond) -> {adapted module name: (B, N) gate}.

    Each gate is its own submodule and is called through its forward, so ZeRO-3 gathers its parameters.
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
        if mode == "reclora":
            self.per_module = nn.ModuleDict(
                {
                    gate_key(name): RecLoraGate(cond_dim, num_experts, hidden, dropout, temperature)
                    for name in self.module_names
                }
            )
        elif mode == "ilora":
            self.shared = ILoraGate(cond_dim, num_experts, temperature)
        else:
            raise ValueError(f"gates exist only for modes 'reclora' and 'ilora', got {mode!r}")

    def forward(self, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        if cond.dim() != 2 or cond.shape[-1] != self.cond_dim:
            raise ValueError(f"cond must have shape (batch, {self.cond_dim}), got {tuple(cond.shape)}")
        if self.mode == "ilora":
            shared = self.shared(cond)
            return {name: shared for name in self.module_names}
        # A loop over modules (fixed, not data dependent): the same gates run on every rank in the same order.
        return {name: self.per_module[gate_key(name)](cond) for name in self.module_names}
