"""The GPU check: where CUDA is present, its proofs must hold (NVDEC busy, no batch redone on
the CPU path, eval and train verified) and it must leave figures; here, without CUDA, it
says so in its JSON and exits 1 instead of passing anything."""

import json
import subprocess
import sys

import pytest
import torch
from meld_dali.bench import gpu_check


def test_gpu_check_without_cuda_fails_and_says_why(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: test_gpu_check_proves_the_gpu_path runs instead")
    assert gpu_check.main([str(tmp_path / "out"), "--budget", "5"]) == 1
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["proofs"] == ["cuda"] and report["proofs_ok"] is False
    assert report["cuda"]["error"] == "no CUDA device is visible"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU check needs a CUDA GPU")
def test_gpu_check_proves_the_gpu_path(tmp_path):
    r = subprocess.run([sys.executable, "-m", "meld_dali.bench.gpu_check",
                        str(tmp_path / "out"), "--budget", "600"], capture_output=True,
                       text=True, timeout=1800)
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert r.returncode == 0, (r.stderr[-3000:], report)
    assert report["proofs_ok"] and not report["skipped"]
    nvdec = report["nvdec"]
    assert nvdec["nvdec_util"] > 0 and nvdec["cpu_redone_batches"] == 0
    assert nvdec["backend_batches"] == nvdec["batches"] == gpu_check.PROOF_BATCHES
    for name in ("verify_eval_video", "verify_train_video", "verify_eval_cache"):
        v = report[name]
        assert v["ok"] and v["cpu_redone_batches"] == 0 and v["backend_batches"] > 0, v
    rows = report["bench_train"]["rows"]
    assert sorted((r["backend"], r["stage"]) for r in rows) == [
        ("dali-gpu", "head"), ("dali-gpu", "res3"), ("synthetic", "head"), ("synthetic", "res3")]
    assert all(0 < r["mfu"] < 1 for r in rows)  # a GPU in the hardware table: MFU is known
    assert all(r["cpu_redone_batches"] == 0 for r in rows if r["backend"] == "dali-gpu")
