#!/usr/bin/env bash
# Plays ssh for an MPI launcher when the "hosts" are network namespaces on this machine (tests/test_multihost.py).
#
#   netns_agent.sh [ssh options] HOST COMMAND...
#   mpirun -launcher ssh -launcher-exec tests/netns_agent.sh -hosts 10.77.0.1,10.77.0.2 -n 2 ...
#
# Like ssh, it joins COMMAND's words into one line for a shell (Hydra quotes what needs quoting), and runs it
# on HOST: inside HOST's network namespace, in a UTS namespace of its own whose hostname is HOST's name, so
# that MPI_Get_processor_name and gethostname tell the hosts apart as on real machines. ssh options (Hydra
# passes -x) are accepted and ignored. Hosts come from $LENET_NETNS_HOSTS, space-separated entries
# NAMESPACE:HOSTNAME:ADDRESS; HOST may be the hostname or the address. Needs root (ip netns exec, unshare).
set -euo pipefail

while [[ $# -gt 0 && "$1" == -* ]]; do
    case "$1" in
        --) shift; break ;;
        -[BbcDEeFIiJLlmOoPpQRSWw]) shift 2 ;;   # ssh options that take a value: -p 2222, -o Key=value, -l user
        *) shift ;;                             # flags (-x, -T, -q, ...) and joined values (-p2222, -oKey=value)
    esac
done
[[ $# -ge 2 ]] || { echo "netns_agent: usage: netns_agent.sh [ssh options] HOST COMMAND..." >&2; exit 255; }
host=$1
shift

for entry in ${LENET_NETNS_HOSTS:-}; do
    IFS=: read -r ns name addr <<<"$entry"
    if [[ "$host" == "$name" || "$host" == "$addr" ]]; then
        # The inner sh sets the hostname, then runs the command line as ssh's remote shell would.
        exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$0" && exec sh -c "$1"' "$name" "$*"
    fi
done
echo "netns_agent: no namespace for host '$host' in LENET_NETNS_HOSTS='${LENET_NETNS_HOSTS:-}'" >&2
exit 255                                        # what ssh returns when it cannot reach the host
