#!/usr/bin/env bash
# scripts/with-postgres.sh COMMAND [ARGS...]
#
# Runs COMMAND with a throwaway PostgreSQL server: Debian's PostgreSQL
# binaries (the package is installed when they are missing), a fresh cluster in
# a temporary directory, listening only on 127.0.0.1 on a free port, with its
# unix socket inside that directory. COMMAND gets
#   SPENDGUARD_TEST_POSTGRES=postgres://postgres@127.0.0.1:PORT/postgres
# and whatever its exit status, the server is stopped and the directory
# removed; the script exits with COMMAND's status.
#
# If SPENDGUARD_TEST_POSTGRES is already set, COMMAND just runs against it.
#
# initdb and postgres refuse to run as root: as root they run as the `postgres`
# system user (or `nobody`), which owns the temporary directory.
#
# Settings (environment):
#   PG_BIN_DIR              where initdb, pg_ctl and postgres are (default: the
#                           newest /usr/lib/postgresql/*/bin)
#   WITH_POSTGRES_TIMEOUT   seconds to wait for the server (default 60)
set -euo pipefail

say() { echo "with-postgres: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ $# -gt 0 ] || die "usage: $0 COMMAND [ARGS...]"

if [ -n "${SPENDGUARD_TEST_POSTGRES:-}" ]; then
  say "SPENDGUARD_TEST_POSTGRES is set; using that server"
  exec "$@"
fi

TIMEOUT=${WITH_POSTGRES_TIMEOUT:-60}

# --- the binaries -----------------------------------------------------------

has_server() { [ -x "$1/initdb" ] && [ -x "$1/pg_ctl" ] && [ -x "$1/postgres" ]; }

# Prints the directory holding the server binaries, or fails.
find_bin_dir() {
  if [ -n "${PG_BIN_DIR:-}" ]; then
    has_server "$PG_BIN_DIR" && { echo "$PG_BIN_DIR"; return 0; }
    return 1
  fi
  local d
  # Newest major version first (10 after 9).
  for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r); do
    has_server "$d" && { echo "$d"; return 0; }
  done
  return 1
}

install_postgres() {
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 ||
      die "PostgreSQL is not installed and we are not root: install the 'postgresql' package"
    sudo=(sudo)
  fi
  local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive
             apt-get -y -q -o DPkg::Lock::Timeout=300)
  say "PostgreSQL server binaries not found; installing Debian's postgresql package"
  if ! "${apt[@]}" install postgresql >&2; then
    say "install failed; running apt-get update and trying again"
    "${apt[@]}" update >&2 || die "apt-get update failed"
    "${apt[@]}" install postgresql >&2 || die "apt-get install postgresql failed"
  fi
}

if ! BIN=$(find_bin_dir); then
  install_postgres
  BIN=$(find_bin_dir) ||
    die "installed postgresql, but found no initdb, pg_ctl and postgres in ${PG_BIN_DIR:-/usr/lib/postgresql/*/bin}"
fi
if [ -x "$BIN/pg_isready" ]; then
  PG_ISREADY=$BIN/pg_isready
else
  PG_ISREADY=$(command -v pg_isready) || die "no pg_isready in $BIN nor on PATH"
fi

# --- who runs the server ----------------------------------------------------

RUN_AS=()
PG_USER=
if [ "$(id -u)" -eq 0 ]; then
  if id postgres >/dev/null 2>&1; then PG_USER=postgres; else PG_USER=nobody; fi
  id "$PG_USER" >/dev/null 2>&1 || die "running as root, and there is no postgres or nobody user to run the server"
  RUN_AS=(runuser -u "$PG_USER" --)
fi

# Runs a PostgreSQL program as the server's user, from the temporary directory
# (the caller's directory may be closed to that user).
as_pg() { (cd "$TMP" && "${RUN_AS[@]}" "$@"); }

# --- cleanup ----------------------------------------------------------------

TMP=
STARTED=0
cleanup() {
  local status=$?
  set +e
  trap - EXIT INT TERM
  if [ "$STARTED" = 1 ]; then
    if as_pg "$BIN/pg_ctl" -D "$TMP/data" -m fast -w -t "$TIMEOUT" stop >/dev/null 2>&1; then
      say "stopped the server"
    else
      say "pg_ctl stop failed; killing the server"
      local pid
      pid=$(head -n 1 "$TMP/data/postmaster.pid" 2>/dev/null)
      # Its other processes exit on their own once the postmaster is gone.
      [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null && sleep 0.5
    fi
  fi
  if [ -n "$TMP" ] && [ -d "$TMP" ]; then
    # Retried: a server process that is still exiting may write meanwhile.
    for _ in 1 2 3 4 5; do
      rm -rf -- "$TMP" 2>/dev/null && break
      sleep 0.5
    done
    [ ! -e "$TMP" ] || say "could not remove $TMP"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the cluster ------------------------------------------------------------

TMP=$(mktemp -d "${TMPDIR:-/tmp}/spendguard-pg.XXXXXXXX")
LOG=$TMP/server.log
if [ ${#RUN_AS[@]} -gt 0 ]; then
  chown "$PG_USER:" "$TMP"
  "${RUN_AS[@]}" test -w "$TMP" ||
    die "$PG_USER cannot write to $TMP (is a directory above it closed to others? set TMPDIR=/tmp)"
fi

# --no-sync only skips initdb's final flush of the files it wrote (seconds on
# a slow disk): a cluster that lives as long as the command needs no more.
as_pg "$BIN/initdb" -D "$TMP/data" -U postgres --auth=trust -E UTF8 --locale=C --no-sync \
  >"$TMP/initdb.log" 2>&1 || { cat "$TMP/initdb.log" >&2; die "initdb failed"; }

# Trust, but only over the socket in the temporary directory and loopback.
cat >"$TMP/data/pg_hba.conf" <<'EOF'
local all all              trust
host  all all 127.0.0.1/32 trust
EOF
# Tests open several pools at once; fsync stays on, since durability is part
# of what the tests check.
cat >>"$TMP/data/postgresql.conf" <<EOF

# scripts/with-postgres.sh
listen_addresses = '127.0.0.1'
unix_socket_directories = '$TMP'
max_connections = 300
shared_buffers = 64MB
fsync = on
synchronous_commit = on
EOF

# --- start on a free port ---------------------------------------------------

free_port() {
  if command -v python3 >/dev/null 2>&1 && python3 -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' 2>/dev/null; then
    return 0
  fi
  local port
  for _ in $(seq 100); do
    port=$(( 20000 + RANDOM % 40000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return 0; fi
  done
  return 1
}

PORT=
for attempt in 1 2 3 4 5; do
  port=$(free_port) || die "found no free port on 127.0.0.1"
  rm -f "$LOG"
  STARTED=1
  if as_pg "$BIN/pg_ctl" -D "$TMP/data" -l "$LOG" -o "-p $port" -w -t "$TIMEOUT" start \
       >"$TMP/pg_ctl.out" 2>&1; then
    PORT=$port
    break
  fi
  # pg_ctl failed: make sure nothing is left running before trying again.
  as_pg "$BIN/pg_ctl" -D "$TMP/data" -m immediate -w stop >/dev/null 2>&1 || true
  STARTED=0
  if grep -q 'Address already in use' "$LOG" 2>/dev/null; then
    say "port $port was taken meanwhile (attempt $attempt); trying another"
    continue
  fi
  say "the server did not start on 127.0.0.1:$port; pg_ctl said:"
  sed 's/^/    /' "$TMP/pg_ctl.out" >&2
  say "and the server's log:"
  sed 's/^/    /' "$LOG" >&2 2>/dev/null || true
  die "pg_ctl start failed"
done
[ -n "$PORT" ] || die "could not start the server on a free port after 5 attempts"

waited=0
until "$PG_ISREADY" -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres; do
  if [ "$waited" -ge "$((TIMEOUT * 10))" ]; then
    say "the server on 127.0.0.1:$PORT does not accept connections after ${TIMEOUT}s; its log:"
    sed 's/^/    /' "$LOG" >&2 || true
    die "PostgreSQL did not become ready"
  fi
  sleep 0.1
  waited=$((waited + 1))
done

export SPENDGUARD_TEST_POSTGRES="postgres://postgres@127.0.0.1:$PORT/postgres"
say "PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT (in $TMP${PG_USER:+, as $PG_USER}); SPENDGUARD_TEST_POSTGRES=$SPENDGUARD_TEST_POSTGRES"

# --- the command ------------------------------------------------------------

status=0
"$@" || status=$?
[ "$status" -eq 0 ] || say "command exited with status $status"
exit "$status"
