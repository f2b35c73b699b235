"""Batch prediction with a trained run: requests Parquet in, predictions Parquet out.

    python -m trainer.predict --run URL --requests URL --out URL [--num-workers N] [--batch-size B]
        [--rows-per-task R] [--device auto|cpu|cuda] [--cpus-per-worker C] [--overwrite] [--return-cond]

Every request (user_id, item_id, optional timestamp; next_item: optional candidates) goes through the
path the run was trained and evaluated on: sample record by the samples' own retrieval options
(retrieval.requests: history strictly before the request time, SUBR with the run's item embeddings),
the frozen teacher's representation and score, the prompt (retrieval.prompts) and its tokens
(recdata.streams.encode_rows), then the base LLM with the run's personalized adapter: CTR p(yes) as in
evaluation, next item the candidates' log-likelihood scores and their ranking. A request that cannot be
answered keeps its row, with a null prediction and a `reason` (docs/predict.md lists them).

Requests are sharded by the dataset shard of their user (one interaction file per task) and cut into
tasks of at most --rows-per-task rows (trainer/requests_io.py reads the requests and defines the output
schema); each task is run by a PredictWorker (trainer/predict_worker.py; plain class: Ray actors through
cluster.pool, or in this process with --num-workers 0) and written as

    {out}/part-00000.parquet          the predictions of task 0 (written under a temporary name first)
    {out}/_commits/part-00000.json    commit marker: written after the part is complete
    {out}/_manifest.json              written last: parts, row and reason counts, what was used

A rerun skips committed parts with the same fingerprint (requests content, run, adapter, teacher, task
size), so a killed job resumes; other inputs into the same --out are refused (use --overwrite). Names
starting with "_" are ignored by Parquet readers, so `pandas.read_parquet(out)` reads just the rows
(`read_predictions(out)` returns them in request order).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import posixpath
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

# Runnable as a script (`python trainer/predict.py`) as well as a module.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.loader import ConfigError, HelpFormatter, validate  # noqa: E402
from recdata import storage  # noqa: E402
from recdata.layout import latest_embeddings, paths  # noqa: E402
from recdata.model_source import ModelSourceError, model_reference  # noqa: E402
from recdata.runner import Runner, run_in_process  # noqa: E402
from recdata.samples import BuildOptions, SamplesError, SampleSet  # noqa: E402
from recdata.schema import Dataset, DatasetError  # noqa: E402
from teacher.model_io import META_FILE, TeacherLoadError  # noqa: E402
from trainer.lora import GATES_FILE, MIXTURE_CONFIG_FILE, PEFT_WEIGHTS_FILE  # noqa: E402
from trainer.predict_worker import PredictWorker  # noqa: E402
from trainer.requests_io import (  # noqa: E402
    COMMITS,
    FORMAT,
    MANIFEST,
    REQUIRED_COLUMNS,
    ROW_REASONS,
    PredictInputError,
    marker_name,
    output_schema,
    part_name,
    plan_tasks,
    read_predictions,
    read_requests,
)

__all__ = [
    "COMMITS",
    "FORMAT",
    "MANIFEST",
    "REQUIRED_COLUMNS",
    "ROW_REASONS",
    "PredictInputError",
    "PredictWorker",
    "load_run_config",
    "main",
    "marker_name",
    "output_schema",
    "part_name",
    "plan_tasks",
    "predict",
    "read_predictions",
    "read_requests",
    "run_inputs",
    "summary_line",
]


def load_run_config(run_url: str):
    """The resolved config trainer/main.py saved with the run (read as bytes: the run may be on s3)."""
    import yaml

    url = storage.join(run_url, "config.yaml")
    if not storage.exists(url):
        raise PredictInputError(
            f"{url} not found: {run_url} is not a run folder (trainer/main.py writes config.yaml there)"
        )
    fs, path = storage.get_fs(url)
    with storage.storage_errors(url):
        data = yaml.safe_load(fs.cat_file(path).decode("utf-8"))
    if not isinstance(data, dict):
        raise PredictInputError(f"{url}: expected a YAML mapping")
    return validate(data)


def run_inputs(cfg, run_url: str) -> dict[str, Any]:
    """Where the run's dataset, samples options, embeddings, teacher, base model and adapter are."""

    if cfg.data.format == "prompts":
        # A prompt-file run (the TALLRec baseline) has no retrieval, samples or teacher to build requests from.
        raise PredictInputError(
            f"{run_url}: a prompt-file run (data.format=prompts) takes no prediction requests; to score more prompt "
            f"files, name them as data.prompt_files.test and rerun the pipeline with another run.name"
        )
    p = paths(cfg)
    samples = SampleSet.open(p.samples)
    if samples.task != cfg.data.task:
        raise PredictInputError(
            f"{run_url}: data.task is {cfg.data.task!r} but {p.samples} holds {samples.task!r} samples"
        )
    options = dict(samples.options)
    embeddings = None

    if BuildOptions.from_dict(options).needs_embeddings:
        # The exact folder the samples were built with; the newest under the cache root otherwise.
        embeddings = samples.manifest.get("embeddings")
        if not embeddings or not storage.exists(storage.join(embeddings, "meta.json")):
            embeddings = latest_embeddings(p.embeddings)
        if embeddings is None:
            raise PredictInputError(
                f"{p.samples}: built with text_mode={options['text_mode']}/id_mode={options['id_mode']}, "
                f"which needs item embeddings, and none are under {p.embeddings}"
            )
    if not storage.exists(storage.join(p.teacher, META_FILE)):
        raise PredictInputError(
            f"{p.teacher}: no trained teacher ({META_FILE}); the run's teacher stage did not finish"
        )
    adapter = storage.join(run_url, "adapter")
    if not storage.exists(storage.join(adapter, MIXTURE_CONFIG_FILE)):
        raise PredictInputError(
            f"{adapter}: no trained adapter ({MIXTURE_CONFIG_FILE}); has the run finished training?"
        )
    if cfg.model.tiny is not None:
        # The tiny preset's random base lives with the run; rebuilding it here could silently differ.
        model_url = storage.join(run_url, "base_model")
        if not storage.exists(storage.join(model_url, "config.json")):
            raise PredictInputError(f"{model_url}: the run's tiny base model is missing")
        model_dir = storage.get_fs(model_url)[1] if storage.is_local(model_url) else model_url
    else:
        model_dir = model_reference(cfg.model)  # each actor fetches it on its own node
    out = {
        "dataset": p.dataset,
        "samples": p.samples,
        "options": options,
        "embeddings": embeddings,
        "teacher": p.teacher,
        "model_dir": model_dir,
        "adapter": adapter,
    }
    if cfg.trainer.hybrid_item_emb:
        out["item_emb"] = storage.join(run_url, "data", "item_emb.safetensors")
        if not storage.exists(out["item_emb"]):
            raise PredictInputError(f"{out['item_emb']}: hybrid item tokens need the run's teacher item table")
    return out


def _sha_of(urls: list[str]) -> str:
    h = hashlib.sha256()
    for url in urls:
        if storage.exists(url):
            fs, path = storage.get_fs(url)
            with storage.storage_errors(url):
                h.update(fs.cat_file(path))
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- the driver
def predict(
    run_url: str,
    requests_url: str,
    out_url: str,
    num_workers: int = 1,
    batch_size: int = 16,
    rows_per_task: int = 1024,
    device: str = "auto",
    cpus_per_worker: float = 1.0,
    overwrite: bool = False,
    runner: Runner | None = None,
    return_cond: bool = False,
) -> dict[str, Any]:
    """Score every request; returns the manifest (also written to {out}/_manifest.json). `return_cond` adds the
    gate input of each request (column `cond`), which `trainer.export` folds into a standard LoRA adapter."""

    if rows_per_task < 1 or batch_size < 1 or num_workers < 0:
        raise PredictInputError(
            f"--rows-per-task and --batch-size must be >= 1 and --num-workers >= 0, got "
            f"{rows_per_task}, {batch_size}, {num_workers}"
        )
    # Before the run, the requests or the model are loaded: a file or read-only folder at --out.
    storage.check_writable(out_url, "--out")
    t0 = time.perf_counter()
    cfg = load_run_config(run_url)
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region, cfg.storage.anon or None)
    inputs = run_inputs(cfg, run_url)
    dataset = Dataset.open(inputs["dataset"])
    # A dataset ingested from string ids: requests speak the source's keys, outputs carry them back.
    id_maps = {c: m for c in ("user_id", "item_id") if (m := dataset.id_map(c)) is not None}
    req, req_digest = read_requests(requests_url, cfg.data.task, id_maps)
    num_shards = len(dataset.shards)
    tasks = plan_tasks(req, num_shards, rows_per_task)

    teacher_sha = storage.read_json(storage.join(inputs["teacher"], META_FILE))["sha256"]
    adapter_sha = _sha_of(
        [storage.join(inputs["adapter"], f) for f in (PEFT_WEIGHTS_FILE, GATES_FILE, "projector.safetensors")]
    )
    fingerprint = storage.digest(
        {
            "format": FORMAT,
            "requests": req_digest,
            "config": cfg.model_dump(mode="json"),
            "adapter": adapter_sha,
            "teacher": teacher_sha,
            "inputs": {k: str(v) for k, v in inputs.items()},
            "rows_per_task": rows_per_task,
            **({"return_cond": True} if return_cond else {}),  # without it: the fingerprint of earlier versions
        }
    )

    if overwrite:
        storage.rm(out_url)
    murl = storage.join(out_url, MANIFEST)
    if storage.exists(murl) and storage.read_json(murl).get("fingerprint") != fingerprint:
        raise PredictInputError(
            f"{murl}: predictions of other inputs (requests, run or options) are there; use a new --out or --overwrite"
        )
    _clean_temp(out_url)
    committed = _committed_parts(out_url, fingerprint)

    use_gpu = device == "cuda" or (device == "auto" and _cuda_available())
    kwargs = {
        "config": cfg.model_dump(mode="json"),
        "inputs": inputs,
        "out_url": out_url,
        "fingerprint": fingerprint,
        "batch_size": batch_size,
        "device": device,
        "num_threads": max(1, int(cpus_per_worker)),
        "s3_endpoint": storage.s3_endpoint(),
        "return_cond": return_cond,
    }
    # Committed parts are answered from their markers: a finished rerun loads no model and starts no actor.
    todo = [t for t in tasks if t["part"] not in committed]
    print(
        f"[predict] {req['rows']} requests in {len(tasks)} part(s), {len(tasks) - len(todo)} already committed "
        f"-> {out_url}",
        flush=True,
    )
    if not todo:
        built = []
    else:
        run = runner if runner is not None and num_workers > 0 else run_in_process
        built = run(
            PredictWorker,
            kwargs,
            todo,
            num_actors=num_workers,
            num_cpus_per_actor=cpus_per_worker,
            num_gpus_per_actor=1.0 if use_gpu else 0.0,
            desc="predict",
        )
    by_part = {**{k: {**v, "skipped": True} for k, v in committed.items()}, **{r["part"]: r for r in built}}
    results = [by_part[t["part"]] for t in tasks]
    reasons: Counter = Counter()
    for r in results:
        reasons.update(r["reasons"])
    manifest = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "run": run_url,
        "requests": requests_url,
        "task": cfg.data.task,
        "rows": req["rows"],
        "predicted": sum(r["predicted"] for r in results),
        "reasons": dict(sorted(reasons.items())),
        "parts": [{"path": r["path"], "rows": r["rows"]} for r in results],
        "parts_built": sum(not r["skipped"] for r in results),
        "parts_skipped": sum(bool(r["skipped"]) for r in results),
        "history_truncated": sum(r.get("history_truncated", 0) for r in results),
        "prompt_truncated": sum(r.get("prompt_truncated", 0) for r in results),
        "inputs": {k: str(v) for k, v in inputs.items() if k != "options"},
        "options": inputs["options"],
        "columns": output_schema(cfg.data.task, return_cond=return_cond).names,
        "id_maps": {
            c: storage.join(inputs["dataset"], dataset.manifest["id_maps"][c]["path"]) for c in sorted(id_maps)
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if sum(p["rows"] for p in manifest["parts"]) != req["rows"]:
        raise RuntimeError(
            f"{out_url}: parts hold {sum(p['rows'] for p in manifest['parts'])} rows for {req['rows']} requests"
        )
    storage.write_json_atomic(murl, manifest)
    return manifest


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _clean_temp(out_url: str) -> None:
    """Temporary files of a killed run (never committed): storage's atomic writes name them "<name>.tmp-<id>";
    "_tmp-*" are those of earlier versions."""
    fs, root = storage.get_fs(out_url)
    with storage.storage_errors(out_url):
        for pattern in ("*.tmp-*", "_tmp-*", f"{COMMITS}/*.tmp-*", f"{COMMITS}/_tmp-*"):
            for f in fs.glob(posixpath.join(root, pattern)):
                fs.rm(f)


def _committed_parts(out_url: str, fingerprint: str) -> dict[int, dict[str, Any]]:
    """Markers of committed parts, by part number. Parts committed by a prediction of other inputs (an
    interrupted run leaves markers but no manifest) are refused before any worker starts."""
    fs, root = storage.get_fs(out_url)
    out = {}
    with storage.storage_errors(out_url):
        for f in sorted(fs.glob(posixpath.join(root, COMMITS, "part-*.json"))):
            m = json.loads(fs.cat_file(f).decode("utf-8"))
            if m.get("fingerprint") != fingerprint:
                raise PredictInputError(
                    f"{storage.join(out_url, COMMITS, posixpath.basename(f))}: committed by a prediction "
                    f"with other inputs (requests, run or options); use a new --out or --overwrite"
                )
            out[int(m["part"])] = m
    return out


def summary_line(m: dict[str, Any]) -> str:
    bad = sum(m["reasons"].values())
    why = ", ".join(f"{k} {v}" for k, v in m["reasons"].items())
    return (
        f"[predict] {m['rows']} requests: {m['predicted']} predicted, {bad} with a reason"
        + (f" ({why})" if why else "")
        + f"; parts: {m['parts_built']} built, {m['parts_skipped']} skipped; {m['seconds']:.1f}s"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer.predict", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("--run", required=True, help="trained run folder (holds config.yaml and adapter/)")
    p.add_argument("--requests", required=True, help="Parquet with user_id, item_id[, timestamp][, candidates]")
    p.add_argument("--out", required=True, help="output folder URL (parts, commit markers, _manifest.json)")
    p.add_argument("--num-workers", type=int, default=1, help="Ray actors; 0 = in this process")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per LLM forward")
    p.add_argument("--rows-per-task", type=int, default=1024, help="requests per output part (the unit of resume)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per actor (also its torch threads)")
    p.add_argument("--overwrite", action="store_true", help="delete --out first")
    p.add_argument(
        "--return-cond",
        action="store_true",
        help="add column `cond`: each request's gate input (the teacher representation; see trainer.export)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None, runner: Runner | None = None) -> int:
    """Ray workers come from `runner` (the `reclora` command passes cluster.pool.run_sharded); without one,
    every task runs in this process."""
    a = parse_args(argv)

    try:
        m = predict(
            a.run,
            a.requests,
            a.out,
            runner=runner,
            num_workers=a.num_workers,
            batch_size=a.batch_size,
            rows_per_task=a.rows_per_task,
            device=a.device,
            cpus_per_worker=a.cpus_per_worker,
            overwrite=a.overwrite,
            return_cond=a.return_cond,
        )
    except (
        PredictInputError,
        ConfigError,
        SamplesError,
        DatasetError,
        TeacherLoadError,
        ModelSourceError,
        storage.StorageError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_line(m))
    print(f"predictions: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
