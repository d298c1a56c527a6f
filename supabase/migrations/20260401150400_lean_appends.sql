-- =============================================================================
-- Leaner event appends: column rules as domains, one statement per event.
--
-- Profiling an append (perf on the backend, pgbench of public.append_event)
-- showed most of its time outside the two writes it must make:
--
--   * Table CHECK constraints are re-read from the catalog and planned again
--     by every INSERT or UPDATE statement (ExecRelCheck: stringToNode and
--     expression_planner per constraint). event_store has eight, and the
--     stream upsert's UPDATE re-checks event_streams' three each time: about
--     60 us per append. A domain's checks are planned once per backend (the
--     type cache), so the same rules as domains cost a few microseconds.
--   * The append ran three statements in two nested security definer
--     functions (public.append_event, private.append_one). It is now one
--     function whose success path is one statement: a data-modifying CTE
--     takes the stream's next version and the insert writes the event with it.
--
-- The rules themselves do not change; they move from the tables to the types
-- of their columns, which also covers any future writer. The version columns
-- stay plain bigint with their one table check each (a few microseconds):
-- clients compare versions as numbers, and a domain there would make calls
-- that take two anyelement arguments (pgTAP's is(version, 2::bigint)) fail.
-- =============================================================================

-- -----------------------------------------------------------------------------
-- Domains: the event store's column rules
-- -----------------------------------------------------------------------------
create domain private.aggregate_type as text
  check (char_length(value) <= 63 and value ~ '^[a-z][a-z0-9_]*$');
create domain private.aggregate_id as text
  check (char_length(value) between 1 and 256);
create domain private.event_type as text
  check (char_length(value) <= 128 and value ~ '^[A-Za-z][A-Za-z0-9_.:-]*$');
create domain private.json_object as jsonb check (jsonb_typeof(value) = 'object');
create domain private.trace_id as text check (char_length(value) <= 128);

-- The user policies read the aggregate columns, so they are dropped while the
-- columns change type and restored unchanged afterwards.
drop policy event_streams_user_select on public.event_streams;
drop policy event_store_user_select on public.event_store;

alter table public.event_streams
  drop constraint event_streams_aggregate_type_check,
  drop constraint event_streams_aggregate_id_check,
  alter column aggregate_type type private.aggregate_type,
  alter column aggregate_id type private.aggregate_id;

alter table public.event_stream_members
  alter column aggregate_type type private.aggregate_type,
  alter column aggregate_id type private.aggregate_id;

alter table public.event_store
  drop constraint event_store_aggregate_type_check,
  drop constraint event_store_aggregate_id_check,
  drop constraint event_store_event_type_check,
  drop constraint event_store_payload_check,
  drop constraint event_store_metadata_check,
  drop constraint event_store_correlation_id_check,
  drop constraint event_store_causation_id_check,
  alter column aggregate_type type private.aggregate_type,
  alter column aggregate_id type private.aggregate_id,
  alter column event_type type private.event_type,
  alter column payload type private.json_object,
  alter column metadata type private.json_object,
  alter column correlation_id type private.trace_id,
  alter column causation_id type private.trace_id;

create policy event_streams_user_select on public.event_streams
  for select to authenticated using (
    (aggregate_type, aggregate_id) in (
      select m.aggregate_type, m.aggregate_id from public.event_stream_members m
      where m.user_id = (select auth.uid())
    )
  );

-- A user reads every event of an aggregate whose events carry their user id.
create policy event_store_user_select on public.event_store
  for select to authenticated using (
    (aggregate_type, aggregate_id) in (
      select m.aggregate_type, m.aggregate_id from public.event_stream_members m
      where m.user_id = (select auth.uid())
    )
  );

-- -----------------------------------------------------------------------------
-- public.append_event: the one append step, also used by append_events
--
-- The upsert of the stream row takes the aggregate's row lock (held to
-- commit) and its next version; the event is inserted with that version in
-- the same statement. The checks after it raise, which undoes both writes, so
-- a refused append leaves nothing behind.
--   * a user appends as themselves (user_id forced), may start an aggregate
--     or write to one that carries their events; another's is "not found",
--     whatever version they expected;
--   * expected_version is the aggregate's version just before this event
--     (-1 or 0: no events yet); a mismatch is 409 version_conflict.
-- -----------------------------------------------------------------------------
create or replace function public.append_event(
  p_aggregate_id text,
  p_aggregate_type text,
  p_event_type text,
  p_payload jsonb,
  p_expected_version bigint default null,
  p_metadata jsonb default '{}'::jsonb,
  p_correlation_id text default null,
  p_causation_id text default null,
  p_user_id uuid default null
) returns public.event_store
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_user uuid := private.caller_user_id();
  v_row public.event_store;
begin
  if jsonb_typeof(p_payload) is distinct from 'object' then
    perform private.raise_error(400, 'invalid_payload', 'payload must be a JSON object');
  end if;
  if p_metadata is not null and jsonb_typeof(p_metadata) not in ('object', 'null') then
    perform private.raise_error(400, 'invalid_metadata', 'metadata must be a JSON object');
  end if;
  if p_expected_version < -1 then
    perform private.raise_error(400, 'invalid_expected_version',
      'expected_version must be an integer of at least -1');
  end if;

  with stream as (
    insert into public.event_streams as s (aggregate_type, aggregate_id, version)
    values (p_aggregate_type, p_aggregate_id, 1)
    on conflict (aggregate_type, aggregate_id) do update
      set version = s.version + 1, updated_at = now()
    returning s.version
  )
  insert into public.event_store (
    aggregate_type, aggregate_id, event_type, version, payload, metadata,
    correlation_id, causation_id, user_id
  )
  select p_aggregate_type, p_aggregate_id, p_event_type, stream.version, p_payload,
         coalesce(nullif(p_metadata, 'null'::jsonb), '{}'::jsonb), p_correlation_id,
         p_causation_id, coalesce(v_user, p_user_id)
  from stream
  returning * into v_row;

  -- Nested so that the service role's appends skip the membership query.
  if v_user is not null and v_row.version > 1 then
    if not exists (
      select from public.event_stream_members m
      where m.aggregate_type = p_aggregate_type and m.aggregate_id = p_aggregate_id
        and m.user_id = v_user
    ) then
      perform private.raise_error(404, 'aggregate_not_found', 'no such aggregate');
    end if;
  end if;
  if p_expected_version is not null and greatest(p_expected_version, 0) <> v_row.version - 1 then
    perform private.raise_error(409, 'version_conflict',
      format('%s/%s is at version %s, not %s', p_aggregate_type, p_aggregate_id,
             v_row.version - 1, p_expected_version),
      jsonb_build_object('aggregate_type', p_aggregate_type, 'aggregate_id', p_aggregate_id,
                         'expected_version', p_expected_version,
                         'current_version', v_row.version - 1));
  end if;

  if v_row.user_id is not null then
    insert into public.event_stream_members (aggregate_type, aggregate_id, user_id)
    values (p_aggregate_type, p_aggregate_id, v_row.user_id)
    on conflict do nothing;
  end if;
  return v_row;
end;
$$;

-- Several events (of one or more aggregates), atomically, in array order.
-- p_events is a JSON array of objects with append_event's parameters without
-- p_. All or nothing: one refused event refuses the batch. The aggregates are
-- locked in key order first, so two batches over the same aggregates cannot
-- deadlock.
create or replace function public.append_events(
  p_events jsonb,
  p_correlation_id text default null
) returns setof public.event_store
language plpgsql
set search_path = ''
as $$
declare
  v_event record;
begin
  if jsonb_typeof(p_events) is distinct from 'array' or jsonb_array_length(p_events) = 0 then
    perform private.raise_error(400, 'invalid_events', 'events must be a non-empty JSON array');
  end if;
  if jsonb_array_length(p_events) > 1000 then
    perform private.raise_error(413, 'too_many_events', 'at most 1000 events per append');
  end if;
  if exists (select from jsonb_array_elements(p_events) e where jsonb_typeof(e) <> 'object') then
    perform private.raise_error(400, 'invalid_events', 'each event must be a JSON object');
  end if;
  perform private.lock_streams(p_events);
  for v_event in
    select e.*
    from jsonb_array_elements(p_events) with ordinality a(elem, ord),
         jsonb_to_record(a.elem) as e(
           aggregate_id text, aggregate_type text, event_type text, payload jsonb,
           expected_version bigint, metadata jsonb, correlation_id text, causation_id text,
           user_id uuid)
    order by a.ord
  loop
    return next public.append_event(v_event.aggregate_id, v_event.aggregate_type,
      v_event.event_type, v_event.payload, v_event.expected_version, v_event.metadata,
      coalesce(v_event.correlation_id, p_correlation_id), v_event.causation_id, v_event.user_id);
  end loop;
end;
$$;

drop function private.append_one(text, text, text, jsonb, bigint, jsonb, text, text, uuid);
