-- =============================================================================
-- Event store, message queue and background jobs: the durable core.
--
--   event_streams         one row per aggregate: its current version (the lock
--                         that keeps versions unique and gapless)
--   event_stream_members  which users' events an aggregate carries (read access)
--   event_store           (partitioned) the events themselves
--   message_queue         named queues with leases, retries and dead letters
--   background_jobs       scheduled jobs run by the `jobs` function's worker
--
-- The queue and the jobs share one lease mechanism (private.install_leases and
-- private.backoff_delay), written once against a column contract; the
-- WhatsApp outbound queue uses its lease expiry and settlement too (see
-- "Leases" below).
-- =============================================================================

-- -----------------------------------------------------------------------------
-- Event store
--
-- Versions. event_streams holds each aggregate's current version. An append
-- moves that row on (which row-locks it until commit), so concurrent appends to
-- one aggregate run one after the other and each takes the next versions:
-- unique and gapless across all partitions of event_store, which on its own
-- could only enforce per-partition uniqueness.
--
-- Global position. A sequence would hand out numbers in start order, not in
-- commit order: a reader following `position > last` would step over an event
-- whose transaction commits after a later-numbered one. Taking the number from
-- a counter row locked until commit would fix that but serialise every append
-- in the system behind one row (measured here: under half the insert rate at 4
-- clients). Instead events are written without a position, and
-- public.sequence_events() numbers them afterwards, one sequencer at a time:
-- the committed events its snapshot sees, so an event committed later gets a
-- larger number and none is ever numbered behind a reader. Within a run they
-- go in id order, and an append takes its id after it holds its aggregate's
-- stream row. So an aggregate's next version, written once the transaction
-- that wrote the previous one has ended (or by that same transaction), has the
-- larger id and becomes visible no sooner: it is numbered after the previous
-- version, in the same run or a later one. Each aggregate's events come in
-- version order and each transaction's in append order; a transaction still
-- open delays only its own events. The stream reader sequences before it
-- reads, and pg_cron runs it every minute.
-- -----------------------------------------------------------------------------

-- Column rules. A table's CHECK constraints are read from the catalogue and
-- planned again by every INSERT or UPDATE statement (ExecRelCheck); with eight
-- on event_store and three re-checked by every stream upsert that cost about
-- 60 us per append. A domain's checks are planned once per connection. The
-- version columns are domains too (the last two checks cost 17,000
-- instructions of 559,000 per append): a caller comparing a version through a
-- function with two anyelement arguments, such as pgTAP's is(), casts it to
-- bigint first.
create domain private.aggregate_type as text
  check (char_length(value) <= 63 and value ~ '^[a-z][a-z0-9_]*$');
-- "." and ".." are refused: URLs drop them as dot segments, so GET
-- /events/aggregates/:type/:id could never address such an aggregate.
create domain private.aggregate_id as text
  check (char_length(value) between 1 and 256 and value not in ('.', '..'));
-- an event's or a message's type: letters first, then letters, digits, _ . : -
create domain private.type_name as text
  check (char_length(value) <= 128 and value ~ '^[A-Za-z][A-Za-z0-9_.:-]*$');
create domain private.json_object as jsonb check (jsonb_typeof(value) = 'object');
-- an aggregate's version (0: no events yet) and an event's
create domain private.stream_version as bigint check (value >= 0);
create domain private.event_version as bigint check (value >= 1);
create domain private.trace_id as text check (char_length(value) <= 128);
-- shared by the message queue and the jobs
create domain private.idempotency_key as text check (char_length(value) between 1 and 256);
create domain private.worker_id as text check (char_length(value) <= 128);
create domain private.error_text as text check (char_length(value) <= 4000);
-- the lease tables' numbers: an UPDATE checks only the domain columns it
-- assigns, so a claim checks attempts and a settlement nothing
create domain private.priority as integer check (value between 0 and 1000);
create domain private.attempt_count as integer check (value >= 0);

create table public.event_streams (
  aggregate_type private.aggregate_type not null,
  aggregate_id private.aggregate_id not null,
  version private.stream_version not null default 0,
  -- the user who started the aggregate through the user API; null when the
  -- service role started it (see "Ownership" at append_event)
  owner_id uuid,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  primary key (aggregate_type, aggregate_id)
);

create table public.event_stream_members (
  aggregate_type private.aggregate_type not null,
  aggregate_id private.aggregate_id not null,
  user_id uuid not null,
  created_at timestamptz not null default now(),
  primary key (aggregate_type, aggregate_id, user_id),
  foreign key (aggregate_type, aggregate_id)
    references public.event_streams (aggregate_type, aggregate_id) on delete cascade
);
create index event_stream_members_user_idx on public.event_stream_members (user_id);

create table public.event_store (
  id bigserial not null,
  position bigint,
  -- the writing transaction: a sequencer leaves its own caller's events to
  -- a run after that caller commits (see "Global position")
  tx_id xid8 not null default pg_current_xact_id(),
  aggregate_type private.aggregate_type not null,
  aggregate_id private.aggregate_id not null,
  event_type private.type_name not null,
  version private.event_version not null,
  payload private.json_object not null,
  metadata private.json_object not null default '{}'::jsonb,
  correlation_id private.trace_id,
  causation_id private.trace_id,
  user_id uuid,
  created_at timestamptz not null default now(),
  primary key (id, created_at)
) partition by range (created_at);

-- Version order reads (uniqueness itself comes from event_streams).
create index event_store_aggregate_version_idx
  on public.event_store (aggregate_type, aggregate_id, version);
create index event_store_position_idx
  on public.event_store (position) where position is not null;
-- A projection of one aggregate type or one event type reads the stream
-- through these; by position alone, a rare type is found only by walking
-- every event before it. An append only opens them (about 1 us each): an
-- event has no position until it is sequenced, and sequencing pays for them
-- (27 us an event instead of 21).
create index event_store_aggregate_type_position_idx
  on public.event_store (aggregate_type, position) where position is not null;
create index event_store_event_type_position_idx
  on public.event_store (event_type, position) where position is not null;
create index event_store_unsequenced_idx
  on public.event_store (id) where position is null;
create index event_store_correlation_idx
  on public.event_store (correlation_id) where correlation_id is not null;
create index event_store_user_idx on public.event_store (user_id) where user_id is not null;

select private.register_partitioned_table('public', 'event_store', 3, null);

-- The last position handed out; its row lock serialises sequencers.
create table private.event_stream_head (
  id boolean primary key default true check (id),
  position bigint not null default 0
);
insert into private.event_stream_head default values;
alter table private.event_stream_head enable row level security;

alter table public.event_streams enable row level security;
alter table public.event_stream_members enable row level security;
alter table public.event_store enable row level security;

-- Read-only for every API role, the service role included: append_event and
-- sequence_events are the only writers, so no caller can write a version out
-- of turn, skip the membership, or set a position.
revoke all on public.event_streams, public.event_stream_members, public.event_store
  from anon, authenticated, service_role;
revoke all on sequence public.event_store_id_seq from anon, authenticated, service_role;
grant select on public.event_streams, public.event_stream_members, public.event_store
  to authenticated, service_role;

create policy event_stream_members_user_select on public.event_stream_members
  for select to authenticated using (user_id = (select auth.uid()));
create policy event_stream_members_service_select on public.event_stream_members
  for select to service_role using (true);

create policy event_streams_user_select on public.event_streams
  for select to authenticated using (
    (aggregate_type, aggregate_id) in (
      select m.aggregate_type, m.aggregate_id from public.event_stream_members m
      where m.user_id = (select auth.uid())
    )
  );
create policy event_streams_service_select on public.event_streams
  for select to service_role using (true);

-- A user reads every event of an aggregate whose events carry their user id.
create policy event_store_user_select on public.event_store
  for select to authenticated using (
    (aggregate_type, aggregate_id) in (
      select m.aggregate_type, m.aggregate_id from public.event_stream_members m
      where m.user_id = (select auth.uid())
    )
  );
create policy event_store_service_select on public.event_store
  for select to service_role using (true);

-- -----------------------------------------------------------------------------
-- public.append_event: the one append step, also used by append_events
--
-- On success it is one statement: a data-modifying CTE moves the stream row
-- to its next version, which takes the aggregate's row lock (held to commit),
-- and the insert writes the event with that version, unless the expected
-- version does not match. With an expected version above 0 the stream exists
-- and the CTE is an UPDATE conditioned on that version; otherwise, and when
-- that UPDATE matches nothing, it is an upsert, which may have to create the
-- stream. (The upsert first locks the row it
-- finds and logs that lock: about 120 bytes of WAL and 5,000 instructions per
-- append more than the UPDATE. Three statements in two nested functions cost
-- a third of the append's time; the UPDATE and then a separate insert cost
-- 6,000 instructions more than the CTE.) The checks that follow raise, which
-- undoes the stream's change, so a refused append leaves nothing behind:
--   * a user appends as themselves (another user_id is 403), may start an
--     aggregate or write to one that carries their events; another's is "not
--     found", whatever version they expected;
--   * Ownership. An aggregate a user starts is theirs alone: the service role
--     may add only that user's events to it (409 aggregate_owned otherwise).
--     Without this, a user who guessed an id the backend would use later
--     (the spec's 'trip-123') could start it first and then read, as a
--     member, every event the backend wrote there for someone else.
--     Aggregates shared by several users are started by the service role
--     (owner_id null); each user whose events it carries may read it;
--   * expected_version is the aggregate's version just before this event
--     (-1 or 0: no events yet); a mismatch is 409 version_conflict and writes
--     no event.
-- The happy path evaluates as few expressions as it can: each plpgsql
-- expression is set up again in every transaction, and each function in a
-- statement (a domain's checks included) in every execution, at about 2,000
-- instructions apiece. So the event takes its aggregate type and id from the
-- stream row, already of their domains and checked there, not from the
-- parameters, which would be checked again.
-- Every statement here finds its rows by key, so none may be planned as a
-- table scan (enable_seqscan off): while event_streams is a page or two, the
-- planner would rather read all of it, and each append would then read every
-- dead version the stream updates leave on those pages until they are pruned.
-- -----------------------------------------------------------------------------

-- 404 unless a user appending to an aggregate that already has events
-- (p_current_version > 0) is one of its members; nothing for the service role.
create or replace function private.require_stream_member(
  p_aggregate_type text,
  p_aggregate_id text,
  p_user_id uuid,
  p_current_version bigint
) returns void
language plpgsql
set search_path = ''
as $$
begin
  if p_user_id is not null and p_current_version > 0 and not exists (
    select from public.event_stream_members m
    where m.aggregate_type = p_aggregate_type and m.aggregate_id = p_aggregate_id
      and m.user_id = p_user_id
  ) then
    perform private.raise_error(404, 'aggregate_not_found', 'no such aggregate');
  end if;
end;
$$;

-- Why append_event refused an input it tested as one condition; always raises.
create or replace function private.refuse_append_input(
  p_payload jsonb,
  p_metadata jsonb,
  p_user_id uuid,
  p_caller uuid
) returns void
language plpgsql
set search_path = ''
as $$
begin
  if p_caller <> p_user_id then
    perform private.raise_error(403, 'forbidden',
      'users append only as themselves: user_id must be your own id or left out');
  end if;
  if jsonb_typeof(p_payload) is distinct from 'object' then
    perform private.raise_error(400, 'invalid_payload', 'payload must be a JSON object');
  end if;
  if jsonb_typeof(p_metadata) not in ('object', 'null') then
    perform private.raise_error(400, 'invalid_metadata', 'metadata must be a JSON object');
  end if;
  if private.json_too_large(p_payload) or private.json_too_large(p_metadata) then
    perform private.refuse_too_large('payload and metadata');
  end if;
  perform private.raise_error(400, 'invalid_expected_version',
    'expected_version must be an integer of at least -1');
end;
$$;

-- What follows append_event's statement when it wrote nothing or wrote an
-- event carrying a user id (one test on its usual path instead of two).
-- Nothing written: works out why and raises. An event carrying a user: a user
-- appending past the aggregate's first event must be a member already (404
-- otherwise); a user starting it, or the service role writing a user's event,
-- makes that user a member. p_caller: the calling user, null for the service
-- role.
create or replace function private.after_append(
  p_written boolean,
  p_event public.event_store,
  p_aggregate_type text,
  p_aggregate_id text,
  p_expected_version bigint,
  p_user_id uuid,
  p_caller uuid
) returns void
language plpgsql
set search_path = ''
as $$
declare
  v_current bigint;
  v_owner uuid;
begin
  if p_written then
    if p_caller is not null then
      perform private.require_stream_member(p_event.aggregate_type, p_event.aggregate_id,
                                            p_caller, p_event.version - 1);
    end if;
    if p_caller is null or p_event.version = 1 then
      insert into public.event_stream_members (aggregate_type, aggregate_id, user_id)
      values (p_event.aggregate_type, p_event.aggregate_id, p_event.user_id)
      on conflict do nothing;
    end if;
    return;
  end if;

  -- a refusal follows the upsert, which moved the stream one past the version
  -- it is at (undone by the raise)
  select s.version - 1, s.owner_id into v_current, v_owner
  from public.event_streams s
  where s.aggregate_type = p_aggregate_type and s.aggregate_id = p_aggregate_id;
  perform private.require_stream_member(p_aggregate_type, p_aggregate_id, p_caller, v_current);
  if v_owner is distinct from coalesce(p_caller, p_user_id) and v_owner is not null then
    if p_caller is not null then
      perform private.raise_error(404, 'aggregate_not_found', 'no such aggregate');
    end if;
    perform private.raise_error(409, 'aggregate_owned',
      format('%s/%s was started by a user and takes only that user''s events',
             p_aggregate_type, p_aggregate_id),
      jsonb_build_object('aggregate_type', p_aggregate_type, 'aggregate_id', p_aggregate_id));
  end if;
  perform private.raise_error(409, 'version_conflict',
    format('%s/%s is at version %s, not %s', p_aggregate_type, p_aggregate_id,
           v_current, p_expected_version),
    jsonb_build_object('aggregate_type', p_aggregate_type, 'aggregate_id', p_aggregate_id,
                       'expected_version', p_expected_version,
                       'current_version', v_current));
end;
$$;

create or replace function public.append_event(
  p_aggregate_id text,
  p_aggregate_type text,
  p_event_type text,
  p_payload jsonb,
  p_expected_version bigint default null,
  p_metadata jsonb default null,
  p_correlation_id text default null,
  p_causation_id text default null,
  p_user_id uuid default null
) returns public.event_store
language plpgsql
security definer
set search_path = ''
set enable_seqscan = off
as $$
declare
  v_user uuid;
  v_row public.event_store;
begin
  if not private.caller_is_service() then
    v_user := private.caller_user_id();
    if v_user <> p_user_id then
      perform private.refuse_append_input(p_payload, p_metadata, p_user_id, v_user);
    end if;
  end if;
  if jsonb_typeof(p_payload) is distinct from 'object'
     or jsonb_typeof(p_metadata) not in ('object', 'null')
     or p_expected_version < -1
     or private.json_too_large(p_payload) or private.json_too_large(p_metadata) then
    perform private.refuse_append_input(p_payload, p_metadata, p_user_id, v_user);
  end if;

  if p_expected_version > 0 then
    with stream as (
      update public.event_streams as s
         set version = s.version + 1, updated_at = now()
       where s.aggregate_type = p_aggregate_type and s.aggregate_id = p_aggregate_id
         and s.version = p_expected_version
         and (s.owner_id is null or s.owner_id = coalesce(v_user, p_user_id))
      returning s.aggregate_type, s.aggregate_id, s.version
    )
    insert into public.event_store (
      aggregate_type, aggregate_id, event_type, version, payload, metadata,
      correlation_id, causation_id, user_id
    )
    select stream.aggregate_type, stream.aggregate_id, p_event_type, stream.version, p_payload,
           coalesce(nullif(p_metadata, 'null'::jsonb), '{}'::jsonb), p_correlation_id,
           p_causation_id, coalesce(v_user, p_user_id)
    from stream
    returning * into v_row;
  end if;
  -- No expected version above 0, or the UPDATE matched nothing: the upsert.
  -- On the second path it writes nothing either, but it reaches the stream's
  -- latest version as the refusal needs it: waiting for an uncommitted
  -- append, raising 40001 (retryable) where a repeatable read snapshot is
  -- stale, and refusing a null or malformed key as the columns do.
  if v_row.id is null then
    with stream as (
      insert into public.event_streams as s (aggregate_type, aggregate_id, version, owner_id)
      values (p_aggregate_type, p_aggregate_id, 1, v_user)
      on conflict (aggregate_type, aggregate_id) do update
        set version = s.version + 1, updated_at = now()
      returning s.aggregate_type, s.aggregate_id, s.version, s.owner_id
    )
    insert into public.event_store (
      aggregate_type, aggregate_id, event_type, version, payload, metadata,
      correlation_id, causation_id, user_id
    )
    select stream.aggregate_type, stream.aggregate_id, p_event_type, stream.version, p_payload,
           coalesce(nullif(p_metadata, 'null'::jsonb), '{}'::jsonb), p_correlation_id,
           p_causation_id, coalesce(v_user, p_user_id)
    from stream
    -- (compared as version - 1: the largest bigint expected is a conflict, not an overflow)
    where (p_expected_version is null or stream.version - 1 = greatest(p_expected_version, 0))
      and (stream.owner_id is null or stream.owner_id = coalesce(v_user, p_user_id))
    returning * into v_row;
  end if;
  if not found or v_row.user_id is not null then
    perform private.after_append(found, v_row, p_aggregate_type, p_aggregate_id,
                                 p_expected_version, p_user_id, v_user);
  end if;
  return v_row;
end;
$$;

-- Several events (of one or more aggregates), atomically, in array order.
-- p_events is a JSON array of objects with append_event's parameters without
-- p_. All or nothing: one refused event refuses the batch. security definer
-- only so that it may lock the streams; each event is appended as the caller
-- (append_event reads the caller from the request's claims).
create or replace function public.append_events(
  p_events jsonb,
  p_correlation_id text default null
) returns setof public.event_store
language plpgsql
security definer
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
  perform private.check_json_keys(p_events, array['aggregate_id', 'aggregate_type', 'event_type',
    'payload', 'expected_version', 'metadata', 'correlation_id', 'causation_id', 'user_id'],
    'invalid_events');
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

-- Locks a batch's streams in key order, so that two batches over the same
-- aggregates cannot deadlock, creating the missing ones at version 0 (undone
-- if the batch fails; a user's batch owns those it creates). A batch naming
-- one aggregate has no order to keep: append_event's statement takes the same
-- lock. The streams are found by key
-- (index lookups pinned as in send_messages: a hash join here scanned every
-- stream of the store).
create or replace function private.lock_streams(p_events jsonb) returns void
language plpgsql
set search_path = ''
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
as $$
declare
  v_owner uuid;
begin
  if (select count(distinct (e ->> 'aggregate_type', e ->> 'aggregate_id'))
      from jsonb_array_elements(p_events) e) < 2 then
    return;
  end if;
  v_owner := private.caller_user_id(); -- once, not per row
  -- A user's batch naming an aggregate that has events and does not carry
  -- theirs is refused (404) before anything is locked: else it would hold
  -- that aggregate's lock for its whole run (up to 1,000 events, or waiting
  -- on another lock) until the loop reached the aggregate and append_event
  -- refused it, and the aggregate's writers would wait. (A single append
  -- holds the lock only between its write and its checks.)
  if v_owner is not null then
    perform private.require_stream_member(s.aggregate_type, s.aggregate_id, v_owner, s.version)
    from public.event_streams s
    where (s.aggregate_type, s.aggregate_id) in (
      select e ->> 'aggregate_type', e ->> 'aggregate_id' from jsonb_array_elements(p_events) e
    );
  end if;
  insert into public.event_streams (aggregate_type, aggregate_id, version, owner_id)
  select distinct e ->> 'aggregate_type', e ->> 'aggregate_id', 0, v_owner
  from jsonb_array_elements(p_events) e
  order by 1, 2
  on conflict do nothing;
  perform from public.event_streams s
  where (s.aggregate_type, s.aggregate_id) in (
    select e ->> 'aggregate_type', e ->> 'aggregate_id' from jsonb_array_elements(p_events) e
  )
  order by s.aggregate_type, s.aggregate_id
  for update;
end;
$$;

-- A page of events, read from an open cursor in its order while the JSON
-- text of the payloads and metadata before each stays under p_max_bytes (the
-- first always comes; each event's are at most a megabyte); null: no bound.
-- The readers below open the cursor: a plain `return query` of theirs ran its
-- whole limit into a result set before anyone could stop it, so 1,000
-- two-megabyte events were two gigabytes and a statement timeout however few
-- the function's caller kept.
create or replace function private.events_within_bytes(p_events refcursor, p_max_bytes integer)
returns setof public.event_store
language plpgsql
set search_path = ''
as $$
declare
  v_event public.event_store;
  v_bytes bigint := 0;
begin
  if p_max_bytes < 1 then
    perform private.raise_error(400, 'invalid_max_bytes', 'max_bytes must be at least 1');
  end if;
  loop
    fetch p_events into v_event;
    exit when not found;
    return next v_event;
    if p_max_bytes is not null then
      v_bytes := v_bytes + coalesce(octet_length(v_event.payload::text), 0)
        + coalesce(octet_length(v_event.metadata::text), 0);
      exit when v_bytes >= p_max_bytes;
    end if;
  end loop;
  close p_events;
end;
$$;
-- the readers run as their caller
grant execute on function private.events_within_bytes(refcursor, integer)
  to authenticated, service_role;

-- History of one aggregate in version order (never by time), optionally a
-- page of at most p_max_bytes (see private.events_within_bytes). security
-- invoker: RLS decides whether the caller may see it.
create or replace function public.get_aggregate_events(
  p_aggregate_type text,
  p_aggregate_id text,
  p_from_version bigint default 1,
  p_limit integer default 1000,
  p_max_bytes integer default null
) returns setof public.event_store
language plpgsql
stable
set search_path = ''
as $$
declare
  v_events refcursor;
begin
  if p_from_version is null or p_from_version < 1 then
    perform private.raise_error(400, 'invalid_from_version', 'from_version must be at least 1');
  end if;
  perform private.check_limit(p_limit, 10000);
  if p_max_bytes is null then
    -- the common read in one statement, without a cursor's row-by-row fetch
    return query
    select e.* from public.event_store e
    where e.aggregate_type = p_aggregate_type
      and e.aggregate_id = p_aggregate_id
      and e.version >= p_from_version
    order by e.version
    limit p_limit;
    return;
  end if;
  open v_events no scroll for
  select e.* from public.event_store e
  where e.aggregate_type = p_aggregate_type
    and e.aggregate_id = p_aggregate_id
    and e.version >= p_from_version
  order by e.version
  limit p_limit;
  return query select * from private.events_within_bytes(v_events, p_max_bytes);
end;
$$;

-- Numbers final events (see the section comment). Returns how many it numbered;
-- 0 when another sequencer holds the head (its numbers become visible when it
-- commits, and they are all below any number handed out later).
create or replace function public.sequence_events(p_max integer default 10000)
returns integer
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_head bigint;
  v_count integer;
  v_last bigint;
begin
  select h.position into v_head from private.event_stream_head h for update skip locked;
  if not found then
    return 0;
  end if;
  with pending as (
    select e.id, e.created_at, row_number() over (order by e.id) as rn
    from public.event_store e
    where e.position is null
      -- a caller's own events wait for its commit, as everyone else's do
      and e.tx_id <> pg_current_xact_id()
    order by e.id
    limit greatest(p_max, 1)
  ), numbered as (
    update public.event_store e
       set position = v_head + p.rn
      from pending p
     where e.id = p.id and e.created_at = p.created_at
    returning p.rn
  )
  -- the head moves to the highest number handed out, not by the count: were
  -- a row to slip out of the update, the next run must not hand its number
  -- out again
  select count(*), max(n.rn) into v_count, v_last from numbered n;
  if v_count > 0 then
    -- where true: an unqualified update is refused where safeupdate is loaded
    update private.event_stream_head set position = v_head + v_last where true;
  end if;
  return v_count;
end;
$$;

-- All events after a global position, for projections (service role),
-- optionally of one aggregate type and/or one event type. One query per
-- filter, so that each is planned for the index that serves it (a single
-- query with "p_x is null or ..." would be planned for none of them).
-- It sequences what it can first when it is a transaction of its own: the
-- sequencer's row stays locked until the numbering commits (a later commit
-- must not take lower numbers), so a reader in a longer transaction (a
-- projection that applies what it read, then commits) held it for as long,
-- and nothing written meanwhile was numbered for anyone. A statement that is
-- its own transaction started it: statement_timestamp() = now() (also for
-- the claims and the call the routes send as one plain-SQL message). Others,
-- and a read-only transaction (a read replica, or `begin read only`, where
-- the sequencer's writes would fail), read what is numbered so far: by the
-- routes, by cron every minute, or by a `select public.sequence_events()` of
-- the caller's own before its transaction. (A prepared statement's execution
-- starts after its transaction, so it is counted among the others.)
create or replace function public.read_event_stream(
  p_after_position bigint default 0,
  p_limit integer default 100,
  p_aggregate_type text default null,
  p_event_type text default null,
  p_max_bytes integer default null
) returns setof public.event_store
language plpgsql
set search_path = ''
as $$
declare
  v_events refcursor;
begin
  if p_after_position is null or p_after_position < 0 then
    perform private.raise_error(400, 'invalid_after_position', 'after_position must be at least 0');
  end if;
  perform private.check_limit(p_limit, 10000);
  if statement_timestamp() = now() and current_setting('transaction_read_only') = 'off' then
    perform public.sequence_events();
  end if;
  if p_event_type is not null then
    open v_events no scroll for
    select e.* from public.event_store e
    where e.event_type = p_event_type and e.position > p_after_position
      and (p_aggregate_type is null or e.aggregate_type = p_aggregate_type)
    order by e.position
    limit p_limit;
  elsif p_aggregate_type is not null then
    open v_events no scroll for
    select e.* from public.event_store e
    where e.aggregate_type = p_aggregate_type and e.position > p_after_position
    order by e.position
    limit p_limit;
  else
    open v_events no scroll for
    select e.* from public.event_store e
    where e.position > p_after_position
    order by e.position
    limit p_limit;
  end if;
  return query select * from private.events_within_bytes(v_events, p_max_bytes);
end;
$$;

revoke all on function public.append_event(text, text, text, jsonb, bigint, jsonb, text, text, uuid)
  from public, anon;
revoke all on function public.append_events(jsonb, text) from public, anon;
revoke all on function public.get_aggregate_events(text, text, bigint, integer, integer)
  from public, anon;
revoke all on function public.sequence_events(integer) from public, anon, authenticated;
revoke all on function public.read_event_stream(bigint, integer, text, text, integer)
  from public, anon, authenticated;
grant execute on function public.append_event(text, text, text, jsonb, bigint, jsonb, text, text, uuid)
  to authenticated, service_role;
grant execute on function public.append_events(jsonb, text) to authenticated, service_role;
grant execute on function public.get_aggregate_events(text, text, bigint, integer, integer)
  to authenticated, service_role;
grant execute on function public.sequence_events(integer) to service_role;
grant execute on function public.read_event_stream(bigint, integer, text, text, integer)
  to service_role;

select private.schedule_cron('sequence-events', '* * * * *', 'select public.sequence_events()');

-- -----------------------------------------------------------------------------
-- Leases: the one claim / retry / dead-letter mechanism.
--
-- Any work table that follows this column contract gets it:
--   id bigint primary key; status text ('pending' waits, one in-flight status,
--   terminal statuses); priority integer (higher first); visible_at
--   timestamptz (when a pending row may be claimed; while in flight, when its
--   lease ends); attempts / max_attempts integer; lease_token uuid;
--   locked_by text; locked_at / finished_at / updated_at timestamptz;
--   last_error text; optionally timeout_seconds (a per-row lease: the
--   timeout plus 10 s for the holder, who stops the work at the timeout by
--   its own clock, to report before the lease can expire) and result
--   jsonb; and a lane (which rows a consumer asks for: message_queue's
--   queue_name, background_jobs' job types).
--
-- private.install_leases(table, prefix, lane column, lane set, in-flight
-- status, optional filter column) writes three functions for such a table
-- from the one template below, as static SQL (a generic function running
-- dynamic SQL parses and plans every call, which cost more than the work
-- itself). A claim of one lane and a settlement each run one plan: walk the
-- claim index in order, priority by priority from each one's due rows,
-- stopping after p_limit rows, and reach each row by primary key (a filtered
-- claim and a claim of several lanes: see "Filter" and "Lanes"). They pin it
-- with planner settings and use it as a generic plan: left to choose, Postgres planned these statements
-- afresh on every call (a generic plan, costed for a limit of 10% of the
-- table, looked dearer than a custom one), a quarter of a claim's time, and
-- with stale statistics (a queue that just filled up) it liked to fetch every
-- pending row and sort them, or to hash-join a scan of the whole table.
--
--   private.<prefix>_lease_claim    pending rows of a lane -> in flight,
--                                   priority, then oldest visible first,
--                                   `for update skip locked`, attempts + 1,
--                                   fresh lease token
--   private.<prefix>_lease_expire   in-flight rows whose lease ended -> pending
--                                   again (after a backoff when asked), or the
--                                   exhausted status after max_attempts; returns
--                                   their ids, so a caller can follow up on
--                                   exactly those rows
--   private.<prefix>_lease_settle   for the holders of the given tokens only:
--                                   done, or retry after a delay / backoff, or
--                                   exhausted after max_attempts
--
-- and private.backoff_delay is the one backoff formula. message_queue and
-- background_jobs install it below and wrap the three functions; the WhatsApp
-- outbound queue installs it too (20260401140500_whatsapp_leases.sql) and
-- uses the expiry and the settlement, with a claim of its own. Another table
-- adopts it the same way: give it these columns and call install_leases once.
--
-- Lanes. The claim index leads with the lane column, so a claim reads only
-- its lane's rows. A claim names one lane (message_queue: p_lane text), or a
-- set of them (background_jobs: p_lane text[], the job types a worker has
-- handlers for; null: every lane). A set is claimed lane by lane, each an
-- index range in claim order, merged and cut to the limit: filtering one
-- ordered scan of every lane instead read each pending row of the other
-- lanes first (20,000 jobs of a type no worker handles: 11-16 ms a claim).
-- The lanes' candidates are read unlocked and then locked one by one, in
-- claim order, until the claim has its limit (see v_pick): locking each
-- lane's rows as they were read held every lane's first rows until commit,
-- though the claim took only its limit, and a worker claiming beside it
-- found nothing while jobs of other types were due (its slots stopped
-- early). No lane column: one queue.
--
-- Due. Priority by priority, a claim visits each priority with rows in its
-- claim index; with rows due later in that index, a claim behind 20,000 of
-- them over every priority (0-1000) walked all 1,001 (6-7 ms, an empty claim
-- included). A table with a boolean due column keeps only its due rows there
-- (index predicate: status = 'pending' and due) and the rest in two partial
-- indexes where not due: on (lane, visible_at), and on the claim index's
-- columns. The writers that make a row pending and visible at once set due
-- (sends, schedules, retries, and the expiry and settlement below); every
-- other pending row, a row written directly included, starts not due. A
-- claim probes the first delayed index for rows of its lanes whose time has
-- come; when there are some, it picks from them and its due rows together,
-- read unlocked in claim order from the claim index and the second delayed
-- index and locked one by one (as a claim of several lanes does), so it
-- takes exactly what it would were every row marked due and locks nothing
-- else. Such rows are not marked due: marking them, by claims or by pg_cron,
-- held the marked rows locked until the marker committed, and the claims
-- beside it found nothing while they waited. So due is only ever late, never
-- wrong: a row is claimed by its visible_at alone.
--
-- Filter. Given a jsonb filter column (message_queue: payload), the claim of
-- one lane takes an optional p_filter jsonb: rows whose column contains it
-- (@>), in the same order, in a statement of its own; without p_filter the
-- claim runs the same statement and plan as a table without the option.
--
-- These functions do at least what pgmq's do; docs/api/queues.md compares
-- them operation by operation (the one copy of that comparison).
-- -----------------------------------------------------------------------------
create or replace function private.backoff_delay(
  p_attempt integer,
  p_base_seconds double precision,
  p_max_seconds double precision,
  p_jitter double precision default 0.2
) returns interval
language sql
volatile
set search_path = ''
as $$
  select make_interval(secs => least(
    p_max_seconds,
    p_base_seconds * power(2, greatest(p_attempt, 1) - 1)
      * (1 + p_jitter * (2 * random() - 1))
  ));
$$;

-- A claim of one lane, for install_leases: with a due column, its plain
-- statement (p_fast) when none of the lane's rows waits unmarked past its
-- time (a probe of the delayed index by time, as for the lease expiry; in
-- that order, or it may walk the other delayed index), else the pick
-- over its due rows and those (p_pick; see "Due"). Without one, p_fast.
create or replace function private.gated_claim(
  p_table regclass,
  p_lane_column text,
  p_due boolean,
  p_lane text,
  p_fast text,
  p_pick text
) returns text
language sql
immutable
set search_path = ''
as $$
  select case when not p_due then p_fast else format($sql$
      perform from %1$s t
      where t.%2$I = %3$s and t.status = 'pending' and not t.due and t.visible_at <= now()
      order by t.visible_at
      limit 1;
      if not found then
        %4$s
      else%5$s
      end if;$sql$, p_table, p_lane_column, p_lane, p_fast, p_pick) end
$$;

create or replace function private.install_leases(
  p_table regclass,
  p_prefix text,
  p_lane_column text,
  p_lane_set boolean,
  p_in_flight text,
  p_filter_column text default null
) returns void
language plpgsql
set search_path = ''
as $gen$
declare
  v_lease text := 'p_lease';
  v_result text := '';
  v_lane_type text := case when p_lane_set then 'text[]' else 'text' end;
  -- Templates, filled in by format() afterwards:
  --   v_scan   one lane's due rows in claim order: %1$s the lane's condition,
  --            %2$s a further condition (the filter, or the candidates tried),
  --            %3$s the lock clause (v_lock, or none)
  --   v_pick   a claim of several lanes: %1$s their scan (v_candidates), %2$s
  --            the table, %3$s the lanes' CTE, %4$s the id type
  --   v_claim  the claim's statements: %1$s the shared update
  v_scan text;
  v_scan_window text;   -- v_scan reading its lane's window (w.n rows), not p_limit (v_pick's)
  v_scan_unmarked text; -- v_scan_window over the rows due now but not marked due (see "Due")
  v_lock text := 'for update skip locked';
  v_pick text;
  v_candidates text; -- v_scan_window of the lane l, each row tagged with its scan
  v_id_type text := (select format_type(a.atttypid, a.atttypmod) from pg_attribute a
                     where a.attrelid = p_table and a.attname = 'id');
  v_claim text;   -- the claim's statement(s), each ending in the update
  v_lane text;    -- the lane condition of a claim of one lane (or none)
  v_due boolean := exists (select from pg_attribute where attrelid = p_table
                           and attname = 'due' and not attisdropped);
  v_pending text; -- the rows the claim index holds
  v_filter text;  -- a claim's content filter, as a further condition of its scans
  v_lanes text;   -- the lanes with rows of a kind (see below)
  v_set_due text := ''; -- the expiry's and the settlement's due, when kept
begin
  v_pending := case when v_due then 't.status = ''pending'' and t.due'
                    else 't.status = ''pending''' end;
  -- Priority by priority, highest first (a loose index scan), each the range
  -- of its due rows: one ordered scan would walk every not-yet-due row of a
  -- higher priority first (20,000 delayed messages: 124 index pages and 1.6 ms
  -- an empty claim, against 11 and 0.16). With a due column the index holds
  -- no row due later, and each priority visited has rows to take (see "Due").
  -- The nested loop hands rows on in claim order. %2$s is the rows the scan
  -- reads: those in the claim index, or (with a due column) those whose time
  -- came while they waited in the delayed indexes (see "Due").
  v_scan := $sql$
        select c.id, c.priority, c.visible_at from (
          with recursive priorities(p) as (
            (select t.priority from %1$s t where %2$s and %%1$s
             order by t.priority desc limit 1)
            union all
            select (select t.priority from %1$s t
                    where %2$s and %%1$s and t.priority < prev.p
                    order by t.priority desc limit 1)
            from priorities prev where prev.p is not null
          )
          select p from priorities where p is not null
        ) pr
        cross join lateral (
          select t.id, t.priority, t.visible_at from %1$s t
          where %2$s and %%1$s and t.priority = pr.p and t.visible_at <= now()%%2$s
          order by t.visible_at, t.id
          limit %3$s
          %%3$s
        ) c
        limit %3$s$sql$;
  v_scan_unmarked := format(v_scan, p_table, 't.status = ''pending'' and not t.due', 'w.n');
  v_scan_window := format(v_scan, p_table, v_pending, 'w.n');
  v_scan := format(v_scan, p_table, v_pending, 'p_limit');
  -- The lanes with rows matching %3$s, one index probe each (a loose index
  -- scan): %1$s the lane column, %2$s the table.
  v_lanes := $sql$
                with recursive lanes(lane) as (
                  (select t.%1$I from %2$s t where %3$s order by t.%1$I limit 1)
                  union all
                  select (select t.%1$I from %2$s t
                          where %3$s and t.%1$I > l.lane
                          order by t.%1$I limit 1)
                  from lanes l where l.lane is not null
                )
                select l.lane from lanes l where l.lane is not null$sql$;
  if v_due and p_lane_column is null then
    raise exception 'install_leases: a due column needs a lane column';
  end if;
  if p_filter_column is not null and p_lane_set then
    raise exception 'install_leases: a content filter needs a claim of one lane';
  end if;
  v_filter := case when p_filter_column is not null
                   then format(' and (p_filter is null or t.%I @> p_filter)', p_filter_column)
                   else '' end;
  -- Candidates of the lane l (of a CTE lanes(lane)), read unlocked, in claim
  -- order, the lane's window (w.n) of each scan, tagged with the scan (src):
  -- its first due rows (0) and, with a due column, its first rows whose time
  -- came while they waited in the delayed indexes (1, see "Due"), read only
  -- when the first of those says any did.
  if p_lane_column is not null then
    v_candidates := format('select 0 as src, s.* from (%s) s',
                           format(v_scan_window, format('t.%I = l.lane', p_lane_column), v_filter,
                                  ''));
  end if;
  if v_due then
    -- (the probe as the outer side of a lateral join: the scan runs only
    -- for a lane it finds rows of, as a filter on the scan's result did not)
    v_candidates := format($sql$%1$s
              union all
              select 1 as src, f.* from (
                select from %3$s t
                where t.%4$I = l.lane and t.status = 'pending' and not t.due
                  and t.visible_at <= now()
                order by t.visible_at
                limit 1) probe
              cross join lateral (%2$s) f$sql$,
      v_candidates,
      format(v_scan_unmarked, format('t.%I = l.lane', p_lane_column), v_filter, ''),
      p_table, p_lane_column);
  end if;
  -- The candidates are read unlocked, in claim order, and locked one by one
  -- by primary key, passing over those another claim holds (skip locked),
  -- until the claim has p_limit. Each lane's scans read its window of rows,
  -- p_limit at first. A scan read to its end may have more rows that rank
  -- before candidates of other scans: only the candidates up to the first
  -- such end (the horizon) are known to be the first in claim order, and
  -- only they are tried. Short of p_limit with a horizon, the claim reads
  -- again, with four times the window for each lane where a candidate was
  -- held (only those can need more: a lane none of whose candidates up to
  -- the horizon was held gave the claim all of them, at least p_limit). The
  -- rows it locked stay taken. So it takes the first rows no other claim
  -- holds, in claim order (rows released while it reads aside), and locks no
  -- row it does not take. Reading the candidates again after each held one
  -- spun 21 s of CPU behind 3,000 held rows; widening every lane's window
  -- read 3,000 rows of each of 100 other lanes (1.6 s); locking them all in
  -- one statement was at the mercy of the join order the planner chose.
  v_pick := $sql$
        declare
          v_windows jsonb := '{}';  -- lane -> its window, where wider than p_limit
          v_held jsonb;             -- lane -> this pass's candidates another claim held
          v_cand record;
          v_cut boolean;            -- whether the candidates stopped at a horizon
          v_id %4$s;
          v_ids %4$s[] := '{}';     -- locked here, in claim order
        begin
          loop
            v_cut := false;
            v_held := '{}';
            for v_cand in
              with recursive lanes(lane) as (%3$s),
              candidates as materialized (
                select l.lane, c.src, c.id, w.n,
                       pg_catalog.row_number() over (order by c.priority desc, c.visible_at, c.id)
                         as ord
                from lanes l
                cross join lateral (
                  select coalesce((v_windows ->> l.lane)::integer, p_limit) as n) w
                cross join lateral (%1$s) c
              ),
              horizon as materialized (
                select min(s.last) as ord from (
                  select max(c.ord) as last from candidates c
                  group by c.lane, c.src, c.n
                  having pg_catalog.count(*) >= c.n) s
              )
              select c.id, c.lane, h.ord is not null as cut
              from candidates c, horizon h
              where c.ord <= coalesce(h.ord, c.ord)
              order by c.ord
            loop
              v_cut := v_cand.cut;
              continue when v_cand.id = any (v_ids);
              select t.id into v_id from %2$s t
              where t.id = v_cand.id and t.status = 'pending' and t.visible_at <= now()
              for update skip locked;
              if v_id is null then
                v_held := v_held || jsonb_build_object(v_cand.lane,
                  coalesce((v_held ->> v_cand.lane)::integer, 0) + 1);
              else
                v_ids := v_ids || v_id;
                exit when cardinality(v_ids) = p_limit;
              end if;
            end loop;
            exit when cardinality(v_ids) = p_limit or not v_cut or v_held = '{}';
            select v_windows || jsonb_object_agg(h.lane,
                     4 * coalesce((v_windows ->> h.lane)::integer, p_limit))
            into v_windows
            from jsonb_object_keys(v_held) h(lane);
          end loop;
          -- the leases start once the rows are picked, however long that took
          v_taken := pg_catalog.clock_timestamp();
          return query with picked as (select unnest(v_ids) as id) %%1$s;
        end;$sql$;
  if not p_lane_set then
    v_lane := case when p_lane_column is null then 'true'
                   else format('t.%I = p_lane', p_lane_column) end;
    v_claim := format('return query with picked as (%s) %%1$s;', format(v_scan, v_lane, '', v_lock));
    -- A content filter (p_filter_column): a claim given p_filter takes only
    -- rows whose column contains it (@>), read in the same order, non-matching
    -- rows passed over unlocked. A statement of its own, so that a claim
    -- without a filter runs exactly the plan it runs without the option.
    if p_filter_column is not null then
      v_claim := format($sql$
      if p_filter is null then
        %1$s
      else
        return query with picked as (%2$s) %%1$s;
      end if;$sql$, v_claim,
        format(v_scan, v_lane, format(' and t.%I @> p_filter', p_filter_column), v_lock));
    end if;
    v_claim := private.gated_claim(p_table, p_lane_column, v_due, 'p_lane', v_claim,
      format(v_pick, v_candidates, p_table, 'select p_lane', v_id_type));
  else
    -- One lane: its scan alone. Several: v_pick over the lanes given, or
    -- over every lane with pending rows, found one index probe each (a loose
    -- index scan of each pending index).
    v_claim := format($sql$
      if cardinality(p_lane) = 1 then
        %1$s
      elsif p_lane is not null then%2$s
      else%3$s
      end if;$sql$,
      private.gated_claim(p_table, p_lane_column, v_due, 'p_lane[1]',
        format('return query with picked as (%s) %%1$s;',
               format(v_scan, format('t.%I = p_lane[1]', p_lane_column), '', v_lock)),
        format(v_pick, v_candidates, p_table, 'select p_lane[1]', v_id_type)),
      format(v_pick, v_candidates, p_table, 'select distinct u.lane from unnest(p_lane) u(lane)',
             v_id_type),
      format(v_pick, v_candidates, p_table,
             format('select x.lane from (%s) x', format(v_lanes, p_lane_column, p_table, v_pending))
             || case when v_due
                     then format(' union select y.lane from (%s) y', format(v_lanes, p_lane_column,
                                 p_table, 't.status = ''pending'' and not t.due'))
                     else '' end,
             v_id_type));
  end if;
  if v_due then
    -- Pending again and visible at once: due. Backoffs are never zero, a
    -- base of zero aside.
    v_set_due := $sql$,
             due = t.attempts < t.max_attempts and %1$s$sql$;
  end if;
  if exists (select from pg_attribute where attrelid = p_table and attname = 'timeout_seconds'
             and not attisdropped) then
    v_lease := 'coalesce(p_lease, make_interval(secs => t.timeout_seconds + 10))';
  end if;
  if exists (select from pg_attribute where attrelid = p_table and attname = 'result'
             and not attisdropped) then
    v_result := ', result = case when p_outcome = ''done'' then p_result else t.result end';
  end if;

  execute format($tpl$
    create or replace function private.%2$I(
      p_lane %3$s, p_limit integer, p_lease interval, p_worker text%6$s
    ) returns setof %1$s
    language plpgsql
    set search_path = ''
    set plan_cache_mode = force_generic_plan
    set enable_sort = off
    set enable_hashjoin = off
    set enable_mergejoin = off
    %5$s
    as $fn$
    declare
      -- A lease runs from when its rows are taken, not from the transaction's
      -- start (now()): a claim that waited first (for a FIFO group lock, say)
      -- handed out leases already ended, and another consumer could take the
      -- same rows at once.
      v_taken timestamptz;
    begin
      v_taken := pg_catalog.clock_timestamp();
      %4$s
    end;
    $fn$
  $tpl$, p_table, p_prefix || '_lease_claim', v_lane_type,
  -- every form ends in the same update of the picked rows
  format(v_claim, format($sql$
      update %1$s t
         set status = %2$L,
             attempts = t.attempts + 1,
             lease_token = pg_catalog.gen_random_uuid(),
             locked_by = p_worker,
             locked_at = v_taken,
             visible_at = v_taken + %3$s,
             updated_at = now()
        from picked
       where t.id = picked.id
      returning t.*$sql$, p_table, p_in_flight, v_lease)),
  -- A claim is a few index probes, never worth compiling with LLVM; and
  -- merging a set of lanes sorts, which enable_sort = off prices at 1e10,
  -- over jit_above_cost: every such claim compiled itself (0.4 s a claim).
  'set jit = off',
  case when p_filter_column is not null then ', p_filter jsonb default null' else '' end);

  execute format($tpl$
    create or replace function private.%2$I(
      p_exhausted text, p_retry_base_seconds double precision, p_error text
    ) returns bigint[]
    language plpgsql
    set search_path = ''
    as $fn$
    declare
      v_ids bigint[];
    begin
      -- Claims sweep first, and nearly always find nothing: an index probe
      -- is a third of the locking update's cost. In index order, so the scan
      -- stops at the first expired lease and marks the dead entries it passes
      -- (a bitmap scan would read them all again on every claim).
      perform from %1$s t where t.status = %3$L and t.visible_at <= now()
      order by t.visible_at
      limit 1;
      if not found then
        return '{}';
      end if;
      with expired as (
        select t.id from %1$s t
        where t.status = %3$L and t.visible_at <= now()
        order by t.visible_at
        limit 1000
        for update skip locked
      ), done as (
        update %1$s t
           set status = case when t.attempts >= t.max_attempts then p_exhausted else 'pending' end,
               visible_at = case
                 when t.attempts >= t.max_attempts then t.visible_at
                 when p_retry_base_seconds > 0
                   then now() + private.backoff_delay(t.attempts, p_retry_base_seconds, 3600)
                 else now() end,
               finished_at = case when t.attempts >= t.max_attempts then now() end,
               last_error = p_error,
               lease_token = null,
               locked_by = null,
               updated_at = now()%4$s
          from expired
         where t.id = expired.id
        returning t.id
      )
      select coalesce(array_agg(done.id), '{}') into v_ids from done;
      return v_ids;
    end;
    $fn$
  $tpl$, p_table, p_prefix || '_lease_expire', p_in_flight,
  format(v_set_due, 'not coalesce(p_retry_base_seconds > 0, false)'));

  execute format($tpl$
    create or replace function private.%2$I(
      p_ids bigint[], p_lease_tokens uuid[], p_outcome text, p_done text, p_exhausted text,
      p_retry_base_seconds double precision, p_delay interval, p_error text, p_result jsonb
    ) returns setof %1$s
    language plpgsql
    set search_path = ''
    set plan_cache_mode = force_generic_plan
    set enable_hashjoin = off
    set enable_mergejoin = off
    as $fn$
    begin
      if p_outcome not in ('done', 'retry') then
        raise exception 'lease settle: unknown outcome %%', p_outcome;
      end if;
      return query
      update %1$s t
         set status = case when p_outcome = 'done' then p_done
                           when t.attempts >= t.max_attempts then p_exhausted
                           else 'pending' end,
             visible_at = case
               when p_outcome = 'done' or t.attempts >= t.max_attempts then t.visible_at
               else now() + coalesce(p_delay,
                 private.backoff_delay(t.attempts, p_retry_base_seconds, 3600)) end,
             finished_at = case when p_outcome = 'done' or t.attempts >= t.max_attempts
                                then now() end,
             -- a completion keeps the last failed attempt's error unless it
             -- gives one (a job's result not kept, a WhatsApp send refused)
             last_error = case when p_outcome = 'done' then coalesce(p_error, t.last_error)
                               else p_error end,
             lease_token = null,
             locked_by = null,
             updated_at = now()%4$s%5$s
        from unnest(p_ids, p_lease_tokens) as l(id, token)
       where t.id = l.id and t.lease_token = l.token and t.status = %3$L
      returning t.*;
    end;
    $fn$
  $tpl$, p_table, p_prefix || '_lease_settle', p_in_flight, v_result,
  format(v_set_due, $sql$p_outcome = 'retry'
               and coalesce(p_delay <= interval '0', not coalesce(p_retry_base_seconds > 0, false))$sql$));
end;
$gen$;

-- -----------------------------------------------------------------------------
-- message_queue
-- -----------------------------------------------------------------------------
-- Column rules as domains, as for the event store: every claim, ack and nack
-- is an UPDATE, which would otherwise read and plan a table check again.
-- The queue name rule, for the column and for the 400 check_queue_name gives;
-- plain SQL, so both inline it.
create or replace function private.is_queue_name(p_name text) returns boolean
language sql
immutable
as $$
  select char_length(p_name) <= 63 and p_name ~ '^[a-z][a-z0-9_-]*$'
$$;
create domain private.queue_name as text check (private.is_queue_name(value));
-- blocked: waiting behind an earlier message of its group (see "FIFO groups")
create domain private.queue_status as text
  check (value in ('pending', 'processing', 'completed', 'dead', 'blocked'));
-- a sender's key of up to 128 characters, after a user's id and a colon
create domain private.group_key as text check (char_length(value) between 1 and 165);
create domain private.message_max_attempts as integer check (value between 1 and 100);
-- Every message is in one of these states. Saying so in a query lets the
-- planner read one queue's messages through the partial indexes below (claim,
-- lease, finished, blocked); there is no index on queue_name alone, so without
-- it a queue's metrics or purge scanned every queue's messages. Plain SQL,
-- inlined.
create or replace function private.message_in_any_status(p_status text) returns boolean
language sql
immutable
as $$
  select p_status = 'pending' or p_status = 'processing' or p_status = 'completed'
    or p_status = 'dead' or p_status = 'blocked'
$$;
-- The same, for a message row: its pending messages are in two partial
-- indexes (claim: due, delayed: not yet), and the planner matches an index to
-- each arm of the OR only when the arm says which.
create or replace function private.message_in_any_state(p_status text, p_due boolean)
returns boolean
language sql
immutable
as $$
  select (p_status = 'pending' and p_due) or (p_status = 'pending' and not p_due)
    or p_status = 'processing' or p_status = 'completed' or p_status = 'dead'
    or p_status = 'blocked'
$$;

create table public.message_queue (
  id bigserial primary key,
  queue_name private.queue_name not null,
  message_type private.type_name not null default 'message',
  payload private.json_object not null,
  priority private.priority not null default 0,
  status private.queue_status not null default 'pending',
  visible_at timestamptz not null default now(),
  attempts private.attempt_count not null default 0,
  max_attempts private.message_max_attempts not null default 5,
  idempotency_key private.idempotency_key,
  lease_token uuid,
  locked_by private.worker_id,
  locked_at timestamptz,
  last_error private.error_text,
  correlation_id private.trace_id,
  user_id uuid,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  finished_at timestamptz,
  group_key private.group_key,
  -- free-form metadata beside the payload (pgmq's headers)
  headers private.json_object,
  -- pending and due: in the claim index ("Due" at install_leases)
  due boolean not null default false
);

-- The key before the sender: lookups match the sender with IS NOT DISTINCT
-- FROM (the service role sends as null), which an index cannot search by, so
-- with the sender before the key a keyed send read every keyed message of its
-- queue (400 ms a send at 200,000 of them).
create unique index message_queue_idempotency_idx
  on public.message_queue (queue_name, idempotency_key, user_id) nulls not distinct
  where idempotency_key is not null;
-- claim order: priority, then when the message became visible, then id; due
-- messages only. Those due later (delayed, or waiting out a backoff) are in
-- the delayed indexes until claimed ("Due" at install_leases): by time, for
-- the probe whether any has fallen due, and in claim order, for ranking those
-- that have beside the due ones.
create index message_queue_claim_idx
  on public.message_queue (queue_name, priority desc, visible_at, id)
  where status = 'pending' and due;
create index message_queue_delayed_idx
  on public.message_queue (queue_name, visible_at) where status = 'pending' and not due;
create index message_queue_delayed_claim_idx
  on public.message_queue (queue_name, priority desc, visible_at, id)
  where status = 'pending' and not due;
create index message_queue_lease_idx
  on public.message_queue (visible_at) where status = 'processing';
-- Finished messages by queue (metrics, purge). Deliberately no index on
-- (queue_name, status) covering pending rows: the planner could prefer it to
-- the claim index and sort the whole queue on every claim.
create index message_queue_finished_idx
  on public.message_queue (queue_name, status) where status in ('completed', 'dead');
create index message_queue_user_idx on public.message_queue (user_id) where user_id is not null;
-- FIFO groups: a group's head (its one pending or in-flight message), and its
-- blocked messages in send order. Messages without a group are in neither.
create index message_queue_group_head_idx
  on public.message_queue (queue_name, group_key)
  where group_key is not null and status in ('pending', 'processing');
create index message_queue_blocked_idx
  on public.message_queue (queue_name, group_key, id) where status = 'blocked';

alter table public.message_queue enable row level security;
-- Read-only for the API roles, the service role included: its functions
-- (sends, claims and settlements) are the only writers, so leases and attempts cannot be
-- skipped.
revoke all on public.message_queue from anon, authenticated, service_role;
revoke all on sequence public.message_queue_id_seq from anon, authenticated, service_role;
grant select on public.message_queue to authenticated, service_role;

create policy message_queue_user_select on public.message_queue
  for select to authenticated using (user_id = (select auth.uid()));
create policy message_queue_service_select on public.message_queue
  for select to service_role using (true);

select private.install_leases('public.message_queue', 'message_queue', 'queue_name', false,
  'processing', 'payload');

-- The queues users may send to, and at what priority at most. A message
-- reaches a consumer that acts on it, so a queue is closed to users until an
-- operator lists it here (a migration, or the SQL editor); the service role
-- sends anywhere.
create table private.user_queues (
  queue_name private.queue_name primary key,
  max_priority private.priority not null default 0
);
alter table private.user_queues enable row level security;

create or replace function private.check_queue_name(p_queue_name text) returns void
language plpgsql
immutable
set search_path = ''
as $$
begin
  if not coalesce(private.is_queue_name(p_queue_name), false) then
    perform private.raise_error(400, 'invalid_queue_name',
      'queue names are 1-63 characters: a-z first, then a-z, 0-9, _ or -');
  end if;
end;
$$;

-- -----------------------------------------------------------------------------
-- FIFO groups (pgmq's x-pgmq-group, SQS's message group id)
--
-- Messages sent to a queue with the same group_key are delivered one at a
-- time, in send order: a group has at most one head, pending or in flight,
-- and its other messages wait as blocked, outside the claim index, so however
-- long a group grows no claim walks it. A nacked head holds its group through
-- the backoff; once the head is finished (acked, dead-lettered, archived,
-- deleted or purged) the group's next blocked message becomes pending.
--
-- Whatever adds a blocked message or finishes a head then calls
-- promote_message_groups. It takes its groups' advisory locks (in key order,
-- so two callers never deadlock) and only then looks, in a statement of its
-- own: of a send and a settlement racing in one group, the one that takes the
-- lock second sees what the first committed, so no group is left without a
-- head. Concurrent sends to one group are ordered by who takes the lock first.
-- A lock covers one of 64 buckets of a queue's groups, not one group
-- (private.lock_key_buckets): a send of 1,000 groups, or a purge of 100,000,
-- taking one each ran the cluster's lock table out. The look needs READ
-- COMMITTED (a statement snapshot taken after the
-- lock), so other isolation levels are refused.
-- A settlement locks its rows before the group, and the promotion then locks
-- the next blocked row. An operator's archive or delete of that very blocked
-- message, racing the promotion, locks them the other way round: Postgres
-- breaks the deadlock by aborting one whole transaction, and rpc retries it.
-- -----------------------------------------------------------------------------
create or replace function private.promote_message_groups(p_queue_name text, p_groups text[])
returns void
language plpgsql
set search_path = ''
set enable_hashjoin = off
set enable_mergejoin = off
as $$
declare
  v_keys text[] := array(
    select distinct u.key from unnest(p_groups) u(key) where u.key is not null order by 1);
begin
  if cardinality(v_keys) = 0 then
    return;
  end if;
  -- Under REPEATABLE READ or SERIALIZABLE the look below would use the
  -- transaction's snapshot and miss what the lock holder before it committed.
  if current_setting('transaction_isolation') <> 'read committed' then
    perform private.raise_error(400, 'read_committed_required',
      'messages with a group_key are sent and settled in READ COMMITTED transactions');
  end if;
  perform private.lock_key_buckets('message_queue/' || p_queue_name, v_keys);

  -- Only groups without a head pick a message (materialized, so that the
  -- pick below runs for them alone: a send to a group with a head locks
  -- nothing). The next blocked message is locked as it is picked: one an
  -- operator archives or deletes meanwhile is passed over for the one after.
  with headless as materialized (
    select g.key from unnest(v_keys) g(key)
    where not exists (
      select from public.message_queue h
      where h.queue_name = p_queue_name and h.group_key = g.key
        and h.status in ('pending', 'processing'))
  )
  update public.message_queue t
     set status = 'pending',
         due = t.visible_at <= now(),
         updated_at = now()
    from headless g
   cross join lateral (
     select b.id from public.message_queue b
     where b.queue_name = p_queue_name and b.group_key = g.key and b.status = 'blocked'
     order by b.id
     limit 1
     for update
   ) next
   where t.id = next.id;
end;
$$;

-- Leases past their end, in every queue: retried, or dead-lettered after
-- their last attempt, and then the groups of the heads dead-lettered promoted
-- (those that went back to pending still hold their groups), queue by queue
-- in name order.
create or replace function private.expire_message_leases()
returns void
language plpgsql
set search_path = ''
as $$
declare
  v_expired bigint[] := private.message_queue_lease_expire('dead', 0, 'lease expired before ack');
  v_queue record;
begin
  if cardinality(v_expired) = 0 then
    return;
  end if;
  for v_queue in
    select q.queue_name::text as queue_name, array_agg(q.group_key::text) as groups
    from public.message_queue q
    where q.id = any(v_expired) and q.status = 'dead' and q.group_key is not null
    group by q.queue_name
    order by q.queue_name
  loop
    perform private.promote_message_groups(v_queue.queue_name, v_queue.groups);
  end loop;
end;
$$;

-- A message's FIFO group as stored. A user's group keys are their own, as
-- their idempotency keys are: '<user id>:<key>', so that nobody can slip
-- messages into another sender's group and hold it up. The service role's
-- keys are stored as given.
create or replace function private.sender_group_key(p_user uuid, p_key text) returns text
language sql
immutable
as $$
  select case when p_user is null or p_key is null then p_key else p_user::text || ':' || p_key end
$$;

-- Sends one or more messages. p_messages is a JSON array of objects with
-- payload, message_type, priority, delay_seconds, max_attempts,
-- idempotency_key, correlation_id, group_key and headers. A message whose
-- idempotency key the sender already used in this queue is not sent again: the
-- existing message comes back, also when two sends race (the unique index
-- makes the later one wait for the first and skip its row; the read that
-- follows is a new statement and sees it). The same key for a different
-- message is a 409. Keys are scoped to the sender (a user, or the service
-- role).
-- Its lookups join the input (which the planner takes for 100 rows) with the
-- queue table; left to choose, with statistics that lag a filling queue, it
-- hashed a scan of the whole table on every send (15 ms at 50,000 messages).
-- Joins are pinned to index lookups per message, as for the lease functions.
create or replace function public.send_messages(
  p_queue_name text,
  p_messages jsonb,
  p_correlation_id text default null
) returns setof public.message_queue
language plpgsql
security definer
set search_path = ''
set enable_seqscan = off
set enable_hashjoin = off
set enable_mergejoin = off
as $$
declare
  v_user uuid := private.caller_user_id();
  v_ids bigint[];
  v_shape record;
  v_keys text[] := array['payload', 'message_type', 'priority', 'delay_seconds', 'max_attempts',
    'idempotency_key', 'correlation_id', 'group_key', 'headers'];
  v_max_priority integer;
  v_returned bigint;
begin
  perform private.check_queue_name(p_queue_name);
  if jsonb_typeof(p_messages) is distinct from 'array' or jsonb_array_length(p_messages) = 0 then
    perform private.raise_error(400, 'invalid_messages', 'messages must be a non-empty JSON array');
  end if;
  if jsonb_array_length(p_messages) > 1000 then
    perform private.raise_error(413, 'too_many_messages', 'at most 1000 messages per send');
  end if;
  -- numbers first, once for the batch: each value's text is measured below
  if private.json_too_large_unprinted(p_messages) then
    perform private.refuse_too_large('payload and headers');
  end if;
  select bool_or(jsonb_typeof(m) <> 'object' or jsonb_typeof(m -> 'payload') is distinct from 'object')
           as bad_payload,
         bool_or(not private.json_integer_within(m -> 'priority', 0, 1000)) as bad_priority,
         bool_or(not private.json_integer_within(m -> 'delay_seconds', 0, 31536000)) as bad_delay,
         bool_or(not private.json_integer_within(m -> 'max_attempts', 1, 100)) as bad_attempts,
         -- text, not an object or a number read as its JSON; their formats are
         -- their columns' domains' (type_name, idempotency_key, trace_id)
         bool_or(jsonb_typeof(m -> 'message_type') not in ('string', 'null')
                 or jsonb_typeof(m -> 'idempotency_key') not in ('string', 'null')
                 or jsonb_typeof(m -> 'correlation_id') not in ('string', 'null')) as bad_text,
         bool_or(jsonb_typeof(m -> 'headers') not in ('object', 'null')) as bad_headers,
         bool_or(jsonb_typeof(m -> 'group_key') not in ('string', 'null')
                 or char_length(m ->> 'group_key') not between 1 and 128) as bad_group,
         bool_or(m ->> 'group_key' is not null) as has_group,
         bool_or(private.json_text_too_large(m -> 'payload')
                 or private.json_text_too_large(m -> 'headers')) as too_large,
         bool_or(case when jsonb_typeof(m) = 'object' then m - v_keys <> '{}'::jsonb end)
           as unknown_key,
         -- read only once every priority is known to be whole and in range
         coalesce(max(case when jsonb_typeof(m -> 'priority') = 'number'
                           then (m -> 'priority')::numeric end), 0) as top_priority
  into v_shape
  from jsonb_array_elements(p_messages) m;
  if v_shape.bad_payload then
    perform private.raise_error(400, 'invalid_payload', 'each message needs a JSON object payload');
  elsif v_shape.bad_priority then
    perform private.raise_error(400, 'invalid_priority', 'priority must be between 0 and 1000');
  elsif v_shape.bad_delay then
    perform private.raise_error(400, 'invalid_delay', 'delay_seconds must be between 0 and 31536000');
  elsif v_shape.bad_attempts then
    perform private.raise_error(400, 'invalid_max_attempts', 'max_attempts must be between 1 and 100');
  elsif v_shape.bad_text then
    perform private.raise_error(400, 'invalid_messages',
      'message_type, idempotency_key and correlation_id must be strings');
  elsif v_shape.bad_headers then
    perform private.raise_error(400, 'invalid_headers', 'headers must be a JSON object');
  elsif v_shape.bad_group then
    perform private.raise_error(400, 'invalid_group_key',
      'group_key must be a string of 1 to 128 characters');
  elsif v_shape.too_large then
    perform private.refuse_too_large('payload and headers');
  end if;
  if v_shape.unknown_key then
    perform private.check_json_keys(p_messages, v_keys, 'invalid_messages');
  end if;
  if v_user is not null then
    select u.max_priority into v_max_priority from private.user_queues u
    where u.queue_name = p_queue_name;
    if not found then
      perform private.raise_error(403, 'queue_not_open',
        format('users may not send to queue %s', p_queue_name));
    elsif v_shape.top_priority > v_max_priority then
      perform private.raise_error(403, 'priority_not_allowed',
        format('users may send to queue %s at priority %s at most', p_queue_name, v_max_priority));
    end if;
  end if;

  -- Ids are drawn first so that messages without a key can be found again.
  select array_agg(nextval('public.message_queue_id_seq'::regclass))
  into v_ids
  from jsonb_array_elements(p_messages);

  -- a message of a group starts blocked; the group's first becomes pending below
  insert into public.message_queue (
    id, queue_name, message_type, payload, priority, visible_at, due, max_attempts,
    idempotency_key, correlation_id, user_id, group_key, headers, status
  )
  select v_ids[a.ord], p_queue_name, coalesce(m.message_type, 'message'), m.payload,
         coalesce(m.priority, 0)::integer,
         now() + make_interval(secs => coalesce(m.delay_seconds, 0)::integer),
         coalesce(m.delay_seconds, 0) <= 0,
         coalesce(m.max_attempts, 5)::integer, m.idempotency_key,
         coalesce(m.correlation_id, p_correlation_id), v_user,
         private.sender_group_key(v_user, m.group_key),
         nullif(m.headers, 'null'::jsonb),
         case when m.group_key is null then 'pending' else 'blocked' end
  from jsonb_array_elements(p_messages) with ordinality a(elem, ord),
       jsonb_to_record(a.elem) as m(
         payload jsonb, message_type text, priority numeric, delay_seconds numeric,
         max_attempts numeric, idempotency_key text, correlation_id text, group_key text,
         headers jsonb)
  order by a.ord
  on conflict (queue_name, user_id, idempotency_key) where idempotency_key is not null
  do nothing;
  if v_shape.has_group then
    perform private.promote_message_groups(p_queue_name,
      array(select private.sender_group_key(v_user, m ->> 'group_key')
            from jsonb_array_elements(p_messages) m));
  end if;

  -- per message, the one it replays (a lateral with a limit is never turned
  -- around: planned as a join, the queue's keyed messages went on the outside)
  if exists (
    select
    from jsonb_array_elements(p_messages) m,
         lateral (
           select q.payload, q.message_type, q.group_key, q.headers from public.message_queue q
           where q.queue_name = p_queue_name and q.idempotency_key = m ->> 'idempotency_key'
             and q.user_id is not distinct from v_user
           limit 1
         ) q
    where q.payload <> m -> 'payload'
       or q.message_type <> coalesce(m ->> 'message_type', 'message')
       or q.group_key is distinct from private.sender_group_key(v_user, m ->> 'group_key')
       or q.headers is distinct from nullif(m -> 'headers', 'null'::jsonb)
  ) then
    perform private.raise_error(409, 'idempotency_key_conflict',
      'this idempotency key was used for a different message');
  end if;

  return query
  select q.*
  from jsonb_array_elements(p_messages) with ordinality a(elem, ord)
  join public.message_queue q
    on q.id = coalesce(
      (select k.id from public.message_queue k
       where k.queue_name = p_queue_name and k.user_id is not distinct from v_user
         and k.idempotency_key = a.elem ->> 'idempotency_key'),
      v_ids[a.ord])
  order by a.ord;
  -- A replayed message deleted (purged, say) since the insert passed over it
  -- is found by neither lookup: the send is retried whole (the routes retry
  -- 40001), when its key is free again, rather than answered without it.
  get diagnostics v_returned = row_count;
  if v_returned < jsonb_array_length(p_messages) then
    raise exception using errcode = '40001',
      message = 'a replayed message was deleted while it was sent; send it again';
  end if;
end;
$$;

-- The single form of send_messages.
create or replace function public.send_message(
  p_queue_name text,
  p_payload jsonb,
  p_message_type text default 'message',
  p_priority integer default 0,
  p_delay_seconds integer default 0,
  p_max_attempts integer default 5,
  p_idempotency_key text default null,
  p_correlation_id text default null,
  p_group_key text default null,
  p_headers jsonb default null
) returns public.message_queue
language plpgsql
set search_path = ''
as $$
declare
  v_row public.message_queue;
begin
  select * into v_row from public.send_messages(
      p_queue_name,
      -- nulls stay JSON nulls, which send_messages reads as "not given"
      -- (stripping them would strip them inside the payload too)
      jsonb_build_array(jsonb_build_object(
        'payload', coalesce(p_payload, 'null'::jsonb),
        'message_type', p_message_type,
        'priority', p_priority,
        'delay_seconds', p_delay_seconds,
        'max_attempts', p_max_attempts,
        'idempotency_key', p_idempotency_key,
        'group_key', p_group_key,
        'headers', p_headers)),
      p_correlation_id);
  return v_row;
end;
$$;

-- 400 unless a lease (a claim's or an extension's) is 0.1 s to 12 hours.
create or replace function private.check_visibility_timeout(p_seconds double precision)
returns void
language plpgsql
immutable
set search_path = ''
as $$
begin
  if p_seconds is null or p_seconds < 0.1 or p_seconds > 43200 then
    perform private.raise_error(400, 'invalid_visibility_timeout',
      'visibility_timeout_seconds must be between 0.1 and 43200');
  end if;
end;
$$;

-- Claims up to p_limit visible messages, highest priority first, then the
-- longest visible (a retried or delayed message by when it became visible),
-- hidden from other consumers for p_visibility_timeout_seconds. Messages of a
-- consumer that died come back once their lease ends (as a new attempt; after
-- max_attempts they are dead-lettered instead). p_filter (pgmq's read
-- conditional): only messages whose payload contains it (payload @> p_filter),
-- in the same order; '{}' or null: every message. There is no index on the
-- payload (it would cost every send): a filtered claim reads the queue's due
-- messages in claim order, passing over those that do not match, until it has
-- p_limit of them, as pgmq's read does.
-- p_max_bytes: a claim answers at most this much payload and headers as JSON
-- text (always at least one message, as a page of events does); the messages
-- past it are handed back at once, attempt not counted. Without it a claim of
-- 1,000 messages of 2 MB each would lease 2 GB that no answer can carry, and
-- claimed again and again, dead-letter them undelivered.
create or replace function public.claim_messages(
  p_queue_name text,
  p_limit integer default 10,
  p_visibility_timeout_seconds double precision default 30,
  p_consumer text default null,
  p_filter jsonb default null,
  p_max_bytes integer default null
) returns setof public.message_queue
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_message public.message_queue;
  v_bytes bigint := 0;
  v_over bigint[] := '{}';
  v_over_tokens uuid[] := '{}';
begin
  perform private.check_queue_name(p_queue_name);
  perform private.check_limit(p_limit, 1000);
  perform private.check_visibility_timeout(p_visibility_timeout_seconds);
  if jsonb_typeof(p_filter) <> 'object' then
    perform private.raise_error(400, 'invalid_filter', 'filter must be a JSON object');
  end if;
  if p_max_bytes < 1 then
    perform private.raise_error(400, 'invalid_max_bytes', 'max_bytes must be at least 1');
  end if;
  -- A group's promotion needs READ COMMITTED (see promote_message_groups).
  -- In another isolation level, an expiry that would need one is undone and
  -- left to the next claim in READ COMMITTED, so that a claim of a queue
  -- without groups is not refused for another queue's groups.
  if current_setting('transaction_isolation') = 'read committed' then
    perform private.expire_message_leases();
  else
    begin
      perform private.expire_message_leases();
    exception when sqlstate 'PT400' then
      if sqlerrm <> 'read_committed_required' then
        raise;
      end if;
    end;
  end if;
  for v_message in
    select c.* from private.message_queue_lease_claim(p_queue_name, p_limit,
      make_interval(secs => p_visibility_timeout_seconds), p_consumer,
      nullif(p_filter, '{}'::jsonb)) c
    order by c.priority desc, c.id
  loop
    -- the messages after the one that reached the budget go back
    if v_bytes >= p_max_bytes then
      v_over := v_over || v_message.id;
      v_over_tokens := v_over_tokens || v_message.lease_token;
      continue;
    end if;
    return next v_message;
    if p_max_bytes is not null then
      v_bytes := v_bytes + coalesce(octet_length(v_message.payload::text), 0)
        + coalesce(octet_length(v_message.headers::text), 0);
    end if;
  end loop;
  if cardinality(v_over) > 0 then
    perform public.release_messages(p_queue_name, v_over, v_over_tokens);
  end if;
end;
$$;

-- The input of an operation by lease holders (settle, release): a queue name
-- and one token per message id, or a 400.
create or replace function private.check_lease_holders(
  p_queue_name text,
  p_message_ids bigint[],
  p_lease_tokens uuid[]
) returns void
language plpgsql
set search_path = ''
as $$
begin
  perform private.check_queue_name(p_queue_name);
  if cardinality(p_message_ids) is distinct from cardinality(p_lease_tokens) then
    perform private.raise_error(400, 'invalid_acks', 'one lease token per message id');
  end if;
  -- a claim hands out at most 1,000; more in one call is a mistake or an attack
  if cardinality(p_message_ids) > 1000 then
    perform private.raise_error(400, 'invalid_acks', 'at most 1000 message ids at once');
  end if;
end;
$$;

-- Settles messages of one queue for the holders of their leases.
create or replace function private.settle_messages(
  p_queue_name text,
  p_message_ids bigint[],
  p_lease_tokens uuid[],
  p_outcome text,
  p_error text default null,
  p_delay_seconds double precision default null
) returns setof public.message_queue
language plpgsql
set search_path = ''
as $$
declare
  v_ids bigint[];
  v_tokens uuid[];
  v_groups text[];
begin
  perform private.check_lease_holders(p_queue_name, p_message_ids, p_lease_tokens);
  if p_delay_seconds is not null and p_delay_seconds not between 0 and 31536000 then
    perform private.raise_error(400, 'invalid_delay', 'delay_seconds must be between 0 and 31536000');
  end if;
  select array_agg(l.id), array_agg(l.token),
         array_agg(q.group_key) filter (where q.group_key is not null)
  into v_ids, v_tokens, v_groups
  from unnest(p_message_ids, p_lease_tokens) l(id, token)
  join public.message_queue q on q.id = l.id and q.queue_name = p_queue_name;
  return query
  select * from private.message_queue_lease_settle(coalesce(v_ids, '{}'), coalesce(v_tokens, '{}'),
    p_outcome, 'completed', 'dead', 2, make_interval(secs => p_delay_seconds), left(p_error, 4000),
    null);
  -- a head acked or dead-lettered lets its group's next message go
  if v_groups is not null then
    perform private.promote_message_groups(p_queue_name, v_groups);
  end if;
end;
$$;

-- A message as it is after an operation on it alone (p_done: whether the
-- operation took it), or why it did not: 404 message_not_found, or 409
-- p_conflict with the message's status.
create or replace function private.message_after(
  p_queue_name text,
  p_message_id bigint,
  p_done boolean,
  p_conflict text,
  p_expected text
) returns public.message_queue
language plpgsql
set search_path = ''
as $$
declare
  v_row public.message_queue;
begin
  select * into v_row from public.message_queue q
  where q.id = p_message_id and q.queue_name = p_queue_name;
  if v_row.id is null then
    perform private.raise_error(404, 'message_not_found', 'no such message in this queue');
  elsif p_done is null then
    perform private.raise_error(409, p_conflict,
      format('message %s is %s, %s', p_message_id, v_row.status, p_expected));
  end if;
  return v_row;
end;
$$;

-- One settled message, or why not: 404 when the queue has no such message,
-- 409 lease_lost when the token no longer holds it.
create or replace function private.settle_message(
  p_queue_name text,
  p_message_id bigint,
  p_lease_token uuid,
  p_outcome text,
  p_error text default null,
  p_delay_seconds double precision default null
) returns public.message_queue
language plpgsql
set search_path = ''
as $$
declare
  v_row public.message_queue;
begin
  select * into v_row
  from private.settle_messages(p_queue_name, array[p_message_id], array[p_lease_token],
                               p_outcome, p_error, p_delay_seconds);
  if v_row.id is null then
    perform private.message_after(p_queue_name, p_message_id, null, 'lease_lost',
      'not held by this lease token (acked, nacked, or expired and claimed again)');
  end if;
  return v_row;
end;
$$;

create or replace function public.ack_message(
  p_queue_name text,
  p_message_id bigint,
  p_lease_token uuid
) returns public.message_queue
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_row public.message_queue;
begin
  select * into v_row from private.settle_message(p_queue_name, p_message_id, p_lease_token, 'done');
  return v_row;
end;
$$;

-- Batch ack: returns the messages acked (a lost lease is left out, as pgmq's
-- batch archive leaves out unknown ids).
create or replace function public.ack_messages(
  p_queue_name text,
  p_message_ids bigint[],
  p_lease_tokens uuid[]
) returns setof public.message_queue
language plpgsql
security definer
set search_path = ''
as $$
begin
  return query
  select * from private.settle_messages(p_queue_name, p_message_ids, p_lease_tokens, 'done');
end;
$$;

-- Gives a message back: visible again after p_delay_seconds, or after an
-- exponential backoff with jitter (2 s, 4 s, 8 s ... capped at an hour) when
-- no delay is given; dead-lettered once max_attempts are used up.
create or replace function public.nack_message(
  p_queue_name text,
  p_message_id bigint,
  p_lease_token uuid,
  p_error text default null,
  p_delay_seconds double precision default null
) returns public.message_queue
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_row public.message_queue;
begin
  select * into v_row from private.settle_message(
      p_queue_name, p_message_id, p_lease_token, 'retry', p_error, p_delay_seconds);
  return v_row;
end;
$$;

-- Extends (or shortens) a held lease: the lease holder's form of pgmq's set_vt
-- (whoever holds the message: set_message_visibility).
create or replace function public.extend_message_lease(
  p_queue_name text,
  p_message_id bigint,
  p_lease_token uuid,
  p_visibility_timeout_seconds double precision
) returns public.message_queue
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_row public.message_queue;
begin
  perform private.check_queue_name(p_queue_name);
  perform private.check_visibility_timeout(p_visibility_timeout_seconds);
  update public.message_queue q
     set visible_at = clock_timestamp() + make_interval(secs => p_visibility_timeout_seconds),
         updated_at = now()
   where q.id = p_message_id and q.queue_name = p_queue_name
     and q.lease_token = p_lease_token and q.status = 'processing'
  returning * into v_row;
  if v_row.id is null then
    perform private.raise_error(409, 'lease_lost', 'this lease token does not hold the message');
  end if;
  return v_row;
end;
$$;

-- How many messages each queue has had deleted (purge_queue, delete_messages:
-- the only ways a message leaves the table), so that metrics count every
-- message a queue was ever sent (pgmq's total_messages) as the messages
-- stored plus these. Written by operators' deletes, never by a send: a
-- counter row per queue that every send moved would hold each send to that
-- queue behind the one before it until commit.
create table private.queue_removed_messages (
  queue_name private.queue_name primary key,
  removed bigint not null default 0
);
alter table private.queue_removed_messages enable row level security;

create or replace function private.count_removed_messages(p_queue_name text, p_count bigint)
returns void
language sql
set search_path = ''
as $$
  insert into private.queue_removed_messages as r (queue_name, removed)
  select p_queue_name, p_count where p_count > 0
  on conflict (queue_name) do update set removed = r.removed + excluded.removed;
$$;

-- Deletes a queue's messages (all, or those in one status). Returns how many.
create or replace function public.purge_queue(
  p_queue_name text,
  p_status text default null
) returns bigint
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_count bigint;
  v_groups text[];
begin
  perform private.check_queue_name(p_queue_name);
  if p_status is not null and not private.message_in_any_status(p_status) then
    perform private.raise_error(400, 'invalid_status',
      'status must be pending, processing, completed, dead or blocked');
  end if;
  -- The heads it deleted (as the delete found them, which may be more than
  -- an earlier look saw): their groups' next messages go.
  with purged as (
    delete from public.message_queue q
    where q.queue_name = p_queue_name and private.message_in_any_state(q.status, q.due)
      and (p_status is null or q.status = p_status)
    returning q.group_key, q.status
  )
  select count(*),
         array_agg(p.group_key) filter (where p.status in ('pending', 'processing'))
  into v_count, v_groups
  from purged p;
  perform private.count_removed_messages(p_queue_name, v_count);
  perform private.promote_message_groups(p_queue_name, v_groups);
  return v_count;
end;
$$;

-- Per-queue metrics: depth (visible now), delayed, blocked (behind an earlier
-- message of their group), in flight, dead, completed (not yet purged), total
-- (stored now, in any state), total_messages (every message ever sent to the
-- queue: stored or since purged or deleted, pgmq's total_messages), and the
-- ages of the oldest and newest unfinished message (pgmq's queue_length /
-- oldest / newest age, split by state).
create type public.queue_stats as (
  queue_name text,
  depth bigint,
  delayed bigint,
  blocked bigint,
  in_flight bigint,
  dead bigint,
  completed bigint,
  total bigint,
  total_messages bigint,
  oldest_age_seconds double precision,
  newest_age_seconds double precision,
  scrape_time timestamptz
);

create or replace function public.queue_metrics(p_queue_name text)
returns setof public.queue_stats
language plpgsql
stable
security definer
set search_path = ''
as $$
begin
  perform private.check_queue_name(p_queue_name);
  return query
  select p_queue_name,
         count(*) filter (where q.status = 'pending' and q.visible_at <= now()),
         count(*) filter (where q.status = 'pending' and q.visible_at > now()),
         count(*) filter (where q.status = 'blocked'),
         count(*) filter (where q.status = 'processing'),
         count(*) filter (where q.status = 'dead'),
         count(*) filter (where q.status = 'completed'),
         count(*),
         count(*) + coalesce((select r.removed from private.queue_removed_messages r
                              where r.queue_name = p_queue_name), 0),
         extract(epoch from now() - min(q.created_at)
           filter (where q.status in ('pending', 'processing', 'blocked')))::double precision,
         extract(epoch from now() - max(q.created_at)
           filter (where q.status in ('pending', 'processing', 'blocked')))::double precision,
         now()
  from public.message_queue q
  where q.queue_name = p_queue_name and private.message_in_any_state(q.status, q.due);
end;
$$;

-- -----------------------------------------------------------------------------
-- The rest of pgmq's operations: pop, archive, delete and set_vt by id, every
-- queue's metrics
--
-- pgmq's read_with_poll is the HTTP claim's wait_seconds, a loop of claims,
-- each its own transaction; there is no SQL poll, by choice (why: "Long
-- polls" in docs/api/queues.md).
-- -----------------------------------------------------------------------------

-- Claims and acks in one step (pgmq's pop): delivery at most once, for
-- messages a consumer may lose. Each pop is an attempt, as a claim is.
create or replace function public.pop_messages(
  p_queue_name text,
  p_limit integer default 1,
  p_max_bytes integer default null
) returns setof public.message_queue
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_ids bigint[];
  v_tokens uuid[];
begin
  select array_agg(c.id), array_agg(c.lease_token) into v_ids, v_tokens
  from public.claim_messages(p_queue_name, p_limit, 30, 'pop', p_max_bytes := p_max_bytes) c;
  return query
  select s.* from private.settle_messages(p_queue_name, coalesce(v_ids, '{}'),
    coalesce(v_tokens, '{}'), 'done') s
  order by s.priority desc, s.id;
end;
$$;

-- Hands claimed messages back untouched, for the holders of their leases:
-- pending and visible at once, the claim's attempt not counted (nothing was
-- tried), still the heads of their groups. The HTTP long poll uses it when
-- its client has gone by the time a claim answers. Others: see archive.
create or replace function public.release_messages(
  p_queue_name text,
  p_message_ids bigint[],
  p_lease_tokens uuid[]
) returns setof public.message_queue
language plpgsql
security definer
set search_path = ''
as $$
begin
  perform private.check_lease_holders(p_queue_name, p_message_ids, p_lease_tokens);
  return query
  update public.message_queue t
     set status = 'pending',
         attempts = t.attempts - 1,
         visible_at = now(),
         due = true,
         lease_token = null,
         locked_by = null,
         updated_at = now()
    from unnest(p_message_ids, p_lease_tokens) l(id, token)
   where t.id = l.id and t.lease_token = l.token and t.queue_name = p_queue_name
     and t.status = 'processing'
  returning t.*;
end;
$$;

-- The input of an operation on messages by id, checked (400s).
create or replace function private.check_message_ids(p_queue_name text, p_message_ids bigint[])
returns void
language plpgsql
immutable
set search_path = ''
as $$
begin
  perform private.check_queue_name(p_queue_name);
  if coalesce(cardinality(p_message_ids), 0) not between 1 and 1000
     or array_position(p_message_ids, null) is not null then
    perform private.raise_error(400, 'invalid_message_ids',
      'message_ids must be an array of 1 to 1000 ids');
  end if;
end;
$$;

-- The input checked, and the groups of those messages: finishing a group's
-- head promotes its next message.
create or replace function private.checked_message_groups(p_queue_name text, p_message_ids bigint[])
returns text[]
language plpgsql
stable
set search_path = ''
as $$
begin
  perform private.check_message_ids(p_queue_name, p_message_ids);
  return array(
    select distinct q.group_key from public.message_queue q
    where q.id = any (p_message_ids) and q.queue_name = p_queue_name and q.group_key is not null);
end;
$$;

-- Archives messages whoever holds them (pgmq's archive), an operator's way to
-- skip a message: a pending, in-flight or blocked message becomes completed,
-- and the holder of its lease then gets 409 lease_lost on ack or nack.
-- Returns the messages archived; ids not in the queue, completed or dead are
-- left out. A claim in progress is waited for, then its message archived all
-- the same.
create or replace function public.archive_messages(
  p_queue_name text,
  p_message_ids bigint[]
) returns setof public.message_queue
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_groups text[];
begin
  v_groups := private.checked_message_groups(p_queue_name, p_message_ids);
  return query
  update public.message_queue q
     set status = 'completed',
         finished_at = now(),
         lease_token = null,
         locked_by = null,
         updated_at = now()
   where q.id = any (p_message_ids) and q.queue_name = p_queue_name
     and q.status in ('pending', 'processing', 'blocked')
  returning q.*;
  perform private.promote_message_groups(p_queue_name, v_groups);
end;
$$;

-- One archived message, or why not: 404 message_not_found, 409
-- message_finished (already completed or dead).
create or replace function public.archive_message(p_queue_name text, p_message_id bigint)
returns public.message_queue
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_done boolean;
begin
  select true into v_done from public.archive_messages(p_queue_name, array[p_message_id]);
  return private.message_after(p_queue_name, p_message_id, v_done, 'message_finished',
                               'finished already');
end;
$$;

-- Deletes messages in any state (pgmq's delete), an operator's way to remove
-- one for good; a lease holder's ack or nack is then 404. Returns the ids
-- deleted; ids not in the queue are left out.
create or replace function public.delete_messages(
  p_queue_name text,
  p_message_ids bigint[]
) returns setof bigint
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_groups text[];
  v_count bigint;
begin
  v_groups := private.checked_message_groups(p_queue_name, p_message_ids);
  return query
  delete from public.message_queue q
  where q.id = any (p_message_ids) and q.queue_name = p_queue_name
  returning q.id;
  get diagnostics v_count = row_count;
  perform private.count_removed_messages(p_queue_name, v_count);
  perform private.promote_message_groups(p_queue_name, v_groups);
end;
$$;

-- One deleted message's id, or 404 message_not_found.
create or replace function public.delete_message(p_queue_name text, p_message_id bigint)
returns bigint
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_id bigint;
begin
  select d into v_id from public.delete_messages(p_queue_name, array[p_message_id]) d;
  if v_id is null then
    perform private.raise_error(404, 'message_not_found', 'no such message in this queue');
  end if;
  return v_id;
end;
$$;

-- Redrives dead letters (SQS's redrive; pgmq has no dead letters): once the
-- cause is fixed, a dead message is due again with its attempts back at 0.
-- One of a FIFO group goes back to its group, in its place by id: blocked
-- behind a head if the group has one, else its head. Returns the messages
-- redriven; ids not in the queue, or not dead, are left out.
create or replace function public.redrive_messages(
  p_queue_name text,
  p_message_ids bigint[]
) returns setof public.message_queue
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_groups text[];
begin
  v_groups := private.checked_message_groups(p_queue_name, p_message_ids);
  return query
  update public.message_queue q
     set status = case when q.group_key is null then 'pending' else 'blocked' end,
         attempts = 0,
         visible_at = now(),
         due = true,
         finished_at = null,
         updated_at = now()
   where q.id = any (p_message_ids) and q.queue_name = p_queue_name and q.status = 'dead'
  returning q.*;
  perform private.promote_message_groups(p_queue_name, v_groups);
end;
$$;

-- One redriven message (as it is after any promotion of its group), or why
-- not: 404 message_not_found, 409 message_not_dead.
create or replace function public.redrive_message(p_queue_name text, p_message_id bigint)
returns public.message_queue
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_done boolean;
begin
  select true into v_done from public.redrive_messages(p_queue_name, array[p_message_id]);
  return private.message_after(p_queue_name, p_message_id, v_done, 'message_not_dead',
                               'not dead');
end;
$$;

-- Sets when messages become visible, whoever holds them (pgmq's set_vt): now
-- plus p_visible_in_seconds (0: at once). A pending message, delayed or not,
-- is claimable from then on; a blocked one once it also heads its group. For
-- an in-flight message it is when its lease ends: its holder keeps the lease
-- until then, and after it the lease rules apply (the next claim takes the
-- message back as an expired lease, pending again or dead after its last
-- attempt, and the holder's ack or nack is then 409 lease_lost). The lease
-- holder's own way is extend_message_lease. Returns the messages set; ids not
-- in the queue, completed or dead are left out. A claim in progress is waited
-- for, then its message set all the same.
create or replace function public.set_messages_visibility(
  p_queue_name text,
  p_message_ids bigint[],
  p_visible_in_seconds double precision
) returns setof public.message_queue
language plpgsql
security definer
set search_path = ''
as $$
begin
  perform private.check_message_ids(p_queue_name, p_message_ids);
  if p_visible_in_seconds is null or p_visible_in_seconds not between 0 and 31536000 then
    perform private.raise_error(400, 'invalid_visibility',
      'visible_in_seconds must be between 0 and 31536000');
  end if;
  return query
  update public.message_queue q
     set visible_at = now() + make_interval(secs => p_visible_in_seconds),
         due = p_visible_in_seconds = 0,
         updated_at = now()
   where q.id = any (p_message_ids) and q.queue_name = p_queue_name
     and q.status in ('pending', 'processing', 'blocked')
  returning q.*;
end;
$$;

-- One message's visibility set, or why not: 404 message_not_found, 409
-- message_finished (completed or dead).
create or replace function public.set_message_visibility(
  p_queue_name text,
  p_message_id bigint,
  p_visible_in_seconds double precision
) returns public.message_queue
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_done boolean;
begin
  select true into v_done
  from public.set_messages_visibility(p_queue_name, array[p_message_id], p_visible_in_seconds);
  return private.message_after(p_queue_name, p_message_id, v_done, 'message_finished',
                               'finished already');
end;
$$;

-- Every queue's metrics, by name (pgmq's list_queues and metrics_all). A
-- queue is named by its messages: once all are purged or deleted it is not
-- listed here (queue_metrics still counts its total_messages).
-- The names come one index probe per queue from the claim, delayed, finished
-- and blocked indexes (a loose index scan), and from the in-flight rows, few
-- by nature.
create or replace function public.list_queues()
returns setof public.queue_stats
language plpgsql
stable
security definer
set search_path = ''
as $$
begin
  return query
  with recursive pending(name) as (
    (select q.queue_name::text from public.message_queue q
     where q.status = 'pending' and q.due order by q.queue_name limit 1)
    union all
    select (select q.queue_name::text from public.message_queue q
            where q.status = 'pending' and q.due and q.queue_name > p.name
            order by q.queue_name limit 1)
    from pending p where p.name is not null
  ),
  delayed(name) as (
    (select q.queue_name::text from public.message_queue q
     where q.status = 'pending' and not q.due order by q.queue_name limit 1)
    union all
    select (select q.queue_name::text from public.message_queue q
            where q.status = 'pending' and not q.due and q.queue_name > d.name
            order by q.queue_name limit 1)
    from delayed d where d.name is not null
  ),
  finished(name) as (
    (select q.queue_name::text from public.message_queue q
     where q.status in ('completed', 'dead') order by q.queue_name limit 1)
    union all
    select (select q.queue_name::text from public.message_queue q
            where q.status in ('completed', 'dead') and q.queue_name > f.name
            order by q.queue_name limit 1)
    from finished f where f.name is not null
  ),
  blocked(name) as (
    (select q.queue_name::text from public.message_queue q
     where q.status = 'blocked' order by q.queue_name limit 1)
    union all
    select (select q.queue_name::text from public.message_queue q
            where q.status = 'blocked' and q.queue_name > b.name
            order by q.queue_name limit 1)
    from blocked b where b.name is not null
  ),
  names(name) as (
    select p.name from pending p where p.name is not null
    union
    select d.name from delayed d where d.name is not null
    union
    select f.name from finished f where f.name is not null
    union
    select b.name from blocked b where b.name is not null
    union
    select q.queue_name from public.message_queue q where q.status = 'processing'
  )
  select m.* from names n cross join lateral public.queue_metrics(n.name) m
  order by m.queue_name;
end;
$$;

revoke all on function public.send_messages(text, jsonb, text) from public, anon;
revoke all on function
  public.send_message(text, jsonb, text, integer, integer, integer, text, text, text, jsonb)
  from public, anon;
revoke all on function public.claim_messages(text, integer, double precision, text, jsonb, integer)
  from public, anon, authenticated;
revoke all on function public.ack_message(text, bigint, uuid) from public, anon, authenticated;
revoke all on function public.ack_messages(text, bigint[], uuid[]) from public, anon, authenticated;
revoke all on function public.nack_message(text, bigint, uuid, text, double precision)
  from public, anon, authenticated;
revoke all on function public.extend_message_lease(text, bigint, uuid, double precision)
  from public, anon, authenticated;
revoke all on function public.purge_queue(text, text) from public, anon, authenticated;
revoke all on function public.queue_metrics(text) from public, anon, authenticated;
grant execute on function public.send_messages(text, jsonb, text) to authenticated, service_role;
grant execute on function
  public.send_message(text, jsonb, text, integer, integer, integer, text, text, text, jsonb)
  to authenticated, service_role;
grant execute on function public.claim_messages(text, integer, double precision, text, jsonb, integer)
  to service_role;
grant execute on function public.ack_message(text, bigint, uuid) to service_role;
grant execute on function public.ack_messages(text, bigint[], uuid[]) to service_role;
grant execute on function public.nack_message(text, bigint, uuid, text, double precision)
  to service_role;
grant execute on function public.extend_message_lease(text, bigint, uuid, double precision)
  to service_role;
grant execute on function public.purge_queue(text, text) to service_role;
grant execute on function public.queue_metrics(text) to service_role;
revoke all on function public.pop_messages(text, integer, integer) from public, anon, authenticated;
revoke all on function public.release_messages(text, bigint[], uuid[])
  from public, anon, authenticated;
revoke all on function public.archive_messages(text, bigint[]) from public, anon, authenticated;
revoke all on function public.archive_message(text, bigint) from public, anon, authenticated;
revoke all on function public.delete_messages(text, bigint[]) from public, anon, authenticated;
revoke all on function public.delete_message(text, bigint) from public, anon, authenticated;
revoke all on function public.list_queues() from public, anon, authenticated;
grant execute on function public.pop_messages(text, integer, integer) to service_role;
grant execute on function public.release_messages(text, bigint[], uuid[]) to service_role;
grant execute on function public.archive_messages(text, bigint[]) to service_role;
grant execute on function public.archive_message(text, bigint) to service_role;
grant execute on function public.delete_messages(text, bigint[]) to service_role;
grant execute on function public.delete_message(text, bigint) to service_role;
grant execute on function public.list_queues() to service_role;
revoke all on function public.redrive_messages(text, bigint[]) from public, anon, authenticated;
revoke all on function public.redrive_message(text, bigint) from public, anon, authenticated;
grant execute on function public.redrive_messages(text, bigint[]) to service_role;
grant execute on function public.redrive_message(text, bigint) to service_role;
revoke all on function public.set_messages_visibility(text, bigint[], double precision)
  from public, anon, authenticated;
revoke all on function public.set_message_visibility(text, bigint, double precision)
  from public, anon, authenticated;
grant execute on function public.set_messages_visibility(text, bigint[], double precision)
  to service_role;
grant execute on function public.set_message_visibility(text, bigint, double precision)
  to service_role;

-- -----------------------------------------------------------------------------
-- background_jobs
--
-- run_at is when the job was asked to run; visible_at when it may next be
-- claimed (run_at, then after a retry backoff) and, while running, when its
-- lease ends: 10 s after its timeout, so that a worker which stops the handler
-- at the timeout (timing from when the claim came back, a little after the
-- database's now()) can still report. A job that throws is retried with
-- growing delays (10 s, 20 s, 40 s ... with jitter) and ends failed after
-- max_attempts; one that runs past timeout_seconds is timed out the same way
-- (by its worker, or by the lease when the worker died) and ends with status
-- timeout.
-- timeout_seconds is capped at 120 so a worker run stays inside the edge
-- function's 150 s wall clock.
-- -----------------------------------------------------------------------------
-- Column rules as domains (planned once per connection, see the event store):
-- every claim and every completion is an UPDATE, which would otherwise read
-- and plan a table check again.
create domain private.job_type as text
  check (char_length(value) <= 63 and value ~ '^[a-z][a-z0-9_.-]*$');
create domain private.job_status as text
  check (value in ('pending', 'running', 'completed', 'failed', 'cancelled', 'timeout'));
create domain private.job_name as text check (char_length(value) between 1 and 200);
create domain private.job_max_attempts as integer check (value between 1 and 25);
create domain private.job_timeout_seconds as integer check (value between 1 and 120);

create table public.background_jobs (
  id bigserial primary key,
  job_type private.job_type not null,
  job_name private.job_name not null,
  payload private.json_object not null default '{}'::jsonb,
  priority private.priority not null default 0,
  status private.job_status not null default 'pending',
  run_at timestamptz not null default now(),
  visible_at timestamptz not null default now(),
  attempts private.attempt_count not null default 0,
  max_attempts private.job_max_attempts not null default 3,
  timeout_seconds private.job_timeout_seconds not null default 30,
  result jsonb,
  last_error private.error_text,
  idempotency_key private.idempotency_key,
  correlation_id private.trace_id,
  user_id uuid,
  lease_token uuid,
  locked_by private.worker_id,
  locked_at timestamptz,
  -- The lease end of the last run abandoned while its handler may still be
  -- going: one a cancel took away from its worker, or one its worker timed
  -- out (it stops waiting; the handler may not stop). No backoff, retry or
  -- cancel makes the job due before it (visible_at alone would forget it at
  -- the next retry).
  abandoned_lease_until timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  finished_at timestamptz,
  -- pending and due: in the claim index ("Due" at install_leases)
  due boolean not null default false
);

-- The job types users may schedule and retry, and at what priority at most. A job runs
-- its type's handler with the payload it was given, so a type is closed to
-- users until an operator lists it here; the service role schedules any.
create table private.user_job_types (
  job_type private.job_type primary key,
  max_priority private.priority not null default 0
);
alter table private.user_job_types enable row level security;

-- The key first, for the same reason as message_queue_idempotency_idx.
create unique index background_jobs_idempotency_idx
  on public.background_jobs (idempotency_key, user_id) nulls not distinct
  where idempotency_key is not null;
-- claim order as for message_queue_claim_idx, by job type (the claim's lane);
-- jobs due later (run_at, or a retry's backoff) wait in the delayed indexes
create index background_jobs_claim_idx
  on public.background_jobs (job_type, priority desc, visible_at, id)
  where status = 'pending' and due;
create index background_jobs_delayed_idx
  on public.background_jobs (job_type, visible_at) where status = 'pending' and not due;
create index background_jobs_delayed_claim_idx
  on public.background_jobs (job_type, priority desc, visible_at, id)
  where status = 'pending' and not due;
create index background_jobs_running_idx
  on public.background_jobs (visible_at) where status = 'running';
create index background_jobs_user_idx
  on public.background_jobs (user_id, created_at desc) where user_id is not null;

alter table public.background_jobs enable row level security;
-- Read-only for the API roles, the service role included: its functions
-- (schedule, claim, settle, cancel and retry) are the only writers, so leases and attempts cannot be
-- skipped.
revoke all on public.background_jobs from anon, authenticated, service_role;
revoke all on sequence public.background_jobs_id_seq from anon, authenticated, service_role;
grant select on public.background_jobs to authenticated, service_role;

create policy background_jobs_user_select on public.background_jobs
  for select to authenticated using (user_id = (select auth.uid()));
create policy background_jobs_service_select on public.background_jobs
  for select to service_role using (true);

-- A null lane claims jobs of any type.
select private.install_leases('public.background_jobs', 'background_jobs', 'job_type', true,
  'running');

-- For a user, 403 unless users may run jobs of p_job_type at p_priority (an
-- operator may close a type, or lower its cap, at any time: a user's retry
-- asks again); nothing for the service role, which runs any.
create or replace function private.require_user_job_type(p_job_type text, p_priority integer)
returns void
language plpgsql
stable
set search_path = ''
as $$
declare
  v_max_priority integer;
begin
  if private.caller_user_id() is null then
    return;
  end if;
  select u.max_priority into v_max_priority from private.user_job_types u
  where u.job_type = p_job_type;
  if not found then
    perform private.raise_error(403, 'job_type_not_allowed',
      format('users may not run jobs of type %s', p_job_type));
  elsif p_priority > v_max_priority then
    perform private.raise_error(403, 'priority_not_allowed',
      format('users may run %s jobs at priority %s at most', p_job_type, v_max_priority));
  end if;
end;
$$;

-- The spec's call. Users schedule jobs as themselves (user_id forced); an
-- idempotency key already used by the same scheduler returns that job, and
-- the same key with any other parameter (type, name, payload, priority,
-- attempts, timeout, a given run_at) is a 409.
create or replace function public.schedule_job(
  p_job_type text,
  p_job_name text,
  p_payload jsonb default '{}'::jsonb,
  p_run_at timestamptz default null,
  p_priority integer default 0,
  p_max_attempts integer default 3,
  p_timeout_seconds integer default 30,
  p_idempotency_key text default null,
  p_correlation_id text default null
) returns public.background_jobs
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_user uuid := private.caller_user_id();
  v_row public.background_jobs;
begin
  if jsonb_typeof(p_payload) is distinct from 'object' then
    perform private.raise_error(400, 'invalid_payload', 'payload must be a JSON object');
  end if;
  if private.json_too_large(p_payload) then
    perform private.refuse_too_large('payload');
  end if;
  if p_priority is null or p_priority not between 0 and 1000 then
    perform private.raise_error(400, 'invalid_priority', 'priority must be between 0 and 1000');
  end if;
  -- years as transactions take them: Postgres writes a year BC or past 9999
  -- in a form clients do not read back (a job's run_at came back null)
  if not isfinite(p_run_at) or extract(year from p_run_at at time zone 'UTC') not between 1000 and 9999 then
    perform private.raise_error(400, 'invalid_run_at', 'run_at must fall in the years 1000 to 9999 (UTC)');
  end if;
  insert into public.background_jobs as j (
    job_type, job_name, payload, priority, run_at, visible_at, due, max_attempts,
    timeout_seconds, idempotency_key, correlation_id, user_id
  ) values (
    p_job_type, p_job_name, p_payload, p_priority, coalesce(p_run_at, now()),
    -- a run_at in the past is due now, in turn: not ahead of the jobs already waiting
    greatest(p_run_at, now()), coalesce(p_run_at <= now(), true),
    coalesce(p_max_attempts, 3), coalesce(p_timeout_seconds, 30),
    p_idempotency_key, p_correlation_id, v_user
  )
  on conflict (user_id, idempotency_key) where idempotency_key is not null do nothing
  returning * into v_row;
  -- A user's new job must be of a type open to them (the raise undoes the
  -- insert); a replay schedules nothing, and answers with its job even once
  -- the type has closed.
  if v_row.id is not null then
    perform private.require_user_job_type(p_job_type, p_priority);
  else
    select * into v_row from public.background_jobs j
    where j.user_id is not distinct from v_user and j.idempotency_key = p_idempotency_key;
    -- every parameter the caller gave (a run_at left out is "now" in both calls)
    if v_row.job_type <> p_job_type or v_row.payload <> p_payload
       or v_row.job_name is distinct from p_job_name or v_row.priority <> p_priority
       or v_row.max_attempts <> coalesce(p_max_attempts, 3)
       or v_row.timeout_seconds <> coalesce(p_timeout_seconds, 30)
       or v_row.run_at <> p_run_at then
      perform private.raise_error(409, 'idempotency_key_conflict',
        'this idempotency key was used for a different job');
    end if;
  end if;
  return v_row;
end;
$$;

-- Due jobs waiting for a worker, by type, leaving out the given types: after
-- a run that left nothing it could claim, the jobs no handler takes.
create or replace function public.due_jobs_by_type(p_exclude_types text[] default null)
returns table (job_type text, due bigint)
language sql
stable
set search_path = ''
as $$
  select j.job_type, count(*)
  from public.background_jobs j
  -- both arms spelled out, so each finds its index (claim and delayed)
  where ((j.status = 'pending' and j.due) or (j.status = 'pending' and not j.due))
    and j.visible_at <= now()
    and (p_exclude_types is null or j.job_type <> all (p_exclude_types))
  group by j.job_type
  order by j.job_type
$$;

-- Running jobs past their timeout: retried with backoff, or status timeout
-- after max_attempts. Returns how many it timed out.
create or replace function public.timeout_jobs() returns integer
language plpgsql
security definer
set search_path = ''
as $$
begin
  return cardinality(private.background_jobs_lease_expire('timeout', 10, 'timed out'));
end;
$$;

-- Claims due jobs (of the given types, or any), highest priority first, then
-- the longest due; each is leased for its own timeout_seconds. Timed-out jobs
-- are swept first, so a crashed worker's jobs are retried or closed.
create or replace function public.claim_jobs(
  p_job_types text[] default null,
  p_limit integer default 10,
  p_worker text default null
) returns setof public.background_jobs
language plpgsql
security definer
set search_path = ''
as $$
begin
  perform private.check_limit(p_limit, 1000);
  perform private.background_jobs_lease_expire('timeout', 10, 'timed out');
  return query
  select c.* from private.background_jobs_lease_claim(p_job_types, p_limit, null, p_worker) c
  order by c.priority desc, c.id;
end;
$$;

-- The jobs a worker holds, running under a lease that has not ended, taken up
-- again: a fresh lease (token, and the job's timeout plus 10 s from now) for
-- each, the attempt unchanged. A worker whose settle-and-claim committed but
-- whose answer was lost (the connection dropped after the commit) finds here
-- the job that call claimed for it: else that job waited out its lease unrun
-- and counted as an attempt timed out, the last one of a job allowed one. The
-- lease starts again because the worker gives the handler its whole timeout,
-- and part of the first lease went by in the lost call and its retries.
-- Only jobs whose timeout is at most p_max_timeout_seconds: the time the
-- worker has left. p_worker is the name a claim was made under (each slot of
-- the jobs function claims under its own, unique to its run).
create or replace function public.reclaim_held_jobs(
  p_worker text,
  p_max_timeout_seconds integer default 120
) returns setof public.background_jobs
language sql
volatile
security definer
set search_path = ''
as $$
  update public.background_jobs j
     set lease_token = pg_catalog.gen_random_uuid(),
         locked_at = pg_catalog.clock_timestamp(),
         visible_at = pg_catalog.clock_timestamp() + make_interval(secs => j.timeout_seconds + 10),
         updated_at = now()
   where j.status = 'running' and j.locked_by = p_worker and j.visible_at > now()
     and j.timeout_seconds <= p_max_timeout_seconds
  returning j.*
$$;

-- Settles one attempt of a job for the holder of its lease (409 lease_lost
-- otherwise): completed with p_result, or failed (retried with backoff, or
-- failed / timeout after max_attempts). The one mapping of an attempt's end to
-- the lease settlement, for complete_job, fail_job and settle_and_claim_jobs.
create or replace function private.settle_job(
  p_job_id bigint,
  p_lease_token uuid,
  p_failed boolean,
  p_timed_out boolean,
  p_error text,
  p_result jsonb
) returns public.background_jobs
language plpgsql
set search_path = ''
as $$
declare
  v_row public.background_jobs;
  v_lease_ends timestamptz;
begin
  -- a result is kept and read back as a payload is, so it is measured as one
  if not p_failed and private.json_too_large(p_result) then
    perform private.refuse_too_large('result');
  end if;
  if p_timed_out then
    select j.visible_at into v_lease_ends from public.background_jobs j
    where j.id = p_job_id and j.lease_token = p_lease_token and j.status = 'running';
  end if;
  select * into v_row
  from private.background_jobs_lease_settle(array[p_job_id], array[p_lease_token],
    case when p_failed then 'retry' else 'done' end, 'completed',
    case when p_timed_out then 'timeout' else 'failed' end, 10, null, left(p_error, 4000),
    case when p_failed then null else p_result end);
  if v_row.id is null then
    if not exists (select from public.background_jobs j where j.id = p_job_id) then
      perform private.raise_error(404, 'job_not_found', 'no such job');
    end if;
    perform private.raise_error(409, 'lease_lost',
      'this lease token does not hold the job (finished, cancelled or timed out)');
  end if;
  -- A run its worker timed out may go on until its lease ends (see
  -- abandoned_lease_until): its retry waits for that, too.
  if p_timed_out then
    update public.background_jobs j
       set abandoned_lease_until = v_lease_ends,
           visible_at = case when j.status = 'pending' then greatest(j.visible_at, v_lease_ends)
                             else j.visible_at end,
           due = j.due and v_lease_ends <= now()
     where j.id = p_job_id
    returning * into v_row;
  end if;
  return v_row;
end;
$$;

-- p_result_error: why the handler's result is not kept (it ran to its end,
-- but its result cannot be stored): the job completes without running again,
-- and last_error says why.
create or replace function public.complete_job(
  p_job_id bigint,
  p_lease_token uuid,
  p_result jsonb default null,
  p_result_error text default null
) returns public.background_jobs
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_row public.background_jobs;
begin
  select * into v_row
  from private.settle_job(p_job_id, p_lease_token, false, false, p_result_error, p_result);
  return v_row;
end;
$$;

create or replace function public.fail_job(
  p_job_id bigint,
  p_lease_token uuid,
  p_error text,
  p_timed_out boolean default false
) returns public.background_jobs
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_row public.background_jobs;
begin
  select * into v_row
  from private.settle_job(p_job_id, p_lease_token, true, p_timed_out, p_error, null);
  return v_row;
end;
$$;

-- A worker's one round trip per job: settles the job it ran (completed with
-- p_result and p_result_error when p_error is null, else a failed or
-- timed-out attempt, exactly as complete_job / fail_job) and claims its next
-- jobs as claim_jobs does, in one transaction. A refused settlement (404, 409 lease_lost) claims
-- nothing; the worker then claims with claim_jobs.
create or replace function public.settle_and_claim_jobs(
  p_job_id bigint,
  p_lease_token uuid,
  p_result jsonb default null,
  p_error text default null,
  p_timed_out boolean default false,
  p_job_types text[] default null,
  p_limit integer default 1,
  p_worker text default null,
  p_result_error text default null
) returns setof public.background_jobs
language plpgsql
security definer
set search_path = ''
as $$
begin
  if p_error is null and p_timed_out then
    perform private.raise_error(400, 'invalid_settlement', 'a timed-out attempt needs an error');
  end if;
  perform private.check_limit(p_limit, 1000);
  perform private.settle_job(p_job_id, p_lease_token, p_error is not null, p_timed_out,
    coalesce(p_error, p_result_error), p_result);
  return query select * from public.claim_jobs(p_job_types, p_limit, p_worker);
end;
$$;

-- Locks a job the caller may act on (own job, or any for the service role),
-- checks that it is in one of the states the action accepts, and returns it.
create or replace function private.lock_job(p_job_id bigint, p_states text[], p_action text)
returns public.background_jobs
language plpgsql
set search_path = ''
as $$
declare
  v_user uuid := private.caller_user_id();
  v_row public.background_jobs;
begin
  select * into v_row from public.background_jobs j where j.id = p_job_id for update;
  if v_row.id is null or (v_user is not null and v_row.user_id is distinct from v_user) then
    perform private.raise_error(404, 'job_not_found', 'no such job');
  end if;
  if v_row.status <> all(p_states) then
    perform private.raise_error(409, 'invalid_state',
      format('a %s job cannot be %s', v_row.status, p_action),
      jsonb_build_object('status', v_row.status));
  end if;
  return v_row;
end;
$$;

-- Cancels a pending or running job (a running one's worker loses its lease,
-- so its result is discarded). A running job's handler may still be running
-- until its lease ends: that end is kept in abandoned_lease_until, and a retry
-- waits for it (see retry_job).
create or replace function public.cancel_job(p_job_id bigint) returns public.background_jobs
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_row public.background_jobs;
begin
  perform private.lock_job(p_job_id, array['pending', 'running'], 'cancelled');
  update public.background_jobs j
     set status = 'cancelled', finished_at = now(), lease_token = null, locked_by = null,
         abandoned_lease_until = case when j.status = 'running' then j.visible_at
                                      else j.abandoned_lease_until end,
         updated_at = now()
   where j.id = p_job_id
  returning * into v_row;
  return v_row;
end;
$$;

-- Runs a job again now: a waiting job skips its backoff; a failed, timed out
-- or cancelled one starts over with a fresh set of attempts. One cancelled
-- while it ran, or timed out by its worker, waits for that run's lease to end,
-- however often it is retried or cancelled meanwhile, so that two runs of a
-- job never overlap (greatest ignores the null of a job no run was abandoned
-- by). A user retries only
-- jobs of a type still open to them, at a priority still allowed.
create or replace function public.retry_job(p_job_id bigint) returns public.background_jobs
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_row public.background_jobs;
begin
  v_row := private.lock_job(p_job_id, array['pending', 'failed', 'timeout', 'cancelled'],
                            'retried');
  perform private.require_user_job_type(v_row.job_type, v_row.priority);
  update public.background_jobs j
     set status = 'pending', finished_at = null,
         visible_at = greatest(now(), j.abandoned_lease_until),
         due = coalesce(j.abandoned_lease_until <= now(), true),
         attempts = case when j.status = 'pending' then j.attempts else 0 end,
         updated_at = now()
   where j.id = p_job_id
  returning * into v_row;
  return v_row;
end;
$$;

-- A job's status (RLS decides: own jobs for users, any for the service role).
create or replace function public.get_job(p_job_id bigint) returns public.background_jobs
language plpgsql
stable
set search_path = ''
as $$
declare
  v_row public.background_jobs;
begin
  select * into v_row from public.background_jobs j where j.id = p_job_id;
  if v_row.id is null then
    perform private.raise_error(404, 'job_not_found', 'no such job');
  end if;
  return v_row;
end;
$$;

revoke all on function public.schedule_job(text, text, jsonb, timestamptz, integer, integer, integer, text, text)
  from public, anon;
revoke all on function public.timeout_jobs() from public, anon, authenticated;
revoke all on function public.due_jobs_by_type(text[]) from public, anon, authenticated;
revoke all on function public.claim_jobs(text[], integer, text) from public, anon, authenticated;
revoke all on function public.reclaim_held_jobs(text, integer) from public, anon, authenticated;
revoke all on function public.complete_job(bigint, uuid, jsonb, text) from public, anon, authenticated;
revoke all on function public.fail_job(bigint, uuid, text, boolean) from public, anon, authenticated;
revoke all on function public.settle_and_claim_jobs(bigint, uuid, jsonb, text, boolean, text[], integer, text, text)
  from public, anon, authenticated;
revoke all on function public.cancel_job(bigint) from public, anon;
revoke all on function public.retry_job(bigint) from public, anon;
revoke all on function public.get_job(bigint) from public, anon;
grant execute on function public.schedule_job(text, text, jsonb, timestamptz, integer, integer, integer, text, text)
  to authenticated, service_role;
grant execute on function public.timeout_jobs() to service_role;
grant execute on function public.due_jobs_by_type(text[]) to service_role;
grant execute on function public.claim_jobs(text[], integer, text) to service_role;
grant execute on function public.reclaim_held_jobs(text, integer) to service_role;
grant execute on function public.complete_job(bigint, uuid, jsonb, text) to service_role;
grant execute on function public.fail_job(bigint, uuid, text, boolean) to service_role;
grant execute on function public.settle_and_claim_jobs(bigint, uuid, jsonb, text, boolean, text[], integer, text, text)
  to service_role;
grant execute on function public.cancel_job(bigint) to authenticated, service_role;
grant execute on function public.retry_job(bigint) to authenticated, service_role;
grant execute on function public.get_job(bigint) to authenticated, service_role;

-- private helpers the public functions above call as their owner only.
revoke all on function private.settle_messages(text, bigint[], uuid[], text, text, double precision)
  from public;
revoke all on function private.settle_message(text, bigint, uuid, text, text, double precision)
  from public;
revoke all on function private.settle_job(bigint, uuid, boolean, boolean, text, jsonb) from public;
revoke all on function private.lock_job(bigint, text[], text) from public;
revoke all on function private.check_queue_name(text) from public;
