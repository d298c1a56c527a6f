#!/usr/bin/env bash
# npm run check: formatting, lint and type checks over the whole project.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_node_modules
"$DENO" fmt --check
"$DENO" lint
"$DENO" check supabase/functions/*/index.ts tests/functions/*.ts tests/support/*.ts scripts/*.ts bench/*.ts
