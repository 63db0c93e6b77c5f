#!/usr/bin/env bash
# One host, every visible GPU: MirroredStrategy, one replica per GPU, one process.
#
#   bash launch/multi_gpu.sh --model_dir=/tmp/run_gpus --train_steps=2000
#   CUDA_VISIBLE_DEVICES=0,1 bash launch/multi_gpu.sh --model_dir=/tmp/run_2gpus
#
# --batch_size is the GLOBAL batch: scale it with the number of GPUs so each
# replica keeps the batch you tuned on one (64 per GPU by default here).
# Extra flags go to mto-train and override the ones below.
#
# Verified on CPU only: without GPUs the script stops with a message; the
# mirrored code path itself is tested on logical CPU devices.
set -euo pipefail

num_gpus=$(python -c "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))" 2>/dev/null)
if [[ "${num_gpus}" -lt 1 ]]; then
  echo "launch/multi_gpu.sh: no GPU visible to TensorFlow; on CPU use:" >&2
  echo "  mto-train --strategy=mirrored --num_cpu_devices=2 ..." >&2
  exit 2
fi
echo "launch/multi_gpu.sh: ${num_gpus} GPU(s), global batch $((64 * num_gpus))"
exec mto-train --strategy=mirrored --batch_size=$((64 * num_gpus)) "$@"
