#!/usr/bin/env bash
# Distributed training of an MMDetection / MMSegmentation config through torchrun
# (`rest-dense train CONFIG --launcher pytorch` in every process).
#   bash tools/dist_train.sh CONFIG NUM_PROCESSES [rest-dense train options...]
# NUM_PROCESSES: GPUs per machine (NCCL); on a machine without CUDA, CPU processes (gloo,
# chosen by rest_dense.distributed). CONFIG: a file or a shipped config name.
# Single machine: a free port on 127.0.0.1 is used unless PORT is set.
# Multi-node: set NNODES, NODE_RANK (0..NNODES-1, 0 on the master), MASTER_ADDR and PORT on
# every node (refused when one is missing or out of range).
# PYTHON selects the interpreter (default: python3 from PATH).
# detectron2 configs launch their own workers: rest-dense train CONFIG --num-gpus N
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG NUM_PROCESSES [rest-dense train options]" >&2
    exit 2
fi
CONFIG=$1
GPUS=$2
shift 2
case "$GPUS" in
    ''|*[!0-9]*|0) echo "$0: NUM_PROCESSES must be a positive integer, got '$GPUS'" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
source "$(dirname "${BASH_SOURCE[0]}")/_dist_env.sh"
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --master_port="$PORT" \
    --nproc_per_node="$GPUS" \
    -m rest_dense.cli train "$CONFIG" --launcher pytorch "$@"
