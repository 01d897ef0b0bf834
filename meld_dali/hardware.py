"""Facts about hardware and decoders, one place each: what a GPU has by name (NVDEC and
NVJPG engines, dense fp16/bf16 peak, whether regional torch.compile was measured faster
there) and which decoder takes which codec. The DALI loader, the bench, launch, the backend
choice, the cache report and `meld-dali doctor` all read these tables; nothing else holds
such a fact.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    """What one GPU model has. None = not known (not measured or not published here)."""
    nvdec: int | None  # hardware video decoders: decode sessions worth running at once
    nvjpg: int | None  # hardware JPEG decoders (nvJPEG's hardware path); 0 = none
    peak_tflops: float | None  # dense fp16/bf16 tensor-core peak (no sparsity), for MFU
    compile_faster: bool = False  # `bench train --ab` measured regional compile > eager


# By device-name words (torch.cuda.get_device_name()); the first row whose words are all in
# the name wins, so the more specific names come first ("NVIDIA L40S" is not an "L4", an
# "H100 PCIe" is not the SXM part). NVIDIA's data sheets: Hopper and Blackwell parts have
# 7 NVDEC and 7 NVJPG engines. compile_faster is False everywhere: on one H200 (batch 16)
# whole-model compile gave +3% (227 vs 220 clips/s) after ~2 min of compilation, on an H100
# (batch 8) it was slower (119 vs 164): never a default slower than eager.
GPUS: tuple[tuple[str, Gpu], ...] = (
    ("H100 PCIe", Gpu(7, 7, 756.0)), ("H100", Gpu(7, 7, 989.0)), ("H200", Gpu(7, 7, 989.0)),
    ("H20", Gpu(7, 7, None)), ("GH200", Gpu(7, 7, None)), ("B200", Gpu(7, 7, None)),
    ("A100", Gpu(5, 1, 312.0)), ("A30", Gpu(4, 1, None)), ("L40S", Gpu(3, 4, 362.0)),
    ("L40", Gpu(3, 4, None)), ("L4", Gpu(4, 4, 121.0)), ("A10", Gpu(1, None, 125.0)),
    ("T4", Gpu(2, 0, 65.0)), ("V100", Gpu(1, 0, 125.0)))
DEFAULT_NVDEC = 2  # decode sessions on a GPU missing from GPUS


def gpu_facts(name: str) -> Gpu | None:
    """The row of GPUS for a device name, or None for a GPU not in the table."""
    words = set(re.split(r"[\s\-]+", name))
    return next((gpu for key, gpu in GPUS if set(key.split()) <= words), None)


def nvdec_engines(name: str) -> int:
    """NVDEC engines of a GPU by name (DEFAULT_NVDEC when unknown)."""
    g = gpu_facts(name)
    return g.nvdec if g and g.nvdec else DEFAULT_NVDEC


def cpu_cores() -> int:
    """The CPU cores this process may run on (what PyTorch's DataLoader compares its worker
    count with), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def local_ranks() -> int:
    """The processes torchrun starts on this node (LOCAL_WORLD_SIZE), 1 outside torchrun."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    except ValueError:
        return 1


# ----------------------------------------------------------------------------- decoders


@dataclass(frozen=True)
class Decoder:
    """What a backend's decoder takes. `codecs` None = any codec FFmpeg decodes; a codec in
    `pix_fmts` is taken only in those pixel formats and never in the `bad_profiles`."""
    name: str
    codecs: frozenset[str] | None = None
    pix_fmts: dict[str, tuple[str, ...]] | None = None
    bad_profiles: dict[str, tuple[str, ...]] | None = None


# The codec capability of each loader backend ("jpeg" = JPEG frame folders). DALI's CPU
# decoders take VP8, VP9 and MJPEG video and JPEG images (measured, DALI 2.4); NVDEC takes
# H.264 only as 8-bit 4:2:0 (not High 10, 4:2:2 or 4:4:4); PyAV takes what FFmpeg takes.
DECODERS: dict[str, Decoder] = {
    "dali-cpu": Decoder("DALI's CPU video decoder",
                        codecs=frozenset({"vp8", "vp9", "mjpeg", "jpeg"})),
    "dali-gpu": Decoder("NVDEC", pix_fmts={"h264": ("yuv420p", "yuvj420p", "nv12")},
                        bad_profiles={"h264": (
                            "High 10", "High 10 Intra", "High 4:2:2", "High 4:2:2 Intra",
                            "High 4:4:4", "High 4:4:4 Predictive", "High 4:4:4 Intra",
                            "CAVLC 4:4:4")}),
    "torch": Decoder("PyAV (FFmpeg)"),
}


def decodes(backend: str, codec: str | None, pix_fmt: str | None = None,
            profile: str | None = None) -> bool:
    """Whether `backend`'s decoder takes a stream of this codec (and, where it matters,
    pixel format and profile). An unknown codec (None) is taken only by a decoder that
    takes any codec."""
    d = DECODERS[backend]
    if d.codecs is not None and codec not in d.codecs:
        return False
    if d.pix_fmts and codec in d.pix_fmts and pix_fmt not in d.pix_fmts[codec]:
        return False
    return not (d.bad_profiles and profile in d.bad_profiles.get(codec or "", ()))


NVCUVID = ("libnvcuvid.so", "libnvcuvid.so.1")  # the names DALI dlopens (dynlink_nvcuvid.cc)


def nvcuvid_problem() -> str:
    """Why NVDEC's library cannot be loaded in this process ('' when it can): DALI's video
    decoders run through libnvcuvid, which the driver installs and a container only gets with
    the `video` driver capability."""
    import ctypes

    errors = []
    for name in NVCUVID:
        try:
            ctypes.CDLL(name)
            return ""
        except OSError as e:
            errors.append(str(e))
    caps = os.environ.get("NVIDIA_DRIVER_CAPABILITIES")
    hint = ("; in Docker, run with NVIDIA_DRIVER_CAPABILITIES including video (it is "
            f"{caps!r} here)" if caps is not None and "video" not in caps and caps != "all"
            else "; it comes with the NVIDIA driver (in Docker: the `video` capability)")
    return f"libnvcuvid cannot be loaded ({errors[-1]}){hint}"
