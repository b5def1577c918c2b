#!/usr/bin/env bash
# Distributed training of an MMDetection / MMSegmentation config through torchrun
# (`rest-dense train CONFIG --launcher pytorch` in every process).
#   bash tools/dist_train.sh CONFIG NUM_GPUS [rest-dense train options...]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and PORT) on every node.
# detectron2 configs launch their own workers: rest-dense train CONFIG --num-gpus N
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG NUM_GPUS [rest-dense train options]" >&2
    exit 2
fi
CONFIG=$1
GPUS=$2
shift 2
exec torchrun \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$GPUS" \
    -m rest_dense.cli train "$CONFIG" --launcher pytorch "$@"
