#!/usr/bin/env bash
# Several GPUs of one host: `opd-jax train CONFIG [ARGS...]`.
#
# Usage: launch/multi_gpu.sh CONFIG [--set KEY=VALUE ...]
#
# By default ONE process drives every visible GPU: the normal JAX way (a single
# controller; the config's mesh spreads parameters and batch over the local devices).
# PROCESS_PER=gpu starts one process per GPU instead, connected through
# jax.distributed (coordinator on this host); every process runs the same command and
# process 0 logs.
#
# Environment:
#   CUDA_VISIBLE_DEVICES  the GPUs to use (default: all)
#   PROCESS_PER           "host" (default) or "gpu"
#   GPUS                  with PROCESS_PER=gpu: how many processes (default: the visible
#                         GPUs, from CUDA_VISIBLE_DEVICES or nvidia-smi -L)
#   JAX_COORDINATOR_PORT  with PROCESS_PER=gpu: the coordinator's port (default 8476)
#   OPD_JAX               the command (default "opd-jax"; "python3 -m opd_jax.cli" in a checkout)
set -euo pipefail

usage() {
  sed -n '2,21s/^# \{0,1\}//p' "$0"
  exit "${1:-0}"
}
[[ $# -ge 1 ]] || usage 2
[[ $1 == -h || $1 == --help ]] && usage

read -r -a opd_jax <<<"${OPD_JAX:-opd-jax}"
case "${PROCESS_PER:-host}" in
  host)
    export OPD_JAX_DISTRIBUTED=off
    exec "${opd_jax[@]}" train "$@"
    ;;
  gpu) ;;
  *)
    echo "PROCESS_PER=${PROCESS_PER}: use host or gpu" >&2
    exit 2
    ;;
esac

if [[ -n ${GPUS:-} ]]; then
  gpus=$GPUS
elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
  gpus=${#visible[@]}
else
  gpus=$(nvidia-smi -L | wc -l)
fi
export JAX_COORDINATOR_ADDRESS="127.0.0.1:${JAX_COORDINATOR_PORT:-8476}"
export JAX_NUM_PROCESSES=$gpus

pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; }
trap stop INT TERM
for ((i = 0; i < gpus; i++)); do
  # JAX_LOCAL_DEVICE_IDS (read by jax.distributed.initialize) gives process i GPU i.
  JAX_PROCESS_ID=$i JAX_LOCAL_DEVICE_IDS=$i "${opd_jax[@]}" train "$@" &
  pids+=($!)
done
status=0
for ((n = 0; n < gpus; n++)); do
  # The first process to fail stops the others, which would otherwise wait for it.
  wait -n || {
    code=$?
    ((status)) || status=$code
    stop
  }
done
exit "$status"
