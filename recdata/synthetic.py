"""A small synthetic dataset with real preference structure, for tests, benchmarks and trying the pipeline
without downloading anything: each user loves one genre (rates it 5) and is lukewarm about the rest."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from recdata.readers import ML100K_GENRES


def preference_dataset(root: Path, n_users: int = 120, n_items: int = 60, per_user: int = 24, seed: int = 0) -> Path:
    """Write `{root}/src/inter.csv` and `items.csv` (generic ingest format) and return that folder."""
    rng = np.random.default_rng(seed)
    genres = ["Comedy", "Drama", "Horror", "Sci-Fi"]
    item_genre = rng.integers(0, len(genres), n_items)
    rows = []
    for u in range(n_users):
        fav = u % len(genres)
        for k, i in enumerate(rng.choice(n_items, per_user, replace=False)):
            r = 5 if item_genre[i] == fav else int(rng.integers(1, 4))
            rows.append((u, int(i), 1_000_000 + u * 7 + k * 1000, float(r)))
    d = Path(root) / "src"
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"]).to_csv(d / "inter.csv", index=False)
    pd.DataFrame(
        {
            "item_id": np.arange(n_items),
            "title": [f"Film {i} ({1990 + i % 20})" for i in range(n_items)],
            "genres": [genres[g] for g in item_genre],
        }
    ).to_csv(d / "items.csv", index=False)
    return d


# ------------------------------------------------------------------------------ raw files in every format
FORMATS = ("movielens", "recbole", "llara", "generic", "sequences")
_GENRES = ["Comedy", "Drama", "Horror", "Sci-Fi"]


@dataclass
class RawSource:
    """Raw files written in one source format, and what ingesting them must report."""

    format: str
    root: Path
    overrides: list[str]  # the `data.*` keys of trainer/main.py that point a run at these files
    rows: int  # interactions written (LLaRA: history + target rows of every pseudo-user)
    has_ratings: bool
    missing_ratings: int  # rows written without a rating (ingest keeps them as null for next_item)
    timestamps: bool  # real timestamps (False: only the order of a user's rows)


@dataclass
class _Log:
    users: list[int] = field(default_factory=list)
    items: list[int] = field(default_factory=list)
    times: list[int] = field(default_factory=list)
    ratings: list[float | None] = field(default_factory=list)


def _interaction_log(n_users: int, n_items: int, per_user: int, ratings: str, seed: int) -> tuple[_Log, np.ndarray]:
    """Each user loves one genre (4-5 stars) and is lukewarm about the rest (1-3); interleaved timestamps.
    ratings: "all", "none", or "some" (every third row has none, the first row of a user included)."""
    rng = np.random.default_rng(seed)
    item_genre = rng.integers(0, len(_GENRES), n_items)
    log = _Log()
    for u in range(n_users):
        fav = u % len(_GENRES)
        for k, i in enumerate(rng.choice(n_items, per_user, replace=False)):
            r = float(rng.integers(4, 6)) if item_genre[i] == fav else float(rng.integers(1, 4))
            log.users.append(u + 1)
            log.items.append(int(i) + 1)
            log.times.append(978_300_000 + k * 3_600 + u * 60)
            row = len(log.ratings)
            log.ratings.append(None if ratings == "none" or (ratings == "some" and row % 3 == 0) else r)
    return log, item_genre


def _titles(n_items: int) -> list[str]:
    return [f"Film {i} ({1990 + i % 20})" for i in range(1, n_items + 1)]


def write_source(
    root: Path,
    fmt: str,
    *,
    ratings: str = "all",
    timestamps: bool = True,
    layout: str = "",
    n_users: int = 40,
    n_items: int = 30,
    per_user: int = 15,
    seed: int = 0,
) -> RawSource:
    """Write a small dataset as raw files in `fmt` under `root` (created) and return how to ingest it.

    ratings: "all" | "none" | "some" (some rows without a rating). timestamps=False writes no time field
    (recbole, generic: the file order is the order) or, for LLaRA, is the format's own (sequences only).
    layout: movielens "100k" (u.data, default) | "1m" (ratings.dat) | "csv" (ratings.csv);
    generic "csv" (default) | "parquet"."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {FORMATS}")
    if ratings not in ("all", "none", "some"):
        raise ValueError(f"ratings {ratings!r}: choose all, none or some")
    if fmt == "movielens" and (ratings == "none" or not timestamps):
        raise ValueError("MovieLens files always carry ratings and timestamps")
    if fmt in ("llara", "sequences") and timestamps:
        timestamps = False  # LLaRA sequences carry only the order
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    log, item_genre = _interaction_log(n_users, n_items, per_user, ratings, seed)
    titles = _titles(n_items)
    missing = 0 if ratings == "none" else sum(r is None for r in log.ratings)
    writer = {
        "movielens": _write_movielens,
        "recbole": _write_recbole,
        "llara": _write_llara,
        "generic": _write_generic,
        "sequences": _write_sequences,
    }
    overrides, rows, missing = writer[fmt](root, log, item_genre, titles, ratings, timestamps, layout, missing)
    return RawSource(fmt, root, [f"data.format={fmt}", *overrides], rows, ratings != "none", missing, timestamps)


def _fmt_rating(r: float | None) -> str:
    return "" if r is None else f"{r:g}"


def _write_movielens(root, log, item_genre, titles, ratings, timestamps, layout, missing):
    n_users = max(log.users)
    rows = zip(log.users, log.items, log.ratings, log.times)
    if layout in ("", "100k"):
        (root / "u.data").write_text("".join(f"{u}\t{i}\t{_fmt_rating(r)}\t{t}\n" for u, i, r, t in rows))
        lines = []
        for i, title in enumerate(titles):
            flags = ["0"] * len(ML100K_GENRES)
            flags[ML100K_GENRES.index(_GENRES[item_genre[i]])] = "1"
            lines.append(f"{i + 1}|{title}|01-Jan-{1990 + (i + 1) % 20}||http://example.org/{i + 1}|" + "|".join(flags))
        (root / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
        (root / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(ML100K_GENRES)) + "\n")
        (root / "u.user").write_text(
            "".join(
                f"{u}|{20 + u % 40}|{'MF'[u % 2]}|{('student', 'writer', 'other')[u % 3]}|{10000 + u}\n"
                for u in range(1, n_users + 1)
            )
        )
    elif layout == "1m":
        (root / "ratings.dat").write_text("".join(f"{u}::{i}::{_fmt_rating(r)}::{t}\n" for u, i, r, t in rows))
        (root / "movies.dat").write_bytes(
            "".join(f"{i + 1}::{title}::{_GENRES[item_genre[i]]}\n" for i, title in enumerate(titles)).encode("latin-1")
        )
        (root / "users.dat").write_text(
            "".join(
                f"{u}::{'MF'[u % 2]}::{(18, 25, 35)[u % 3]}::{u % 21}::{10000 + u}\n" for u in range(1, n_users + 1)
            )
        )
    elif layout == "csv":
        (root / "ratings.csv").write_text(
            "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{_fmt_rating(r)},{t}\n" for u, i, r, t in rows)
        )
        (root / "movies.csv").write_text(
            "movieId,title,genres\n"
            + "".join(f'{i + 1},"{title}",{_GENRES[item_genre[i]]}\n' for i, title in enumerate(titles))
        )
    else:
        raise ValueError(f"movielens layout {layout!r}: choose 100k, 1m or csv")
    return [f"data.src={root}"], len(log.users), missing


def _write_recbole(root, log, item_genre, titles, ratings, timestamps, layout, missing):
    head = ["user_id:token", "item_id:token"] + (["rating:float"] if ratings != "none" else [])
    head += ["timestamp:float"] if timestamps else []
    lines = ["\t".join(head)]
    for u, i, r, t in zip(log.users, log.items, log.ratings, log.times):
        fields = [str(u), str(i)] + ([_fmt_rating(r)] if ratings != "none" else []) + ([str(t)] if timestamps else [])
        lines.append("\t".join(fields))
    (root / "syn.inter").write_text("\n".join(lines) + "\n")
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    for i, title in enumerate(titles):
        items.append(f"{i + 1}\t{title.rsplit(' (', 1)[0]}\t{1990 + (i + 1) % 20}\t{_GENRES[item_genre[i]]}")
    (root / "syn.item").write_text("\n".join(items) + "\n")
    users = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    users += [f"{u}\t{20 + u % 40}\t{'MF'[u % 2]}\tstudent\t{10000 + u}" for u in sorted(set(log.users))]
    (root / "syn.user").write_text("\n".join(users) + "\n")
    return [f"data.src={root}"], len(log.users), missing


def _sequence_samples(log: _Log, window: int):
    """(user, history rows, target row, split) for every target after a user's second interaction: the `window`
    rows before it as history; each user's last target is test, the one before valid, the rest train."""
    by_user: dict[int, list[int]] = {}
    for row, u in enumerate(log.users):
        by_user.setdefault(u, []).append(row)
    for u, idx in by_user.items():
        for pos in range(2, len(idx)):
            split = "test" if pos == len(idx) - 1 else "valid" if pos == len(idx) - 2 else "train"
            yield u, idx[max(0, pos - window) : pos], idx[pos], split


def _write_llara(root, log, item_genre, titles, ratings, timestamps, layout, missing, window: int = 10):
    """One JSONL row per (user, target): the `window` items before it (padded with the pad id, as LLaRA's
    files are), len_seq, next; each user's last target is in the test file, the one before in val."""
    pad = len(titles) + 1
    files: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    rows = missing = 0
    for _, hist, target, split in _sequence_samples(log, window):
        seq = [log.items[r] for r in hist]
        rec = {"seq": seq + [pad] * (window - len(seq)), "len_seq": len(seq), "next": log.items[target]}
        if ratings != "none":
            rec["seq_ratings"] = [log.ratings[r] for r in hist] + [0] * (window - len(seq))
            if log.ratings[target] is not None:
                rec["next_rating"] = log.ratings[target]
            missing += sum(log.ratings[r] is None for r in hist) + (log.ratings[target] is None)
        files["val" if split == "valid" else split].append(json.dumps(rec))
        rows += len(seq) + 1
    for split, lines in files.items():
        (root / f"{split}_data.jsonl").write_text("\n".join(lines) + "\n")
    (root / "id2name.txt").write_text("".join(f"{i + 1}::{t}\n" for i, t in enumerate(titles)))
    return [f"data.src={root}"], rows, missing


def _asin(item: int) -> str:
    """An Amazon-style item id: ASINs, and every fifth one all digits with leading zeros (old ISBN ones)."""
    return f"{item:010d}" if item % 5 == 0 else f"B0{item * 104729 % 65536:04X}{item:02d}"


def _write_sequences(root, log, item_genre, titles, ratings, timestamps, layout, missing, window: int = 10):
    """MiniOneRec-style CSVs (train.csv, valid.csv, test.csv): one row per (user, target) with the history as a
    Python list of ASIN strings (`list_format: python`), the target ASIN and its rating; items.csv by ASIN."""
    files: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    rows = missing = 0
    for u, hist, target, split in _sequence_samples(log, window):
        rec = {
            "user_id": f"A{u:05d}",
            "history_item_id": repr([_asin(log.items[r]) for r in hist]),
            "item_id": _asin(log.items[target]),
        }
        if ratings != "none":
            rec["rating"] = log.ratings[target]
            missing += len(hist) + (log.ratings[target] is None)  # history rows carry no rating
        files[split].append(rec)
        rows += len(hist) + 1
    for split, recs in files.items():
        pd.DataFrame(recs).to_csv(root / f"{split}.csv", index=False)
    items = pd.DataFrame({"item_id": [_asin(i) for i in range(1, len(titles) + 1)], "title": titles})
    items.to_csv(root / "items.csv", index=False)
    overrides = [
        f"data.src={root}",
        f"data.items={root / 'items.csv'}",
        "data.columns.history=history_item_id",
        "data.columns.target=item_id",
        "data.columns.list_format=python",
        f"data.columns.rating={'rating' if ratings != 'none' else ''}",
    ]
    return overrides, rows, missing


def _write_generic(root, log, item_genre, titles, ratings, timestamps, layout, missing):
    cols = {"uid": log.users, "iid": log.items}
    if timestamps:
        cols["when"] = [time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) for t in log.times]
    if ratings != "none":
        cols["stars"] = pd.array(log.ratings, dtype="Float64")
    inter = pd.DataFrame(cols)
    items = pd.DataFrame(
        {"movie": np.arange(1, len(titles) + 1), "name": titles, "genres": [_GENRES[g] for g in item_genre]}
    )
    if layout in ("", "csv"):
        src, items_f = root / "inter.csv", root / "items.csv"
        inter.to_csv(src, index=False)
        items.to_csv(items_f, index=False)
    elif layout == "parquet":
        src, items_f = root / "inter.parquet", root / "items.parquet"
        inter.to_parquet(src, index=False)
        items.to_parquet(items_f, index=False)
    else:
        raise ValueError(f"generic layout {layout!r}: choose csv or parquet")
    users_f = root / "users.csv"
    uids = sorted(set(log.users))
    pd.DataFrame({"uid": uids, "age": [20 + u % 40 for u in uids], "gender": ["MF"[u % 2] for u in uids]}).to_csv(
        users_f, index=False
    )
    overrides = [
        f"data.src={src}",
        f"data.items={items_f}",
        f"data.users={users_f}",
        "data.columns.user=uid",
        "data.columns.item=iid",
        "data.columns.item_id=movie",
        "data.columns.title=name",
        f"data.columns.timestamp={'when' if timestamps else ''}",
        f"data.columns.rating={'stars' if ratings != 'none' else ''}",
    ]
    return overrides, len(log.users), missing
