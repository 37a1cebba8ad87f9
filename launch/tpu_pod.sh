#!/usr/bin/env bash
# A Cloud TPU pod slice: `opd-jax train CONFIG [ARGS...]` on every worker at once.
#
# Usage: launch/tpu_pod.sh CONFIG [--set KEY=VALUE ...]
#
# Run from your own machine (gcloud installed and authenticated). Every worker runs the
# same command through `gcloud compute tpus tpu-vm ssh --worker=all`, one process per
# worker driving its local chips; OPD_JAX_DISTRIBUTED=auto makes jax.distributed.initialize
# find the coordinator (worker 0), the process count and this worker's index from the TPU
# metadata. CONFIG and relative paths are resolved in WORKDIR on the workers; run.dir and
# data.data_dir must be on a filesystem that all workers share (e.g. NFS or a gcsfuse mount).
# The processes live as long as the ssh sessions: keep this command running (tmux).
#
# Environment:
#   TPU_NAME  the TPU VM (required)
#   ZONE      its zone (required)
#   PROJECT   its project (default: gcloud's configured project)
#   WORKDIR   the directory on the workers to run in (default: ~, the ssh login directory)
#   SETUP     a command run first on every worker, e.g. "source ~/venv/bin/activate"
#   OPD_JAX   the command (default "opd-jax"; "python3 -m opd_jax.cli" in a checkout)
set -euo pipefail

usage() {
  sed -n '2,21s/^# \{0,1\}//p' "$0"
  exit "${1:-0}"
}
[[ $# -ge 1 ]] || usage 2
[[ $1 == -h || $1 == --help ]] && usage
: "${TPU_NAME:?set TPU_NAME to the name of the TPU VM}" "${ZONE:?set ZONE to the zone of the TPU VM}"

remote="cd ${WORKDIR:-~}"
[[ -z ${SETUP:-} ]] || remote+=" && ${SETUP}"
remote+=" && OPD_JAX_DISTRIBUTED=auto ${OPD_JAX:-opd-jax} train$(printf ' %q' "$@")"
echo "on every worker of ${TPU_NAME}: ${remote}" >&2
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
  --worker=all --command="$remote"
