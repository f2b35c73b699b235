"""Evaluation of one worker's engine on a whole split, and the collectives that combine ranks.

Every rank scores its strided share of the split, padded so that every rank runs the same number of forwards
(ZeRO-3 forwards are collective); the rows are gathered and scored once. Collective tensors live on the
device they are given: the engine's device (a GPU under nccl, which has no CPU tensors; the CPU under gloo).
"""

from __future__ import annotations

import re
import time

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from configs.logs import get_logger
from recdata import storage
from recdata.metrics import ctr_metrics, generation_metrics, ranking_metrics
from recdata.model_source import tokenizer_dir
from recdata.streams import StreamReader, collate
from trainer.objective import answer_loss, candidate_scores, gate_input, greedy_answers, p_yes_from_logits

log = get_logger(__name__)
PROGRESS_EVERY_S = 60.0  # a long evaluation (a 7B model, a 1,000-sample test set on CPU) logs its progress


def eval_file(run_url: str, split: str, step: int) -> str:
    """{run}/eval/{split}-{step}.json: the per-sample results of the evaluation of `split` after `step` optimizer
    steps (0: zero-shot). Named by step, not by call count, so a resumed run's evaluations never overwrite those of
    the run it resumed."""
    return storage.join(run_url, "eval", f"{split}-{step}.json")


def eval_files(run_url: str, split: str) -> list[tuple[int, dict]]:
    """(step, per-sample results) of every evaluation of `split` in the run, by step."""
    folder = storage.join(run_url, "eval")
    if not storage.exists(folder):
        return []
    fs, path = storage.get_fs(folder)
    fs.invalidate_cache(path)  # written by the training workers, not through this process's listing cache
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    steps = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(rf"{split}-(\d+)\.json", n)))
    return [(s, storage.read_json(eval_file(run_url, split, s))) for s in steps]


def all_reduce_sum(x: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Sum of `x` over ranks, computed on `device` (default: x's own); returned on that device."""
    x = x.to(device) if device is not None else x
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def all_gather_rows(x: torch.Tensor, world: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Rows of every rank's `x` (same shape on every rank), concatenated in rank order, on `device`."""
    x = x.to(device) if device is not None else x
    if not dist.is_initialized() or world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class Evaluator:
    """evaluator(split) -> metrics of `split`; `waited` sums the seconds evaluations spent waiting for feed
    parts (a zero-shot evaluation may run while the feed is still building the test split). With `trackers`
    (trainer.tracking.Trackers) and a `step`, the metrics also go to the trackers as `{tag or split}/{name}`."""

    def __init__(self, engine, pm, params: dict, rank: int, world: int, device: torch.device, trackers=None):
        self.engine, self.pm, self.params = engine, pm, params
        self.rank, self.world, self.device = rank, world, device
        self.trackers = trackers
        self.waited = 0.0
        self.tokenizer = None  # loaded on the first generation metric (next item)

    def __call__(self, split: str, step: int | None = None, tag: str | None = None) -> dict[str, float]:
        reader = StreamReader(self.params["streams"][split], timeout_s=self.params.get("feed_timeout_s", 3600.0))
        try:
            out, rows = self.score(reader, split)
        finally:
            self.waited += reader.waited
            reader.close()
        # Per-sample results of every evaluation, for paired comparisons on the same samples (bench/quality.py).
        if self.rank == 0 and self.params.get("run_url"):
            url = eval_file(self.params["run_url"], split, 0 if step is None else step)
            storage.write_json_atomic(url, {"metrics": out, **rows})
        if self.trackers is not None and step is not None:
            self.trackers.log_metrics({f"{tag or split}/{name}": v for name, v in out.items()}, step)
        return out

    def score(self, reader: StreamReader, split: str = "") -> tuple[dict[str, float], dict[str, list]]:
        """(metrics, per-sample rows): CTR sample_id, label, p_yes, teacher_score; next item sample_id,
        target index, candidate scores."""
        params, engine, device = self.params, self.engine, self.device
        n = reader.rows
        per_rank = -(-n // self.world)
        idx = np.arange(self.rank, per_rank * self.world, self.world)  # padded: indices >= n repeat row 0, dropped
        valid = idx < n
        idx = np.where(valid, idx, 0)
        # Bucketed by length within this rank's share (fewer padding tokens; the same rows and the same number
        # of forwards on every rank). Rows and their `valid` flags move together; the metrics are order-free.
        order = np.argsort(reader.lengths_at(idx), kind="stable")
        idx, valid = idx[order], valid[order]
        bs = params["eval_batch_size"]
        if hasattr(self.pm, "hybrid"):
            self.pm.hybrid = True  # evaluate with the full hybrid prompt
        engine.eval()
        rows_out = []
        t0 = last = time.perf_counter()
        with torch.no_grad():
            for s in range(0, len(idx), bs):
                if self.rank == 0 and s and time.perf_counter() - last >= PROGRESS_EVERY_S:
                    last = time.perf_counter()
                    log.info("[eval] %s: %d/%d rows on rank 0 (%.2f rows/s)", split, s, len(idx), s / (last - t0))
                rows = reader.rows_at(idx[s : s + bs])
                batch = gate_input(collate(rows, params["pad_id"]), getattr(self.pm.config, "gate_input", "teacher"))
                batch = {k: v.to(device) for k, v in batch.items()}
                if params["task"] == "ctr":
                    _, nll, logits = answer_loss(engine, batch)
                    p = p_yes_from_logits(logits, batch["answer_len"], params["yes_id"], params["no_id"])
                    teacher = torch.tensor(
                        [np.nan if r.get("teacher_score") is None else r["teacher_score"] for r in rows]
                    )
                    cols = [batch["label"].cpu(), p.cpu(), nll.cpu(), batch["sample_id"].cpu(), teacher]
                    rows_out.append(torch.stack([c.double() for c in cols], 1))
                else:
                    sc = candidate_scores(
                        engine, rows, params["pad_id"], lambda c: params["answer_ids"][str(c)], batch["cond"], device
                    )
                    target = torch.tensor([r["candidates"].index(r["item_id"]) for r in rows], dtype=torch.float64)
                    sid = batch["sample_id"].double().cpu()
                    cols = [target.unsqueeze(1), sid.unsqueeze(1), sc.double().cpu()]
                    if params.get("titles"):  # candidate ids and greedy answer tokens (exact as float64)
                        cols.append(torch.tensor([r["candidates"] for r in rows], dtype=torch.float64))
                        gen = greedy_answers(
                            engine, rows, params["pad_id"], batch["cond"], device,
                            params["gen_max_new_tokens"], params["eos_id"],
                        )  # fmt: skip
                        cols.append(gen.double().cpu())
                    rows_out.append(torch.cat(cols, 1))
        engine.train()
        if self.rank == 0:
            took = time.perf_counter() - t0
            log.info("[eval] %s: %d rows on rank 0 in %.1fs (%.2f rows/s)", split, len(idx), took, len(idx) / took)
        mine = torch.cat(rows_out) if rows_out else torch.zeros(0, 5, dtype=torch.float64)
        mine = torch.cat([torch.from_numpy(valid.astype(np.float64)).unsqueeze(1), mine], 1)
        allrows = all_gather_rows(mine, self.world, device).cpu()
        allrows = allrows[allrows[:, 0] > 0][:, 1:].numpy()
        if params["task"] == "ctr":
            out = ctr_metrics(allrows[:, 0].astype(int), allrows[:, 1])
            out["answer_nll"] = float(allrows[:, 2].mean())
            rows = {
                "sample_id": allrows[:, 3],
                "label": allrows[:, 0],
                "p_yes": allrows[:, 1],
                "teacher": allrows[:, 4],
            }
        else:
            c = (allrows.shape[1] - 2 - params.get("gen_max_new_tokens", 0)) // (2 if params.get("titles") else 1)
            out = ranking_metrics(allrows[:, 2 : 2 + c], allrows[:, 0].astype(int))
            rows = {"sample_id": allrows[:, 1], "target": allrows[:, 0], "scores": allrows[:, 2 : 2 + c]}
            if params.get("titles"):
                gen, texts = self.generation(allrows[:, 2 + c : 2 + 2 * c], allrows[:, 2 + 2 * c :], allrows[:, 0])
                out.update({f"gen_{k}": v for k, v in gen.items() if k != "n"})
                rows["generated"] = np.asarray(texts, dtype=object)
        out["n"] = float(len(allrows))
        order = np.argsort(rows["sample_id"], kind="stable")
        rows = {k: v[order] for k, v in rows.items()}
        rows["sample_id"] = rows["sample_id"].astype(np.int64)
        if "teacher" in rows:
            rows["teacher"] = np.nan_to_num(rows["teacher"], nan=-1.0)  # -1: no teacher score stored
        return out, {k: v.tolist() for k, v in rows.items()}

    def generation(self, cands: np.ndarray, tokens: np.ndarray, target: np.ndarray) -> tuple[dict, list[str]]:
        """LLaRA's generation metric of the gathered rows: the greedy answers decoded (up to the end token) and
        matched against the rows' candidate titles; also the decoded answers, for the per-sample results."""
        if self.tokenizer is None:
            m = self.params["config"]["model"]
            self.tokenizer = AutoTokenizer.from_pretrained(
                tokenizer_dir(self.params["model_dir"], tiny=m.get("tiny") is not None, model_cfg=m),
                trust_remote_code=bool(m.get("trust_remote_code")),
            )
        titles, eos = self.params["titles"], self.params["eos_id"]
        texts = []
        for row in tokens.astype(np.int64):
            ids = [int(t) for t in row if t >= 0]
            ids = ids[: ids.index(eos)] if eos in ids else ids
            texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        cand_titles = [[titles[str(int(i))] for i in row] for row in cands]
        targets = [ct[int(t)] for ct, t in zip(cand_titles, target)]
        return generation_metrics(texts, cand_titles, targets), texts
