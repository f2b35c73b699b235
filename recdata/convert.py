"""One-off conversions of published data into files the ingester reads.

`llara-pickles`: LLaRA/iLoRA publish their splits as pandas pickles (`train_data.df`, `Val_data.df`,
`Test_data.df`). Unpickling runs whatever code the file carries, so the ingester never loads them; this
command does, once, only with `--trust-pickle`, and writes the LLaRA JSONL the `llara` format reads:
`{"seq": [...], "len_seq": n, "next": id}`, plus `seq_ratings` / `next_rating` where the pickle holds
`(item, rating)` pairs (LLaRA's MovieLens). The items file (`id2name.txt` or `u.item`) is copied beside.

    python -m recdata.convert llara-pickles --src data/ref/lastfm --out data/lastfm-jsonl --trust-pickle
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from configs.errors import RecloraError
from configs.loader import HelpFormatter
from configs.logs import get_logger, setup_logging
from recdata import storage
from recdata.textfiles import IngestError

log = get_logger(__name__)

# (pickle, JSONL) names, as LLaRA's repository spells them (Val/Test capitalised).
LLARA_FILES = (
    (("train_data.df",), "train_data.jsonl"),
    (("Val_data.df", "val_data.df"), "val_data.jsonl"),
    (("Test_data.df", "test_data.df"), "test_data.jsonl"),
)
ITEM_FILES = ("id2name.txt", "u.item")
PICKLE_WARNING = (
    "warning: loading pandas pickles runs any code the files carry; do this only for files from a source you "
    "trust (LLaRA's and iLoRA's published data). The JSONL written here is safe to share and to ingest."
)


def _number(value: Any, where: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise IngestError(f"{where}: expected an integer item id or rating, got {value!r}") from None
    if number != value:
        raise IngestError(f"{where}: expected an integer, got {value!r}")
    return number


def llara_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """One pickled LLaRA row -> the JSONL object (ratings split out of (item, rating) pairs)."""
    missing = [k for k in ("seq", "len_seq", "next") if k not in row]
    if missing:
        raise IngestError(f"{where}: missing column(s) {missing}; a LLaRA split has seq, len_seq and next")
    seq, nxt = list(row["seq"]), row["next"]
    pairs = bool(seq) and isinstance(seq[0], (tuple, list))
    out: dict[str, Any] = {"seq": [_number(s[0] if pairs else s, where) for s in seq]}
    if pairs:
        out["seq_ratings"] = [_number(s[1], where) for s in seq]
    out["len_seq"] = _number(row["len_seq"], where)
    if isinstance(nxt, (tuple, list)):
        out["next"], out["next_rating"] = _number(nxt[0], where), _number(nxt[1], where)
    else:
        out["next"] = _number(nxt, where)
    return out


def convert_llara_pickles(src: str, out: str, trust_pickle: bool = False) -> dict[str, int]:
    """Convert every LLaRA pickle found under `src` to JSONL under `out`; returns rows per written file."""
    if not trust_pickle:
        raise IngestError(
            f"{src}: converting pandas pickles runs code from the files; pass --trust-pickle if you trust them"
        )
    import pandas as pd  # only this command needs pandas

    fs, root = storage.get_fs(src)
    with storage.storage_errors(src):
        names = set(fs.ls(root, detail=False)) if fs.isdir(root) else set()
    names = {n.rstrip("/").rsplit("/", 1)[-1] for n in names}
    todo = [(next(p for p in pickles if p in names), jsonl) for pickles, jsonl in LLARA_FILES if names & set(pickles)]
    if not todo:
        raise IngestError(f"{src}: no LLaRA pickles (train_data.df, Val_data.df, Test_data.df)")
    log.warning("%s", PICKLE_WARNING)
    written: dict[str, int] = {}
    for pickle_name, jsonl_name in todo:
        url = storage.join(src, pickle_name)
        fs, path = storage.get_fs(url)
        with storage.storage_errors(url), fs.open(path, "rb") as f:
            frame = pd.read_pickle(f)
        if not isinstance(frame, pd.DataFrame):
            raise IngestError(f"{url}: holds a {type(frame).__name__}, not a pandas DataFrame")
        lines = [json.dumps(llara_row(row, f"{url} row {i}")) for i, row in enumerate(frame.to_dict(orient="records"))]
        storage.write_bytes_atomic(storage.join(out, jsonl_name), ("\n".join(lines) + "\n").encode())
        written[jsonl_name] = len(lines)
    for name in ITEM_FILES:
        if name in names:
            item_url = storage.join(src, name)
            item_fs, item_path = storage.get_fs(item_url)
            with storage.storage_errors(item_url), item_fs.open(item_path, "rb") as f:
                storage.write_bytes_atomic(storage.join(out, name), f.read())
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m recdata.convert",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    sub = p.add_subparsers(dest="what", required=True)
    lp = sub.add_parser(
        "llara-pickles",
        help="LLaRA/iLoRA *.df pickles -> LLaRA JSONL (needs --trust-pickle)",
        formatter_class=HelpFormatter,
    )
    lp.add_argument("--src", required=True, help="folder with train_data.df / Val_data.df / Test_data.df")
    lp.add_argument("--out", required=True, help="folder for the JSONL files (local path or s3://)")
    lp.add_argument("--trust-pickle", action="store_true", help="allow unpickling (runs code from the files)")
    a = p.parse_args(argv)
    setup_logging()
    try:
        written = convert_llara_pickles(a.src, a.out, a.trust_pickle)
    except RecloraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, rows in written.items():
        print(f"{storage.join(a.out, name)}: {rows:,} rows")
    print(f"next: reclora ingest llara --src {a.out} --out DATASET_URL --task next_item")
    return 0


if __name__ == "__main__":
    sys.exit(main())
