"""Sample records -> token ids: the prompt rendered (retrieval.prompts) and tokenized with the answer and
the slots for hybrid item tokens, in the stream schema the trainer reads (recdata.streams). The feed
builds training streams with it and batch prediction encodes requests with it, so both see the same tokens."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from recdata.streams import STREAM_SCHEMA, TrainDataError
from retrieval.prompts import PromptError, ctr_answer, next_item_answer


def answer_token_ids(tokenizer, task: str) -> dict[str, int]:
    """Token ids that CTR scoring compares, looked up from the tokenizer (never hard-coded)."""
    if task != "ctr":
        return {}
    ids = {}
    for word in ("Yes", "No"):
        toks = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not toks:
            raise TrainDataError(f"tokenizer produces no token for {word!r}")
        ids[word] = toks[0]
    if ids["Yes"] == ids["No"]:
        raise TrainDataError(
            f"'Yes' and 'No' share their first token ({ids['Yes']}); CTR scoring needs distinct tokens"
        )
    return ids


def end_of_turn_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TrainDataError("tokenizer has no eos token; cannot mark the end of the answer")
    return int(eos)


class PromptEncoder:
    """Chat template + tokenizer, with the history truncated to fit `max_length` (oldest dropped first)."""

    def __init__(self, tokenizer, max_length: int):
        self.tok = tokenizer
        self.max_length = max_length
        self.eos = end_of_turn_id(tokenizer)
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def prompt_ids(self, text: str) -> list[int]:
        if self.has_template:
            out = self.tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        return self.tok(text, add_special_tokens=True)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        return list(self.tok(answer, add_special_tokens=False)["input_ids"]) + [self.eos]

    def count(self, text: str) -> int:
        return len(self.prompt_ids(text))


def encode_rows(
    records: list[dict[str, Any]],
    reps: np.ndarray,
    scores: np.ndarray,
    renderer,
    encoder: PromptEncoder,
    slot_token_ids: tuple[int, ...] = (),
) -> tuple[pa.Table, dict[str, int]]:
    """Rows of the stream for `records` (in that order), one per record: a stream never drops a sample, so
    its row count is known before it is built and the trainer can start on its first parts.

    The history is cut (oldest first) to fit model.max_length; a prompt too long even without history keeps
    its last tokens (the question and target) and is counted as `prompt_truncated`."""

    out: dict[str, list] = {k: [] for k in STREAM_SCHEMA.names if k != "rep"}
    counts = {"history_truncated": 0, "prompt_truncated": 0}
    for rec, score in zip(records, scores):
        answer = encoder.answer_ids(_answer(renderer, rec))
        budget = encoder.max_length - len(answer)
        if budget < 1:
            raise TrainDataError(
                f"sample {rec['sample_id']}: the answer alone needs {len(answer)} tokens, "
                f"model.max_length={encoder.max_length}"
            )
        try:
            rendered = renderer.render(rec, count_tokens=encoder.count, max_tokens=budget)
            prompt = encoder.prompt_ids(rendered.text)
            kept = rendered.kept
            counts["history_truncated"] += int(rendered.truncated)
        except PromptError as e:
            if "without any history" not in str(e):
                raise
            bare = renderer.render({**rec, "text_hist_items": [], "text_hist_ratings": []})
            prompt, kept = encoder.prompt_ids(bare.text)[-budget:], 0
            counts["prompt_truncated"] += 1
            counts["history_truncated"] += int(bool(rec.get("text_hist_items")))
        out["sample_id"].append(rec["sample_id"])
        out["input_ids"].append(prompt + answer)
        out["prompt_len"].append(len(prompt))
        out["label"].append(rec.get("label"))
        out["item_id"].append(rec["item_id"])
        out["candidates"].append(rec.get("candidates"))
        out["teacher_score"].append(float(score))
        out["item_slots"].append(_slots(rec, kept, prompt, slot_token_ids) if slot_token_ids else None)
    arrays = [
        pa.array(out[f.name], type=f.type)
        if f.name != "rep"
        else _rep_array(np.asarray(reps).reshape(len(records), -1))
        for f in STREAM_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=STREAM_SCHEMA), counts


def _slots(rec, kept: int, prompt: list[int], slot_token_ids) -> list[int]:
    """Item ids behind the placeholders, in prompt order: the kept history, then the candidates."""
    hist = list(rec["text_hist_items"] or [])
    slots = hist[len(hist) - kept :] + list(rec.get("candidates") or [])
    n = sum(1 for t in prompt if t in slot_token_ids)
    if n != len(slots):
        raise TrainDataError(f"sample {rec['sample_id']}: {n} placeholder tokens in the prompt but {len(slots)} items")
    return slots


def _answer(renderer, rec) -> str:

    if renderer.task == "ctr":
        if rec.get("label") is None:
            raise TrainDataError(f"sample {rec['sample_id']}: CTR sample without a label")
        return ctr_answer(rec["label"])
    return next_item_answer(renderer.title(rec["item_id"])).rstrip("\n")


def _rep_array(reps: np.ndarray) -> pa.Array:
    flat = pa.array(reps.astype(np.float32).ravel())
    offsets = pa.array(np.arange(0, reps.size + 1, reps.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)
