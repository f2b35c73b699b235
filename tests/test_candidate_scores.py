"""Next-item candidate scoring with a shared, cached prompt equals the full-sequence reference.

`candidate_scores` runs each prompt once and scores the candidate titles as continuations of its KV cache;
`candidate_scores_full` (the previous path, kept as the reference) recomputes the prompt for every candidate.
`greedy_answers` (the LLaRA generation metric's decoding, KV-cached) equals greedy decoding that recomputes the
whole sequence every step. All run through the PersonalizedLM / HybridLM wrappers, plain and inside a real DeepSpeed ZeRO-3 engine (one
gloo rank on CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest_lora_helpers import ILORA_TARGETS, RECLORA_TARGETS, randomize_bank, tiny_llama

from configs.schema import TrainerConfig
from trainer import engine as eng
from trainer.hybrid import HybridLM
from trainer.lora import MixtureLoraConfig, build_personalized_model
from trainer.objective import candidate_scores, candidate_scores_full, greedy_answers

COND_DIM = 6
PAD = 0
SLOT_TOKENS = [510, 511]  # hybrid placeholders (history, candidate)
TEXT_TOKEN = 9
ITEMS = np.arange(100, 130)


def answer_ids(item: int) -> list[int]:
    """A title of 1..4 tokens then an end-of-turn token: candidates differ in length (right padding)."""
    rng = np.random.default_rng(item)
    return [int(t) for t in rng.integers(20, 500, size=1 + item % 4)] + [2]


def rows(num: int, num_cands: int, hybrid: bool, seed: int = 0) -> list[dict]:
    """Rows of different prompt lengths (left padding); hybrid prompts carry item slots."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        length = int(rng.integers(6, 16))
        prompt = [int(t) for t in rng.integers(20, 500, size=length)]
        slots: list[int] = []
        if hybrid:
            for pos in rng.choice(np.arange(1, length), size=3, replace=False):
                prompt[pos] = SLOT_TOKENS[int(pos) % 2]
                slots.append(int(rng.choice(ITEMS)))
        cands = [int(c) for c in rng.choice(ITEMS, size=num_cands, replace=False)]
        target = cands[0]
        out.append(
            {
                "input_ids": prompt + answer_ids(target),
                "prompt_len": length,
                "label": None,
                "item_id": target,
                "candidates": cands,
                "rep": rng.standard_normal(COND_DIM).astype(np.float32).tolist(),
                "sample_id": i,
                "item_slots": slots if hybrid else None,
            }
        )
    return out


def model(mode: str) -> torch.nn.Module:
    if mode == "reclora":
        config = MixtureLoraConfig(
            mode="reclora", target_modules=RECLORA_TARGETS, r=4, alpha=8, num_experts=3, cond_dim=COND_DIM
        )
    elif mode == "plain":
        config = MixtureLoraConfig(mode="plain", target_modules=RECLORA_TARGETS, r=4, alpha=8)
    else:
        config = MixtureLoraConfig(
            mode="ilora", target_modules=ILORA_TARGETS, r=8, alpha=16, num_experts=4, cond_dim=COND_DIM
        )
    pm = build_personalized_model(tiny_llama(seed=0), config)
    randomize_bank(pm, std=0.1)
    if mode != "ilora":
        return pm.eval()
    generator = torch.Generator().manual_seed(1)
    hybrid = HybridLM(pm, ITEMS, torch.randn(len(ITEMS), 5, generator=generator), SLOT_TOKENS, TEXT_TOKEN)
    return hybrid.eval()


def both(m, batch: list[dict], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    cond = torch.tensor(np.stack([r["rep"] for r in batch]))
    fast = candidate_scores(m, batch, PAD, answer_ids, cond, device)
    slow = candidate_scores_full(m, batch, PAD, answer_ids, cond, device)
    return fast, slow


@pytest.mark.parametrize("mode", ["reclora", "ilora", "plain"])
def test_cached_prefix_scores_equal_full_sequences(mode):
    m = model(mode)
    batch = rows(4, 7, hybrid=mode == "ilora")
    fast, slow = both(m, batch)
    assert fast.shape == slow.shape == (4, 7)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)
    # Each row's scores depend on that row only (its own prefix and gate): alone equals batched.
    alone = torch.cat([both(m, [r])[0] for r in batch])
    torch.testing.assert_close(alone, fast, atol=1e-4, rtol=0)
    assert not torch.allclose(fast[0], fast[1])  # different prompts, different gates


def test_cached_prefix_runs_two_forwards_per_batch():
    m = model("reclora")
    calls = []
    handle = m.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        both_rows = rows(3, 5, hybrid=False)
        cond = torch.tensor(np.stack([r["rep"] for r in both_rows]))
        candidate_scores(m, both_rows, PAD, answer_ids, cond, "cpu")
    finally:
        handle.remove()
    width = max(len(answer_ids(c)) for r in both_rows for c in r["candidates"])
    assert calls == [(3, max(r["prompt_len"] for r in both_rows)), (15, width)]


def test_candidate_forwards_are_bounded_by_pairs_and_equal():
    m = model("ilora")
    batch = rows(3, 5, hybrid=True, seed=2)
    cond = torch.tensor(np.stack([r["rep"] for r in batch]))
    calls = []
    handle = m.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        small = candidate_scores(m, batch, PAD, answer_ids, cond, "cpu", pairs_per_forward=10)  # 2 rows a forward
    finally:
        handle.remove()
    assert calls == [3, 10, 5]
    torch.testing.assert_close(small, candidate_scores(m, batch, PAD, answer_ids, cond, "cpu"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["reclora", "ilora"])
def test_cached_prefix_through_a_zero3_engine(mode, one_rank_group):
    m = model(mode)
    batch = rows(3, 6, hybrid=mode == "ilora", seed=1)
    want, _ = both(m, batch)
    cond = torch.tensor(np.stack([r["rep"] for r in batch]))
    want_gen = greedy_answers(m, batch, PAD, cond, "cpu", max_new_tokens=4, eos_id=2)
    t = TrainerConfig(batch_size=2, micro_batch_size=2, num_workers=1, zero_stage=3)
    engine, _, _ = eng.build_engine(m, eng.ds_config(t, False, "float32", 1), t, schedule_steps=4)
    assert any(hasattr(p, "ds_id") for p in m.parameters())  # really partitioned
    engine.eval()
    fast, slow = both(engine, batch, one_rank_group)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast, want, atol=1e-4, rtol=0)
    assert torch.equal(greedy_answers(engine, batch, PAD, cond, one_rank_group, max_new_tokens=4, eos_id=2), want_gen)


def greedy_reference(m, row: dict, max_new: int, eos: int) -> list[int]:
    """Greedy decoding of one row, the whole sequence recomputed every step (no cache, no padding)."""
    seq = row["input_ids"][: row["prompt_len"]]
    out: list[int] = []
    cond = torch.tensor([row["rep"]])
    with torch.no_grad():
        for _ in range(max_new):
            ids = torch.tensor([seq])
            extra = {}
            if row.get("item_slots"):
                extra["item_slots"] = torch.tensor(row["item_slots"])
            logits = m(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                position_ids=torch.arange(len(seq)).unsqueeze(0),
                cond=cond,
                use_cache=False,
                **extra,
            ).logits
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
            seq = seq + [nxt]
    return out + [-1] * (max_new - len(out))


@pytest.mark.parametrize("mode", ["reclora", "ilora", "plain"])
def test_greedy_answers_equal_uncached_decoding(mode):
    m = model(mode)
    batch = rows(4, 5, hybrid=mode == "ilora", seed=3)
    cond = torch.tensor(np.stack([r["rep"] for r in batch]))
    # An end token the tiny model actually emits: the first row's 3rd greedy token (so -1 padding is exercised).
    eos = greedy_reference(m, batch[0], 3, eos=-5)[2]
    got = greedy_answers(m, batch, PAD, cond, "cpu", max_new_tokens=6, eos_id=eos)
    want = torch.tensor([greedy_reference(m, r, 6, eos) for r in batch])
    assert got.shape == (4, 6)
    assert torch.equal(got, want)
    first = int((got[0] == eos).nonzero()[0])  # at or before index 2 (the tiny model may repeat tokens)
    assert first <= 2 and (got[0, first + 1 :] == -1).all()
