#!/usr/bin/env bash
# Start a Prefect server (API + UI + background services) and wait until it answers.
#
#   deployments/start-server.sh [--env-file FILE] [--host ADDR] [--port N]
#                               [--home DIR | --temporary-home] [--timeout SECONDS]
#
# Binds to 127.0.0.1 unless told otherwise (--host, or PREFECT_SERVER_API_HOST). The port is
# --port, else PREFECT_SERVER_API_PORT, else 4200. PREFECT_HOME (where Prefect keeps its
# profiles and, without PREFECT_SERVER_DATABASE_CONNECTION_URL, its SQLite database) is
# --home DIR, else $PREFECT_HOME, else Prefect's default ~/.prefect; --temporary-home makes a
# fresh one that is deleted when the server stops (tests, trials).
#
# The script stays in the foreground as long as the server runs (suitable for systemd
# Type=simple, or a terminal). It prints one line
#     prefect-server ready: http://HOST:PORT/api (PREFECT_HOME=...)
# once GET /api/health answers, and exits non-zero if the server dies or does not answer
# within --timeout seconds (default 180). SIGTERM/SIGINT stop the server.
#
# Settings (PREFECT_*; see deployments/prostate-cohort.env.example) come from the
# environment or from --env-file FILE (shell syntax, KEY=value lines, exported).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

usage() { sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

env_file="" host="" port="" home="" temporary_home=0 timeout=180
while (($#)); do
    case "$1" in
        --env-file) env_file=$2; shift 2 ;;
        --host) host=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --home) home=$2; shift 2 ;;
        --temporary-home) temporary_home=1; shift ;;
        --timeout) timeout=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "start-server.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

if [[ -n $env_file ]]; then
    set -a
    # shellcheck disable=SC1090
    . "$env_file"
    set +a
fi

# The project's virtualenv when there is one (a checkout), else `prefect` on PATH (image).
if [[ -x $repo/.venv/bin/prefect ]]; then
    prefect=$repo/.venv/bin/prefect python=$repo/.venv/bin/python
else
    prefect=$(command -v prefect) python=$(command -v python3)
fi

host=${host:-${PREFECT_SERVER_API_HOST:-127.0.0.1}}
port=${port:-${PREFECT_SERVER_API_PORT:-4200}}
export PREFECT_SERVER_API_HOST=$host PREFECT_SERVER_API_PORT=$port
# No usage statistics leave the machine unless the operator turns them on explicitly.
export PREFECT_SERVER_ANALYTICS_ENABLED=${PREFECT_SERVER_ANALYTICS_ENABLED:-false}

if ((temporary_home)); then
    home=$(mktemp -d "${TMPDIR:-/tmp}/prefect-home.XXXXXX")
fi
if [[ -n $home ]]; then
    mkdir -p "$home"
    export PREFECT_HOME=$home
fi

# The address clients use: a wildcard bind is reached through loopback on this host.
case "$host" in
    0.0.0.0 | "::" | "[::]") client_host=127.0.0.1 ;;
    *:*) client_host="[$host]" ;;
    *) client_host=$host ;;
esac
api_url="http://$client_host:$port/api"
# The UI (in the browser) calls the API at PREFECT_SERVER_UI_API_URL, by default
# PREFECT_API_URL or else http://HOST:PORT/api: behind a reverse proxy, set it to the
# address the browsers use.

server_pid=""
cleanup() {
    trap - EXIT INT TERM
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if ((temporary_home)) && [[ -n $home ]]; then
        rm -rf "$home"
    fi
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

"$prefect" server start --host "$host" --port "$port" &
server_pid=$!

healthy() {
    "$python" - "$api_url/health" <<'EOF'
import sys
import urllib.request

try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}

deadline=$((SECONDS + timeout))
until healthy; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        wait "$server_pid" && status=0 || status=$?
        server_pid=""
        echo "start-server.sh: the Prefect server exited ($status) before answering" >&2
        exit 1
    fi
    if ((SECONDS >= deadline)); then
        echo "start-server.sh: no answer from $api_url/health within ${timeout}s" >&2
        exit 1
    fi
    sleep 1
done
echo "prefect-server ready: $api_url (PREFECT_HOME=${PREFECT_HOME:-~/.prefect})"

wait "$server_pid" && status=0 || status=$?
server_pid=""
exit "$status"
