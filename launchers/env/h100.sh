# Environment for NVIDIA H100 nodes. Source it before a launcher (slurm.sbatch does).
# Megatron's TP/SP communication overlap assumes one CUDA work queue in flight.
export CUDA_DEVICE_MAX_CONNECTIONS=1
# Expose the InfiniBand HCAs to NCCL (adjust to your fabric; unset = NCCL auto-detects).
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
# NVLink SHARP (multicast) off: it reserves memory and has hung on some drivers/clusters.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# Surface NCCL errors instead of hanging forever on a dead peer.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# Keep allocator fragmentation down for MoE's variable-size expert batches.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
