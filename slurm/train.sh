#!/usr/bin/env bash
# Train any biomtl config on a SLURM allocation: one srun task per node, each
# starting one torchrun agent; the agents meet by c10d rendezvous on the first
# node of the allocation and start the ranks of their node.
#
#   sbatch slurm/train.sh --config configs/facecom.yaml train.lr=3e-4
#   sbatch --nodes=2 --gpus-per-node=4 slurm/train.sh --config configs/dcal_twins.yaml
#   BIOMTL_CONFIG=configs/facecom.yaml BIOMTL_OVERRIDES="train.epochs=2" sbatch slurm/train.sh
#
# The recipe scripts (slurm/dcal.sh, slurm/facecom.sh) set a default config and
# run this one. Arguments: [--config FILE] [--resume latest|PATH] [key=value ...]
# (a --config argument wins over BIOMTL_CONFIG; BIOMTL_OVERRIDES, split on
# whitespace, comes before the argument overrides, so arguments win).
#
# Environment (all optional):
#   BIOMTL_CONFIG           config file (relative: to the submit dir, then to the repo)
#   BIOMTL_OVERRIDES        "key=value key=value" overrides
#   BIOMTL_NPROC_PER_NODE   ranks per node (default: GPUs visible on the node, or BIOMTL_CPU_NPROC_PER_NODE)
#   BIOMTL_CPU_NPROC_PER_NODE  ranks per node without GPUs (default 1)
#   BIOMTL_MAX_RESTARTS     torchrun --max-restarts (default 3); a restarted group resumes from the
#                           run's latest checkpoint by itself
#   BIOMTL_RDZV_HOST        rendezvous host (default: the address SLURM reaches the allocation's first
#                           node at, its NodeAddr, so node names need not resolve; set another address or
#                           name to use another network). With the default, the first node's agent hosts the
#                           rendezvous store (torchrun --rdzv-conf=is_host=true, after checking that the port
#                           is free there: a taken port is one line and exit 2). Each agent
#                           (launch/slurm_agent.py) advertises its own node's NodeAddr as --local-addr (rank
#                           0's becomes MASTER_ADDR) and, where GLOO_SOCKET_IFNAME is unset, points gloo at the
#                           interface holding that address.
#   BIOMTL_RDZV_PORT        rendezvous port (default 20000 + job id % 20000)
#   BIOMTL_REPO             the biomtl checkout (default: the submit dir)
#   BIOMTL_PYTHON           interpreter (default: $BIOMTL_REPO/.venv/bin/python, else python3/python)
#
# GPUs are not requested here, so the script runs unchanged on CPU-only
# partitions; ask for them when submitting (sbatch --gpus-per-node=N ...) or
# uncomment the line below. The output directory logs/ must exist in the submit
# dir (SLURM does not create it): mkdir -p logs (biomtl launch --slurm does).
#
#SBATCH --job-name=biomtl
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append   # a requeued job (node failure, preemption) adds to its log, keeping why it stopped
##SBATCH --gpus-per-node=8
set -euo pipefail

die() { echo "slurm/train.sh: error: $*" >&2; exit 2; }

[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a SLURM job: submit with sbatch (or run inside salloc)"

REPO="${BIOMTL_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
[[ -f "$REPO/dist_train/main.py" ]] \
  || die "no biomtl checkout at $REPO: submit from the repo root or set BIOMTL_REPO"
REPO="$(cd "$REPO" && pwd)"

PY="${BIOMTL_PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"
  else PY="$(command -v python3 || command -v python || true)"; fi
fi
[[ -n "$PY" ]] || die "no python found: set BIOMTL_PYTHON"

CONFIG="${BIOMTL_CONFIG:-}"
RESUME=()
ARGS=()
while (($#)); do
  case "$1" in
    --config) [[ $# -ge 2 ]] || die "--config needs a file"; CONFIG="$2"; shift 2 ;;
    --config=*) CONFIG="${1#--config=}"; shift ;;
    --resume) [[ $# -ge 2 ]] || die "--resume needs latest or a path"; RESUME=(--resume "$2"); shift 2 ;;
    --resume=*) RESUME=(--resume "${1#--resume=}"); shift ;;
    -*) die "unknown option $1 (arguments: [--config FILE] [--resume latest|PATH] [key=value ...])" ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
[[ -n "$CONFIG" ]] || die "no config: pass --config FILE or set BIOMTL_CONFIG"
if [[ ! -f "$CONFIG" && "$CONFIG" != /* && -f "$REPO/$CONFIG" ]]; then CONFIG="$REPO/$CONFIG"; fi
[[ -f "$CONFIG" ]] || die "config not found: $CONFIG"
read -r -a ENV_OVERRIDES <<< "${BIOMTL_OVERRIDES:-}"

gpus_visible() {
  local n=0
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then n="$SLURM_GPUS_ON_NODE"
  elif [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    n=$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c '^[0-9A-Za-z]' || true)
    [[ "$CUDA_VISIBLE_DEVICES" == NoDevFiles ]] && n=0
  elif command -v nvidia-smi > /dev/null 2>&1; then n=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)
  fi
  echo "${n:-0}"
}
NPROC="${BIOMTL_NPROC_PER_NODE:-}"
if [[ -z "$NPROC" ]]; then
  NPROC="$(gpus_visible)"
  [[ "$NPROC" -gt 0 ]] || NPROC="${BIOMTL_CPU_NPROC_PER_NODE:-1}"
fi

NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
# The allocation's nodes, in SLURM_NODEID order. scontrol answers 0 even for a list it cannot
# parse (printing "Invalid hostlist" or a mangled name): check the count and the characters.
mapfile -t NODES < <(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2> /dev/null || true)
if [[ ${#NODES[@]} -ne "$NNODES" || "${NODES[*]}" =~ [^A-Za-z0-9._\ -] ]]; then
  die "cannot parse the node list SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}' into $NNODES node name(s)" \
      "(scontrol show hostnames gave: ${NODES[*]:-nothing})"
fi
# Each node's address as SLURM reaches it (NodeAddr: the node name where none is set): node names
# need not resolve on the nodes themselves. One scontrol call for the whole job, read by each agent.
BIOMTL_NODE_ADDRS="$(scontrol show node -o "$SLURM_JOB_NODELIST" 2> /dev/null \
  | sed -n 's/^NodeName=\([^ ]*\) .*NodeAddr=\([^ ]*\) .*/\1=\2/p' | tr '\n' ' ' || true)"
export BIOMTL_NODE_ADDRS
HEAD_ADDR="$(tr ' ' '\n' <<< "$BIOMTL_NODE_ADDRS" | sed -n "s/^${NODES[0]//./\\.}=//p" | head -n1)"
HEAD="${BIOMTL_RDZV_HOST:-${HEAD_ADDR:-${NODES[0]}}}"
PORT="${BIOMTL_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
[[ "$PORT" =~ ^[0-9]+$ && "$PORT" -gt 0 && "$PORT" -lt 65536 ]] || die "BIOMTL_RDZV_PORT=$PORT: not a port number"
MAX_RESTARTS="${BIOMTL_MAX_RESTARTS:-3}"
CPUS="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"  # --exclusive without --cpus-per-task: the node's

# torchrun restarts are flaky when the rendezvous store is shared with the
# workers (PyTorch issues 135712, 167288).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CPUS / NPROC > 0 ? CPUS / NPROC : 1 ))}"
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

# The node that hosts the rendezvous store (its SLURM_NODEID), when known: the first node by default.
if [[ -z "${BIOMTL_RDZV_HOST:-}" ]]; then RDZV_NODE=0; else RDZV_NODE=""; fi
export BIOMTL_RDZV_NODE="$RDZV_NODE"

echo "biomtl: job $SLURM_JOB_ID on $NNODES node(s) [$SLURM_JOB_NODELIST], $NPROC rank(s) per node," \
     "rendezvous $HEAD:$PORT${RDZV_NODE:+ (hosted by node $RDZV_NODE, ${NODES[0]})}, max restarts $MAX_RESTARTS"
echo "biomtl: $PY $REPO/dist_train/main.py --config $CONFIG ${RESUME[*]-} ${ENV_OVERRIDES[*]-} ${ARGS[*]-}"

# srun does not pass the job's --cpus-per-task on to the step (SLURM >= 22.05): say it.
# Each task (launch/slurm_agent.py) decides for itself whether its node hosts the rendezvous
# store, advertises its NodeAddr, points gloo at that address's interface, then runs torchrun.
exec srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS" \
  --kill-on-bad-exit=1 \
  "$PY" "$REPO/launch/slurm_agent.py" \
    --nnodes="$NNODES" --nproc-per-node="$NPROC" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="$SLURM_JOB_ID" \
    --max-restarts="$MAX_RESTARTS" \
    "$REPO/dist_train/main.py" --config "$CONFIG" ${RESUME[@]+"${RESUME[@]}"} ${ENV_OVERRIDES[@]+"${ENV_OVERRIDES[@]}"} ${ARGS[@]+"${ARGS[@]}"}
