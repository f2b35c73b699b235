"""SASRec (Kang & McAuley 2018) as iLoRA's conditioning encoder and LLaRA's item-embedding source.

Input: the K most recent item ids, right-aligned (most recent last). Representation: the final hidden
state at the last position (64-d as in iLoRA). Items are scored by dot product with the item table,
which `item_embeddings()` exposes for the trainer's hybrid projector.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from teacher.config import TeacherConfig
from teacher.features import PAD, FeatureSpace


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # No dropout on the attention weights: on CPU its mask generation cost more than the rest of the
        # step, and residual/FFN/embedding dropout regularize enough for 10-item sequences.
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(nn.Module):
    task = "next_item"

    def __init__(self, cfg: TeacherConfig, space: FeatureSpace):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.item_emb = nn.Embedding(len(space.items), d, padding_idx=PAD)
        self.pos_emb = nn.Embedding(cfg.max_hist, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.dropout) for _ in range(cfg.attn_layers))
        self.ln = nn.LayerNorm(d)
        self.rep_dim = d
        nn.init.normal_(self.item_emb.weight, std=d**-0.5)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()

    def unk_dropout_rates(self) -> dict[str, float]:
        return {"hist_idx": self.cfg.id_dropout, "item_idx": self.cfg.id_dropout}

    def item_embeddings(self) -> torch.Tensor:
        """[num_items, d] item table indexed by the model's item vocabulary (0 pad, 1 unknown)."""
        return self.item_emb.weight

    def forward(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        idx, mask = b["hist_idx"], b["hist_mask"]
        n = idx.shape[1]
        x = self.item_emb(idx) * math.sqrt(self.rep_dim) + self.pos_emb.weight[:n]
        x = self.drop(x) * mask.unsqueeze(-1)
        causal = torch.ones(n, n, dtype=torch.bool, device=idx.device).tril()
        eye = torch.eye(n, dtype=torch.bool, device=idx.device)
        # A query may see earlier real items and always itself, so a padding-only (empty) history still
        # has one key per row: no all-masked softmax, no NaN. Its representation is then the learned
        # no-history state, not zeros.
        attn_mask = (causal & (mask.unsqueeze(1) | eye)).unsqueeze(1)
        for blk in self.blocks:
            x = blk(x, attn_mask)
        rep = self.ln(x[:, -1])
        return {"rep": rep}

    def score_items(self, rep: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """Dot-product scores; item_idx is [B] or [B, C]."""
        e = self.item_emb(item_idx)
        return (e * rep.unsqueeze(1)).sum(-1) if e.dim() == 3 else (e * rep).sum(-1)

    def loss(self, b: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> torch.Tensor:
        # Full softmax over the item vocabulary (as the DROS/LLaRA SASRec); padding can never be a target.
        logits = out["rep"] @ self.item_emb.weight.T
        logits[:, PAD] = float("-inf")
        return F.cross_entropy(logits, b["item_idx"])

    def predict(self, b: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        res = {"teacher_score": self.score_items(out["rep"], b["item_idx"])}
        if "cand_idx" in b:
            res["candidate_scores"] = self.score_items(out["rep"], b["cand_idx"])
        return res
