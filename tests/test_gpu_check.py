"""scripts/gpu_check.py: its CPU dry run works end to end, and its exactness check catches a broken kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qat_test_utils import load_script

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    return load_script("gpu_check")


def test_dry_run_prints_the_table(tmp_path):
    env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp_path)}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = r.stdout[r.stdout.index("\ncheck "):]
    for row in ("LSQ fwd+bwd vs twin, float32", "LSQ fwd+bwd vs twin, bfloat16", "LSQ fwd+bwd vs twin, float16",
                "oscillation tracker vs twin", "kernel bandwidth", "yolov8n train step, imgsz 64"):
        assert row in table
    assert "FAIL" not in table and "SKIP" in table  # no GPU: bandwidth is skipped, never invented


def test_no_gpu_without_dry_run_is_one_line_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    gpu_check = _load_script()
    assert gpu_check.main([]) == 2


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")
@pytest.mark.parametrize("broken", ["forward", "backward"])
def test_exactness_check_catches_a_one_ulp_kernel_error(monkeypatch, broken):
    gpu_check = _load_script()
    from ultralytics_qat.ops import triton_lsq

    sizes = {"flat": 257, "conv": (4, 2, 3, 3)}
    ok = gpu_check.Table()
    gpu_check.check_exactness(ok, "cpu", sizes, interpreted=True)
    assert not ok.failed

    if broken == "forward":
        real = triton_lsq.lsq_forward
        monkeypatch.setattr(triton_lsq, "lsq_forward", lambda *a: torch.nextafter(real(*a), torch.tensor(float("inf"))))
    else:
        real_b = triton_lsq.lsq_backward
        monkeypatch.setattr(triton_lsq, "lsq_backward", lambda *a: (real_b(*a)[0], real_b(*a)[1] * (1 + 1e-3)))
    bad = gpu_check.Table()
    gpu_check.check_exactness(bad, "cpu", sizes, interpreted=True)
    assert bad.failed
