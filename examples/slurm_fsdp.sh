#!/bin/bash
# Multi-node sharded training under SLURM: one `diffalign run` per node, each starting GPUS_PER_NODE processes through
# accelerate launch with the shipped FSDP2 config (--distributed fsdp). Submit with
#     CONFIG=sdxl/dpo_lora OUT=/shared/runs/sdxl-dpo sbatch examples/slurm_fsdp.sh data.path=/shared/pickapic_v2
# Extra arguments are config overrides. OUT must be on a file system every node sees: each process writes its own
# shards of a checkpoint into it. run.resume_from=latest makes a requeued job continue from its last checkpoint.
#SBATCH --job-name=diffalign-fsdp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
set -euo pipefail

CONFIG=${CONFIG:-sdxl/dpo_lora}
OUT=${OUT:?set OUT to an output folder on a shared file system}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PORT=${PORT:-29500}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # download the model into the HF cache before submitting

# SLURM_NODEID differs per node, so it is expanded by the task's shell (single quotes), the rest here
srun --kill-on-bad-exit=1 bash -c 'exec diffalign run offline_pref --config "$0" --distributed fsdp \
    --num-processes "$1" --num-machines "$2" --machine-rank "$SLURM_NODEID" \
    --main-process-ip "$3" --main-process-port "$4" \
    run.output_dir="$5" run.resume_from=latest "${@:6}"' \
    "$CONFIG" "$NUM_PROCESSES" "$SLURM_NNODES" "$MAIN_IP" "$PORT" "$OUT" "$@"
