#!/usr/bin/env bash
# Distributed testing of an MMDetection / MMSegmentation config through torchrun
# (`rest-dense test CONFIG CHECKPOINT --launcher pytorch` in every process).
#   bash tools/dist_test.sh CONFIG CHECKPOINT NUM_GPUS [rest-dense test options...]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and PORT) on every node.
# detectron2 configs launch their own workers: rest-dense test CONFIG CHECKPOINT --num-gpus N
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT NUM_GPUS [rest-dense test options]" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
shift 3
exec torchrun \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$GPUS" \
    -m rest_dense.cli test "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
