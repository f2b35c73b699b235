"""Trivial reference scorers that a teacher must beat: item popularity and random."""

from __future__ import annotations

import numpy as np


def popularity_ctr(
    train_items: np.ndarray, train_labels: np.ndarray, eval_items: np.ndarray, prior_weight: float = 10.0
) -> np.ndarray:
    """Smoothed per-item positive rate from training; unseen items get the global rate."""
    train_items = np.asarray(train_items, dtype=np.int64)
    y = np.asarray(train_labels, dtype=np.float64)
    glob = float(y.mean())
    uniq, inv = np.unique(train_items, return_inverse=True)
    pos = np.bincount(inv, weights=y, minlength=len(uniq))
    cnt = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    rate = (pos + prior_weight * glob) / (cnt + prior_weight)
    eval_items = np.asarray(eval_items, dtype=np.int64)
    p = np.searchsorted(uniq, eval_items)
    pc = np.minimum(p, len(uniq) - 1)
    return np.where(uniq[pc] == eval_items, rate[pc], glob)


def popularity_candidates(train_targets: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """[n, C] scores = training frequency of each candidate as a target (unseen: 0)."""
    uniq, counts = np.unique(np.asarray(train_targets, dtype=np.int64), return_counts=True)
    c = np.asarray(candidates, dtype=np.int64)
    p = np.minimum(np.searchsorted(uniq, c), len(uniq) - 1)
    return np.where(uniq[p] == c, counts[p], 0).astype(np.float64)


def random_scores(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape)
