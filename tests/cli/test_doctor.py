"""`python -m hsc_fast.cli.doctor` on a CPU machine: runs what applies, says what it skipped and why,
and exits non-zero when a kernel is made to fail."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hsc_fast.cli import doctor

REPO = Path(__file__).resolve().parents[2]


def test_full_run_on_cpu(tmp_path):
    out = tmp_path / "doctor.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "hsc_fast.cli.doctor", "--json", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = json.loads(out.read_text())["checks"]
    by = {(c["section"], c["name"]): c for c in checks}
    assert {c["section"] for c in checks} == set(doctor.SECTIONS)
    kernels = [c for c in checks if c["section"] == "kernels"]
    expected = sum(2 * len(dims) * len(doctor.kernel_variants(op)) for op, *_, dims in doctor.KERNEL_CASES)
    assert len(kernels) == expected == 10 and all(c["status"] == "PASS" for c in kernels)  # fp32 + bf16 per width
    assert {c["data"]["case"] for c in kernels if c["name"].startswith("psc_terms")} == {"C=21", "C=81"}
    assert all(c["data"]["fwd_error"] <= 2e-4 for c in kernels)
    assert by[("compile", "local GPU")]["status"] == "SKIP" and "no CUDA device" in by[("compile", "local GPU")]["detail"]
    assert by[("crf", "lattice sort build vs pydensecrf")]["data"]["agreement"] >= 0.99
    assert by[("crf", "lattice hash build")]["status"] == "SKIP"
    train = by[("train", "2-step CAM training")]
    assert train["status"] == "PASS" and len(train["data"]["losses"]) == 2
    assert all(c["detail"] for c in checks if c["status"] == "SKIP")  # every skip says why
    assert "passed, 0 failed" in proc.stdout


@pytest.mark.interpreter
def test_a_failing_kernel_makes_the_doctor_fail(tmp_path, monkeypatch):
    import kernels.psc
    from hsc_fast import ops
    monkeypatch.setattr(kernels.psc, "psc_terms_triton", lambda *a: ops.psc_terms_reference(*a) * 1.05)
    out = tmp_path / "d.json"
    assert doctor.main(["--only", "kernels", "--json", str(out)]) == 1
    failed = [c for c in json.loads(out.read_text())["checks"] if c["status"] == "FAIL"]
    assert {c["name"].split()[0] for c in failed} == {"psc_terms"}
    assert "mismatch" in failed[0]["detail"]


def test_unknown_section_is_a_usage_error(capsys):
    assert doctor.main(["--only", "versions,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_cupy_for_another_cuda_major_is_a_failure_naming_the_extra(monkeypatch):
    monkeypatch.setattr(doctor, "cupy_cuda_major", lambda: 12)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    check = doctor._cupy_extra_check({})
    assert check.status == "FAIL" and "gpu-cu13" in check.detail and "cupy-cuda12x" in check.detail
    monkeypatch.setattr(doctor, "cupy_cuda_major", lambda: 13)
    assert doctor._cupy_extra_check({}).status == "PASS"
