#!/usr/bin/env bash
# Distributed training of an MMDetection / MMSegmentation config through torchrun
# (`rest-dense train CONFIG --launcher pytorch` in every process).
#   bash tools/dist_train.sh CONFIG NUM_PROCESSES [rest-dense train options...]
# NUM_PROCESSES: GPUs per machine (NCCL); on a machine without CUDA, CPU processes (gloo,
# chosen by rest_dense.distributed). CONFIG: a file or a shipped config name.
# Single machine: a free port on 127.0.0.1 is used unless PORT is set.
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and PORT on every node.
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
    -m rest_dense.cli train "$CONFIG" --launcher pytorch "$@"
