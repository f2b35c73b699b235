"""DIN (Zhou et al. 2018) as RecLoRA's CRM: profile fields + target item + target-aware attention over the
long ID history, then an MLP whose last hidden layer is the gate representation (papers.md 1.3: one
vector per (user, target) instance, 256-d by default). SIM is this same class fed retrieved histories.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from teacher.config import TeacherConfig
from teacher.features import PAD, RATING_BUCKETS, UNK, FeatureSpace


class ItemEncoder(nn.Module):
    """Item id embedding ‖ mean genre embedding ‖ year embedding. Attribute tables are buffers indexed
    by catalog row, so a cold item (unknown id) still has its genres and year."""

    def __init__(self, space: FeatureSpace, embed_dim: int, genre_dim: int, field_dim: int):
        super().__init__()
        self.id_emb = nn.Embedding(len(space.items), embed_dim, padding_idx=PAD)
        self.dim = embed_dim
        self.genre_emb = None
        self.year_emb = None
        if space.num_genres:
            self.genre_emb = nn.Embedding(space.num_genres, genre_dim, padding_idx=PAD)
            self.dim += genre_dim
        if space.num_years:
            self.year_emb = nn.Embedding(space.num_years, field_dim, padding_idx=PAD)
            self.dim += field_dim
        # Not persistent: the tables are saved once in features.safetensors and handed in on load.
        self.register_buffer("item_genres", torch.as_tensor(space.item_genres, dtype=torch.long), persistent=False)
        self.register_buffer("item_year", torch.as_tensor(space.item_year, dtype=torch.long), persistent=False)
        # Id-vocabulary index of every catalog row. At inference an item's id index is a function of its
        # catalog row (both come from its raw id), which lets eval mode precompute per-row tables.
        row_idx, _ = space.items.lookup(space.item_catalog.ids)
        row_to_idx = np.concatenate([[PAD, UNK], row_idx]).astype(np.int64)
        self.register_buffer("row_to_idx", torch.as_tensor(row_to_idx), persistent=False)

    def forward(self, idx: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        parts = [self.id_emb(idx)]
        if self.genre_emb is not None:
            g = self.item_genres[row]
            cnt = (g != PAD).sum(-1, keepdim=True).clamp_min(1)
            parts.append(self.genre_emb(g).sum(-2) / cnt)
        if self.year_emb is not None:
            parts.append(self.year_emb(self.item_year[row]))
        return torch.cat(parts, -1)

    def table(self) -> torch.Tensor:
        """[num_catalog_rows, dim]: features of every catalog row (row 0 padding, row 1 unknown)."""
        return self.forward(self.row_to_idx, torch.arange(len(self.row_to_idx), device=self.row_to_idx.device))


class DIN(nn.Module):
    task = "ctr"

    def __init__(self, cfg: TeacherConfig, space: FeatureSpace):
        super().__init__()
        self.cfg = cfg
        fd = cfg.field_dim
        self.items = ItemEncoder(space, cfg.embed_dim, cfg.genre_dim, fd)
        self.user_emb = nn.Embedding(len(space.users), cfg.embed_dim, padding_idx=PAD)
        self.field_embs = nn.ModuleList(nn.Embedding(n, fd, padding_idx=PAD) for n in space.user_field_sizes)
        self.register_buffer("user_attr", torch.as_tensor(space.user_attr, dtype=torch.long), persistent=False)
        self.rating_emb = nn.Embedding(RATING_BUCKETS, fd, padding_idx=PAD)
        d = self.items.dim
        h = cfg.attn_hidden
        # First attention layer on [q, k, q-k, q*k, rating] written as separate projections: the q term is
        # computed once per sample instead of once per history item (the q-k term folds into q and k),
        # and in eval mode the k and rating terms are per-row lookup tables.
        self.att_q = nn.Linear(d, h)
        self.att_k = nn.Linear(d, h, bias=False)
        self.att_p = nn.Linear(d, h, bias=False)
        self.att_r = nn.Linear(fd, h, bias=False)
        layers: list[nn.Module] = []
        width = h
        for _ in range(cfg.attn_layers - 1):
            nxt = max(8, width // 2)
            layers += [nn.ReLU(), nn.Linear(width, nxt)]
            width = nxt
        layers += [nn.ReLU(), nn.Linear(width, 1)]
        self.att_out = nn.Sequential(*layers)  # [ReLU, Linear]*: the eval path relies on this shape
        # MLP input: user id ‖ profile fields ‖ target ‖ attended history ‖ mean history ‖ log(1+hist_len)
        in_dim = cfg.embed_dim + fd * len(space.user_field_sizes) + d + 2 * (d + fd) + 1
        mlp: list[nn.Module] = []
        for out in cfg.mlp_hidden:
            mlp += [nn.Linear(in_dim, out), nn.ReLU(), nn.Dropout(cfg.dropout)]
            in_dim = out
        self.mlp = nn.Sequential(*mlp)
        self.head = nn.Linear(in_dim, 1)
        self.rep_dim = in_dim
        self._tables: tuple[torch.Tensor, ...] | None = None

    def unk_dropout_rates(self) -> dict[str, float]:
        c = self.cfg
        return {"user_idx": c.user_dropout, "item_idx": c.id_dropout, "hist_idx": c.id_dropout}

    def train(self, mode: bool = True) -> "DIN":
        self._tables = None  # weights may change: eval tables are rebuilt on next eval forward
        return super().train(mode)

    def _eval_tables(self) -> tuple[torch.Tensor, ...]:
        if self._tables is None:
            # Ordinary (non-inference) tensors, so the cache stays usable outside inference_mode.
            with torch.inference_mode(False), torch.no_grad():
                feats = self.items.table()
                self._tables = (feats, self.att_k(feats), self.att_r(self.rating_emb.weight))
        return self._tables

    def forward(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = b["hist_mask"]
        r = self.rating_emb(b["hist_rating"])
        if self.training or torch.is_grad_enabled():
            q = self.items(b["item_idx"], b["item_row"])
            k = self.items(b["hist_idx"], b["hist_row"])
            kr = self.att_k(k) + self.att_r(r)
            a = self.att_q(q).unsqueeze(1) + kr + self.att_p(q.unsqueeze(1) * k)
            scores = self.att_out(a).squeeze(-1)
        else:
            # Frozen scoring: same math with per-row lookup tables, the q*k projection fused with the
            # adds into one GEMM, and activations in place (this loop is the scoring job's hot path).
            feats, ktab, rtab = self._eval_tables()
            q = feats[b["item_row"]]
            k = feats[b["hist_row"]]
            bsz, n, d = k.shape
            base = ktab[b["hist_row"]]
            base += rtab[b["hist_rating"]]
            base += self.att_q(q).unsqueeze(1)
            a = torch.addmm(base.view(bsz * n, -1), (q.unsqueeze(1) * k).view(bsz * n, d), self.att_p.weight.t())
            h = a.relu_()
            for layer in self.att_out:
                h = layer(h) if isinstance(layer, nn.Linear) else h.relu_()
            scores = h.view(bsz, n)
        # Masked softmax that never sees an all -inf row: an empty history pools to an explicit zero
        # vector (log(1+hist_len) = 0 tells the MLP so), never NaN.
        has_any = mask.any(dim=1, keepdim=True)
        scores = torch.where(has_any, scores.masked_fill(~mask, float("-inf")), torch.zeros_like(scores))
        w = (torch.softmax(scores, dim=1) * mask).unsqueeze(1)
        m = (mask / mask.sum(1, keepdim=True).clamp_min(1)).unsqueeze(1).to(k.dtype)
        wm = torch.cat([w, m], 1)  # [B, 2, K]: attention weights and uniform mean weights
        pooled = torch.cat([torch.bmm(wm, k), torch.bmm(wm, r)], -1).flatten(1)  # [B, 2*(d+fd)]
        parts = [self.user_emb(b["user_idx"])]
        if len(self.field_embs):
            attr = self.user_attr[b["user_row"]]
            parts += [emb(attr[:, j]) for j, emb in enumerate(self.field_embs)]
        parts += [q, pooled, b["hist_len"].unsqueeze(-1)]
        rep = self.mlp(torch.cat(parts, -1))
        return {"rep": rep, "logit": self.head(rep).squeeze(-1)}

    def loss(self, b: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out["logit"], b["label"])

    def predict(self, b: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"teacher_score": torch.sigmoid(out["logit"])}
