# Environment for AMD MI300X nodes (ROCm/RCCL), after AMD's own MoE recipe. Source it before a
# launcher. The deepspeed launcher forwards only NCCL*/PYTHON*/UCX*... variables to other
# nodes, so the RCCL_/HSA_/GPU_ ones are also written to .deepspeed_env (read on every node).
export HSA_NO_SCRATCH_RECLAIM=1      # required for MoE: scratch reclaim stalls variable-size kernels
export GPU_MAX_HW_QUEUES=2           # fewer hardware queues: less contention with RCCL
export TORCH_NCCL_HIGH_PRIORITY=1    # RCCL streams at high priority, overlapping compute
export CUDA_DEVICE_MAX_CONNECTIONS=1 # one work queue, as Megatron's TP overlap assumes
export NCCL_IB_GID_INDEX=3           # RoCE v2 GID on typical MI300X fabrics
export NCCL_CROSS_NIC=0              # keep each ring on one NIC
export NCCL_PROTO=Simple             # the protocol RCCL is validated with on MI300X
export RCCL_MSCCL_ENABLE=0           # MSCCL off: known hangs with MoE all-to-all
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
for v in HSA_NO_SCRATCH_RECLAIM GPU_MAX_HW_QUEUES TORCH_NCCL_HIGH_PRIORITY RCCL_MSCCL_ENABLE \
         CUDA_DEVICE_MAX_CONNECTIONS; do
  grep -q "^$v=" "$_root/.deepspeed_env" 2>/dev/null || echo "$v=${!v}" >> "$_root/.deepspeed_env"
done
