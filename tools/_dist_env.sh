# Sourced by tools/dist_train.sh and tools/dist_test.sh (bash, set -u): checks the
# multi-node variables and sets NNODES, NODE_RANK, MASTER_ADDR and PORT for torchrun.
# One machine: NNODES=1 (default), a free port on 127.0.0.1 unless PORT is set.
# Several machines (NNODES > 1): every machine runs the script with the same NNODES,
# MASTER_ADDR and PORT and its own NODE_RANK (0..NNODES-1, 0 on the machine at MASTER_ADDR);
# none of them has a default there: two machines of rank 0, or a machine looking for the
# master on its own loopback address, would each wait for the job's timeout.
_is_count() { case "$1" in ''|*[!0-9]*) return 1 ;; esac; }
NNODES=${NNODES:-1}
if ! _is_count "$NNODES" || [ "$NNODES" -lt 1 ]; then
    echo "$0: NNODES must be a positive integer (the number of machines), got '$NNODES'" >&2
    exit 2
fi
if [ "$NNODES" -gt 1 ]; then
    _missing=()
    for _var in PORT MASTER_ADDR NODE_RANK; do
        [ -n "${!_var:-}" ] || _missing+=("$_var")
    done
    if [ ${#_missing[@]} -gt 0 ]; then
        echo "$0: multi-node jobs need ${_missing[*]} set on every node (NNODES=$NNODES):" \
             "MASTER_ADDR and PORT the same on every machine, NODE_RANK 0..$((NNODES - 1))" \
             "unique per machine (0 on the machine at MASTER_ADDR)" >&2
        exit 2
    fi
fi
NODE_RANK=${NODE_RANK:-0}
if ! _is_count "$NODE_RANK" || [ "$NODE_RANK" -ge "$NNODES" ]; then
    echo "$0: NODE_RANK must be an integer in 0..$((NNODES - 1)) (NNODES=$NNODES), got" \
         "'$NODE_RANK'" >&2
    exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
if [ -z "${PORT:-}" ]; then
    PORT=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
fi
if ! _is_count "$PORT" || [ "$PORT" -lt 1 ] || [ "$PORT" -gt 65535 ]; then
    echo "$0: PORT must be a TCP port number (1..65535), got '$PORT'" >&2
    exit 2
fi
if [ "$NODE_RANK" -eq 0 ] && ! "$PYTHON" -c "
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(('', int(sys.argv[1])))
except OSError:
    sys.exit(1)" "$PORT" 2>/dev/null; then
    # node 0 hosts the rendezvous on PORT: say so here, not as torchrun's traceback (the
    # other nodes would wait for it)
    echo "$0: PORT $PORT is in use on this machine (another job or program listens there);" \
         "NODE_RANK 0 hosts the rendezvous on it: choose a free port, the same on every node (or" \
         "is another node of this job started with NODE_RANK=0 on this machine too?)" >&2
    exit 2
fi
