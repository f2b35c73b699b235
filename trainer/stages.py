"""The pipeline's stages as plain functions over storage URLs, called in order by trainer/main.py.

Each stage writes under its configured URL and is skipped when its output is already complete (its
manifest / commit file exists), so a killed pipeline rerun continues where it stopped; the stages
themselves resume shard by shard (retrieval.build, teacher.score).
"""
from __future__ import annotations

from dataclasses import dataclass

from retrieval import storage
from trainer.prepare import resolve

STAGES = ("ingest", "embed", "samples", "teacher", "score", "train")


@dataclass
class Paths:
    dataset: str
    embeddings: str
    samples: str
    teacher: str
    reps: str
    run: str


def paths(cfg) -> Paths:
    root = cfg.run.output_dir
    from retrieval.embed_items import embeddings_root

    return Paths(dataset=resolve(cfg.data.dataset_url, root), embeddings=embeddings_root(cfg),
                 samples=resolve(cfg.retrieval.samples_url, root), teacher=resolve(cfg.teacher.model_url, root),
                 reps=resolve(cfg.teacher.reps_url, root), run=storage.join(root, cfg.run.name))


def done(stage: str, cfg, p: Paths) -> bool:
    marker = {"ingest": storage.join(p.dataset, "manifest.json"), "samples": storage.join(p.samples, "manifest.json"),
              "teacher": storage.join(p.teacher, "teacher.json"), "score": storage.join(p.reps, "manifest.json"),
              "train": storage.join(p.run, "metrics.json")}.get(stage)
    if stage == "embed":
        return cfg.retrieval.text_mode != "subr" and cfg.retrieval.id_mode != "sim" or _embeddings_done(p)
    return marker is not None and storage.exists(marker)


def _embeddings_done(p: Paths) -> bool:
    fs, path = storage.get_fs(p.embeddings)
    with storage.storage_errors(p.embeddings):
        return fs.exists(path) and any(fs.exists(f"{d}/meta.json") for d in fs.ls(path, detail=False))


def run_ingest(cfg, p: Paths) -> dict:
    from retrieval.ingest import ingest, options_from_config

    opts = options_from_config(cfg)
    return ingest(cfg.data.format, cfg.data.src, p.dataset, opts, items=cfg.data.items, users=cfg.data.users,
                  columns=cfg.data.columns)


def run_embed(cfg, p: Paths) -> str | None:
    """LLM item embeddings + PCA for semantic (SUBR/SIM) retrieval; cached by model and text template."""
    if cfg.retrieval.text_mode != "subr" and cfg.retrieval.id_mode != "sim":
        return None
    from retrieval.embed_items import EmbedOptions, embed_items
    from trainer.prepare import base_model_dir, worker_model_dir

    model_dir = worker_model_dir(base_model_dir(cfg, p.run))
    return embed_items(p.dataset, model_dir, p.embeddings, EmbedOptions(domain=cfg.data.domain, pca_dims=cfg.retrieval.pca_dim,
                                                                       seed=cfg.run.seed),
                       num_workers=cfg.retrieval.num_workers)


def run_samples(cfg, p: Paths, embeddings: str | None) -> dict:
    from retrieval.build import build_samples, options_from_config

    return build_samples(p.dataset, p.samples, options_from_config(cfg), num_workers=cfg.retrieval.num_workers,
                         embeddings_url=embeddings)


def run_teacher(cfg, p: Paths) -> dict:
    from teacher.config import TeacherConfig
    from teacher.train import train_teacher

    t = cfg.teacher
    tc = TeacherConfig.defaults(t.model, embed_dim=t.embed_dim, mlp_hidden=list(t.mlp_hidden), attn_layers=t.attn_layers,
                                num_heads=t.num_heads, dropout=t.dropout, weight_decay=t.weight_decay, rep_dim=t.rep_dim,
                                epochs=t.epochs, lr=t.lr,
                                batch_size=t.batch_size, patience=t.patience, seed=cfg.run.seed,
                                max_hist=cfg.retrieval.k_id)
    return train_teacher(p.samples, p.teacher, tc, dataset_url=p.dataset)


def run_score(cfg, p: Paths) -> dict:
    from teacher.score import score_samples

    return score_samples(p.teacher, p.samples, p.reps, num_actors=cfg.teacher.num_workers, expected_rep_dim=cfg.teacher.rep_dim)
