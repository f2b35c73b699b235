"""Base models as users give them (issue #12): a tiny safetensors Llama served from the moto S3 server and
from a pre-populated Hugging Face cache (a local "hub", HF_HUB_OFFLINE=1), fetched once per node under a
file lock by concurrent processes and by two Ray nodes on 127.0.0.1; pickled-only weights refused; an
unreachable hub id fails with one line naming the model and how to point at a local copy."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from configs.loader import ConfigError, load_config
from recdata import model_source as ms
from recdata import storage
from tests.conftest import REPO, free_port

SHA = "0123456789abcdef0123456789abcdef01234567"
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a Hugging Face folder (safetensors + the vendored tokenizer)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from trainer.tiny import tiny_llama_config

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(tiny_llama_config(num_layers=1, hidden=32, num_heads=2, num_kv_heads=1)).save_pretrained(
        out, safe_serialization=True
    )
    AutoTokenizer.from_pretrained(str(ms.ASSETS)).save_pretrained(out)
    return out


@pytest.fixture
def node_cache(tmp_path, monkeypatch) -> Path:
    """This process's node-local model cache (what RECLORA_CACHE sets for a real node)."""
    cache = tmp_path / "node-cache" / "models"
    monkeypatch.setattr(ms, "CACHE", cache)
    return cache


def _upload(folder: Path, url: str) -> None:
    for f in sorted(folder.iterdir()):
        storage.write_bytes_atomic(storage.join(url, f.name), f.read_bytes())


def _downloads(cache: Path) -> list[dict]:
    log = cache / ms.DOWNLOADS_LOG
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _hub_cache(root: Path, repo: str, folder: Path, sha: str = SHA) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/, blobs/}."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / sha
    snap.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for f in folder.iterdir():
        blob = repo_dir / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(sha)
    return snap


def _load(folder: str, model_cfg=None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, **ms.load_kwargs(model_cfg))


# ------------------------------------------------------------------------------------------------ config
def test_model_section_options_and_defaults():
    cfg = load_config("ml1m-reclora-7b")
    assert ms.source_kind(cfg.model.name_or_path) == "hub"
    m = load_config("tiny", ["model.revision=" + SHA, "model.attn_implementation=eager"]).model
    assert (m.revision, m.trust_remote_code, m.allow_pickle, m.attn_implementation) == (SHA, False, False, "eager")
    assert ms.load_kwargs(m) == {"attn_implementation": "eager", "trust_remote_code": False, "use_safetensors": True}
    assert "use_safetensors" not in ms.load_kwargs({"allow_pickle": True})
    assert ms.load_kwargs(None)["attn_implementation"] == "sdpa"
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["model.name_or_path=s3://user:hunter2@bucket/m"])
    assert "hunter2" not in str(e.value)


def test_flash_attention_without_flash_attn_says_what_to_do():
    if ms.flash_attention_available():
        pytest.skip("flash-attn and a GPU are present here")
    with pytest.raises(ms.ModelSourceError, match="attn_implementation=sdpa"):
        ms.load_kwargs({"attn_implementation": "flash_attention_2"})
    assert ms.load_kwargs({"attn_implementation": "auto"})["attn_implementation"] == "sdpa"


# ------------------------------------------------------------------------------------------------ s3
def test_s3_model_fetched_once_and_loaded(tiny_dir, s3_bucket, node_cache):
    url = f"{s3_bucket}/models/tiny"
    _upload(tiny_dir, url)
    t0 = time.perf_counter()
    assert ms.model_reference({"name_or_path": url}) == url  # workers get the URL, not a driver path
    local = ms.resolve_model(url)
    assert Path(local).parent == node_cache and (Path(local) / "model.safetensors").exists()
    assert ms.resolve_model(url) == local and len(_downloads(node_cache)) == 1
    model = _load(local)
    assert model.config.hidden_size == 32
    tok = ms.tokenizer_dir(url)
    assert Path(tok, "tokenizer.json").exists() and not list(Path(tok).glob("*.safetensors"))
    # The fingerprint comes from the stored files (ETags), not from where this node cached them.
    fp = ms.model_fingerprint(url)
    shutil.rmtree(node_cache)
    assert ms.model_fingerprint(url) == fp and len(fp) == 16
    storage.write_bytes_atomic(storage.join(url, "config.json"), (tiny_dir / "config.json").read_bytes() + b"\n")
    assert ms.model_fingerprint(url) != fp  # new content, new fingerprint (and a new cache folder)
    print(f"s3 fetch+load {time.perf_counter() - t0:.1f}s")


def test_concurrent_processes_on_one_node_download_once(tiny_dir, s3_bucket, tmp_path):
    url = f"{s3_bucket}/models/tiny"
    _upload(tiny_dir, url)
    cache_root = tmp_path / "node"
    code = textwrap.dedent(
        """
        import sys
        from recdata.model_source import resolve_model
        print(resolve_model(sys.argv[1]))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "RECLORA_CACHE": str(cache_root)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e.decode()[-800:] for _, e in outs]
    folders = {o.decode().strip() for o, _ in outs}
    assert len(folders) == 1
    assert len(_downloads(cache_root / "models")) == 1
    assert not [p for p in (cache_root / "models").iterdir() if p.name.startswith(".dl-")]  # no temp left


# ------------------------------------------------------------------------------------------------ hub
def test_hub_id_from_local_hub_cache_offline(tiny_dir, tmp_path, monkeypatch, node_cache):
    hub = tmp_path / "hf" / "hub"
    snap = _hub_cache(hub, "acme/tiny-llama", tiny_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = ms.model_reference({"name_or_path": "acme/tiny-llama"})
    assert ref == f"acme/tiny-llama@{SHA}"  # pinned to the commit main points at
    local = ms.resolve_model(ref)
    assert Path(local) == snap and _downloads(node_cache) == []
    assert _load(local).config.hidden_size == 32
    fp = ms.model_fingerprint("acme/tiny-llama")
    assert fp == hashlib.sha256(f"hub:acme/tiny-llama@{SHA}".encode()).hexdigest()[:16]
    assert ms.model_fingerprint(ref) == fp == ms.model_fingerprint("acme/tiny-llama", {"revision": SHA})
    # The same commit in another node's cache: the same fingerprint (no path in it).
    hub2 = tmp_path / "other-node" / "hub"
    _hub_cache(hub2, "acme/tiny-llama", tiny_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub2))
    assert ms.model_fingerprint("acme/tiny-llama") == fp


def test_hub_id_not_cached_offline_is_one_line_naming_the_model(tmp_path, monkeypatch, node_cache):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ms.ModelSourceError) as e:
        ms.model_reference({"name_or_path": "acme/not-here"})
    msg = str(e.value)
    assert "\n" not in msg and "acme/not-here" in msg and "model.name_or_path=/path" in msg and "s3://" in msg


def test_unreachable_hub_is_one_line_naming_the_model(tmp_path):
    """The hub endpoint refuses connections (not offline mode): the driver's error says which model and how
    to point at a local copy, and nothing is printed of HF_TOKEN."""
    code = textwrap.dedent(
        """
        import sys
        from recdata.model_source import ModelSourceError, model_reference
        try:
            model_reference({"name_or_path": "acme/unreachable-7b"})
        except ModelSourceError as e:
            print(e)
            sys.exit(3)
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
        "HF_TOKEN": "hf_sentinelSECRET0000",
    }
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout.strip()
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert len(out.splitlines()) == 1 and "acme/unreachable-7b" in out and "cannot be reached" in out
    assert "model.name_or_path=/path" in out
    assert "sentinelSECRET" not in proc.stdout + proc.stderr
    print(f"unreachable hub answered in {time.perf_counter() - t0:.1f}s")


# ------------------------------------------------------------------------------------------------ pickle
def test_pickled_only_weights_refused_unless_allowed(tiny_dir, tmp_path, s3_bucket, node_cache):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_dir, folder)
    sd = _load(str(tiny_dir)).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(ms.ModelSourceError) as e:
        ms.resolve_model(str(folder))
    assert "pickled" in str(e.value) and "model.allow_pickle=true" in str(e.value) and "\n" not in str(e.value)
    url = f"{s3_bucket}/models/pickled"
    _upload(folder, url)
    with pytest.raises(ms.ModelSourceError, match="pickled"):
        ms.resolve_model(url)
    assert _downloads(node_cache) == []  # refused before anything was fetched
    allow = {"allow_pickle": True}
    assert ms.resolve_model(str(folder), allow) == str(folder)
    assert _load(ms.resolve_model(url, allow), allow).config.hidden_size == 32


def test_missing_local_folder_and_bad_ids(tmp_path):
    with pytest.raises(ms.ModelSourceError, match="model folder not found"):
        ms.model_reference({"name_or_path": str(tmp_path / "nope")})
    with pytest.raises(ms.ModelSourceError, match="hub id"):
        ms.resolve_model("not a valid id!")


# ------------------------------------------------------------------------------------------------ embed
def test_embed_worker_and_fingerprint_take_a_reference(tiny_dir, s3_bucket, node_cache):
    from dataclasses import asdict

    from retrieval.embed_items import EmbedOptions, EmbedWorker, model_fingerprint

    url = f"{s3_bucket}/models/tiny"
    _upload(tiny_dir, url)
    assert model_fingerprint(url) == ms.model_fingerprint(url)
    assert model_fingerprint(str(tiny_dir)) == ms.folder_fingerprint(str(tiny_dir))
    worker = EmbedWorker(url, asdict(EmbedOptions(pca_dims=0, batch_size=2)))
    assert worker.embed(["Here is a movie.", "Its title is Heat."]).shape == (2, 32)


# ------------------------------------------------------------------------------------------------ 2 nodes
def _node_procs(marker: str) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                found.append(p)
                found.extend(p.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _kill(procs) -> None:
    import psutil

    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue


def _ray_start(args: list[str], env: dict) -> None:
    proc = subprocess.run(
        [RAY, "start", *args, "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ray_nodes_each_download_once_and_every_rank_loads(tiny_dir, s3_bucket, tmp_path, monkeypatch):
    """Two Ray nodes on 127.0.0.1, each with its own node-local cache; two ranks per node resolve the s3://
    reference the driver passed and load the model: one download per node. Then a hub id from each node's
    Hugging Face cache (offline), pinned by the driver."""
    import ray

    from cluster.runtime import init_ray

    url = f"{s3_bucket}/models/tiny"
    _upload(tiny_dir, url)
    hub = tmp_path / "hf-hub"
    _hub_cache(hub, "acme/tiny-llama", tiny_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    ray.shutdown()
    port = free_port()
    tmpdir = f"/tmp/rm-{os.getpid()}"
    base = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    base.pop("RAY_ADDRESS", None)
    caches = {n: tmp_path / f"cache-{n}" for n in ("node_a", "node_b")}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", f"--temp-dir={tmpdir}"]
    b_port = free_port()
    try:
        _ray_start(
            ["--head", f"--port={port}", "--include-dashboard=false", *common, '--resources={"node_a": 2}'],
            {**base, "RECLORA_CACHE": str(caches["node_a"])},
        )
        _ray_start(
            [f"--address=127.0.0.1:{port}", f"--node-manager-port={b_port}", *common[:2], '--resources={"node_b": 2}'],
            {**base, "RECLORA_CACHE": str(caches["node_b"])},
        )
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        init_ray(log_to_driver=False)

        @ray.remote(num_cpus=1)
        def rank(ref: str) -> dict:
            from transformers import AutoModelForCausalLM

            from recdata import model_source

            folder = model_source.resolve_model(ref)
            model = AutoModelForCausalLM.from_pretrained(folder, **model_source.load_kwargs())
            return {
                "cache": os.environ["RECLORA_CACHE"],
                "folder": folder,
                "node": ray.get_runtime_context().get_node_id(),
                "checksum": float(sum(p.double().sum() for p in model.parameters())),
            }

        t0 = time.perf_counter()
        for ref in (ms.model_reference({"name_or_path": url}), ms.model_reference({"name_or_path": "acme/tiny-llama"})):
            out = ray.get(
                [rank.options(resources={n: 1}).remote(ref) for n in ("node_a", "node_a", "node_b", "node_b")]
            )
            assert {o["cache"] for o in out} == {str(c) for c in caches.values()}
            assert len({o["node"] for o in out}) == 2
            assert len({o["checksum"] for o in out}) == 1  # every rank loaded the same weights
        for c in caches.values():
            got = _downloads(c / "models")
            assert [d["model"] for d in got] == [url], got  # once per node; the hub id came from its cache
        print(f"2 nodes x 2 ranks, s3 + hub: {time.perf_counter() - t0:.1f}s")
    finally:
        ray.shutdown()
        # Only this test's two nodes (found by their temp dir and node-manager port), never `ray stop`.
        _kill(_node_procs(tmpdir) + _node_procs(f"--node_manager_port={b_port}"))


# ------------------------------------------------------------------------------------------------ cluster
def test_hf_token_only_from_the_pod_environment(monkeypatch):
    """HF_TOKEN reaches every pod from a Secret (optional) and never travels in runtime_env, which Ray logs."""
    import yaml

    from cluster.runtime import ray_env

    monkeypatch.setenv("HF_TOKEN", "hf_sentinelSECRET0000")
    assert "HF_TOKEN" not in ray_env()
    for name in ("base/rayjob.yaml", "dev-raycluster/raycluster.yaml"):
        for doc in yaml.safe_load_all((REPO / "cluster" / "k8s" / name).read_text()):
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            assert "HF_TOKEN" not in doc["spec"].get("runtimeEnvYAML", "")
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                for c in group["template"]["spec"]["containers"]:
                    env = {e["name"]: e for e in c["env"]}
                    ref = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == "reclora-hf" and ref["optional"] is True
                    assert env["RECLORA_CACHE"]["value"].startswith("/cache")
