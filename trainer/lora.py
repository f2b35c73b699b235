"""Personalized mixture-LoRA (RecLoRA / iLoRA) as one PEFT custom LoRA layer, ZeRO-3 safe.

Per adapted linear W0 (d_in -> d_out) a bank of N experts of rank r is stored concatenated, exactly like a PEFT
LoRA of rank N*r: lora_A.weight (N*r, d_in), lora_B.weight (d_out, N*r). Each sample has a gate g (N,).

* ilora   ("mix outputs"): y = W0 x + s * B ((g (x) 1_r) * A x)            s = alpha / r_expert
* reclora ("mix weights"): y = W0 x + s * B_u A_u x, A_u = sum_k g_k A_k, B_u = sum_k g_k B_k
* plain: stock PEFT LoRA (the baseline; no gate).

PEFT selects and injects the target modules (custom-module dispatch) and owns the file format; the gates live in
`PersonalizedLM.gates` and reach the layers for one forward only (`PersonalizedLM.gates_set`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.gates import MixtureGates

MODES = ("reclora", "ilora", "plain")
RECLORA_PATHS = ("auto", "per_sample", "rank_space")
MIXTURE_CONFIG_FILE = "mixture_config.json"
GATES_FILE = "gates.safetensors"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = "reclora-mixture-lora/2"  # /2: a gated bank's adapter_config.json is marked (PERSONALIZED_PEFT_TYPE)
READABLE_FORMATS = ("reclora-mixture-lora/1", FORMAT_VERSION)
# peft_type of a gated (reclora / ilora) adapter folder's adapter_config.json. Not a PEFT type: stock
# PeftModel.from_pretrained / PeftConfig.from_pretrained fail on it (KeyError naming it) instead of loading the bank as
# an ungated rank-N*r LoRA; the LoRA layout (r, lora_alpha, target_modules) sits under "reclora", not at the top
# level, so LoRA servers that read those keys directly (vLLM's PEFTHelper) fail too. The servable form is the
# per-user / per-request export (trainer.export), a stock PEFT LoRA folder.
PERSONALIZED_PEFT_TYPE = "RECLORA_GATED_MIXTURE_NEEDS_GATE"
PEFT_CONFIG_FILE = "adapter_config.json"
# Static reclora cost rule, in units of r*(d_in + d_out) MACs per sample (d cancels out):
#   rank space  (z = sum_k g_k A_k x, then B (g (x) z)): N*T
#   per sample  (materialize A_u, B_u, then rank r per token): MIX_COST*N + TOKEN_COST*T
# The per-sample constants are > 1 because its thin batched GEMMs and the per-sample weight mix run less
# efficiently than one wide GEMM; fitted on CPU at d=1024, N in {4, 16} (crossover T ~ 16 and ~ 10 tokens).
# N=1 and N=2 always take the rank-space path, which for N=1 is plain LoRA.
PER_SAMPLE_MIX_COST = 8.0
PER_SAMPLE_TOKEN_COST = 2.0


@dataclasses.dataclass(kw_only=True)
class MixtureLoraConfig:
    """Adapter settings; the project's typed config maps onto this.

    r: rank per expert for reclora, TOTAL rank for ilora (split into num_experts blocks), rank for plain.
    """

    mode: Literal["reclora", "ilora", "plain"]
    target_modules: list[str]
    r: int
    alpha: float
    dropout: float = 0.0
    num_experts: int = 1
    temperature: float = 1.0
    gate_hidden: int = 60
    gate_dropout: float = 0.1
    cond_dim: int = 0
    gate_lr_mult: float = 1.0
    # Which exact reclora formulation runs; "auto" picks from shapes only (never from data).
    reclora_path: Literal["auto", "per_sample", "rank_space"] = "auto"
    # The gates' input: the teacher representation, or (ablation) a fixed random vector per sample, drawn by the
    # trainer (trainer.objective.gate_input); the model itself only ever sees `cond`.
    gate_input: Literal["teacher", "random"] = "teacher"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"MixtureLoraConfig.mode must be one of {MODES}, got {self.mode!r}")
        if not self.target_modules:
            raise ValueError("MixtureLoraConfig.target_modules is empty")
        self.target_modules = list(self.target_modules)
        if self.r <= 0 or self.num_experts <= 0:
            raise ValueError(f"r and num_experts must be positive, got r={self.r}, num_experts={self.num_experts}")
        if self.mode == "plain" and self.num_experts != 1:
            raise ValueError(f"mode 'plain' has one expert, got num_experts={self.num_experts}")
        if self.mode == "ilora" and self.r % self.num_experts:
            raise ValueError(
                f"ilora splits the total rank r={self.r} into num_experts={self.num_experts} "
                "equal blocks: r must be divisible by num_experts"
            )
        if self.mode != "plain" and self.cond_dim <= 0:
            raise ValueError(f"mode {self.mode!r} needs cond_dim > 0 (size of the conditioning vector)")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.gate_input not in ("teacher", "random"):
            raise ValueError(f"gate_input must be 'teacher' or 'random', got {self.gate_input!r}")
        if self.reclora_path not in RECLORA_PATHS:
            raise ValueError(f"reclora_path must be one of {RECLORA_PATHS}, got {self.reclora_path!r}")

    @classmethod
    def from_config(cls, cfg: Any) -> "MixtureLoraConfig":
        """The adapter settings of the typed run config (configs.schema.Config): every `trainer.lora` key
        by name, and the teacher's representation size as the gates' input."""
        return cls(**cfg.trainer.lora.model_dump(), cond_dim=cfg.teacher.rep_dim)

    @property
    def rank_per_expert(self) -> int:
        return self.r // self.num_experts if self.mode == "ilora" else self.r

    @property
    def total_rank(self) -> int:
        """Rank of the concatenated bank, i.e. of the equivalent PEFT LoRA."""
        return self.rank_per_expert * self.num_experts

    @property
    def scaling(self) -> float:
        """s = alpha / r_expert: iLoRA's alpha/(r/K) and RecLoRA's alpha/r are the same formula."""
        return self.alpha / self.rank_per_expert

    def to_lora_config(self) -> LoraConfig:
        """The PEFT config of the bank (rank N*r); mixture modes register the custom layer on it."""
        config = LoraConfig(
            r=self.total_rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        if self.mode != "plain":
            layer = functools.partial(
                MixtureLoraLinear, mode=self.mode, num_experts=self.num_experts, reclora_path=self.reclora_path
            )
            config._register_custom_module({nn.Linear: layer})
        return config


def use_per_sample_weights(tokens_per_sample: int, num_experts: int) -> bool:
    """Static cost rule for reclora: shapes only, so every rank and every recompute picks the same path."""
    per_sample = PER_SAMPLE_MIX_COST * num_experts + PER_SAMPLE_TOKEN_COST * tokens_per_sample
    return per_sample < num_experts * tokens_per_sample


class ExpertBankA(nn.Linear):
    """lora_A of a mixture layer: N stacked (r x d_in) expert blocks, state-dict identical to nn.Linear.

    The per-sample mix happens inside this module's forward so ZeRO-3 has gathered the weight.
    """

    def __init__(self, in_features: int, total_rank: int, num_experts: int) -> None:
        super().__init__(in_features, total_rank, bias=False)
        self.num_experts = num_experts

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if gate is None:  # every expert's projection: (..., N*r)
            return F.linear(x, self.weight)
        # A_u = sum_k g_k A_k as one (B, N) @ (N, r*d_in) GEMM, then a rank-r projection per sample.
        batch = gate.shape[0]
        r = self.out_features // self.num_experts
        a_u = torch.mm(gate, self.weight.view(self.num_experts, -1)).view(batch, r, self.in_features)
        return torch.bmm(x, a_u.transpose(1, 2))  # (B, T, r)


class ExpertBankB(nn.Linear):
    """lora_B of a mixture layer: N (d_out x r) expert blocks side by side, state-dict identical to nn.Linear."""

    def __init__(self, total_rank: int, out_features: int, num_experts: int) -> None:
        super().__init__(total_rank, out_features, bias=False)
        self.num_experts = num_experts

    def forward(self, u: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if gate is None:  # u already carries the rank-space gate: (..., N*r)
            return F.linear(u, self.weight)
        r = self.in_features // self.num_experts
        # B_u[o] = g @ W[o] (N x r) for every output row, broadcast over d_out: no permuted copy of the weight
        # (an einsum made one and saved it for backward), and the result's permute is a free view for bmm.
        b_u = torch.matmul(gate, self.weight.view(self.out_features, self.num_experts, r))  # (d_out, B, r)
        return torch.bmm(u, b_u.permute(1, 2, 0))  # (B, T, d_out)


class MixtureLoraLinear(nn.Module, LoraLayer):
    """PEFT LoRA layer for nn.Linear whose rank space is gated per sample (registered as a PEFT custom module)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: float = 1,
        *,
        mode: str,
        num_experts: int,
        reclora_path: str = "auto",
        **kwargs: Any,
    ) -> None:
        if mode not in ("reclora", "ilora"):
            raise ValueError(f"MixtureLoraLinear mode must be 'reclora' or 'ilora', got {mode!r}")
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        if config.fan_in_fan_out:
            raise ValueError("MixtureLoraLinear supports nn.Linear only (fan_in_fan_out=False)")
        self.fan_in_fan_out = False
        self.mixture_mode = mode
        self.num_experts = num_experts
        self.reclora_path = reclora_path
        self.module_name = kwargs.get("target_name") or type(base_layer).__name__
        # Set only while PersonalizedLM.gates_set is active (plain attributes: never in a state dict).
        self.gate: torch.Tensor | None = None
        self.gate_expand_ok = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs: Any) -> None:
        if config.use_dora or config.use_rslora or config.lora_bias:
            raise ValueError(f"{self.module_name}: mixture LoRA does not support use_dora/use_rslora/lora_bias")
        if r % self.num_experts:
            raise ValueError(f"{self.module_name}: bank rank {r} is not divisible by num_experts={self.num_experts}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.lora_A[adapter_name] = ExpertBankA(self.in_features, r, self.num_experts)
        self.lora_B[adapter_name] = ExpertBankB(r, self.out_features, self.num_experts)
        self.lora_bias[adapter_name] = False
        self.use_rslora[adapter_name] = False
        self.use_dora[adapter_name] = False
        self.scaling[adapter_name] = lora_alpha / (r // self.num_experts)
        # PEFT's default init is kaiming-uniform(a=sqrt(5)) on A (fan_in = d_in, the same bound as on each
        # r x d_in expert block, so it is the per-expert init) and B = 0 (the model equals the base at step 0).
        self.reset_lora_parameters(adapter_name, config.init_lora_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            f"{self.module_name}: a per-sample mixture cannot be merged into W0; "
            "export a per-user adapter (trainer.export) and merge that instead"
        )

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise NotImplementedError(f"{self.module_name}: the delta weight depends on the per-sample gate")

    def _gate_for(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            raise RuntimeError(
                f"{self.module_name}: mixture LoRA layer ran without a gate. Call the model through "
                "PersonalizedLM(input_ids, attention_mask, cond) / PersonalizedLM.generate, and enable activation "
                "checkpointing with PersonalizedLM.activation_checkpointing_enable() so the recompute sees the gate."
            )
        gate = self.gate
        if gate.shape[0] != x.shape[0]:
            # generate() expands each sample into contiguous beams/return sequences (repeat_interleave).
            if not (self.gate_expand_ok and x.shape[0] % gate.shape[0] == 0):
                raise ValueError(
                    f"{self.module_name}: gate has {gate.shape[0]} rows but the input batch has {x.shape[0]} samples"
                )
            gate = gate.repeat_interleave(x.shape[0] // gate.shape[0], dim=0)
        return gate

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError(f"{self.module_name}: mixed-adapter batches (adapter_names=...) are not supported")
        active = [name for name in self.active_adapters if name in self.lora_A]
        if self.disable_adapters or not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) > 1:
            raise ValueError(f"{self.module_name}: one active mixture adapter expected, got {active}")
        adapter = active[0]
        result = self.base_layer(x, *args, **kwargs)
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        x = self._cast_input_dtype(x, lora_A.weight.dtype)
        gate = self._gate_for(x).to(x.dtype)
        # The scale rides on the (B, N) gate rather than on the (B, T, d_out) output.
        scaled_gate = gate * self.scaling[adapter]
        batch = x.shape[0]
        h_in = self.lora_dropout[adapter](x).reshape(batch, -1, x.shape[-1])
        tokens = h_in.shape[1]
        if self.mixture_mode == "ilora":
            r = lora_A.out_features // self.num_experts
            h = lora_A(h_in)  # (B, T, N*r)
            delta = lora_B(h * scaled_gate.repeat_interleave(r, dim=-1).unsqueeze(1))
        elif self._per_sample(tokens):
            delta = lora_B(lora_A(h_in, gate), scaled_gate)
        else:
            h = lora_A(h_in)
            r = lora_A.out_features // self.num_experts
            z = torch.einsum("btnr,bn->btr", h.view(batch, tokens, self.num_experts, r), gate)
            u = (z.unsqueeze(2) * scaled_gate[:, None, :, None]).reshape(batch, tokens, -1)
            delta = lora_B(u)
        return result + delta.view(result.shape).to(result.dtype)

    def _per_sample(self, tokens: int) -> bool:
        if self.reclora_path == "auto":
            return use_per_sample_weights(tokens, self.num_experts)
        return self.reclora_path == "per_sample"

    def __repr__(self) -> str:
        return f"mixture_lora[{self.mixture_mode}, N={self.num_experts}]." + super().__repr__()


def _is_zero3_param(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Full parameters inside the block under ZeRO-3 (collective: every rank must enter); no-op otherwise.

    One synchronous all-gather per parameter, in ds_id order (the same on every rank). A single
    GatheredParameters over the whole list takes DeepSpeed's coalesced path, which launches one async
    all-gather per parameter and waits only on the last handle: on CPU/gloo earlier transfers could still
    be writing after the block was entered (lost or corrupted adapter tensors in save/load)."""
    zero_params = {id(p): p for p in params if _is_zero3_param(p)}
    if not zero_params:
        yield
        return
    import deepspeed  # only reached when the parameters are already ZeRO-3 partitioned

    with contextlib.ExitStack() as stack:
        for p in sorted(zero_params.values(), key=lambda q: q.ds_id):
            stack.enter_context(deepspeed.zero.GatheredParameters([p], modifier_rank=modifier_rank))
        yield


def is_main_process() -> bool:
    return (
        not (torch.distributed.is_available() and torch.distributed.is_initialized())
        or torch.distributed.get_rank() == 0
    )


class PersonalizedLM(nn.Module):
    """A PEFT causal LM with a mixture-LoRA bank plus the gates; forward(input_ids, attention_mask, cond, labels).

    The gates are computed once per forward from `cond` (B, cond_dim) and set on every mixture layer only for
    that call; activation-checkpoint recomputes get the same gate tensors through the checkpointed closure.
    """

    def __init__(self, lm: PeftModel, config: MixtureLoraConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.lm = lm
        self.config = config
        self.adapter_name = adapter_name
        # Plain references for gate routing; the modules are registered (and saved) through self.lm.
        self._layers: dict[str, MixtureLoraLinear] = {
            module.module_name: module for module in lm.modules() if isinstance(module, MixtureLoraLinear)
        }
        if config.mode == "plain":
            self.gates = None
        else:
            if not self._layers:
                raise ValueError(f"no module matched target_modules={config.target_modules}")
            self.gates = MixtureGates(
                config.mode,
                sorted(self._layers),
                config.cond_dim,
                config.num_experts,
                hidden=config.gate_hidden,
                dropout=config.gate_dropout,
                temperature=config.temperature,
            )
        self.apply_trainable_flags()

    # ---- the one trainable list -------------------------------------------------------------------------------
    def trainable_parameter_names(self) -> list[str]:
        """Adapter bank and gate parameters; drives freezing, optimizer groups, checkpoints and export."""
        names = []
        for module_name, module in self.named_modules():
            if isinstance(module, LoraLayer):
                for attr in ("lora_A", "lora_B"):
                    for param_name, _ in getattr(module, attr).named_parameters():
                        names.append(f"{module_name}.{attr}.{param_name}")
        if self.gates is not None:
            names.extend(f"gates.{name}" for name, _ in self.gates.named_parameters())
        return names

    def apply_trainable_flags(self) -> None:
        trainable = set(self.trainable_parameter_names())
        for name, param in self.named_parameters():
            param.requires_grad_(name in trainable)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        params = dict(self.named_parameters())
        return {name: params[name] for name in self.trainable_parameter_names()}

    def optimizer_param_groups(
        self, lr: float, weight_decay: float = 0.0, gate_weight_decay: float | None = None
    ) -> list[dict[str, Any]]:
        """Bank at `lr`, gates at `lr * gate_lr_mult` (iLoRA trains its router at 0.3x)."""
        params = self.trainable_parameters()
        bank = [p for n, p in params.items() if not n.startswith("gates.")]
        gates = [p for n, p in params.items() if n.startswith("gates.")]
        groups = [{"params": bank, "lr": lr, "weight_decay": weight_decay}]
        if gates:
            groups.append(
                {
                    "params": gates,
                    "lr": lr * self.config.gate_lr_mult,
                    "weight_decay": weight_decay if gate_weight_decay is None else gate_weight_decay,
                }
            )
        return groups

    # ---- gates ------------------------------------------------------------------------------------------------
    def compute_gates(self, cond: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if self.gates is None:
            return {}
        if cond is None:
            raise ValueError(f"mode {self.config.mode!r} needs cond (batch, {self.config.cond_dim})")
        # The conditioning vector comes from a frozen recommender: no gradient flows into it. It stays float32 (never
        # the parameters' dtype: DeepSpeed bf16 casts the gates too); the gates compute and return float32, and each
        # mixture layer casts its gate to the activation dtype where it uses it. One call per forward: activation
        # recomputation reuses these tensors (_checkpoint_with_gates) and never runs the gates again.
        reference = next(self.gates.parameters())
        return self.gates(cond.detach().to(device=reference.device, dtype=torch.float32))

    @contextlib.contextmanager
    def gates_set(self, gates: dict[str, torch.Tensor], allow_expand: bool = False) -> Iterator[None]:
        """Make `gates` visible to the mixture layers inside the block; previous values come back in `finally`."""
        missing = set(self._layers) - set(gates)
        if missing:
            raise KeyError(f"no gate for mixture layers {sorted(missing)[:3]}")
        previous = {name: (layer.gate, layer.gate_expand_ok) for name, layer in self._layers.items()}
        try:
            for name, layer in self._layers.items():
                layer.gate, layer.gate_expand_ok = gates[name], allow_expand
            yield
        finally:
            for name, layer in self._layers.items():
                layer.gate, layer.gate_expand_ok = previous[name]

    def activation_checkpointing_enable(self, every_n_layers: int = 1, use_reentrant: bool | None = None) -> None:
        """HF activation checkpointing whose recompute sees the gates of the forward it replays.

        use_reentrant=None picks non-reentrant, except when the base is ZeRO-3 partitioned: DeepSpeed 0.18.9
        re-partitions frozen params inside a non-reentrant recompute (CheckpointError "shape [0]", fixed upstream in
        DeepSpeed PR #8148), so ZeRO-3 gets the reentrant variant, which replays correctly.
        """
        if use_reentrant is None:
            use_reentrant = any(_is_zero3_param(p) for p in self.parameters())
        base = self.lm.get_base_model()
        # The public call sets the per-layer flags, use_cache handling and input grads (needed by reentrant).
        base.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": use_reentrant}, every_n_layers=every_n_layers
        )
        # Then swap in a checkpoint function that closes over the gates (HF's documented override point).
        base._set_gradient_checkpointing(
            enable=True,
            every_n_layers=every_n_layers,
            gradient_checkpointing_func=functools.partial(self._checkpoint_with_gates, use_reentrant=use_reentrant),
        )

    def _checkpoint_with_gates(self, function: Any, *args: Any, use_reentrant: bool, **kwargs: Any) -> Any:
        # Runs in the original forward, where the gates are set. The recompute happens in backward, after forward
        # returned and cleared them, so the replayed function re-enters this forward's gate tensors itself.
        # The gates are explicit checkpoint inputs, not closure captures: reentrant checkpointing detaches its
        # inputs and hands their gradients back to autograd, so a gate shared by many layers (iLoRA) collects
        # every layer's gradient and its own graph is walked once. A captured gate would be backpropagated into
        # once per checkpointed layer ("Trying to backward through the graph a second time").
        # Only the gates of the mixture layers inside the checkpointed module travel (2 of 64 for RecLoRA q,v at 7B,
        # not all 64 per layer); when that module cannot be told, all of them. The gates themselves never rerun.
        names = self._layers_inside(function)
        unique: list[torch.Tensor] = []
        slot: dict[str, int] = {}
        for name in names:
            gate = self._layers[name].gate
            if gate is None:
                continue
            index = next((i for i, g in enumerate(unique) if g is gate), None)
            if index is None:
                index = len(unique)
                unique.append(gate)
            slot[name] = index
        n_args = len(args)

        def replayable(*inner: Any, **inner_kwargs: Any) -> Any:
            gates = inner[n_args:]
            snapshot = {name: gates[slot[name]] if name in slot else None for name in self._layers}
            with self.gates_set(snapshot):
                return function(*inner[:n_args], **inner_kwargs)

        return torch.utils.checkpoint.checkpoint(replayable, *args, *unique, use_reentrant=use_reentrant, **kwargs)

    def _layers_inside(self, function: Any) -> list[str]:
        """Mixture layers inside the module a checkpoint function replays: HF's GradientCheckpointingLayer passes
        partial(forward, layer, ...) (older versions partial(layer.__call__, ...)); anything else -> all layers."""
        owner = None
        if isinstance(function, functools.partial):
            owner = getattr(function.func, "__self__", None)
            if owner is None and function.args:
                owner = function.args[0]
        if not isinstance(owner, nn.Module):
            return list(self._layers)
        inside = {id(module) for module in owner.modules()}
        return [name for name, layer in self._layers.items() if id(layer) in inside]

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.activation_checkpointing_enable(use_reentrant=(gradient_checkpointing_kwargs or {}).get("use_reentrant"))

    # ---- forward / generate -------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        gates = self.compute_gates(cond)
        with self.gates_set(gates):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """HF generate with one gate per prompt, constant over decode steps (and shared by its beams)."""
        gates = self.compute_gates(cond)
        with self.gates_set(gates, allow_expand=True):
            return self.lm.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)

    # ---- save / load ------------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trainable tensors (gathered under ZeRO-3: call on every rank)."""
        params = self.trainable_parameters()
        with gathered(list(params.values())):
            return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in params.items()}

    def save_adapter(self, out_dir: str | Path) -> None:
        """Bank as a PEFT folder (adapter_config.json + adapter_model.safetensors), gates.safetensors and
        mixture_config.json. Trainable tensors only; collective under ZeRO-3, only rank 0 writes."""
        state = self.trainable_state_dict()
        if not is_main_process():
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        bank = {name.removeprefix("lm."): t for name, t in state.items() if name.startswith("lm.")}
        peft_state = get_peft_model_state_dict(
            self.lm, state_dict=bank, adapter_name=self.adapter_name, save_embedding_layers=False
        )
        if len(peft_state) != len(bank):
            raise RuntimeError(f"PEFT kept {len(peft_state)} of {len(bank)} bank tensors when saving")
        save_file(peft_state, str(out / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        lora_config = copy.copy(self.lm.peft_config[self.adapter_name])
        lora_config._custom_modules = None  # a runtime registration, not part of the file format
        lora_config.save_pretrained(str(out))
        if self.gates is not None:
            gates = {name.removeprefix("gates."): t for name, t in state.items() if name.startswith("gates.")}
            save_file(gates, str(out / GATES_FILE), metadata={"format": "pt"})
            mark_personalized(out, self.config)
        meta = {
            "format": FORMAT_VERSION,
            "adapter_name": self.adapter_name,
            "config": dataclasses.asdict(self.config),
            "module_names": sorted(self._layers),
            "base_model_name_or_path": lora_config.base_model_name_or_path,
        }
        (out / MIXTURE_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        mask = os.umask(0)
        os.umask(mask)
        for name in (PEFT_WEIGHTS_FILE, GATES_FILE):  # safetensors' save_file creates 0600 files; the umask decides
            if (out / name).is_file():
                os.chmod(out / name, 0o666 & ~mask)

    def load_adapter_weights(self, adapter_dir: str | Path) -> None:
        """Load a save_adapter folder into this model in place (ZeRO-3 aware: call on every rank)."""
        adapter_dir = Path(adapter_dir)
        saved = read_mixture_config(adapter_dir)
        if saved != self.config:
            raise ValueError(f"{adapter_dir}: saved config {saved} differs from this model's {self.config}")
        bank = load_file(str(adapter_dir / PEFT_WEIGHTS_FILE))
        params = self.trainable_parameters()
        with torch.no_grad(), gathered(list(params.values()), modifier_rank=0):
            result = set_peft_model_state_dict(self.lm, bank, adapter_name=self.adapter_name)
            bank_names = {n.removeprefix("lm.") for n in params if n.startswith("lm.")}
            missing = bank_names & set(result.missing_keys)
            if missing or result.unexpected_keys:
                raise ValueError(
                    f"{adapter_dir / PEFT_WEIGHTS_FILE}: missing {sorted(missing)[:3]}, "
                    f"unexpected {sorted(result.unexpected_keys)[:3]}"
                )
            if self.gates is not None:
                self.gates.load_state_dict(load_file(str(adapter_dir / GATES_FILE)), strict=True)


def mark_personalized(adapter_dir: str | Path, config: MixtureLoraConfig) -> None:
    """Rewrite a gated bank's adapter_config.json so stock PEFT refuses it (PERSONALIZED_PEFT_TYPE; the LoRA layout
    moves under "reclora"). Idempotent; also upgrades a folder written before the marking (format /1)."""
    path = Path(adapter_dir) / PEFT_CONFIG_FILE
    stock = json.loads(path.read_text()) if path.is_file() else {}
    if stock.get("peft_type") == PERSONALIZED_PEFT_TYPE:
        return
    layout = {k: stock.pop(k) for k in ("r", "lora_alpha", "target_modules", "lora_dropout") if k in stock}
    marked = {
        "peft_type": PERSONALIZED_PEFT_TYPE,
        "base_model_name_or_path": stock.get("base_model_name_or_path"),
        "task_type": stock.get("task_type", "CAUSAL_LM"),
        "reclora": {
            "requires_gate": True,
            "mode": config.mode,
            "num_experts": config.num_experts,
            "rank_per_expert": config.rank_per_expert,
            "cond_dim": config.cond_dim,
            "bank": layout,
            "load_with": "trainer.lora.load_personalized(base_model, adapter_dir)",
            "servable_export": "python -m trainer.export --adapter DIR --cond V.npy --out OUT  (or --run RUN --users)",
            "note": "a bank of per-sample gated LoRA experts, not a stock LoRA: without the gate it is meaningless",
        },
    }
    path.write_text(json.dumps(marked, indent=2, sort_keys=True) + "\n")


def is_marked_personalized(adapter_dir: str | Path) -> bool:
    path = Path(adapter_dir) / PEFT_CONFIG_FILE
    return path.is_file() and json.loads(path.read_text()).get("peft_type") == PERSONALIZED_PEFT_TYPE


def read_mixture_config(adapter_dir: str | Path) -> MixtureLoraConfig:
    path = Path(adapter_dir) / MIXTURE_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a mixture-LoRA adapter folder")
    meta = json.loads(path.read_text())
    if meta.get("format") not in READABLE_FORMATS:
        raise ValueError(
            f"{path}: format {meta.get('format')!r}, this code reads {list(READABLE_FORMATS)}; re-save the adapter "
            "(PersonalizedLM.save_adapter) with the code that trained it"
        )
    return MixtureLoraConfig(**meta["config"])


def build_personalized_model(
    model: nn.Module, config: MixtureLoraConfig, *, adapter_name: str = "default", seed: int | None = 0
) -> PersonalizedLM:
    """Inject the bank into any HF causal LM with linear projections (PEFT target selection) and add gates.

    Build it outside deepspeed.zero.Init (PEFT's B = 0 init must see full tensors); deepspeed.initialize then
    partitions the new parameters. `seed` makes the adapter init reproducible without touching the global RNG.
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        lm = get_peft_model(model, config.to_lora_config(), adapter_name=adapter_name)
        personalized = PersonalizedLM(lm, config, adapter_name=adapter_name)
    if personalized.gates is not None:
        # Same device as the model, but fp32 like PEFT's autocast adapters: tiny, and run once per sample. (A later
        # cast of the whole model, e.g. DeepSpeed bf16, changes their storage only: they still compute in fp32.)
        personalized.gates.to(next(model.parameters()).device)
    return personalized


def load_personalized(
    model: nn.Module, adapter_dir: str | Path, *, adapter_name: str = "default", is_trainable: bool = False
) -> PersonalizedLM:
    """Rebuild a PersonalizedLM on a fresh base model from a save_adapter folder (format /1 or /2)."""
    config = read_mixture_config(adapter_dir)
    if config.mode != "plain" and not is_marked_personalized(adapter_dir):
        logging.getLogger(__name__).warning(
            "%s: a gated adapter whose adapter_config.json looks like a stock LoRA (written before format /2): stock "
            "PEFT would load it silently without the gate; mark it with `python -m trainer.export --adapter %s "
            "--mark-personalized`",
            adapter_dir,
            adapter_dir,
        )
    personalized = build_personalized_model(model, config, adapter_name=adapter_name, seed=None)
    personalized.load_adapter_weights(adapter_dir)
    if not is_trainable:
        for param in personalized.parameters():
            param.requires_grad_(False)
        personalized.eval()
    return personalized


def count_parameters(personalized: PersonalizedLM) -> dict[str, int]:
    def numel(p: nn.Parameter) -> int:
        return getattr(p, "ds_numel", p.numel())  # ZeRO-3 keeps the full size in ds_numel

    params = personalized.trainable_parameters()
    return {
        "bank": sum(numel(p) for n, p in params.items() if not n.startswith("gates.")),
        "gates": sum(numel(p) for n, p in params.items() if n.startswith("gates.")),
        "total_model": sum(numel(p) for p in personalized.parameters()),
    }


__all__ = [
    "ExpertBankA",
    "ExpertBankB",
    "MixtureLoraConfig",
    "MixtureLoraLinear",
    "PersonalizedLM",
    "build_personalized_model",
    "count_parameters",
    "load_personalized",
    "mark_personalized",
    "read_mixture_config",
    "use_per_sample_weights",
]
