#!/usr/bin/env bash
# Launch moetron with torchrun: one process per local GPU (or 1 on a CPU machine), any number of nodes.
#
#   launch/torchrun.sh [hydra overrides...]                       # this machine, all its GPUs
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=host0 launch/torchrun.sh ...  # on each of 4 nodes (NODE_RANK 0..3)
#   NPROC_PER_NODE=2 launch/torchrun.sh model=tiny trainer.device=cpu   # 2 CPU processes (gloo)
#
# Environment: NPROC_PER_NODE (default: number of GPUs, else 1), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), RDZV_ID (moetron), PYTHON (python3). Everything else
# is a Hydra override.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."

PY=${PYTHON:-python3}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$("$PY" -c 'import torch; print(torch.cuda.device_count() or 1)')
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

# One run directory for all ranks: resolve ${now:...} once here unless the caller chose one.
args=("$@")
if ! printf '%s\n' "${args[@]+"${args[@]}"}" | grep -qE '^(trainer\.run_dir=|-m$|--multirun$)'; then
  args+=("trainer.run_dir=runs/$(date +%Y%m%d-%H%M%S)")
fi

# NCCL settings are the launcher's business (DESIGN.md: environment variables are not configuration);
# log them so a run's environment is on record.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}
echo "launch: nnodes=$NNODES node_rank=$NODE_RANK nproc_per_node=$NPROC_PER_NODE master=$MASTER_ADDR:$MASTER_PORT omp=$OMP_NUM_THREADS"
env | grep -E '^(NCCL_|CUDA_VISIBLE_DEVICES|TORCH_NCCL_)' | sort | sed 's/^/launch: /' || true

if [[ "$NNODES" == 1 ]]; then
  rdzv=(--standalone)
else
  rdzv=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --rdzv_backend c10d
        --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-moetron}")
fi
exec "$PY" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node "$NPROC_PER_NODE" -m moetron.train "${args[@]+"${args[@]}"}"
