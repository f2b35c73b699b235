"""PredictWorker: answers tasks of prediction requests (trainer/predict.py plans them, docs/predict.md).

Each request goes through the path the run was trained and evaluated on: its sample record by the
samples' own retrieval options (retrieval.requests), the frozen teacher's representation and score, the
prompt and its tokens (retrieval.encoding.encode_rows), then the base LLM with the run's personalized
adapter. Plain Python: runs in-process or as a Ray actor (through the runner the driver is given).
"""

from __future__ import annotations

import io
import json
import posixpath
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from configs.loader import validate
from recdata import storage
from recdata.model_source import load_kwargs, tokenizer_dir
from recdata.samples import BuildOptions
from recdata.streams import collate
from retrieval.encoding import PromptEncoder, answer_token_ids, encode_rows
from retrieval.history import load_item_vectors
from retrieval.prompts import PromptRenderer, style_for
from retrieval.requests import RequestRetriever
from teacher.features import Encoder
from teacher.model_io import load_teacher, pick_device, to_tensors
from teacher.score import RepsError, check_rep_dim
from trainer.hybrid import CANDIDATE_TOKEN, HISTORY_TOKEN, TEXT_FALLBACK, HybridLM
from trainer.lora import load_personalized
from trainer.objective import answer_loss, candidate_scores, p_yes_from_logits
from trainer.prepare import worker_model_dir
from trainer.requests_io import COMMITS, PredictInputError, marker_name, output_schema, part_name


class PredictWorker:
    """Answers one task of requests per `run(task)`. Plain Python: in-process or a Ray actor (cluster.pool).
    Loads the retrieval inputs, the teacher, the tokenizer and base LLM + adapter once."""

    def __init__(
        self,
        config: dict[str, Any],
        inputs: dict[str, Any],
        out_url: str,
        fingerprint: str,
        batch_size: int = 16,
        device: str = "auto",
        num_threads: int = 1,
        s3_endpoint: str | None = None,
        return_cond: bool = False,
    ):
        import torch
        from transformers import AutoTokenizer

        cfg = validate(config)
        storage.configure(cfg.storage.endpoint_url, cfg.storage.region, cfg.storage.anon or None)
        if s3_endpoint and not cfg.storage.endpoint_url:
            storage.configure(endpoint_url=s3_endpoint, region=cfg.storage.region, anon=cfg.storage.anon or None)
        torch.set_num_threads(max(1, int(num_threads)))
        self.cfg, self.out_url, self.fingerprint, self.batch_size = cfg, out_url, fingerprint, int(batch_size)
        self.task_kind = cfg.data.task
        self.device = pick_device(device)
        self.retriever, self.teacher, self.encoder_t = load_teacher_side(cfg, inputs, self.device)

        # The model reference, resolved on this actor's node (tokenizer files only).
        tok_dir = tokenizer_dir(inputs["model_dir"], tiny=cfg.model.tiny is not None, model_cfg=cfg.model)
        tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=cfg.model.trust_remote_code)
        hybrid = cfg.trainer.hybrid_item_emb
        self.slot_ids: tuple[int, ...] = ()
        overrides = {}
        if hybrid:
            # As in training: placeholder tokens after each title, swapped for projected item embeddings.
            tok.add_special_tokens({"additional_special_tokens": [HISTORY_TOKEN, CANDIDATE_TOKEN]})
            self.slot_ids = tuple(tok.convert_tokens_to_ids([HISTORY_TOKEN, CANDIDATE_TOKEN]))
            overrides = {"history_token": HISTORY_TOKEN, "candidate_token": CANDIDATE_TOKEN}
        ds = self.retriever.dataset
        self.renderer = PromptRenderer(
            ds.read_items(),
            cfg.data.task,
            style_for(cfg.data.domain, cfg.data.prompt.model_dump(), **overrides),
            ds.read_users(),
        )
        self.encoder = PromptEncoder(tok, cfg.model.max_length)
        self._answers: dict[int, list[int]] = {}
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = answer_token_ids(tok, cfg.data.task)
        self.yes_id, self.no_id = ids.get("Yes"), ids.get("No")
        # CTR prompts get the budget of the longer answer, so truncation does not depend on an unknown label.
        if cfg.data.task == "ctr":
            self.budget_label = 1 if len(self.encoder.answer_ids("Yes.")) >= len(self.encoder.answer_ids("No.")) else 0

        fallback = tok(TEXT_FALLBACK, add_special_tokens=False)["input_ids"][0] if hybrid else None
        self.model = load_model(cfg, inputs, self.device, slot_ids=self.slot_ids, fallback_id=fallback)
        self.fs, self.root = storage.get_fs(out_url)
        self.return_cond = bool(return_cond)
        self.schema = output_schema(cfg.data.task, return_cond=self.return_cond)

    # ---- one task
    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        k = int(task["part"])
        marker_url = storage.join(self.out_url, COMMITS, marker_name(k))
        marker = posixpath.join(self.root, COMMITS, marker_name(k))
        with storage.storage_errors(self.out_url):
            if self.fs.exists(marker):
                done = json.loads(self.fs.cat_file(marker).decode("utf-8"))
                if done.get("fingerprint") != self.fingerprint:
                    raise PredictInputError(
                        f"{marker_url}: committed by a prediction with other inputs; use a new --out or --overwrite"
                    )
                return {**done, "skipped": True}
        t0 = time.perf_counter()
        table, counts = self.predict_rows(int(task["shard"]), task["rows"])
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        info = {
            "part": k,
            "path": part_name(k),
            "rows": table.num_rows,
            "fingerprint": self.fingerprint,
            "reasons": counts["reasons"],
            "predicted": counts["predicted"],
            "history_truncated": counts["history_truncated"],
            "prompt_truncated": counts["prompt_truncated"],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        # Both under a temporary name, then renamed (storage's atomic write). The marker is the commit point:
        # written only when the part is complete at its final name.
        storage.write_bytes_atomic(storage.join(self.out_url, part_name(k)), buf.getvalue())
        storage.write_json_atomic(marker_url, info)
        return {**info, "skipped": False}

    def predict_rows(self, shard: int, rows: dict[str, list]) -> tuple[pa.Table, dict[str, Any]]:

        n = len(rows["request_index"])
        reasons = list(rows["reason"])
        out: dict[str, list] = {f.name: [None] * n for f in self.schema}
        out["request_index"] = list(rows["request_index"])
        out["user_id"], out["item_id"], out["timestamp"] = (
            list(rows["user_id"]),
            list(rows["item_id"]),
            list(rows["timestamp"]),
        )
        todo = [j for j in range(n) if reasons[j] is None]
        counts = {"history_truncated": 0, "prompt_truncated": 0}
        if todo:
            rec = self.retriever.records(
                shard,
                [rows["user_id"][j] for j in todo],
                [rows["item_id"][j] for j in todo],
                [rows["timestamp"][j] for j in todo],
                [rows["candidates"][j] for j in todo] if self.task_kind == "next_item" else None,
            )
            for j, r in zip(todo, rec.reasons):
                reasons[j] = r
            pos = [todo[int(i)] for i in rec.rows]  # task row of each record
            if pos:
                records = rec.table.to_pylist()
                reps, scores, cand_scores = self._teacher(rec.table)
                _, unk_u = self.teacher.space.users.lookup(rec.table["user_id"].to_numpy())
                _, unk_i = self.teacher.space.items.lookup(rec.table["item_id"].to_numpy())
                # Tokens exactly as the trainer's feed makes them; CTR records carry a stand-in label only
                # to size the answer (p(yes) is read before the first answer token).
                enc_in = [{**r, "label": self.budget_label} for r in records] if self.task_kind == "ctr" else records
                stream, c = encode_rows(enc_in, reps, scores, self.renderer, self.encoder, self.slot_ids)
                counts["history_truncated"] += int(c.get("history_truncated", 0))
                counts["prompt_truncated"] += int(c.get("prompt_truncated", 0))
                preds = self._llm(stream.to_pylist())
                for q, j in enumerate(pos):
                    r = records[q]
                    out["sample_id"][j] = r["sample_id"]
                    out["label"][j] = r["label"]
                    out["hist_len"][j] = r["hist_len"]
                    out["cold_user"][j] = bool(unk_u[q]) if self.task_kind == "ctr" else None
                    out["cold_item"][j] = bool(unk_i[q])
                    out["teacher_score"][j] = float(scores[q])
                    if self.return_cond:
                        out["cond"][j] = reps[q].tolist()
                    if self.task_kind == "ctr":
                        out["p_yes"][j] = float(preds[q])
                    else:
                        cands = r["candidates"]
                        sc = [float(x) for x in preds[q]]
                        order = np.argsort(-np.asarray(sc, dtype=np.float64), kind="stable")
                        out["candidates"][j] = cands
                        out["scores"][j] = sc
                        out["ranking"][j] = [int(cands[i]) for i in order]
                        out["predicted_item"][j] = int(cands[order[0]])
                        out["target_rank"][j] = int(np.flatnonzero(order == cands.index(r["item_id"]))[0]) + 1
                        if cand_scores[q] is not None:
                            out["teacher_candidate_scores"][j] = [float(x) for x in cand_scores[q]]
        out["reason"] = reasons
        table = pa.Table.from_arrays([pa.array(out[f.name], type=f.type) for f in self.schema], schema=self.schema)
        counts["reasons"] = dict(sorted(Counter(r for r in reasons if r is not None).items()))
        counts["predicted"] = sum(r is None for r in reasons)
        return table, counts

    def _teacher(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray, list | None]:
        return teacher_outputs(self.teacher, self.encoder_t, table, self.task_kind, self.device)

    def _llm(self, srows: list[dict[str, Any]]) -> list:
        """evaluate()'s computation, batched by prompt length (less padding); results in row order."""
        import torch

        order = sorted(range(len(srows)), key=lambda i: len(srows[i]["input_ids"]))
        res: list = [None] * len(srows)
        with torch.no_grad():
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                rows = [srows[i] for i in idx]
                batch = {k: v.to(self.device) for k, v in collate(rows, self.pad_id).items()}
                if self.task_kind == "ctr":
                    _, _, logits = answer_loss(self.model, batch)
                    p = p_yes_from_logits(logits, batch["answer_len"], self.yes_id, self.no_id).double().cpu().numpy()
                    for i, v in zip(idx, p):
                        res[i] = float(v)
                else:
                    # One forward per request over its candidates (as evaluate does); lists may differ in length.
                    for q, i in enumerate(idx):
                        sc = candidate_scores(
                            self.model, [rows[q]], self.pad_id, self._answer_ids, batch["cond"][q : q + 1], self.device
                        )
                        res[i] = sc[0].float().cpu().numpy().tolist()
        return res

    def _answer_ids(self, item_id: int) -> list[int]:
        # The trainer's answer for an item: its title (prepare.py's answer_ids), then end of turn.
        if item_id not in self._answers:
            self._answers[item_id] = self.encoder.answer_ids(self.renderer.title(int(item_id)))
        return self._answers[item_id]


def load_teacher_side(cfg: Any, inputs: dict[str, Any], device: Any) -> tuple[RequestRetriever, Any, Encoder]:
    """What turns a (user, item, time) request into the gate input: the request retriever with the samples' own
    options, the frozen teacher and its feature encoder."""
    opts = BuildOptions.from_dict(inputs["options"])
    vectors = (
        load_item_vectors(inputs["embeddings"], normalize=opts.metric == "cosine") if opts.needs_embeddings else None
    )
    retriever = RequestRetriever(inputs["dataset"], opts, vectors)
    teacher = load_teacher(inputs["teacher"], device)
    check_rep_dim(teacher.rep_dim, cfg.teacher.rep_dim, inputs["teacher"])
    return retriever, teacher, Encoder(teacher.space, teacher.cfg.max_hist, teacher.cfg.task)


def teacher_outputs(teacher, encoder, table: pa.Table, task: str, device) -> tuple[np.ndarray, np.ndarray, list | None]:
    """The frozen teacher's representation (the gate input: `cond`), score and (next item) candidate scores of each
    record, in record order."""
    import torch

    n = table.num_rows
    # The encoder needs equal-length candidate lists in one batch: group next-item rows by length.
    if task == "next_item":
        lens = np.array([len(c) for c in table["candidates"].to_pylist()])
        groups = [np.flatnonzero(lens == L) for L in np.unique(lens)]
    else:
        groups = [np.arange(n)]
    reps = np.zeros((n, teacher.rep_dim), np.float32)
    scores = np.zeros(n, np.float32)
    cand: list | None = [None] * n if task == "next_item" else None
    with torch.inference_mode():
        for g in groups:
            enc = encoder.encode(table.take(pa.array(g)), Counter(), where="requests")
            b = to_tensors(enc, device)
            o = teacher.model(b)
            pred = teacher.model.predict(b, o)
            reps[g] = o["rep"].float().cpu().numpy()
            scores[g] = pred["teacher_score"].float().cpu().numpy()
            if cand is not None and "candidate_scores" in pred:
                cs = pred["candidate_scores"].float().cpu().numpy()
                for q, i in enumerate(g):
                    cand[i] = cs[q].tolist()
    bad = ~np.isfinite(reps).all(axis=1) | ~np.isfinite(scores)
    if bad.any():
        key = table["sample_id"][int(np.flatnonzero(bad)[0])].as_py()
        raise RepsError(f"non-finite teacher output for the request with sample key {key}")
    return reps, scores, cand


def load_model(
    cfg: Any,
    inputs: dict[str, Any],
    device: Any,
    *,
    dtype: Any = None,
    slot_ids: tuple[int, ...] = (),
    fallback_id: int | None = None,
) -> Any:
    """The run's base LLM with its personalized adapter (and hybrid projector), ready for inference on `device`.

    dtype None = as in training: `model.dtype` on a GPU, float32 on CPU. The whole model is cast to it after the
    adapter is loaded, as DeepSpeed does (`module.bfloat16()`): PEFT upcasts the adapter to fp32 on a bf16 base
    (autocast_adapter_dtype), which would compute the LoRA path in fp32 where training computed it in bf16. The
    gates still compute in fp32 (trainer/gates.py). A CPU caller may ask for bf16 (tests)."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype is None:
        dtype = getattr(torch, cfg.model.dtype) if torch.device(device).type == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(
        worker_model_dir(inputs["model_dir"], cfg.model), dtype=dtype, **load_kwargs(cfg.model)
    )
    base.config.use_cache = False
    with tempfile.TemporaryDirectory() as tmp:
        _download(inputs["adapter"], tmp)
        model = load_personalized(base, tmp)
        if cfg.trainer.hybrid_item_emb:
            from safetensors.torch import load as st_load
            from safetensors.torch import load_file

            fs, path = storage.get_fs(inputs["item_emb"])
            with storage.storage_errors(inputs["item_emb"]):
                table = st_load(fs.cat_file(path))
            model = HybridLM(model, table["item_ids"].numpy(), table["emb"], list(slot_ids), fallback_id)
            model.projector.load_state_dict(load_file(str(Path(tmp) / "projector.safetensors")), strict=True)
            model.hybrid = True  # evaluation uses the full hybrid prompt
    return model.to(device=device, dtype=dtype).eval()


def _download(url: str, dest: str) -> None:
    """Copy the files of a storage folder into a local one (the adapter may live on s3)."""
    fs, path = storage.get_fs(url)
    with storage.storage_errors(url):
        for f in fs.ls(path, detail=False):
            name = posixpath.basename(f.rstrip("/"))
            if name and not name.startswith((".", "_")) and fs.isfile(f):
                Path(dest, name).write_bytes(fs.cat_file(f))
