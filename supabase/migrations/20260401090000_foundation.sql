-- =============================================================================
-- Foundation: shared SQL helpers every domain migration builds on.
--
--   * schema private: internal helpers, never exposed through the API
--   * private.raise_error: the one way SQL reports a domain error
--   * private.set_updated_at: trigger keeping updated_at current
--   * monthly range partitions: registry, creation (moving rows out of the
--     DEFAULT partition), retention, and public.maintain_partitions() (with
--     partition_backlog and maintain_partition_month, its steps over HTTP)
--   * pg_cron, where the database can run it
-- =============================================================================

-- -----------------------------------------------------------------------------
-- Extensions
-- -----------------------------------------------------------------------------
create extension if not exists pgcrypto with schema extensions;

-- pg_cron can only live in the database its background worker serves
-- (cron.database_name); elsewhere (e.g. test databases) scheduling is skipped.
do $$
begin
  if current_setting('cron.database_name', true) = current_database() then
    create extension if not exists pg_cron with schema pg_catalog;
  end if;
-- reading cron.database_name takes pg_read_all_settings (which Supabase's
-- postgres holds): a role without it gets no schedules, as a test database
exception when insufficient_privilege then
  raise warning 'pg_cron not set up: %', sqlerrm;
end
$$;

-- -----------------------------------------------------------------------------
-- Function privileges
--
-- Postgres lets PUBLIC execute every new function. Per-schema default
-- privileges can only add grants, never take this one away, so the migrating
-- role's global default drops it: every function from here on is callable
-- only by the roles a migration grants it to (Supabase's per-schema defaults
-- still grant public.* functions to the API roles; migrations revoke those
-- they must not have). It comes after the extensions, whose functions keep
-- the grants they are made with.
-- -----------------------------------------------------------------------------
alter default privileges revoke execute on functions from public;

-- -----------------------------------------------------------------------------
-- Schema private
-- -----------------------------------------------------------------------------
create schema if not exists private;
revoke all on schema private from public;
-- API roles may run the few helpers granted below; nothing else in here.
grant usage on schema private to authenticated, service_role;

-- -----------------------------------------------------------------------------
-- Errors
--
-- Domain errors use PostgREST's convention: SQLSTATE 'PT' || http_status, so
-- supabase.rpc() callers get the right HTTP status too. MESSAGE is the stable
-- snake_case code, DETAIL the human text, HINT optional JSON details. Handlers
-- map SQLSTATE and MESSAGE; they never parse prose.
-- -----------------------------------------------------------------------------
create or replace function private.raise_error(
  p_status integer,
  p_code text,
  p_message text,
  p_details jsonb default null
) returns void
language plpgsql
set search_path = ''
as $$
begin
  if p_status not between 400 and 599 then
    raise exception 'raise_error: status % out of range', p_status;
  end if;
  raise exception using
    errcode = 'PT' || p_status::text,
    message = p_code,
    detail = p_message,
    hint = coalesce(p_details::text, '');
end;
$$;

grant execute on function private.raise_error(integer, text, text, jsonb)
  to authenticated, service_role;

-- raise_error as a value of p_as's type, for raising inside an expression
-- (a CASE branch, a coalesce fallback). Volatile: the planner must never
-- evaluate it ahead of time.
create or replace function private.raise_error_value(
  p_status integer,
  p_code text,
  p_message text,
  p_as anyelement
) returns anyelement
language plpgsql
volatile
set search_path = ''
as $$
begin
  perform private.raise_error(p_status, p_code, p_message);
  return p_as;
end;
$$;

-- -----------------------------------------------------------------------------
-- Who is calling
--
-- Security definer functions see their owner in current_user, so the caller
-- is read from the role the request switched to and from its JWT claims;
-- either one naming a weaker role wins. Database owners and backends without
-- claims (pg_cron, migrations) count as the service role. Every domain asks
-- these, so the rule lives in one place.
--
-- They are plain SQL expressions so that the planner inlines them into the
-- calling statement: no function call at run time, and the claims JSON is
-- parsed once for the role (and once more for a user's id). As nested PL/pgSQL
-- functions that read auth.role() and auth.uid() repeatedly, they parsed it up
-- to four times and cost about 20 us per call, a tenth of an event append. No
-- SET search_path (it would stop the inlining): fully qualified, security
-- invoker. require_caller and caller_user_id are volatile because they raise;
-- a stable one could be folded, and raise, while a statement is planned.
-- -----------------------------------------------------------------------------
create or replace function private.caller_role() returns text
language sql
stable
as $$
  select case auth.role()
    when 'anon' then 'anon'
    when 'authenticated' then
      case current_setting('role', true) when 'anon' then 'anon' else 'authenticated' end
    else
      case current_setting('role', true)
        when 'anon' then 'anon'
        when 'authenticated' then 'authenticated'
        else 'service_role'
      end
  end
$$;

-- caller_role() = 'service_role', with fewer functions for the planner to set
-- up in every statement than that comparison (it skips working out which of
-- anon and a user the caller is): hot paths ask it before anything else.
create or replace function private.caller_is_service() returns boolean
language sql
stable
as $$
  select not (coalesce(auth.role() in ('anon', 'authenticated'), false)
              or coalesce(current_setting('role', true) in ('anon', 'authenticated'), false))
$$;

-- The caller's role; anon, and user tokens without a subject, are 401.
create or replace function private.require_caller() returns text
language sql
volatile
as $$
  select case private.caller_role()
    when 'anon' then
      private.raise_error_value(401, 'login_required', 'sign in to do this', null::text)
    when 'authenticated' then
      case when auth.uid() is null
        then private.raise_error_value(401, 'login_required', 'a user token without a subject',
                                       null::text)
        else 'authenticated'
      end
    else 'service_role'
  end
$$;

-- The signed-in user's id, or null for the service role; anon is 401.
create or replace function private.caller_user_id() returns uuid
language sql
volatile
as $$
  select case private.caller_role()
    when 'anon' then
      private.raise_error_value(401, 'login_required', 'sign in to do this', null::uuid)
    when 'authenticated' then
      coalesce(auth.uid(),
        private.raise_error_value(401, 'login_required', 'a user token without a subject',
                                  null::uuid))
  end
$$;

-- A page size between 1 and p_max, or 400 invalid_limit.
create or replace function private.check_limit(p_limit integer, p_max integer) returns void
language plpgsql
as $$
begin
  if p_limit is null or p_limit not between 1 and p_max then
    perform private.raise_error(400, 'invalid_limit', format('limit must be between 1 and %s', p_max));
  end if;
end;
$$;
-- list functions run as their caller
grant execute on function private.check_limit(integer, integer) to authenticated, service_role;

-- Transaction-level advisory locks serialising work on the given keys of one
-- scope (a queue's FIFO groups, WhatsApp message ids): one lock per bucket of
-- 64, taken in order. Buckets, not keys: the shared lock table holds a few
-- thousand locks in all, and a batch of a thousand keys taking one each could
-- run it out for every transaction in the cluster; two keys of a bucket merely
-- wait for each other. In order, so two callers never deadlock on them.
create or replace function private.lock_key_buckets(p_scope text, p_keys text[]) returns void
language sql
set search_path = ''
as $$
  select pg_catalog.pg_advisory_xact_lock(l.key)
  from (
    select distinct pg_catalog.hashtextextended(
      p_scope || '/' || (pg_catalog.hashtext(k) & 63), 0) as key
    from unnest(p_keys) k
    where k is not null
  ) l
  order by l.key;
$$;
revoke all on function private.lock_key_buckets(text, text[]) from public, anon, authenticated;
-- ingest_whatsapp_events runs as its caller, the service role
grant execute on function private.lock_key_buckets(text, text[]) to service_role;

-- 400 p_code when an object of the JSON array p_items (batch input, its items
-- already known to be objects) has a key outside p_allowed: a misspelled
-- optional key (expectedVersion for expected_version) would otherwise be
-- dropped without a word, and with it the check it asked for.
create or replace function private.check_json_keys(p_items jsonb, p_allowed text[], p_code text)
returns void
language plpgsql
set search_path = ''
as $$
declare
  v_key text;
begin
  select k into v_key
  from jsonb_array_elements(p_items) e, jsonb_object_keys(e) k
  where k <> all(p_allowed)
  limit 1;
  if v_key is not null then
    perform private.raise_error(400, p_code, format('unknown key %s: the keys are %s', v_key,
      array_to_string(p_allowed, ', ')));
  end if;
end;
$$;

-- Whether a JSON value is over a megabyte as its text, which is what every
-- reader is sent. Payloads, metadata and headers are facts and instructions,
-- not files: past this a write is refused (413 payload_too_large), also over
-- SQL, where no request body limit applies, so that no page of them outgrows
-- what a function's memory holds. The text is measured, not the stored jsonb:
-- an escaped control character prints as six bytes, a number as its digits.
-- Numbers that print far longer than they are stored are refused before
-- anything is printed (JSON from JavaScript never holds one):
--   * beyond a double's range: 1e131071 is 22 bytes stored and 131 KB
--     printed, so 8,000 of them in a 90 KB call printed a gigabyte (7 s and a
--     gigabyte of the backend's memory, past any statement timeout);
--   * with more than 400 decimal places (a double's smallest prints with
--     324): 0e-16383 is 8 bytes stored and 16 KB printed, 30,000 of them 490
--     MB. Its scale is seen through a division, whose result has the
--     dividend's scale: (x * 0 + 1) / 3 is 0.333..., one 3 per decimal place
--     of x (at least 16, at most 1,000), so 1 minus three times it is
--     10^-places, under 1e-400 exactly when x has more than 400 places.
--     About half a microsecond a number.
-- A value nested past 1,000 levels is refused too, as the walk goes no
-- deeper: walking every level, the check ran out of stack (54001) at 12,000.
-- json_too_large_unprinted makes those two checks, json_text_too_large
-- measures the text, and json_too_large does both. Immutable SQL without
-- SET, calling only immutable functions, so they are inlined into their
-- callers' expressions: a call of a SQL function that is not cost an append
-- 5-15 us.
create or replace function private.json_too_large_unprinted(p_value jsonb) returns boolean
language sql
immutable
parallel safe
as $$
  select pg_catalog.jsonb_path_exists(p_value,
           'strict $ ? (exists (@.**{1001})
                        || exists (@.**{0 to 1000} ? (@.type() == "number"
                           && (@ >= 1e309 || @ <= -1e309 || (@ != 0 && @ > -1e-325 && @ < 1e-325)
                               || 1 - (@ * 0 + 1) / 3 * 3 < 1e-400))))')
$$;

create or replace function private.json_text_too_large(p_value jsonb) returns boolean
language sql
immutable
parallel safe
as $$
  select pg_catalog.octet_length(p_value::text) > 1048576
$$;

-- (A batch makes the first check once, for all its values, then measures
-- each value's text: a call per value cost a send of 100 messages a fifth of
-- its time.)
create or replace function private.json_too_large(p_value jsonb) returns boolean
language sql
immutable
parallel safe
as $$
  select private.json_too_large_unprinted(p_value) or private.json_text_too_large(p_value)
$$;

-- The one refusal of the checks above: 413 payload_too_large, naming the
-- values refused (p_values: 'payload and metadata', say).
create or replace function private.refuse_too_large(p_values text) returns void
language plpgsql
set search_path = ''
as $$
begin
  perform private.raise_error(413, 'payload_too_large',
    p_values || ': at most 1048576 bytes each as JSON text, nested at most 1000 levels, '
    || 'numbers within a double''s range and 400 decimal places');
end;
$$;

-- Whether a JSON field of a batch item is absent, null, or a whole number
-- between p_low and p_high: what a typed parameter would accept, checked
-- before any cast so that SQL callers get the 400 the HTTP route gives
-- instead of a cast error. 1.0 counts as whole, as it does in JavaScript.
create or replace function private.json_integer_within(p_value jsonb, p_low integer, p_high integer)
returns boolean
language sql
immutable
parallel safe
as $$
  select case pg_catalog.jsonb_typeof(p_value)
           when 'number' then p_value::numeric between p_low and p_high
                              and p_value::numeric = pg_catalog.trunc(p_value::numeric)
           else p_value is null or pg_catalog.jsonb_typeof(p_value) = 'null'
         end
$$;


-- The user an operation acts for: a signed-in user acts for themselves
-- (naming anyone else is 403); the service role must name one (400).
-- p_field is the parameter's name as the caller knows it.
create or replace function private.acting_user(p_user_id uuid, p_field text) returns uuid
language plpgsql
volatile
as $$
declare
  v_self uuid;
begin
  if private.caller_is_service() then
    if p_user_id is null then
      perform private.raise_error(400, 'invalid_user',
        format('%s is required for the service role', p_field));
    end if;
    return p_user_id;
  end if;
  v_self := private.caller_user_id();
  if p_user_id is not null and p_user_id <> v_self then
    perform private.raise_error(403, 'forbidden',
      format('users act only for themselves: %s must be your own id or left out', p_field));
  end if;
  return v_self;
end;
$$;

-- -----------------------------------------------------------------------------
-- updated_at trigger
-- -----------------------------------------------------------------------------
create or replace function private.set_updated_at() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.updated_at := now();
  return new;
end;
$$;

-- -----------------------------------------------------------------------------
-- Monthly partitions
--
-- Every partitioned table is range-partitioned on created_at by UTC month and
-- has a DEFAULT partition, so an insert for any date succeeds. Maintenance
-- creates partitions ahead and moves rows that landed in DEFAULT into their
-- month's partition. Partition names follow <table>_YYYY_MM.
-- -----------------------------------------------------------------------------
create table if not exists private.partitioned_tables (
  schema_name text not null,
  table_name text not null,
  months_ahead integer not null default 3 check (months_ahead between 0 and 24),
  retention_months integer check (retention_months > 0),
  registered_at timestamptz not null default now(),
  primary key (schema_name, table_name)
);
alter table private.partitioned_tables enable row level security;

-- Whether a table's DEFAULT partition holds rows in [p_from, p_to).
create or replace function private.default_has_rows(
  p_schema text,
  p_table text,
  p_from timestamptz,
  p_to timestamptz
) returns boolean
language plpgsql
set search_path = ''
as $$
declare
  v_found boolean;
begin
  execute format('select exists (select from %I.%I where created_at >= $1 and created_at < $2)',
    p_schema, p_table || '_default') into v_found using p_from, p_to;
  return v_found;
end;
$$;

-- Creates the partition of p_month if missing, moving that month's rows out of
-- the DEFAULT partition (Postgres refuses to attach over them). Returns the
-- number of rows moved, or null when the partition already existed (or, with
-- p_move false, when rows of the month wait in DEFAULT: the month is left
-- for a move of its own, see maintain_partitions).
--
-- A month exists only as an attached partition of the table spanning it
-- exactly. Anything else in its way is a clash, raised as duplicate_table
-- (maintain_partitions reports it): a table keeping the month's name, such
-- as a month retention detached for archiving, or a partition overlapping
-- the month. Taking such a name for the month made rows arriving late for a
-- detached month stay in DEFAULT unseen for good; they still stay there (read
-- through the parent like every row in DEFAULT), but every run says so.
--
-- Months are UTC months whatever the session's time zone: date_trunc of a
-- date works in the session's zone, and in one whose month can begin without
-- a midnight (Cuba's 2012-04-01 began at 01:00) the bounds came out an hour
-- off, a partition the month check refuses, so the month failed on every run.
--
-- Writers are held off for the moment of the move by a SHARE ROW EXCLUSIVE
-- lock on the parent, taken before anything else (a writer that routed a row
-- to DEFAULT before the attach would otherwise fail). The partition is built
-- apart and ATTACHed, which needs ACCESS EXCLUSIVE on DEFAULT: a transaction
-- that read the table and then writes to it holds DEFAULT and waits for the
-- parent, a deadlock. So this gives way: it waits at most p_lock_timeout for
-- a lock (500 ms, under the default deadlock_timeout of 1 s, so the writer is
-- never the one aborted; less when the run already holds locks, see
-- private.maintenance_lock_timeout) and fails with lock_not_available;
-- maintain_partitions reports the month skipped and the next run makes it.
--
-- When DEFAULT holds rows of the month, readers are held off too (ACCESS
-- EXCLUSIVE on the parent instead): a reader plans with the partitions it
-- sees, so one that planned before the ATTACH committed and read after it
-- would look for a moved row in DEFAULT only, and miss it (an idempotent
-- replay returned an empty row, a status change said 404). That lock is taken
-- first, before any other on the table, so a transaction that read the table
-- and then writes to it goes ahead of it instead of deadlocking; it waits for
-- such a transaction to end (500 ms at most, as above). Creating an empty
-- month ahead, the usual case, leaves readers alone.
create or replace function private.create_monthly_partition(
  p_schema text,
  p_table text,
  p_month date,
  p_lock_timeout text default '500ms',
  p_move boolean default true
) returns bigint
language plpgsql
set search_path = ''
set lock_timeout = '500ms'
set timezone = 'UTC'
-- the bounds go into the DDL as text: ISO prints an offset, which reads back
-- whatever the session's DateStyle (SQL style prints a zone abbreviation,
-- such as Kigali's CAT, that Postgres cannot read back)
set datestyle = 'ISO, YMD'
as $$
declare
  -- a date cast to timestamp (no zone) is the same month start in any zone
  v_start timestamp := date_trunc('month', p_month::timestamp);
  v_from timestamptz := v_start at time zone 'UTC';
  v_to timestamptz := (v_start + interval '1 month') at time zone 'UTC';
  v_name text := format('%s_%s', p_table, to_char(v_start, 'YYYY_MM'));
  v_default text := p_table || '_default';
  v_parent oid := to_regclass(format('%I.%I', p_schema, p_table));
  v_in_way text;
  v_moved bigint;
  v_has_rows boolean;
begin
  perform set_config('lock_timeout', p_lock_timeout, true); -- until this function returns
  -- Serialises concurrent creators of partitions of the same table.
  perform pg_advisory_xact_lock(hashtextextended(format('partition:%s.%s', p_schema, p_table), 0));

  -- The month is there already: made by an earlier run, or by hand under
  -- another name.
  if exists (
    select from private.registered_partitions(array[v_parent]) r
    where r.level = 1 and r.from_at = v_from and r.to_at = v_to
  ) then
    return null;
  end if;

  select r.partition_oid::regclass::text into v_in_way
  from private.registered_partitions(array[v_parent]) r
  where r.level = 1 and r.from_at < v_to and r.to_at > v_from;
  if v_in_way is not null then
    raise exception 'month % of %.% cannot be made: partition % overlaps it; the month''s rows stay in DEFAULT',
      to_char(v_start, 'YYYY-MM'), p_schema, p_table, v_in_way
      using errcode = 'duplicate_table';
  end if;
  if to_regclass(format('%I.%I', p_schema, v_name)) is not null then
    raise exception 'month % of %.% cannot be made: %.% exists but is no partition of it (a month retention detached keeps its name until it is archived and dropped); the month''s rows stay in DEFAULT',
      to_char(v_start, 'YYYY-MM'), p_schema, p_table, p_schema, v_name
      using errcode = 'duplicate_table';
  end if;

  v_has_rows := private.default_has_rows(p_schema, p_table, v_from, v_to);
  if v_has_rows and not p_move then
    return null;
  end if;
  execute format('lock table %I.%I in %s mode', p_schema, p_table,
    case when v_has_rows then 'access exclusive' else 'share row exclusive' end);
  execute format('lock table %I.%I in exclusive mode', p_schema, v_default);
  -- A row of the month written between the look and the lock would move
  -- under the weaker lock: the month waits for the next run, which sees it.
  if not v_has_rows and private.default_has_rows(p_schema, p_table, v_from, v_to) then
    raise exception 'rows of % reached DEFAULT during maintenance', v_name
      using errcode = 'lock_not_available';
  end if;

  execute format(
    'create table %I.%I (like %I.%I including defaults including constraints including storage)',
    p_schema, v_name, p_schema, p_table
  );
  perform private.secure_partition(p_schema, v_name);

  execute format(
    'with moved as (delete from %I.%I where created_at >= %L and created_at < %L returning *)
     insert into %I.%I select * from moved',
    p_schema, v_default, v_from, v_to, p_schema, v_name
  );
  get diagnostics v_moved = row_count;

  execute format(
    'alter table %I.%I attach partition %I.%I for values from (%L) to (%L)',
    p_schema, p_table, p_schema, v_name, v_from, v_to
  );

  return v_moved;
end;
$$;

-- Partitions are reached through their parent, where RLS and the parent's
-- grants apply. Supabase's default privileges would grant the API roles, the
-- service role included, direct access to each partition, past the parent's
-- policies and grants (money tables grant the service role only select, so
-- that status changes go through the state machine), so partitions are closed
-- to all of them.
create or replace function private.secure_partition(p_schema text, p_name text)
returns void
language plpgsql
set search_path = ''
as $$
begin
  execute format('revoke all on table %I.%I from public, anon, authenticated, service_role',
    p_schema, p_name);
  execute format('alter table %I.%I enable row level security', p_schema, p_name);
end;
$$;

-- The partitions of the registered tables among p_parents, at every level of
-- their trees (level 1: the table's own), with their bounds as instants: null
-- for DEFAULT, MINVALUE and MAXVALUE. (Bounds print in the session's time zone
-- with its offset, so they read back as the instants they are.)
create or replace function private.registered_partitions(p_parents oid[])
returns table (
  partition_oid oid,
  schema_name text,
  partition_name text,
  level integer,
  from_at timestamptz,
  to_at timestamptz
)
language sql
stable
set search_path = ''
set datestyle = 'ISO, YMD' -- as create_monthly_partition: the bounds are read from text
as $$
  select c.oid, n.nspname::text, c.relname::text, tree.level,
         (pg_catalog.regexp_match(b.bound, 'FROM \(''([^'']+)''\)'))[1]::timestamptz,
         (pg_catalog.regexp_match(b.bound, 'TO \(''([^'']+)''\)'))[1]::timestamptz
  from private.partitioned_tables t
  join pg_catalog.pg_class p
    on p.oid = pg_catalog.to_regclass(pg_catalog.format('%I.%I', t.schema_name, t.table_name))
  cross join lateral pg_catalog.pg_partition_tree(p.oid) tree
  join pg_catalog.pg_class c on c.oid = tree.relid
  join pg_catalog.pg_namespace n on n.oid = c.relnamespace
  cross join lateral (select pg_catalog.pg_get_expr(c.relpartbound, c.oid) as bound) b
  where p.oid = any (p_parents) and tree.level > 0
$$;

-- Closes the partitions of the registered tables among p_parents that are
-- still open to an API role (row level security off, or a grant to PUBLIC,
-- anon, authenticated or service_role), and returns their names. Every level
-- of the tree: a partition made by hand may be partitioned again, and its
-- own partitions hold rows too.
create or replace function private.close_open_partitions(p_parents oid[])
returns setof text
language plpgsql
set search_path = ''
as $$
declare
  v_part record;
begin
  for v_part in
    select r.schema_name, r.partition_name
    from private.registered_partitions(p_parents) r
    join pg_catalog.pg_class c on c.oid = r.partition_oid
    where not c.relrowsecurity or exists (
      select from pg_catalog.aclexplode(c.relacl) a
      where a.grantee = 0 or a.grantee in (
        select api.oid from pg_catalog.pg_roles api
        where api.rolname in ('anon', 'authenticated', 'service_role'))
    )
  loop
    perform private.secure_partition(v_part.schema_name, v_part.partition_name);
    return next v_part.partition_name;
  end loop;
end;
$$;

-- The partitions of the registered tables among p_parents that are not one
-- UTC month (their own partitions, level 1; DEFAULT and MINVALUE / MAXVALUE
-- bounds have nothing to compare). Maintenance names, makes and fills
-- partitions by UTC month; the spec's recipe run in a session whose time zone
-- is not UTC ('2026-06-01' read as Kigali's midnight) made one that overlaps
-- the month before: maintenance then failed that month for good, and its rows
-- stayed in DEFAULT.
create or replace function private.misaligned_partitions(p_parents oid[])
returns table (partition_oid oid, schema_name text, partition_name text, from_at timestamptz,
               to_at timestamptz)
language sql
stable
set search_path = ''
set timezone = 'UTC'
as $$
  select r.partition_oid, r.schema_name, r.partition_name, r.from_at, r.to_at
  from private.registered_partitions(p_parents) r
  where r.level = 1 and r.from_at is not null and r.to_at is not null
    and (r.from_at <> pg_catalog.date_trunc('month', r.from_at at time zone 'UTC') at time zone 'UTC'
         or r.to_at <> (pg_catalog.date_trunc('month', r.from_at at time zone 'UTC')
                        + interval '1 month') at time zone 'UTC')
  order by r.from_at
$$;

-- Refuses a partition of a registered table that is not one UTC month (the
-- event trigger's check, in the statement that made it).
create or replace function private.check_month_partitions(p_parents oid[])
returns void
language plpgsql
set search_path = ''
set timezone = 'UTC'
as $$
declare
  v_part record;
begin
  for v_part in select * from private.misaligned_partitions(p_parents) limit 1 loop
    raise exception 'partition % must span one UTC month, not % to %',
      v_part.partition_oid::regclass::text, v_part.from_at at time zone 'UTC',
      v_part.to_at at time zone 'UTC'
      using errcode = 'invalid_object_definition',
        hint = 'give the bounds with their offset: FROM (''2026-06-01 00:00+00'') TO (''2026-07-01 00:00+00'')';
  end loop;
end;
$$;

-- A partition made by hand, as in the spec's recipe (CREATE TABLE ...
-- PARTITION OF, or ATTACH PARTITION), would get Supabase's default grants and
-- no row level security: anyone could read it directly, past the parent's
-- policies. This event trigger closes it in the statement that made it.
-- (maintain_partitions also closes any it finds, for a database where the
-- trigger could not be installed.) It fires for every role's DDL, a service
-- role's ALTER TABLE of a temporary table too, so it runs as its owner.
create or replace function private.secure_new_partitions() returns event_trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_parents oid[];
begin
  -- the tables the command made or altered, or the roots of their trees
  select array_agg(distinct coalesce(pg_catalog.pg_partition_root(d.objid), d.objid)) into v_parents
  from pg_catalog.pg_event_trigger_ddl_commands() d
  where d.classid = 'pg_catalog.pg_class'::regclass and d.object_type = 'table';
  if v_parents is not null then
    perform private.close_open_partitions(v_parents);
    perform private.check_month_partitions(v_parents);
  end if;
end;
$$;

-- Creating an event trigger takes a superuser, or on Supabase the privileged
-- role supautils names (postgres, on current images). Where neither holds, the
-- migration goes on without it: maintain_partitions() closes new partitions on
-- its daily run instead, and reports by name those that are not one UTC month
-- (action 'misaligned'; it cannot refuse them after the fact).
do $$
begin
  drop event trigger if exists secure_new_partitions;
  create event trigger secure_new_partitions on ddl_command_end
    when tag in ('CREATE TABLE', 'ALTER TABLE')
    execute function private.secure_new_partitions();
exception when insufficient_privilege then
  raise warning 'event trigger secure_new_partitions not created: %', sqlerrm;
end
$$;

-- Registers a partitioned table for maintenance, creates its DEFAULT partition
-- and the partitions of the current month and the months ahead.
create or replace function private.register_partitioned_table(
  p_schema text,
  p_table text,
  p_months_ahead integer default 3,
  p_retention_months integer default null
) returns void
language plpgsql
set search_path = ''
set timezone = 'UTC' -- months are UTC months, whatever the session's zone
as $$
declare
  v_month date;
begin
  insert into private.partitioned_tables (schema_name, table_name, months_ahead, retention_months)
  values (p_schema, p_table, p_months_ahead, p_retention_months)
  on conflict (schema_name, table_name) do update
    set months_ahead = excluded.months_ahead,
        retention_months = excluded.retention_months;

  if to_regclass(format('%I.%I', p_schema, p_table || '_default')) is null then
    execute format(
      'create table %I.%I partition of %I.%I default',
      p_schema, p_table || '_default', p_schema, p_table
    );
    perform private.secure_partition(p_schema, p_table || '_default');
  end if;

  for v_month in
    select generate_series(
      date_trunc('month', now() at time zone 'UTC'),
      date_trunc('month', now() at time zone 'UTC') + make_interval(months => p_months_ahead),
      interval '1 month'
    )::date
  loop
    perform private.create_monthly_partition(p_schema, p_table, v_month);
  end loop;
end;
$$;

-- DETACH takes ACCESS EXCLUSIVE on the parent: it gives way like
-- create_monthly_partition.
create or replace function private.detach_partition(
  p_schema text,
  p_table text,
  p_name text,
  p_lock_timeout text default '500ms'
) returns void
language plpgsql
set search_path = ''
set lock_timeout = '500ms'
as $$
begin
  perform set_config('lock_timeout', p_lock_timeout, true); -- until this function returns
  execute format('alter table %I.%I detach partition %I.%I', p_schema, p_table, p_schema, p_name);
end;
$$;

-- How long a maintenance run may wait for its next lock. A run is one
-- transaction: a partition it makes or detaches keeps its locks until the
-- whole run commits, and writers of that table queue behind them. If the run
-- then waited for a lock such a writer holds on another table, each would
-- wait for the other, and the deadlock check of the one waiting longer, the
-- writer, fires first: the writer would be aborted. So a run that holds
-- nothing waits up to 500 ms, and one that has held locks since
-- p_holding_since ends all its waiting within 80% of deadlock_timeout of
-- that moment (and then does not wait at all: what it cannot lock at once
-- is skipped until the next run). A writer that queued behind the run can
-- only have begun waiting after p_holding_since, so its check comes later,
-- when the run no longer waits.
create or replace function private.maintenance_lock_timeout(p_holding_since timestamptz)
returns text
language sql
stable
set search_path = ''
as $$
  select case when p_holding_since is null then '500ms' else
    greatest(1, least(500, floor(
      0.8 * extract(epoch from current_setting('deadlock_timeout')::interval) * 1000
      - extract(epoch from clock_timestamp() - p_holding_since) * 1000)))::int || 'ms'
  end
$$;

-- What one month of a table needs, as a maintenance action: 'created' (with
-- the rows moved out of DEFAULT), 'skipped' (locks busy: the next run makes
-- it), 'clash' (something else holds the month's name or range: its rows stay
-- in DEFAULT until someone acts, see create_monthly_partition) or 'failed';
-- no row when the month is there already (or, p_move false, when its rows
-- wait in DEFAULT for a move of their own). Clashes and failures are raised
-- as warnings too, for pg_cron's log.
create or replace function private.maintain_month(
  p_schema text,
  p_table text,
  p_month date,
  p_lock_timeout text,
  p_move boolean
) returns table (action text, rows_moved bigint, detail text)
language plpgsql
set search_path = ''
as $$
begin
  rows_moved := private.create_monthly_partition(p_schema, p_table, p_month, p_lock_timeout,
    p_move);
  if rows_moved is not null then
    action := 'created';
    return next;
  end if;
exception
  when lock_not_available then
    action := 'skipped';
    rows_moved := 0;
    return next;
  when duplicate_table then
    raise warning 'maintain_partitions: %', sqlerrm;
    action := 'clash';
    rows_moved := 0;
    detail := sqlerrm;
    return next;
  when others then
    raise warning 'maintain_partitions: %_% of %.% failed: %', p_table, to_char(p_month, 'YYYY_MM'),
      p_schema, p_table, sqlerrm;
    action := 'failed';
    rows_moved := 0;
    detail := sqlerrm;
    return next;
end;
$$;

-- The rows a table's DEFAULT partition holds, by UTC month: years 1000-9999
-- only, as rows dated outside them (or at +-infinity) fit no partition.
create or replace function private.default_months(p_schema text, p_table text)
returns table (month date, rows bigint)
language plpgsql
stable
set search_path = ''
set timezone = 'UTC'
as $$
begin
  return query execute format(
    'select m::date, count(*)
     from (select date_trunc(''month'', created_at at time zone ''UTC'') as m
           from %I.%I where isfinite(created_at)) d
     where extract(year from m) between 1000 and 9999
     group by m
     order by m',
    p_schema, p_table || '_default'
  );
end;
$$;

-- One maintenance pass over every registered table:
--   1. partitions for the current month and months_ahead months ahead;
--   2. with p_move_backlog, a partition for every month that has rows in
--      DEFAULT (rows moved; see default_months for the months that can);
--   3. partitions still open to an API role (made by hand) closed;
--   4. partitions that are not one UTC month reported 'misaligned' (made by
--      hand where the event trigger that refuses them is missing);
--   5. partitions older than retention_months detached (kept as plain tables
--      for archiving; never dropped here).
-- Each step on each partition stands alone: a month whose locks are busy is
-- reported 'skipped', one that fails 'failed' (with a warning), and the rest
-- of the pass goes on, so one bad month cannot stop maintenance for good.
-- Safe to run concurrently: runs serialise on an advisory lock.
--
-- The pass is one transaction: a big DEFAULT backlog moved in one go can be
-- cancelled (a statement timeout) and take everything with it, the months
-- ahead too. So neither scheduled caller runs it whole: pg_cron calls
-- private.run_partition_maintenance() and the HTTP route
-- (observability/maintenance) does the same steps within its time budget:
-- this with p_move_backlog false (a month ahead whose rows already wait in
-- DEFAULT is left for its move), then the backlog (partition_backlog) a month
-- per transaction with maintain_partition_month.
create or replace function public.maintain_partitions(p_move_backlog boolean default true)
returns table (table_name text, partition_name text, action text, rows_moved bigint,
               detail text)
language plpgsql
security definer
set search_path = ''
set timezone = 'UTC'
as $$
declare
  v_table record;
  v_parent oid;
  v_month date;
  v_part record;
  v_names text[];
  v_cutoff timestamptz;
  -- since when this run holds locks writers wait for (see maintenance_lock_timeout)
  v_holding_since timestamptz;
  v_asked_at timestamptz;
begin
  perform pg_advisory_xact_lock(hashtextextended('partition:maintenance', 0));

  for v_table in select * from private.partitioned_tables order by schema_name, table_name loop
    table_name := format('%I.%I', v_table.schema_name, v_table.table_name);
    v_parent := to_regclass(table_name);
    if v_parent is null then
      raise warning 'maintain_partitions: % is registered but does not exist', table_name;
      partition_name := null;
      action := 'failed';
      rows_moved := 0;
      detail := 'the table does not exist';
      return next;
      continue;
    end if;

    for v_month in
      select generate_series(
        date_trunc('month', now() at time zone 'UTC'),
        date_trunc('month', now() at time zone 'UTC')
          + make_interval(months => v_table.months_ahead),
        interval '1 month'
      )::date
      union
      select d.month
      from private.default_months(v_table.schema_name, v_table.table_name) d
      where p_move_backlog
      order by 1
    loop
      partition_name := format('%s_%s', v_table.table_name, to_char(v_month, 'YYYY_MM'));
      v_asked_at := clock_timestamp();
      for action, rows_moved, detail in
        select * from private.maintain_month(v_table.schema_name, v_table.table_name, v_month,
          private.maintenance_lock_timeout(v_holding_since), p_move_backlog)
      loop
        if action = 'created' then
          v_holding_since := coalesce(v_holding_since, v_asked_at);
        end if;
        return next;
      end loop;
    end loop;

    -- Closing and checking read and alter only what is already there; each
    -- stands alone all the same, so neither can stop the steps after it.
    rows_moved := 0;
    detail := null;
    begin
      v_names := array(select * from private.close_open_partitions(array[v_parent]));
    exception when others then
      raise warning 'maintain_partitions: closing the partitions of % failed: %', table_name, sqlerrm;
      v_names := array[]::text[];
      partition_name := null;
      action := 'failed';
      detail := sqlerrm;
      return next;
      detail := null;
    end;
    action := 'secured';
    foreach partition_name in array v_names loop
      return next;
    end loop;

    begin
      for v_part in select * from private.misaligned_partitions(array[v_parent]) loop
        raise warning 'maintain_partitions: partition %.% of % is not one UTC month',
          v_part.schema_name, v_part.partition_name, table_name;
        partition_name := v_part.partition_name;
        action := 'misaligned';
        detail := format('spans %s to %s (UTC), not one UTC month; its rows are read, but the months it overlaps cannot be made',
          v_part.from_at at time zone 'UTC', v_part.to_at at time zone 'UTC');
        return next;
      end loop;
    exception when others then
      raise warning 'maintain_partitions: checking the partitions of % failed: %', table_name, sqlerrm;
      partition_name := null;
      action := 'failed';
      detail := sqlerrm;
      return next;
    end;
    detail := null;

    if v_table.retention_months is not null then
      v_cutoff := (date_trunc('month', now() at time zone 'UTC')
        - make_interval(months => v_table.retention_months))::timestamp at time zone 'UTC';
      for v_part in
        select r.partition_name
        from private.registered_partitions(array[v_parent]) r
        -- (DEFAULT has no upper bound)
        where r.level = 1 and r.to_at <= v_cutoff
        order by r.from_at
      loop
        partition_name := v_part.partition_name;
        begin
          v_asked_at := clock_timestamp();
          perform private.detach_partition(v_table.schema_name, v_table.table_name,
            v_part.partition_name, private.maintenance_lock_timeout(v_holding_since));
          v_holding_since := coalesce(v_holding_since, v_asked_at);
          action := 'detached';
        exception
          when lock_not_available then
            action := 'skipped';
          when others then
            raise warning 'maintain_partitions: detaching % of % failed: %', partition_name,
              table_name, sqlerrm;
            action := 'failed';
            detail := sqlerrm;
        end;
        return next;
        detail := null;
      end loop;
    end if;
  end loop;
end;
$$;

revoke all on function public.maintain_partitions(boolean) from public, anon, authenticated;
grant execute on function public.maintain_partitions(boolean) to service_role;

-- The months with rows waiting in DEFAULT, of every registered table, in the
-- order maintenance moves them: what a run with p_move_backlog false leaves
-- to maintain_partition_month.
create or replace function public.partition_backlog()
returns table (table_name text, partition_name text, month date, rows bigint)
language plpgsql
security definer
set search_path = ''
set timezone = 'UTC'
as $$
declare
  v_table record;
begin
  for v_table in
    select t.* from private.partitioned_tables t
    where to_regclass(format('%I.%I', t.schema_name, t.table_name)) is not null
    order by t.schema_name, t.table_name
  loop
    return query
      select format('%I.%I', v_table.schema_name, v_table.table_name),
             format('%s_%s', v_table.table_name, to_char(d.month, 'YYYY_MM')), d.month, d.rows
      from private.default_months(v_table.schema_name, v_table.table_name) d;
  end loop;
end;
$$;

revoke all on function public.partition_backlog() from public, anon, authenticated;
grant execute on function public.partition_backlog() to service_role;

-- Makes one month of one registered table (p_table_name as maintenance names
-- it, schema-qualified), moving its rows out of DEFAULT, in the caller's
-- transaction: the HTTP route's unit of backlog, so that a big backlog moves
-- a month per transaction, each within the statement timeout, and what one
-- move leaves undone (a timeout, busy locks) holds up no other month. The
-- month's action as maintain_partitions reports it; no row when it is there
-- already, or when it is neither ahead nor waiting in DEFAULT. An unknown
-- table is 404 table_not_found; a missing month, or one outside years
-- 1000-9999, 400 invalid_month.
create or replace function public.maintain_partition_month(p_table_name text, p_month date)
returns table (table_name text, partition_name text, action text, rows_moved bigint,
               detail text)
language plpgsql
security definer
set search_path = ''
set timezone = 'UTC'
as $$
declare
  v_table private.partitioned_tables;
  v_month date := date_trunc('month', p_month::timestamp)::date;
begin
  select t.* into v_table from private.partitioned_tables t
  where format('%I.%I', t.schema_name, t.table_name) = p_table_name
    and to_regclass(p_table_name) is not null;
  if not found then
    perform private.raise_error(404, 'table_not_found',
      'table_name must name a table partition maintenance keeps, as schema.table');
  end if;
  if v_month is null or extract(year from v_month) not between 1000 and 9999 then
    perform private.raise_error(400, 'invalid_month', 'month must be a date in years 1000-9999');
  end if;

  -- only what a pass would make: a month with rows waiting, or one ahead
  -- (an empty month anywhere else is a partition nobody needs)
  if v_month not between date_trunc('month', now() at time zone 'UTC')::date
       and (date_trunc('month', now() at time zone 'UTC')
            + make_interval(months => v_table.months_ahead))::date
     and not private.default_has_rows(v_table.schema_name, v_table.table_name,
       v_month::timestamp at time zone 'UTC',
       (v_month + interval '1 month')::timestamp at time zone 'UTC')
  then
    return;
  end if;

  table_name := p_table_name;
  partition_name := format('%s_%s', v_table.table_name, to_char(v_month, 'YYYY_MM'));
  return query
    select table_name, partition_name, m.action, m.rows_moved, m.detail
    from private.maintain_month(v_table.schema_name, v_table.table_name, v_month, '500ms', true) m;
end;
$$;

revoke all on function public.maintain_partition_month(text, date) from public, anon, authenticated;
grant execute on function public.maintain_partition_month(text, date) to service_role;

-- pg_cron's pass, a step per transaction, the way the HTTP route steps: the
-- months ahead, closing, checking and retention first (maintain_partitions
-- without the backlog), then each month waiting in DEFAULT on its own. Run as
-- one transaction, a pass cancelled part-way (a statement timeout set for the
-- role or the database, a restart) took everything with it, the months ahead
-- too, and next month's rows then piled up in DEFAULT; now a cancel loses only
-- the month it was moving, and the next run goes on from there. It must be
-- pg_cron's whole command (`call ...` and nothing else): only then may a
-- procedure commit, in pg_cron's client and background-worker modes alike.
-- A procedure that commits can have no SET clause, so every name here is
-- qualified and nothing depends on the caller's search_path.
create or replace procedure private.run_partition_maintenance()
language plpgsql
as $$
declare
  v_month record;
begin
  perform public.maintain_partitions(false);
  commit;
  -- (the loop's cursor is kept across the commits)
  for v_month in select b.table_name, b.month from public.partition_backlog() b loop
    perform public.maintain_partition_month(v_month.table_name, v_month.month);
    commit;
  end loop;
end;
$$;

revoke all on procedure private.run_partition_maintenance() from public, anon, authenticated;

-- -----------------------------------------------------------------------------
-- Scheduling
--
-- Schedules a pg_cron job where pg_cron is installed; elsewhere it does
-- nothing, so migrations stay runnable on any database.
-- -----------------------------------------------------------------------------
create or replace function private.schedule_cron(p_name text, p_schedule text, p_command text)
returns void
language plpgsql
set search_path = ''
as $$
begin
  if to_regnamespace('cron') is not null then
    perform cron.schedule(p_name, p_schedule, p_command);
  end if;
end;
$$;

select private.schedule_cron(
  'maintain-partitions',
  '15 0 * * *',
  'call private.run_partition_maintenance()'
);
