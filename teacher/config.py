"""Teacher (CRM) configuration. Field names follow `configs.schema.TeacherConfig`; the typed run config
maps onto it with `TeacherConfig.from_run_config(cfg)`. The extra fields are the ones the run config
does not carry yet."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from configs.errors import RecloraError

MODELS = ("din", "sasrec")


class TeacherConfigError(RecloraError, ValueError):
    pass


@dataclass
class TeacherConfig:
    model: str = "din"
    # DIN: id embedding size (user/item ids); SASRec: hidden size = representation size.
    embed_dim: int = 32
    # DIN: the MLP over [profile fields | target item | attended history]; its last layer is the gate rep.
    mlp_hidden: list[int] = field(default_factory=lambda: [256, 256, 256])
    # DIN: layers of the target-attention MLP; SASRec: number of self-attention blocks.
    attn_layers: int = 2
    num_heads: int = 1
    dropout: float = 0.1
    rep_dim: int = 256
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 1024
    patience: int = 2
    num_workers: int = 2  # scoring actors
    # Data-parallel training workers (Ray Train + DistributedDataParallel); 1 trains in-process without Ray.
    train_workers: int = 1
    # ---- not (yet) in the run config ----
    max_hist: int = 60  # K_id: most recent (or retrieved) history items fed to the model
    field_dim: int = 8  # profile fields, year, rating bucket
    genre_dim: int = 16
    attn_hidden: int = (
        32  # width of DIN's first attention layer (halved per further layer); 32 keeps scoring >20k samples/s/core
    )
    weight_decay: float = 0.0
    # Share of training ids replaced by the reserved UNK id, so UNK is trained and the model does not lean
    # on ids it will not see at inference. Users get a high rate: with a global time split most valid/test
    # users are new (ML-100K: 86% of test samples), and their profile and history must carry the signal.
    id_dropout: float = 0.01
    user_dropout: float = 0.5
    seed: int = 0
    num_threads: int = 2
    max_valid_samples: int = 200_000
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        self.mlp_hidden = [int(x) for x in self.mlp_hidden]
        self.validate()

    @classmethod
    def defaults(cls, model: str, **overrides: Any) -> "TeacherConfig":
        """Paper defaults: DIN as in RecLoRA's CRM (embed 32, MLP 256x3, K_id 60), with dropout 0.3 and
        weight decay 0.05 chosen on ML-100K validation AUC; SASRec as in LLaRA/iLoRA (hidden 64,
        2 blocks, 1 head, state size 10)."""
        if model == "sasrec":
            # lr 3e-3 / batch 512: on LastFM this reaches in 2 epochs what 1e-3 / 256 reaches in 5.
            base = dict(
                model="sasrec",
                embed_dim=64,
                rep_dim=64,
                attn_layers=2,
                num_heads=1,
                dropout=0.1,
                batch_size=512,
                lr=3e-3,
                max_hist=10,
                epochs=10,
                patience=3,
            )
        elif model == "din":
            base = dict(model="din", dropout=0.3, weight_decay=0.05, epochs=8)
        else:
            raise TeacherConfigError(f"model: expected one of {MODELS}, got {model!r}")
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_run_config(cls, run_cfg: Any, **overrides: Any) -> "TeacherConfig":
        """From the typed run config (configs.schema.Config): its `teacher` section, `run.seed`, and
        `retrieval.k_id` as the history length. Fields the run config does not carry keep the model's
        defaults (`defaults(model)`), except that a data-parallel worker uses one thread: Ray reserves
        `num_threads` CPUs per training worker, so N workers fit on N cores."""
        t = run_cfg.teacher
        base: dict[str, Any] = dict(
            embed_dim=t.embed_dim,
            mlp_hidden=list(t.mlp_hidden),
            attn_layers=t.attn_layers,
            num_heads=t.num_heads,
            dropout=t.dropout,
            weight_decay=t.weight_decay,
            rep_dim=t.rep_dim,
            epochs=t.epochs,
            lr=t.lr,
            batch_size=t.batch_size,
            patience=t.patience,
            num_workers=t.num_workers,
            train_workers=t.train_workers,
            seed=run_cfg.run.seed,
            max_hist=run_cfg.retrieval.k_id,
        )
        if t.train_workers > 1:
            base["num_threads"] = 1
        return cls.defaults(t.model, **{**base, **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> "TeacherConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        merged = {**d, **overrides}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise TeacherConfigError(f"unknown teacher config keys: {unknown}; known: {sorted(known)}")
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        if self.model not in MODELS:
            raise TeacherConfigError(f"model: expected one of {MODELS}, got {self.model!r}")
        if self.model == "din" and self.rep_dim != self.mlp_hidden[-1]:
            raise TeacherConfigError(
                f"rep_dim: DIN's representation is its last MLP layer, so rep_dim must equal mlp_hidden[-1] "
                f"({self.mlp_hidden[-1]}), got {self.rep_dim}"
            )
        if self.model == "sasrec" and self.rep_dim != self.embed_dim:
            raise TeacherConfigError(
                f"rep_dim: SASRec's representation is its hidden state, so rep_dim must equal embed_dim "
                f"({self.embed_dim}), got {self.rep_dim}"
            )
        if self.model == "sasrec" and self.embed_dim % self.num_heads:
            raise TeacherConfigError(f"num_heads: {self.num_heads} does not divide embed_dim {self.embed_dim}")
        for name in (
            "embed_dim",
            "attn_layers",
            "num_heads",
            "rep_dim",
            "epochs",
            "batch_size",
            "max_hist",
            "field_dim",
            "genre_dim",
            "attn_hidden",
            "num_threads",
            "max_valid_samples",
            "train_workers",
        ):
            if int(getattr(self, name)) < 1:
                raise TeacherConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("dropout", "id_dropout", "user_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise TeacherConfigError(f"{name}: must lie in [0, 1), got {getattr(self, name)}")
        if self.patience < 0:
            raise TeacherConfigError(f"patience: must be >= 0, got {self.patience}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TeacherConfigError(f"device: expected auto|cpu|cuda, got {self.device!r}")

    @property
    def task(self) -> str:
        return "ctr" if self.model == "din" else "next_item"
