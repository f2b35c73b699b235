"""Per-sample history retrieval over one user-sorted interaction block, vectorized.

Input is a block of interactions sorted by (user_id, timestamp, item_id) holding every row of each of its
users (a user-hash shard, or a streamed slice of one cut at user boundaries). A *target* is a row index
into the block; its history is the rows of the same user with a strictly smaller timestamp.

The leakage rule: a row with the same timestamp as the target is NOT history, even when it sorts before
the target (ML data has many same-second ratings; their true order is unknown, so using one to predict
the other would leak). Because the block is sorted, the history of row r is always the contiguous range
[user_start(r), tie_start(r)), where tie_start(r) is the first row of r's (user, timestamp) group.

Results are ragged: `Ragged(offsets, index)` where index holds block row positions, time ordered within
each target. No Python loop runs per row; SUBR loops per block of ~128 targets around one GEMM.

Determinism across machines: a float32 GEMM rounds differently under different BLAS kernels (OpenBLAS
picks one per CPU: SkylakeX, Haswell, ...), so near-ties, and exact ties such as a repeated item, used to
be broken differently on different CPUs. Item vectors are therefore snapped to a power-of-two grid
(`exact_grid`), chosen so that every dot product, and every partial sum a kernel may form on the way,
is exactly representable in float64; scores are computed in float64 and are then exact, the same
under any kernel, SIMD width, FMA use or summation order. Ties are then real ties and go to the more
recent row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from configs.errors import RecloraError
from recdata import storage
from recdata.samples import SamplesError
from recdata.schema import read_parquet

# Unit vectors live on the grid 2**-23: |v| <= 1 + 2**-23 needs at most 24 significant bits (exact in
# float32); a product is a multiple of 2**-46 and, by Cauchy-Schwarz, every partial sum of products has
# magnitude < 2, so every partial sum is a multiple of 2**-46 below 2**47 * 2**-46: exact in float64.
UNIT_GRID_EXP = -23
# Rows normalized in chunks of this many (float64 temporaries stay small).
_NORM_CHUNK = 8192


class HistoryError(RecloraError, ValueError):
    """Input that breaks the block contract (unsorted rows, missing embeddings)."""


@dataclass(frozen=True)
class Ragged:
    """Variable-length lists: list j is index[offsets[j]:offsets[j+1]]."""

    offsets: np.ndarray  # int64, len n+1
    index: np.ndarray  # int64 block row positions

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


def check_sorted(user_ids: np.ndarray, timestamps: np.ndarray, item_ids: np.ndarray, where: str = "block") -> None:
    """Raise unless rows are sorted by (user_id, timestamp, item_id); every later step relies on it."""
    if len(user_ids) < 2:
        return
    du = np.diff(user_ids)
    dt = np.diff(timestamps)
    di = np.diff(item_ids)
    bad = (du < 0) | ((du == 0) & ((dt < 0) | ((dt == 0) & (di < 0))))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise HistoryError(
            f"{where}: rows {i} and {i + 1} are out of (user_id, timestamp, item_id) order: "
            f"({user_ids[i]}, {timestamps[i]}, {item_ids[i]}) then ({user_ids[i + 1]}, {timestamps[i + 1]}, {item_ids[i + 1]}); "
            f"shards must be written sorted (recdata.ingest does)"
        )


def history_bounds(user_ids: np.ndarray, timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) per row: its history is rows [start, end) of the block (sorted input assumed)."""
    n = len(user_ids)
    pos = np.arange(n, dtype=np.int64)
    if n == 0:
        return pos, pos
    new_user = np.empty(n, dtype=bool)
    new_user[0] = True
    np.not_equal(user_ids[1:], user_ids[:-1], out=new_user[1:])
    new_tie = new_user.copy()
    new_tie[1:] |= timestamps[1:] != timestamps[:-1]
    # Forward-fill the position of the latest group start: a running max over start positions.
    start = np.maximum.accumulate(np.where(new_user, pos, 0))
    end = np.maximum.accumulate(np.where(new_tie, pos, 0))
    return start, end


def recent(start: np.ndarray, end: np.ndarray, targets: np.ndarray, k: int) -> Ragged:
    """The last k history rows of each target, oldest first."""
    lo = np.maximum(start[targets], end[targets] - k)
    return _ranges(lo, end[targets])


def _ranges(lo: np.ndarray, hi: np.ndarray) -> Ragged:
    """Concatenate the ranges [lo_j, hi_j) without a Python loop (offset arithmetic)."""
    counts = np.maximum(hi - lo, 0).astype(np.int64)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    total = int(offsets[-1])
    # index = lo[owner] + (j - offsets[owner]) for flat position j
    shift = np.repeat(lo - offsets[:-1], counts)
    return Ragged(offsets, np.arange(total, dtype=np.int64) + shift)


def top_similar(
    start: np.ndarray,
    end: np.ndarray,
    targets: np.ndarray,
    item_rows: np.ndarray,
    matrix: np.ndarray,
    k: int,
    pool: int,
    block: int = 128,
) -> Ragged:
    """For each target, the k rows of its most recent `pool` history rows whose vectors score highest
    against the target row's vector (dot product; pass unit vectors for cosine), returned in time order.

    Block row r's vector is `matrix[item_rows[r]]` (float32; rows from ItemVectors.rows, whose matrix is
    on an `exact_grid`). Scores are float64 products of grid values, hence exact: the same on every CPU
    and BLAS kernel. Vectors are gathered per block, so memory stays O(block * (pool + block)) however
    long a user is. Ties in score go to the more recent row, so the result is deterministic and matches
    `top_similar_reference`.
    A target with at most k pool rows gets all of them. `pool` bounds the cost per target to
    O((pool + block) * dim): older history is not considered (ReLLa's ML-25M keeps 80 candidates).
    """
    if k < 1 or pool < k:
        raise ValueError(f"top_similar: need 1 <= k <= pool, got k={k}, pool={pool}")
    targets = np.asarray(targets, dtype=np.int64)
    n = len(targets)
    t_hi = end[targets]
    t_lo = np.maximum(start[targets], t_hi - pool)
    if n and np.any(np.diff(targets) <= 0):
        raise HistoryError("top_similar: targets must be strictly increasing block rows")
    counts = np.maximum(t_hi - t_lo, 0)
    # Targets with <= k candidates take them all; only the rest need scoring.
    out_lo = np.zeros(n, dtype=np.int64)
    out_counts = np.minimum(counts, k)
    picked: list[np.ndarray] = []  # per block: selected rows (flat), in (target, time) order
    owners: list[np.ndarray] = []
    heavy = np.flatnonzero(counts > k)
    light = np.flatnonzero(counts <= k)
    out_lo[light] = t_lo[light]
    width_cap = pool + block
    i = 0
    while i < len(heavy):
        # Columns needed by targets heavy[i:j] are [t_lo[first], t_hi[last]); lo and hi never decrease
        # along sorted targets, so cut the block where that span would exceed pool + block.
        first = heavy[i]
        j = int(np.searchsorted(t_hi[heavy], t_lo[first] + width_cap, side="right"))
        j = max(i + 1, min(j, i + block))
        rows = heavy[i:j]
        c0, c1 = int(t_lo[rows[0]]), int(t_hi[rows[-1]])
        # One float64 GEMM (b, w): exact for grid vectors, so no kernel-dependent rounding.
        lhs = matrix[item_rows[targets[rows]]].astype(np.float64)
        scores = lhs @ matrix[item_rows[c0:c1]].astype(np.float64).T
        col = np.arange(c1 - c0, dtype=np.int64)
        invalid = (col[None, :] < (t_lo[rows] - c0)[:, None]) | (col[None, :] >= (t_hi[rows] - c0)[:, None])
        np.putmask(scores, invalid, -np.inf)
        w = c1 - c0
        # The k-th largest score is one value whatever the partition algorithm; selection is by value.
        kth = np.partition(scores, w - k, axis=1)[:, w - k : w - k + 1]
        sel = scores >= kth
        # Usually exactly k rows reach the k-th score. Where ties push it over k (a repeated item always
        # ties with itself), keep the rows above it plus the most recent tied ones (count ties from the
        # right); rare, so done on those only.
        over = np.flatnonzero(sel.sum(axis=1) > k)
        if len(over):
            s_o, kth_o = scores[over], kth[over]
            tied = s_o == kth_o
            need = k - (s_o > kth_o).sum(axis=1)
            from_right = np.cumsum(tied[:, ::-1], axis=1)[:, ::-1]
            sel[over] = (s_o > kth_o) | (tied & (from_right <= need[:, None]))
        r_idx, c_idx = np.nonzero(sel)  # row-major: per target, columns ascend = time order
        picked.append(c_idx.astype(np.int64) + c0)
        owners.append(rows[r_idx])
        i = j
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(out_counts, out=offsets[1:])
    index = np.empty(int(offsets[-1]), dtype=np.int64)
    # Light targets: contiguous ranges written by offset arithmetic.
    lr = _ranges(out_lo[light], out_lo[light] + out_counts[light])
    index[np.repeat(offsets[light], out_counts[light]) + _within(out_counts[light])] = lr.index
    if picked:
        sel_rows = np.concatenate(picked)
        sel_owner = np.concatenate(owners)
        # Owners arrive grouped and ascending, k each; place them at their target's offsets.
        index[offsets[sel_owner] + _within(np.full(len(heavy), k, dtype=np.int64))] = sel_rows
    return Ragged(offsets, index)


def _within(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for each count c, concatenated."""
    total = int(counts.sum())
    starts = np.zeros(len(counts), dtype=np.int64)
    if len(counts) > 1:
        np.cumsum(counts[:-1], out=starts[1:])
    return np.arange(total, dtype=np.int64) - np.repeat(starts, counts)


def top_similar_reference(
    start: np.ndarray,
    end: np.ndarray,
    targets: np.ndarray,
    item_rows: np.ndarray,
    matrix: np.ndarray,
    k: int,
    pool: int,
) -> list[list[int]]:
    """Per-target Python loop with the same definition as `top_similar` (for tests and the benchmark)."""
    out = []
    for t in targets:
        hi = int(end[t])
        lo = max(int(start[t]), hi - pool)
        cand = list(range(lo, hi))
        tv = matrix[item_rows[t]].astype(np.float64)
        scores = [float(np.dot(tv, matrix[item_rows[c]].astype(np.float64))) for c in cand]
        order = sorted(range(len(cand)), key=lambda j: (-scores[j], -cand[j]))[:k]
        out.append(sorted(cand[j] for j in order))
    return out


def grid_exponent(matrix: np.ndarray) -> int:
    """Exponent e of the grid 2**e for vectors of any scale (metric=dot): with M = 2**ceil(log2(max|v|))
    and e = log2(M) - p, p = min(23, (52 - ceil(log2(dim))) // 2), a grid value needs <= 24 bits (float32)
    and a partial sum of products, at most dim * M**2, is a multiple of 2**(2e) below 2**52 of them:
    exact in float64. Depends only on the exact maximum and the dimension, so on every machine alike."""
    if matrix.size == 0:
        return UNIT_GRID_EXP
    peak = float(np.max(np.abs(matrix)))
    if peak == 0.0:
        return UNIT_GRID_EXP
    _, top = np.frexp(peak)  # peak = f * 2**top, 0.5 <= f < 1: peak <= 2**top
    dim_bits = int(np.ceil(np.log2(max(matrix.shape[-1], 1))))
    return int(top) - min(23, (52 - dim_bits) // 2)


def exact_grid(values: np.ndarray, exponent: int) -> np.ndarray:
    """values rounded to the nearest multiple of 2**exponent (half to even), as float32; scaling by a
    power of two and rint are exact, so this is the same on every machine."""
    scale = np.ldexp(1.0, -exponent)
    return (np.rint(np.asarray(values, dtype=np.float64) * scale) / scale).astype(np.float32)


class ItemVectors:
    """Item embeddings addressed by item id, never by row position.

    Ids are looked up with searchsorted on the sorted id array, so 0- and 1-based or sparse id spaces
    all work (ReLLa issue #14 indexed a 0-based matrix with 1-based ids). The matrix is snapped to an
    `exact_grid` (unit vectors: 2**-23, below float32's own resolution near 1), so `top_similar`'s
    scores are exact and machine independent."""

    def __init__(
        self,
        item_ids: np.ndarray,
        matrix: np.ndarray,
        normalize: bool = True,
        source: str = "embeddings",
        copy: bool = True,
    ):
        """copy=False lets this object sort/normalize `matrix` in place (the caller hands it over)."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        matrix = np.asarray(matrix, dtype=np.float32)
        if matrix.ndim != 2 or len(matrix) != len(item_ids):
            raise HistoryError(f"{source}: expected one vector per item id, got {matrix.shape} for {len(item_ids)} ids")
        if not np.isfinite(matrix).all():
            bad = item_ids[~np.isfinite(matrix).all(axis=1)]
            raise HistoryError(f"{source}: non-finite embedding values for item ids {bad[:20].tolist()}")
        if len(item_ids) > 1 and np.all(np.diff(item_ids) > 0):
            self.item_ids = item_ids
            m = matrix.copy() if copy else matrix
        else:
            order = np.argsort(item_ids, kind="stable")
            self.item_ids = item_ids[order]
            m = matrix[order]
        if len(self.item_ids) > 1 and np.any(np.diff(self.item_ids) == 0):
            dup = self.item_ids[1:][np.diff(self.item_ids) == 0]
            raise HistoryError(f"{source}: duplicate item ids {np.unique(dup)[:20].tolist()}")
        if normalize:
            zero = ~np.any(m != 0, axis=1)
            if zero.any():
                raise HistoryError(
                    f"{source}: zero vectors (no cosine defined) for item ids {self.item_ids[zero][:20].tolist()}"
                )
            for r0 in range(0, len(m), _NORM_CHUNK):
                chunk = m[r0 : r0 + _NORM_CHUNK].astype(np.float64)
                chunk /= np.sqrt(np.add.reduce(chunk * chunk, axis=1))[:, None]
                m[r0 : r0 + _NORM_CHUNK] = exact_grid(chunk, UNIT_GRID_EXP)
        else:
            m[:] = exact_grid(m, grid_exponent(m))
        self.matrix = np.ascontiguousarray(m, dtype=np.float32)
        self.source = source

    @property
    def dim(self) -> int:
        return self.matrix.shape[1]

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        item_ids = np.asarray(item_ids, dtype=np.int64)
        pos = np.searchsorted(self.item_ids, item_ids)
        pos_c = np.minimum(pos, len(self.item_ids) - 1)
        missing = (len(self.item_ids) == 0) | (self.item_ids[pos_c] != item_ids)
        if np.any(missing):
            miss = np.unique(item_ids[missing])
            raise HistoryError(
                f"{self.source}: no embedding for {len(miss)} item id(s), e.g. {miss[:20].tolist()}; "
                f"rebuild embeddings from the same dataset (python -m retrieval.embed_items)"
            )
        return pos_c

    def lookup(self, item_ids: np.ndarray) -> np.ndarray:
        return self.matrix[self.rows(item_ids)]


def embeddings_file(url: str) -> str:
    return url if url.endswith(".parquet") else storage.join(url, "embeddings.parquet")


def load_item_vectors(url: str, normalize: bool) -> ItemVectors:
    """Parquet (item_id int64, embedding list<float32>) -> ItemVectors."""
    path = embeddings_file(url)
    table = read_parquet(path, columns=["item_id", "embedding"])
    emb = table.column("embedding").combine_chunks()
    lengths = np.diff(emb.offsets.to_numpy())
    if len(lengths) and (lengths.min() != lengths.max() or lengths.min() == 0):
        raise SamplesError(
            f"{path}: column 'embedding' must hold vectors of one non-zero length, got lengths {sorted(set(lengths.tolist()))[:5]}"
        )
    dim = int(lengths[0]) if len(lengths) else 0
    item_ids = table.column("item_id").to_numpy()
    values = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32)  # a private copy, normalized in place
    del table, emb
    return ItemVectors(item_ids, values.reshape(-1, dim), normalize=normalize, source=path, copy=False)
