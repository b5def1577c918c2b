#!/usr/bin/env bash
# Distributed testing of an MMDetection / MMSegmentation config through torchrun
# (`rest-dense test CONFIG CHECKPOINT --launcher pytorch` in every process).
#   bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCESSES [rest-dense test options...]
# NUM_PROCESSES: GPUs per machine (NCCL); on a machine without CUDA, CPU processes (gloo).
# Single machine: a free port on 127.0.0.1 is used unless PORT is set.
# Multi-node: set NNODES, NODE_RANK (0..NNODES-1, 0 on the master), MASTER_ADDR and PORT on
# every node (tools/_dist_env.sh refuses one missing or out of range).
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
source "$(dirname "${BASH_SOURCE[0]}")/_dist_env.sh"
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --master_port="$PORT" \
    --nproc_per_node="$GPUS" \
    -m rest_dense.cli test "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
