"""Evaluation metrics shared by the teacher and the LLM trainer.

CTR (RecLoRA): AUC and LogLoss on p(click). Next item (iLoRA/LLaRA): HR@K and NDCG@K over the fixed,
persisted candidate lists, and for generated text the LLaRA trio ValidRatio / HR@1-over-valid /
HR@1-over-all (papers.md 2.1: the published "HitRatio@1" is correct/total, so both are reported).
Test sets can be tiny (95 / 122 rows), hence the seeded bootstrap intervals.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import log_loss as _sk_log_loss
from sklearn.metrics import roc_auc_score

from configs.errors import RecloraError

# Probabilities are clipped before LogLoss so one overconfident 0/1 does not make the metric infinite.
LOGLOSS_EPS = 1e-7


class MetricError(RecloraError, ValueError):
    """Inputs a metric cannot be computed on (shape mismatch, NaN, a single class)."""


def _as_1d(name: str, x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if np.isnan(a).any():
        raise MetricError(
            f"{name}: {int(np.isnan(a).sum())} NaN values (first at index {int(np.flatnonzero(np.isnan(a))[0])})"
        )
    return a


def auc(labels, scores) -> float:
    """ROC AUC; raises if only one class is present (AUC is undefined there, not 0.5)."""
    y, s = _as_1d("labels", labels), _as_1d("scores", scores)
    if y.shape != s.shape:
        raise MetricError(f"auc: labels {y.shape} and scores {s.shape} differ in length")
    if len(np.unique(y)) < 2:
        raise MetricError(f"auc: needs both classes, got only {np.unique(y).tolist()} over {len(y)} rows")
    return float(roc_auc_score(y, s))


def logloss(labels, probs) -> float:
    y, p = _as_1d("labels", labels), _as_1d("probs", probs)
    if y.shape != p.shape:
        raise MetricError(f"logloss: labels {y.shape} and probs {p.shape} differ in length")
    if (p < 0).any() or (p > 1).any():
        raise MetricError("logloss: probabilities must lie in [0, 1] (pass sigmoid(logit), not the logit)")
    return float(_sk_log_loss(y, np.clip(p, LOGLOSS_EPS, 1 - LOGLOSS_EPS), labels=[0, 1]))


def target_ranks(scores, target_index) -> np.ndarray:
    """0-based rank of the target among its candidates. Ties count against the target, so a constant
    scorer gets the worst rank instead of a lucky first place."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(target_index, dtype=np.int64).reshape(-1)
    if s.ndim != 2 or s.shape[0] != t.shape[0]:
        raise MetricError(f"scores must be [n, num_candidates] matching target_index [n]; got {s.shape} and {t.shape}")
    if np.isnan(s).any():
        row = int(np.flatnonzero(np.isnan(s).any(axis=1))[0])
        raise MetricError(f"scores: NaN in row {row}")
    if ((t < 0) | (t >= s.shape[1])).any():
        raise MetricError(f"target_index: values must lie in [0, {s.shape[1]}), got min {t.min()} max {t.max()}")
    target = s[np.arange(len(t)), t][:, None]
    return (s >= target).sum(axis=1) - 1


def hit_rate_at_k(scores, target_index, k: int) -> float:
    return float((target_ranks(scores, target_index) < k).mean())


def ndcg_at_k(scores, target_index, k: int) -> float:
    """One relevant item per row, so IDCG = 1 and NDCG = 1/log2(rank+2) when the target is in the top k."""
    r = target_ranks(scores, target_index)
    return float(np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0).mean())


def ranking_metrics(scores, target_index, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    r = target_ranks(scores, target_index)
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = float((r < k).mean())
        out[f"ndcg@{k}"] = float(np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0).mean())
    out["mrr"] = float((1.0 / (r + 1.0)).mean())
    return out


def ctr_metrics(labels, probs) -> dict[str, float]:
    return {"auc": auc(labels, probs), "logloss": logloss(labels, probs)}


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(point, low, high): percentile bootstrap over rows, resampling all arrays with the same indices.
    Resamples on which the metric is undefined (e.g. one class for AUC) are skipped."""
    arrs = [np.asarray(a) for a in arrays]
    n = len(arrs[0])
    if any(len(a) != n for a in arrs):
        raise MetricError(f"bootstrap_ci: arrays differ in length: {[len(a) for a in arrs]}")
    point = float(metric_fn(*arrs))
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        try:
            stats.append(float(metric_fn(*[a[idx] for a in arrs])))
        except MetricError:
            continue
    if not stats:
        raise MetricError("bootstrap_ci: the metric was undefined on every resample")
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)


# ---- does a candidate scorer use the user? -------------------------------------------------------------


def rank_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the Spearman correlation of two [rows, C] candidate score arrays (rows where either is
    constant are left out): does a model rank a row's candidates the way another does?"""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise MetricError(f"rank_agreement: score arrays of shapes {a.shape} and {b.shape}; expected equal [rows, C]")
    rho = np.array([spearmanr(x, y).statistic for x, y in zip(a, b)], dtype=np.float64)
    return float(rho[np.isfinite(rho)].mean()) if np.isfinite(rho).any() else float("nan")


def title_prior(scores: np.ndarray, candidates: np.ndarray) -> float:
    """Correlation of each (row, candidate) score, centred on its row's mean, with the same item's mean centred
    score in the other rows (leave-one-out; items that are candidates in one row only are left out). Near 1: the
    model gives a title the same score whatever the user (a title prior); near 0: its scores depend on the row.
    A row's candidates are distinct items (the persisted candidate lists), so leaving one out removes one row."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != np.shape(candidates) or scores.ndim != 2:
        raise MetricError(f"title_prior: scores {scores.shape} and candidates {np.shape(candidates)} differ")
    s = scores - scores.mean(axis=1, keepdims=True)
    _, inv, count = np.unique(np.asarray(candidates, dtype=np.int64), return_inverse=True, return_counts=True)
    inv = inv.reshape(s.shape)
    total = np.bincount(inv.ravel(), weights=s.ravel(), minlength=len(count))
    seen = count[inv] > 1
    loo = (total[inv][seen] - s[seen]) / (count[inv][seen] - 1)
    return float(np.corrcoef(s[seen], loo)[0, 1]) if seen.sum() > 1 else float("nan")


# ---- generated text (LLaRA / iLoRA evaluation) -------------------------------------------------------


def match_candidate(generated: str, candidate_titles: Sequence[str]) -> int | None:
    """Index of the candidate named by `generated`, or None when the answer is invalid.

    LLaRA's rule: keep the first line; the answer is valid when exactly one candidate title occurs in it
    as a case-insensitive substring. Zero or several matches are invalid."""
    first = (generated or "").strip().split("\n", 1)[0].lower()
    hits = [i for i, t in enumerate(candidate_titles) if t and t.strip().lower() in first]
    return hits[0] if len(hits) == 1 else None


def generation_flags(
    generated: Sequence[str], candidates: Sequence[Sequence[str]], targets: Sequence[str]
) -> list[tuple[bool, bool]]:
    """(valid, correct) per row by LLaRA's rule (match_candidate); correct means the named candidate is the
    target (titles compared case-insensitively)."""
    if not (len(generated) == len(candidates) == len(targets)):
        raise MetricError(
            f"generation_metrics: {len(generated)} outputs, {len(candidates)} candidate lists, {len(targets)} targets"
        )
    out = []
    for text, cands, target in zip(generated, candidates, targets):
        idx = match_candidate(text, cands)
        out.append((idx is not None, idx is not None and cands[idx].strip().lower() == target.strip().lower()))
    return out


def generation_metrics(
    generated: Sequence[str], candidates: Sequence[Sequence[str]], targets: Sequence[str]
) -> dict[str, float]:
    """ValidRatio = valid/total, HR@1 over valid = correct/valid, HR@1 over all = correct/total
    (LLaRA's checkpoint metric hr x VR, which is what its README reports)."""
    flags = generation_flags(generated, candidates, targets)
    n = len(flags)
    valid = sum(v for v, _ in flags)
    correct = sum(c for _, c in flags)
    return {
        "n": float(n),
        "valid_ratio": valid / n if n else float("nan"),
        "hr1_valid": correct / valid if valid else 0.0,
        "hr1_all": correct / n if n else float("nan"),
    }
