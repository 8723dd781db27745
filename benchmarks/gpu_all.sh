#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one run (issue 16): throughput with and without
# torch.compile, FLOPs, MFU against the measured bf16 matmul rate, loader headroom, profiles;
# and (issue 31) state per rank and peak memory while building for DDP, ZeRO-3 and FSDP2.
#   benchmarks/gpu_all.sh [OUT_DIR]        # default runs/gpu_bench; JSON + logs + profiles there
# Sizes are the targets' (DCAL ViT-S/16 at 224, photometric ConvNeXt V2 at 224) plus each recipe's
# default config; the loaders use 8 workers (what a GPU node gives one rank).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu_bench}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv"
run() {  # name config overrides...
  local name=$1 config=$2; shift 2
  "$PY" benchmarks/train_throughput.py --config "$config" --device cuda --steps 50 --warmup 15 \
      --json "$OUT/$name.json" --set data.num_workers=8 "$@" 2>&1 | tee "$OUT/$name.log"
}
run dcal_vit_s16_224 configs/dcal_twins.yaml recipe.params.backbone=vit_small_patch16_224 \
    recipe.params.img_size=224 recipe.params.patch_size=16 recipe.params.depth=0 \
    data.synthetic.image_size=224 data.batch_size=64
run photometric_convnextv2_224 configs/photometric_mtl.yaml recipe.params.backbone=convnextv2 \
    recipe.params.convnext_name=convnextv2_tiny recipe.params.img_size=224 data.synthetic.image_size=224 \
    data.batch_size=64 train.channels_last=true
run facecom_default configs/facecom.yaml
run thz_mtl_default configs/thz_mtl.yaml
# the trainer's step against a bare loop on the GPU (wall-clock rates; target: within 3 %)
"$PY" benchmarks/trainer_overhead.py --steps 300 --warmup 30 --repeats 3 --image-size 112 --precision bf16 \
    2>&1 | grep -v "INFO" | tee "$OUT/trainer_overhead.log"
# state per rank and the build peak, DDP / ZeRO-3 / FSDP2 at world size 2 (memory.py launches 2 ranks):
# NCCL with 2+ GPUs; with one GPU the same census on the CPU with gloo (two ranks cannot share it)
cpu_only=""
if [ "$(nvidia-smi -L | wc -l)" -lt 2 ]; then cpu_only="CUDA_VISIBLE_DEVICES="; fi
env $cpu_only OMP_NUM_THREADS=4 "$PY" benchmarks/memory.py --strategy ddp zero3 fsdp --json "$OUT/memory.json" \
    2>&1 | tee "$OUT/memory.log"
# the same with ZeRO-3 / FSDP2 building the model whole on every rank (train.low_memory_build=never)
env $cpu_only OMP_NUM_THREADS=4 "$PY" benchmarks/memory.py --strategy ddp zero3 fsdp --low-memory-build never \
    --json "$OUT/memory_whole_build.json" 2>&1 | tee "$OUT/memory_whole_build.log"
# FSDP2's step on one GPU beside facecom_default's DDP step (same config; one rank: the sharding
# itself costs nothing here, the policy's bf16 weight copies and the unshard/reshard hooks do)
run facecom_default_fsdp configs/facecom.yaml train.strategy=fsdp
# issue 28 (docs/results.md, "Distillation, transfer, standing targets"): what did not fit the CPU budget.
# Every toolkit run of the face benchmark trains on the GPU (the trainer picks CUDA). 3 seeds of the
# distilled ViT / DCAL (both targets) beside the plain ones and the CNN teacher, the cross-set table
# on those runs, then the CNN's cheap settings for the standing targets (closed set included).
"$PY" benchmarks/face_verification.py --datasets orl,cmu --models cnn,vit,dcal,vit_kd,dcal_kd,vit_kd_token,dcal_kd_token \
    --seeds 0,1,2 --no-closed-set --jobs 4 --out "$OUT/face_kd" 2>&1 | tail -40 | tee "$OUT/face_kd.log"
"$PY" benchmarks/face_transfer.py --runs "$OUT/face_kd/results.json" --out "$OUT/face_transfer" 2>&1 \
    | tail -20 | tee "$OUT/face_transfer.log"
"$PY" benchmarks/face_verification.py --datasets orl,cmu --models cnn,cnn_long,cnn_light,cnn_emb256 --seeds 0,1,2 \
    --closed-set-models cnn,cnn_long,cnn_emb256 --jobs 4 --out "$OUT/face_cnn" 2>&1 | tail -40 | tee "$OUT/face_cnn.log"
echo "results: $OUT/*.json"
