"""Checkpoint store and data schedule: the parts of resume that need no Ray or DeepSpeed to check."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from recdata import storage
from recdata.streams import Schedule, TrainDataError
from trainer import checkpoint as ckpt


def _save(run: str, step: int, world: int = 2, parts=None) -> str:
    """Simulate `world` ranks saving one after another; rank 0 goes last, as it writes the marker."""
    parts = parts or {"model": "m", "lora": {"r": 4}}
    meta = {"fingerprint": ckpt.config_fingerprint(parts), "fingerprint_parts": parts, "optimizer_step": step}
    for r in range(world - 1, -1, -1):
        url = ckpt.save(
            run,
            step,
            r,
            world,
            {f"p{r}::param": torch.full((2, 3), float(step + r))},
            {"rng": ckpt.rng_state(), "cursor": {"row": step}},
            meta if r == 0 else None,
            lambda: None,
        )
    return url


def test_latest_skips_partial_and_corrupt(tmp_path):
    run = str(tmp_path / "run")
    _save(run, 4)
    _save(run, 8)
    _save(run, 12)
    storage.rm(storage.join(run, "checkpoints", "step-00000012", "COMPLETE"))  # crash before the marker
    storage.rm(storage.join(run, "checkpoints", "step-00000008", "rank-00001-of-00002.safetensors"))  # lost file
    with pytest.warns(UserWarning) as warned:
        latest = ckpt.latest_complete(run)
    assert latest.endswith("step-00000004")
    text = " ".join(str(w.message) for w in warned)
    assert "step-00000012" in text and "incomplete" in text and "step-00000008" in text and "corrupt" in text


def test_load_any_world_size_and_refuse_other_config(tmp_path):
    run = str(tmp_path / "run")
    parts = {"model": "m", "lora": {"r": 4}}
    url = _save(run, 4, parts=parts)
    one = ckpt.load(url, rank=0, world=1, parts=parts)
    assert set(one.tensors) == {"p0::param", "p1::param"} and one.rank_meta is None and one.step == 4
    two = ckpt.load(url, rank=1, world=2, parts=parts)
    assert two.rank_meta["cursor"] == {"row": 4}
    with pytest.raises(ckpt.CheckpointError, match=r"different lora .*'r': 4.*'r': 8"):
        ckpt.load(url, rank=0, world=2, parts={"model": "m", "lora": {"r": 8}})


def test_prune_keeps_last_k(tmp_path):
    run = str(tmp_path / "run")
    for s in (2, 4, 6, 8):
        _save(run, s)
    removed = ckpt.prune(run, keep_last=2)
    assert len(removed) == 2
    assert [s for s, _, ok in ckpt.list_checkpoints(run) if ok] == [6, 8]


def test_rng_roundtrip():
    import random

    state = ckpt.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_schedule_is_world_size_independent():
    """The global batch of a step is the same rows for 1, 2 or 4 workers: only its split differs."""
    rows = {}
    for world in (1, 2, 4):
        s = Schedule(rows=100, global_batch=16, world=world, micro=2, seed=3)
        for step in (0, 5, 6, 13):  # 6 steps per epoch: 13 is in the third
            got = np.concatenate([np.concatenate(s.rank_rows(step, r)) for r in range(world)])
            rows.setdefault(step, got)
            assert np.array_equal(rows[step], got), (world, step)
    s = Schedule(rows=100, global_batch=16, world=2, micro=2, seed=3)
    epoch0 = np.concatenate([np.concatenate(s.rank_rows(k, r)) for k in range(6) for r in range(2)])
    assert len(set(epoch0.tolist())) == 96  # disjoint within an epoch; the 4 left over are dropped
    assert s.cursor(13) == {"epoch": 2, "row": 16, "step_in_epoch": 1}


def test_schedule_errors_instead_of_idle_workers():
    with pytest.raises(TrainDataError, match="fewer than trainer.batch_size"):
        Schedule(rows=10, global_batch=16, world=2, micro=2, seed=0)
    with pytest.raises(TrainDataError, match="not divisible"):
        Schedule(rows=100, global_batch=10, world=4, micro=2, seed=0)


def test_ranks_stage_on_local_disk_then_upload_to_s3(s3_bucket, tmp_path, monkeypatch):
    """Shares go through a node-local staging folder (RECLORA_STAGING_DIR) to object storage; the folder is
    emptied after the upload and the checkpoint loads back from S3."""
    staging = tmp_path / "nvme"
    monkeypatch.setenv("RECLORA_STAGING_DIR", str(staging))
    run = f"{s3_bucket}/runs/r"
    parts = {"model": "m", "lora": {"r": 4}}
    url = _save(run, 4, parts=parts)
    assert url.startswith("s3://") and ckpt.latest_complete(run) == url
    assert (staging / "reclora-staging").is_dir() and not any(p.is_file() for p in staging.rglob("*"))
    loaded = ckpt.load(url, rank=0, world=1, parts=parts)
    assert torch.equal(loaded.tensors["p1::param"], torch.full((2, 3), 5.0))


def _damage(url: str, name: str, how: str) -> str:
    path = storage.join(url, name)
    data = bytearray(open(path, "rb").read())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # flip one bit in the middle: same size, different content
        data[len(data) // 2] ^= 0x01
    with open(path, "wb") as f:
        f.write(bytes(data))
    return path


@pytest.mark.parametrize(
    "name, how",
    [
        ("rank-00001-of-00002.safetensors", "truncate"),
        ("rank-00001-of-00002.safetensors", "flip"),
        ("rank-00000.json", "flip"),
        ("meta.json", "flip"),
    ],
)
def test_damaged_file_falls_back_to_previous_checkpoint_naming_it(tmp_path, name, how):
    run = str(tmp_path / "run")
    parts = {"model": "m", "lora": {"r": 4}}
    _save(run, 4, parts=parts)
    newest = _save(run, 8, parts=parts)
    bad = _damage(newest, name, how)
    with pytest.warns(UserWarning) as warned:
        url, state = ckpt.load_latest(run, rank=0, world=2, parts=parts)
    assert url.endswith("step-00000004") and state.step == 4
    assert torch.equal(state.tensors["p1::param"], torch.full((2, 3), 5.0))
    text = " ".join(str(w.message) for w in warned)
    assert bad in text and "step-00000008" in text and "falling back" in text
    with pytest.raises(ckpt.CorruptCheckpointError, match=name) as err:
        ckpt.load(newest, rank=0, world=2, parts=parts)  # an explicit resume URL: an error, naming the file
    assert err.value.path == bad
    with pytest.warns(UserWarning, match=name):
        assert ckpt.latest_complete(run, deep=True).endswith("step-00000004")
    if how == "truncate":  # the cheap check (sizes) already skips a truncated file
        with pytest.warns(UserWarning, match=name):
            assert ckpt.latest_complete(run).endswith("step-00000004")


def test_saving_into_a_complete_folder_removes_the_marker_first(tmp_path, monkeypatch):
    """Two ranks as threads with a real barrier re-save a step whose folder is complete (a resumed run's final
    save): no file may be replaced while COMPLETE is there, and the result loads with the new values."""
    run = str(tmp_path / "run")
    parts = {"model": "m", "lora": {"r": 4}}
    url = _save(run, 4, parts=parts)
    marker = storage.join(url, ckpt.MARKER)
    replaced_under_marker = []
    upload = storage.upload_file_atomic

    def watched_upload(local, dst):
        replaced_under_marker.append(storage.exists(dst) and storage.exists(marker))
        upload(local, dst)

    monkeypatch.setattr(storage, "upload_file_atomic", watched_upload)
    barrier = threading.Barrier(2, timeout=30)
    meta = {"fingerprint": ckpt.config_fingerprint(parts), "fingerprint_parts": parts, "optimizer_step": 99}
    errors = []

    def rank(r):
        try:
            ckpt.save(
                run,
                4,
                r,
                2,
                {f"p{r}::param": torch.full((2, 3), 100.0 + r)},
                {"rng": ckpt.rng_state(), "cursor": {"row": 4}},
                meta if r == 0 else None,
                barrier.wait,
            )
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert replaced_under_marker == [False, False]
    state = ckpt.load(url, rank=0, world=2, parts=parts)
    assert state.meta["optimizer_step"] == 99
    assert torch.equal(state.tensors["p1::param"], torch.full((2, 3), 101.0))
