"""LLaRA's hybrid item representation, which iLoRA builds on.

Each history/candidate title in the prompt is followed by a placeholder token. In a hybrid step its input
embedding is replaced by `projector(frozen SASRec item embedding)`; in a text-only step by the embedding
of a plain text token, and the projector is left untouched (its learning rate is 0 for that step). The
probability of a hybrid step grows with training progress (LLaRA's curriculum) and is drawn from
(seed, step), so every rank makes the same choice (a rank-dependent branch would hang ZeRO-3).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.lora import gathered, is_main_process

HISTORY_TOKEN = "[HistoryEmb]"
CANDIDATE_TOKEN = "[CansEmb]"
TEXT_FALLBACK = "item"  # what a placeholder reads as in text-only steps


class ItemProjector(nn.Module):
    """Teacher item-embedding size -> LLM hidden size (LLaRA: Linear, GELU, Linear)."""

    def __init__(self, d_item: int, d_model: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_item, d_model), nn.GELU(), nn.Linear(d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def use_hybrid(seed: int, step: int, total_steps: int) -> bool:
    """LLaRA's curriculum: hybrid with probability step/total, identical on every rank."""
    return random.Random(seed * 1_000_003 + step).random() < step / max(1, total_steps)


class HybridLM(nn.Module):
    """A PersonalizedLM plus the projector; exposes the same training surface (one trainable list)."""

    def __init__(
        self, pm: nn.Module, item_ids: np.ndarray, item_emb: torch.Tensor, slot_token_ids: list[int], text_token_id: int
    ):
        super().__init__()
        self.pm = pm
        d_model = pm.lm.get_base_model().config.hidden_size
        self.projector = ItemProjector(item_emb.shape[1], d_model)
        # Frozen teacher table, looked up by item id (sorted ids -> row).
        self.register_buffer("item_emb", item_emb.float(), persistent=False)
        self.register_buffer("item_ids", torch.as_tensor(item_ids, dtype=torch.long), persistent=False)
        self.slot_token_ids = list(slot_token_ids)
        self.text_token_id = int(text_token_id)
        self.hybrid = True
        self.config = pm.config

    # ---- the one trainable list, extended by the projector
    def trainable_parameter_names(self) -> list[str]:
        return [f"pm.{n}" for n in self.pm.trainable_parameter_names()] + [
            f"projector.{n}" for n, _ in self.projector.named_parameters()
        ]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        params = dict(self.named_parameters())
        return {n: params[n] for n in self.trainable_parameter_names()}

    def optimizer_param_groups(
        self, lr: float, weight_decay: float = 0.0, gate_weight_decay: float | None = None
    ) -> list[dict[str, Any]]:
        """The personalized model's groups, plus the projector, decayed like the router (iLoRA's code decays the
        projector and the router only)."""
        groups = self.pm.optimizer_param_groups(lr, weight_decay, gate_weight_decay)
        decay = weight_decay if gate_weight_decay is None else gate_weight_decay
        groups.append(
            {"params": list(self.projector.parameters()), "lr": lr, "weight_decay": decay, "name": "projector"}
        )
        return groups

    @property
    def gates(self):
        return self.pm.gates

    def compute_gates(self, cond):
        return self.pm.compute_gates(cond)

    def save_adapter(self, out_dir: str | Path) -> None:
        from safetensors.torch import save_file

        self.pm.save_adapter(out_dir)
        params = list(self.projector.parameters())
        with gathered(params):
            state = {n: p.detach().cpu().contiguous() for n, p in self.projector.named_parameters()}
        if is_main_process():
            save_file(state, str(Path(out_dir) / "projector.safetensors"))

    def forward(self, input_ids: torch.Tensor, attention_mask=None, cond=None, item_slots=None, **kwargs):
        slot_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for t in self.slot_token_ids:
            slot_mask |= input_ids == t
        safe_ids = torch.where(slot_mask, torch.full_like(input_ids, self.text_token_id), input_ids)
        embeds = self.pm.lm.get_input_embeddings()(safe_ids)
        if self.hybrid:
            if item_slots is None or int(slot_mask.sum()) != item_slots.numel():
                raise ValueError(
                    f"hybrid step: {int(slot_mask.sum())} placeholder tokens but "
                    f"{0 if item_slots is None else item_slots.numel()} item ids"
                )
            rows = torch.searchsorted(self.item_ids, item_slots)
            rows = rows.clamp(max=len(self.item_ids) - 1)
            if not torch.equal(self.item_ids[rows], item_slots):
                raise ValueError("hybrid step: an item id has no teacher embedding")
            vec = self.projector(self.item_emb[rows]).to(embeds.dtype)
            embeds = embeds.masked_scatter(slot_mask.unsqueeze(-1), vec)  # vectorized, in prompt order
        else:
            # Keep the projector in the graph with zero weight so every rank runs the same modules.
            probe = self.projector(self.item_emb[:1]).sum() * 0.0
            embeds = embeds + probe.to(embeds.dtype)
        return self.pm(inputs_embeds=embeds, attention_mask=attention_mask, cond=cond, **kwargs)
