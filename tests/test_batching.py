"""Length bucketing of training micro-batches and evaluation batches (issue #13): the same rows per step,
less padding, a pure function of the step for any number of workers."""

from __future__ import annotations

import numpy as np
import torch

from configs.loader import load_config
from recdata.streams import Schedule, collate, padding_fraction
from trainer.lora import MixtureLoraConfig
from trainer.objective import gate_input, random_representations


def _lengths(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 300, size=rows)


def test_bucketed_micro_batches_keep_the_steps_rows_and_ignore_world_size():
    lengths = _lengths(100)
    grouping = {}
    for world in (1, 2, 4):
        s = Schedule(rows=100, global_batch=16, world=world, micro=2, seed=3)
        for step in (0, 5, 6, 13):
            rows = s.global_rows(step)
            plain = np.concatenate([np.concatenate(s.rank_rows(step, r)) for r in range(world)])
            assert np.array_equal(plain, rows)
            per_rank = [s.rank_rows(step, r, lengths[rows]) for r in range(world)]
            assert all(len(mb) == s.accumulation for mb in per_rank)
            got = np.concatenate([np.concatenate(mb) for mb in per_rank])
            assert sorted(got.tolist()) == sorted(rows.tolist())  # the same rows, each once
            # Micro-batch m of the sorted global batch is rank m % world's (m // world)-th: one grouping for all.
            micro = {frozenset(mb.tolist()) for mbs in per_rank for mb in mbs}
            assert grouping.setdefault(step, micro) == micro, (world, step)
            # Neighbouring lengths at each accumulation index; each micro-batch is a run of the sorted lengths.
            flat = [mb for a in range(s.accumulation) for mb in (per_rank[r][a] for r in range(world))]
            assert np.all(np.diff([lengths[mb].max() for mb in flat]) >= 0)


def test_bucketing_reduces_padding():
    lengths = _lengths(256, seed=1)
    rows = [
        {"input_ids": [5] * int(n), "prompt_len": int(n) - 2, "label": 1, "rep": [0.0], "sample_id": i}
        for i, n in enumerate(lengths)
    ]
    s = Schedule(rows=256, global_batch=64, world=2, micro=4, seed=0)

    def frac(bucketed: bool) -> float:
        pad = tokens = 0
        for step in range(s.steps_per_epoch):
            for r in range(2):
                for mb in s.rank_rows(step, r, lengths[s.global_rows(step)] if bucketed else None):
                    b = collate([rows[i] for i in mb], 0)
                    pad += padding_fraction(b) * b["attention_mask"].numel()
                    tokens += b["attention_mask"].numel()
        return pad / tokens

    plain, bucketed = frac(False), frac(True)
    assert bucketed < plain / 3, (plain, bucketed)


def test_padding_fraction_of_a_batch():
    b = collate(
        [
            {"input_ids": [1, 2, 3, 4], "prompt_len": 3, "label": 0, "rep": [0.0], "sample_id": 0},
            {"input_ids": [1, 2], "prompt_len": 1, "label": 1, "rep": [0.0], "sample_id": 1},
        ],
        0,
    )
    assert padding_fraction(b) == 0.25 and torch.equal(b["attention_mask"][1], torch.tensor([0, 0, 1, 1]))


def test_random_gate_input_is_a_fixed_vector_per_sample():
    rows = [{"input_ids": [1, 2, 3], "prompt_len": 2, "label": 1, "rep": [0.5] * 8, "sample_id": s} for s in (7, 3, 7)]
    b = collate(rows, 0)
    assert gate_input(b, "teacher") is b
    r = gate_input(b, "random")["cond"]
    assert r.shape == b["cond"].shape and r.dtype == b["cond"].dtype
    assert torch.equal(r[0], r[2]) and not torch.equal(r[0], r[1])  # a function of the sample id only
    assert torch.equal(r[1], random_representations(torch.tensor([3]), 8)[0])
    assert torch.equal(b["cond"], torch.full((3, 8), 0.5))  # the collated batch is left as it was
    cfg = load_config("tiny", ["trainer.lora.gate_input=random"])
    assert MixtureLoraConfig.from_config(cfg).gate_input == "random"
