"""Task heads on a causal LM: answer-only LM loss, CTR p(yes), candidate log-likelihood.

Batches are left-padded (recdata.streams.collate), so every answer ends at the last position and the LM
head runs only on the last `max answer length + 1` positions (`logits_to_keep`), never on the prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recdata.streams import collate


def _tail_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (token log-probs of the tail [b, K-1], answer mask [b, K-1], tail logits [b, K, V])."""
    ids = batch["input_ids"]
    n = ids.shape[1]
    k = int(batch["answer_len"].max()) + 1
    extra = {"item_slots": batch["item_slots"]} if "item_slots" in batch else {}
    out = model(
        input_ids=ids,
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        cond=batch["cond"],
        logits_to_keep=k,
        use_cache=False,
        **extra,
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


@torch.no_grad()
def candidate_scores(model, rows: list[dict], pad_id: int, answer_ids_of, cond: torch.Tensor, device) -> torch.Tensor:
    """Log-likelihood of each candidate title as the answer: [num_rows, num_candidates]."""

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
