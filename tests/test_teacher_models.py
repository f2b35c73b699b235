"""DIN / SASRec / features on small synthetic sample tables: shapes, masking, unknown ids, bad input,
save/load and seeded determinism."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest
import torch

from recdata import storage
from teacher import refdata
from teacher.config import TeacherConfig, TeacherConfigError
from teacher.data import list_shards, read_shard
from teacher.features import UNK, Encoder, FeatureError, pad_lists_right
from teacher.model_io import TeacherLoadError, build_model, load_teacher, to_tensors
from teacher.train import build_feature_space, side_tables, train_teacher

torch.set_num_threads(1)
SMALL_DIN = dict(epochs=1, batch_size=128, num_threads=1, mlp_hidden=[64, 32], rep_dim=32, max_hist=20)
SMALL_SAS = dict(epochs=1, batch_size=128, num_threads=1, embed_dim=32, rep_dim=32)


@pytest.fixture(scope="module")
def ctr(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctr")
    refdata.build_synthetic_ctr(str(root / "ds"), str(root / "samples"))
    return str(root / "samples")


@pytest.fixture(scope="module")
def nxt(tmp_path_factory):
    root = tmp_path_factory.mktemp("next")
    refdata.build_synthetic_next(str(root / "samples"))
    return str(root / "samples")


def _space_and_table(samples_url: str):
    items, users, _ = side_tables(samples_url, None)
    space = build_feature_space(list_shards(samples_url, "train"), items, users)
    table = pa.concat_tables([read_shard(u) for u in list_shards(samples_url, "valid")])
    return space, table


def _set(table: pa.Table, name: str, arr) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, arr)


def test_pad_lists_right_slices_truncates_and_nulls():
    arr = pa.array([[1, 2, 3, 4], None, [], [5], [6, 7]], pa.list_(pa.int64())).slice(1)
    out, mask, lengths, nulls = pad_lists_right(arr, 3)
    assert lengths.tolist() == [0, 0, 1, 2]
    assert out.tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 5], [0, 6, 7]]
    assert mask.sum() == 3 and not nulls.any()
    out, mask, _, _ = pad_lists_right(pa.array([[1, 2, 3, 4]], pa.list_(pa.int64())), 2)
    assert out.tolist() == [[3, 4]]  # keeps the most recent, most recent last


def test_din_forward_shapes_and_fast_eval_path(ctr):
    space, table = _space_and_table(ctr)
    cfg = TeacherConfig.defaults("din", max_hist=20)
    model = build_model(cfg, space).eval()
    b = to_tensors(Encoder(space, 20, "ctr").encode(table), torch.device("cpu"))
    with torch.no_grad():  # eval tables path
        fast = model(b)
    slow = model(b)  # grad enabled: the training path, dropout off in eval
    assert fast["rep"].shape == (table.num_rows, 256) and model.rep_dim == 256
    torch.testing.assert_close(fast["rep"], slow["rep"].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast["logit"], slow["logit"].detach(), rtol=1e-5, atol=1e-5)


def test_empty_and_null_histories_give_finite_outputs_and_grads(ctr, nxt):
    for url, model_name in ((ctr, "din"), (nxt, "sasrec")):
        space, table = _space_and_table(url)
        n = table.num_rows
        empty = pa.array([[] if i % 2 else None for i in range(n)], pa.list_(pa.int64()))
        t = _set(_set(table, "id_hist_items", empty), "id_hist_ratings", pa.array([[]] * n, pa.list_(pa.float32())))
        cfg = TeacherConfig.defaults(model_name, max_hist=10)
        stats: Counter = Counter()
        b = to_tensors(Encoder(space, 10, cfg.task).encode(t, stats), torch.device("cpu"))
        assert stats["empty_history"] == n
        if model_name == "din":
            b["label"] = torch.ones(n)
        model = build_model(cfg, space).train()
        out = model(b)
        model.loss(b, out).backward()
        assert torch.isfinite(out["rep"]).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.eval()
        with torch.no_grad():
            rep = model(b)["rep"]
        assert torch.isfinite(rep).all()


def test_unknown_ids_map_to_reserved_row_and_are_counted(ctr):
    space, table = _space_and_table(ctr)
    t = table.slice(0, 4)
    t = _set(t, "user_id", pa.array([10**9, 1, 1, 1], pa.int64()))
    t = _set(t, "item_id", pa.array([7, 10**9 + 1, 7, 7], pa.int64()))
    t = _set(t, "id_hist_items", pa.array([[10**9 + 2, 7]] * 4, pa.list_(pa.int64())))
    t = _set(t, "id_hist_ratings", pa.array([[4.0, 5.0]] * 4, pa.list_(pa.float32())))
    stats: Counter = Counter()
    enc = Encoder(space, 20, "ctr").encode(t, stats)
    assert enc["user_idx"][0] == UNK and enc["item_idx"][1] == UNK and enc["hist_idx"][0, -2] == UNK
    assert stats["unknown_users"] == 1 and stats["unknown_items"] == 1 and stats["unknown_hist_items"] == 4


def test_bad_features_name_sample_and_field(ctr, nxt):
    space, table = _space_and_table(ctr)
    t = table.slice(0, 3)
    sid = t.column("sample_id")[1].as_py()
    t_nan = _set(t, "id_hist_ratings", pa.array([[4.0], [float("nan")], [3.0]], pa.list_(pa.float32())))
    t_nan = _set(t_nan, "id_hist_items", pa.array([[1], [2], [3]], pa.list_(pa.int64())))
    with pytest.raises(FeatureError, match=rf"id_hist_ratings.*NaN.*sample_id {sid}"):
        Encoder(space, 20, "ctr").encode(t_nan)
    t_null = _set(t, "item_id", pa.array([1, None, 3], pa.int64()))
    with pytest.raises(FeatureError, match=rf"item_id.*null.*sample_id {sid}"):
        Encoder(space, 20, "ctr").encode(t_null)
    nspace, ntable = _space_and_table(nxt)
    t = ntable.slice(0, 2)
    sid = t.column("sample_id")[0].as_py()
    t_bad = _set(t, "candidates", pa.array([[10**6] * 20, t.column("candidates")[1].as_py()], pa.list_(pa.int64())))
    with pytest.raises(FeatureError, match=rf"sample_id {sid}.*not among its candidates"):
        Encoder(nspace, 10, "next_item").encode(t_bad)


def test_sasrec_scores_are_dot_products(nxt):
    space, table = _space_and_table(nxt)
    cfg = TeacherConfig.defaults("sasrec", max_hist=10)
    model = build_model(cfg, space).eval()
    b = to_tensors(Encoder(space, 10, "next_item").encode(table), torch.device("cpu"))
    with torch.no_grad():
        out = model(b)
        pred = model.predict(b, out)
    assert out["rep"].shape == (table.num_rows, 64)
    emb = model.item_embeddings()
    assert emb.shape == (len(space.items), 64)
    expected = (emb[b["cand_idx"]] * out["rep"][:, None, :]).sum(-1)
    torch.testing.assert_close(pred["candidate_scores"], expected)
    target = pred["candidate_scores"][torch.arange(table.num_rows), b["target_pos"]]
    torch.testing.assert_close(pred["teacher_score"], target)


def test_config_errors():
    with pytest.raises(TeacherConfigError, match="rep_dim.*mlp_hidden"):
        TeacherConfig(model="din", mlp_hidden=[128, 64], rep_dim=256)
    with pytest.raises(TeacherConfigError, match="rep_dim.*embed_dim"):
        TeacherConfig.defaults("sasrec", rep_dim=32)
    with pytest.raises(TeacherConfigError, match="unknown teacher config keys"):
        TeacherConfig.from_dict({"model": "din", "hidden": 3})


def test_training_is_seeded_and_save_load_roundtrips(ctr, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ra = train_teacher(ctr, a, TeacherConfig.defaults("din", **SMALL_DIN), progress=False)
    rb = train_teacher(ctr, b, TeacherConfig.defaults("din", **SMALL_DIN), progress=False)
    assert ra["valid"] == rb["valid"]
    ma, mb = storage.read_json(f"{a}/teacher.json"), storage.read_json(f"{b}/teacher.json")
    assert ma["sha256"] == mb["sha256"]  # bit-identical weights and vocabularies
    loaded = load_teacher(a)
    assert not loaded.model.training and loaded.rep_dim == 32
    assert all(not p.requires_grad for p in loaded.model.parameters())
    with open(f"{a}/model.safetensors", "r+b") as f:  # a foreign/partial file must not load
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(TeacherLoadError, match="sha256"):
        load_teacher(a)
    with pytest.raises(TeacherLoadError, match="not a committed teacher"):
        load_teacher(str(tmp_path / "missing"))


def test_sasrec_learns_synthetic_walks(nxt, tmp_path):
    cfg = TeacherConfig.defaults("sasrec", **{**SMALL_SAS, "epochs": 8, "lr": 3e-3})
    res = train_teacher(nxt, str(tmp_path / "m"), cfg, progress=False)
    assert res["valid"]["hr@1"] > 0.15, res["valid"]  # random is 0.05


def test_train_cli_commits_model(ctr, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "teacher.train",
        "--samples",
        ctr,
        "--out",
        str(out),
        "--model",
        "din",
        "--epochs",
        "1",
        "--batch-size",
        "256",
        "--mlp-hidden",
        "64,32",
        "--max-hist",
        "20",
        "--num-threads",
        "1",
    ]
    proc = subprocess.run(
        cmd,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "RECLORA_QUIET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "auc" in res["valid"] and res["out"] == str(out)
    meta = json.loads((out / "teacher.json").read_text())
    assert meta["rep_dim"] == 32 and meta["config"]["mlp_hidden"] == [64, 32]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
