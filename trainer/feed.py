"""The feed: the trainer's tokenized streams, built in parts by sharded workers while training runs.

For each split the driver fixes the sample order first (the persisted Few2Many order for train, the
persisted eval order for valid/test), so a stream's row count and layout are known before any part
exists. Each part is one task for a `FeedWorker` (a plain class; Ray actors through cluster.pool):

    sample records (retrieval output) -> frozen teacher representation + score -> prompt -> tokens

written as `{run}/data/{split}/part-XXXXX.parquet`, then committed by `part-XXXXX.json` (the marker
carries the stream's cache key). Parts are built in the order the trainer needs them (zero-shot test
first when that evaluation runs, then train, valid, test), so the trainer can start on the first
committed parts while later ones are being built; `recdata.streams.StreamReader` waits for a part only
when a step needs it. A rerun skips committed parts with the same key; a changed input (samples,
teacher, tokenizer, max_length, part size) changes the key and rebuilds the split.

Representations come from the score stage's output (`teacher.reps_url`) when it exists for this
teacher; otherwise the feed runs the teacher itself on just the samples the LLM sees (Few2Many: a
small subset of what the teacher was trained on, so scoring everything would be wasted work).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from recdata import storage
from recdata.model_source import tokenizer_dir
from recdata.prompt_files import PromptSet
from recdata.runner import Runner, run_in_process
from recdata.samples import SampleSet
from recdata.schema import Dataset, write_parquet
from recdata.streams import FEED_FAILED, STREAM_SCHEMA, TrainDataError, part_marker, part_name
from retrieval.encoding import PromptEncoder, encode_rows
from retrieval.prompts import PromptRenderer, ctr_answer, style_for
from teacher.score import RepsError, ScoreWorker, check_rep_dim, pc_flatten, read_reps


@dataclass
class FeedJob:
    """Everything needed to build a run's streams: worker arguments and the ordered part tasks."""

    worker_kwargs: dict[str, Any]
    tasks: list[dict[str, Any]]
    data_url: str
    num_workers: int
    cpus_per_worker: float
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> plan
    error: BaseException | None = None
    seconds: float = 0.0
    runner: Runner | None = None  # cluster.pool.run_sharded for Ray actors; None builds in this process
    worker_cls: type | None = None  # FeedWorker (sample records + teacher); PromptFeedWorker for prompt files
    _thread: threading.Thread | None = None

    def run(self) -> dict[str, dict[str, Any]]:
        """Build every part not yet committed (in task order) and return per-split summaries."""
        t0 = time.perf_counter()
        todo = [t for t in self.tasks if not _committed(t["url"], t["key"])]
        run = self.runner if self.runner is not None and self.num_workers > 0 else run_in_process
        run(
            self.worker_cls or FeedWorker,
            self.worker_kwargs,
            todo,
            num_actors=self.num_workers,
            num_cpus_per_actor=self.cpus_per_worker,
            desc="feed",
        )
        self.seconds = time.perf_counter() - t0
        return self.summaries()

    def start(self) -> "FeedJob":
        """Run in a background thread (training overlaps); a failure is recorded on storage so waiting
        trainer workers stop with the feed's error instead of timing out."""

        def target():
            try:
                self.run()
            except BaseException as e:  # noqa: BLE001 - re-raised by join() in the driver
                self.error = e
                storage.write_json_atomic(
                    storage.join(self.data_url, FEED_FAILED), {"error": f"{type(e).__name__}: {e}"}
                )

        self._thread = threading.Thread(target=target, name="reclora-feed", daemon=True)
        self._thread.start()
        return self

    def join(self) -> dict[str, dict[str, Any]]:
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error
        return self.summaries()

    def summaries(self) -> dict[str, dict[str, Any]]:
        out = {}
        for split, plan in self.splits.items():
            counts: Counter = Counter()
            for t in (t for t in self.tasks if t["split"] == split):
                m = storage.read_json(part_marker(t["url"]))
                counts.update(m["counts"])
                counts["tokens"] += m["tokens"]
                counts["max_len"] = max(counts["max_len"], m["max_len"])
            out[split] = {
                "rows": plan["rows"],
                "tokens": int(counts["tokens"]),
                "max_len": int(counts["max_len"]),
                "mean_len": float(counts["tokens"] / max(plan["rows"], 1)),
                "history_truncated": int(counts["history_truncated"]),
                "prompt_truncated": int(counts["prompt_truncated"]),
                "key": plan["key"],
            }
        return out


def _committed(part_url: str, key: str) -> bool:
    marker = part_marker(part_url)
    return storage.exists(marker) and storage.read_json(marker).get("key") == key


def stream_key(parts: list[Any]) -> str:
    return storage.digest(parts)


def plan_split(
    data_url: str, split: str, ids: np.ndarray, part_rows: int, key: str
) -> tuple[dict[str, Any], list[dict]]:
    """Write `{data}/{split}/plan.json` (a stale split with another key is removed first) and return the plan
    and its part tasks. Must run before any trainer reads the split."""
    if len(ids) == 0:
        raise TrainDataError(f"{split}: no samples to feed (empty persisted order)")
    url = storage.join(data_url, split)
    plan_url = storage.join(url, "plan.json")
    if storage.exists(plan_url) and storage.read_json(plan_url).get("key") != key:
        fs, path = storage.get_fs(url)
        with storage.storage_errors(url):
            fs.rm(path, recursive=True)
    plan = {
        "split": split,
        "rows": int(len(ids)),
        "part_rows": int(part_rows),
        "key": key,
        "parts": -(-len(ids) // part_rows),
    }
    if not storage.exists(plan_url):
        storage.write_json_atomic(plan_url, plan)
    tasks = [
        {
            "split": split,
            "part": k,
            "ids": [int(x) for x in ids[k * part_rows : (k + 1) * part_rows]],
            "url": storage.join(url, part_name(k)),
            "key": key,
        }
        for k in range(plan["parts"])
    ]
    return plan, tasks


def _worker_tokenizer(model_ref: str, tiny: bool, model_cfg: dict | None, s3_endpoint: str | None, num_threads: int):
    if s3_endpoint:
        storage.configure(endpoint_url=s3_endpoint)
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(max(1, int(num_threads)))
    # The model reference, resolved on this actor's node (tokenizer files only).
    trust = bool((model_cfg or {}).get("trust_remote_code"))
    return AutoTokenizer.from_pretrained(
        tokenizer_dir(model_ref, tiny=tiny, model_cfg=model_cfg), trust_remote_code=trust
    )


def _commit_part(task: dict[str, Any], rows, counts: dict[str, int], t0: float) -> dict[str, Any]:
    write_parquet(rows, task["url"])
    lengths = [len(x) for x in rows.column("input_ids").to_pylist()]
    marker = {
        "key": task["key"],
        "rows": rows.num_rows,
        "tokens": int(sum(lengths)),
        "max_len": int(max(lengths)),
        "counts": counts,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    # The marker is the commit point: written only once the part is complete at its final name.
    storage.write_json_atomic(part_marker(task["url"]), marker)
    return {"split": task["split"], "part": task["part"], "skipped": False, **marker}


class FeedWorker:
    """Builds stream parts. Plain Python: runs in the driver or as a Ray actor (cluster.pool)."""

    def __init__(
        self,
        samples_url: str,
        dataset_url: str,
        model_ref: str,
        max_length: int,
        task: str,
        domain: str,
        rep_dim: int,
        teacher_url: str | None,
        reps_url: str | None,
        slot_tokens: list[str] | None = None,
        s3_endpoint: str | None = None,
        num_threads: int = 1,
        tiny: bool = False,
        model_cfg: dict[str, Any] | None = None,
        prompt: dict[str, Any] | None = None,
    ):
        tok = _worker_tokenizer(model_ref, tiny, model_cfg, s3_endpoint, num_threads)
        self.slot_ids: tuple[int, ...] = ()
        overrides = {}
        if slot_tokens:
            tok.add_special_tokens({"additional_special_tokens": list(slot_tokens)})
            self.slot_ids = tuple(tok.convert_tokens_to_ids(list(slot_tokens)))
            overrides = {"history_token": slot_tokens[0], "candidate_token": slot_tokens[1]}
        ds = Dataset.open(dataset_url)
        self.samples = SampleSet.open(samples_url)
        self.renderer = PromptRenderer(ds.read_items(), task, style_for(domain, prompt, **overrides), ds.read_users())
        self.encoder = PromptEncoder(tok, max_length)
        self.rep_dim, self.reps_url = rep_dim, reps_url
        self._reps: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.scorer = None
        if reps_url is None:
            # Only the scoring half of a score worker is used: its output location is never written.
            self.scorer = ScoreWorker(teacher_url, samples_url, teacher_url, num_threads=num_threads)
            check_rep_dim(self.scorer.teacher.rep_dim, rep_dim, teacher_url)

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        if _committed(task["url"], task["key"]):
            return {"split": task["split"], "part": task["part"], "skipped": True}

        t0 = time.perf_counter()
        ids = np.asarray(task["ids"], dtype=np.int64)
        table = self.samples.read(task["split"], sample_ids=ids)  # in the order given
        reps, scores = self._teacher(task["split"], table, task["url"])
        rows, counts = encode_rows(table.to_pylist(), reps, scores, self.renderer, self.encoder, self.slot_ids)
        return _commit_part(task, rows, counts, t0)

    def _teacher(self, split: str, table, where: str) -> tuple[np.ndarray, np.ndarray]:
        ids = table["sample_id"].to_numpy()
        if self.scorer is not None:
            out = self.scorer.score_table(table, Counter(), where)
            if not np.array_equal(out["sample_id"].to_numpy(), ids):
                raise TrainDataError(f"{where}: teacher output is not in sample order")
            d = out.schema.field("rep").type.list_size
            return out["rep"].combine_chunks().flatten().to_numpy().reshape(len(ids), d), out[
                "teacher_score"
            ].to_numpy()
        if split not in self._reps:
            t = read_reps(self.reps_url, split, self.rep_dim, columns=["sample_id", "rep", "teacher_score"])
            have = t["sample_id"].to_numpy()
            order = np.argsort(have, kind="stable")
            d = t.schema.field("rep").type.list_size
            self._reps[split] = (
                have[order],
                pc_flatten(t["rep"]).reshape(len(have), d)[order],
                t["teacher_score"].to_numpy()[order],
            )
        have, reps, scores = self._reps[split]
        pos = np.minimum(np.searchsorted(have, ids), max(len(have) - 1, 0))
        missing = (len(have) == 0) | (have[pos] != ids)
        if np.any(missing):
            raise RepsError(
                f"{self.reps_url}/{split}: no representation for sample_id {int(ids[np.flatnonzero(missing)[0]])} "
                f"({int(np.sum(missing))} of {len(ids)} missing)"
            )
        return reps[pos], scores[pos]


class PromptFeedWorker:
    """Builds stream parts from a prompt set (data.format=prompts, recdata.prompt_files): the stored Alpaca prompt
    goes through the same chat template and answer tokens as every CTR prompt (retrieval.encoding.PromptEncoder).
    There is no teacher: `rep` and `teacher_score` are null (the plain-LoRA trainer reads neither) and `item_id`,
    `candidates` and `item_slots` too."""

    def __init__(
        self,
        prompts_url: str,
        model_ref: str,
        max_length: int,
        s3_endpoint: str | None = None,
        num_threads: int = 1,
        tiny: bool = False,
        model_cfg: dict[str, Any] | None = None,
    ):
        tok = _worker_tokenizer(model_ref, tiny, model_cfg, s3_endpoint, num_threads)
        self.prompts = PromptSet.open(prompts_url)
        self.encoder = PromptEncoder(tok, max_length)

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        if _committed(task["url"], task["key"]):
            return {"split": task["split"], "part": task["part"], "skipped": True}
        t0 = time.perf_counter()
        table = self.prompts.read(task["split"], np.asarray(task["ids"], dtype=np.int64))  # in the order given
        rows, counts = encode_prompts(table, self.encoder)
        return _commit_part(task, rows, counts, t0)


def encode_prompts(table, encoder: PromptEncoder) -> tuple[Any, dict[str, int]]:
    """Stream rows (recdata.streams.STREAM_SCHEMA) of prompt-set rows, in their order. A prompt that does not fit
    model.max_length with its answer keeps its last tokens (the question; there is no history to drop first) and
    is counted as `prompt_truncated`."""
    out: dict[str, list] = {"sample_id": [], "input_ids": [], "prompt_len": [], "label": []}
    counts = {"history_truncated": 0, "prompt_truncated": 0}
    for sid, text, label in zip(
        table["sample_id"].to_pylist(), table["prompt"].to_pylist(), table["label"].to_pylist()
    ):
        answer = encoder.answer_ids(ctr_answer(label))
        budget = encoder.max_length - len(answer)
        if budget < 1:
            raise TrainDataError(
                f"sample {sid}: the answer alone needs {len(answer)} tokens, model.max_length={encoder.max_length}"
            )
        prompt = encoder.prompt_ids(text)
        if len(prompt) > budget:
            prompt = prompt[-budget:]
            counts["prompt_truncated"] += 1
        out["sample_id"].append(sid)
        out["input_ids"].append(prompt + answer)
        out["prompt_len"].append(len(prompt))
        out["label"].append(label)
    n = len(out["sample_id"])
    arrays = [pa.array(out[f.name], type=f.type) if f.name in out else pa.nulls(n, type=f.type) for f in STREAM_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=STREAM_SCHEMA), counts
