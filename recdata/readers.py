"""Source formats -> canonical in-memory tables (interactions batches, items, users).

Each reader only parses and names problems precisely; sharding, splitting and writing are shared
(recdata.ingest). Interaction batches carry user_id, item_id, timestamp (int64), rating (float32,
null when the source has none) and, for sources with their own splits, a `split` column.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recdata import storage
from recdata.textfiles import Column, IngestError, open_bytes, read_delimited


@dataclass
class Batch:
    table: pa.Table
    file: str
    first_line: int | None  # 1-based line of row 0 in `file` (None for Parquet: rows are named by index)

    # The source's own values of id columns that were mapped from strings to integers (IdMap), for messages.
    keys: dict[str, pa.Array] = field(default_factory=dict)
    lines: np.ndarray | None = None  # the source line of each row, where rows are not lines (sequence files)

    def where(self, row: int) -> str:
        if self.lines is not None:
            return f"{self.file}:{int(self.lines[row])}"
        return f"{self.file}:{self.first_line + row}" if self.first_line is not None else f"{self.file} row {row}"

    def show(self, column: str, row: int, value: object) -> str:
        """The id at `row` as the source wrote it: its string key when the column was mapped, else `value`."""
        return repr(self.keys[column][row].as_py()) if column in self.keys else str(value)


@dataclass
class IdMap:
    """String ids (Amazon's `A4042` users and ASIN items) mapped to dense integers 1..N in sorted byte order of
    the keys, so the mapping depends on the set of ids only, never on file order or the machine. The dataset
    keeps it (`id_map/{users,items}.parquet`) so requests and exports can speak the source's own ids."""

    column: str  # user_id | item_id
    keys: pa.Array  # sorted unique strings; keys[i] has id i + 1

    @classmethod
    def from_values(cls, column: str, values: list[pa.Array]) -> "IdMap":
        uniq = pc.unique(pa.chunked_array([pc.cast(v, pa.string()) for v in values], pa.string())).drop_null()
        return cls(column, pc.take(uniq, pc.sort_indices(uniq)))

    def encode(self, values: pa.Array) -> pa.Array:
        """int64 ids; a key outside the map becomes 0 (no real id is 0), so the caller names it as unknown."""
        index = pc.index_in(pc.cast(values, pa.string()), value_set=self.keys)
        ids = pc.add(pc.cast(index, pa.int64()), 1)
        known_or_null = pc.or_(pc.is_valid(index), pc.is_null(values))
        return pc.if_else(known_or_null, ids, pa.scalar(0, pa.int64()))

    def table(self) -> pa.Table:
        return pa.table({self.column: pa.array(np.arange(1, len(self.keys) + 1, dtype=np.int64)), "key": self.keys})


@dataclass
class Source:
    description: str
    batches: Callable[[], Iterator[Batch]]
    items: pa.Table
    items_file: str
    users: pa.Table | None = None
    has_ratings: bool = True
    given_split: bool = False
    notes: dict = field(default_factory=dict)
    id_maps: dict[str, IdMap] = field(default_factory=dict)  # column -> map, for sources with string ids


def _ls(url: str) -> list[str]:
    fs, path = storage.get_fs(url)
    with storage.storage_errors(url):
        if not fs.exists(path):
            raise IngestError(f"{url}: source not found")
        if fs.isfile(path):
            return [url]
        return sorted(storage.join(url, p.rsplit("/", 1)[-1]) for p in fs.ls(path, detail=False))


def _find(url: str, *names: str, required: bool = True) -> str | None:
    files = _ls(url)
    by_name = {f.rsplit("/", 1)[-1]: f for f in files}
    for n in names:
        if n in by_name:
            return by_name[n]
    if required:
        raise IngestError(f"{url}: none of {list(names)} found (found: {sorted(by_name)[:12]})")
    return None


def _year(titles: pa.Array) -> pa.Array:
    years = pc.extract_regex(titles, r"\((?P<y>\d{4})\)\s*$")
    return pc.cast(pc.struct_field(years, "y"), pa.int32())


def _interactions(t: pa.Table, has_rating: bool) -> pa.Table:
    rating = t["rating"].cast(pa.float32()) if has_rating else pa.nulls(len(t), pa.float32())
    return pa.table(
        {
            "user_id": t["user_id"],
            "item_id": t["item_id"],
            "timestamp": t["timestamp"].cast(pa.int64()),
            "rating": rating,
        }
    )


def order_positions(users: np.ndarray, seen: dict[int, int]) -> np.ndarray:
    """Timestamps for sources that give only the order: each row's position among its user's rows in file
    order (0, 1, 2, ...), continued across batches through `seen` (user -> rows so far)."""
    n = len(users)
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(users, kind="stable")
    su = users[order]
    first = np.r_[True, su[1:] != su[:-1]]
    starts = np.flatnonzero(first)
    sizes = np.diff(np.r_[starts, n])
    uniq = su[starts]
    base = np.fromiter((seen.get(int(u), 0) for u in uniq), np.int64, len(uniq))
    pos = np.arange(n, dtype=np.int64) - np.repeat(starts, sizes) + np.repeat(base, sizes)
    seen.update(zip(uniq.tolist(), (base + sizes).tolist()))
    out = np.empty(n, np.int64)
    out[order] = pos
    return out


# --------------------------------------------------------------------------------------------- MovieLens
_ML1M_OCCUPATIONS = [
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
]
_ML1M_AGES = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}


def movielens(src: str) -> Source:
    """ML-100K (u.data/u.item/u.user), ML-1M/10M (::-separated .dat), ML-20M/25M (ratings.csv/movies.csv)."""
    if _find(src, "u.data", required=False):
        return _ml100k(src)
    if _find(src, "ratings.dat", required=False):
        return _ml_dat(src)
    if _find(src, "ratings.csv", required=False):
        return _ml_csv(src)
    raise IngestError(f"{src}: not a MovieLens folder (expected u.data, ratings.dat or ratings.csv)")


def _ml100k(src: str) -> Source:
    data = _find(src, "u.data")
    item_f = _find(src, "u.item")
    user_f = _find(src, "u.user", required=False)
    cols = [Column("user_id", "int"), Column("item_id", "int"), Column("rating", "float"), Column("timestamp", "int")]

    def batches():
        t = read_delimited(data, cols, "\t", what="user item rating timestamp")
        yield Batch(_interactions(t, True), data, 1)

    item_cols = [Column("item_id", "int"), Column("title", "str"), Column("release", "str"), None, None]
    genre_names = _ml100k_genres(src)
    item_cols += [Column(f"g{i}", "int") for i in range(len(genre_names))]
    it = read_delimited(item_f, item_cols, "|", encoding="latin-1", what="id|title|date||url|genre flags")
    flags = np.stack([it[f"g{i}"].to_numpy() for i in range(len(genre_names))], axis=1).astype(bool)
    genres = ["|".join(g for g, f in zip(genre_names, row) if f) for row in flags]
    items = pa.table(
        {"item_id": it["item_id"], "title": it["title"], "genres": pa.array(genres), "year": _year(it["title"])}
    )
    users = None
    if user_f:
        u = read_delimited(
            user_f,
            [
                Column("user_id", "int"),
                Column("age", "int"),
                Column("gender", "str"),
                Column("occupation", "str"),
                Column("zip", "str"),
            ],
            "|",
            encoding="latin-1",
            what="id|age|gender|occupation|zip",
        )
        gender = ["male" if g == "M" else "female" if g == "F" else g for g in u["gender"].to_pylist()]
        users = u.set_column(u.column_names.index("gender"), "gender", pa.array(gender))
    return Source(f"MovieLens-100K at {src}", batches, items, item_f, users)


# MovieLens-100K's genre order (u.genre), for folders that lack that file.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def _ml100k_genres(src: str) -> list[str]:
    g = _find(src, "u.genre", required=False)
    if g is None:
        return list(ML100K_GENRES)
    t = read_delimited(g, [Column("name", "str"), Column("idx", "int")], "|", encoding="latin-1", what="name|index")
    return [n for n, _ in sorted(zip(t["name"].to_pylist(), t["idx"].to_pylist()), key=lambda x: x[1])]


def _ml_dat(src: str) -> Source:
    data = _find(src, "ratings.dat")
    item_f = _find(src, "movies.dat")
    user_f = _find(src, "users.dat", required=False)
    cols = [Column("user_id", "int"), Column("item_id", "int"), Column("rating", "float"), Column("timestamp", "int")]

    def batches():
        t = read_delimited(data, cols, "::", what="UserID::MovieID::Rating::Timestamp")
        yield Batch(_interactions(t, True), data, 1)

    it = read_delimited(
        item_f,
        [Column("item_id", "int"), Column("title", "str"), Column("genres", "str")],
        "::",
        encoding="latin-1",
        what="MovieID::Title::Genres",
    )
    items = pa.table(
        {"item_id": it["item_id"], "title": it["title"], "genres": it["genres"], "year": _year(it["title"])}
    )
    users = None
    if user_f:
        u = read_delimited(
            user_f,
            [
                Column("user_id", "int"),
                Column("gender", "str"),
                Column("age", "int"),
                Column("occupation", "int"),
                Column("zip", "str"),
            ],
            "::",
            what="UserID::Gender::Age::Occupation::Zip",
        )
        occ = [
            (_ML1M_OCCUPATIONS[o] if 0 <= o < len(_ML1M_OCCUPATIONS) else "other") for o in u["occupation"].to_pylist()
        ]
        gender = ["male" if g == "M" else "female" if g == "F" else g for g in u["gender"].to_pylist()]
        ages = [_ML1M_AGES.get(a, str(a)) for a in u["age"].to_pylist()]
        users = pa.table({"user_id": u["user_id"], "gender": gender, "age": ages, "occupation": occ, "zip": u["zip"]})
    return Source(f"MovieLens (.dat) at {src}", batches, items, item_f, users)


def _ml_csv(src: str) -> Source:
    data = _find(src, "ratings.csv")
    item_f = _find(src, "movies.csv")
    cols = [Column("user_id", "int"), Column("item_id", "int"), Column("rating", "float"), Column("timestamp", "int")]

    def batches():
        t = read_delimited(data, cols, ",", header=True, what="userId,movieId,rating,timestamp")
        yield Batch(_interactions(t, True), data, 2)

    it = read_delimited(
        item_f,
        [Column("item_id", "int"), Column("title", "str"), Column("genres", "str")],
        ",",
        header=True,
        what="movieId,title,genres",
    )
    items = pa.table(
        {"item_id": it["item_id"], "title": it["title"], "genres": it["genres"], "year": _year(it["title"])}
    )
    return Source(f"MovieLens (.csv) at {src}", batches, items, item_f, None)


# ----------------------------------------------------------------------------------------------- RecBole
def _atomic_header(url: str, raw: bytes) -> list[tuple[str, str]]:
    first = raw.split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")
    fields = []
    for h in first.split("\t"):
        if ":" not in h:
            raise IngestError(f"{url}:1: RecBole header field {h!r} is not 'name:type' (e.g. user_id:token)")
        name, typ = h.rsplit(":", 1)
        fields.append((name, typ))
    return fields


def _pick(url: str, names: list[str], wanted: tuple[str, ...], role: str, required: bool = True) -> int | None:
    for w in wanted:
        if w in names:
            return names.index(w)
    for i, n in enumerate(names):
        if any(w in n for w in wanted):
            return i
    if required:
        raise IngestError(f"{url}: no {role} column (looked for {list(wanted)}; header has {names})")
    return None


def recbole(src: str) -> Source:
    """RecBole atomic files: {name}.inter, {name}.item, {name}.user (tab-separated, 'field:type' header)."""
    files = _ls(src)
    inter = next((f for f in files if f.endswith(".inter")), None)
    if inter is None:
        raise IngestError(f"{src}: no *.inter file (RecBole atomic format)")
    item_f = next((f for f in files if f.endswith(".item")), None)
    if item_f is None:
        raise IngestError(f"{src}: no *.item file: titles are needed for prompts")
    user_f = next((f for f in files if f.endswith(".user")), None)

    raw = open_bytes(inter)
    head = _atomic_header(inter, raw)
    names = [n for n, _ in head]
    ui = _pick(inter, names, ("user_id",), "user id")
    ii = _pick(inter, names, ("item_id",), "item id")
    # Without a timestamp field the file order is the interaction order (order_positions).
    ti = _pick(inter, names, ("timestamp",), "timestamp", required=False)
    ri = _pick(inter, names, ("rating",), "rating", required=False)
    cols: list[Column | None] = [None] * len(names)
    cols[ui], cols[ii] = Column("user_id", "int"), Column("item_id", "int")
    if ti is not None:
        cols[ti] = Column("timestamp", "float")
    if ri is not None:
        cols[ri] = Column("rating", "float")

    def batches():
        t = read_delimited(inter, cols, "\t", header=True, data=raw, what="\t".join(f"{n}:{ty}" for n, ty in head))
        if ti is None:
            uid = t["user_id"]
            # An empty user id is reported by ingest with its line; positions are never used then.
            users = uid.to_numpy() if not uid.null_count else np.zeros(len(uid), np.int64)
            t = t.append_column("timestamp", pa.array(order_positions(users, {})))
        else:
            ts = t["timestamp"].to_numpy(zero_copy_only=False)
            frac = np.flatnonzero(np.isfinite(ts) & (ts != np.floor(ts)))
            if len(frac):
                raise IngestError(
                    f"{inter}:{int(frac[0]) + 2}: column {ti + 1} ({names[ti]}) holds {float(ts[frac[0]])!r}, a timestamp "
                    f"with a fraction ({len(frac)} such rows); timestamps are whole seconds: round them in the file"
                )
        yield Batch(_interactions(t, ri is not None), inter, 2)

    iraw = open_bytes(item_f)
    ihead = [n for n, _ in _atomic_header(item_f, iraw)]
    icols: list[Column | None] = [Column(n, "str") for n in ihead]
    iid = _pick(item_f, ihead, ("item_id",), "item id")
    tid = _pick(item_f, ihead, ("movie_title", "title", "name"), "title")
    icols[iid] = Column("item_id", "int")
    icols[tid] = Column("title", "str")
    it = read_delimited(item_f, icols, "\t", header=True, data=iraw, what="RecBole item file")
    items = {"item_id": it["item_id"], "title": it["title"]}
    for n in it.column_names:
        if n in ("item_id", "title"):
            continue
        key = {"class": "genres", "genre": "genres", "release_year": "year"}.get(n, n)
        items[key] = it[n]
    if "genres" in items:
        items["genres"] = pc.replace_substring(items["genres"], " ", "|")
    if "year" in items:
        items["year"] = _int_or_null(items["year"])
    users = None
    if user_f:
        uraw = open_bytes(user_f)
        uhead = [n for n, _ in _atomic_header(user_f, uraw)]
        ucols: list[Column | None] = [Column(n, "str") for n in uhead]
        ucols[_pick(user_f, uhead, ("user_id",), "user id")] = Column("user_id", "int")
        u = read_delimited(user_f, ucols, "\t", header=True, data=uraw, what="RecBole user file")
        udict = {("zip" if n == "zip_code" else n): u[n] for n in u.column_names}
        if "age" in udict:
            udict["age"] = _int_or_null(udict["age"])
        if "gender" in udict:
            g = udict["gender"].to_pylist()
            udict["gender"] = ["male" if x == "M" else "female" if x == "F" else x for x in g]
        users = pa.table(udict)
    return Source(f"RecBole atomic files at {src}", batches, pa.table(items), item_f, users, has_ratings=ri is not None)


def _int_or_null(col) -> pa.Array:
    """Numeric-looking text -> int32, anything else -> null (years like '1995', ages like '24')."""
    text = pc.utf8_trim_whitespace(pc.cast(col, pa.string()))
    ok = pc.match_substring_regex(text, r"^-?\d+$")
    return pc.cast(pc.if_else(ok, text, pa.scalar(None, pa.string())), pa.int32())


# ------------------------------------------------------------------------------------------------- LLaRA
_LLARA_SPLITS = (
    ("train", ("train_data.jsonl", "Train_data.jsonl")),
    ("valid", ("val_data.jsonl", "Val_data.jsonl")),
    ("test", ("test_data.jsonl", "Test_data.jsonl")),
)


def llara(src: str, items_src: str | None = None) -> Source:
    """LLaRA/iLoRA next-item JSONL ({"seq": [...], "len_seq": n, "next": id}).

    Every row becomes one pseudo-user: its real history items (pad ids dropped) as `context` rows at
    timestamps 0..n-1 and the target at timestamp n with the file's split. The `.df` pickles are never read.
    """
    found = {}
    for split, names in _LLARA_SPLITS:
        f = _find(src, *names, required=False)
        if f:
            found[split] = f
    if not found:
        if _find(src, "train_data.df", "Val_data.df", "Test_data.df", required=False):
            raise IngestError(
                f"{src}: only pandas pickles (*.df) found, and pickles are never loaded; convert them once with "
                f"`python -m recdata.convert llara-pickles --src {src} --out JSONL_DIR --trust-pickle`"
            )
        raise IngestError(f"{src}: no LLaRA JSONL files (train_data.jsonl / val_data.jsonl / test_data.jsonl)")
    items_f = (
        items_src
        or _find(src, "id2name.txt", required=False)
        or _find(storage.join(src, "orig"), "id2name.txt", "u.item")
    )
    items = _llara_items(items_f)
    pad = int(pc.max(items["item_id"]).as_py()) + 1
    has_ratings = any(_llara_has_ratings(f) for f in found.values())

    def batches():
        offset = 0
        for split, f in found.items():
            table = _llara_rows(f, split, pad, offset)
            offset += int(table.num_rows and pc.max(table["user_id"]).as_py() + 1 - offset)
            yield Batch(table, f, None)

    return Source(
        f"LLaRA next-item JSONL at {src}",
        batches,
        items,
        items_f,
        None,
        has_ratings=has_ratings,
        given_split=True,
        notes={"pad_id": pad, "files": found},
    )


def _llara_items(url: str) -> pa.Table:
    raw = open_bytes(url)
    if url.endswith("u.item"):  # LLaRA's MovieLens: item id = u.item id - 1
        t = read_delimited(
            url,
            [Column("item_id", "int"), Column("title", "str"), None, None, None] + [None] * 19,
            "|",
            encoding="latin-1",
            data=raw,
            what="u.item",
        )
        return pa.table({"item_id": pc.subtract(t["item_id"], 1), "title": t["title"], "year": _year(t["title"])})
    ids, titles = [], []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if "::" not in line:
            raise IngestError(f"{url}:{lineno}: expected 'id::name', got {line[:80]!r}")
        a, b = line.split("::", 1)
        try:
            ids.append(int(a))
        except ValueError:
            raise IngestError(f"{url}:{lineno}: item id {a!r} is not an integer") from None
        titles.append(b.strip())
    return pa.table({"item_id": pa.array(ids, pa.int64()), "title": pa.array(titles)})


def _llara_has_ratings(url: str) -> bool:
    """Whether a LLaRA file carries ratings (`seq_ratings`, as the first rows show)."""
    fs, path = storage.get_fs(url)
    with storage.storage_errors(url), fs.open(path, "rb") as f:
        return b'"seq_ratings"' in f.read(4096)


def _llara_rating(value, url: str, lineno: int, field: str) -> float | None:
    """A rating from a LLaRA row: a number, or None when it is missing (null / absent)."""
    if value is None:
        return None
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise IngestError(f"{url}:{lineno}: {field} must hold numbers or null, got {value!r}") from None
    return None if np.isnan(r) else r


def _llara_rows(url: str, split: str, pad: int, user_offset: int) -> pa.Table:
    raw = open_bytes(url)
    users, items, times, ratings, splits = [], [], [], [], []
    has_r = b'"seq_ratings"' in raw[:4096]
    n_rows = 0
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            seq, n, nxt = row["seq"], int(row["len_seq"]), int(row["next"])
            seq = [int(s) for s in seq[:n]]
        except json.JSONDecodeError as e:
            raise IngestError(f"{url}:{lineno}: not valid JSON ({e.msg}); truncated file?") from None
        except KeyError as e:
            raise IngestError(f"{url}:{lineno}: missing field {e.args[0]!r} (expected seq, len_seq, next)") from None
        except (TypeError, ValueError):
            raise IngestError(
                f"{url}:{lineno}: len_seq/next must be integers and seq a list of integer item ids"
            ) from None
        hist = [s for s in seq if s != pad]
        u = user_offset + n_rows
        users.extend([u] * (len(hist) + 1))
        items.extend(hist + [nxt])
        times.extend(range(len(hist) + 1))
        if has_r:
            # Missing ratings (a row without seq_ratings, null entries, no next_rating) stay null.
            rs = row.get("seq_ratings")
            if rs is None:
                rs = [None] * len(seq)
            elif not isinstance(rs, list) or len(rs) < len(seq):
                raise IngestError(
                    f"{url}:{lineno}: seq_ratings must be a list with a rating (or null) for each of the "
                    f"{len(seq)} history items in seq"
                )
            hist_r = [_llara_rating(r, url, lineno, "seq_ratings") for s, r in zip(seq, rs) if s != pad]
            ratings.extend(hist_r + [_llara_rating(row.get("next_rating"), url, lineno, "next_rating")])
        splits.extend(["context"] * len(hist) + [split])
        n_rows += 1
    if n_rows == 0:
        raise IngestError(f"{url}: file is empty (expected LLaRA JSONL rows)")
    rating = pa.array(ratings, pa.float32()) if has_r else pa.nulls(len(items), pa.float32())
    return pa.table(
        {
            "user_id": pa.array(users, pa.int64()),
            "item_id": pa.array(items, pa.int64()),
            "timestamp": pa.array(times, pa.int64()),
            "rating": rating,
            "split": pa.array(splits),
        }
    )


# --------------------------------------------------------------------------------------------- sequences
LIST_FORMATS = {"json": None, "python": None, "space": " ", "comma": ",", "semicolon": ";", "pipe": "|"}
_SEQUENCE_SPLITS = (("train", ("train",)), ("valid", ("valid", "val", "eval", "dev")), ("test", ("test",)))


def sequences(src: str, items_src: str | None, columns, encoding: str = "utf-8") -> Source:
    """Sequence files: one row per sample with the user's history (a list) and the target item, as
    MiniOneRec's CSVs or LLaRA-style JSONL (`.jsonl`, `.csv`, `.tsv`, `.parquet`). Each row becomes one
    pseudo-user (its history as `context` rows in list order, the target after them), as LLaRA does. The split
    is the row's `split` column when the file has one, else the file's name (train* / val* / valid* / test*).
    In CSV the list column's encoding is declared (`list_format`); item ids may be strings (IdMap)."""
    if items_src is None:
        raise IngestError("sequences format needs an items file with titles: pass --items PATH")
    if columns.list_format not in LIST_FORMATS:
        raise IngestError(f"list format {columns.list_format!r}: choose one of {sorted(LIST_FORMATS)}")
    # The items file may sit in the same folder: it is not a sequence file.
    suffixes = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".pq")
    files = [f for f in _ls(src) if f.endswith(suffixes) and posixpath.normpath(f) != posixpath.normpath(items_src)]
    if not files:
        raise IngestError(f"{src}: no .jsonl/.csv/.tsv/.parquet sequence files")
    tables = [(f, _sequence_file(f, columns, encoding)) for f in files]
    item_need = {"item_id": columns.item_id, "title": columns.title}
    items_raw, items_csv = _read_side(items_src, item_need, encoding, (columns.item_id,))
    keys = [items_raw[columns.item_id]] + [t["target"] for _, t in tables] + [t["history"] for _, t in tables]
    strings = set() if all(_numeric(k) for k in keys) else {"item_id"}
    if not strings and items_csv:
        items_raw, _ = _read_side(items_src, item_need, encoding)
    items = _side_table(items_src, items_raw, item_need, items_csv, strings)
    id_maps = {"item_id": IdMap.from_values("item_id", [items["item_id"]])} if strings else {}
    if strings:
        items = items.set_column(0, "item_id", id_maps["item_id"].encode(items["item_id"]))

    def batches():
        offset = 0
        for f, t in tables:
            table, shown = _sequence_rows(f, t, offset, id_maps.get("item_id"))
            offset += len(t)
            lines = np.repeat(t["line"].to_numpy(), np.array([len(h) + 1 for h in t["history"].to_pylist()]))
            parquet = f.endswith((".parquet", ".pq"))
            yield Batch(table, f, None, shown, None if parquet else lines)

    return Source(
        f"sequence files at {src}",
        batches,
        items,
        items_src,
        None,
        has_ratings=any(t["rating"].null_count < len(t) for _, t in tables),
        given_split=True,
        notes={"files": files, "list_format": columns.list_format},
        id_maps=id_maps,
    )


def _split_of_file(url: str) -> str | None:
    name = url.rsplit("/", 1)[-1].lower()
    for split, prefixes in _SEQUENCE_SPLITS:
        if name.startswith(prefixes):
            return split
    return None


def _sequence_file(url: str, columns, encoding: str) -> pa.Table:
    """history (list of id text), target (id text), rating (float or null), split (str) of one file's rows."""
    need = {"history": columns.history, "target": columns.target}
    if url.endswith((".jsonl", ".json")):
        rows = []
        for lineno, line in enumerate(open_bytes(url).decode(encoding).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise IngestError(f"{url}:{lineno}: not valid JSON ({e.msg}); one object per line") from None
        if not rows:
            raise IngestError(f"{url}: file is empty (expected one JSON object per line)")
        names = list(rows[0][1]) if isinstance(rows[0][1], dict) else []
        _check_columns(url, names, need, _SEQUENCE_FLAGS)
        get = {k: [r.get(v) if isinstance(r, dict) else None for _, r in rows] for k, v in need.items()}
        extra = {c: [r.get(c) for _, r in rows] for c in (columns.rating, "split") if c and c in names}
        lines = [n for n, _ in rows]
    else:
        t, is_csv = _read_side(url, need, encoding, (columns.history, columns.target), _SEQUENCE_FLAGS)
        get = {k: t[v].to_pylist() for k, v in need.items()}
        extra = {c: t[c].to_pylist() for c in (columns.rating, "split") if c and c in t.column_names}
        lines = [i + 2 if is_csv else i for i in range(t.num_rows)]
    split_col = extra.get("split")
    file_split = _split_of_file(url)
    if split_col is None and file_split is None:
        raise IngestError(
            f"{url}: no split: add a 'split' column (train/valid/test) or name the file train*, val*/valid* or test*"
        )
    hist, target, splits = [], [], []
    for j, (h, tgt) in enumerate(zip(get["history"], get["target"])):
        where = f"{url}:{lines[j]}" if not url.endswith((".parquet", ".pq")) else f"{url} row {j}"
        hist.append(_history_list(h, columns.list_format, where, columns.history))
        if tgt is None or str(tgt).strip() == "":
            raise IngestError(f"{where}: column {columns.target!r} (the target item) is empty")
        target.append(str(tgt).strip())
        split = split_col[j] if split_col is not None else file_split
        split = {"val": "valid", "eval": "valid", "dev": "valid"}.get(split, split)
        if split not in ("train", "valid", "test"):
            raise IngestError(f"{where}: split {split!r}: expected train, valid or test")
        splits.append(split)
    rating = extra.get(columns.rating) if columns.rating else None
    return pa.table(
        {
            "history": pa.array(hist, pa.list_(pa.string())),
            "target": pa.array(target, pa.string()),
            "rating": pa.array(
                [None if r is None else float(r) for r in rating] if rating else [None] * len(target), pa.float32()
            ),
            "split": pa.array(splits),
            "line": pa.array(lines, pa.int64()),
        }
    )


_SEQUENCE_FLAGS = {"history": "--history-col", "target": "--target-col"}


def _history_list(value, list_format: str, where: str, column: str) -> list[str]:
    """A history cell -> item ids as text: a native list (JSONL, Parquet) or text in the declared encoding."""
    import ast

    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    text = str(value).strip()
    if not text:
        return []
    if list_format in ("json", "python"):
        try:
            parsed = json.loads(text) if list_format == "json" else ast.literal_eval(text)
        except (ValueError, SyntaxError):
            hint = " (single quotes? use --list-format python)" if "'" in text and list_format == "json" else ""
            raise IngestError(
                f"{where}: column {column!r} is not a {list_format} list: {text[:60]!r}{hint}; set the encoding "
                f"with --list-format ({', '.join(LIST_FORMATS)})"
            ) from None
        if not isinstance(parsed, (list, tuple)):
            raise IngestError(f"{where}: column {column!r} holds {text[:60]!r}, not a list")
        return [str(v).strip() for v in parsed]
    return [v.strip() for v in text.split(LIST_FORMATS[list_format]) if v.strip()]


def _sequence_rows(url: str, t: pa.Table, user_offset: int, id_map: IdMap | None) -> tuple[pa.Table, dict]:
    """One file's samples -> interaction rows: pseudo-user per row, history at times 0..n-1, target at n."""
    lengths = np.array([len(h) for h in t["history"].to_pylist()], np.int64)
    n = len(lengths)
    users = np.repeat(np.arange(user_offset, user_offset + n, dtype=np.int64), lengths + 1)
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    times = np.arange(len(users), dtype=np.int64) - np.repeat(starts, lengths + 1)
    keys, ratings, splits = [], [], []
    rating = t["rating"].to_pylist()
    for h, tgt, r, sp in zip(t["history"].to_pylist(), t["target"].to_pylist(), rating, t["split"].to_pylist()):
        keys.extend(h + [tgt])
        ratings.extend([None] * len(h) + [r])
        splits.extend(["context"] * len(h) + [sp])
    key_array = pa.array(keys, pa.string())
    if id_map is not None:
        items = id_map.encode(key_array)
    else:
        items = _as_int(url, key_array, "history/target", 0, False)
    table = pa.table(
        {
            "user_id": pa.array(users),
            "item_id": items,
            "timestamp": pa.array(times),
            "rating": pa.array(ratings, pa.float32()),
            "split": pa.array(splits),
        }
    )
    return table, {"item_id": key_array}


# ----------------------------------------------------------------------------------------------- generic
def generic(
    src: str, items_src: str | None, users_src: str | None, columns, encoding: str = "utf-8", batch_rows: int = 1 << 20
) -> Source:
    """The user's own CSV/Parquet: interactions (user, item, timestamp[, rating]) + an items file with titles.
    User and item ids may be integers or strings; string ids are mapped to dense integers (IdMap)."""
    if items_src is None:
        raise IngestError("generic format needs an items file with titles: pass --items PATH")
    need = {"user_id": columns.user, "item_id": columns.item}
    # No time column (columns.timestamp empty): the file order is the interaction order (order_positions).
    if columns.timestamp:
        need["timestamp"] = columns.timestamp
    if columns.rating:
        need["rating"] = columns.rating

    files = [f for f in _ls(src) if f.endswith((".csv", ".parquet", ".tsv", ".pq"))]
    if not files:
        raise IngestError(f"{src}: no .csv/.tsv/.parquet files")
    item_need = {"item_id": columns.item_id, "title": columns.title}
    # A column holds string ids when any file's values are not numbers (one ASIN among numeric ones is enough).
    # Id columns are scanned as text (an all-digit "0012" must stay "0012" when the ids turn out to be strings).
    found = _id_columns(files, need, encoding)
    items_raw, items_csv = _read_side(items_src, item_need, encoding, (columns.item_id,))
    found["item_id"].append(items_raw[columns.item_id])
    strings = {c for c, cols in found.items() if not all(_numeric(col) for col in cols)}
    if "item_id" not in strings and items_csv:
        items_raw, _ = _read_side(items_src, item_need, encoding)  # numbers as the reader infers them
    items = _side_table(items_src, items_raw, item_need, items_csv, strings)
    id_maps = {}
    if "user_id" in strings:
        id_maps["user_id"] = IdMap.from_values("user_id", found["user_id"])
    if "item_id" in strings:
        id_maps["item_id"] = IdMap.from_values("item_id", [items["item_id"]])
        items = items.set_column(0, "item_id", id_maps["item_id"].encode(items["item_id"]))
    del found

    def batches():
        seen: dict[int, int] = {}  # order-only sources: rows so far per user, across files and batches
        for f in files:
            for b in _generic_batches(f, need, columns, encoding, batch_rows, id_maps):
                if "timestamp" not in need:
                    uid = b.table["user_id"]
                    # An empty user id is reported by ingest with its line; positions are never used then.
                    users = uid.to_numpy() if not uid.null_count else np.zeros(len(uid), np.int64)
                    b.table = b.table.set_column(2, "timestamp", pa.array(order_positions(users, seen)))
                yield b

    users = None
    if users_src:
        users = _generic_table(users_src, {"user_id": columns.user}, encoding, strings)
        if "user_id" in id_maps:  # users without interactions have no id: they would be dropped anyway
            ids = id_maps["user_id"].encode(users["user_id"])
            users = users.set_column(0, "user_id", ids).filter(pc.not_equal(ids, 0))
    return Source(
        f"generic files at {src}",
        batches,
        items,
        items_src,
        users,
        has_ratings=bool(columns.rating),
        id_maps=id_maps,
    )


_NUMBER = r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$"


def _numeric(col) -> bool:
    """Whether an id column holds numbers only (typed as numbers, or text that reads as numbers)."""
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return True
    return bool(pc.all(pc.match_substring_regex(col, _NUMBER)).as_py() is not False)


def _id_columns(files: list[str], need: dict[str, str], encoding: str) -> dict[str, list[pa.Array]]:
    """The user and item id columns of every interactions file (CSV: as text; Parquet: as typed): the scan that
    decides whether ids are strings, and the keys of the user map."""
    wanted = {c: need[c] for c in ("user_id", "item_id")}
    out: dict[str, list[pa.Array]] = {"user_id": [], "item_id": []}
    for url in files:
        if url.endswith((".parquet", ".pq")):
            fs, path = storage.get_fs(url)
            with storage.storage_errors(url), fs.open(path, "rb") as fh:
                try:
                    pf = pq.ParquetFile(fh)
                except pa.ArrowInvalid as e:
                    raise IngestError(f"{url}: not a readable Parquet file ({e}); truncated or corrupt?") from None
                _check_columns(url, pf.schema_arrow.names, need)
                try:
                    t = pf.read(columns=list(dict.fromkeys(wanted.values())))
                except (pa.ArrowException, OSError) as e:
                    if not _decoding_error(e):
                        raise
                    raise IngestError(
                        f"{url}: corrupt Parquet data ({type(e).__name__}: {_first_line(e)}); "
                        f"the file is damaged: write or download it again"
                    ) from None
        else:
            t = _read_csv(url, need, encoding, list(dict.fromkeys(wanted.values())), tuple(wanted.values()))
        for canon, name in wanted.items():
            out[canon].append(t[name])
    return out


_FLAGS = {"user_id": "--user-col", "item_id": "--item-col", "timestamp": "--time-col", "rating": "--rating-col"}
# The items file names its id column with its own flag.
_ITEM_FILE_FLAGS = {"item_id": "--item-id-col", "title": "--title-col"}


def _check_columns(url: str, available: list[str], need: dict[str, str], flags: dict[str, str] | None = None) -> None:
    import difflib

    for canon, name in need.items():
        if name not in available:
            close = difflib.get_close_matches(name, available, n=1)
            opt = (flags or _FLAGS).get(canon, "")
            raise IngestError(
                f"{url}: column {name!r} ({canon}) not found; columns are {available}"
                + (f"; did you mean {close[0]!r}?" if close else "")
                + (f" Set it with {opt}." if opt else "")
            )


def _to_canonical(
    url: str, t: pa.Table, need: dict[str, str], first_row: int, is_csv: bool, id_maps: dict[str, IdMap]
) -> pa.Table:
    out = {}
    for canon, name in need.items():
        col = t[name]
        if canon in id_maps:
            col = id_maps[canon].encode(col)
        elif canon in ("user_id", "item_id"):
            col = _as_int(url, col, name, first_row, is_csv)
        elif canon == "timestamp":
            if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
                col = pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64())
            elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                try:
                    col = pc.cast(
                        pc.cast(
                            pc.strptime(col, format="%Y-%m-%dT%H:%M:%S", unit="s", error_is_null=False),
                            pa.timestamp("s"),
                        ),
                        pa.int64(),
                    )
                except pa.ArrowInvalid:
                    col = _as_int(url, col, name, first_row, is_csv, _TIMESTAMP_HINT)
            else:
                col = _as_int(url, col, name, first_row, is_csv, _TIMESTAMP_HINT)
        elif canon == "rating":
            if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
                bad = _first_bad(col, float)
                raise IngestError(
                    f"{_where(url, first_row + bad[0], is_csv)}: column {name!r} must be numeric, got {bad[1]!r}"
                )
            if pa.types.is_integer(col.type):
                big = np.flatnonzero(np.abs(col.to_numpy(zero_copy_only=False).astype(np.float64)) > 1 << 24)
                if len(big):
                    raise IngestError(
                        f"{_where(url, first_row + int(big[0]), is_csv)}: column {name!r} holds "
                        f"{col[int(big[0])].as_py()}, too large for a rating ({len(big)} such rows); is it the "
                        f"right column? Set the rating column with --rating-col"
                    )
            col = pc.cast(col, pa.float32())
        out[canon] = col
    if "timestamp" not in out:  # order only: generic() numbers the rows per user
        out["timestamp"] = pa.array(np.zeros(len(t), np.int64))
    if "rating" not in out:
        out["rating"] = pa.nulls(len(t), pa.float32())
    return pa.table({k: out[k] for k in ("user_id", "item_id", "timestamp", "rating")})


def _where(url: str, row: int, is_csv: bool) -> str:
    return f"{url}:{row + 2}" if is_csv else f"{url} row {row}"


def _first_bad(col, conv) -> tuple[int, object]:
    for i, v in enumerate(col.to_pylist()):
        try:
            conv(v)
        except (TypeError, ValueError):
            return i, v
    return 0, None


_ID_HINT = "must be an integer id, got {v!r} (map string ids to integers first)"
_TIMESTAMP_HINT = (
    "must be Unix seconds (an integer) or a date-time like 2020-01-06T00:00:00, got {v!r}; convert the column "
    "in the file"
)


def _as_int(url: str, col, name: str, first_row: int, is_csv: bool, hint: str = _ID_HINT):
    if pa.types.is_integer(col.type):
        return pc.cast(col, pa.int64())
    if pa.types.is_floating(col.type):
        arr = col.to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)))
        if len(bad):
            raise IngestError(
                f"{_where(url, first_row + int(bad[0]), is_csv)}: column {name!r} "
                + hint.split(" (map")[0].format(v=arr[bad[0]])
            )
        return pa.array(arr.astype(np.int64))
    try:
        return pc.cast(col, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        i, v = _first_bad(col, int)
        raise IngestError(f"{_where(url, first_row + i, is_csv)}: column {name!r} " + hint.format(v=v)) from None


def _generic_batches(
    url: str, need: dict[str, str], columns, encoding: str, batch_rows: int, id_maps: dict[str, IdMap]
) -> Iterator[Batch]:
    keys = {canon: need[canon] for canon in id_maps}
    fs, path = storage.get_fs(url)
    is_csv = not url.endswith((".parquet", ".pq"))
    if not is_csv:
        with storage.storage_errors(url), fs.open(path, "rb") as fh:
            try:
                pf = pq.ParquetFile(fh)
            except pa.ArrowInvalid as e:
                raise IngestError(f"{url}: not a readable Parquet file ({e}); truncated or corrupt?") from None
            _check_columns(url, pf.schema_arrow.names, need)
            row = 0
            it = pf.iter_batches(batch_size=batch_rows, columns=list(dict.fromkeys(need.values())))
            while True:
                try:
                    rb = next(it, None)
                except (pa.ArrowException, OSError) as e:
                    if not _decoding_error(e):
                        raise
                    raise IngestError(
                        f"{url}: corrupt Parquet data after row {row} ({type(e).__name__}: {_first_line(e)}); "
                        f"the file is damaged: write or download it again"
                    ) from None
                if rb is None:
                    break
                t = pa.Table.from_batches([rb])
                shown = {c: pc.cast(t[n], pa.string()) for c, n in keys.items()}
                yield Batch(_to_canonical(url, t, need, row, False, id_maps), url, None, shown)
                row += t.num_rows
        return
    # String ids stay strings: "0012" must not become 12 in a file whose ids all look numeric.
    t = _read_csv(url, need, encoding, list(dict.fromkeys(need.values())), tuple(keys.values()))
    if t.num_rows == 0:
        raise IngestError(f"{url}: only a header, no rows; the file needs one interaction per line below the header")
    shown = {c: t[n].combine_chunks() for c, n in keys.items()}
    yield Batch(_to_canonical(url, t, need, 0, True, id_maps), url, 2, shown)


def _read_csv(url: str, need: dict[str, str], encoding: str, include: list[str], text: tuple[str, ...]) -> pa.Table:
    """One interactions CSV/TSV, checked (empty file, wrong delimiter, missing columns, bad lines: one error naming
    file and line); columns `include`, of which `text` are read as strings. Used by the string-id scan and the
    batches, so both read a file the same way."""
    import io

    import pyarrow.csv as pacsv

    delim = "\t" if url.endswith(".tsv") else ","
    raw = open_bytes(url)
    if not raw.strip():
        raise IngestError(f"{url}: file is empty")
    header = raw.split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r").split(delim)
    if len(header) == 1 and len(need) > 1:
        raise IngestError(f"{url}:1: header has one column {header[0][:60]!r}: wrong delimiter? expected {delim!r}")
    _check_columns(url, header, need)
    try:
        return pacsv.read_csv(
            io.BytesIO(raw),
            read_options=pacsv.ReadOptions(encoding=encoding, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=delim),
            convert_options=pacsv.ConvertOptions(include_columns=include, column_types={n: pa.string() for n in text}),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise _csv_problem(url, raw, delim, len(header), encoding, e) from None


def _csv_problem(url: str, raw: bytes, delim: str, ncols: int, encoding: str, err) -> IngestError:
    import csv
    import io

    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return IngestError(
            f"{url}:{line}: bytes are not valid {encoding} at byte {e.start}; pass --encoding (e.g. latin-1)"
        )
    for lineno, fields in enumerate(csv.reader(io.StringIO(text), delimiter=delim), 1):
        if fields and len(fields) != ncols:
            return IngestError(
                f"{url}:{lineno}: expected {ncols} fields like the header, found {len(fields)}; truncated line?"
            )
    return IngestError(f"{url}: cannot parse CSV ({str(err).splitlines()[0][:200]})")


def _decoding_error(e: BaseException) -> bool:
    """pyarrow's own complaint about the bytes (bad page, bad thrift, bad footer), not a transport failure:
    pyarrow raises those as errno-less OSError/ArrowException; sockets and timeouts carry an errno or type."""
    if isinstance(e, (ConnectionError, TimeoutError, PermissionError, FileNotFoundError)):
        return False
    return isinstance(e, pa.ArrowException) or getattr(e, "errno", None) is None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else ""


def _read_side(
    url: str, need: dict[str, str], encoding: str, text_columns: tuple[str, ...] = (), flags: dict | None = None
) -> tuple[pa.Table, bool]:
    """An items or users file as read (types inferred, `text_columns` kept as strings); and whether it is CSV."""
    fs, path = storage.get_fs(url)
    if url.endswith((".parquet", ".pq")):
        with storage.storage_errors(url), fs.open(path, "rb") as fh:
            try:
                t = pq.ParquetFile(fh).read()
            except (pa.ArrowException, OSError) as e:
                if not _decoding_error(e):
                    raise
                raise IngestError(
                    f"{url}: not a readable Parquet file ({_first_line(e)}); truncated or corrupt? write it again"
                ) from None
        _check_columns(url, t.column_names, need, flags or (_ITEM_FILE_FLAGS if "title" in need else None))
        return t, False
    import io

    import pyarrow.csv as pacsv

    raw = open_bytes(url)
    if not raw.strip():
        raise IngestError(f"{url}: file is empty")
    delim = "\t" if url.endswith(".tsv") else ","
    try:
        raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise IngestError(
            f"{url}:{line}: bytes are not valid {encoding} at byte {e.start}; pass --encoding (e.g. latin-1)"
        ) from None
    try:
        t = pacsv.read_csv(
            io.BytesIO(raw),
            read_options=pacsv.ReadOptions(encoding=encoding),
            parse_options=pacsv.ParseOptions(delimiter=delim),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in text_columns}),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        header = raw.split(b"\n", 1)[0].decode("utf-8", errors="replace").split(delim)
        raise _csv_problem(url, raw, delim, len(header), encoding, e) from None
    _check_columns(url, t.column_names, need, flags or (_ITEM_FILE_FLAGS if "title" in need else None))
    return t, True


def _side_table(url: str, t: pa.Table, need: dict[str, str], is_csv: bool, string_ids: set[str]) -> pa.Table:
    """Canonical names first (ids as int64, or as strings for columns in `string_ids`), other columns after."""
    out = {}
    for canon, name in need.items():
        col = t[name]
        if canon.endswith("_id") and canon not in string_ids:
            out[canon] = _as_int(url, col, name, 0, is_csv)
        else:
            out[canon] = pc.cast(col, pa.string())
    for name in t.column_names:
        if name not in need.values() and name not in out:
            out[name] = t[name]
    return pa.table(out)


def _generic_table(url: str, need: dict[str, str], encoding: str, string_ids: set[str]) -> pa.Table:
    text = tuple(name for canon, name in need.items() if canon in string_ids)
    t, is_csv = _read_side(url, need, encoding, text)
    return _side_table(url, t, need, is_csv, string_ids)


READERS = {"movielens": movielens, "recbole": recbole, "llara": llara, "generic": generic, "sequences": sequences}
