"""The user's own string ids (Amazon reviews: `A4042` users, ASIN items, some all digits with leading zeros)
are mapped to dense integers at ingest, and the dataset keeps the map."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from configs.schema import ColumnsConfig
from recdata.ingest import IngestOptions, ingest, summary
from recdata.schema import Dataset
from recdata.textfiles import IngestError

COLS = ColumnsConfig(user="reviewerID", item="asin", timestamp="unixReviewTime", rating="overall", item_id="asin")


def _amazon(tmp_path, n_users=40, n_items=30, n=600, seed=0):
    rng = np.random.default_rng(seed)
    # Digit-only ASINs (old ISBN-style ones) with leading zeros must stay distinct from their numeric value.
    asins = [f"B0{i:08X}" for i in range(n_items - 3)] + ["0001234567", "1234567", "0000000042"]
    users = [f"A{rng.integers(10**5, 10**6)}{chr(65 + i % 26)}" for i in range(n_users)]
    inter = pd.DataFrame(
        {
            "reviewerID": rng.choice(users, n),
            "asin": rng.choice(asins, n),
            "unixReviewTime": rng.integers(1_300_000_000, 1_400_000_000, n),
            "overall": rng.integers(1, 6, n).astype(float),
        }
    ).drop_duplicates(["reviewerID", "asin", "unixReviewTime"])
    src = tmp_path / "reviews"
    src.mkdir()
    half = len(inter) // 2
    inter.iloc[:half].to_csv(src / "part1.csv", index=False)
    inter.iloc[half:].to_parquet(src / "part2.parquet")
    items = pd.DataFrame({"asin": asins, "title": [f"Product {a}" for a in asins]})
    items.to_csv(tmp_path / "meta.csv", index=False)
    return src, tmp_path / "meta.csv", inter, items


def _decoded(ds: Dataset) -> pd.DataFrame:
    df = ds.read_interactions(["user_id", "item_id", "timestamp", "rating"]).to_pandas()
    users = ds.id_map("user_id").to_pandas().set_index("user_id")["key"]
    items = ds.id_map("item_id").to_pandas().set_index("item_id")["key"]
    return pd.DataFrame(
        {
            "reviewerID": df["user_id"].map(users).to_numpy(),
            "asin": df["item_id"].map(items).to_numpy(),
            "unixReviewTime": df["timestamp"].to_numpy(),
            "overall": df["rating"].astype(float).to_numpy(),
        }
    )


def _key(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["reviewerID", "asin", "unixReviewTime"]).reset_index(drop=True)


def test_string_ids_are_mapped_and_round_trip(tmp_path):
    src, meta, inter, items = _amazon(tmp_path)
    m = ingest("generic", str(src), str(tmp_path / "out"), IngestOptions(num_shards=3, progress=False),
               items=str(meta), columns=COLS)  # fmt: skip
    ds = Dataset.open(str(tmp_path / "out"))
    assert set(m["id_maps"]) == {"user_id", "item_id"}
    for column, source_keys in (("user_id", inter["reviewerID"]), ("item_id", items["asin"])):
        table = ds.id_map(column).to_pandas()
        # Dense 1..N in sorted key order: the same ids on every machine, whatever the file order.
        assert table[column].tolist() == list(range(1, len(table) + 1))
        assert table["key"].tolist() == sorted(set(source_keys))
    assert {"0001234567", "1234567", "0000000042"} <= set(ds.id_map("item_id")["key"].to_pylist())
    # Every interaction comes back as the source wrote it.
    got = _decoded(ds)
    pd.testing.assert_frame_equal(_key(got), _key(inter), check_dtype=False)
    # Items keep their titles under the mapped ids.
    it = ds.read_items().to_pandas().merge(ds.id_map("item_id").to_pandas(), on="item_id")
    assert (it["title"] == "Product " + it["key"]).all()
    assert "string ids mapped" in summary(m)


def test_unknown_string_item_is_named_or_skipped(tmp_path):
    src, meta, inter, items = _amazon(tmp_path)
    extra = pd.DataFrame({"reviewerID": ["AZZZ"], "asin": ["B0NOTINMETA"], "unixReviewTime": [1_350_000_000],
                          "overall": [5.0]})  # fmt: skip
    extra.to_csv(src / "part3.csv", index=False)
    with pytest.raises(IngestError, match=r"part3\.csv:2: item id 'B0NOTINMETA' is not in the items file"):
        ingest("generic", str(src), str(tmp_path / "o1"), IngestOptions(progress=False), items=str(meta), columns=COLS)
    m = ingest("generic", str(src), str(tmp_path / "o2"), IngestOptions(progress=False, on_bad_rows="skip"),
               items=str(meta), columns=COLS)  # fmt: skip
    assert m["skipped"]["unknown_items"] == 1
    assert m["num_interactions"] == len(inter)


def test_string_user_ids_in_users_file(tmp_path):
    src, meta, inter, _ = _amazon(tmp_path)
    users = pd.DataFrame({"reviewerID": sorted(set(inter["reviewerID"])) + ["ANOREVIEWS"]})
    users["country"] = ["DE" if i % 2 else "US" for i in range(len(users))]
    users.to_csv(tmp_path / "users.csv", index=False)
    ingest("generic", str(src), str(tmp_path / "out"), IngestOptions(progress=False), items=str(meta),
           users=str(tmp_path / "users.csv"), columns=COLS)  # fmt: skip
    ds = Dataset.open(str(tmp_path / "out"))
    got = ds.read_users().to_pandas().merge(ds.id_map("user_id").to_pandas(), on="user_id")
    got = got[["key", "country"]].sort_values("key").reset_index(drop=True)
    # The user without reviews has no id and is dropped; the others keep their attributes under their ids.
    want = users.rename(columns={"reviewerID": "key"}).iloc[:-1].sort_values("key").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)


def test_integer_ids_have_no_map(tmp_path):
    pd.DataFrame({"user_id": [1, 2, 2], "item_id": [1, 2, 3], "timestamp": [1, 2, 3], "rating": [4, 5, 3]}).to_csv(
        tmp_path / "inter.csv", index=False
    )
    pd.DataFrame({"item_id": [1, 2, 3], "title": ["A", "B", "C"]}).to_csv(tmp_path / "items.csv", index=False)
    m = ingest("generic", str(tmp_path / "inter.csv"), str(tmp_path / "out"), IngestOptions(progress=False),
               items=str(tmp_path / "items.csv"))  # fmt: skip
    assert m["id_maps"] == {}
    assert Dataset.open(str(tmp_path / "out")).id_map("user_id") is None


def test_items_file_column_error_names_its_flag(tmp_path):
    src, meta, _, _ = _amazon(tmp_path)
    with pytest.raises(IngestError, match="--item-id-col"):
        ingest("generic", str(src), str(tmp_path / "o"), IngestOptions(progress=False), items=str(meta),
               columns=COLS.model_copy(update={"item_id": "ASIN"}))  # fmt: skip
