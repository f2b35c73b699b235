"""Training data: sample records + teacher representations -> tokenized streams -> per-rank micro-batches.

Building (trainer/feed.py, in parts on Ray actors): for one split, the persisted sample order (Few2Many subset
for train), the teacher representation joined BY SAMPLE KEY, prompts rendered (retrieval.prompts) with the
chat template, tokenized by `retrieval.encoding.encode_rows`, written as `{run}/data/{split}/part-XXXXX.parquet` and committed by
a marker. A stream never drops a sample (history is cut first; a prompt too long even without history keeps
its last tokens, counted), so its row count is fixed before it is built.

Reading (every worker): the global batch of step s is a fixed slice of a seeded per-epoch permutation
of the stream, the same for any number of workers; it is bucketed by length into micro-batches (the same
micro-batches for any number of workers, dealt round-robin to the ranks: less padding, and ranks that wait less
for each other in ZeRO-3 collectives). So the data cursor is a pure function of the step, resume is exact, and a run
resumed on another worker count sees the same global batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from configs.errors import RecloraError
from configs.schema import gradient_accumulation_iters
from recdata import storage

STREAM_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),  # prompt (chat template applied) + answer + end-of-turn
        ("prompt_len", pa.int32()),
        ("label", pa.int8()),  # CTR; null for next item
        ("item_id", pa.int64()),  # the target
        ("candidates", pa.list_(pa.int64())),  # next item: fixed candidate list
        ("rep", pa.list_(pa.float32())),  # the frozen teacher's representation (gate input); null without a teacher
        ("item_slots", pa.list_(pa.int64())),  # hybrid prompts: item id of each placeholder token, in order
        ("teacher_score", pa.float32()),  # the teacher's own prediction (its metrics on the same samples), or null
    ]
)


class TrainDataError(RecloraError, RuntimeError):
    """Missing or inconsistent training data; the message names the sample key / file / field."""


# ----------------------------------------------------------------------------------------- reading side
@dataclass
class Schedule:
    """Which stream rows each rank uses at each step; a pure function of (seed, step)."""

    rows: int
    global_batch: int
    world: int
    micro: int
    seed: int

    def __post_init__(self):
        if self.rows < self.global_batch:
            raise TrainDataError(
                f"only {self.rows} training samples, fewer than trainer.batch_size={self.global_batch}; "
                f"lower the batch size or raise trainer.train_subset"
            )
        if self.global_batch % (self.world * self.micro):
            raise TrainDataError(f"trainer.batch_size={self.global_batch} is not divisible by workers*micro_batch_size")

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.global_batch

    @property
    def accumulation(self) -> int:
        return gradient_accumulation_iters(self.global_batch, self.micro, self.world)

    def epoch_order(self, epoch: int) -> np.ndarray:
        # Epoch 0 keeps the persisted (already seeded-random) Few2Many order; later epochs reshuffle.
        if epoch == 0:
            return np.arange(self.rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.rows)

    def global_rows(self, step: int) -> np.ndarray:
        """Stream row indices of the global batch of step `step` (the same for any number of workers)."""
        epoch, j = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[j * self.global_batch : (j + 1) * self.global_batch]

    def rank_rows(self, step: int, rank: int, lengths: np.ndarray | None = None) -> list[np.ndarray]:
        """Micro-batches (stream row indices) of `rank` at global step `step`.

        Without `lengths`: rank r takes the r-th contiguous share of the global batch, in order. With `lengths`
        (token counts of `global_rows(step)`, in that order), the global batch is bucketed by length: sorted
        (stable), cut into global_batch / micro micro-batches, and micro-batch m goes to rank m % world as its
        (m // world)-th accumulation micro-batch. The rows of the step are the same either way (only how they
        are grouped changes); the grouping is a pure function of the step and the data and does not depend on
        the number of workers, and at each accumulation index the ranks get neighbouring lengths."""
        rows = self.global_rows(step)
        if lengths is None:
            share = self.global_batch // self.world
            mine = rows[rank * share : (rank + 1) * share]
            return [mine[a * self.micro : (a + 1) * self.micro] for a in range(self.accumulation)]
        lengths = np.asarray(lengths)
        if lengths.shape != rows.shape:
            raise ValueError(f"lengths has shape {lengths.shape}, the global batch has {rows.shape}")
        ordered = rows[np.argsort(lengths, kind="stable")]
        chunks = [ordered[m * self.micro : (m + 1) * self.micro] for m in range(self.global_batch // self.micro)]
        return chunks[rank :: self.world]

    def cursor(self, step: int) -> dict[str, int]:
        epoch, j = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "row": j * self.global_batch, "step_in_epoch": j}


FEED_FAILED = "FEED_FAILED.json"  # written beside the split folders when the feed stops with an error


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def part_marker(part_url: str) -> str:
    return part_url.removesuffix(".parquet") + ".json"


class StreamReader:
    """Random access to the rows of a stream: `{run}/data/{split}/` holds plan.json (row count, rows per part,
    cache key) and parts, each committed by its marker `part-XXXXX.json` after its data file is complete.

    Row i lives in part i // part_rows. A part that is not committed yet is waited for (the feed may
    still be building it while training runs): the time spent is `waited`, and a failed feed or a part
    missing for `timeout_s` is an error, never a hang."""

    def __init__(self, url: str, cache_parts: int = 4, timeout_s: float = 3600.0, poll_s: float = 0.2):
        self.url = url.rstrip("/")
        plan_url = storage.join(self.url, "plan.json")
        if not storage.exists(plan_url):
            raise TrainDataError(f"{self.url}: prepared stream missing (no plan.json; prepare data first)")
        plan = storage.read_json(plan_url)
        self.rows, self.part_rows, self.key = int(plan["rows"]), int(plan["part_rows"]), plan["key"]
        self._failed_url = storage.join(self.url.rsplit("/", 1)[0], FEED_FAILED)
        self._cache: dict[int, dict[str, Any]] = {}
        self._cache_parts, self.timeout_s, self.poll_s = cache_parts, timeout_s, poll_s
        self.waited = 0.0

    def _wait_committed(self, k: int) -> str:
        url = storage.join(self.url, part_name(k))
        t0 = time.perf_counter()
        while True:
            marker = part_marker(url)
            if storage.exists(marker) and storage.read_json(marker).get("key") == self.key:
                self.waited += time.perf_counter() - t0
                return url
            if storage.exists(self._failed_url):
                raise TrainDataError(f"{url}: the feed failed: {storage.read_json(self._failed_url).get('error')}")
            if time.perf_counter() - t0 > self.timeout_s:
                raise TrainDataError(
                    f"{url}: not committed after {self.timeout_s:.0f}s (trainer.feed_timeout_s); is the feed running?"
                )
            time.sleep(self.poll_s)

    def _part(self, k: int) -> dict[str, Any]:
        if k not in self._cache:
            url = self._wait_committed(k)
            if len(self._cache) >= self._cache_parts:
                self._cache.pop(next(iter(self._cache)))
            fs, path = storage.get_fs(url)
            with storage.storage_errors(url), fs.open(path, "rb") as f:
                t = pq.read_table(f)
            expect = min(self.part_rows, self.rows - k * self.part_rows)
            if t.num_rows != expect:
                raise TrainDataError(f"{url}: {t.num_rows} rows, the plan says {expect}; delete {self.url} and rerun")
            self._cache[k] = {name: t[name].to_pylist() for name in t.column_names}
        return self._cache[k]

    def rows_at(self, idx: np.ndarray) -> list[dict[str, Any]]:
        out = []
        for i in np.asarray(idx, dtype=np.int64):
            if not 0 <= i < self.rows:
                raise IndexError(f"{self.url}: row {i} out of range [0, {self.rows})")
            data = self._part(int(i // self.part_rows))
            off = int(i % self.part_rows)
            out.append({k: v[off] for k, v in data.items()})
        return out

    def lengths_at(self, idx: np.ndarray) -> np.ndarray:
        """Token count (len of input_ids) of each row in `idx`."""
        out = np.empty(len(idx), dtype=np.int64)
        for k, i in enumerate(np.asarray(idx, dtype=np.int64)):
            if not 0 <= i < self.rows:
                raise IndexError(f"{self.url}: row {i} out of range [0, {self.rows})")
            out[k] = len(self._part(int(i // self.part_rows))["input_ids"][int(i % self.part_rows)])
        return out

    def position(self, row: int) -> dict[str, int]:
        k = row // self.part_rows
        return {"file": storage.join(self.url, part_name(k)), "row_group": 0, "offset": int(row - k * self.part_rows)}

    def read_columns(self, columns: list[str]) -> pa.Table:
        """Every row of the stream (waiting for parts), only `columns`."""
        tables = []
        for k in range(-(-self.rows // self.part_rows)):
            url = self._wait_committed(k)
            fs, path = storage.get_fs(url)
            with storage.storage_errors(url), fs.open(path, "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
        return pa.concat_tables(tables)

    def close(self):
        self._cache.clear()


def padding_fraction(batch: dict[str, torch.Tensor]) -> float:
    """Padding tokens / all tokens of a collated batch."""
    mask = batch["attention_mask"]
    return 1.0 - float(mask.sum()) / max(1, mask.numel())


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left padding: every answer ends at the last position, so logits are needed only for the tail."""
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    answer_len = torch.zeros(len(rows), dtype=torch.long)
    for i, r in enumerate(rows):
        seq = r["input_ids"]
        ids[i, n - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[i, n - len(seq) :] = 1
        answer_len[i] = len(seq) - r["prompt_len"]
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    labels = torch.tensor([-1 if r["label"] is None else int(r["label"]) for r in rows], dtype=torch.long)
    if all(r.get("rep") is None for r in rows):
        # No teacher (prompt files, plain LoRA): an empty conditioning vector, never zeros posing as one.
        cond = torch.zeros((len(rows), 0), dtype=torch.float32)
    elif any(r.get("rep") is None for r in rows):
        missing = next(r["sample_id"] for r in rows if r.get("rep") is None)
        raise TrainDataError(f"sample {missing}: no teacher representation (rep is null) in a batch that has them")
    else:
        cond = torch.tensor(np.stack([np.asarray(r["rep"], dtype=np.float32) for r in rows]))
    extra = {}
    if rows[0].get("item_slots") is not None:
        extra["item_slots"] = torch.tensor([i for r in rows for i in r["item_slots"]], dtype=torch.long)
    return {
        **extra,
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": position_ids,
        "answer_len": answer_len,
        "label": labels,
        "cond": cond,
        "sample_id": torch.tensor([r["sample_id"] for r in rows], dtype=torch.long),
    }
