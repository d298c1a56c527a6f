-- =============================================================================
-- System observability: metrics and audit trail.
--
--   system_metrics     (partitioned) time series written and read by services
--   system_audit_logs  (partitioned) who did what, to which resource
--
-- Only service_role records and reads metrics. Users write audit events as
-- themselves (actor forced to their own id) and read only their own rows.
-- =============================================================================

-- -----------------------------------------------------------------------------
-- system_metrics
--
-- Name rules here and in the other domains are a star pattern plus a length
-- test, never a counted repeat like [a-z0-9_]{0,62}: Postgres compiles a
-- counted repeat into one automaton state per repetition, which made each
-- check cost 7-25 us per row, more than the rest of the insert.
-- -----------------------------------------------------------------------------
create table public.system_metrics (
  id bigserial not null,
  service_name text not null check (char_length(service_name) <= 63 and service_name ~ '^[a-z0-9][a-z0-9_.-]*$'),
  metric_type text not null check (char_length(metric_type) <= 32 and metric_type ~ '^[a-z][a-z0-9_]*$'),
  metric_name text not null check (char_length(metric_name) <= 128 and metric_name ~ '^[a-zA-Z][a-zA-Z0-9_.:/-]*$'),
  -- finite and bounded (which also refuses NaN and infinities): a window's
  -- avg and percentiles sum and subtract values, and must not overflow
  value double precision not null check (value between -1e300 and 1e300),
  unit text check (char_length(unit) between 1 and 32),
  tags jsonb not null default '{}'::jsonb check (jsonb_typeof(tags) = 'object'),
  correlation_id text check (char_length(correlation_id) <= 128),
  created_at timestamptz not null default now(),
  primary key (id, created_at)
) partition by range (created_at);

create index system_metrics_service_name_created_idx
  on public.system_metrics (service_name, metric_name, created_at desc);
create index system_metrics_correlation_idx
  on public.system_metrics (correlation_id) where correlation_id is not null;
create index system_metrics_tags_idx on public.system_metrics using gin (tags jsonb_path_ops);

select private.register_partitioned_table('public', 'system_metrics', 3, null);

alter table public.system_metrics enable row level security;

-- Append-only for every API role, the service role included (which passes
-- RLS): observations are not edited; retention detaches whole months.
revoke all on public.system_metrics from anon, authenticated, service_role;
revoke all on sequence public.system_metrics_id_seq from anon, authenticated, service_role;
grant select, insert on public.system_metrics to service_role;
grant usage on sequence public.system_metrics_id_seq to service_role;

create policy system_metrics_service_select on public.system_metrics
  for select to service_role using (true);
create policy system_metrics_service_insert on public.system_metrics
  for insert to service_role with check (true);

-- -----------------------------------------------------------------------------
-- system_audit_logs
-- -----------------------------------------------------------------------------
create table public.system_audit_logs (
  id bigserial not null,
  actor_type text not null check (actor_type in ('user', 'service', 'system', 'admin')),
  actor_identifier text not null check (char_length(actor_identifier) between 1 and 256),
  user_id uuid,
  action text not null check (char_length(action) <= 128 and action ~ '^[a-zA-Z][a-zA-Z0-9_.:-]*$'),
  resource_type text check (char_length(resource_type) between 1 and 64),
  resource_id text check (char_length(resource_id) between 1 and 256),
  old_data jsonb,
  new_data jsonb,
  metadata jsonb not null default '{}'::jsonb check (jsonb_typeof(metadata) = 'object'),
  ip_address inet,
  user_agent text check (char_length(user_agent) <= 512),
  correlation_id text check (char_length(correlation_id) <= 128),
  request_id text check (char_length(request_id) <= 128),
  status text not null default 'success' check (status in ('success', 'failure', 'denied')),
  error_message text check (char_length(error_message) <= 2000),
  created_at timestamptz not null default now(),
  primary key (id, created_at)
) partition by range (created_at);

create index system_audit_logs_user_created_idx
  on public.system_audit_logs (user_id, created_at desc, id desc);
create index system_audit_logs_created_idx
  on public.system_audit_logs (created_at desc, id desc);
create index system_audit_logs_resource_idx
  on public.system_audit_logs (resource_type, resource_id, created_at desc);
create index system_audit_logs_correlation_idx
  on public.system_audit_logs (correlation_id) where correlation_id is not null;

select private.register_partitioned_table('public', 'system_audit_logs', 3, null);

alter table public.system_audit_logs enable row level security;

-- An audit trail nobody behind the API can edit or empty, the service role
-- included (it passes RLS, so only missing grants stop it).
revoke all on public.system_audit_logs from anon, authenticated, service_role;
revoke all on sequence public.system_audit_logs_id_seq from anon, authenticated, service_role;
grant select on public.system_audit_logs to authenticated;
grant select, insert on public.system_audit_logs to service_role;
grant usage on sequence public.system_audit_logs_id_seq to service_role;

create policy system_audit_logs_user_select on public.system_audit_logs
  for select to authenticated using (user_id = (select auth.uid()));
create policy system_audit_logs_service_select on public.system_audit_logs
  for select to service_role using (true);
create policy system_audit_logs_service_insert on public.system_audit_logs
  for insert to service_role with check (true);

-- -----------------------------------------------------------------------------
-- record_metric / record_metrics
-- -----------------------------------------------------------------------------
create or replace function public.record_metric(
  p_service_name text,
  p_metric_type text,
  p_metric_name text,
  p_value double precision,
  p_unit text default null,
  p_tags jsonb default '{}'::jsonb,
  p_correlation_id text default null,
  p_recorded_at timestamptz default null
) returns bigint
language plpgsql
set search_path = ''
as $$
declare
  v_id bigint;
begin
  if p_tags is not null and jsonb_typeof(p_tags) <> 'object' then
    perform private.raise_error(400, 'invalid_tags', 'tags must be a JSON object');
  end if;
  insert into public.system_metrics
    (service_name, metric_type, metric_name, value, unit, tags, correlation_id, created_at)
  values
    (p_service_name, p_metric_type, p_metric_name, p_value, p_unit,
     coalesce(p_tags, '{}'::jsonb), p_correlation_id, coalesce(p_recorded_at, now()))
  returning id into v_id;
  return v_id;
end;
$$;

-- Batch form: p_metrics is a JSON array of objects with the parameter names of
-- record_metric without p_. One statement, all or nothing, and no cap on the
-- batch size: the HTTP API caps a request at 1000 metrics, while the WhatsApp
-- claim and webhook record a whole claim's or delivery's metrics at once, and a
-- cap meant for requests would roll back their work.
--
-- record_metrics_returning_ids answers with the new ids in array order: the
-- observability function commits single-metric requests that arrive together
-- as one batch (group commit, shared/coalesce.ts) and answers each with its
-- own id. record_metrics counts the same insert, so the two cannot drift.
create or replace function public.record_metrics_returning_ids(
  p_metrics jsonb,
  p_correlation_id text default null
) returns table (id bigint)
language plpgsql
set search_path = ''
as $$
begin
  if jsonb_typeof(p_metrics) is distinct from 'array' then
    perform private.raise_error(400, 'invalid_metrics', 'metrics must be a JSON array');
  end if;
  if exists (
    select from jsonb_array_elements(p_metrics) e
    where jsonb_typeof(e) <> 'object'
      or (e ? 'tags' and jsonb_typeof(e -> 'tags') not in ('object', 'null'))
  ) then
    perform private.raise_error(400, 'invalid_metrics', 'each metric must be an object with object tags');
  end if;

  -- Rows go in in array order, so the sequence hands out ascending ids in
  -- that order: sorting the ids gives them back in array order.
  return query
  with inserted as (
    insert into public.system_metrics
      (service_name, metric_type, metric_name, value, unit, tags, correlation_id, created_at)
    select m.service_name, m.metric_type, m.metric_name, m.value, m.unit,
           coalesce(m.tags, '{}'::jsonb), coalesce(m.correlation_id, p_correlation_id),
           coalesce(m.recorded_at, now())
    from jsonb_array_elements(p_metrics) with ordinality as e(metric, n)
    cross join lateral jsonb_to_record(e.metric) as m(
      service_name text, metric_type text, metric_name text, value double precision,
      unit text, tags jsonb, correlation_id text, recorded_at timestamptz
    )
    order by e.n
    returning system_metrics.id
  )
  select inserted.id from inserted order by inserted.id;
end;
$$;

create or replace function public.record_metrics(
  p_metrics jsonb,
  p_correlation_id text default null
) returns integer
language sql
set search_path = ''
as $$
  select count(*)::integer from public.record_metrics_returning_ids(p_metrics, p_correlation_id);
$$;

-- -----------------------------------------------------------------------------
-- get_metric_stats: avg/min/max/p95 per time bucket
-- -----------------------------------------------------------------------------
create or replace function public.get_metric_stats(
  p_service_name text,
  p_metric_name text,
  p_from timestamptz default now() - interval '1 hour',
  p_to timestamptz default now(),
  p_bucket_seconds integer default 60
) returns table (
  bucket timestamptz,
  count bigint,
  avg double precision,
  min double precision,
  max double precision,
  p95 double precision
)
language plpgsql
-- volatile: a stable function would read with its caller's snapshot, taken
-- before it waited for maintenance moving the window's month out of DEFAULT,
-- and miss the moved rows (see "Reads" in the transactions migration)
volatile
set search_path = ''
as $$
begin
  if p_bucket_seconds is null or p_bucket_seconds < 1 or p_bucket_seconds > 86400 * 31 then
    perform private.raise_error(400, 'invalid_bucket', 'bucket_seconds must be between 1 and 2678400');
  end if;
  if p_from is null or p_to is null or p_from >= p_to then
    perform private.raise_error(400, 'invalid_window', 'from must be before to');
  end if;
  if (extract(epoch from p_to - p_from) / p_bucket_seconds) > 10000 then
    perform private.raise_error(400, 'too_many_buckets', 'at most 10000 buckets per query');
  end if;

  return query
  select to_timestamp(floor(extract(epoch from m.created_at) / p_bucket_seconds) * p_bucket_seconds),
         count(*),
         -- a float8 avg also sums squares, which overflow past 1e154
         avg(m.value::numeric)::double precision,
         min(m.value),
         max(m.value),
         percentile_cont(0.95) within group (order by m.value)
  from public.system_metrics m
  where m.service_name = p_service_name
    and m.metric_name = p_metric_name
    and m.created_at >= p_from
    and m.created_at < p_to
  group by 1
  order by 1;
end;
$$;

revoke all on function public.record_metric(text, text, text, double precision, text, jsonb, text, timestamptz)
  from public, anon, authenticated;
revoke all on function public.record_metrics(jsonb, text) from public, anon, authenticated;
revoke all on function public.record_metrics_returning_ids(jsonb, text)
  from public, anon, authenticated;
revoke all on function public.get_metric_stats(text, text, timestamptz, timestamptz, integer)
  from public, anon, authenticated;
grant execute on function public.record_metric(text, text, text, double precision, text, jsonb, text, timestamptz)
  to service_role;
grant execute on function public.record_metrics(jsonb, text) to service_role;
grant execute on function public.record_metrics_returning_ids(jsonb, text) to service_role;
grant execute on function public.get_metric_stats(text, text, timestamptz, timestamptz, integer)
  to service_role;

-- -----------------------------------------------------------------------------
-- log_audit_event
--
-- security definer so users can append without an insert grant; a user's
-- event is always recorded as actor 'user' with their own id, whatever they
-- pass. Callers without a user or service identity are refused.
-- -----------------------------------------------------------------------------
create or replace function public.log_audit_event(
  p_actor_type text,
  p_actor_identifier text,
  p_action text,
  p_resource_type text default null,
  p_resource_id text default null,
  p_old_data jsonb default null,
  p_new_data jsonb default null,
  p_metadata jsonb default '{}'::jsonb,
  p_ip_address inet default null,
  p_user_agent text default null,
  p_correlation_id text default null,
  p_request_id text default null,
  p_status text default 'success',
  p_error_message text default null,
  p_user_id uuid default null
) returns bigint
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_uid uuid := private.caller_user_id();
  v_actor_type text := p_actor_type;
  v_actor text := p_actor_identifier;
  v_user uuid := p_user_id;
  v_id bigint;
begin
  if v_uid is not null then
    v_actor_type := 'user';
    v_actor := v_uid::text;
    v_user := v_uid;
  elsif v_user is null and v_actor_type = 'user'
        and v_actor ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
    v_user := v_actor::uuid;
  end if;

  if p_metadata is not null and jsonb_typeof(p_metadata) <> 'object' then
    perform private.raise_error(400, 'invalid_metadata', 'metadata must be a JSON object');
  end if;
  -- the service role names who acted (a user is always their own actor)
  if v_actor_type is null or v_actor is null or p_action is null then
    perform private.raise_error(400, 'invalid_audit_event',
      'actor_type, actor_identifier and action are required');
  end if;

  insert into public.system_audit_logs (
    actor_type, actor_identifier, user_id, action, resource_type, resource_id,
    old_data, new_data, metadata, ip_address, user_agent, correlation_id, request_id,
    status, error_message
  ) values (
    v_actor_type, v_actor, v_user, p_action, p_resource_type, p_resource_id,
    p_old_data, p_new_data, coalesce(p_metadata, '{}'::jsonb), p_ip_address, p_user_agent,
    p_correlation_id, p_request_id, coalesce(p_status, 'success'), p_error_message
  )
  returning id into v_id;
  return v_id;
end;
$$;

revoke all on function public.log_audit_event(
  text, text, text, text, text, jsonb, jsonb, jsonb, inet, text, text, text, text, text, uuid
) from public, anon;
grant execute on function public.log_audit_event(
  text, text, text, text, text, jsonb, jsonb, jsonb, inet, text, text, text, text, text, uuid
) to authenticated, service_role;

-- -----------------------------------------------------------------------------
-- list_audit_events: keyset pagination, newest first. security invoker, so RLS
-- decides what a caller sees (own rows for users, all for service_role).
-- -----------------------------------------------------------------------------
create or replace function public.list_audit_events(
  p_resource_type text default null,
  p_resource_id text default null,
  p_correlation_id text default null,
  p_limit integer default 50,
  p_before_created_at timestamptz default null,
  p_before_id bigint default null
) returns setof public.system_audit_logs
language plpgsql
stable
set search_path = ''
as $$
begin
  perform private.check_limit(p_limit, 1000);
  if (p_before_created_at is null) <> (p_before_id is null) then
    perform private.raise_error(400, 'invalid_cursor', 'cursor needs both created_at and id');
  end if;

  return query
  select a.*
  from public.system_audit_logs a
  where (p_resource_type is null or a.resource_type = p_resource_type)
    and (p_resource_id is null or a.resource_id = p_resource_id)
    and (p_correlation_id is null or a.correlation_id = p_correlation_id)
    and (p_before_created_at is null or (a.created_at, a.id) < (p_before_created_at, p_before_id))
  order by a.created_at desc, a.id desc
  limit p_limit;
end;
$$;

revoke all on function public.list_audit_events(text, text, text, integer, timestamptz, bigint)
  from public, anon;
grant execute on function public.list_audit_events(text, text, text, integer, timestamptz, bigint)
  to authenticated, service_role;
