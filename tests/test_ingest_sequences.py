"""The `sequences` format: one row per sample with a history list and a target (MiniOneRec's CSVs, LLaRA-style
JSONL), read directly with the list column's encoding declared."""

from __future__ import annotations

import ast
import json

import pandas as pd
import pytest

from configs.schema import ColumnsConfig
from recdata.ingest import IngestOptions, ingest
from recdata.schema import Dataset
from recdata.synthetic import write_source
from recdata.textfiles import IngestError

OPTS = IngestOptions(task="next_item", progress=False)


def _samples(ds: Dataset) -> list[tuple[tuple, object, str]]:
    """Each pseudo-user as (history keys in order, target key, split), sorted: what the rows of the source say."""
    df = ds.read_interactions(["user_id", "item_id", "timestamp", "split"]).to_pandas()
    df["split"] = df["split"].astype(str)
    imap = ds.id_map("item_id")
    if imap is not None:
        df["item_id"] = df["item_id"].map(dict(zip(imap["item_id"].to_pylist(), imap["key"].to_pylist())))
    out = []
    for _, g in df.sort_values(["user_id", "timestamp"]).groupby("user_id"):
        items, splits = g["item_id"].tolist(), g["split"].tolist()
        assert splits[:-1] == ["context"] * (len(splits) - 1)
        out.append((tuple(items[:-1]), items[-1], splits[-1]))
    return sorted(out, key=repr)


def test_minionerec_csv_with_python_lists_and_asins(tmp_path):
    raw = write_source(tmp_path / "raw", "sequences", ratings="all")
    cols = ColumnsConfig(history="history_item_id", target="item_id", list_format="python", rating="rating")
    m = ingest("sequences", str(raw.root), str(tmp_path / "ds"), OPTS, items=str(raw.root / "items.csv"), columns=cols)
    assert m["num_interactions"] == raw.rows and m["missing_ratings"] == raw.missing_ratings
    assert m["split_method"] == "given" and "item_id" in m["id_maps"]
    want = []
    for split in ("train", "valid", "test"):
        for r in pd.read_csv(raw.root / f"{split}.csv", dtype=str).itertuples():
            want.append((tuple(ast.literal_eval(r.history_item_id)), r.item_id, split))
    assert _samples(Dataset.open(str(tmp_path / "ds"))) == sorted(want, key=repr)


def test_jsonl_with_native_lists_and_a_split_column_matches_llara(tmp_path):
    raw = write_source(tmp_path / "llara", "llara", ratings="none")
    src = tmp_path / "seq"
    src.mkdir()
    lines = []
    for name, split in (("train_data", "train"), ("val_data", "valid"), ("test_data", "test")):
        for line in (raw.root / f"{name}.jsonl").read_text().splitlines():
            row = json.loads(line)
            lines.append(json.dumps({"hist": row["seq"][: row["len_seq"]], "next": row["next"], "split": split}))
    (src / "all.jsonl").write_text("\n".join(lines) + "\n")
    items = pd.DataFrame([ln.split("::", 1) for ln in (raw.root / "id2name.txt").read_text().splitlines()])
    items.columns = ["item_id", "title"]
    items.to_csv(tmp_path / "items.csv", index=False)
    ingest("llara", str(raw.root), str(tmp_path / "a"), OPTS)
    ingest("sequences", str(src), str(tmp_path / "b"), OPTS, items=str(tmp_path / "items.csv"),
           columns=ColumnsConfig(history="hist", target="next", rating=None))  # fmt: skip
    a, b = Dataset.open(str(tmp_path / "a")), Dataset.open(str(tmp_path / "b"))
    assert b.id_map("item_id") is None  # integer ids stay as they are
    assert _samples(a) == _samples(b)


@pytest.mark.parametrize("fmt,cell", [("space", "3 1 2"), ("pipe", "3|1|2"), ("json", "[3, 1, 2]")])
def test_list_formats(fmt, cell, tmp_path):
    pd.DataFrame({"history": [cell], "target": [4]}).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"item_id": [1, 2, 3, 4], "title": list("ABCD")}).to_csv(tmp_path / "items.csv", index=False)
    ingest("sequences", str(tmp_path / "train.csv"), str(tmp_path / "ds"), OPTS, items=str(tmp_path / "items.csv"),
           columns=ColumnsConfig(list_format=fmt, rating=None))  # fmt: skip
    assert _samples(Dataset.open(str(tmp_path / "ds"))) == [((3, 1, 2), 4, "train")]


def _one_file(tmp_path, name: str, cells: list[str], **cols):
    pd.DataFrame({"history": cells, "target": ["B01"] * len(cells)}).to_csv(tmp_path / name, index=False)
    pd.DataFrame({"item_id": ["B01", "B02"], "title": ["A", "B"]}).to_csv(tmp_path / "items.csv", index=False)
    return ingest("sequences", str(tmp_path / name), str(tmp_path / "ds"), OPTS, items=str(tmp_path / "items.csv"),
                  columns=ColumnsConfig(rating=None, **cols))  # fmt: skip


def test_single_quotes_under_json_name_the_flag(tmp_path):
    with pytest.raises(IngestError, match=r"train\.csv:3: column 'history' is not a json list.*--list-format python"):
        _one_file(tmp_path, "train.csv", ['["B02"]', "['B02']"])


def test_unknown_history_item_is_named_with_its_line(tmp_path):
    with pytest.raises(IngestError, match=r"test\.csv:3: item id 'B99' is not in the items file"):
        _one_file(tmp_path, "test.csv", ['["B02"]', '["B02", "B99"]'])


def test_no_split_is_refused(tmp_path):
    with pytest.raises(IngestError, match="no split: add a 'split' column"):
        _one_file(tmp_path, "reviews.csv", ['["B02"]'])


def test_missing_history_column_names_its_flag(tmp_path):
    with pytest.raises(IngestError, match="--history-col"):
        _one_file(tmp_path, "train.csv", ['["B02"]'], history="history_item_id")
