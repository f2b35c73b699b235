"""Candidate lists, Few2Many subsets and prompt rendering."""

from __future__ import annotations

import ast
import json
import re

import numpy as np
import pyarrow as pa
import pytest

from recdata.samples import SamplesError, sample_candidates
from recdata.subsets import load_subset, nested_sizes, seeded_order, write_subsets
from retrieval.history import history_bounds
from retrieval.prompts import (
    ML1M_AGE_LABELS,
    PromptError,
    PromptRenderer,
    ctr_prompt,
    fit_history,
    next_item_prompt,
    style_for,
)
from tests.conftest import shared_path


def block(seed=0, n_users=20, n_items=60):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 40, n_users)
    users = np.repeat(np.arange(n_users) * 7 + 3, lens)
    ts = rng.integers(0, 50, len(users))
    items = rng.integers(0, n_items, len(users)) * 2 + 1  # sparse odd ids
    o = np.lexsort((items, ts, users))
    return users[o].astype(np.int64), ts[o].astype(np.int64), items[o].astype(np.int64)


def test_candidates_fixed_distinct_and_outside_history():
    users, ts, items = block()
    catalogue = np.arange(60) * 2 + 1
    start, end = history_bounds(users, ts)
    rows = np.arange(len(users))
    sids = 5 * 2**40 + rows
    cands, ok = sample_candidates(sids, rows, items, start, end, catalogue, 20, seed=7)
    assert ok.all() and cands.shape == (len(rows), 20)
    for r in rows:
        c = cands[r]
        assert len(set(c.tolist())) == 20 and (c == items[r]).sum() == 1
        assert not set(c.tolist()) - {items[r]} & set(items[start[r] : end[r]].tolist())
        assert set(c.tolist()) <= set(catalogue.tolist())
    # Same seed and sample ids -> same lists, whatever rows are processed together.
    part, _ = sample_candidates(sids[10::3], rows[10::3], items, start, end, catalogue, 20, seed=7)
    assert np.array_equal(part, cands[10::3])
    other, _ = sample_candidates(sids, rows, items, start, end, catalogue, 20, seed=8)
    assert not np.array_equal(other, cands)
    # Target position is spread over the slots, not always first.
    assert len(set(np.argmax(cands == items[:, None], axis=1).tolist())) > 5


def test_candidates_small_catalogue_uses_exact_fallback_or_drops():
    # One user who has seen 25 of 30 items: only 4 eligible negatives for a 20-list at the end.
    items = np.arange(30, dtype=np.int64)
    users = np.zeros(30, dtype=np.int64)
    ts = np.arange(30, dtype=np.int64)
    start, end = history_bounds(users, ts)
    rows = np.array([5, 25])
    cands, ok = sample_candidates(rows.astype(np.int64), rows, items, start, end, items, 20, seed=0)
    assert ok.tolist() == [True, False]
    assert len(set(cands[0].tolist())) == 20 and not set(cands[0].tolist()) & set(range(5))
    with pytest.raises(SamplesError, match=r"\[99\]"):
        sample_candidates(rows, rows, np.r_[items[:-1], 99], start, end, items, 20, seed=0)


def test_few_shot_subsets_are_nested_prefixes_and_stable_under_growth(tmp_path):
    ids = np.arange(5000, dtype=np.int64) * 3 + 2**40
    order = seeded_order(ids, seed=42)
    assert sorted(order.tolist()) == sorted(ids.tolist())
    assert not np.array_equal(order, seeded_order(ids, seed=43))
    # More samples: the old ones keep their relative order (new ones are interleaved).
    grown = seeded_order(np.r_[ids, np.arange(1000) * 3 + 1], seed=42)
    assert np.array_equal(grown[np.isin(grown, ids)], order)
    assert nested_sizes(5000, extra=(3000,)) == [64, 256, 1024, 3000, 4096, 5000]
    summary = write_subsets(str(tmp_path), {"train": ids, "test": ids[:700]}, seed=42, caps={"test": 300})
    assert summary["splits"]["test"]["kept"] == 300
    s64, s256, s1024 = (load_subset(str(tmp_path), "train", n) for n in (64, 256, 1024))
    assert set(s64) < set(s256) < set(s1024) and np.array_equal(s1024[:64], s64)
    assert np.array_equal(load_subset(str(tmp_path), "test"), seeded_order(ids[:700], 42)[:300])
    with pytest.raises(SamplesError, match="only 300"):
        load_subset(str(tmp_path), "test", 301)


def test_ctr_prompt_reproduces_rella_sample_exactly():
    path = shared_path("data", "rella-ml1m-sample", "test_5_simple.json")
    example = json.loads(path.read_text())[0]["input"]
    hist = ast.literal_eval(example.split("\n")[2])
    titles = [re.match(r"\d+\. (.*) \((\d) stars\)$", h).group(1) for h in hist]
    ratings = [float(re.match(r".*\((\d) stars\)$", h).group(1)) for h in hist]
    target = re.search(r"\*\*\*(.*)\*\*\*", example).group(1)
    style = style_for("movie", age_labels=ML1M_AGE_LABELS)
    user = {"gender": "M", "occupation": "programmer", "age": 25, "zip": "55455", "user_id": 7}
    assert ctr_prompt(titles, ratings, target, style, user) == example


def test_renderer_next_item_tokens_and_no_raw_ids():
    items = pa.table({"item_id": [11, 12, 13, 14], "title": ["Alpha (1990)", "Beta", "Gamma", None]})
    users = pa.table({"user_id": [5], "gender": ["F"], "age": [31], "occupation": ["writer"], "zip": ["90210"]})
    style = style_for("movie", history_token="[HistoryEmb]", candidate_token="[CansEmb]")
    r = PromptRenderer(items, "next_item", style, users)
    rec = {
        "sample_id": 1,
        "user_id": 5,
        "item_id": 12,
        "text_hist_items": [11, 13],
        "candidates": [13, 12],
        "label": None,
    }
    out = r.render(rec)
    assert out.text == (
        "This user has watched Alpha (1990) [HistoryEmb], Gamma [HistoryEmb] in the previous. Please predict the next "
        "movie this user will watch. Choose the answer from the following 2 movie titles: Gamma [CansEmb], Beta [CansEmb]. Answer:"
    )
    assert out.answer == "Beta\n"
    ctr = PromptRenderer(items, "ctr", style_for("book"), users)
    text = ctr.render(
        {"user_id": 5, "item_id": 13, "label": 1, "text_hist_items": [11], "text_hist_ratings": [4.5]}
    ).text
    assert text.startswith("The user is a female. Her job is writer. Her age is 31.\nShe read the following books")
    assert "'0. Alpha (1990) (4.5 stars)'" in text and "90210" not in text and "***Gamma***" in text
    with pytest.raises(PromptError, match=r"\[14\]"):
        r.render({**rec, "text_hist_items": [14]})
    assert (
        "an unknown item"
        in PromptRenderer(items, "next_item", missing_text="placeholder").render({**rec, "text_hist_items": [14]}).text
    )


def test_truncation_drops_oldest_history_keeps_question_and_counts():
    items = pa.table({"item_id": list(range(30)), "title": [f"Movie number {i}" for i in range(30)]})
    r = PromptRenderer(items, "ctr")
    rec = {"user_id": 1, "item_id": 29, "label": 0, "text_hist_items": list(range(20)), "text_hist_ratings": [3.0] * 20}
    words = lambda s: len(s.split())  # noqa: E731
    full = r.render(rec)
    assert not full.truncated and full.kept == 20
    out = r.render(rec, count_tokens=words, max_tokens=words(full.text) - 10)
    assert out.truncated and 0 < out.kept < 20 and words(out.text) <= words(full.text) - 10
    assert "Movie number 19" in out.text and "'0. Movie number 0 " not in out.text and "yes or no" in out.text
    assert r.truncated == 1
    with pytest.raises(PromptError, match="without any history"):
        fit_history(lambda m: "x " * (50 + m), 5, words, 10)
    assert next_item_prompt([], ["A"], style_for("artist")).startswith("This user has listened to  in the previous")
