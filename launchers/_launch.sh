# Sourced by launchers/pretrain_*.sh when run with bash: pick how to start the ranks.
#   bash launchers/pretrain_moc_1b.sh [--dry-run] [section.key=value ...]
# LAUNCHER=deepspeed (default) | torchrun ; NPROC (GPUs per node, default: all visible);
# NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT for multi-node (launchers/slurm.sbatch sets them).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENTRY="$ROOT/megatron_moc/training/pretrain.py"
CONFIG="$ROOT/launchers/configs/$RECIPE.yaml"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then  # no GPU, no launcher: print config and parameter counts
    exec python3 "$ENTRY" --config "$CONFIG" "$@"
  fi
done
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')}
case "${LAUNCHER:-deepspeed}" in
  deepspeed)
    exec deepspeed --num_nodes "${NNODES:-1}" --num_gpus "$NPROC" "$ENTRY" --config "$CONFIG" "$@" ;;
  torchrun)
    exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC" \
      --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
      "$ENTRY" --config "$CONFIG" "$@" ;;
  *) echo "error: LAUNCHER must be deepspeed or torchrun, got '$LAUNCHER'" >&2; exit 2 ;;
esac
