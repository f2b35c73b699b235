"""Teacher (CRM) configuration: `configs.schema.TeacherModelConfig` (the run config's `teacher` section,
same fields, defaults and checks) plus the settings the run config does not carry. The typed run config
maps onto it with `TeacherConfig.from_run_config(cfg)`; `TeacherConfig.defaults(model)` gives the
papers' settings for a model."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError

from configs.errors import RecloraError
from configs.schema import TeacherModelConfig

MODELS = ("din", "sasrec")


class TeacherConfigError(RecloraError, ValueError):
    pass


class TeacherConfig(TeacherModelConfig):
    # ---- not (yet) in the run config ----
    max_hist: int = Field(60, ge=1)  # K_id: most recent (or retrieved) history items fed to the model
    field_dim: int = Field(8, ge=1)  # profile fields, year, rating bucket
    genre_dim: int = Field(16, ge=1)
    # Width of DIN's first attention layer (halved per further layer); 32 keeps scoring >20k samples/s/core.
    attn_hidden: int = Field(32, ge=1)
    # Share of training ids replaced by the reserved UNK id, so UNK is trained and the model does not lean
    # on ids it will not see at inference. Users get a high rate: with a global time split most valid/test
    # users are new (ML-100K: 86% of test samples), and their profile and history must carry the signal.
    id_dropout: float = Field(0.01, ge=0, lt=1)
    user_dropout: float = Field(0.5, ge=0, lt=1)
    seed: int = 0
    num_threads: int = Field(2, ge=1)
    max_valid_samples: int = Field(200_000, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __init__(self, **data: Any) -> None:
        # One error type for callers (the CLIs exit 2 on it); the message names the field.
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise TeacherConfigError(describe_errors(e)) from None

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
                weight_decay=0.0,
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
        base: dict[str, Any] = t.model_dump(include=set(TeacherModelConfig.model_fields))
        base.update(seed=run_cfg.run.seed, max_hist=run_cfg.retrieval.k_id)
        if t.train_workers > 1:
            base["num_threads"] = 1
        base.pop("model")
        return cls.defaults(t.model, **{**base, **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> "TeacherConfig":
        merged = {**d, **overrides}
        unknown = sorted(set(merged) - set(cls.model_fields))
        if unknown:
            raise TeacherConfigError(f"unknown teacher config keys: {unknown}; known: {sorted(cls.model_fields)}")
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def task(self) -> str:
        return "ctr" if self.model == "din" else "next_item"


def describe_errors(e: ValidationError) -> str:
    """`field: problem` per error, as the run config's loader words them (without the section)."""
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "value_error":
            lines.append(msg)  # the model's own checks start with the field they check
        elif err["type"] == "extra_forbidden":
            lines.append(f"unknown teacher config keys: [{key!r}]")
        else:
            lines.append(f"{key}: {msg}, got {err.get('input')!r}")
    return "; ".join(lines)
