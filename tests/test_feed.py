"""Stream parts as the trainer reads them while the feed may still be writing them: waits, commit markers,
a failed feed, a timeout, a part that does not match its plan."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from recdata import storage
from recdata.schema import write_parquet
from recdata.streams import (
    FEED_FAILED,
    STREAM_SCHEMA,
    StreamReader,
    TrainDataError,
    part_marker,
    part_name,
)
from trainer.feed import plan_split


def _part(n: int, first_id: int) -> pa.Table:
    rows = {
        "sample_id": list(range(first_id, first_id + n)),
        "input_ids": [[1, 2, 3]] * n,
        "prompt_len": [2] * n,
        "label": [1] * n,
        "item_id": [7] * n,
        "candidates": [None] * n,
        "rep": [[0.5, 0.25]] * n,
        "item_slots": [None] * n,
        "teacher_score": [0.9] * n,
    }
    return pa.Table.from_pydict(rows, schema=STREAM_SCHEMA)


def _commit(task: dict, table: pa.Table) -> None:

    write_parquet(table, task["url"])
    storage.write_json_atomic(
        part_marker(task["url"]), {"key": task["key"], "rows": table.num_rows, "tokens": 0, "max_len": 3, "counts": {}}
    )


def test_reader_waits_for_parts_being_built(tmp_path):
    data = str(tmp_path / "data")
    plan, tasks = plan_split(data, "train", np.arange(100, 125), part_rows=10, key="k1")
    assert plan["parts"] == 3 and [len(t["ids"]) for t in tasks] == [10, 10, 5]
    _commit(tasks[0], _part(10, 100))
    reader = StreamReader(storage.join(data, "train"), poll_s=0.02)
    assert reader.rows == 25 and [r["sample_id"] for r in reader.rows_at(np.array([0, 9]))] == [100, 109]
    assert reader.waited < 0.2

    def later():
        time.sleep(0.5)
        _commit(tasks[1], _part(10, 110))

    th = threading.Thread(target=later)
    th.start()
    assert reader.rows_at(np.array([12]))[0]["sample_id"] == 112  # blocks until part 1 is committed
    th.join()
    assert reader.waited >= 0.4
    assert reader.position(12) == {"file": tasks[1]["url"], "row_group": 0, "offset": 2}
    with pytest.raises(IndexError):
        reader.rows_at(np.array([25]))


def test_uncommitted_or_stale_part_is_not_read(tmp_path):

    data = str(tmp_path / "data")
    _, tasks = plan_split(data, "valid", np.arange(8), part_rows=4, key="new")
    write_parquet(_part(4, 0), tasks[0]["url"])  # data without a marker: a feed killed before its commit
    storage.write_json_atomic(part_marker(tasks[1]["url"]), {"key": "old"})  # committed by another plan
    reader = StreamReader(storage.join(data, "valid"), timeout_s=0.3, poll_s=0.05)
    with pytest.raises(TrainDataError, match="not committed after 0s .*feed_timeout_s"):
        reader.rows_at(np.array([0]))
    with pytest.raises(TrainDataError, match="not committed"):
        reader.rows_at(np.array([5]))


def test_failed_feed_stops_waiting_readers(tmp_path):
    data = str(tmp_path / "data")
    _, tasks = plan_split(data, "test", np.arange(4), part_rows=4, key="k")
    reader = StreamReader(storage.join(data, "test"), poll_s=0.02)
    storage.write_json_atomic(
        storage.join(data, FEED_FAILED), {"error": "RepsError: no representation for sample_id 3"}
    )
    with pytest.raises(TrainDataError, match="feed failed: RepsError: no representation for sample_id 3"):
        reader.rows_at(np.array([0]))


def test_part_with_other_row_count_than_its_plan_is_an_error(tmp_path):
    data = str(tmp_path / "data")
    _, tasks = plan_split(data, "train", np.arange(6), part_rows=6, key="k")
    _commit(tasks[0], _part(5, 0))
    with pytest.raises(TrainDataError, match="5 rows, the plan says 6"):
        StreamReader(storage.join(data, "train")).rows_at(np.array([0]))


def test_new_plan_key_replaces_the_split(tmp_path):
    data = str(tmp_path / "data")
    _, tasks = plan_split(data, "train", np.arange(4), part_rows=4, key="a")
    _commit(tasks[0], _part(4, 0))
    plan, tasks = plan_split(data, "train", np.arange(10, 14), part_rows=4, key="b")
    assert storage.read_json(storage.join(data, "train", "plan.json"))["key"] == "b"
    assert not storage.exists(part_marker(tasks[0]["url"])) and not storage.exists(tasks[0]["url"])
    assert part_name(0) == "part-00000.parquet"
