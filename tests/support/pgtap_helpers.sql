-- =============================================================================
-- pgTAP helpers, installed into the test template database only (never a
-- migration). Users are created in auth.users and impersonated the way
-- PostgREST does it: role and request.jwt.claims, transaction-local.
-- =============================================================================
create extension if not exists pgtap with schema extensions;
-- The migrations drop PUBLIC's default EXECUTE on new functions; pgTAP's
-- assertions must stay callable while a test impersonates an API role.
grant execute on all functions in schema extensions to public;

create schema if not exists tests;
grant usage on schema tests to anon, authenticated, service_role;

create or replace function tests.create_user(p_email text default null, p_phone text default null)
returns uuid
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_id uuid := gen_random_uuid();
begin
  insert into auth.users (id, email, phone, phone_confirmed_at, role, aud)
  values (v_id, coalesce(p_email, v_id::text || '@test.local'), p_phone,
          case when p_phone is not null then now() end, 'authenticated', 'authenticated');
  return v_id;
end;
$$;

-- Soft-deletes a user, as Supabase Auth's soft delete does.
create or replace function tests.delete_user(p_user_id uuid)
returns void
language sql
security definer
set search_path = ''
as $$
  update auth.users set deleted_at = now() where id = p_user_id;
$$;

-- Takes a transaction through processing to completed (as the service role).
create or replace function tests.complete_transaction(p_transaction_id uuid)
returns void
language sql
as $$
  select public.update_transaction_status(p_transaction_id, 'processing');
  select public.update_transaction_status(p_transaction_id, 'completed');
$$;

create or replace function tests.authenticate_as(p_user_id uuid, p_extra jsonb default '{}'::jsonb)
returns void
language sql
as $$
  select set_config('role', 'authenticated', true),
         set_config('request.jwt.claims',
           (jsonb_build_object('sub', p_user_id, 'role', 'authenticated') || p_extra)::text, true);
$$;

create or replace function tests.authenticate_as_service_role()
returns void
language sql
as $$
  select set_config('role', 'service_role', true),
         set_config('request.jwt.claims', '{"role": "service_role"}', true);
$$;

create or replace function tests.authenticate_as_anon()
returns void
language sql
as $$
  select set_config('role', 'anon', true),
         set_config('request.jwt.claims', '{"role": "anon"}', true);
$$;

create or replace function tests.clear_authentication()
returns void
language sql
as $$
  select set_config('role', 'none', true), set_config('request.jwt.claims', '', true);
$$;

grant execute on all functions in schema tests to anon, authenticated, service_role;

-- The JSON details (HINT) of the domain error `p_sql` raises, with its code
-- under "error"; null if it raises none. What raised is rolled back.
create or replace function tests.error_details(p_sql text)
returns jsonb
language plpgsql
as $$
declare
  v_code text;
  v_hint text;
begin
  execute p_sql;
  return null;
exception when others then
  get stacked diagnostics v_code = message_text, v_hint = pg_exception_hint;
  return coalesce(nullif(v_hint, '')::jsonb, '{}'::jsonb) || jsonb_build_object('error', v_code);
end;
$$;
grant execute on function tests.error_details(text) to anon, authenticated, service_role;

-- Buffer pages this transaction has read from the given tables and indexes,
-- for "reads a few pages" tests: taken before and after the statement.
create or replace function tests.blocks_read(variadic p_relations regclass[]) returns bigint
language sql
stable
as $$
  select sum(pg_stat_get_xact_blocks_fetched(r))::bigint from unnest(p_relations) r
$$;
grant execute on function tests.blocks_read(regclass[]) to anon, authenticated, service_role;

-- The same over every index of p_table: a claim's reads whichever index it
-- takes.
create or replace function tests.index_blocks_read(p_table regclass) returns bigint
language sql
stable
as $$
  select tests.blocks_read(variadic array(
    select i.indexrelid::regclass from pg_catalog.pg_index i where i.indrelid = p_table))
$$;
grant execute on function tests.index_blocks_read(regclass) to anon, authenticated, service_role;
