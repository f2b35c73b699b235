"""bench/gpu_check.py run the way a user runs it, on the CPU code path (--device cpu --quick): every phase
leaves its JSON lines, no first-contact check fails, and the last stdout line is the summary object."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("first_contact", "throughput", "eval", "zero3")
SUMMARY_KEYS = (
    "first_contact_checks",
    "first_contact_failures",
    "reclora16_mfu_spec",
    "reclora16_mfu_measured",
    "reclora16_over_plain_step",
    "ilora4_over_plain_all7_step",
    "ctr_rows_per_s",
    "next_item_rows_per_s",
    "zero3_trainer_over_zero2_step",
    "checkpoint_save_s",
    "results",
)


def test_cpu_quick_run(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=170,
        env=env,
        cwd=tmp_path,  # as from anywhere: the script finds the repository itself
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(tmp_path.glob("*.jsonl"))
    assert len(files) == 1 and files[0].with_suffix(".md").is_file()
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    phase_lines = {r["phase"]: r for r in records if r["kind"] == "phase"}
    assert set(phase_lines) == set(PHASES), phase_lines.keys()
    for phase in PHASES:
        items = [r for r in records if r["phase"] == phase and r["kind"] == "item"]
        assert items, phase
        assert not phase_lines[phase]["skipped"], phase_lines[phase]
    first = [r for r in records if r["phase"] == "first_contact" and r["kind"] == "item"]
    assert {r["name"] for r in first} >= {
        "environment",
        "collectives",
        "zero3_hybrid_ilora",
        "zero3_reclora_activation_checkpointing",
        "zero3_ilora_activation_checkpointing",
    }
    assert all(r["ok"] for r in first), [(r["name"], r.get("error") or r.get("failed_checks")) for r in first]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in SUMMARY_KEYS:
        assert key in summary, key
    assert summary["first_contact_failures"] == 0
    assert summary["reclora16_mfu_spec"] is None  # no spec peak on a CPU: MFU is against the measured one
    assert 0 < summary["reclora16_mfu_measured"]
    assert summary["phases_done"] == list(PHASES)


def test_cpu_bf16_first_contact(tmp_path):
    """The GPU's dtype path on the CPU (--bf16: DeepSpeed's bf16 engine): ZeRO-3 with the hybrid model, RecLoRA and
    iLoRA under activation checkpointing pass, and the gates return float32 while their storage is bfloat16."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick", "--bf16"]
    cmd += ["--phases", "first_contact", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in next(tmp_path.glob("*.jsonl")).read_text().splitlines()]
    checks = [r for r in records if r["kind"] == "item" and r["name"].startswith("zero3_")]
    assert len(checks) == 3 and all(r["ok"] for r in checks), [(r["name"], r.get("error")) for r in checks]
    for r in checks:
        assert r["gate_dtypes"] == ["torch.float32"] and r["gate_param_dtypes"] == ["torch.bfloat16"], r
        assert r["base_dtypes"] == ["torch.bfloat16"], r
    assert json.loads(proc.stdout.strip().splitlines()[-1])["first_contact_failures"] == 0
