#!/usr/bin/env bash
# npm test: installs what is missing, starts (or reuses) the database,
# migrates a template database with the Supabase CLI, then runs every pgTAP
# file (pg_prove, each on its own clone of the template) and the Deno tests.
# Ends with the totals of all suites on one line: "N passed, N failed".
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ensure_node_modules
ensure_system_packages_for_target pg_prove
ensure_database
trap stop_cluster_if_started EXIT

TEMPLATE_DB=easymo_template
REPORT_DIR="$LOCAL_DIR/test-reports"
mkdir -p "$REPORT_DIR"
rm -f "$REPORT_DIR"/*

prepare_database

drop_test_databases() {
  psql_url "$DATABASE_URL" -At -c \
    "select format('drop database if exists %I with (force);', datname) from pg_database
     where datname like 't\\_%' or datname = '$TEMPLATE_DB'" \
    | psql_url "$DATABASE_URL" >/dev/null
}

log "building the template database $TEMPLATE_DB"
drop_test_databases
psql_url "$DATABASE_URL" -c "create database $TEMPLATE_DB" >/dev/null
bootstrap_db "$(db_url_for $TEMPLATE_DB)"
migrate_db "$(db_url_for $TEMPLATE_DB)"
psql_url "$(db_url_for $TEMPLATE_DB)" -f "$ROOT/tests/support/pgtap_helpers.sql" >/dev/null

passed=0
failed=0

# --- pgTAP ---------------------------------------------------------------
log "pgTAP"
for file in "$ROOT"/tests/db/*.sql; do
  name="t_pgtap_$(basename "$file" .sql | tr -c 'a-z0-9_\n' '_')"
  psql_url "$DATABASE_URL" -c "create database $name template $TEMPLATE_DB" >/dev/null
  out="$REPORT_DIR/$(basename "$file").tap"
  set +e
  pg_prove --verbose --failures --dbname "$(db_url_for "$name")" "$file" >"$out" 2>&1
  rc=$?
  set -e
  ok=$(grep -cE '^ok [0-9]+' "$out" || true)
  notok=$(grep -cE '^not ok [0-9]+' "$out" || true)
  # Planned assertions that never ran (the file died) count as failed; a file
  # that fails without any assertion failing still counts once.
  unrun=$(sed -nE 's/^Failed ([0-9]+)\/[0-9]+ subtests.*/\1/p' "$out" | tail -1)
  if [ -n "$unrun" ] && [ "$unrun" -gt "$notok" ]; then notok=$unrun; fi
  if [ "$rc" -ne 0 ] && [ "$notok" -eq 0 ]; then notok=1; fi
  passed=$((passed + ok))
  failed=$((failed + notok))
  if [ "$notok" -gt 0 ]; then
    printf '  FAIL %s (%s passed, %s failed)\n' "$(basename "$file")" "$ok" "$notok"
    grep -vE '^ok [0-9]+' "$out" | sed 's/^/    /' | head -80
  else
    printf '  ok   %s (%s)\n' "$(basename "$file")" "$ok"
  fi
  psql_url "$DATABASE_URL" -c "drop database if exists $name with (force)" >/dev/null
done

# --- Deno ----------------------------------------------------------------
log "deno test"
deno_out="$REPORT_DIR/deno.txt"
set +e
TEST_DATABASE_URL="$DATABASE_URL" TEST_TEMPLATE_DB="$TEMPLATE_DB" NO_COLOR=1 \
  "$DENO" test --allow-all --no-check=remote "$ROOT/tests/functions/" 2>&1 | tee "$deno_out"
deno_rc=${PIPESTATUS[0]}
set -e
summary=$(grep -E '^(ok|FAILED) \| [0-9]+ passed' "$deno_out" | tail -1 || true)
if [ -n "$summary" ]; then
  dp=$(sed -E 's/^[A-Z a-z]+\| ([0-9]+) passed.*/\1/' <<<"$summary")
  df=$(sed -E 's/.*\| ([0-9]+) failed.*/\1/' <<<"$summary")
else
  dp=0
  df=1
fi
if [ "$deno_rc" -ne 0 ] && [ "$df" -eq 0 ]; then df=1; fi
passed=$((passed + dp))
failed=$((failed + df))

drop_test_databases
stop_cluster_if_started
trap - EXIT

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
