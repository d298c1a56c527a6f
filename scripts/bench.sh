#!/usr/bin/env bash
# npm run bench -- <bench/file.ts> [...]: runs benchmarks against a freshly
# migrated database (easymo_bench) on the local cluster or DATABASE_URL.
# Benchmarks print ours beside the peer and the ratio; nothing here is a test.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_node_modules
ensure_system_packages
# wrk drives the HTTP side of the benchmarks (pgbench, the SQL side, comes with PostgreSQL).
command -v wrk >/dev/null || apt_install "benchmarks need wrk (Debian/Ubuntu package: wrk)" wrk
ensure_database
trap stop_cluster_if_started EXIT

BENCH_DB=easymo_bench
psql_url "$DATABASE_URL" -c "drop database if exists $BENCH_DB with (force)" >/dev/null
psql_url "$DATABASE_URL" -c "create database $BENCH_DB" >/dev/null
bootstrap_db "$(db_url_for $BENCH_DB)"
log "migrating $BENCH_DB"
migrate_db "$(db_url_for $BENCH_DB)"

files=("$@")
[ ${#files[@]} -gt 0 ] || files=("$ROOT"/bench/*.ts)
for file in "${files[@]}"; do
  case "$file" in */lib.ts) continue ;; esac
  log "bench $(basename "$file")"
  BENCH_DATABASE_URL="$(db_url_for $BENCH_DB)" PGBIN="$PG_BIN" \
    "$DENO" run --allow-all "$file"
done
