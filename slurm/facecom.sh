#!/usr/bin/env bash
# FaceCom multi-task (gender + identity, configs/facecom.yaml) on its default (synthetic) data.
#
#   mkdir -p logs && sbatch slurm/facecom.sh                    # the defaults below
#   sbatch --nodes=2 --gpus-per-node=4 slurm/facecom.sh train.epochs=30
#   BIOMTL_OVERRIDES="data.batch_size=64" sbatch slurm/facecom.sh --resume latest
#
# Arguments and environment as for slurm/train.sh, which this runs (BIOMTL_CONFIG
# or --config replaces the default config). GPUs are requested at submission
# (--gpus-per-node=N), so CPU-only partitions work unchanged.
#
#SBATCH --job-name=facecom
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append   # a requeued job (node failure, preemption) adds to its log, keeping why it stopped
##SBATCH --gpus-per-node=8
set -euo pipefail

export BIOMTL_CONFIG="${BIOMTL_CONFIG:-configs/facecom.yaml}"
# sbatch runs a copy of this file, so find the checkout from the submit dir.
REPO="${BIOMTL_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
[[ -f "$REPO/slurm/train.sh" ]] || REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$REPO/slurm/train.sh" ]] || {
  echo "slurm/facecom.sh: error: no biomtl checkout at $REPO: submit from the repo root or set BIOMTL_REPO" >&2; exit 2; }
export BIOMTL_REPO="$REPO"
exec bash "$REPO/slurm/train.sh" "$@"
