# Sourced by launchers/pretrain_*.sh when run with bash: pick how to start the ranks.
#   bash launchers/pretrain_moc_1b.sh [--dry-run] [section.key=value ...]
# LAUNCHER=deepspeed (default) | torchrun ; NPROC (GPUs per node, default: all visible);
# NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT for multi-node (launchers/slurm.sbatch sets them).
# EP / TP: expert- and tensor-parallel sizes (train.expert_model_parallel_size /
# train.tensor_model_parallel_size; EP must divide world/TP and the expert count).
# MAX_RESTARTS (torchrun only, default 0): relaunch all ranks after one dies; the run resumes
# from its newest complete checkpoint (docs/reliability.md).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENTRY="$ROOT/megatron_moc/training/pretrain.py"
CONFIG="$ROOT/launchers/configs/$RECIPE.yaml"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
set -- "$@" ${EP:+train.expert_model_parallel_size=$EP} ${TP:+train.tensor_model_parallel_size=$TP}
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
      --max-restarts "${MAX_RESTARTS:-0}" \
      --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
      "$ENTRY" --config "$CONFIG" "$@" ;;
  *) echo "error: LAUNCHER must be deepspeed or torchrun, got '$LAUNCHER'" >&2; exit 2 ;;
esac
