"""Retrieval gives the same samples on every CPU (issue #15, part A).

Similarity scores used to be float32 GEMM results, whose rounding depends on the BLAS kernel OpenBLAS
picks for the CPU (SkylakeX, Haswell, ...), and exact ties (a repeated item) were broken by that noise:
on a machine without AVX-512 a repeated item's other row, with its other rating, was picked. Now item
vectors sit on an exact grid and scores are exact float64 sums, so:

* scores equal the correctly rounded exact dot products (math.fsum), for unit and raw (metric=dot) vectors;
* a repeated item ties with itself and the most recent row wins, whatever columns the GEMM blocks hold;
* a build in a subprocess with numpy's CPU dispatch limited to its baseline (NPY_DISABLE_CPU_FEATURES:
  the dispatched features this CPU has) and another OpenBLAS kernel (OPENBLAS_CORETYPE) writes the same
  sample rows as a build in this process.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from recdata.samples import BuildOptions, SampleSet
from retrieval.build import build_samples
from retrieval.history import ItemVectors, exact_grid, grid_exponent, history_bounds, top_similar
from tests.conftest import REPO
from tests.test_retrieval_build import synthetic_interactions, write_dataset, write_embeddings

OPTIONS = {
    "subr_sim": {
        "k_text": 4,
        "k_id": 6,
        "text_mode": "subr",
        "id_mode": "sim",
        "subr_pool": 9,
        "sim_pool": 12,
        "seed": 5,
    },
    "dot": {"k_text": 3, "k_id": 5, "text_mode": "subr", "id_mode": "sim", "metric": "dot", "subr_pool": 8},
}


def cpu_features_beyond_baseline() -> list[str]:
    """numpy's dispatch targets this CPU supports (what NPY_DISABLE_CPU_FEATURES may switch off)."""
    from numpy._core import _multiarray_umath as mu  # numpy's own registry; no public equivalent

    return [f for f in mu.__cpu_dispatch__ if mu.__cpu_features__.get(f)]


def exact_dot(a: np.ndarray, b: np.ndarray) -> float:
    return math.fsum((a.astype(np.float64) * b.astype(np.float64)).tolist())


@pytest.mark.parametrize("normalize, dim", [(True, 48), (False, 48), (False, 1000)])
def test_grid_vectors_give_exact_scores(normalize, dim):
    rng = np.random.default_rng(dim)
    raw = rng.normal(size=(60, dim)) * (1.0 if normalize else 37.5)
    iv = ItemVectors(np.arange(60), raw, normalize=normalize)
    m = iv.matrix.astype(np.float64)
    gemm = m @ m.T  # whatever kernel, summation order or FMA: exact, so bitwise equal to fsum
    for i in range(0, 60, 7):
        for j in range(60):
            assert gemm[i, j] == exact_dot(iv.matrix[i], iv.matrix[j])
    if normalize:
        assert np.allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-6)
        assert np.array_equal(iv.matrix, exact_grid(iv.matrix, -23))
    else:
        assert np.abs(iv.matrix - raw).max() <= 2.0 ** grid_exponent(raw.astype(np.float32))
    # Snapping is idempotent: reloading the same vectors gives the same matrix.
    again = ItemVectors(np.arange(60), iv.matrix, normalize=normalize)
    assert np.array_equal(again.matrix, iv.matrix)


def test_repeated_item_ties_go_to_most_recent_row_in_any_block():
    """One user re-rates item 7 several times; item 7 is always the most similar, so the most recent
    of its rows must be chosen, however the rows fall into GEMM blocks and columns."""
    rng = np.random.default_rng(1)
    n = 90
    items = rng.integers(0, 40, n)
    items[[5, 20, 33, 61, 62, 80]] = 7
    items[-1] = 7  # the target
    users = np.zeros(n, np.int64)
    ts = np.arange(n, dtype=np.int64)
    iv = ItemVectors(np.arange(40), rng.normal(size=(40, 24)))
    start, end = history_bounds(users, ts)
    rows = iv.rows(items)
    for block in (1, 3, 7, 128):
        for pool in (30, 60, 89):
            got = top_similar(start, end, np.array([n - 1]), rows, iv.matrix, k=1, pool=pool, block=block)
            assert got.index.tolist() == [80], (block, pool)
            got3 = top_similar(start, end, np.array([n - 1]), rows, iv.matrix, k=3, pool=pool, block=block)
            assert got3.index.tolist() == [61, 62, 80], (block, pool)


_CHILD = """
import json, sys
from numpy._core import _multiarray_umath as mu
from threadpoolctl import threadpool_info
from recdata.samples import BuildOptions
from retrieval.build import build_samples
ds, out, emb, opts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
build_samples(ds, out, BuildOptions(**opts), num_workers=1, embeddings_url=emb)
blas = [i.get("architecture") for i in threadpool_info() if i.get("internal_api") == "openblas"]
print(json.dumps({"on": [f for f in mu.__cpu_dispatch__ if mu.__cpu_features__.get(f)], "blas": blas}))
"""


def _rows(url: str) -> list[dict]:
    ss = SampleSet.open(url)
    out = []
    for split in ("train", "valid", "test"):
        for f in ss.files(split):
            out.extend(pq.read_table(f).to_pylist())
    return out


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="OpenBLAS core types named here are x86")
@pytest.mark.parametrize("coretype", ["Haswell", pytest.param("Prescott", marks=pytest.mark.slow)])
def test_build_is_identical_under_baseline_cpu_dispatch_and_other_blas_kernel(tmp_path, coretype):
    df = synthetic_interactions(seed=1).drop_duplicates(["user_id", "item_id", "timestamp"])
    ds = write_dataset(str(tmp_path / "ds"), df)
    emb, _ = write_embeddings(str(tmp_path / "emb.parquet"), seed=3)
    disable = cpu_features_beyond_baseline()
    env = {**os.environ, "OPENBLAS_CORETYPE": coretype, "PYTHONPATH": str(REPO)}
    if disable:
        env["NPY_DISABLE_CPU_FEATURES"] = " ".join(disable)
    for name, opts in OPTIONS.items():
        here, there = str(tmp_path / f"{name}-here"), str(tmp_path / f"{name}-there")
        build_samples(ds, here, BuildOptions(**opts), num_workers=1, embeddings_url=emb)
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, ds, there, emb, json.dumps(opts)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        assert child["on"] == [], f"numpy dispatch not limited to baseline in the child: {child['on']}"
        if child["blas"] and coretype == "Haswell":  # (OpenBLAS reports Prescott as "Katmai")
            assert child["blas"][0] == "Haswell", child
        a, b = _rows(here), _rows(there)
        assert len(a) > 300 and any(len(r["text_hist_items"]) == opts["k_text"] for r in a)
        assert a == b, name
        for split in ("train", "valid", "test"):
            for fa, fb in zip(SampleSet.open(here).files(split), SampleSet.open(there).files(split)):
                with open(fa, "rb") as x, open(fb, "rb") as y:
                    assert x.read() == y.read(), (name, fa)
