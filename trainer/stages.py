"""The pipeline's stages as plain functions over storage URLs, called in order by trainer/main.py.

Each stage writes under its configured URL and is skipped when its output is already complete (its
manifest / commit file exists), so a killed pipeline rerun continues where it stopped; the stages
themselves resume shard by shard (retrieval.build, teacher.score).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from retrieval import storage

STAGES = ("ingest", "embed", "samples", "teacher", "score", "train")
# `score` writes representations of every sample (for analysis or other consumers); the pipeline does not
# need it: the trainer's feed scores just the samples the LLM sees.
DEFAULT_STAGES = ("ingest", "embed", "samples", "teacher", "train")


@dataclass
class Paths:
    dataset: str
    embeddings: str
    samples: str
    teacher: str
    reps: str
    run: str
    keys: dict = field(default_factory=dict)  # stage -> the config parts its output is addressed by


def _digest(parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stage_inputs(cfg) -> dict[str, dict]:
    """The config parts each stage's output depends on, chained through the stages it reads; a stage's
    address is the digest of these. Worker counts, actor resources and output names are left out: they
    change how fast an output is built, never what it holds."""
    d = cfg.data.model_dump(mode="json")
    ingest = {k: v for k, v in d.items() if k not in ("dataset_url", "domain")}
    from retrieval.build import options_from_config

    opts = options_from_config(cfg)
    embed = ({"model": cfg.model.name_or_path, "tiny": cfg.model.tiny and cfg.model.tiny.model_dump(), "seed": cfg.run.seed,
              "pca_dim": cfg.retrieval.pca_dim, "domain": cfg.data.domain} if opts.needs_embeddings else None)
    samples = {"ingest": _digest(ingest), "embed": embed and _digest(embed), "options": opts.content_dict()}
    t = cfg.teacher.model_dump(mode="json")
    teacher = {"samples": _digest(samples), "seed": cfg.run.seed, "k_id": cfg.retrieval.k_id,
               **{k: v for k, v in t.items() if k not in ("num_workers", "train_workers", "model_url", "reps_url")}}
    reps = {"teacher": _digest(teacher), "samples": _digest(samples)}
    tr = cfg.trainer.model_dump(mode="json")
    train = {"samples": _digest(samples), "teacher": _digest(teacher), "model": cfg.model.model_dump(mode="json"),
             "max_eval_samples": cfg.retrieval.max_eval_samples, "domain": cfg.data.domain,
             "trainer": {k: v for k, v in tr.items() if k not in _RUNTIME_ONLY}}
    return {"ingest": ingest, "samples": samples, "teacher": teacher, "score": reps, "train": train}


# Trainer keys that change how a run executes, never what it learns (results are world-size independent).
_RUNTIME_ONLY = ("num_workers", "use_gpu", "cpus_per_worker", "max_failures", "placement", "worker_resources",
                 "collective_timeout_s", "resume", "overlap", "feed_workers", "feed_cpus_per_worker", "feed_timeout_s",
                 "log_every", "keep_last", "eval_batch_size", "checkpoint_every")


def _addressed(url: str, root: str, key: str) -> str:
    """Relative names are managed by the pipeline: `{output_dir}/{name}/{key}`. Absolute paths and URLs
    are the user's own and used exactly as given."""
    if "://" in url or url.startswith("/"):
        return url
    return storage.join(storage.resolve(url, root), key)


def paths(cfg) -> Paths:
    root = cfg.run.output_dir
    from retrieval.embed_items import embeddings_root

    inputs = stage_inputs(cfg)
    keys = {s: _digest(v) for s, v in inputs.items()}
    return Paths(dataset=_addressed(cfg.data.dataset_url, root, keys["ingest"]), embeddings=embeddings_root(cfg),
                 samples=_addressed(cfg.retrieval.samples_url, root, keys["samples"]),
                 teacher=_addressed(cfg.teacher.model_url, root, keys["teacher"]),
                 reps=_addressed(cfg.teacher.reps_url, root, keys["score"]), run=storage.join(root, cfg.run.name),
                 keys=keys)


def where(p: Paths) -> dict[str, str]:
    return {"ingest": p.dataset, "embed": p.embeddings, "samples": p.samples, "teacher": p.teacher, "score": p.reps,
            "train": p.run}


def record_inputs(cfg, p: Paths, stage: str) -> None:
    """`inputs.json` beside a finished stage's output: what it was built from, for people reading storage."""
    inputs = stage_inputs(cfg).get(stage)
    if inputs is not None:
        storage.write_json_atomic(storage.join(where(p)[stage], "inputs.json"), {"key": p.keys[stage], "inputs": inputs})


def trained_with_other_inputs(p: Paths) -> bool:
    """The run folder holds a run of another config (compared by the train stage's inputs key)."""
    url = storage.join(p.run, "inputs.json")
    return storage.exists(url) and storage.read_json(url).get("key") != p.keys["train"]


def done(stage: str, cfg, p: Paths) -> bool:
    marker = {"ingest": storage.join(p.dataset, "manifest.json"), "samples": storage.join(p.samples, "manifest.json"),
              "teacher": storage.join(p.teacher, "teacher.json"), "score": storage.join(p.reps, "manifest.json"),
              "train": storage.join(p.run, "metrics.json")}.get(stage)
    if stage == "embed":
        return cfg.retrieval.text_mode != "subr" and cfg.retrieval.id_mode != "sim" or _embeddings_done(p)
    if stage == "train" and trained_with_other_inputs(p):
        return False
    return marker is not None and storage.exists(marker)


def progress(stage: str, cfg, p: Paths) -> str:
    """For --dry-run: what a rerun of an unfinished stage would pick up (committed shards, checkpoints)."""
    if stage == "samples":
        from retrieval.samples import commit_marker

        from retrieval.schema import Dataset

        n = len(Dataset.open(p.dataset).shards) if done("ingest", cfg, p) else cfg.data.num_shards
        have = sum(storage.exists(commit_marker(p.samples, s)) for s in range(n))
        return f"{have}/{n} shards committed" if have else ""
    if stage == "train":
        from trainer.checkpoint import latest_complete

        if trained_with_other_inputs(p):
            return "holds a run of another config: pick a new run.name"
        ckpt = latest_complete(p.run) if storage.exists(p.run) else None
        return f"resumes from {ckpt}" if ckpt else ""
    return ""


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

    # The same settings `python -m teacher.train --config` uses (teacher.train_workers > 1: data-parallel).
    return train_teacher(p.samples, p.teacher, TeacherConfig.from_run_config(cfg), dataset_url=p.dataset)


def run_score(cfg, p: Paths) -> dict:
    from teacher.score import score_samples

    return score_samples(p.teacher, p.samples, p.reps, num_actors=cfg.teacher.num_workers, expected_rep_dim=cfg.teacher.rep_dim)
