#!/usr/bin/env bash
# Distributed testing of an MMDetection / MMSegmentation config through torchrun
# (`rest-dense test CONFIG CHECKPOINT --launcher pytorch` in every process).
#   bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCESSES [rest-dense test options...]
# NUM_PROCESSES: GPUs per machine (NCCL); on a machine without CUDA, CPU processes (gloo).
# Single machine: a free port on 127.0.0.1 is used unless PORT is set.
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT on every node.
# PYTHON selects the interpreter (default: python3 from PATH).
# detectron2 configs launch their own workers: rest-dense test CONFIG CHECKPOINT --num-gpus N
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT NUM_PROCESSES [rest-dense test options]" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
shift 3
case "$GPUS" in
    ''|*[!0-9]*|0) echo "$0: NUM_PROCESSES must be a positive integer, got '$GPUS'" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
if [ -z "${PORT:-}" ]; then
    if [ "$NNODES" -gt 1 ]; then
        echo "$0: multi-node jobs need PORT (and MASTER_ADDR) set on every node" >&2
        exit 2
    fi
    PORT=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
fi
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="$PORT" \
    --nproc_per_node="$GPUS" \
    -m rest_dense.cli test "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
