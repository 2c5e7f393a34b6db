#!/usr/bin/env bash
# Start a Prefect process worker for one work pool; it runs that pool's flow runs on this host.
#
#   deployments/start-worker.sh [--env-file FILE] [--name NAME] [--limit N] POOL
#
# POOL: cpu-pool or gpu-pool (made by create-work-pools.sh; the worker never creates a pool,
# so the pool keeps the project's base job template). --limit: flow runs at once on this
# host (default 1: one cohort run already uses every core). --name: the worker's name in the
# UI (default POOL-HOSTNAME).
#
# Needs PREFECT_API_URL (and PREFECT_API_AUTH_STRING when the server has an auth string).
# Flow runs start in the checkout given as PROSTATE_COHORT_CHECKOUT to `prefect deploy`
# (prefect.yaml's pull step), so this host must have it at that path; the worker itself runs
# in $PROSTATE_COHORT_CHECKOUT (default: the checkout this script lies in). Flow runs
# inherit this environment: put the platform's settings (PROSTATE_COHORT_*) here or in
# --env-file FILE. The worker runs in the foreground (systemd Type=simple). The first
# SIGINT/SIGTERM asks it to shut down (running flow runs go on); a second one kills it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

env_file="" name="" limit=1 pool=""
while (($#)); do
    case "$1" in
        --env-file) env_file=$2; shift 2 ;;
        --name) name=$2; shift 2 ;;
        --limit) limit=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "start-worker.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
        *)
            [[ -z $pool ]] || { echo "start-worker.sh: one POOL only" >&2; exit 2; }
            pool=$1; shift ;;
    esac
done
if [[ -z $pool ]]; then
    echo "start-worker.sh: name the work pool (cpu-pool or gpu-pool); see --help" >&2
    exit 2
fi

if [[ -n $env_file ]]; then
    set -a
    # shellcheck disable=SC1090
    . "$env_file"
    set +a
fi
if [[ -z ${PREFECT_API_URL:-} ]]; then
    echo "start-worker.sh: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)" >&2
    exit 2
fi
export PROSTATE_COHORT_CHECKOUT=${PROSTATE_COHORT_CHECKOUT:-$repo}
if [[ ! -f $PROSTATE_COHORT_CHECKOUT/prefect.yaml ]]; then
    echo "start-worker.sh: PROSTATE_COHORT_CHECKOUT=$PROSTATE_COHORT_CHECKOUT is not a" \
        "checkout of this project (no prefect.yaml)" >&2
    exit 2
fi

if [[ -x $repo/.venv/bin/prefect ]]; then
    prefect=$repo/.venv/bin/prefect
else
    prefect=$(command -v prefect)
fi

cd "$PROSTATE_COHORT_CHECKOUT"
exec "$prefect" --no-prompt worker start --pool "$pool" --type process \
    --name "${name:-$pool-$(hostname -s)}" --limit "$limit" \
    --install-policy never --no-create-pool-if-not-found
