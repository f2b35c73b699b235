"""Task heads on a causal LM: answer-only LM loss, CTR p(yes), candidate log-likelihood.

Batches are left-padded (recdata.streams.collate), so every answer ends at the last position and the LM
head runs only on the last `max answer length + 1` positions (`logits_to_keep`), never on the prompt.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from recdata.streams import collate

# Candidate scoring: (row, candidate) pairs per forward over the cached prompts (bounds the expanded KV cache).
CANDIDATE_PAIRS_PER_FORWARD = 64
RANDOM_GATE_SEED = 20_240_813  # the random gate inputs (ablation) are a fixed function of the sample id


def random_representations(sample_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """One fixed standard-normal vector per sample id: the same for the sample in every step, epoch, rank and
    resume, and unrelated to the sample's features."""
    rows = [
        np.random.default_rng([RANDOM_GATE_SEED, int(s)]).standard_normal(dim).astype(np.float32)
        for s in sample_ids.tolist()
    ]
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, dim)


def gate_input(batch: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """`batch` with `cond` as the gates should see it: the teacher representation (as collated) or, for
    trainer.lora.gate_input=random, random_representations of the batch's sample ids (same size and device)."""
    if source == "teacher":
        return batch
    if source != "random":
        raise ValueError(f"gate_input must be 'teacher' or 'random', got {source!r}")
    cond = batch["cond"]
    return {**batch, "cond": random_representations(batch["sample_id"], cond.shape[1]).to(cond.device, cond.dtype)}


def _extra_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"item_slots": batch["item_slots"]} if "item_slots" in batch else {}


def _tail_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (token log-probs of the tail [b, K-1], answer mask [b, K-1], tail logits [b, K, V])."""
    ids = batch["input_ids"]
    n = ids.shape[1]
    k = int(batch["answer_len"].max()) + 1
    out = model(
        input_ids=ids,
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        cond=batch["cond"],
        logits_to_keep=k,
        use_cache=False,
        **_extra_of(batch),
    )
    logits = out.logits[:, -k:].float()
    target = ids[:, n - k + 1 :]
    # A short answer's tail reaches back into its prompt, which may hold hybrid slot tokens (ids past the
    # LM head's vocabulary). Those positions are masked out below; gather them at a valid id.
    target = torch.where(target < logits.shape[-1], target, torch.zeros_like(target))
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    pos = torch.arange(n - k + 1, n, device=ids.device).unsqueeze(0)
    mask = pos >= (n - batch["answer_len"]).unsqueeze(1)
    return logp, mask, logits


def answer_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over samples of each sample's mean answer-token NLL; also per-sample NLL and the tail logits."""
    logp, mask, logits = _tail_logprobs(model, batch)
    per_sample = -(logp * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_sample.mean(), per_sample.detach(), logits


def p_yes_from_logits(logits: torch.Tensor, answer_len: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """softmax over the (No, Yes) logits where the answer's first token is predicted."""
    k = logits.shape[1]
    idx = (k - 1 - answer_len).clamp(min=0)
    at = logits[torch.arange(logits.shape[0]), idx]
    two = torch.stack([at[:, no_id], at[:, yes_id]], dim=-1)
    return F.softmax(two.float(), dim=-1)[:, 1]


def _prefill_prompts(model, rows: list[dict], pad_id: int, cond: torch.Tensor, device):
    """The rows' prompts (left-padded, answers cut off) through `model` once, keeping the KV cache and the last
    position's logits: (model output, the collated prompt batch, cond on `device`)."""
    prompts = [
        {
            "input_ids": r["input_ids"][: r["prompt_len"]],
            "prompt_len": r["prompt_len"],
            "label": None,
            "rep": r["rep"],
            "sample_id": r["sample_id"],
            "item_slots": r.get("item_slots"),
        }
        for r in rows
    ]
    b = {k: v.to(device) for k, v in collate(prompts, pad_id).items()}
    cond = cond.to(device)
    out = model(
        input_ids=b["input_ids"],
        attention_mask=b["attention_mask"],
        position_ids=b["position_ids"],
        cond=cond,
        logits_to_keep=1,
        use_cache=True,
        **_extra_of(b),
    )
    return out, b, cond


@torch.no_grad()
def candidate_scores(
    model,
    rows: list[dict],
    pad_id: int,
    answer_ids_of,
    cond: torch.Tensor,
    device,
    pairs_per_forward: int = CANDIDATE_PAIRS_PER_FORWARD,
) -> torch.Tensor:
    """Mean log-likelihood of each candidate title as the answer: [num_rows, num_candidates].

    The (left-padded) prompts of all rows run once, keeping their KV cache and the logits of the last prompt
    position (which predict every candidate's first token). Then the (row, candidate) pairs' titles run as
    right-padded continuations of their row's cached prefix (cache rows selected per pair, positions continuing
    the prompt's, mask = prompt mask + title mask), a group of whole rows per forward: about `pairs_per_forward`
    pairs, which bounds the expanded cache's memory. The number of forwards depends only on len(rows) and the
    largest candidate count, so ranks evaluating equal-sized batches of 20-candidate rows run the same number
    (ZeRO-3 forwards are collective). The gate input is per sequence (each pair repeats its row's `cond`);
    hybrid item slots occur only in the prompt. Equal to `candidate_scores_full` (one full sequence per
    candidate, the prompt recomputed each time) within float rounding.
    """
    out, b, cond = _prefill_prompts(model, rows, pad_id, cond, device)
    first_logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [rows, V]: predicts each title's 1st token
    prefix = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    prompt_len = b["attention_mask"].sum(1)
    no_slots = {"item_slots": b["item_slots"][:0]} if "item_slots" in b else {}
    answers = [[list(answer_ids_of(c)) for c in r["candidates"]] for r in rows]
    per_forward = max(1, pairs_per_forward // max(len(a) for a in answers))
    scores: list[torch.Tensor] = []
    for start in range(0, len(rows), per_forward):
        group = answers[start : start + per_forward]
        counts = [len(a) for a in group]
        row_of = (start + torch.repeat_interleave(torch.arange(len(group)), torch.tensor(counts))).to(device)
        flat = [a for per_row in group for a in per_row]
        if any(len(a) == 0 for a in flat):
            raise ValueError("candidate_scores: a candidate has an empty answer")
        width = max(len(a) for a in flat)
        ids = torch.full((len(flat), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(flat), width), dtype=torch.long)
        for j, a in enumerate(flat):
            ids[j, : len(a)] = torch.tensor(a, dtype=torch.long)
            mask[j, : len(a)] = 1
        ids, mask = ids.to(device), mask.to(device)
        cache = DynamicCache([(k[row_of], v[row_of]) for k, v in prefix])  # each pair continues its row's prefix
        logits = model(
            input_ids=ids,
            attention_mask=torch.cat([b["attention_mask"][row_of], mask], dim=1),
            position_ids=prompt_len[row_of].unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0),
            cond=cond[row_of],
            past_key_values=cache,
            use_cache=True,
            **no_slots,
        ).logits.float()
        first = first_logp[row_of].gather(-1, ids[:, :1]).squeeze(-1)
        rest = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        scores.extend(((first + (rest * mask[:, 1:]).sum(1)) / mask.sum(1)).split(counts))
    return torch.stack(scores)


@torch.no_grad()
def greedy_answers(
    model, rows: list[dict], pad_id: int, cond: torch.Tensor, device, max_new_tokens: int, eos_id: int
) -> torch.Tensor:
    """Greedy decoding of every row's answer from its (left-padded) prompt: [num_rows, max_new_tokens] token ids,
    -1 after a row's end-of-answer token. The prompts run once with their KV cache, then one token per forward,
    always `max_new_tokens` of them (ZeRO-3 forwards are collective: every rank runs the same number). The gate
    input is per sequence; hybrid item slots occur only in the prompt. LLaRA's generation metric
    (recdata.metrics.generation_metrics) reads the decoded text."""
    out, b, cond = _prefill_prompts(model, rows, pad_id, cond, device)
    cache, mask = out.past_key_values, b["attention_mask"]
    pos = mask.sum(1, keepdim=True)
    no_slots = {"item_slots": b["item_slots"][:0]} if "item_slots" in b else {}
    tokens = []
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].float().argmax(-1)
        tokens.append(torch.where(done, torch.full_like(nxt, -1), nxt))
        done |= nxt == eos_id
        if step + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(
            input_ids=nxt.unsqueeze(1),
            attention_mask=mask,
            position_ids=pos + step,
            cond=cond,
            past_key_values=cache,
            use_cache=True,
            **no_slots,
        )
        cache = out.past_key_values
    return torch.stack(tokens, 1) if tokens else torch.zeros(len(rows), 0, dtype=torch.long, device=device)


@torch.no_grad()
def candidate_scores_full(
    model, rows: list[dict], pad_id: int, answer_ids_of, cond: torch.Tensor, device
) -> torch.Tensor:
    """Reference for `candidate_scores`: one batched forward of every full sequence (prompt + title) per row,
    the prompt recomputed for each candidate. Kept for the equivalence tests and bench/candidate_scores.py."""

    scores = []
    for i, r in enumerate(rows):
        prompt = r["input_ids"][: r["prompt_len"]]
        seqs = []
        for cand in r["candidates"]:
            ans = answer_ids_of(cand)
            seqs.append(
                {
                    "input_ids": prompt + ans,
                    "prompt_len": len(prompt),
                    "label": None,
                    "rep": r["rep"],
                    "sample_id": r["sample_id"],
                    "item_slots": r.get("item_slots"),
                }
            )
        b = {k: v.to(device) for k, v in collate(seqs, pad_id).items()}
        b["cond"] = cond[i : i + 1].expand(len(seqs), -1).to(device)
        logp, mask, _ = _tail_logprobs(model, b)
        scores.append((logp * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.stack(scores)
