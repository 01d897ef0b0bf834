"""`meld-dali doctor`: what this machine can run, and proof that the loader backends that run
here deliver what the CPU reference path delivers.

- the machine: versions, GPU and its decode engines (meld_dali.hardware), cores, memory, and
  free, writable disk where the run folder and the clip cache would go;
- each backend x each input: a few generated clips (synth: MELD's codec, H.264, at 640x360,
  the smallest size synth encodes like MELD; VP9 and MJPEG for DALI's CPU decoder, which
  takes no H.264; JPEG frame folders) and, with --data, the first dev clips of each source
  it has: runs here or why not, then verified (meld_dali.verify) or not;
- what `auto` picks for `train` and `evaluate`, and why. The doctor is ok when every check
  that ran passed and auto's picks are verified.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from meld_dali.config import BACKENDS, load_config
from meld_dali.data.select import (
    backend_problem,
    dali_available,
    resolve_backend,
    resolve_source,
)
from meld_dali.hardware import gpu_facts, nvcuvid_problem
from meld_dali.manifest import Manifest
from meld_dali.verify import CLIPS, MAX_TOL, MEAN_TOL, Verdict, compare, sample_manifest

# The smallest size synth encodes like MELD (H.264 High profile, B-frames, MELD's bits per
# pixel). Measured here (2 cores, DALI present): run_doctor took 8 s at 640x360 and 38 s at
# 1280x720, with the same verdicts.
SAMPLE_SIZE = (640, 360)
# What a MELD run writes: checkpoints (last.pt and last.prev.pt; best.pt is a hard link),
# and next to the data the manifest (~5 MB) and the clip cache (~1.5 GB for MELD).
RUN_GB, CACHE_GB = 0.8, 1.5
GB = 2**30


def machine() -> dict:
    """Versions, GPU and its engines, cores and memory."""
    import av
    import psutil

    from meld_dali.bench.common import environment

    env = environment()
    mem = psutil.virtual_memory()
    env.update(pyav=av.__version__, ffmpeg=str(getattr(av, "ffmpeg_version_info", "?")),
               memory_free_gb=mem.available / GB, memory_total_gb=mem.total / GB,
               nvdec=None, nvjpg=None, gpu_reason="", nvcuvid="no GPU")
    if torch.cuda.is_available():
        env["nvcuvid"] = nvcuvid_problem() or "loaded"
        facts = gpu_facts(env["gpu"])
        free, total = torch.cuda.mem_get_info()
        env.update(gpu_memory_free_gb=free / GB, gpu_memory_total_gb=total / GB,
                   nvdec=facts.nvdec if facts else None, nvjpg=facts.nvjpg if facts else None)
    else:
        env["gpu_reason"] = ("no CUDA device is visible" if torch.backends.cuda.is_built()
                             else "this torch was built without CUDA")
    return env


def _writable(folder: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def disk(out: Path, data: Path | None) -> list[dict]:
    """Free space and write permission where the run folder and the cache would go (their
    nearest existing folder), against what a MELD run needs there."""
    places = [("run folder", out, RUN_GB, "checkpoints"),
              ("cache", data or out, CACHE_GB, "clip cache")]
    rows: list[dict] = []
    need_on: dict[int, float] = {}
    for what, path, need, why in places:
        at = Path(path).resolve()
        while not at.exists():
            at = at.parent
        dev = at.stat().st_dev
        need_on[dev] = need_on.get(dev, 0.0) + need
        rows.append({"what": what, "path": str(path), "checked": str(at),
                     "free_gb": shutil.disk_usage(at).free / GB, "writable": _writable(at),
                     "need_gb": need, "need_why": why, "device": dev})
    for r in rows:  # places on one file system share its free space
        r["enough"] = r["free_gb"] >= need_on[r.pop("device")]
    return rows


def _short(why: str) -> str:
    """A reason without its advice (the part in parentheses), for the screen."""
    return why.split(" (")[0].split(";")[0]


def _run(backend: str, m: Manifest, source: str, label: str, cfg,
         train: bool = False) -> Verdict:
    split = "dev" if m.ok("dev") else cfg.data.train_split  # a root with no dev clips
    why = backend_problem(backend, m, split, source)
    if why:
        return Verdict(backend, source, label, mode="train" if train else "eval", error=why)
    device = torch.device("cuda" if backend == "dali-gpu" else "cpu")
    return compare(m, split, source, cfg.data, cfg.loader, backend, device, label, train=train)


def video_only(m: Manifest) -> Manifest:
    """The manifest as if no frame folders were extracted (auto then reads the videos)."""
    return Manifest(m.path, m.clips, {**m.meta, "frames_dir": ""})


def generated_checks(folder: Path, cfg, say=None) -> tuple[list[Verdict], Manifest]:
    """Generated clips through each backend that could read them; also returns the H.264
    set (video only), MELD's stand-in for auto's picks without --data."""
    w, h = SAMPLE_SIZE
    size = f"{w}x{h}"
    say = say or (lambda _: None)
    say(f"doctor: generating H.264 clips at {size} and their frame folders")
    h264 = sample_manifest(folder, "h264", w, h, frames_short_side=cfg.data.short_side)
    inputs = {"h264": (video_only(h264), "video", f"h264 {size}"),
              "frames": (h264, "frames", "jpeg frames")}
    if dali_available()[0]:  # what DALI's CPU decoder reads
        for codec in ("vp9", "mjpeg"):
            say(f"doctor: generating {codec} clips at {size}")
            inputs[codec] = (sample_manifest(folder, codec, w, h), "video", f"{codec} {size}")
    out = []
    for backend in BACKENDS:
        for key in PLAN[backend]:
            if key in inputs:
                m, source, label = inputs[key]
                say(f"doctor: verifying {backend} on {label}")
                out.append(_run(backend, m, source, label, cfg))
        for key in (k for k in TRAIN_PLAN.get(backend, ()) if k in inputs):
            m, source, label = inputs[key]
            say(f"doctor: verifying {backend} on {label}, train mode")
            out.append(_run(backend, m, source, label, cfg, train=True))
    return out, inputs["h264"][0]


# Generated inputs per backend. torch decodes like the reference and NVDEC takes MELD's
# H.264: theirs are MELD's codec and frame folders. DALI's CPU decoder gets H.264 too, to
# show that it cannot read it.
PLAN = {"dali-gpu": ("h264", "frames"), "dali-cpu": ("h264", "vp9", "mjpeg", "frames"),
        "torch": ("h264", "frames")}
# Train mode (flip, rotation, colour, the per-sample normalization the GPU graph does) for
# the DALI graphs, on the video each decodes and on frame folders; torch is the reference.
TRAIN_PLAN = {"dali-gpu": ("h264", "frames"), "dali-cpu": ("vp9", "frames")}


def data_checks(m: Manifest, label: str, cfg, say=None) -> list[Verdict]:
    """The first dev clips of --data through each backend, for each source it has."""
    sources = ["video"] + (["frames"] if m.has_frames else []) + (
        ["cache"] if m.has_cache else [])
    out = []
    for backend in BACKENDS:
        for source in sources:
            if say:
                say(f"doctor: verifying {backend} on {label} ({source})")
            out.append(_run(backend, m, source, label, cfg))
    return out


def auto_picks(m: Manifest, checks: list[Verdict], cfg) -> dict:
    """What `auto` picks for train (train split) and evaluate (dev), why, and whether that
    backend passed on that source here."""
    picks = {}
    for command, split in (("train", cfg.data.train_split), ("evaluate", "dev")):
        source = resolve_source(m, "auto")
        backend = resolve_backend("auto", m, split, source)
        why = ("a CUDA GPU and DALI are here" if backend == "dali-gpu" else
               "dali-gpu cannot run here: "
               + _short(backend_problem("dali-gpu", m, split, source)))
        rows = [v for v in checks if (v.backend, v.source) == (backend, source)]
        picks[command] = {"backend": backend, "source": source, "why": why,
                          "verified": bool(rows) and all(v.ok for v in rows)}
    return picks


def run_doctor(data: Path | None = None, out: Path = Path("runs"), say=None) -> dict:
    """Everything the doctor finds, as one JSON-ready dict; `ok` is False when a check that
    ran failed, an auto pick is not verified, or a folder is not writable (`failures`: one
    line each)."""
    t0 = time.perf_counter()
    cfg = load_config("seed", [])
    m = Manifest.load(data) if data is not None else None  # not prepared: one-line error
    report: dict = {"machine": machine(), "disk": disk(out, data),
                    "tolerance": {"mean": MEAN_TOL, "max": MAX_TOL, "clips": CLIPS,
                                  "units": "normalized (one grey level ~0.017)"},
                    "settings": {"num_frames": cfg.data.num_frames,
                                 "crop_size": cfg.data.crop_size,
                                 "short_side": cfg.data.short_side,
                                 "modes": ["eval", "train (DALI graphs)"]}}
    with tempfile.TemporaryDirectory(prefix="meld-dali-doctor-") as tmp:
        generated, meld_like = generated_checks(Path(tmp), cfg, say)
    given = data_checks(m, str(data), cfg, say) if m is not None else []
    report["auto"] = {"data": str(data) if m is not None else "MELD-like h264 video",
                      **auto_picks(m if m is not None else meld_like,
                                   given if m is not None else generated, cfg)}
    report["checks"] = ([{"group": "generated", **v.to_dict()} for v in generated]
                        + [{"group": "data", **v.to_dict()} for v in given])
    failures = [v.line() for v in generated + given if v.ok is False]
    failures += [f"auto picks {p['backend']} on {p['source']} for `{cmd}`, which did not pass "
                 "here" for cmd, p in report["auto"].items()
                 if isinstance(p, dict) and not p["verified"]]
    failures += [f"{d['what']}: {d['checked']} is not writable" for d in report["disk"]
                 if not d["writable"]]
    if report["machine"]["nvcuvid"] not in ("no GPU", "loaded"):  # dali-gpu cannot decode
        failures.append(f"NVDEC: {report['machine']['nvcuvid']}")
    report.update(failures=failures, ok=not failures, seconds=time.perf_counter() - t0)
    return report


# ----------------------------------------------------------------------------- the screen


def _result(v: dict) -> tuple[str, str]:
    """(runs here, verified) cells of one check."""
    if v["ok"] is None:
        return f"no: {_short(v['error'])}", ""
    if v["error"]:
        return "yes", f"[red]FAIL[/red] {_short(v['error'])}"
    word = "[green]pass[/green]" if v["ok"] else "[red]FAIL[/red]"
    return "yes", f"{word} {v['mean_abs_diff']:.3f}/{v['max_abs_diff']:.2f}"


def render(rep: dict) -> list:
    """The doctor's screen as rich renderables (fits 80 columns)."""
    from rich import box
    from rich.table import Table

    mc, tol, s, a = rep["machine"], rep["tolerance"], rep["settings"], rep["auto"]
    top = Table.grid(padding=(0, 1))
    top.add_column(style="bold", no_wrap=True)
    top.add_column()
    top.add_row("machine", f"Python {mc['python']}, torch {mc['torch']}, {mc['cores']} cores, "
                f"{mc['memory_free_gb']:.1f}/{mc['memory_total_gb']:.1f} GB memory free")
    top.add_row("GPU", (f"{mc['gpu']}, driver {mc['driver']}, {mc['gpu_memory_free_gb']:.0f}/"
                        f"{mc['gpu_memory_total_gb']:.0f} GB free" if mc["gpu"] != "none"
                        else f"none: {mc['gpu_reason']}") + f" (torch's CUDA: {mc['cuda']})")

    engines = ("no GPU" if mc["gpu"] == "none" else " ".join(
        f"{k.upper()} x{'?' if mc[k] is None else mc[k]}" for k in ("nvdec", "nvjpg")))
    top.add_row("decoders", f"DALI {mc['dali']}, PyAV {mc['pyav']} (FFmpeg {mc['ffmpeg']}), "
                f"engines: {engines}")
    if mc["nvcuvid"] != "no GPU":
        top.add_row("NVDEC", "libnvcuvid loads" if mc["nvcuvid"] == "loaded"
                    else f"[red]{mc['nvcuvid']}[/red]")
    for d in rep["disk"]:
        top.add_row(d["what"], f"{d['path']}: {d['free_gb']:.0f} GB free, "
                    + ("writable" if d["writable"] else "[red]not writable[/red]")
                    + f" (MELD: ~{d['need_gb']} GB of {d['need_why']})"
                    + ("" if d["enough"] else " [red]not enough[/red]"))
    t = Table(title=f"against the CPU reference: eval view, and train draws where marked "
              f"({s['num_frames']} frames, {s['crop_size']} px), {tol['clips']} clips each",
              box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1),
              collapse_padding=True)
    for name in ("backend", "input", "runs here", "verified"):
        t.add_column(name, no_wrap=name in ("backend", "input"))
    group = "generated"
    for v in rep["checks"]:
        if v["group"] != group:
            group = v["group"]
            t.add_section()
        what = v["data"] if group == "generated" else f"data {v['source']}"
        t.add_row(v["backend"], what + (" train" if v["mode"] == "train" else ""), *_result(v))
    bottom = Table.grid(padding=(0, 1))
    bottom.add_column(style="bold", no_wrap=True)
    bottom.add_column()
    bottom.add_row("pass", f"mean/max abs difference per clip <= {tol['mean']}/{tol['max']} "
                   "(normalized units; one grey level is ~0.017)")
    bottom.add_row("auto", "; ".join(
        f"{c}: {a[c]['backend']} on {a[c]['source']}, "
        + ("[green]verified[/green]" if a[c]["verified"] else "[red]not verified[/red]")
        for c in ("train", "evaluate")))
    why = sorted({a[c]["why"] for c in ("train", "evaluate")})
    bottom.add_row("why", f"{'; '.join(why)} (picks for {a['data']})")
    bottom.add_row("result", f"[green]ok[/green]: every check that ran passed and auto's "
                   f"picks are verified ({rep['seconds']:.0f} s)" if rep["ok"] else
                   f"[red]{len(rep['failures'])} failure(s)[/red] ({rep['seconds']:.0f} s)")
    return [top, t, bottom]
