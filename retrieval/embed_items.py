"""LLM item embeddings for semantic retrieval (ReLLa SUBR, SIM): text -> mean-pooled last hidden state
-> PCA, cached on storage.

    python -m retrieval.embed_items --dataset URL --model DIR --out URL [--pca-dims 512 --batch-size 32
        --max-length 64 --domain movie --num-workers 1 --seed 0]

Items are described by short sentences ("Here is a movie. Its title is ... Its genre is ..."); a
sentence whose field is missing for an item is left out. Workers embed chunks of items and write raw parts;
the driver fits PCA (seeded) and writes

    {out}/{key}/embeddings.parquet   item_id int64, embedding list<float32> (PCA space)
    {out}/{key}/meta.json            written last: model, template, dims, explained variance
    {out}/raw-{raw_key}/part-*.parquet   raw mean-pooled vectors (before PCA), one file per task

`key` hashes the model (config + weights), the item texts, the template and every option, so a rerun
with the same inputs reuses the result and anything different gets a new folder. `raw_key` leaves out
the PCA options, so trying another pca_dims reuses the LLM pass (delete raw-* to reclaim the space).

Where the workers run is the caller's decision, never the driver's own device: with a runner (the `reclora`
command, the pipeline) every task runs on Ray actors, one GPU each when the cluster placement says so
(cluster.placement), the model loaded in `dtype` on whatever device the actor has; without one, in this process.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from configs.errors import RecloraError
from configs.loader import ConfigError, HelpFormatter, explicit_options, flag_overrides, load_config
from configs.logs import get_logger, setup_logging
from recdata import storage
from recdata.layout import embeddings_root, paths  # the pipeline's layout: this CLI and trainer/main.py agree
from recdata.model_source import load_kwargs, model_reference, resolve_model, source_kind, tokenizer_kwargs
from recdata.model_source import model_fingerprint as source_fingerprint
from recdata.runner import Runner, run_in_process
from recdata.schema import Dataset, read_parquet
from retrieval.prompts import VICUNA_SYSTEM

log = get_logger(__name__)

DEFAULT_TEMPLATE = ("Here is a {domain}.", "Its title is {title}.", "Its genre is {genres}.")


class EmbedError(RecloraError, RuntimeError):
    """Missing model files, items without text, or a cache written by something else."""


@dataclass(frozen=True)
class EmbedOptions:
    template: tuple[str, ...] = DEFAULT_TEMPLATE
    domain: str = "movie"
    wrap: str = "none"  # none | vicuna (ReLLa wraps item texts in the chat prompt) | chat (tokenizer's template)
    max_length: int = 64
    batch_size: int = 32
    pca_dims: int = 512  # 0 keeps the raw hidden size
    seed: int = 0
    dtype: str = "float32"  # float32 | bfloat16 | float16: what the worker loads the model in (part of the key)
    missing_text: str = "error"  # error | placeholder (an item without a title gets "an unknown {domain}")
    items_per_task: int = 4096


def _fields(row: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in row.items():
        if v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        s = str(v).replace("|", ", ").strip()  # genre lists are stored pipe-separated
        if s:
            out[k] = s
    return out


def item_texts(items: pa.Table, opts: EmbedOptions, where: str = "items") -> tuple[np.ndarray, list[str]]:
    """(item ids, description texts), one per item, in items-table order."""
    rows = items.to_pylist()
    texts, missing = [], []
    for row in rows:
        f = _fields(row)
        f["domain"] = opts.domain
        if "title" not in f:
            missing.append(row["item_id"])
            f["title"] = f"an unknown {opts.domain}"
        sentences = []
        for s in opts.template:
            names = re.findall(r"{(\w+)}", s)
            if all(n in f for n in names):
                sentences.append(s.format(**{n: f[n] for n in names}))
        texts.append(" ".join(sentences))
    if missing and opts.missing_text == "error":
        raise EmbedError(
            f"{where}: items without a title: {sorted(missing)[:20]} ({len(missing)} in all); fix the items or use "
            f"--missing-text placeholder (retrieval.missing_text=placeholder)"
        )
    return items.column("item_id").to_numpy().astype(np.int64), texts


def model_fingerprint(model_dir: str, model_cfg: Any = None) -> str:
    """Content address of the model, never of a local path: the hub commit for hub ids, the storage ETags
    of config + weights for s3:// URLs, the sha256 of config + weights for local folders
    (recdata.model_source.model_fingerprint)."""
    if source_kind(model_dir) == "local" and not os.path.isdir(model_dir):
        raise EmbedError(f"model folder {model_dir} does not exist")
    return source_fingerprint(model_dir, model_cfg)


def cache_key(
    model_fp: str, ids: np.ndarray, texts: list[str], opts: EmbedOptions, ignore: tuple[str, ...] = ()
) -> str:
    h = hashlib.sha256()
    h.update(model_fp.encode())
    skip = {"batch_size", *ignore}  # batch size changes padding only, and pooling ignores padding
    h.update(json.dumps({k: v for k, v in asdict(opts).items() if k not in skip}, sort_keys=True).encode())
    h.update(ids.tobytes())
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()[:20]


def _part_truncated(url: str) -> int:
    fs, path = storage.get_fs(url)
    with storage.storage_errors(url), fs.open(path, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    return int(meta.get(b"truncated", b"0"))


class EmbedWorker:
    """Embeds chunks of item texts with one loaded model. Plain Python (runs in-process or as an actor)."""

    def __init__(self, model_dir: str, opts: dict[str, Any], model_cfg: dict[str, Any] | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.opts = EmbedOptions(**{**opts, "template": tuple(opts["template"])})
        # Decided here, on the worker: the GPU Ray gave this actor (CUDA_VISIBLE_DEVICES), or none.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # The requested dtype on any device: it is part of the cache key, so the vectors are what the key says.
        dtype = getattr(torch, self.opts.dtype)
        # `model_dir` is a model reference (hub id, s3:// URL, folder): fetched once into this node's cache.
        local = resolve_model(model_dir, model_cfg)
        self.tok = AutoTokenizer.from_pretrained(local, **tokenizer_kwargs(model_cfg))
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype, **load_kwargs(model_cfg))
        # The decoder stack alone: its last_hidden_state is the (final-normed) input to lm_head.
        self.model = getattr(model, "base_model", model).to(self.device).eval()
        self.torch = torch

    def _wrap(self, text: str) -> str:
        if self.opts.wrap == "vicuna":
            return f"{VICUNA_SYSTEM} USER: {text} ASSISTANT:"
        if self.opts.wrap == "chat":
            return self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
        return text

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embed_counted(texts)[0]

    def embed_counted(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """(vectors, number of texts cut at max_length). A chat wrapper's system prompt can eat the
        whole budget and cut the item text itself, so the driver reports the count."""
        torch = self.torch
        texts = [self._wrap(t) for t in texts]
        lengths = [len(ids) for ids in self.tok(texts)["input_ids"]]
        truncated = sum(n > self.opts.max_length for n in lengths)
        order = np.argsort(lengths, kind="stable")  # similar lengths per batch: less padding
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for b in range(0, len(texts), self.opts.batch_size):
                idx = order[b : b + self.opts.batch_size]
                enc = self.tok(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.opts.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out[idx] = pooled.float().cpu().numpy()
        return out, truncated

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        url = task["part_url"]
        if storage.exists(url):  # parts are committed atomically; a resumed job reuses them
            return {"part_url": url, "rows": len(task["item_ids"]), "skipped": True, "device": self.device}
        vec, truncated = self.embed_counted(task["texts"])
        table = pa.table({"item_id": pa.array(task["item_ids"], pa.int64()), "embedding": _list_column(vec)})
        table = table.replace_schema_metadata({"truncated": str(truncated)})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        storage.write_bytes_atomic(url, buf.getvalue())
        return {"part_url": url, "rows": len(vec), "skipped": False, "truncated": truncated, "device": self.device}


def _list_column(vec: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(vec.astype(np.float32).ravel()), vec.shape[1]).cast(
        pa.list_(pa.float32())
    )


def _matrix(table: pa.Table) -> np.ndarray:
    emb = table.column("embedding").combine_chunks()
    n = table.num_rows
    return (
        emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, -1)
        if n
        else np.zeros((0, 0), np.float32)
    )


def pca_reduce(x: np.ndarray, dims: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Seeded PCA to min(dims, n_items, hidden) components; dims=0 keeps x."""
    if dims == 0:
        return x.astype(np.float32), {"pca_dims": 0}
    from sklearn.decomposition import PCA

    k = min(dims, x.shape[0], x.shape[1])
    pca = PCA(n_components=k, random_state=seed)
    y = pca.fit_transform(x.astype(np.float64))
    return y.astype(np.float32), {"pca_dims": int(k), "explained_variance": float(pca.explained_variance_ratio_.sum())}


def embed_items(
    dataset_url: str,
    model_dir: str,
    out_url: str,
    opts: EmbedOptions | None = None,
    num_workers: int = 1,
    gpus_per_worker: float | None = None,
    runner: Runner | None = None,
    model_cfg: dict[str, Any] | None = None,
) -> str:
    """Embed every item of the dataset (or reuse the cached result). Returns the embeddings folder URL.
    `model_dir` is a model reference (hub id, s3:// URL or folder) that each worker resolves on its own
    node; `model_cfg` the config's `model` section (revision, allow_pickle, trust_remote_code).

    With a `runner` every task runs on its workers (Ray actors), `num_workers` of them with `gpus_per_worker`
    GPUs each (default 0: the caller, which can ask the cluster, decides; cluster.placement); without one, in
    this process on its own device."""
    opts = opts or EmbedOptions()
    if opts.wrap not in ("none", "vicuna", "chat"):
        raise EmbedError(f"wrap must be none, vicuna or chat, got {opts.wrap!r}")
    ids, texts = item_texts(Dataset.open(dataset_url).read_items(), opts, storage.join(dataset_url, "items.parquet"))
    model_fp = model_fingerprint(model_dir, model_cfg)
    folder = storage.join(out_url, cache_key(model_fp, ids, texts, opts))
    meta_url = storage.join(folder, "meta.json")
    if storage.exists(meta_url):
        return folder
    t0 = time.perf_counter()
    # Raw (pre-PCA) vectors are cached apart from the PCA result: another pca_dims or seed reuses them
    # instead of running the LLM again.
    parts_url = storage.join(out_url, "raw-" + cache_key(model_fp, ids, texts, opts, ignore=("pca_dims", "seed")))
    tasks = [
        {
            "item_ids": ids[i : i + opts.items_per_task].tolist(),
            "texts": texts[i : i + opts.items_per_task],
            "part_url": storage.join(parts_url, f"part-{i // opts.items_per_task:05d}.parquet"),
        }
        for i in range(0, len(ids), opts.items_per_task)
    ]
    kwargs = {"model_dir": model_dir, "opts": asdict(opts), "model_cfg": model_cfg}
    todo = [t for t in tasks if not storage.exists(t["part_url"])]  # cached parts need no model at all
    run = runner if runner is not None else run_in_process
    done = run(
        EmbedWorker,
        kwargs,
        todo,
        num_actors=num_workers,
        num_gpus_per_actor=gpus_per_worker or 0.0,
        desc="embed items",
    )
    truncated = sum(_part_truncated(t["part_url"]) for t in tasks)
    if truncated:
        log.warning(
            "%d of %d item texts were cut at max_length=%d tokens (wrap=%s); raise --max-length if the cut reaches "
            "the title",
            truncated,
            len(ids),
            opts.max_length,
            opts.wrap,
        )
    raw = pa.concat_tables([read_parquet(t["part_url"]) for t in tasks])
    if not np.array_equal(raw.column("item_id").to_numpy(), ids):
        raise EmbedError(f"{parts_url}: parts do not cover the items in order; delete {folder} and rerun")
    x = _matrix(raw)
    vec, info = pca_reduce(x, opts.pca_dims, opts.seed)
    table = pa.table({"item_id": pa.array(ids, pa.int64()), "embedding": _list_column(vec)})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes_atomic(storage.join(folder, "embeddings.parquet"), buf.getvalue())
    meta = {
        "model_dir": model_dir,
        "dataset": dataset_url,
        "num_items": int(len(ids)),
        "dim": int(vec.shape[1]),
        "hidden_size": int(x.shape[1]),
        "options": asdict(opts),
        **info,
        "seconds": round(time.perf_counter() - t0, 3),
        "example_text": texts[0] if texts else "",
        "truncated_texts": truncated,
        "devices": sorted({r["device"] for r in done if r and "device" in r}),  # where this run's parts were made
    }
    storage.write_json_atomic(meta_url, meta)
    return folder


def main(argv: list[str] | None = None, runner: Runner | None = None, place: Callable | None = None) -> int:
    """Ray workers come from `runner` (the `reclora` command passes cluster.pool.run_sharded); without one,
    every task runs in this process. `place(workers=, dtype=, model=, model_cfg=, run_cfg=) -> (workers, gpus
    per worker, dtype)` is where the runner's workers go (the `reclora` command asks the Ray cluster, and refuses
    a large model on CPU: cluster.placement); it raises a RecloraError to refuse."""
    p = argparse.ArgumentParser(
        prog="python -m retrieval.embed_items", description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument(
        "--config",
        help="preset or YAML: dataset, output folder, PCA size, domain, seed, workers and missing-text rule from "
        "it; an option below given explicitly overrides the config's value (--pca-dims 8 == retrieval.pca_dim=8)",
    )
    p.add_argument("overrides", nargs="*", help="key.path=value overrides for --config")
    p.add_argument("--dataset", help="committed dataset URL (default: the config's, with --config)")
    p.add_argument(
        "--model",
        help="the model: a Hugging Face folder (config.json + safetensors + tokenizer), an s3:// prefix or a hub "
        "id (org/name[@revision]); with --config, defaults to model.name_or_path",
    )
    p.add_argument(
        "--out", help="cache root URL; the result goes to {out}/{key}/ (default: the config's, with --config)"
    )
    p.add_argument("--pca-dims", type=int, default=EmbedOptions.pca_dims)
    p.add_argument("--batch-size", type=int, default=EmbedOptions.batch_size)
    p.add_argument("--max-length", type=int, default=EmbedOptions.max_length)
    p.add_argument("--domain", default=EmbedOptions.domain)
    p.add_argument(
        "--template",
        default=None,
        help="sentences separated by ' || ', e.g. 'Here is a {domain}. || Its title is {title}.'",
    )
    p.add_argument("--wrap", choices=["none", "vicuna", "chat"], default="none")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="model dtype on GPU workers (default: model.dtype with --config, else float32); CPU workers use float32",
    )
    p.add_argument("--missing-text", choices=["error", "placeholder"], default="error")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    setup_logging()
    if a.config:
        keys = {
            "pca_dims": "retrieval.pca_dim",
            "domain": "data.domain",
            "seed": "run.seed",
            "num_workers": "retrieval.num_workers",
            "missing_text": "retrieval.missing_text",
        }
        try:
            cfg = load_config(a.config, a.overrides + flag_overrides(a, explicit_options(p, argv), keys))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

        a.dataset = a.dataset or paths(cfg).dataset
        a.out = a.out or embeddings_root(cfg)
        a.pca_dims, a.domain, a.seed, a.num_workers, a.missing_text = (
            cfg.retrieval.pca_dim,
            cfg.data.domain,
            cfg.run.seed,
            cfg.retrieval.num_workers,
            cfg.retrieval.missing_text,
        )
        if not a.model:
            if cfg.model.tiny:
                print(
                    f"error: --model: the tiny preset's random model is built by the run; pass --model DIR, or run "
                    f"`python trainer/main.py --config {a.config} --stages embed`",
                    file=sys.stderr,
                )
                return 2
            try:
                a.model = model_reference(cfg.model)
            except RecloraError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        model_cfg = cfg.model.model_dump()
    else:
        model_cfg = None
    missing = [n for n in ("dataset", "model", "out") if not getattr(a, n)]
    if missing:
        print(f"error: missing {', '.join('--' + m for m in missing)} (or use --config)", file=sys.stderr)
        return 2
    template = tuple(s.strip() for s in a.template.split("||")) if a.template else DEFAULT_TEMPLATE
    dtype = a.dtype or (cfg.model.dtype if a.config else "float32")
    gpus = 0.0
    if place is not None and runner is not None:
        try:
            a.num_workers, gpus, dtype = place(
                workers=a.num_workers,
                dtype=dtype,
                model=a.model,
                model_cfg=model_cfg,
                run_cfg=cfg.run if a.config else None,
            )
        except RecloraError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif runner is not None or not torch.cuda.is_available():
        dtype = "float32"  # CPU workers
    opts = EmbedOptions(
        template=template,
        domain=a.domain,
        wrap=a.wrap,
        max_length=a.max_length,
        batch_size=a.batch_size,
        pca_dims=a.pca_dims,
        seed=a.seed,
        dtype=dtype,
        missing_text=a.missing_text,
    )
    try:
        folder = embed_items(
            a.dataset, a.model, a.out, opts, a.num_workers, gpus_per_worker=gpus, runner=runner, model_cfg=model_cfg
        )
    except (RecloraError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {"embeddings": folder, **storage.read_json(storage.join(folder, "meta.json"))}, indent=2, default=str
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
