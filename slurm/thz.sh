#!/usr/bin/env bash
# THz face recipes: thz_mtl (configs/thz_mtl.yaml, the default) or thz_distill on their default
# (synthetic) data.
#
#   mkdir -p logs && sbatch slurm/thz.sh                     # thz_mtl, the defaults below
#   BIOMTL_CONFIG=configs/thz_distill.yaml sbatch slurm/thz.sh   # the distillation (teacher + student)
#   sbatch --nodes=2 --gpus-per-node=4 slurm/thz.sh train.epochs=30
#   BIOMTL_OVERRIDES="data.batch_size=64" sbatch slurm/thz.sh --resume latest
#
# Arguments and environment as for slurm/train.sh, which this runs (BIOMTL_CONFIG
# or --config replaces the default config). GPUs are requested at submission
# (--gpus-per-node=N), so CPU-only partitions work unchanged.
#
#SBATCH --job-name=thz
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append   # a requeued job (node failure, preemption) adds to its log, keeping why it stopped
##SBATCH --gpus-per-node=8
set -euo pipefail

export BIOMTL_CONFIG="${BIOMTL_CONFIG:-configs/thz_mtl.yaml}"
# sbatch runs a copy of this file, so find the checkout from the submit dir.
REPO="${BIOMTL_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
[[ -f "$REPO/slurm/train.sh" ]] || REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$REPO/slurm/train.sh" ]] || {
  echo "slurm/thz.sh: error: no biomtl checkout at $REPO: submit from the repo root or set BIOMTL_REPO" >&2; exit 2; }
export BIOMTL_REPO="$REPO"
exec bash "$REPO/slurm/train.sh" "$@"
