"""The GPU check (dali-gpu on H.264, benches) runs only where CUDA and DALI are present."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_check_script(tmp_path):
    pytest.importorskip("nvidia.dali")
    r = subprocess.run([sys.executable, "-m", "meld_dali.bench.gpu_check",
                        str(tmp_path / "out"), "--quick"], capture_output=True, text=True,
                       timeout=1800)
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert r.returncode == 0, (r.stderr[-3000:], report)
    assert report["dali_gpu_h264_video"]["ok"]
    stages = [r["stage"] for r in report["bench_train_video"]["rows"]
              if r["backend"] == "synthetic"]
    assert stages == ["head", "res5", "res4", "res3"]
    assert all(r["mfu"] is None or 0 < r["mfu"] < 1 for r in report["bench_train_video"]["rows"])
