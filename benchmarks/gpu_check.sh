#!/usr/bin/env bash
# The first GPU run (issue 30), at most 8 minutes on one H100: one paper-tier cell end to end, `accelerate launch`
# with an NCCL group, and the scan and one Grad-Prune round on a ViT-B/16 at 224 px, each printed beside its CPU
# figure (benchmarks/gpu_check.py says what each check runs).
#
#   bash benchmarks/gpu_check.sh [DATA]     # DATA: the folder holding cifar10/ (default ../shared/data)
#
# Results: benchmarks/results/gpu-check/<device>/ (and the rows the checks write); copied to $OUT when it is set
# (the device tool brings back what is written there).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
[ -d "$DATA/cifar10" ] || { [ -d shared/data/cifar10 ] && DATA=shared/data; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
HF_HUB_OFFLINE=1 python benchmarks/gpu_check.py --data "$DATA"
code=$?
if [ -n "${OUT:-}" ]; then
  for d in gpu-check paper-cpu-gpu multiproc scale-gpu; do
    [ -d "benchmarks/results/$d" ] && cp -r "benchmarks/results/$d" "$OUT/"
  done
fi
exit $code
