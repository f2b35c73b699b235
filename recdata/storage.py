"""Every path is an fsspec URL: a bare path or file:// locally, s3:// on clusters. One code path for both.

Credentials never pass through here as arguments we log: s3fs reads them from the environment or the
standard AWS chain. Only the endpoint/region (not secret) may come from config or environment.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import socket
import tempfile
import urllib.parse
import uuid
from typing import Any, Callable, Iterator

import fsspec
import pyarrow.fs as pafs

from configs.errors import RecloraError
from configs.schema import has_credentials

# Process-wide defaults set once from config (endpoint, region); never credentials.
_S3_OPTIONS: dict[str, Any] = {}


# Where an S3 endpoint may come from besides the config, in order of precedence.
ENDPOINT_VARS = ("RECLORA_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class StorageError(RecloraError, RuntimeError):
    """Storage unreachable, unauthorized, or a URL that cannot be used. The message names the URL."""


def configure(endpoint_url: str | None = None, region: str | None = None, anon: bool | None = None) -> None:
    """Set non-secret S3 options for this process (from the typed config's `storage` section)."""
    for var in ENDPOINT_VARS:
        if has_credentials(os.environ.get(var) or ""):
            # Endpoints are forwarded to Ray workers (runtime_env, which Ray logs): never with a key inside.
            raise StorageError(
                f"{var} holds credentials (user:password@); give only scheme://host:port and set "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead"
            )
    _S3_OPTIONS.clear()
    if endpoint_url:
        _S3_OPTIONS["endpoint_url"] = endpoint_url
    if region:
        _S3_OPTIONS["client_kwargs"] = {"region_name": region}
    if anon is not None:
        _S3_OPTIONS["anon"] = anon


def _s3_options() -> dict[str, Any]:
    opts: dict[str, Any] = dict(_S3_OPTIONS)
    env_endpoint = next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None)
    if env_endpoint and "endpoint_url" not in opts:
        opts["endpoint_url"] = env_endpoint
    # Throttling (503 SlowDown) at 64 shards needs retries: botocore's adaptive mode (backoff plus a client-side
    # rate limiter) with 10 attempts, or what AWS_RETRY_MODE / AWS_MAX_ATTEMPTS say (botocore's own variables).
    # A dead endpoint still fails in seconds: probe_endpoint checks it once before the first request.
    retries = {"mode": os.environ.get("AWS_RETRY_MODE") or "adaptive", "max_attempts": _max_attempts()}
    opts.setdefault("config_kwargs", {"connect_timeout": 5, "read_timeout": 60, "retries": retries})
    # One client per set of options (fsspec caches instances; creating an S3 client costs 0.1-0.5 s), but
    # no cached listings: objects written by other workers must be visible at once.
    opts.setdefault("use_listings_cache", False)
    return opts


def _max_attempts() -> int:
    raw = os.environ.get("AWS_MAX_ATTEMPTS") or "10"
    try:
        return max(1, int(raw))
    except ValueError:
        raise StorageError(f"AWS_MAX_ATTEMPTS={raw!r}: expected a whole number of attempts, e.g. 10") from None


_PROBED: set[str] = set()


def probe_endpoint(url: str, endpoint: str | None) -> None:
    """One TCP connect to an explicit S3 endpoint per process, so a wrong or dead endpoint fails in seconds
    rather than after every retry's backoff; AWS's own endpoints are not probed."""
    if not endpoint or endpoint in _PROBED:
        return
    parsed = urllib.parse.urlsplit(endpoint)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as e:
        raise StorageError(f"{url}: storage unreachable (endpoint {endpoint}): {type(e).__name__}: {e}") from None
    _PROBED.add(endpoint)


def s3_endpoint() -> str | None:
    """The S3 endpoint in effect (config or environment), for handing to workers in other processes."""
    return _s3_options().get("endpoint_url")


def digest(obj: Any, length: int = 16) -> str:
    """The one content digest of the project: sha256 over canonical JSON (sorted keys), hex, cut to `length`.
    Stage addresses, stream keys, checkpoint and shard fingerprints are all this function."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def sha256_file(url: str, chunk_bytes: int = 4 << 20) -> str:
    """The one file checksum of the project: sha256 (hex) of a stored file's bytes, streamed in chunks (never
    the whole file in memory). Checkpoints record it per file and verify it on load."""
    fs, path = get_fs(url)
    h = hashlib.sha256()
    with storage_errors(url), fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            h.update(chunk)
    return h.hexdigest()


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """URL -> (filesystem, path without protocol). Bare paths are local."""
    if not isinstance(url, str) or not url:
        raise StorageError(f"storage URL must be a non-empty string, got {url!r}")
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
        opts = _s3_options()
        probe_endpoint(url, opts.get("endpoint_url"))
        fs, path = fsspec.core.url_to_fs(url.replace("s3a://", "s3://"), **opts)
    elif protocol == "file":
        fs, path = fsspec.core.url_to_fs(url)
        path = os.path.abspath(path)
    else:
        fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or "/"


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(url: str, *parts: str) -> str:
    base = url.rstrip("/")
    return posixpath.join(base, *[p.strip("/") for p in parts])


def resolve(url: str, root: str) -> str:
    """Relative names live under `root` (a run's output_dir); absolute paths and URLs are used as given."""
    if "://" in url or url.startswith("/"):
        return url
    return join(root, url)


def describe_endpoint(url: str) -> str:
    if is_local(url):
        return "local filesystem"
    endpoint = _s3_options().get("endpoint_url")
    return f"endpoint {endpoint}" if endpoint else "default AWS endpoint"


def arrow_fs(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """pyarrow filesystem for an fsspec one. Paths passed with it must have no protocol prefix
    (an s3:// URL together with an explicit pyarrow filesystem is a known error)."""
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn transport/auth failures into one StorageError naming the URL and endpoint (no credentials)."""
    try:
        yield
    except StorageError:
        raise
    except PermissionError as e:
        if is_local(url):
            raise StorageError(
                f"{url}: access denied on the local filesystem ({_first_line(e)}); check the permissions of "
                f"that file or folder, or choose another path"
            ) from None
        raise StorageError(
            f"{url}: access denied ({describe_endpoint(url)}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            f"or the instance role ({type(e).__name__})"
        ) from None
    except (ConnectionError, TimeoutError, OSError) as e:
        if isinstance(e, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
            raise
        raise StorageError(
            f"{url}: storage unreachable ({describe_endpoint(url)}): {type(e).__name__}: {_first_line(e)}"
        ) from None
    except Exception as e:  # botocore raises its own hierarchy for endpoint/auth problems
        name = type(e).__name__
        if any(k in name for k in ("Endpoint", "Connect", "Timeout")):
            raise StorageError(
                f"{url}: storage unreachable ({describe_endpoint(url)}): {name}: {_first_line(e)}"
            ) from None
        if any(k in name for k in ("Credentials", "ClientError", "NoSuchBucket")):
            raise StorageError(f"{url}: storage error ({describe_endpoint(url)}): {name}: {_first_line(e)}") from None
        raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def exists(url: str) -> bool:
    fs, path = get_fs(url)
    with storage_errors(url):
        return fs.exists(path)


def read_json(url: str) -> Any:
    fs, path = get_fs(url)
    with storage_errors(url):
        with fs.open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))


def _write_atomic(url: str, write: Callable[[fsspec.AbstractFileSystem, str], None]) -> None:
    """`write(fs, tmp_path)` to a temporary name beside the target, then rename: readers never see a partial
    file."""
    fs, path = get_fs(url)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    with storage_errors(url):
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        write(fs, tmp)
        fs.mv(tmp, path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    def write(fs, tmp):
        with fs.open(tmp, "wb") as f:
            f.write(data)

    _write_atomic(url, write)


def upload_file_atomic(local_path: str, url: str) -> None:
    """Copy a local file to url atomically, streamed from disk (object stores get a multipart upload), so
    the bytes are never held in memory whole."""
    _write_atomic(url, lambda fs, tmp: fs.put_file(local_path, tmp))


def write_json_atomic(url: str, obj: Any) -> None:
    write_bytes_atomic(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def rm(url: str, recursive: bool = True) -> None:
    fs, path = get_fs(url)
    with storage_errors(url):
        if fs.exists(path):
            fs.rm(path, recursive=recursive)


def move_tree(src_url: str, dst_url: str) -> None:
    """Move every file under src to dst (rename locally; copy+delete on object stores)."""
    fs, src = get_fs(src_url)
    _, dst = get_fs(dst_url)
    with storage_errors(dst_url):
        if is_local(src_url):
            os.makedirs(os.path.dirname(dst) or "/", exist_ok=True)
            os.replace(src, dst)
            return
        files = fs.find(src)
        for f in files:
            rel = posixpath.relpath(f, src)
            fs.mv(f, posixpath.join(dst, rel))
        fs.rm(src, recursive=True) if fs.exists(src) else None


def check_writable(url: str, what: str = "the output") -> None:
    """Before any work: `url` can be written as a folder. Locally: no file on the way and the nearest existing
    folder accepts new entries (tried with a temporary file, removed at once); on object stores: the bucket
    answers (ensure_bucket). StorageError names the URL, the blocking path and what to do."""
    if not is_local(url):
        ensure_bucket(url)
        return
    _, path = get_fs(url)
    near = path
    while not os.path.exists(near):
        near = os.path.dirname(near)
    if not os.path.isdir(near):
        raise StorageError(f"{url}: {near} is a file, not a folder; choose another path for {what}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".reclora-write-check-", dir=near)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise StorageError(
            f"{url}: cannot write in {near} ({e.strerror or type(e).__name__}): the folder is read-only; "
            f"choose another path for {what} or fix its permissions"
        ) from None


def ensure_bucket(url: str) -> None:
    """Check that the bucket/root of url is reachable before doing work, with a clear error otherwise."""
    if is_local(url):
        return
    fs, path = get_fs(url)
    bucket = path.split("/", 1)[0]
    with storage_errors(url):
        try:
            fs.ls(bucket, detail=False)  # unlike exists(), this raises on a dead endpoint or bad keys
        except FileNotFoundError:
            raise StorageError(
                f"{url}: bucket '{bucket}' does not exist ({describe_endpoint(url)}); create it first"
            ) from None
