"""Item embeddings with a tiny random Llama (real tokenizer), and the real ML-100K end to end:
ingest -> embed_items -> SUBR samples (checked against brute force) -> prompts."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest

from cluster.pool import run_sharded
from recdata.ingest import IngestOptions, ingest
from recdata.samples import BuildOptions, SampleSet
from recdata.schema import Dataset
from recdata.subsets import load_subset
from retrieval.build import build_samples
from retrieval.embed_items import EmbedOptions, EmbedWorker, embed_items, item_texts
from retrieval.history import history_bounds, load_item_vectors, top_similar_reference
from retrieval.prompts import PromptRenderer
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    src = shared_path("models", "smollm2-135m-instruct-tokenizer")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(src)
    cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = 2, 64, 128
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 16
    import torch

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(f, out / f.name)
    return str(out)


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    src = shared_path("data", "movielens-100k")

    out = str(tmp_path_factory.mktemp("ml100k") / "ds")
    ingest("movielens", str(src), out, IngestOptions(task="ctr", num_shards=4, progress=False, workers=1))
    return out


def test_item_texts_drop_sentences_with_missing_fields():
    items = pa.table({"item_id": [1, 2], "title": ["Heat (1995)", "Solaris"], "genres": ["Action|Crime", None]})
    ids, texts = item_texts(items, EmbedOptions())
    assert ids.tolist() == [1, 2]
    assert texts == [
        "Here is a movie. Its title is Heat (1995). Its genre is Action, Crime.",
        "Here is a movie. Its title is Solaris.",
    ]


def test_mean_pool_ignores_padding(tiny_model_dir):
    w = EmbedWorker(tiny_model_dir, {**EmbedOptions().__dict__, "batch_size": 8})
    texts = [
        "Here is a movie. Its title is A.",
        "Here is a movie. Its title is a much longer name, with genres and more words.",
    ]
    both = w.embed(texts)
    alone = w.embed(texts[:1])
    np.testing.assert_allclose(both[0], alone[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(both[0], both[1])


def test_ml100k_embed_cache_and_subr_samples_match_brute_force(tiny_model_dir, ml100k, tmp_path):
    cache = str(tmp_path / "emb")
    opts = EmbedOptions(pca_dims=32, batch_size=64)
    folder = embed_items(ml100k, tiny_model_dir, cache, opts)
    vec = load_item_vectors(folder, normalize=True)
    assert vec.matrix.shape == (1682, 32) and vec.item_ids[0] == 1  # ML ids are 1-based: looked up by id
    assert embed_items(ml100k, tiny_model_dir, cache, opts) == folder  # reused, not recomputed
    # Another PCA size is a new result but reuses the raw LLM vectors (raw-*/ parts are not rewritten).
    parts = {p: p.stat().st_mtime_ns for p in (tmp_path / "emb").glob("raw-*/*.parquet")}
    other = embed_items(ml100k, tiny_model_dir, cache, EmbedOptions(pca_dims=16, batch_size=64))
    assert other != folder and load_item_vectors(other, normalize=False).dim == 16
    assert parts and parts == {p: p.stat().st_mtime_ns for p in (tmp_path / "emb").glob("raw-*/*.parquet")}

    out = str(tmp_path / "samples")
    bo = BuildOptions(k_text=10, k_id=60, subr_pool=200, min_history=5, max_eval_samples=1000)
    m = build_samples(ml100k, out, bo, num_workers=1, embeddings_url=folder)
    ss = SampleSet.open(out)
    assert m["counts"]["interactions"] == 100_000 and ss.num_rows("test") > 0
    # Brute force on shard 0: rebuild each sample's candidates from the raw interactions.
    ds = Dataset.open(ml100k)
    inter = ds.read_shard(0)
    u, t, it = (inter[c].to_numpy() for c in ("user_id", "timestamp", "item_id"))
    start, end = history_bounds(u, t)
    train = ss.read("train").to_pandas()
    train = train[train.sample_id < 2**40].sample(150, random_state=0)
    rows = (train.sample_id.to_numpy() % 2**40).astype(np.int64)
    want = top_similar_reference(start, end, np.sort(rows), vec.rows(it), vec.matrix, k=10, pool=200)
    want = dict(zip(np.sort(rows).tolist(), want))
    for s, r in zip(train.itertuples(), rows):
        assert list(s.text_hist_items) == it[want[r]].tolist()
        assert list(s.id_hist_items) == it[max(start[r], end[r] - 60) : end[r]].tolist()
        assert s.hist_len >= 5 and all(x < s.timestamp for x in s.id_hist_timestamps)
    # The record renders with the real users table, without raw ids.
    renderer = PromptRenderer(ds.read_items(), "ctr", users=ds.read_users())
    rec = ss.read("test", sample_ids=np.array(load_subset_first(out))).to_pylist()[0]
    text = renderer.render(rec).text
    assert "***" in text and "His age is" in text or "Her age is" in text
    assert str(rec["user_id"]) not in text.split("\n")[0]


def load_subset_first(out):

    return load_subset(out, "test", 1)


@pytest.mark.slow
def test_embed_on_two_ray_actors_equals_in_process(tiny_model_dir, ml100k, tmp_path, ray_local):
    opts = EmbedOptions(pca_dims=0, batch_size=64, items_per_task=500)
    local = load_item_vectors(embed_items(ml100k, tiny_model_dir, str(tmp_path / "a"), opts), normalize=False)
    remote = load_item_vectors(
        embed_items(ml100k, tiny_model_dir, str(tmp_path / "b"), opts, num_workers=2, runner=run_sharded),
        normalize=False,
    )
    assert np.array_equal(local.item_ids, remote.item_ids)
    np.testing.assert_allclose(local.matrix, remote.matrix, rtol=1e-4, atol=1e-5)
