"""What every benchmark shares: the environment record, resource sampling, result files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import threading
import time
from pathlib import Path

import psutil
import torch

RESULTS_DIR = Path("bench") / "results"


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda or "none", "cores": os.cpu_count(),
           "cpu": _cpu_model(), "platform": platform.platform(), "gpu": "none", "driver": "none"}
    try:
        import nvidia.dali

        env["dali"] = nvidia.dali.__version__
    except ImportError:
        env["dali"] = "absent"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # noqa: BLE001 - NVML is optional
            pass
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_tag(env: dict) -> str:
    name = env["gpu"] if env["gpu"] != "none" else f"cpu{env['cores']}"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def result_path(kind: str, precision: str, env: dict, directory: Path = RESULTS_DIR) -> Path:
    """timm-style name: what was measured, at which precision, with which torch/CUDA, where."""
    torch_v = env["torch"].split("+")[0]
    cuda = f"cu{env['cuda'].replace('.', '')}" if env["cuda"] != "none" else "cpu"
    return directory / f"{kind}-{precision}-torch{torch_v}-{cuda}-{device_tag(env)}.json"


def write_json(obj: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return path


class ResourceMonitor:
    """Samples this process tree's RSS (peak) and CPU time, and the GPU's memory and
    utilization through NVML when there is a GPU, in a background thread."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak_rss = interval, 0
        self.gpu_util: list[float] = []
        self._stop = threading.Event()
        self.proc = psutil.Process()
        self._nvml = None
        if torch.cuda.is_available():
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
                self._pynvml = pynvml
            except Exception:  # noqa: BLE001
                self._nvml = None

    def _tree(self):
        try:
            return [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:
            return [self.proc]

    def _cpu_seconds(self) -> float:
        total = 0.0
        for p in self._tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def _sample(self) -> None:
        rss = 0
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                rss += p.memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)
        if self._nvml is not None:
            try:
                self.gpu_util.append(
                    float(self._pynvml.nvmlDeviceGetUtilizationRates(self._nvml).gpu))
            except Exception:  # noqa: BLE001
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._cpu0, self._t0 = self._cpu_seconds(), time.perf_counter()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._sample()
        self.cpu_util = (self._cpu_seconds() - self._cpu0) / max(
            time.perf_counter() - self._t0, 1e-9) / (os.cpu_count() or 1)
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        out = {"peak_rss_mb": self.peak_rss / 2**20, "cpu_util": self.cpu_util}
        if torch.cuda.is_available():
            out["gpu_mem_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            if self.gpu_util:
                out["gpu_util"] = sum(self.gpu_util) / len(self.gpu_util) / 100
        return out
