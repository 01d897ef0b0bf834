#!/usr/bin/env bash
# One GPU session on a lent, bare GPU machine (no internet, no DALI), in one command after
# the packages arrived. Plan: about 4-5 minutes to start the machine and carry DALI over,
# then this script: `gpu_check --budget 240` (proofs, then figures), under 10 minutes in all.
#
# Carrying DALI: DALI and its Python dependencies that the machine lacks (optree, gast,
# astunparse, libcst, makefun, nvtx, six, PyAV, pytorchvideo and its own) are packed here as one xz-compressed
# site-packages tree cut into parts of <= 58 MiB (git-ignored, .gpu-carry/p0..pN); each part
# travels with one call and is copied to /tmp/parts on the machine while it stays warm:
#     mkdir -p /tmp/parts && cp .gpu-carry/pK/* /tmp/parts/
# The last call carries the last part and runs this script:
#     cp .gpu-carry/pN/* /tmp/parts/ && bash bench/gpu_session.sh "$OUT"
# It unpacks the parts (once per machine), installs the project without dependencies,
# runs the check and leaves gpu_check.json and the bench JSON under OUT.
set -euo pipefail
OUT=${1:?usage: bench/gpu_session.sh OUT_DIR [BUDGET_S]}
BUDGET=${2:-240}
SITE=/tmp/site
if [ ! -d "$SITE/nvidia/dali" ]; then
  mkdir -p "$SITE"
  cat /tmp/parts/part* | xz -d | tar -x -C "$SITE"
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .
mkdir -p "$OUT"
# the decode engines as NVML sees them, beside the check (a second witness for NVDEC)
(nvidia-smi dmon -s u -d 1 > "$OUT/dmon.txt" 2>&1 &) || true
rc=0
timeout $((BUDGET + 120)) python3 -m meld_dali.bench.gpu_check "$OUT/gpu-check" \
  --budget "$BUDGET" || rc=$?
pkill -f "nvidia-smi dmon" || true
cp bench/results/gpu_check_*.json "$OUT/" 2>/dev/null || true
exit $rc
