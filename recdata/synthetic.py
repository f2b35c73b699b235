"""A small synthetic dataset with real preference structure, for tests, benchmarks and trying the pipeline
without downloading anything: each user loves one genre (rates it 5) and is lukewarm about the rest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def preference_dataset(root: Path, n_users: int = 120, n_items: int = 60, per_user: int = 24, seed: int = 0) -> Path:
    """Write `{root}/src/inter.csv` and `items.csv` (generic ingest format) and return that folder."""
    rng = np.random.default_rng(seed)
    genres = ["Comedy", "Drama", "Horror", "Sci-Fi"]
    item_genre = rng.integers(0, len(genres), n_items)
    rows = []
    for u in range(n_users):
        fav = u % len(genres)
        for k, i in enumerate(rng.choice(n_items, per_user, replace=False)):
            r = 5 if item_genre[i] == fav else int(rng.integers(1, 4))
            rows.append((u, int(i), 1_000_000 + u * 7 + k * 1000, float(r)))
    d = Path(root) / "src"
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"]).to_csv(d / "inter.csv", index=False)
    pd.DataFrame(
        {
            "item_id": np.arange(n_items),
            "title": [f"Film {i} ({1990 + i % 20})" for i in range(n_items)],
            "genres": [genres[g] for g in item_genre],
        }
    ).to_csv(d / "items.csv", index=False)
    return d
