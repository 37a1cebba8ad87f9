#!/usr/bin/env bash
# One process on one GPU: `opd-jax train CONFIG [ARGS...]`.
#
# Usage: launch/single_gpu.sh CONFIG [--set KEY=VALUE ...]
#
# Environment:
#   GPU      the GPU to use (default 0), exported as CUDA_VISIBLE_DEVICES
#   OPD_JAX  the command (default "opd-jax"; e.g. "python3 -m opd_jax.cli" in a checkout)
#
# The run is single-process: OPD_JAX_DISTRIBUTED=off, so jax.distributed is never
# initialized even inside a SLURM step. The config's mesh must fit one device
# (mesh.fsdp: -1 takes it).
set -euo pipefail

usage() {
  sed -n '2,12s/^# \{0,1\}//p' "$0"
  exit "${1:-0}"
}
[[ $# -ge 1 ]] || usage 2
[[ $1 == -h || $1 == --help ]] && usage

read -r -a opd_jax <<<"${OPD_JAX:-opd-jax}"
export CUDA_VISIBLE_DEVICES="${GPU:-0}"
export OPD_JAX_DISTRIBUTED=off
exec "${opd_jax[@]}" train "$@"
