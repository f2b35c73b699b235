"""Data-parallel teacher training: the per-rank batch slices (fast, no Ray) and DIN on MovieLens-100K with
two real Ray Train workers (DistributedDataParallel over gloo) against one in-process worker."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import shared_path

from cluster.launch import run_training
from recdata import storage
from recdata.metrics import auc
from teacher import refdata
from teacher.baselines import popularity_ctr
from teacher.config import TeacherConfig
from teacher.data import iter_train_parts, list_shards, rank_slice, read_shard
from teacher.features import Encoder
from teacher.model_io import apply_unk_dropout, build_model, load_teacher, to_tensors
from teacher.train import build_feature_space, side_tables, train_teacher


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-syn")
    refdata.build_synthetic_ctr(str(root / "ds"), str(root / "samples"), num_shards=3)
    samples = str(root / "samples")
    items, users, _ = side_tables(samples, None)
    shards = list_shards(samples, "train")
    space = build_feature_space(shards, items, users)
    return samples, shards, space


def test_rank_slices_cover_each_batch_once():
    for n in (1, 3, 479, 1024, 1023):
        for world in (1, 2, 3, 4):
            spans = [rank_slice(n, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(hi - lo for lo, hi in spans) - min(hi - lo for lo, hi in spans) <= 1


def test_rank_parts_reassemble_the_single_process_batches(synthetic):
    samples, shards, space = synthetic
    enc = Encoder(space, 20, "ctr")
    n_train = sum(read_shard(u, columns=["sample_id"]).num_rows for u in shards)
    # A batch size whose last batch (3 rows) is smaller than the world (4): rank 0 gets no rows of it.
    bs = 479
    assert n_train % bs == 3, n_train
    for epoch in (0, 1):
        single_stats: Counter = Counter()
        single = list(iter_train_parts(shards, enc, bs, seed=7, epoch=epoch, stats=single_stats))
        assert [size for _, _, size in single] == [bs] * (n_train // bs) + [3]
        world = 4
        per_rank, stats = [], Counter()
        for r in range(world):
            per_rank.append(
                list(iter_train_parts(shards, enc, bs, seed=7, epoch=epoch, stats=stats, rank=r, world=world))
            )
        assert stats == single_stats  # every row encoded exactly once over the ranks
        for i, (full, _, size) in enumerate(single):
            parts = [per_rank[r][i] for r in range(world)]
            assert [p[2] for p in parts] == [size] * world
            assert [p[1] for p in parts] == [rank_slice(size, r, world)[0] for r in range(world)]
            for k, v in full.items():
                assert all(p[0][k].shape[1:] == v.shape[1:] for p in parts), k  # empty parts keep their shapes
                np.testing.assert_array_equal(np.concatenate([p[0][k] for p in parts]), v, err_msg=k)
        assert len(per_rank[0][-1][0]["sample_id"]) == 0
    # Epochs shuffle differently, and the same seed gives the same order.
    e0 = np.concatenate([b["sample_id"] for b, _, _ in iter_train_parts(shards, enc, bs, 7, 0)])
    e1 = np.concatenate([b["sample_id"] for b, _, _ in iter_train_parts(shards, enc, bs, 7, 1)])
    assert not np.array_equal(e0, e1) and sorted(e0) == sorted(e1)


def test_unk_dropout_on_parts_matches_the_whole_batch(synthetic):
    samples, shards, space = synthetic
    enc = Encoder(space, 20, "ctr")
    batch, _, size = next(iter_train_parts(shards, enc, 64, seed=0, epoch=0))
    rates = {"user_idx": 0.5, "item_idx": 0.3, "hist_idx": 0.3}
    whole = to_tensors(batch, torch.device("cpu"))
    apply_unk_dropout(whole, rates, torch.Generator().manual_seed(3))
    for world in (2, 3):
        pieces = []
        for r in range(world):
            lo, hi = rank_slice(size, r, world)
            b = to_tensors({k: v[lo:hi] for k, v in batch.items()}, torch.device("cpu"))
            apply_unk_dropout(b, rates, torch.Generator().manual_seed(3), part=(lo, size))
            pieces.append(b)
        for k in rates:
            torch.testing.assert_close(torch.cat([p[k] for p in pieces]), whole[k], rtol=0, atol=0)
    assert (whole["user_idx"] == 1).float().mean() > 0.3  # the draws did replace ids with UNK


@pytest.mark.parametrize("model", ["din", "sasrec"])
def test_empty_rank_slice_gives_finite_zero_gradients(synthetic, model):
    # A rank without rows of a short last batch still runs forward/backward so DDP's all-reduce completes.
    samples, shards, space = synthetic
    cfg = (
        TeacherConfig.defaults(model, max_hist=20, mlp_hidden=[32, 16], rep_dim=16)
        if model == "din"
        else TeacherConfig.defaults(model, max_hist=20, embed_dim=16, rep_dim=16)
    )
    net = build_model(cfg, space).train()
    enc = Encoder(space, 20, cfg.task)
    empty = {k: v[:0] for k, v in enc.encode(read_shard(shards[0]).slice(0, 4)).items()}
    out = net(to_tensors(empty, torch.device("cpu")))
    loss = sum(v.sum() for v in out.values()) * 0.0
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() and not g.any() for g in grads)


def _valid_pop_auc(samples: str) -> float:
    tr = pa.concat_tables([read_shard(u) for u in list_shards(samples, "train")])
    ev = pa.concat_tables([read_shard(u) for u in list_shards(samples, "valid")])
    return auc(
        ev["label"].to_numpy(),
        popularity_ctr(tr["item_id"].to_numpy(), tr["label"].to_numpy(), ev["item_id"].to_numpy()),
    )


@pytest.mark.slow  # Ray Train start-up dominates: ~30-60 s on 2 shared cores
def test_din_two_ray_workers_match_one_process_on_ml100k(ray_local, tmp_path):
    src = shared_path("data", "movielens-100k")
    samples = str(tmp_path / "samples")
    refdata.build_movielens100k_ctr(src, str(tmp_path / "ds"), samples, k_id=30, num_shards=4)
    # dropout 0: nn.Dropout masks are per rank and cannot match a single process; UNK-id dropout can
    # (drawn for the global batch). Batch 1023 is odd, so every batch splits 511/512 between the ranks
    # and the unequal-share loss weighting is exercised on every step.
    cfg = dict(
        epochs=1, num_threads=1, dropout=0.0, mlp_hidden=[64, 32], rep_dim=32, max_hist=30, batch_size=1023, lr=3e-3
    )
    one = train_teacher(
        samples, str(tmp_path / "one"), TeacherConfig.defaults("din", **cfg), progress=False, evaluate_test=False
    )
    two_url = str(tmp_path / "two")
    two = train_teacher(
        samples,
        two_url,
        TeacherConfig.defaults("din", **cfg),
        progress=False,
        evaluate_test=False,
        num_workers=2,
        launch=run_training,
    )
    assert one["train_workers"] == 1 and two["train_workers"] == 2
    pop = _valid_pop_auc(samples)
    assert two["valid"]["auc"] > pop + 0.01, (two["valid"], pop)
    # Same global batches and the gradient of the same batch mean: only float summation order differs,
    # which Adam amplifies slowly over the epoch (the first batch's loss agrees to ~1e-8).
    assert two["train_samples"] == one["train_samples"] == 80000
    assert two["unknown"]["train"] == one["unknown"]["train"]
    assert two["history"][0]["train_loss"] == pytest.approx(one["history"][0]["train_loss"], rel=1e-4)
    assert abs(two["valid"]["auc"] - one["valid"]["auc"]) < 2e-3, (two["valid"], one["valid"])
    # Rank 0 alone committed a loadable model, with nothing half-written beside it.
    loaded = load_teacher(two_url)
    assert loaded.meta["metrics"]["train_workers"] == loaded.cfg.train_workers == 2 and loaded.rep_dim == 32
    assert sorted(p.rsplit("/", 1)[-1] for p in storage.get_fs(two_url)[0].ls(two_url, detail=False)) == [
        "features.safetensors",
        "model.safetensors",
        "teacher.json",
    ]
