"""Batch prediction with a trained run: requests Parquet in, predictions Parquet out.

    python -m trainer.predict --run URL --requests URL --out URL [--num-workers N] [--batch-size B]
        [--rows-per-task R] [--device auto|cpu|cuda] [--cpus-per-worker C] [--overwrite]

Every request (user_id, item_id, optional timestamp; next_item: optional candidates) goes through the
path the run was trained and evaluated on: sample record by the samples' own retrieval options
(retrieval.requests: history strictly before the request time, SUBR with the run's item embeddings),
the frozen teacher's representation and score, the prompt (retrieval.prompts) and its tokens
(recdata.streams.encode_rows), then the base LLM with the run's personalized adapter: CTR p(yes) as in
evaluation, next item the candidates' log-likelihood scores and their ranking. A request that cannot be
answered keeps its row, with a null prediction and a `reason` (docs/predict.md lists them).

Requests are sharded by the dataset shard of their user (one interaction file per task) and cut into
tasks of at most --rows-per-task rows; each task is run by a PredictWorker (plain class; Ray actors
through cluster.pool, or in this process with --num-workers 0) and written as

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
import io
import json
import posixpath
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

# Runnable as a script (`python trainer/predict.py`) as well as a module.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from configs.errors import RecloraError
from configs.loader import (
    ConfigError,  # noqa: E402
    validate,  # noqa: E402
)
from recdata import storage  # noqa: E402
from recdata.layout import (
    latest_embeddings,  # noqa: E402
    paths,  # noqa: E402
)
from recdata.model_source import (  # noqa: E402
    ASSETS,
    ModelSourceError,  # noqa: E402
    resolve_model,
)
from recdata.runner import Runner, run_in_process  # noqa: E402
from recdata.samples import (
    BuildOptions,  # noqa: E402
    SamplesError,  # noqa: E402
    SampleSet,  # noqa: E402
)
from recdata.schema import (
    Dataset,  # noqa: E402
    DatasetError,  # noqa: E402
    user_bucket,  # noqa: E402
)
from recdata.streams import collate  # noqa: E402
from retrieval.build import load_item_vectors  # noqa: E402
from retrieval.encoding import PromptEncoder, answer_token_ids, encode_rows  # noqa: E402
from retrieval.prompts import PromptRenderer, style_for  # noqa: E402
from retrieval.requests import RequestRetriever  # noqa: E402
from teacher.features import Encoder  # noqa: E402
from teacher.model_io import (  # noqa: E402
    META_FILE,  # noqa: E402
    TeacherLoadError,  # noqa: E402
    load_teacher,
    pick_device,
    to_tensors,  # noqa: E402
)
from teacher.score import (
    RepsError,  # noqa: E402
    check_rep_dim,  # noqa: E402
)
from trainer.hybrid import (  # noqa: E402
    CANDIDATE_TOKEN,
    HISTORY_TOKEN,
    TEXT_FALLBACK,
    HybridLM,  # noqa: E402
)
from trainer.lora import (  # noqa: E402
    GATES_FILE,
    MIXTURE_CONFIG_FILE,  # noqa: E402
    PEFT_WEIGHTS_FILE,
    load_personalized,  # noqa: E402
)
from trainer.objective import answer_loss, candidate_scores, p_yes_from_logits  # noqa: E402
from trainer.prepare import worker_model_dir  # noqa: E402

FORMAT = "reclora-predictions/1"
MANIFEST = "_manifest.json"
COMMITS = "_commits"
REQUIRED_COLUMNS = ("user_id", "item_id")
# Reasons found before any retrieval (the request row itself is unusable); retrieval.requests.REASONS
# has the ones that need the dataset.
ROW_REASONS = {
    "missing_user_id": "user_id is null",
    "missing_item_id": "item_id is null",
    "malformed_user_id": "user_id is not an integer",
    "malformed_item_id": "item_id is not an integer",
    "malformed_timestamp": "timestamp is not an integer number of seconds or a date/time",
    "malformed_candidates": "the candidate list holds a null or non-integer id",
}


class PredictInputError(RecloraError, ValueError):
    """A requests file, run folder or output folder that cannot be used; the message names it."""


# ------------------------------------------------------------------------------------------- output schema
def output_schema(task: str) -> pa.Schema:
    fields = [
        ("request_index", pa.int64()),  # row of the request in the requests file
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("timestamp", pa.int64()),
        ("reason", pa.string()),  # null: predicted; else why the prediction is null
        (
            "sample_id",
            pa.int64(),
        ),  # the dataset sample when the request is one of its interactions, else a negative key
        ("label", pa.int8()),  # CTR: the dataset's label for that interaction, when it is one
        ("hist_len", pa.int32()),  # interactions before the request time
        ("cold_user", pa.bool_()),  # outside the teacher's training vocabulary (it then uses its unknown row)
        ("cold_item", pa.bool_()),
        ("teacher_score", pa.float32()),  # CTR: teacher p(click); next item: the teacher's score of item_id
    ]
    if task == "ctr":
        fields.append(("p_yes", pa.float64()))
    else:
        fields += [
            ("candidates", pa.list_(pa.int64())),
            ("scores", pa.list_(pa.float32())),  # mean log-likelihood of each candidate's title, candidate order
            ("ranking", pa.list_(pa.int64())),  # candidate ids, best first
            ("predicted_item", pa.int64()),
            ("target_rank", pa.int32()),  # 1-based rank of item_id among the candidates
            ("teacher_candidate_scores", pa.list_(pa.float32())),
        ]
    return pa.schema(fields)


# ------------------------------------------------------------------------------------------- run inputs
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
        tok_dir = str(model_dir) if Path(str(model_dir), "tokenizer.json").exists() else str(ASSETS)
    else:
        model_dir = resolve_model(cfg.model.name_or_path)
        tok_dir = model_dir
    out = {
        "dataset": p.dataset,
        "samples": p.samples,
        "options": options,
        "embeddings": embeddings,
        "teacher": p.teacher,
        "model_dir": model_dir,
        "tokenizer_dir": tok_dir,
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


# ------------------------------------------------------------------------------------------- requests
def read_requests(url: str, task: str) -> tuple[dict[str, Any], str]:
    """Requests file -> normalized columns and a per-row reason (or None); plus a digest of the content.

    Missing required columns and unusable column types raise PredictInputError naming the file and
    column; unusable values in a row only give that row a reason."""
    fs, path = storage.get_fs(url)
    with storage.storage_errors(url):
        if not fs.exists(path):
            raise PredictInputError(f"{url}: requests file not found")
        try:
            table = pq.read_table(path, filesystem=storage.arrow_fs(fs))
        except pa.ArrowInvalid as e:
            raise PredictInputError(f"{url}: not a readable Parquet file ({e})") from None
    for name in REQUIRED_COLUMNS:
        if name not in table.column_names:
            raise PredictInputError(
                f"{url}: missing required column '{name}' (columns: {table.column_names}); "
                f"requests need {list(REQUIRED_COLUMNS)} and optionally timestamp"
                + (", candidates" if task == "next_item" else "")
            )
    n = table.num_rows
    reasons: list[str | None] = [None] * n
    users, u_ok, u_present = _ints(table.column("user_id"), url, "user_id")
    items, i_ok, i_present = _ints(table.column("item_id"), url, "item_id")
    if "timestamp" in table.column_names:
        ts, t_ok, t_present = _ints(table.column("timestamp"), url, "timestamp", times=True)
        t_ok |= ~t_present  # a null timestamp is "no time given": every interaction is history
    else:
        ts, t_ok, t_present = np.zeros(n, np.int64), np.ones(n, bool), np.zeros(n, bool)
    cands: list[list[int] | None] = [None] * n
    c_ok = np.ones(n, bool)
    if task == "next_item" and "candidates" in table.column_names:
        cands, c_ok = _candidate_lists(table.column("candidates"), url)
    elif "candidates" in table.column_names:
        print(f"note: {url}: column 'candidates' is ignored for the ctr task", file=sys.stderr)
    for j in range(n):
        if not u_present[j]:
            reasons[j] = "missing_user_id"
        elif not u_ok[j]:
            reasons[j] = "malformed_user_id"
        elif not i_present[j]:
            reasons[j] = "missing_item_id"
        elif not i_ok[j]:
            reasons[j] = "malformed_item_id"
        elif not t_ok[j]:
            reasons[j] = "malformed_timestamp"
        elif not c_ok[j]:
            reasons[j] = "malformed_candidates"
    h = hashlib.sha256()
    for arr in (users, u_ok, u_present, items, i_ok, i_present, ts, t_ok, t_present):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(json.dumps(cands).encode())
    cols = {
        "user_id": users,
        "item_id": items,
        "timestamp": ts,
        "has_time": t_present & t_ok,
        "candidates": cands,
        "reason": reasons,
        "valid_user": u_present & u_ok,
        "valid_item": i_present & i_ok,
        "rows": n,
    }
    return cols, h.hexdigest()


def _ints(col: pa.ChunkedArray, url: str, name: str, times: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int64 values, usable mask, non-null mask) of an id or time column."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = col.type
    n = len(col)
    present = col.is_valid().to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)
    if times and (pa.types.is_timestamp(t) or pa.types.is_date(t)):
        # Same conversion as the generic ingest: date/time columns become epoch seconds.
        col = col.cast(pa.timestamp("s")).cast(pa.int64())
        t = col.type
    if pa.types.is_integer(t):
        vals = col.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        return vals, present.copy(), present
    if pa.types.is_floating(t):
        f = col.fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64)
        ok = present & np.isfinite(f) & (np.floor(f) == f) & (np.abs(f) < 2.0**63)
        return np.where(ok, f, 0).astype(np.int64), ok, present
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        vals, ok = np.zeros(n, np.int64), np.zeros(n, bool)
        for j, s in enumerate(col.to_pylist()):
            try:
                vals[j], ok[j] = int(str(s).strip()), True
            except (TypeError, ValueError, OverflowError):
                pass
        return vals, ok & present, present
    raise PredictInputError(
        f"{url}: column '{name}' has type {t}; expected integers" + (" or a date/time" if times else "")
    )


def _candidate_lists(col: pa.ChunkedArray, url: str) -> tuple[list[list[int] | None], np.ndarray]:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise PredictInputError(f"{url}: column 'candidates' has type {col.type}; expected a list of item ids")
    out: list[list[int] | None] = []
    ok = np.ones(len(col), bool)
    for j, v in enumerate(col.to_pylist()):
        if v is None:
            out.append(None)  # sampled like retrieval.build does
            continue
        try:
            vals = [int(x) for x in v]
            if any(float(x) != int(x) for x in v):
                raise ValueError
            out.append(vals)
        except (TypeError, ValueError, OverflowError):
            out.append(None)
            ok[j] = False
    return out, ok


def plan_tasks(req: dict[str, Any], num_shards: int, rows_per_task: int) -> list[dict[str, Any]]:
    """Tasks of at most rows_per_task requests whose users share one dataset shard, in (shard, request)
    order. Rows already answered by a reason ride along with shard 0 (they need no interactions)."""

    n = req["rows"]
    shard = np.zeros(n, np.int64)
    usable = np.array([r is None for r in req["reason"]], bool)
    if usable.any():
        shard[usable] = user_bucket(req["user_id"][usable], num_shards)
    tasks = []
    for s in range(num_shards):
        idx = np.flatnonzero(shard == s)
        for c in range(0, len(idx), rows_per_task):
            chunk = idx[c : c + rows_per_task]
            tasks.append(
                {
                    "part": len(tasks),
                    "shard": s,
                    "rows": {
                        "request_index": chunk.tolist(),
                        "user_id": [int(req["user_id"][j]) if req["valid_user"][j] else None for j in chunk],
                        "item_id": [int(req["item_id"][j]) if req["valid_item"][j] else None for j in chunk],
                        "timestamp": [int(req["timestamp"][j]) if req["has_time"][j] else None for j in chunk],
                        "candidates": [req["candidates"][j] for j in chunk],
                        "reason": [req["reason"][j] for j in chunk],
                    },
                }
            )
    return tasks


def part_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


# ------------------------------------------------------------------------------------------- the worker
class PredictWorker:
    """Answers one task of requests per `run(task)`. Plain Python: in-process or a Ray actor (cluster.pool).
    Loads the retrieval inputs, the teacher, the tokenizer and base LLM + adapter once."""

    def __init__(
        self,
        config: dict[str, Any],
        inputs: dict[str, Any],
        out_url: str,
        fingerprint: str,
        batch_size: int = 16,
        device: str = "auto",
        num_threads: int = 1,
        s3_endpoint: str | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = validate(config)
        storage.configure(cfg.storage.endpoint_url, cfg.storage.region, cfg.storage.anon or None)
        if s3_endpoint and not cfg.storage.endpoint_url:
            storage.configure(endpoint_url=s3_endpoint, region=cfg.storage.region, anon=cfg.storage.anon or None)
        torch.set_num_threads(max(1, int(num_threads)))
        self.cfg, self.out_url, self.fingerprint, self.batch_size = cfg, out_url, fingerprint, int(batch_size)
        self.task_kind = cfg.data.task
        self.device = pick_device(device)
        opts = BuildOptions.from_dict(inputs["options"])
        vectors = (
            load_item_vectors(inputs["embeddings"], normalize=opts.metric == "cosine")
            if opts.needs_embeddings
            else None
        )
        self.retriever = RequestRetriever(inputs["dataset"], opts, vectors)

        self.teacher = load_teacher(inputs["teacher"], self.device)
        check_rep_dim(self.teacher.rep_dim, cfg.teacher.rep_dim, inputs["teacher"])
        self.encoder_t = Encoder(self.teacher.space, self.teacher.cfg.max_hist, self.teacher.cfg.task)

        tok = AutoTokenizer.from_pretrained(inputs["tokenizer_dir"])
        hybrid = cfg.trainer.hybrid_item_emb
        self.slot_ids: tuple[int, ...] = ()
        overrides = {}
        if hybrid:
            # As in training: placeholder tokens after each title, swapped for projected item embeddings.
            tok.add_special_tokens({"additional_special_tokens": [HISTORY_TOKEN, CANDIDATE_TOKEN]})
            self.slot_ids = tuple(tok.convert_tokens_to_ids([HISTORY_TOKEN, CANDIDATE_TOKEN]))
            overrides = {"history_token": HISTORY_TOKEN, "candidate_token": CANDIDATE_TOKEN}
        ds = self.retriever.dataset
        self.renderer = PromptRenderer(
            ds.read_items(), cfg.data.task, style_for(cfg.data.domain, **overrides), ds.read_users()
        )
        self.encoder = PromptEncoder(tok, cfg.model.max_length)
        self._answers: dict[int, list[int]] = {}
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = answer_token_ids(tok, cfg.data.task)
        self.yes_id, self.no_id = ids.get("Yes"), ids.get("No")
        # CTR prompts get the budget of the longer answer, so truncation does not depend on an unknown label.
        if cfg.data.task == "ctr":
            self.budget_label = 1 if len(self.encoder.answer_ids("Yes.")) >= len(self.encoder.answer_ids("No.")) else 0

        use_gpu = self.device.type == "cuda"
        dtype = getattr(torch, cfg.model.dtype) if use_gpu else torch.float32  # as in training: fp32 on CPU
        base = AutoModelForCausalLM.from_pretrained(worker_model_dir(inputs["model_dir"]), dtype=dtype)
        base.config.use_cache = False
        with tempfile.TemporaryDirectory() as tmp:
            _download(inputs["adapter"], tmp)
            model = load_personalized(base, tmp)
            if hybrid:
                from safetensors.torch import load as st_load
                from safetensors.torch import load_file

                fs, path = storage.get_fs(inputs["item_emb"])
                with storage.storage_errors(inputs["item_emb"]):
                    table = st_load(fs.cat_file(path))
                model = HybridLM(
                    model,
                    table["item_ids"].numpy(),
                    table["emb"],
                    list(self.slot_ids),
                    tok(TEXT_FALLBACK, add_special_tokens=False)["input_ids"][0],
                )
                model.projector.load_state_dict(load_file(str(Path(tmp) / "projector.safetensors")), strict=True)
                model.hybrid = True  # evaluation uses the full hybrid prompt
        self.model = model.to(self.device).eval()
        self.fs, self.root = storage.get_fs(out_url)
        self.local = storage.is_local(out_url)
        self.schema = output_schema(cfg.data.task)

    # ---- one task
    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        k = int(task["part"])
        marker = posixpath.join(self.root, COMMITS, part_name(k).replace(".parquet", ".json"))
        with storage.storage_errors(self.out_url):
            if self.fs.exists(marker):
                done = json.loads(self.fs.cat_file(marker).decode("utf-8"))
                if done.get("fingerprint") != self.fingerprint:
                    raise PredictInputError(
                        f"{storage.join(self.out_url, COMMITS, posixpath.basename(marker))}: committed by a "
                        f"prediction with other inputs; use a new --out or --overwrite"
                    )
                return {**done, "skipped": True}
        t0 = time.perf_counter()
        table, counts = self.predict_rows(int(task["shard"]), task["rows"])
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        info = {
            "part": k,
            "path": part_name(k),
            "rows": table.num_rows,
            "fingerprint": self.fingerprint,
            "reasons": counts["reasons"],
            "predicted": counts["predicted"],
            "history_truncated": counts["history_truncated"],
            "prompt_truncated": counts["prompt_truncated"],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        with storage.storage_errors(self.out_url):
            _write_atomic(self.fs, posixpath.join(self.root, part_name(k)), buf.getvalue(), self.local)
            # The marker is the commit point: written only when the part is complete at its final name.
            _write_atomic(self.fs, marker, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode(), self.local)
        return {**info, "skipped": False}

    def predict_rows(self, shard: int, rows: dict[str, list]) -> tuple[pa.Table, dict[str, Any]]:

        n = len(rows["request_index"])
        reasons = list(rows["reason"])
        out: dict[str, list] = {f.name: [None] * n for f in self.schema}
        out["request_index"] = list(rows["request_index"])
        out["user_id"], out["item_id"], out["timestamp"] = (
            list(rows["user_id"]),
            list(rows["item_id"]),
            list(rows["timestamp"]),
        )
        todo = [j for j in range(n) if reasons[j] is None]
        counts = {"history_truncated": 0, "prompt_truncated": 0}
        if todo:
            rec = self.retriever.records(
                shard,
                [rows["user_id"][j] for j in todo],
                [rows["item_id"][j] for j in todo],
                [rows["timestamp"][j] for j in todo],
                [rows["candidates"][j] for j in todo] if self.task_kind == "next_item" else None,
            )
            for j, r in zip(todo, rec.reasons):
                reasons[j] = r
            pos = [todo[int(i)] for i in rec.rows]  # task row of each record
            if pos:
                records = rec.table.to_pylist()
                reps, scores, cand_scores = self._teacher(rec.table)
                _, unk_u = self.teacher.space.users.lookup(rec.table["user_id"].to_numpy())
                _, unk_i = self.teacher.space.items.lookup(rec.table["item_id"].to_numpy())
                # Tokens exactly as the trainer's feed makes them; CTR records carry a stand-in label only
                # to size the answer (p(yes) is read before the first answer token).
                enc_in = [{**r, "label": self.budget_label} for r in records] if self.task_kind == "ctr" else records
                stream, c = encode_rows(enc_in, reps, scores, self.renderer, self.encoder, self.slot_ids)
                counts["history_truncated"] += int(c.get("history_truncated", 0))
                counts["prompt_truncated"] += int(c.get("prompt_truncated", 0))
                preds = self._llm(stream.to_pylist())
                for q, j in enumerate(pos):
                    r = records[q]
                    out["sample_id"][j] = r["sample_id"]
                    out["label"][j] = r["label"]
                    out["hist_len"][j] = r["hist_len"]
                    out["cold_user"][j] = bool(unk_u[q]) if self.task_kind == "ctr" else None
                    out["cold_item"][j] = bool(unk_i[q])
                    out["teacher_score"][j] = float(scores[q])
                    if self.task_kind == "ctr":
                        out["p_yes"][j] = float(preds[q])
                    else:
                        cands = r["candidates"]
                        sc = [float(x) for x in preds[q]]
                        order = np.argsort(-np.asarray(sc, dtype=np.float64), kind="stable")
                        out["candidates"][j] = cands
                        out["scores"][j] = sc
                        out["ranking"][j] = [int(cands[i]) for i in order]
                        out["predicted_item"][j] = int(cands[order[0]])
                        out["target_rank"][j] = int(np.flatnonzero(order == cands.index(r["item_id"]))[0]) + 1
                        if cand_scores[q] is not None:
                            out["teacher_candidate_scores"][j] = [float(x) for x in cand_scores[q]]
        out["reason"] = reasons
        table = pa.Table.from_arrays([pa.array(out[f.name], type=f.type) for f in self.schema], schema=self.schema)
        counts["reasons"] = dict(sorted(Counter(r for r in reasons if r is not None).items()))
        counts["predicted"] = sum(r is None for r in reasons)
        return table, counts

    def _teacher(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray, list | None]:
        """Representation, score (and next item: candidate scores) of each record, in record order."""
        import torch

        n = table.num_rows
        # The encoder needs equal-length candidate lists in one batch: group next-item rows by length.
        if self.task_kind == "next_item":
            lens = np.array([len(c) for c in table["candidates"].to_pylist()])
            groups = [np.flatnonzero(lens == L) for L in np.unique(lens)]
        else:
            groups = [np.arange(n)]
        reps = np.zeros((n, self.teacher.rep_dim), np.float32)
        scores = np.zeros(n, np.float32)
        cand: list | None = [None] * n if self.task_kind == "next_item" else None
        with torch.inference_mode():
            for g in groups:
                enc = self.encoder_t.encode(table.take(pa.array(g)), Counter(), where="requests")
                b = to_tensors(enc, self.device)
                o = self.teacher.model(b)
                pred = self.teacher.model.predict(b, o)
                reps[g] = o["rep"].float().cpu().numpy()
                scores[g] = pred["teacher_score"].float().cpu().numpy()
                if cand is not None and "candidate_scores" in pred:
                    cs = pred["candidate_scores"].float().cpu().numpy()
                    for q, i in enumerate(g):
                        cand[i] = cs[q].tolist()
        bad = ~np.isfinite(reps).all(axis=1) | ~np.isfinite(scores)
        if bad.any():
            key = table["sample_id"][int(np.flatnonzero(bad)[0])].as_py()
            raise RepsError(f"non-finite teacher output for the request with sample key {key}")
        return reps, scores, cand

    def _llm(self, srows: list[dict[str, Any]]) -> list:
        """evaluate()'s computation, batched by prompt length (less padding); results in row order."""
        import torch

        order = sorted(range(len(srows)), key=lambda i: len(srows[i]["input_ids"]))
        res: list = [None] * len(srows)
        with torch.no_grad():
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                rows = [srows[i] for i in idx]
                batch = {k: v.to(self.device) for k, v in collate(rows, self.pad_id).items()}
                if self.task_kind == "ctr":
                    _, _, logits = answer_loss(self.model, batch)
                    p = p_yes_from_logits(logits, batch["answer_len"], self.yes_id, self.no_id).double().cpu().numpy()
                    for i, v in zip(idx, p):
                        res[i] = float(v)
                else:
                    # One forward per request over its candidates (as evaluate does); lists may differ in length.
                    for q, i in enumerate(idx):
                        sc = candidate_scores(
                            self.model, [rows[q]], self.pad_id, self._answer_ids, batch["cond"][q : q + 1], self.device
                        )
                        res[i] = sc[0].float().cpu().numpy().tolist()
        return res

    def _answer_ids(self, item_id: int) -> list[int]:
        # The trainer's answer for an item: its title (prepare.py's answer_ids), then end of turn.
        if item_id not in self._answers:
            self._answers[item_id] = self.encoder.answer_ids(self.renderer.title(int(item_id)))
        return self._answers[item_id]


def _download(url: str, dest: str) -> None:
    """Copy the files of a storage folder into a local one (the adapter may live on s3)."""
    fs, path = storage.get_fs(url)
    with storage.storage_errors(url):
        for f in fs.ls(path, detail=False):
            name = posixpath.basename(f.rstrip("/"))
            if name and not name.startswith((".", "_")) and fs.isfile(f):
                Path(dest, name).write_bytes(fs.cat_file(f))


def _write_atomic(fs, path: str, data: bytes, local: bool) -> None:
    """Local: a temporary "_tmp-" name beside the target, then rename (readers skip "_" names). Object
    stores: an upload becomes visible only when complete, so the final key is written directly."""
    parent = posixpath.dirname(path)
    fs.makedirs(parent, exist_ok=True)
    if not local:
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    tmp = posixpath.join(parent, f"_tmp-{posixpath.basename(path)}-{uuid.uuid4().hex[:12]}")
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


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
) -> dict[str, Any]:
    """Score every request; returns the manifest (also written to {out}/_manifest.json)."""

    if rows_per_task < 1 or batch_size < 1 or num_workers < 0:
        raise PredictInputError(
            f"--rows-per-task and --batch-size must be >= 1 and --num-workers >= 0, got "
            f"{rows_per_task}, {batch_size}, {num_workers}"
        )
    t0 = time.perf_counter()
    cfg = load_run_config(run_url)
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region, cfg.storage.anon or None)
    inputs = run_inputs(cfg, run_url)
    req, req_digest = read_requests(requests_url, cfg.data.task)
    num_shards = len(Dataset.open(inputs["dataset"]).shards)
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
        "columns": output_schema(cfg.data.task).names,
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
    """Temporary files of a killed run (never committed)."""
    fs, root = storage.get_fs(out_url)
    with storage.storage_errors(out_url):
        for pattern in ("_tmp-*", f"{COMMITS}/_tmp-*"):
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


def read_predictions(out_url: str) -> pa.Table:
    """Every committed part listed in the manifest, in request order."""
    murl = storage.join(out_url, MANIFEST)
    if not storage.exists(murl):
        raise PredictInputError(f"{out_url}: no {MANIFEST}: the prediction has not finished (rerun it to resume)")
    m = storage.read_json(murl)
    fs, root = storage.get_fs(out_url)
    tables = []
    for p in m["parts"]:
        with storage.storage_errors(out_url):
            tables.append(pq.read_table(posixpath.join(root, p["path"]), filesystem=storage.arrow_fs(fs)))
    if not tables:
        return output_schema(m["task"]).empty_table()
    t = pa.concat_tables(tables)
    return t.take(pa.array(np.argsort(t["request_index"].to_numpy(), kind="stable")))


def summary_line(m: dict[str, Any]) -> str:
    bad = sum(m["reasons"].values())
    why = ", ".join(f"{k} {v}" for k, v in m["reasons"].items())
    return (
        f"[predict] {m['rows']} requests: {m['predicted']} predicted, {bad} with a reason"
        + (f" ({why})" if why else "")
        + f"; parts: {m['parts_built']} built, {m['parts_skipped']} skipped; {m['seconds']:.1f}s"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="trained run folder (holds config.yaml and adapter/)")
    p.add_argument("--requests", required=True, help="Parquet with user_id, item_id[, timestamp][, candidates]")
    p.add_argument("--out", required=True, help="output folder URL (parts, commit markers, _manifest.json)")
    p.add_argument("--num-workers", type=int, default=1, help="Ray actors; 0 = in this process")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per LLM forward")
    p.add_argument("--rows-per-task", type=int, default=1024, help="requests per output part (the unit of resume)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per actor (also its torch threads)")
    p.add_argument("--overwrite", action="store_true", help="delete --out first")
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
