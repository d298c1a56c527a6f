# shellcheck shell=bash
# Shared steps of the local stack: install what is missing, run the project's
# PostgreSQL cluster, bootstrap it like Supabase, and apply migrations with the
# real Supabase CLI. Sourced by start.sh, test.sh and bench.sh.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PG_MAJOR=15
PG_BIN="/usr/lib/postgresql/$PG_MAJOR/bin"
PG_PORT="${EASYMO_DB_PORT:-54322}"
PG_PASSWORD=postgres
LOCAL_DIR="$ROOT/.local"
DENO="$ROOT/node_modules/.bin/deno"
SUPABASE="$ROOT/node_modules/.bin/supabase"
APT_PACKAGES=(
  "postgresql-$PG_MAJOR"
  "postgresql-client-$PG_MAJOR"
  "postgresql-$PG_MAJOR-postgis-3"
  "postgresql-$PG_MAJOR-cron"
  "postgresql-$PG_MAJOR-pgtap"
  libtap-parser-sourcehandler-pgtap-perl
)

log() { printf '\033[1;34m[easymo]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[easymo]\033[0m %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# --- installs ---------------------------------------------------------------

system_packages_present() {
  local ext="/usr/share/postgresql/$PG_MAJOR/extension"
  [ -x "$PG_BIN/postgres" ] && [ -f "$ext/postgis.control" ] && [ -f "$ext/pg_cron.control" ] \
    && [ -f "$ext/pgtap.control" ] && command -v pg_prove >/dev/null && command -v psql >/dev/null
}

# apt_install <message> <package>...: installs Debian/Ubuntu packages when we
# are root and have apt-get, and dies with <message> otherwise. Callers check
# first for what they need (a command, an extension file), which says more than
# whether dpkg knows a package. The index is refreshed once per run before the
# first install: a fresh container has none, and a stale one can name versions
# the mirror no longer serves.
APT_INDEX_FRESH=0
apt_install() {
  local message="$1"
  shift
  is_root && command -v apt-get >/dev/null || die "$message"
  log "installing $* (apt)"
  if [ "$APT_INDEX_FRESH" != 1 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_INDEX_FRESH=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_system_packages() {
  system_packages_present && return 0
  apt_install "missing PostgreSQL $PG_MAJOR packages. Install: ${APT_PACKAGES[*]}
(Debian/Ubuntu names; run this as root to have it done for you), or point DATABASE_URL
at a Postgres $PG_MAJOR with PostGIS, pg_cron and pgTAP." "${APT_PACKAGES[@]}"
  system_packages_present || die "apt installed ${APT_PACKAGES[*]} but something is still missing"
}

# With DATABASE_URL the server is someone else's: only its clients are needed
# here (psql, and pg_prove when the first argument is "pg_prove").
ensure_system_packages_for_target() {
  if [ -z "${DATABASE_URL:-}" ]; then
    ensure_system_packages
    return 0
  fi
  local missing=()
  command -v psql >/dev/null || missing+=("postgresql-client-$PG_MAJOR")
  if [ "${1:-}" = pg_prove ] && ! command -v pg_prove >/dev/null; then
    missing+=(libtap-parser-sourcehandler-pgtap-perl)
  fi
  [ ${#missing[@]} -eq 0 ] && return 0
  apt_install "DATABASE_URL is set; its clients are missing here. Install: ${missing[*]}" \
    "${missing[@]}"
}

ensure_node_modules() {
  local stamp="node_modules/.package-lock.json"
  if [ ! -x "$DENO" ] || [ ! -x "$SUPABASE" ] || [ package.json -nt "$stamp" ] \
    || { [ -f package-lock.json ] && [ package-lock.json -nt "$stamp" ]; }; then
    log "installing npm packages"
    if [ -f package-lock.json ]; then npm ci --no-audit --no-fund; else npm install --no-audit --no-fund; fi
  fi
}

# --- the local cluster -------------------------------------------------------

# Runs a command as the cluster owner: postgres when we are root (initdb and
# postgres refuse root), ourselves otherwise.
as_owner() {
  if is_root; then runuser -u postgres -- "$@"; else "$@"; fi
}

# The data folder lives in the project (git-ignored) unless the postgres user
# cannot reach it there (e.g. a checkout under /root), then under /var/tmp.
pg_data_dir() {
  local dir="$LOCAL_DIR/pg-$PG_PORT"
  if is_root; then
    mkdir -p "$dir"
    chown postgres:postgres "$dir"
    if ! runuser -u postgres -- test -w "$dir"; then
      dir="/var/tmp/easymo-pg-$PG_PORT-$(printf '%s' "$ROOT" | sha1sum | cut -c1-12)"
      mkdir -p "$dir"
      chown postgres:postgres "$dir"
      chmod 700 "$dir"
    fi
  else
    mkdir -p "$dir"
  fi
  printf '%s\n' "$dir"
}

PG_DATA=""
CLUSTER_STARTED_HERE=0

cluster_running() { as_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }

ensure_cluster() {
  PG_DATA="$(pg_data_dir)/data"
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    log "creating the local cluster in $PG_DATA"
    local pwfile
    pwfile="$(mktemp)"
    printf '%s\n' "$PG_PASSWORD" >"$pwfile"
    chmod 644 "$pwfile"
    # Build in a sibling folder and move it into place, so an interrupted
    # initdb never leaves a half-made cluster behind.
    local tmp="$PG_DATA.initdb"
    as_owner rm -rf "$tmp"
    as_owner "$PG_BIN/initdb" -D "$tmp" -U postgres --pwfile="$pwfile" \
      --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    as_owner tee -a "$tmp/postgresql.conf" >/dev/null <<CONF

# --- easymo local stack ---
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = ''
max_connections = 300
shared_buffers = 512MB
shared_preload_libraries = 'pg_cron'
cron.database_name = 'postgres'
cron.timezone = 'UTC'
timezone = 'UTC'
log_timezone = 'UTC'
CONF
    as_owner mv "$tmp" "$PG_DATA"
  fi
  # pg_cron runs its jobs in background workers: by default it opens a
  # password-less connection, which this cluster refuses, and every run failed
  # ("connection failed"). Also added to clusters made before this line.
  if ! grep -q '^cron.use_background_workers' "$PG_DATA/postgresql.conf"; then
    echo "cron.use_background_workers = on" | as_owner tee -a "$PG_DATA/postgresql.conf" >/dev/null
  fi
  if ! cluster_running; then
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    as_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/../postgres.log" -w -t 60 start >/dev/null \
      || die "PostgreSQL failed to start: $(tail -n 3 "$PG_DATA/../postgres.log" | tr '\n' ' ')
(another server on port $PG_PORT? set EASYMO_DB_PORT, or DATABASE_URL to use it)"
    CLUSTER_STARTED_HERE=1
  fi
}

stop_cluster_if_started() {
  if [ "$CLUSTER_STARTED_HERE" = 1 ] && cluster_running; then
    log "stopping PostgreSQL"
    as_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null || true
  fi
}

# --- database ----------------------------------------------------------------

# DATABASE_URL wins; otherwise the local cluster is started and used.
ensure_database() {
  if [ -n "${DATABASE_URL:-}" ]; then
    log "using DATABASE_URL; no local cluster"
  else
    ensure_cluster
    export DATABASE_URL="postgresql://postgres:$PG_PASSWORD@127.0.0.1:$PG_PORT/postgres"
    LOCAL_DATABASE=1
  fi
}

# Database URL with its database name replaced.
db_url_for() {
  local name="$1"
  printf '%s\n' "${DATABASE_URL%/*}/$name"
}

psql_url() { PGOPTIONS="-c client_min_messages=warning" PGCONNECT_TIMEOUT=10 psql "$1" -v ON_ERROR_STOP=1 -q -X "${@:2}"; }

bootstrap_db() {
  psql_url "$1" -f "$ROOT/scripts/sql/supabase_bootstrap.sql" >/dev/null
}

migrate_db() {
  local url="$1"
  # The CLI treats only its configured [db] port as local and otherwise insists
  # on TLS; a loopback cluster on another port (EASYMO_DB_PORT) has none.
  case "$url" in
    *sslmode=*) ;;
    *@127.0.0.1:* | *@localhost:*) url="$url$([[ "$url" == *\?* ]] && echo '&' || echo '?')sslmode=disable" ;;
  esac
  "$SUPABASE" db push --db-url "$url" --include-all --workdir "$ROOT" </dev/null 2>&1 \
    | grep -v -E '^\s*$' | sed 's/^/  /' >&2
  return "${PIPESTATUS[0]}"
}

# Migrations are edited in place until the first deploy, and the CLI skips a
# version it has applied even when its file changed since. Prints the applied
# migrations whose files have changed. The CLI keeps each applied file as its
# statements; whitespace and the semicolons between statements are the only
# differences from the file, so both are compared without them.
stale_migrations() {
  local url="$1" version fingerprint file
  while IFS='|' read -r version fingerprint; do
    file=$(compgen -G "$ROOT/supabase/migrations/${version}_*.sql" | head -1)
    [ -n "$file" ] || continue # the CLI itself refuses versions it has no file for
    [ "$(tr -d ' \n\t\r\f\v;' <"$file" | md5sum | cut -d' ' -f1)" = "$fingerprint" ] ||
      printf '%s ' "$(basename "$file")"
  done < <(psql_url "$url" -At -c "
    select m.version, md5(regexp_replace(array_to_string(m.statements, ''), '[[:space:];]', '', 'g'))
    from supabase_migrations.schema_migrations m" 2>/dev/null || true) # none yet: a new database
}

# A database older than the migration files is rebuilt when it is the local
# cluster's (its data is the stack's own); one named by DATABASE_URL is left
# alone, and the run stops.
prepare_database() {
  local stale name="${DATABASE_URL##*/}"
  stale=$(stale_migrations "$DATABASE_URL")
  if [ -n "$stale" ]; then
    [ -n "${LOCAL_DATABASE:-}" ] ||
      die "changed since this database applied them: ${stale% }. Drop it (or name a fresh one) and start again."
    log "changed since the local database applied them: ${stale% }; rebuilding it (its data is lost)"
    psql_url "$(db_url_for template1)" -c "drop database if exists \"$name\" with (force)" \
      -c "create database \"$name\"" >/dev/null
  fi
  log "bootstrapping and migrating $(printf '%s' "$DATABASE_URL" | sed -E 's#//[^@/]*@#//#; s#([?&]password=)[^&]*#\1***#gI')"
  bootstrap_db "$DATABASE_URL"
  migrate_db "$DATABASE_URL"
  # pg_cron (1.4) reads its jobs when its scheduler starts or reloads. On a new
  # cluster it started when the bootstrap made the extension, found no job,
  # and idled without ever seeing the jobs the migrations then scheduled: a
  # reload makes it read them. A rebuild (the drop above) ended the scheduler,
  # which comes back only with Postgres: the local cluster is restarted. (The
  # reload needs a superuser: on a database named by DATABASE_URL it may be
  # refused, harmlessly.)
  if [ -n "${LOCAL_DATABASE:-}" ] && [ "$(psql_url "$DATABASE_URL" -At -c \
    "select count(*) from pg_stat_activity where backend_type = 'pg_cron launcher'")" = 0 ]; then
    log "restarting PostgreSQL: pg_cron's scheduler ended with the rebuilt database"
    as_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/../postgres.log" -m fast -w -t 60 restart \
      >/dev/null || die "PostgreSQL failed to restart: $(tail -n 3 "$PG_DATA/../postgres.log" | tr '\n' ' ')"
  else
    psql_url "$DATABASE_URL" -qAt -c "select pg_reload_conf()" >/dev/null 2>&1 || true
  fi
}
