#!/usr/bin/env bash
# Launch lenet-train across the hosts of a hostfile, with the mpirun that is on PATH.
#
#   deploy/launch-hostfile.sh [extra lenet-train flags...]
#   EVALUATOR=evalhost KEYS_DIR=keys deploy/launch-hostfile.sh --epochs 10
#   DRY_RUN=1 deploy/launch-hostfile.sh          # print the mpirun lines, run nothing
#
# MPICH (and Intel MPI, both Hydra) and Open MPI spell the same launch differently; the flavour is
# read from `mpirun --version`. The two lines this script runs are, with the defaults below:
#
#   MPICH:    mpirun -launcher ssh -launcher-exec ssh -f deploy/hosts.mpich -ppn 2 -n 4 \
#                    -genv OMP_NUM_THREADS 1 -genv OPENBLAS_NUM_THREADS 1 lenet-train ...
#   Open MPI: mpirun --hostfile deploy/hosts.openmpi --map-by ppr:2:node --bind-to none -n 4 \
#                    --mca plm_rsh_agent ssh -x OMP_NUM_THREADS=1 -x OPENBLAS_NUM_THREADS=1 \
#                    -x PATH -x LENET_DATA_DIR lenet-train ...
#
# Every host needs the same Python environment at the same path (Hydra starts its proxy there) and
# passwordless ssh from this host. A pre-flight `lenet-train --check` with the same flags runs first.
# One attempt: for restarts after a rank dies, and a lost host left out, see lenet-launch (docs/restarts.md).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

MPIRUN=${MPIRUN:-mpirun}
MPI_FLAVOR=${MPI_FLAVOR:-}             # mpich | openmpi; empty: detect from `mpirun --version`
HOSTFILE=${HOSTFILE:-}                 # empty: deploy/hosts.mpich or deploy/hosts.openmpi
RANKS_PER_NODE=${RANKS_PER_NODE:-2}    # at most the physical cores of a node / THREADS
NP=${NP:-}                             # total ranks; empty: hosts in HOSTFILE * RANKS_PER_NODE
THREADS=${THREADS:-1}                  # BLAS threads per rank
LAUNCH_AGENT=${LAUNCH_AGENT:-ssh}      # the command that starts processes on another host
LENET_TRAIN=${LENET_TRAIN:-$(command -v lenet-train || echo lenet-train)}
PUBLISH_BIND=${PUBLISH_BIND:-0.0.0.0}  # rank 0 binds here; the evaluator connects to rank 0's host
PUBLISH_PORT=${PUBLISH_PORT:-5555}
EVALUATOR=${EVALUATOR:-}               # host running lenet-evaluator --results-bind; empty: trainer default
RESULTS_PORT=${RESULTS_PORT:-5556}
KEYS_DIR=${KEYS_DIR:-}                 # holds trainer.key, trainer.key_secret, authorized/ (CurveZMQ)
CHECKPOINT_DIR=${CHECKPOINT_DIR:-runs/checkpoints}   # on rank 0's host
PREFLIGHT=${PREFLIGHT:-1}              # 0 skips `lenet-train --check`
DRY_RUN=${DRY_RUN:-0}

die() { echo "launch-hostfile: $*" >&2; exit 2; }

run() {
    # Show the exact command line, quoted so it can be pasted back into a shell.
    printf '+' >&2; printf ' %q' "$@" >&2; printf '\n' >&2
    if [[ "$DRY_RUN" != 1 ]]; then "$@"; fi
}

detect_flavor() {
    local version
    version=$("$MPIRUN" --version 2>&1) || true
    case "$version" in
        *"Open MPI"* | *"OpenRTE"* | *"Open RTE"*) echo openmpi ;;
        *HYDRA* | *MPICH* | *"Intel(R) MPI"*) echo mpich ;;
        *) echo unknown ;;
    esac
}

command -v "$MPIRUN" >/dev/null 2>&1 || die "no '$MPIRUN' on PATH (pip install \".[mpich]\" brings one)"
[[ -n "$MPI_FLAVOR" ]] || MPI_FLAVOR=$(detect_flavor)
case "$MPI_FLAVOR" in
    mpich | openmpi) ;;
    *) die "cannot tell MPICH from Open MPI by '$MPIRUN --version'; set MPI_FLAVOR=mpich or MPI_FLAVOR=openmpi" ;;
esac

[[ -n "$HOSTFILE" ]] || HOSTFILE="$here/hosts.$MPI_FLAVOR"
[[ -r "$HOSTFILE" ]] || die "hostfile '$HOSTFILE' is not readable"
if [[ -z "$NP" ]]; then
    nodes=$(grep -cvE '^[[:space:]]*(#|$)' "$HOSTFILE" || true)
    [[ "$nodes" -gt 0 ]] || die "hostfile '$HOSTFILE' lists no hosts"
    NP=$((nodes * RANKS_PER_NODE))
fi

train_args=(--threads "$THREADS" --checkpoint-dir "$CHECKPOINT_DIR"
            --publish "tcp://$PUBLISH_BIND:$PUBLISH_PORT")
if [[ -n "$EVALUATOR" ]]; then
    train_args+=(--results "tcp://$EVALUATOR:$RESULTS_PORT")
fi
if [[ -n "$KEYS_DIR" ]]; then
    # lenet-train reads its public key from the .key_secret file, which holds the pair.
    train_args+=(--curve-secret-key "$KEYS_DIR/trainer.key_secret"
                 --curve-authorized "$KEYS_DIR/authorized")
elif [[ "$PUBLISH_BIND" != 127.* ]]; then
    echo "launch-hostfile: warning: publishing on $PUBLISH_BIND without CurveZMQ keys (set KEYS_DIR)" >&2
fi

# Environment every rank needs. Hydra forwards the whole environment by default; Open MPI only what -x names.
export OMP_NUM_THREADS="$THREADS" OPENBLAS_NUM_THREADS="$THREADS"
if [[ "$MPI_FLAVOR" == mpich ]]; then
    launch=("$MPIRUN" -launcher ssh -launcher-exec "$LAUNCH_AGENT" -f "$HOSTFILE" -ppn "$RANKS_PER_NODE"
            -n "$NP" -genv OMP_NUM_THREADS "$THREADS" -genv OPENBLAS_NUM_THREADS "$THREADS")
else
    launch=("$MPIRUN" --hostfile "$HOSTFILE" --map-by "ppr:$RANKS_PER_NODE:node" --bind-to none
            -n "$NP" --mca plm_rsh_agent "$LAUNCH_AGENT"
            -x "OMP_NUM_THREADS=$THREADS" -x "OPENBLAS_NUM_THREADS=$THREADS" -x PATH)
    for var in LENET_DATA_DIR LENET_CACHE_DIR LD_LIBRARY_PATH VIRTUAL_ENV; do
        if [[ -n "${!var:-}" ]]; then launch+=(-x "$var"); fi
    done
fi

if [[ "$PREFLIGHT" == 1 ]]; then
    run "${launch[@]}" "$LENET_TRAIN" --check "${train_args[@]}" "$@"
fi
run "${launch[@]}" "$LENET_TRAIN" "${train_args[@]}" "$@"
