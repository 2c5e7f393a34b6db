#!/usr/bin/env bash
# Start a PostgreSQL server (Debian package 'postgresql') for the Prefect server's database or
# the provenance database, in the foreground.
#
#   deployments/start-postgres.sh --data DIR [--host ADDR] [--port N] [--database NAME]...
#                                 [--timeout SECONDS] [--throwaway]
#
# DIR is initialised on first use (user 'postgres', trust authentication for connections to
# the bind address; UTF8, C locale) and reused afterwards. Binds to 127.0.0.1 unless told
# otherwise; port 5432 unless --port. Each --database NAME is created if missing. Run as
# root, the server runs as the 'postgres' OS user (PostgreSQL refuses root), and DIR is
# given to that user. On a shared host use your distribution's PostgreSQL service with
# password authentication instead: trust on loopback is for a single-user machine.
#
# The script stays in the foreground as long as the server runs and prints one line
#     postgres ready: postgresql://postgres@HOST:PORT
# once the server accepts connections and the databases exist; it exits non-zero if the
# server dies or is not ready within --timeout seconds (default 60). SIGTERM/SIGINT stop the
# server (fast shutdown). --throwaway turns off fsync and synchronous commit: faster, and a
# crash of the host can lose the data (tests and benchmarks only).
# Point Prefect's server at a database with
#     PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://postgres@HOST:PORT/NAME
# and the pipeline with database_url = "postgresql://postgres@HOST:PORT/NAME".
set -euo pipefail

usage() { sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

data="" host=127.0.0.1 port=5432 timeout=60 databases=() durability=()
while (($#)); do
    case "$1" in
        --data) data=$2; shift 2 ;;
        --host) host=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --database) databases+=("$2"); shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --throwaway) durability=(-c fsync=off -c synchronous_commit=off -c full_page_writes=off); shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "start-postgres.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[[ -n $data ]] || { echo "start-postgres.sh: --data DIR is required" >&2; exit 2; }

# The server and client binaries: one folder on PATH holding them all, else the newest
# Debian install.
bin=""
if command -v postgres >/dev/null; then
    bin=$(dirname "$(command -v postgres)")
    for tool in initdb pg_isready psql; do [[ -x $bin/$tool ]] || bin=""; done
fi
if [[ -z $bin ]]; then
    bin=$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
fi
if [[ -z $bin || ! -x $bin/initdb ]]; then
    echo "start-postgres.sh: PostgreSQL server binaries not found: apt-get install postgresql" >&2
    exit 1
fi

as_user=()
mkdir -p "$data"
data=$(cd "$data" && pwd)
if ((EUID == 0)); then
    chown postgres:postgres "$data"
    as_user=(runuser -u postgres --)
    if ! "${as_user[@]}" test -w "$data"; then
        echo "start-postgres.sh: the 'postgres' user cannot reach $data (a parent folder is" \
            "private to root): choose a folder it can traverse" >&2
        exit 1
    fi
fi
if [[ ! -f $data/PG_VERSION ]]; then
    "${as_user[@]}" "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 --locale=C >/dev/null
fi

"${as_user[@]}" "$bin/postgres" -D "$data" -c "listen_addresses=$host" -p "$port" \
    -c "unix_socket_directories=$data" -c max_connections=200 "${durability[@]}" &
server=$!
# SIGINT to the postmaster itself (fast shutdown): runuser does not pass signals on.
stop() {
    local postmaster
    postmaster=$(head -n 1 "$data/postmaster.pid" 2>/dev/null || echo "$server")
    kill -INT "$postmaster" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
}
trap 'stop; exit 0' TERM INT

deadline=$((SECONDS + timeout))
until "$bin/pg_isready" -q -h "$host" -p "$port" -U postgres; do
    if ! kill -0 "$server" 2>/dev/null; then
        echo "start-postgres.sh: the server exited" >&2
        exit 1
    fi
    if ((SECONDS > deadline)); then
        echo "start-postgres.sh: not ready within ${timeout}s" >&2
        stop
        exit 1
    fi
    sleep 0.5
done
psql=("$bin/psql" -h "$host" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt)
for name in "${databases[@]}"; do
    if [[ -z $("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$name'") ]]; then
        "${psql[@]}" -c "CREATE DATABASE \"$name\""
    fi
done
echo "postgres ready: postgresql://postgres@$host:$port"
wait "$server"
