#!/usr/bin/env bash
# A selection job on several Slurm nodes: one torchrun per node, one process per GPU.
#
#   sbatch --nodes 4 --gpus-per-node 8 scripts/slurm_select.sh configs/got_d.yaml output_dir=/shared/out/got_d
#
# Every process reads the pool (a Hub id, or files on a file system all nodes see) and takes its
# contiguous shard; the output folder and the cache must be on that shared file system too (rank 0
# renames the finished folder into place; each process writes its own rows of scored/ and selected/).
#SBATCH --job-name=hf-otselect
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail

config=${1:?usage: sbatch scripts/slurm_select.sh CONFIG [key=value ...]}
shift
gpus=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
gpus=$(( gpus > 0 ? gpus : 1 ))
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# srun starts one torchrun per node; torchrun starts $gpus processes and the c10d rendezvous on the
# first node joins them.
srun torchrun \
    --nnodes "$SLURM_NNODES" \
    --nproc_per_node "$gpus" \
    --rdzv_id "$SLURM_JOB_ID" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$head:29500" \
    -m hf_otselect.cli select --config "$config" "$@"
