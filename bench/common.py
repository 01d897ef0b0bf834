"""What every benchmark shares: the environment record, resource sampling, result files."""

from __future__ import annotations

import collections
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


def process_tree(proc: psutil.Process) -> list:
    """`proc` and its children (loader workers), as far as they can still be listed."""
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def tree_memory(procs) -> tuple[int, int]:
    """(summed RSS, memory of the tree) in bytes for a list of psutil processes.

    Summed RSS counts every shared page (torch, the libraries, copy-on-write memory of
    forked workers) once per process: 12 workers read as 12 copies. The tree's memory is
    the sum of PSS (each shared page split over the processes that map it), or where PSS is
    unavailable, the private memory (USS) of each process plus the largest shared size once."""
    rss = pss = uss = shared = 0
    have_pss = True
    for p in procs:
        with contextlib.suppress(psutil.Error):
            try:  # one read: the full info holds rss and shared too
                info = p.memory_full_info()
            except (psutil.AccessDenied, NotImplementedError):
                info = p.memory_info()
            rss += info.rss
            shared = max(shared, getattr(info, "shared", 0))
            uss += getattr(info, "uss", 0)
            if hasattr(info, "pss"):
                pss += info.pss
            else:
                have_pss = False
    return rss, pss if have_pss else uss + shared


def nvml_bus_id(domain: int, bus: int, device: int) -> str:
    """A PCI address as NVML writes it (nvmlPciInfo_t.busId) and nvmlDeviceGetHandleByPciBusId
    takes it: domain:bus:device.function in hex, 'DDDDDDDD:BB:DD.0' (a GPU is function 0)."""
    return f"{domain:08X}:{bus:02X}:{device:02X}.0"


def cuda_bus_id(index: int) -> str | None:
    """The NVML bus id of CUDA device `index` (its number under CUDA_VISIBLE_DEVICES, which
    NVML ignores: NVML's own index of the same GPU may differ); None where torch gives no
    PCI address."""
    props = torch.cuda.get_device_properties(index)
    try:
        return nvml_bus_id(props.pci_domain_id, props.pci_bus_id, props.pci_device_id)
    except AttributeError:  # an older torch
        return None


def nvml_handle(pynvml, index: int):
    """The NVML handle of CUDA device `index`, found by its PCI bus id; None without one."""
    bus = cuda_bus_id(index)
    # bytes: older nvidia-ml-py passes the argument to ctypes as is
    return pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode()) if bus else None


def process_gpu_bytes(procs, pids: set[int]) -> int | None:
    """Device memory (bytes) that NVML's running-process list (nvmlDeviceGetCompute-
    RunningProcesses) gives the processes `pids`; None when none of them is listed or NVML
    cannot tell their memory (usedGpuMemory None)."""
    used = [p.usedGpuMemory for p in procs
            if p.pid in pids and getattr(p, "usedGpuMemory", None) is not None]
    return sum(used) if used else None


class ResourceMonitor:
    """Samples this process tree's memory (peak summed RSS and peak PSS) and CPU time, and
    the GPU's memory and utilization, and its NVDEC and NVJPG engines' utilization
    (`nvdec_util`, `nvjpg_util`: fractions, means over the window; None without NVML)
    through NVML when there is a GPU, in a background thread. `peak_mem` (PSS) is the
    figure to read; `peak_rss` is kept for comparison. The GPU's memory is what NVML lists
    for this process tree (DALI's allocations included), peak kept: `gpu_mem_peak_mb`;
    torch's allocator alone is `torch_gpu_mem_peak_mb`. NVML's device is found by PCI bus
    id, not by CUDA index (CUDA_VISIBLE_DEVICES renumbers CUDA's devices, not NVML's)."""

    MEMORY = "PSS"  # what peak_mem_mb is, for table headers

    # 4 Hz: reading a process's PSS (/proc/PID/smaps) costs ~4 ms; at 20 Hz over a loader's
    # processes the monitor itself took a quarter of a core from what it measured
    def __init__(self, interval: float = 0.25):
        self.interval, self.peak_rss, self.peak_mem = interval, 0, 0
        self.gpu_util: list[float] = []
        self.engines: dict[str, list[float]] = {"nvdec_util": [], "nvjpg_util": []}
        self._stop = threading.Event()
        self.proc = psutil.Process()
        self.peak_process_gpu: int | None = None  # bytes NVML sees for this process tree
        self._nvml = None
        if torch.cuda.is_available():
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = nvml_handle(pynvml, torch.cuda.current_device())
                self._pynvml = pynvml
                # decode engines: (util %, sampling period); NVJPG only in recent nvidia-ml-py
                self._engine_reads = {
                    key: getattr(pynvml, fn) for key, fn in (
                        ("nvdec_util", "nvmlDeviceGetDecoderUtilization"),
                        ("nvjpg_util", "nvmlDeviceGetJpgUtilization")) if hasattr(pynvml, fn)}
            except Exception:  # noqa: BLE001 - NVML is optional: no NVML figures
                self._nvml = None

    def _tree(self):
        return process_tree(self.proc)

    def _cpu_seconds(self) -> float:
        """CPU time of the tree, workers that have ended included (a DataLoader without
        persistent workers starts new ones every epoch)."""
        total = 0.0
        for p in self._tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
                if p is self.proc:
                    total += t.children_user + t.children_system
            except psutil.Error:
                pass
        return total

    def _sample(self) -> None:
        tree = self._tree()
        rss, mem = tree_memory(tree)
        self.peak_rss, self.peak_mem = max(self.peak_rss, rss), max(self.peak_mem, mem)
        if self._nvml is not None:
            try:
                used = process_gpu_bytes(
                    self._pynvml.nvmlDeviceGetComputeRunningProcesses(self._nvml),
                    {p.pid for p in tree})
            except Exception:  # noqa: BLE001 - not supported here: the figure stays None
                used = None
            if used is not None:
                self.peak_process_gpu = max(self.peak_process_gpu or 0, used)
            try:
                self.gpu_util.append(
                    float(self._pynvml.nvmlDeviceGetUtilizationRates(self._nvml).gpu))
            except Exception:  # noqa: BLE001
                pass
            for key, get in self._engine_reads.items():
                try:
                    self.engines[key].append(float(get(self._nvml)[0]))
                except Exception:  # noqa: BLE001 - not supported on this GPU/driver
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
        out = {"peak_mem_mb": self.peak_mem / 2**20, "peak_rss_mb": self.peak_rss / 2**20,
               "cpu_util": self.cpu_util}
        for key, values in self.engines.items():  # mean over the window; None without NVML
            out[key] = sum(values) / len(values) / 100 if values else None
        if torch.cuda.is_available():
            # the device memory NVML sees for this process tree (torch's caching allocator,
            # DALI's own pools, CUDA contexts): None without NVML or where it cannot tell
            # (a container that hides the host's process ids)
            out["gpu_mem_peak_mb"] = (self.peak_process_gpu / 2**20
                                      if self.peak_process_gpu is not None else None)
            # torch's allocations alone (DALI's are not in it)
            out["torch_gpu_mem_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            if self.gpu_util:
                out["gpu_util"] = sum(self.gpu_util) / len(self.gpu_util) / 100
        return out


def describe_input(manifest, split: str, source: str, paths: list | None = None) -> dict:
    """What a benchmark read: resolution, codec, mean frames per clip and bitrate (Mbit/s,
    file bytes over playing time) of a split's loadable clips, for the video files, the
    JPEG frame folders or the clip cache (`paths`: where each clip is, when not where the
    manifest says: a peer's own frame folders)."""
    from PIL import Image

    from meld_dali.data.decode import clip_source_path

    rows = [manifest.clips[i] for i in manifest.ok(split)]
    frames = [c.num_frames for c in rows]
    seconds = sum(c.num_frames / (c.fps or 24) for c in rows)
    sizes = collections.Counter(f"{c.width}x{c.height}" for c in rows)
    paths = paths or [clip_source_path(manifest, c, source) for c in rows]
    if source == "frames":
        folders = [p for p in paths if p and p.is_dir()]
        nbytes = sum(f.stat().st_size for p in folders for f in p.iterdir())
        side = "?"
        if folders:  # the frames' own size: a peer may have extracted them itself
            with Image.open(min(folders[0].iterdir())) as img:
                side = min(img.size)
        resolution, codec = f"short side {side}", "jpeg"
    else:
        nbytes = sum(p.stat().st_size for p in paths if p and p.is_file())
        if source == "cache":
            resolution = f"short side {manifest.cache_short_side}"
            codecs = collections.Counter([manifest.meta["cache"]["codec"]])
        else:
            resolution = sizes.most_common(1)[0][0] if sizes else "?"
            codecs = collections.Counter(str(c.codec) for c in rows)
        codec = codecs.most_common(1)[0][0] if codecs else "?"
    return {"source": source, "resolution": resolution, "codec": codec, "clips": len(rows),
            "mean_frames": sum(frames) / max(len(frames), 1),
            "mbit_per_s": nbytes * 8 / max(seconds, 1e-9) / 1e6}


def input_label(d: dict) -> str:
    """One line for a table caption: '1280x720 h264, 69 frames/clip, 2.1 Mbit/s'."""
    what = (f"jpeg frames, {d['resolution']}" if d["codec"] == "jpeg"
            else f"{d['resolution']} {d['codec']}")
    rate = d["mbit_per_s"]
    rate_s = f"{rate:.1f}" if rate >= 1 else f"{rate:.2f}"
    return f"{what}, {d['mean_frames']:.0f} frames/clip, {rate_s} Mbit/s"


def with_unavailable(caption: str | None, report: dict) -> str | None:
    """The caption plus one line per row that could not run (the reason, unwrapped by a
    narrow column)."""
    lines = [f"n/a {'/'.join(str(u[k]) for k in ('backend', 'source') if k in u)}: "
             f"{u['reason']}" for u in report["unavailable"]]
    return "\n".join([x for x in [caption, *lines] if x]) or None


def compact_table(title: str, caption: str | None = None):
    """A rich Table that fits 80 columns: no outer edge, one space between columns."""
    from rich import box
    from rich.table import Table

    return Table(title=title, caption=caption, box=box.SIMPLE_HEAD, show_edge=False,
                 pad_edge=False, padding=(0, 1), collapse_padding=True)


def gpu_mem_cell(row: dict) -> str:
    """A table cell for a row's device memory: NVML's figure for the process, else torch's
    allocations alone in parentheses (no NVML), else '-'."""
    if row.get("gpu_mem_peak_mb") is not None:
        return f"{row['gpu_mem_peak_mb']:.0f}"
    if row.get("torch_gpu_mem_peak_mb") is not None:
        return f"({row['torch_gpu_mem_peak_mb']:.0f})"
    return "-"


def row_counts(loader, before) -> dict:
    """`backend_batches` and `cpu_redone_batches` a loader delivered since `before` (a copy
    of its `counts`): who made the batches of a measured window."""
    return (loader.counts - before).to_dict()


def redone_label(name: str, row: dict) -> str:
    """A row's loader name, marked when the CPU path redid some of its measured batches."""
    n = row.get("cpu_redone_batches", 0)
    return f"{name} [CPU redid {n}]" if n else name


def redone_warnings(rows: list[dict], what: str = "") -> list[str]:
    """One line per row with batches the CPU path redid after DALI failed on them: its
    figure is (partly) the CPU path's, not DALI's."""
    out = []
    for r in rows:
        n = r.get("cpu_redone_batches", 0)
        if n:
            name = "/".join(str(r[k]) for k in ("backend", "source", "stage") if k in r)
            out.append(f"{name}{what}: {n} of {n + r.get('backend_batches', 0)} measured "
                       "batches were redone by the CPU path after DALI failed on them: the "
                       "figure is partly the CPU path's, not DALI's")
    return out
