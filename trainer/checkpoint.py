"""Checkpoints: plain, explicit, world-size independent, and never pickled.

    {run}/checkpoints/step-00000040/
        rank-00000-of-00002.safetensors    this rank's share of the trainable state: for each parameter
        rank-00001-of-00002.safetensors    it owns (parameter i -> rank i % world), the full fp32 value and
                                           its optimizer moments ("<name>::param", "::exp_avg", ...)
        rank-00000.json                    per-rank metadata: RNG states, data cursor, its shard's checksum
        meta.json                          step, optimizer step count, config fingerprint, metrics (the LR
                                           schedule is a function of the step and is rebuilt from it), and
                                           "files": {name: {sha256, bytes}} for every file above
        COMPLETE                           written last, by rank 0, after every rank's files are on storage;
                                           holds the sha256 of meta.json

Only trainable tensors (adapter, gates, projector) are saved; the frozen base never is. Because every
parameter is stored whole, a checkpoint written by N workers loads on M workers. A folder without
COMPLETE (a crash mid-save) is skipped, so the previous checkpoint stays the latest.

Integrity: every file's sha256 (recdata.storage.sha256_file, streamed) is recorded at save time.
`latest_complete` checks presence and sizes (cheap: a truncated shard is skipped); `load` checks every
checksum and names the bad file; `load_latest` (what a resuming worker calls) falls back to the previous
complete checkpoint with a warning naming it. Saving into a folder that already holds COMPLETE removes
the marker before any file is replaced, so no file ever changes under a live marker.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save_file as st_save_file

from configs.errors import RecloraError
from recdata import storage

_STEP_DIR = re.compile(r"step-(\d{8})$")
MARKER = "COMPLETE"
META = "meta.json"
CHECKSUMS = "checksums"  # key of a rank's JSON: {its tensor file: {sha256, bytes}}


class CheckpointError(RecloraError, RuntimeError):
    """A checkpoint cannot be used (incompatible config, missing files); the message says why."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is missing, truncated or altered since it was saved; `path` names it."""

    def __init__(self, path: str, why: str):
        super().__init__(
            f"{path}: {why}; this checkpoint is damaged: resume from an earlier one (--resume URL) or a new run.name"
        )
        self.path = path


def step_dir(run_url: str, step: int) -> str:
    return storage.join(run_url, "checkpoints", f"step-{step:08d}")


def config_fingerprint(parts: dict[str, Any]) -> str:
    """Hash of the config parts a checkpoint's tensors depend on (model, adapter shape, task)."""
    return storage.digest(parts)


def list_checkpoints(run_url: str) -> list[tuple[int, str, bool]]:
    """(step, url, complete) for every step folder, oldest first."""
    root = storage.join(run_url, "checkpoints")
    fs, path = storage.get_fs(root)
    with storage.storage_errors(root):
        if not fs.exists(path):
            return []
        entries = fs.ls(path, detail=False)
    out = []
    for e in entries:
        m = _STEP_DIR.search(e.rstrip("/"))
        if m:
            url = storage.join(root, m.group(0))
            out.append((int(m.group(1)), url, storage.exists(storage.join(url, MARKER))))
    return sorted(out)


def latest_complete(run_url: str, deep: bool = False) -> str | None:
    """The newest checkpoint whose files are all present with their recorded sizes (deep=True: checksums
    too); partial and damaged ones are skipped with a warning naming the folder and the file."""
    for step, url, complete in reversed(list_checkpoints(run_url)):
        if not complete:
            warnings.warn(
                f"skipping incomplete checkpoint {url} (no {MARKER} marker: a crash during save?)", stacklevel=2
            )
            continue
        try:
            verify(url, deep=deep)
        except CheckpointError as e:
            warnings.warn(f"skipping corrupt checkpoint {url}: {e}", stacklevel=2)
            continue
        return url
    return None


def verify(url: str, deep: bool = True) -> dict[str, Any]:
    """meta.json of a complete checkpoint after checking its files against the checksums recorded at save
    time: presence and size always, sha256 when deep. CorruptCheckpointError names the first bad file.
    Checkpoints saved before checksums existed (no "files" in meta.json) get the presence check only."""
    marker_url, meta_url = storage.join(url, MARKER), storage.join(url, META)
    if not storage.exists(marker_url):
        raise CheckpointError(f"{url}: no {MARKER} marker (incomplete)")
    fs, path = storage.get_fs(marker_url)
    with storage.storage_errors(marker_url), fs.open(path, "rb") as f:
        marker = f.read()
    if not storage.exists(meta_url):
        raise CorruptCheckpointError(meta_url, "missing")
    if marker.strip() != b"ok":  # legacy markers hold "ok"; current ones the checksum of meta.json
        try:
            want = json.loads(marker.decode())[META]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(marker_url, f"unreadable marker ({e})") from None
        if storage.sha256_file(meta_url) != want:
            raise CorruptCheckpointError(meta_url, "sha256 differs from the one recorded in the COMPLETE marker")
    try:
        meta = storage.read_json(meta_url)
        world = int(meta["world_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(meta_url, f"unreadable ({type(e).__name__}: {e})") from None
    files = meta.get("files")
    if files is None:
        for r in range(world):
            for name in (_rank_tensors(r, world), _rank_json(r)):
                if not storage.exists(storage.join(url, name)):
                    raise CorruptCheckpointError(storage.join(url, name), "missing")
        return meta
    for name, rec in sorted(files.items()):
        f = storage.join(url, name)
        fs, path = storage.get_fs(f)
        with storage.storage_errors(f):
            if not fs.exists(path):
                raise CorruptCheckpointError(f, "missing")
            size = fs.size(path)
        if size != rec["bytes"]:
            raise CorruptCheckpointError(f, f"{size} bytes, {rec['bytes']} were saved (truncated or overwritten)")
        if deep and storage.sha256_file(f) != rec["sha256"]:
            raise CorruptCheckpointError(f, "sha256 differs from the one recorded at save time (altered)")
    return meta


def _rank_tensors(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.safetensors"


def _rank_json(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def _file_record(url: str) -> dict[str, Any]:
    fs, path = storage.get_fs(url)
    with storage.storage_errors(url):
        size = fs.size(path)
    return {"sha256": storage.sha256_file(url), "bytes": int(size)}


def rng_state() -> dict[str, str]:
    import random

    import numpy as np

    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": json.dumps(random.getstate(), default=list),
        "numpy": json.dumps(_np_state(np.random.get_state())),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _np_state(s) -> list:
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def set_rng_state(state: dict[str, str]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = json.loads(state["numpy"])
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


@dataclass
class TrainState:
    """What a worker needs to continue exactly where a checkpoint left off."""

    step: int
    tensors: dict[str, torch.Tensor]  # "<param>::param" / "<param>::exp_avg" / "<param>::exp_avg_sq"
    meta: dict[str, Any]
    rank_meta: dict[str, Any] | None  # this rank's RNG and cursor (None when the world size changed)


def staging_dir(run_url: str, step: int, rank: int) -> str:
    """A fresh node-local folder for one rank's checkpoint share: RECLORA_STAGING_DIR (e.g. a node's local
    NVMe on a cluster) or the system temp folder."""
    root = os.environ.get("RECLORA_STAGING_DIR") or tempfile.gettempdir()
    run = storage.digest(run_url, 12)
    path = os.path.join(root, "reclora-staging", run, f"step-{step:08d}-rank-{rank:05d}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def save(
    run_url: str,
    step: int,
    rank: int,
    world: int,
    my_tensors: dict[str, torch.Tensor],
    rank_meta: dict,
    meta: dict | None,
    barrier,
) -> str:
    """Collective save. Every rank writes its tensor share and metadata; after a barrier, rank 0 writes
    meta.json (with every file's checksum) and then the COMPLETE marker, so the checkpoint is visible only
    when whole. A step folder that is already complete (a final save repeated after a resume) loses its
    marker first: no rank replaces a file before rank 0 has removed it (one extra barrier)."""
    url = step_dir(run_url, step)
    marker = storage.join(url, MARKER)
    if rank == 0:
        storage.rm(marker)
    barrier()
    # Each rank stages its share on node-local disk first, then uploads the file: the serialized copy never
    # sits in memory beside the tensors, and a slow or failed upload leaves the training state untouched.
    staging = staging_dir(run_url, step, rank)
    name = _rank_tensors(rank, world)
    local = os.path.join(staging, name)
    try:
        st_save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in my_tensors.items()}, local)
        record = _file_record(local)
        storage.upload_file_atomic(local, storage.join(url, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    storage.write_json_atomic(storage.join(url, _rank_json(rank)), {**rank_meta, CHECKSUMS: {name: record}})
    barrier()
    if rank == 0:
        assert meta is not None
        files: dict[str, dict[str, Any]] = {}
        for r in range(world):
            rj = storage.join(url, _rank_json(r))
            files[_rank_json(r)] = _file_record(rj)
            files.update(storage.read_json(rj)[CHECKSUMS])
        meta_url = storage.join(url, META)
        storage.write_json_atomic(meta_url, dict(meta, step=step, world_size=world, files=files))
        storage.write_json_atomic(marker, {META: storage.sha256_file(meta_url)})
    barrier()
    return url


def prune(run_url: str, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` complete checkpoints (and older incomplete ones)."""
    ckpts = list_checkpoints(run_url)
    complete = [c for c in ckpts if c[2]]
    if len(complete) <= keep_last:
        return []
    cutoff = complete[-keep_last][0]
    removed = []
    for step, url, _ in ckpts:
        if step < cutoff:
            storage.rm(url)
            removed.append(url)
    return removed


def check_compatible(url: str, parts: dict[str, Any]) -> dict[str, Any]:
    """meta.json of a checkpoint, or CheckpointError naming the settings that changed (model, adapter
    shape, task: what the saved tensors depend on). Learning rate and step counts may change."""
    meta = storage.read_json(storage.join(url, "meta.json"))
    saved = meta.get("fingerprint_parts", {})
    if meta.get("fingerprint") != config_fingerprint(parts):
        now = json.loads(json.dumps(parts, default=str))
        changed = _diff(json.loads(json.dumps(saved, default=str)), now)
        raise CheckpointError(
            f"cannot resume from {url}: it was written with different {', '.join(changed) or 'settings'} "
            f"({'; '.join(f'{k}: {saved.get(k)!r} -> {now.get(k)!r}' for k in changed[:4])}). "
            f"Use a new run.name, or restore those settings (learning rate and step counts may change)."
        )
    return meta


def load(url: str, rank: int, world: int, parts: dict[str, Any]) -> TrainState:
    """Read a complete checkpoint (any world size) after checking it fits the current config and that every
    file matches its recorded checksum (CorruptCheckpointError names the file that does not)."""
    verify(url, deep=True)
    meta = check_compatible(url, parts)
    tensors: dict[str, torch.Tensor] = {}
    for r in range(meta["world_size"]):
        f = storage.join(url, _rank_tensors(r, meta["world_size"]))
        fs, path = storage.get_fs(f)
        with storage.storage_errors(f), fs.open(path, "rb") as fh:
            data = fh.read()
        try:
            tensors.update(st_load(data))
        except SafetensorError as e:  # only a checkpoint saved before checksums gets here damaged
            raise CorruptCheckpointError(f, f"unreadable safetensors file ({e})") from None
    rank_meta = None
    if meta["world_size"] == world:
        rank_meta = storage.read_json(storage.join(url, _rank_json(rank)))
        rank_meta.pop(CHECKSUMS, None)
    return TrainState(step=int(meta["step"]), tensors=tensors, meta=meta, rank_meta=rank_meta)


def load_latest(
    run_url: str, rank: int, world: int, parts: dict[str, Any], resume: str | None = None
) -> tuple[str | None, TrainState | None]:
    """(url, state) to resume from: `resume` when given (a damaged file there is an error), else the newest
    complete checkpoint that verifies, falling back past damaged ones with a warning naming the bad file.
    (None, None) when there is none. Every rank reads the same files, so every rank picks the same one."""
    if resume:
        return resume, load(resume, rank, world, parts)
    for _, url, complete in reversed(list_checkpoints(run_url)):
        if not complete:
            warnings.warn(
                f"skipping incomplete checkpoint {url} (no {MARKER} marker: a crash during save?)", stacklevel=2
            )
            continue
        try:
            return url, load(url, rank, world, parts)
        except CorruptCheckpointError as e:
            warnings.warn(
                f"skipping corrupt checkpoint {url}: {e}; falling back to the previous complete checkpoint",
                stacklevel=2,
            )
    return None, None


def _diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
