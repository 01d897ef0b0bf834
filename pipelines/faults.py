"""What a DALI error means for a run: a clip's fault, the backend's fault, or neither.

DALI fails a whole batch when one of its decoders fails, and its message rarely says why: on
the CPU decoder an H.264 clip and a truncated VP9 file give the same "Failed to create video
decoder" (the reason, "Codec 27 (h264) is not supported by the CPU variant", goes to stderr
only). So a decoder error is judged in two steps:
1. `classify` reads DALI's text. Device faults (no NVDEC library, a CUDA driver or runtime
   error, device memory exhausted) are the backend's at once: redoing on the CPU would only
   hide them. Everything else a decoder says is a *decode* failure, judged by step 2.
2. The loader redoes the batch on the CPU path. A clip the CPU path cannot read either is a
   bad clip (skipped and reported, as always); a batch whose clips the CPU path reads is a
   fault of the backend, counted, and `FAULT_LIMIT` of them in a row stop the run.

Every text matched below is copied from DALI's source (2.x), the place named beside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FAULT_LIMIT = 3  # decode failures in a row on clips the CPU path reads: the backend is broken

# DALI names the failing operator: "Error in CPU operator `nvidia.dali.fn.decoders.video`,"
# (MIXED and GPU likewise), the context that PropagateError puts before the operator's
# message (dali/pipeline/operator/error_reporting.cc); a std::exception that is not mapped to
# another Python type (CUDAError, CUDABadAlloc, DALI's asserts) arrives as RuntimeError.
# Our own Python source (external_source) and errors raised outside DALI are not DALI's:
# they surface as they are.
OPERATOR = re.compile(r"Error in \w+ operator `nvidia\.dali\.fn\.([\w.]+)`")
DECODERS = ("decoders.video", "decoders.image")

DOCKER_VIDEO = ("in Docker, run with NVIDIA_DRIVER_CAPABILITIES including video "
                "(e.g. compute,utility,video) so the container gets libnvcuvid")

# (text in DALI's message, where DALI says it, what it means for the user). First match wins.
DEVICE_FAULTS: tuple[tuple[str, str, str], ...] = (
    # the nvcuvid stubs return this when libnvcuvid.so is absent
    # (tools/stub_generator/nvcuvid.json: not_found_error), wrapped by CUDA_CALL
    ("CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND",
     "tools/stub_generator/nvcuvid.json + include/dali/core/cuda_error.h",
     f"NVDEC not available: libnvcuvid.so could not be loaded; {DOCKER_VIDEO}"),
    ("Failed to load libnvcuvid.so",
     "dali/operators/video/legacy/reader/video_loader.h",
     f"NVDEC not available: libnvcuvid.so could not be loaded; {DOCKER_VIDEO}"),
    ("dlopen libnvcuvid.so failed",
     "dali/operators/video/dynlink_nvcuvid/dynlink_nvcuvid.cc",
     f"NVDEC not available: libnvcuvid.so could not be loaded; {DOCKER_VIDEO}"),
    # CUDABadAlloc (include/dali/core/cuda_error.h)
    ("CUDA allocation failed", "include/dali/core/cuda_error.h (CUDABadAlloc)",
     "the GPU ran out of memory in DALI: lower train.batch_size or loader.prefetch"),
    ("Can't allocate", "include/dali/core/cuda_error.h (CUDABadAlloc)",
     "the GPU ran out of memory in DALI: lower train.batch_size or loader.prefetch"),
    ("out of memory", "CUDA's own text (cudaErrorMemoryAllocation)",
     "the GPU ran out of memory in DALI: lower train.batch_size or loader.prefetch"),
    # CUDAError::get_message (include/dali/core/cuda_error.h)
    ("CUDA driver API error", "include/dali/core/cuda_error.h (CUDAError, CUresult)",
     "a CUDA driver error in DALI's decoder: check the driver with nvidia-smi and "
     "`meld-dali doctor`"),
    ("CUDA runtime API error", "include/dali/core/cuda_error.h (CUDAError, cudaError_t)",
     "a CUDA runtime error in DALI's decoder: check the driver with nvidia-smi and "
     "`meld-dali doctor`"),
)


@dataclass(frozen=True)
class DaliFailure:
    kind: str  # "device": the backend is broken, stop now; "decode": judge by the CPU path
    reason: str  # DALI's own line
    cause: str = ""  # the likely cause, for the user (device faults)


def dali_reason(text: str) -> str:
    """The line after DALI's "encountered:", the operator's own message."""
    after = text.split("encountered:", 1)[-1]
    return next((ln.strip() for ln in after.splitlines() if ln.strip()), "decoder error")


def classify(e: BaseException) -> DaliFailure | None:
    """What a DALI error means, or None for one that is neither a decoder's nor a device's
    (a bug in the graph or the source): it must surface as it is."""
    text = str(e)
    op = OPERATOR.search(text)
    if op is None or op.group(1) == "external_source":
        return None
    for needle, _where, cause in DEVICE_FAULTS:
        if needle in text:
            return DaliFailure("device", dali_reason(text), cause)
    if op.group(1) in DECODERS:
        return DaliFailure("decode", dali_reason(text))
    return None
