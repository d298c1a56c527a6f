#!/usr/bin/env bash
# npm start: the whole local stack. Installs what is missing, starts (or
# reuses) the project's PostgreSQL on 54322, applies the bootstrap and new
# migrations with the Supabase CLI, then serves every function on 54321 with
# the scheduler. Ctrl-C stops the API and the database it started.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_node_modules
ensure_system_packages_for_target
ensure_database

api_pid=""
cleanup() {
  trap - INT TERM EXIT
  if [ -n "$api_pid" ] && kill -0 "$api_pid" 2>/dev/null; then
    kill -TERM "$api_pid" 2>/dev/null || true
    wait "$api_pid" 2>/dev/null || true
  fi
  stop_cluster_if_started
}
trap cleanup INT TERM EXIT

prepare_database

"$DENO" run --allow-all --quiet "$ROOT/scripts/serve.ts" &
api_pid=$!
wait "$api_pid"
