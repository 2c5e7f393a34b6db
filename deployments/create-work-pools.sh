#!/usr/bin/env bash
# Create (or update) the platform's process work pools on the Prefect server at
# $PREFECT_API_URL, from the base job templates in deployments/work-pools/.
#
#   deployments/create-work-pools.sh [--env-file FILE] [--cpu-limit N] [--gpu-limit N]
#                                    [POOL ...]
#
# POOL: cpu-pool, gpu-pool (default: both). Each pool is of type `process` and gets
#   - its base job template deployments/work-pools/POOL.json: the default process template
#     of Prefect 3.8.8 whose `env` default sets the platform's thread limit
#     (PROSTATE_COHORT_THREADS__WORKERS) and segmentation device for every flow run;
#     a deployment's job_variables.env adds to it (prefect.yaml);
#   - a concurrency limit: the most flow runs of the pool at once, over all its workers
#     (--cpu-limit, --gpu-limit; default $CPU_POOL_LIMIT / $GPU_POOL_LIMIT, else 1): one
#     cohort run uses every core of its host, so set it to the number of hosts of the pool.
#
# Running it again overwrites the pools' templates and limits (idempotent).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

env_file="" cpu_limit=${CPU_POOL_LIMIT:-1} gpu_limit=${GPU_POOL_LIMIT:-1} pools=()
while (($#)); do
    case "$1" in
        --env-file) env_file=$2; shift 2 ;;
        --cpu-limit) cpu_limit=$2; shift 2 ;;
        --gpu-limit) gpu_limit=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "create-work-pools.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
        *) pools+=("$1"); shift ;;
    esac
done
((${#pools[@]})) || pools=(cpu-pool gpu-pool)

if [[ -n $env_file ]]; then
    set -a
    # shellcheck disable=SC1090
    . "$env_file"
    set +a
fi
if [[ -z ${PREFECT_API_URL:-} ]]; then
    echo "create-work-pools.sh: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)" >&2
    exit 2
fi

if [[ -x $repo/.venv/bin/prefect ]]; then
    prefect=$repo/.venv/bin/prefect
else
    prefect=$(command -v prefect)
fi

for pool in "${pools[@]}"; do
    case "$pool" in
        cpu-pool) limit=$cpu_limit ;;
        gpu-pool) limit=$gpu_limit ;;
        *) echo "create-work-pools.sh: unknown pool '$pool' (cpu-pool, gpu-pool)" >&2; exit 2 ;;
    esac
    template=$here/work-pools/$pool.json
    "$prefect" --no-prompt work-pool create "$pool" --type process \
        --base-job-template "$template" --overwrite
    "$prefect" --no-prompt work-pool set-concurrency-limit "$pool" "$limit"
done
