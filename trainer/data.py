"""Training data: sample records + teacher representations -> tokenized streams -> per-rank micro-batches.

Preparation (once per run, on the driver, cached on storage): for one split, take the persisted sample
order (Few2Many subset for train), read those samples, join the teacher representation BY SAMPLE KEY,
render prompts (retrieval.prompts), apply the chat template, tokenize, and write
`{run}/data/{split}.parquet` in order, in row groups. Prompts too long even after dropping history
are skipped and counted; a sample without a representation is an error naming it.

Reading (every worker): the global batch of step s is a fixed slice of a seeded per-epoch permutation
of the stream, the same for any number of workers; rank r takes its contiguous share and splits it
into micro-batches. So the data cursor is a pure function of the step, resume is exact, and a run
resumed on another worker count sees the same global batches.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from retrieval import storage
from retrieval.schema import write_parquet

STREAM_SCHEMA = pa.schema(
    [
        ("sample_id", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),  # prompt (chat template applied) + answer + end-of-turn
        ("prompt_len", pa.int32()),
        ("label", pa.int8()),  # CTR; null for next item
        ("item_id", pa.int64()),  # the target
        ("candidates", pa.list_(pa.int64())),  # next item: fixed candidate list
        ("rep", pa.list_(pa.float32())),  # the frozen teacher's representation (gate input)
        ("item_slots", pa.list_(pa.int64())),  # hybrid prompts: item id of each placeholder token, in order
    ]
)


class TrainDataError(RuntimeError):
    """Missing or inconsistent training data; the message names the sample key / file / field."""


def answer_token_ids(tokenizer, task: str) -> dict[str, int]:
    """Token ids that CTR scoring compares, looked up from the tokenizer (never hard-coded)."""
    if task != "ctr":
        return {}
    ids = {}
    for word in ("Yes", "No"):
        toks = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not toks:
            raise TrainDataError(f"tokenizer produces no token for {word!r}")
        ids[word] = toks[0]
    if ids["Yes"] == ids["No"]:
        raise TrainDataError(f"'Yes' and 'No' share their first token ({ids['Yes']}); CTR scoring needs distinct tokens")
    return ids


def end_of_turn_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TrainDataError("tokenizer has no eos token; cannot mark the end of the answer")
    return int(eos)


class PromptEncoder:
    """Chat template + tokenizer, with the history truncated to fit `max_length` (oldest dropped first)."""

    def __init__(self, tokenizer, max_length: int):
        self.tok = tokenizer
        self.max_length = max_length
        self.eos = end_of_turn_id(tokenizer)
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def prompt_ids(self, text: str) -> list[int]:
        if self.has_template:
            out = self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        return self.tok(text, add_special_tokens=True)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        return list(self.tok(answer, add_special_tokens=False)["input_ids"]) + [self.eos]

    def count(self, text: str) -> int:
        return len(self.prompt_ids(text))


def prepare_split(samples, split: str, sample_ids: np.ndarray, reps_url: str, renderer, encoder: PromptEncoder,
                  out_url: str, rep_dim: int, row_group_size: int = 256, slot_token_ids: tuple[int, ...] = ()) -> dict[str, Any]:
    """Write the tokenized stream of `sample_ids` (in that order). Returns counts for the run summary."""
    from retrieval.prompts import PromptError
    from teacher.score import rep_matrix

    table = samples.read(split, sample_ids=sample_ids)
    # Joined by sample key, never by row order; a sample without a representation is an error naming it.
    reps = rep_matrix(reps_url, split, table["sample_id"].to_numpy(), expected_rep_dim=rep_dim)
    records = table.to_pylist()
    out = {k: [] for k in STREAM_SCHEMA.names}
    skipped_too_long = 0
    for rec, rep in zip(records, reps):
        answer = encoder.answer_ids(_answer(renderer, rec))
        budget = encoder.max_length - len(answer)
        try:
            rendered = renderer.render(rec, count_tokens=encoder.count, max_tokens=budget)
        except PromptError as e:
            if "without any history" not in str(e):
                raise
            skipped_too_long += 1  # even the question alone does not fit: counted, not trained on
            continue
        prompt = encoder.prompt_ids(rendered.text)
        if len(prompt) + len(answer) > encoder.max_length:
            skipped_too_long += 1
            continue
        out["sample_id"].append(rec["sample_id"])
        out["input_ids"].append(prompt + answer)
        out["prompt_len"].append(len(prompt))
        out["label"].append(rec.get("label"))
        out["item_id"].append(rec["item_id"])
        out["candidates"].append(rec.get("candidates"))
        out["rep"].append(rep)
        out["item_slots"].append(_slots(rec, rendered.kept, prompt, slot_token_ids) if slot_token_ids else None)
    if not out["sample_id"]:
        raise TrainDataError(f"{split}: no sample fits model.max_length={encoder.max_length} ({skipped_too_long} too long); "
                             f"raise model.max_length")
    arrays = [pa.array(out[f.name], type=f.type) if f.name != "rep" else _rep_array(np.stack(out["rep"]))
              for f in STREAM_SCHEMA]
    write_parquet(pa.Table.from_arrays(arrays, schema=STREAM_SCHEMA), out_url, row_group_size=row_group_size)
    lengths = [len(x) for x in out["input_ids"]]
    summary = {"rows": len(lengths), "skipped_too_long": skipped_too_long, "history_truncated": renderer.truncated,
               "tokens": int(sum(lengths)), "max_len": int(max(lengths)), "mean_len": float(np.mean(lengths))}
    storage.write_json_atomic(out_url + ".json", summary)
    return summary


def _slots(rec, kept: int, prompt: list[int], slot_token_ids) -> list[int]:
    """Item ids behind the placeholders, in prompt order: the kept history, then the candidates."""
    hist = list(rec["text_hist_items"] or [])
    slots = hist[len(hist) - kept:] + list(rec.get("candidates") or [])
    n = sum(1 for t in prompt if t in slot_token_ids)
    if n != len(slots):
        raise TrainDataError(f"sample {rec['sample_id']}: {n} placeholder tokens in the prompt but {len(slots)} items")
    return slots


def _answer(renderer, rec) -> str:
    from retrieval.prompts import ctr_answer, next_item_answer

    if renderer.task == "ctr":
        if rec.get("label") is None:
            raise TrainDataError(f"sample {rec['sample_id']}: CTR sample without a label")
        return ctr_answer(rec["label"])
    return next_item_answer(renderer.title(rec["item_id"])).rstrip("\n")


def _rep_array(reps: np.ndarray) -> pa.Array:
    flat = pa.array(reps.astype(np.float32).ravel())
    offsets = pa.array(np.arange(0, reps.size + 1, reps.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


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
            raise TrainDataError(f"only {self.rows} training samples, fewer than trainer.batch_size={self.global_batch}; "
                                 f"lower the batch size or raise trainer.train_subset")
        if self.global_batch % (self.world * self.micro):
            raise TrainDataError(f"trainer.batch_size={self.global_batch} is not divisible by workers*micro_batch_size")

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.global_batch

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.world * self.micro)

    def epoch_order(self, epoch: int) -> np.ndarray:
        # Epoch 0 keeps the persisted (already seeded-random) Few2Many order; later epochs reshuffle.
        if epoch == 0:
            return np.arange(self.rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.rows)

    def rank_rows(self, step: int, rank: int) -> list[np.ndarray]:
        """Micro-batches (stream row indices) of `rank` at global step `step`."""
        epoch, j = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        share = self.global_batch // self.world
        mine = order[j * self.global_batch + rank * share: j * self.global_batch + (rank + 1) * share]
        return [mine[a * self.micro:(a + 1) * self.micro] for a in range(self.accumulation)]

    def cursor(self, step: int) -> dict[str, int]:
        epoch, j = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "row": j * self.global_batch, "step_in_epoch": j}


class StreamReader:
    """Random access to rows of a stream file, one row group at a time (the few most recently loaded
    groups are kept; the oldest loaded is dropped first)."""

    def __init__(self, url: str, cache_groups: int = 8):
        self.url = url
        fs, path = storage.get_fs(url)
        with storage.storage_errors(url):
            if not fs.exists(path):
                raise TrainDataError(f"{url}: prepared stream missing (prepare data first)")
            self._fh = fs.open(path, "rb")
        self._pf = pq.ParquetFile(self._fh)
        sizes = [self._pf.metadata.row_group(i).num_rows for i in range(self._pf.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.rows = int(self.starts[-1])
        self._cache: dict[int, dict[str, Any]] = {}
        self._cache_groups = cache_groups

    def _group(self, g: int) -> dict[str, Any]:
        if g not in self._cache:
            if len(self._cache) >= self._cache_groups:
                self._cache.pop(next(iter(self._cache)))
            t = self._pf.read_row_group(g)
            self._cache[g] = {name: t[name].to_pylist() for name in t.column_names}
        return self._cache[g]

    def rows_at(self, idx: np.ndarray) -> list[dict[str, Any]]:
        out = []
        groups = np.searchsorted(self.starts, idx, side="right") - 1
        for i, g in zip(idx, groups):
            data = self._group(int(g))
            off = int(i - self.starts[g])
            out.append({k: v[off] for k, v in data.items()})
        return out

    def position(self, row: int) -> dict[str, int]:
        g = int(np.searchsorted(self.starts, row, side="right") - 1)
        return {"file": self.url, "row_group": g, "offset": int(row - self.starts[g])}

    def close(self):
        self._fh.close()


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left padding: every answer ends at the last position, so logits are needed only for the tail."""
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    answer_len = torch.zeros(len(rows), dtype=torch.long)
    for i, r in enumerate(rows):
        seq = r["input_ids"]
        ids[i, n - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[i, n - len(seq):] = 1
        answer_len[i] = len(seq) - r["prompt_len"]
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    labels = torch.tensor([-1 if r["label"] is None else int(r["label"]) for r in rows], dtype=torch.long)
    cond = torch.tensor(np.stack([np.asarray(r["rep"], dtype=np.float32) for r in rows]))
    extra = {}
    if rows[0].get("item_slots") is not None:
        extra["item_slots"] = torch.tensor([i for r in rows for i in r["item_slots"]], dtype=torch.long)
    return {**extra, "input_ids": ids, "attention_mask": mask, "position_ids": position_ids, "answer_len": answer_len,
            "label": labels, "cond": cond, "sample_id": torch.tensor([r["sample_id"] for r in rows], dtype=torch.long)}


def iter_eval_batches(reader: StreamReader, rank: int, world: int, batch: int) -> Iterator[list[dict[str, Any]]]:
    """Every row exactly once across ranks (rank r takes rows r, r+W, ...); ranks may get one batch fewer,
    so callers must not put collectives inside this loop."""
    mine = np.arange(rank, reader.rows, world)
    for s in range(0, len(mine), batch):
        yield reader.rows_at(mine[s:s + batch])


def stream_summary(url: str) -> dict[str, Any]:
    return storage.read_json(url + ".json")


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
