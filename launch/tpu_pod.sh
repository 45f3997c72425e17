#!/usr/bin/env bash
# Runs one etjax gin job on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE GIN_FILE [etjax train args...]
#
# Every worker runs the same command; jax.distributed.initialize() finds the pod's
# coordinator, process count and index by itself (etjax.sharding.distributed), and
# `dcn_data` in the job's mesh spans slices in a multi-slice job. The workers need the
# same checkout and environment at $ETJAX_DIR (default ~/etjax, with .venv inside);
# copy them first, e.g. with `gcloud compute tpus tpu-vm scp --worker=all`. The TPU XLA
# flag preset goes to LIBTPU_INIT_ARGS (flags already there win).
#
# Environment: PROJECT (gcloud project, optional), ETJAX_DIR, DRY_RUN=1 to print the
# gcloud command instead of running it.

set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: launch/tpu_pod.sh TPU_NAME ZONE GIN_FILE [etjax train args...]" >&2
  exit 2
fi
TPU_NAME="$1"
ZONE="$2"
GIN_FILE="$3"
shift 3
ETJAX_DIR="${ETJAX_DIR:-~/etjax}"

args=""
for arg in "$@"; do
  args+=" $(printf '%q' "${arg}")"
done
remote="cd ${ETJAX_DIR} && . .venv/bin/activate && \
export LIBTPU_INIT_ARGS=\"\$(python -c 'import os; from etjax.sharding import xla_flags; xla_flags.apply_xla_flags(\"tpu\"); print(os.environ[\"LIBTPU_INIT_ARGS\"])')\" && \
etjax train --gin_file=$(printf '%q' "${GIN_FILE}")${args}"

cmd=(gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all
     --command="${remote}")
if [[ -n "${PROJECT:-}" ]]; then
  cmd+=(--project="${PROJECT}")
fi

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
