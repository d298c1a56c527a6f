-- =============================================================================
-- WhatsApp: sessions, inbound messages, delivery statuses and the outbound
-- queue with the rate limiter its dispatchers share.
--
--   whatsapp_sessions            one per WhatsApp user phone (E.164)
--   whatsapp_session_secrets     tokens/secrets of a session (service_role only)
--   whatsapp_inbound_messages    (partitioned) inbound messages, once per wamid
--   whatsapp_inbound_wamids      the cross-partition uniqueness of inbound wamids
--   whatsapp_message_statuses    Meta's status events (sent/delivered/read/failed)
--   whatsapp_message_queue       outbound messages and their state machine
--   private.whatsapp_send_windows   per business number: next send slot, pause
--   private.whatsapp_pair_pacing    per (business number, user): next allowed send
--
-- Users read only their own session and messages, matched by the phone claim
-- of their JWT; service_role does everything; anon nothing.
--
-- Priority: 10 is sent first, 1 last (higher first, like message_queue).
-- Within a priority the messages to one recipient leave in the order they were
-- enqueued (id), one at a time.
--
-- The queue follows the lease contract of 20260401140000 (id bigint, status,
-- priority higher first, visible_at, attempts / max_attempts, lease_token,
-- locked_by / locked_at, finished_at, last_error, updated_at). Its lease
-- functions, private.whatsapp_message_queue_lease_expire / _lease_settle, are
-- written by private.install_leases in 20260401140500_whatsapp_leases.sql:
-- that generator comes with 20260401140000, which sorts after this file, so
-- only plpgsql bodies here call them (plpgsql resolves names when a function
-- runs, not when it is created).
-- =============================================================================

-- -----------------------------------------------------------------------------
-- Helpers: the caller's phone, status ranks, validation
-- -----------------------------------------------------------------------------

-- The caller's phone in E.164, from the `phone` claim Supabase puts in a user's
-- JWT (digits without '+'); null for anyone else or when it is not a number.
create or replace function private.whatsapp_jwt_phone() returns text
language sql
stable
set search_path = ''
as $$
  select case
    when auth.role() = 'authenticated'
      and regexp_replace(coalesce(auth.jwt() ->> 'phone', ''), '[^0-9]', '', 'g') ~ '^[1-9][0-9]{6,14}$'
    then '+' || regexp_replace(auth.jwt() ->> 'phone', '[^0-9]', '', 'g')
  end;
$$;

revoke all on function private.whatsapp_jwt_phone() from public, anon;
grant execute on function private.whatsapp_jwt_phone() to authenticated, service_role;

-- Forward-only progression of an outbound message. failed and cancelled are
-- terminal and never overwritten by a late delivery event.
create or replace function private.whatsapp_status_rank(p_status text) returns integer
language sql
immutable
set search_path = ''
as $$
  select case p_status
    when 'pending' then 0
    when 'processing' then 1
    when 'sent' then 2
    when 'delivered' then 3
    when 'read' then 4
    when 'failed' then 9
    when 'cancelled' then 9
  end;
$$;

-- Whether a status Meta reports for a send it took puts the message back to
-- pending, to go out again after a backoff: a failure worth another send
-- (throttling and transient faults, the codes the dispatcher retries when the
-- send itself gets them back; see shared/whatsapp_dispatch.ts) of a message
-- with attempts left. Any other failure is final. The one rule for a status
-- that follows the dispatcher's record of the send (ingest_whatsapp_events)
-- and one that beat it (complete_whatsapp_messages).
create or replace function private.whatsapp_status_requeues(
  p_status text,
  p_error_code text,
  p_attempts integer,
  p_max_attempts integer
) returns boolean
language sql
immutable
set search_path = ''
as $$
  select p_status = 'failed' and p_attempts < p_max_attempts
     and coalesce(p_error_code in ('130429', '131056', '131048', '80007', '4', '131057',
                                   '131000', '131016', '133004', '1', '2'), false)
$$;

-- When a message such a status put back goes out again: 2 s, doubling with
-- each attempt, up to an hour, with jitter. (plpgsql: private.backoff_delay
-- comes with the leases, in a later migration.)
create or replace function private.whatsapp_requeue_at(p_attempts integer) returns timestamptz
language plpgsql
volatile
set search_path = ''
as $$
begin
  return now() + private.backoff_delay(p_attempts, 2, 3600);
end;
$$;

create or replace function private.whatsapp_check_phone(p_phone text, p_field text) returns void
language plpgsql
immutable
set search_path = ''
as $$
begin
  if p_phone is null or p_phone !~ '^\+[1-9][0-9]{6,14}$' then
    perform private.raise_error(400, 'invalid_phone_number',
      format('%s must be an E.164 phone number such as +250788123456', p_field),
      jsonb_build_object('field', p_field));
  end if;
end;
$$;

create or replace function private.whatsapp_payload_error(p_field text, p_reason text) returns void
language plpgsql
immutable
set search_path = ''
as $$
begin
  perform private.raise_error(400, 'invalid_payload',
    format('message_payload%s %s', case when p_field = '' then '' else '.' || p_field end, p_reason),
    jsonb_build_object('field', 'message_payload' || case when p_field = '' then '' else '.' || p_field end,
                       'reason', p_reason));
end;
$$;

-- A string member of p_obj of p_min..p_max characters, or null when absent and
-- optional; anything else is an invalid_payload error naming p_field.
create or replace function private.whatsapp_text_field(
  p_obj jsonb, p_key text, p_field text, p_min integer, p_max integer, p_required boolean default true
) returns text
language plpgsql
immutable
set search_path = ''
as $$
declare
  v_value text;
begin
  if p_obj is null or jsonb_typeof(p_obj) <> 'object' or not p_obj ? p_key
     or jsonb_typeof(p_obj -> p_key) = 'null' then
    if p_required then
      perform private.whatsapp_payload_error(p_field, 'is required');
    end if;
    return null;
  end if;
  if jsonb_typeof(p_obj -> p_key) <> 'string' then
    perform private.whatsapp_payload_error(p_field, 'must be a string');
  end if;
  v_value := p_obj ->> p_key;
  if char_length(v_value) < p_min or char_length(v_value) > p_max
     or (p_min > 0 and btrim(v_value) = '') then
    perform private.whatsapp_payload_error(p_field,
      format('must have %s to %s characters', p_min, p_max));
  end if;
  return v_value;
end;
$$;

-- Validates a payload against its message type and returns it in canonical
-- form: exactly the object the Cloud API expects under the message's type
-- (media carries its media_type beside it). Raises invalid_payload otherwise.
create or replace function private.whatsapp_validate_payload(p_type text, p_payload jsonb)
returns jsonb
language plpgsql
immutable
set search_path = ''
as $$
declare
  v_out jsonb;
  v_text text;
  v_lang jsonb;
  v_action jsonb;
  v_item jsonb;
  v_row jsonb;
  v_ids text[] := '{}';
  v_rows integer := 0;
  v_i integer := 0;
  v_j integer;
  v_media text;
  v_preview jsonb;
begin
  if p_type is null or p_type not in ('text', 'template', 'media', 'interactive', 'location') then
    perform private.raise_error(400, 'invalid_message_type',
      'message_type must be one of text, template, media, interactive, location',
      jsonb_build_object('field', 'message_type'));
  end if;
  if p_payload is null or jsonb_typeof(p_payload) <> 'object' then
    perform private.whatsapp_payload_error('', 'must be a JSON object');
  end if;
  if octet_length(p_payload::text) > 65536 then
    perform private.whatsapp_payload_error('', 'must be at most 64 KiB');
  end if;

  if p_type = 'text' then
    -- {"text": "Hello!"} (the spec's form), {"body": "..."} or {"text": {"body": "..."}}
    -- (the Cloud API's), with preview_url beside the text or, in the Cloud
    -- API's form, inside it
    if jsonb_typeof(p_payload -> 'text') = 'object' then
      v_text := private.whatsapp_text_field(p_payload -> 'text', 'body', 'text.body', 1, 4096);
      if p_payload -> 'text' ? 'preview_url' then
        v_preview := p_payload -> 'text' -> 'preview_url';
        if jsonb_typeof(v_preview) <> 'boolean' then
          perform private.whatsapp_payload_error('text.preview_url', 'must be a boolean');
        end if;
      end if;
    elsif p_payload ? 'text' then
      v_text := private.whatsapp_text_field(p_payload, 'text', 'text', 1, 4096);
    else
      v_text := private.whatsapp_text_field(p_payload, 'body', 'text', 1, 4096);
    end if;
    if p_payload ? 'preview_url' then
      if jsonb_typeof(p_payload -> 'preview_url') <> 'boolean' then
        perform private.whatsapp_payload_error('preview_url', 'must be a boolean');
      end if;
      -- given twice, a silent pick would send what one of them did not ask for
      if v_preview is not null and v_preview <> p_payload -> 'preview_url' then
        perform private.whatsapp_payload_error('preview_url', 'disagrees with text.preview_url');
      end if;
      v_preview := p_payload -> 'preview_url';
    end if;
    return jsonb_build_object('body', v_text, 'preview_url', coalesce(v_preview, 'false'::jsonb));

  elsif p_type = 'template' then
    v_text := private.whatsapp_text_field(p_payload, 'name', 'name', 1, 512);
    if v_text !~ '^[a-z0-9_]+$' then
      perform private.whatsapp_payload_error('name', 'must be lower-case letters, digits and underscores');
    end if;
    v_lang := case jsonb_typeof(p_payload -> 'language')
      when 'string' then p_payload -> 'language'
      when 'object' then p_payload -> 'language' -> 'code'
    end;
    if v_lang is null or jsonb_typeof(v_lang) <> 'string'
       or (v_lang #>> '{}') !~ '^[a-z]{2,3}(_[A-Za-z]{2,4})?$' then
      perform private.whatsapp_payload_error('language', 'must be a language code such as en or en_US');
    end if;
    v_out := jsonb_build_object('name', v_text, 'language', jsonb_build_object('code', v_lang #>> '{}'));
    if p_payload ? 'components' then
      if jsonb_typeof(p_payload -> 'components') <> 'array'
         or jsonb_array_length(p_payload -> 'components') > 10
         or exists (select from jsonb_array_elements(p_payload -> 'components') c
                    where jsonb_typeof(c) <> 'object' or jsonb_typeof(c -> 'type') is distinct from 'string') then
        perform private.whatsapp_payload_error('components', 'must be an array of at most 10 objects with a type');
      end if;
      v_out := v_out || jsonb_build_object('components', p_payload -> 'components');
    end if;
    return v_out;

  elsif p_type = 'media' then
    v_media := private.whatsapp_text_field(p_payload, 'media_type', 'media_type', 1, 16);
    if v_media not in ('image', 'video', 'audio', 'document', 'sticker') then
      perform private.whatsapp_payload_error('media_type', 'must be image, video, audio, document or sticker');
    end if;
    if (p_payload ? 'id') = (p_payload ? 'link') then
      perform private.whatsapp_payload_error('id', 'exactly one of id or link is required');
    end if;
    if p_payload ? 'id' then
      v_text := private.whatsapp_text_field(p_payload, 'id', 'id', 1, 256);
      if v_text !~ '^[A-Za-z0-9_.:-]+$' then
        perform private.whatsapp_payload_error('id', 'must be a media id');
      end if;
      v_out := jsonb_build_object('media_type', v_media, 'id', v_text);
    else
      v_text := private.whatsapp_text_field(p_payload, 'link', 'link', 8, 2048);
      if v_text !~ '^https?://[^[:space:]/]+[^[:space:]]*$' then
        perform private.whatsapp_payload_error('link', 'must be an http(s) URL');
      end if;
      v_out := jsonb_build_object('media_type', v_media, 'link', v_text);
    end if;
    v_text := private.whatsapp_text_field(p_payload, 'caption', 'caption', 0, 1024, false);
    if v_text is not null then
      if v_media not in ('image', 'video', 'document') then
        perform private.whatsapp_payload_error('caption', 'is allowed for image, video and document only');
      end if;
      v_out := v_out || jsonb_build_object('caption', v_text);
    end if;
    v_text := private.whatsapp_text_field(p_payload, 'filename', 'filename', 1, 240, false);
    if v_text is not null then
      if v_media <> 'document' then
        perform private.whatsapp_payload_error('filename', 'is allowed for documents only');
      end if;
      v_out := v_out || jsonb_build_object('filename', v_text);
    end if;
    return v_out;

  elsif p_type = 'interactive' then
    v_text := private.whatsapp_text_field(p_payload, 'type', 'type', 1, 16);
    if v_text not in ('button', 'list') then
      perform private.whatsapp_payload_error('type', 'must be button or list');
    end if;
    perform private.whatsapp_text_field(p_payload -> 'body', 'text', 'body.text', 1, 1024);
    if p_payload ? 'footer' then
      perform private.whatsapp_text_field(p_payload -> 'footer', 'text', 'footer.text', 1, 60);
    end if;
    if p_payload ? 'header' and jsonb_typeof(p_payload -> 'header') <> 'object' then
      perform private.whatsapp_payload_error('header', 'must be an object');
    end if;
    v_action := p_payload -> 'action';
    if v_action is null or jsonb_typeof(v_action) <> 'object' then
      perform private.whatsapp_payload_error('action', 'is required');
    end if;
    if v_text = 'button' then
      if jsonb_typeof(v_action -> 'buttons') is distinct from 'array'
         or jsonb_array_length(v_action -> 'buttons') not between 1 and 3 then
        perform private.whatsapp_payload_error('action.buttons', 'must have 1 to 3 buttons');
      end if;
      for v_item in select e from jsonb_array_elements(v_action -> 'buttons') e loop
        if v_item ->> 'type' is distinct from 'reply' then
          perform private.whatsapp_payload_error(format('action.buttons[%s].type', v_i), 'must be reply');
        end if;
        v_ids := v_ids || private.whatsapp_text_field(v_item -> 'reply', 'id',
          format('action.buttons[%s].reply.id', v_i), 1, 256);
        perform private.whatsapp_text_field(v_item -> 'reply', 'title',
          format('action.buttons[%s].reply.title', v_i), 1, 20);
        v_i := v_i + 1;
      end loop;
    else
      perform private.whatsapp_text_field(v_action, 'button', 'action.button', 1, 20);
      if jsonb_typeof(v_action -> 'sections') is distinct from 'array'
         or jsonb_array_length(v_action -> 'sections') not between 1 and 10 then
        perform private.whatsapp_payload_error('action.sections', 'must have 1 to 10 sections');
      end if;
      for v_item in select e from jsonb_array_elements(v_action -> 'sections') e loop
        perform private.whatsapp_text_field(v_item, 'title', format('action.sections[%s].title', v_i), 1, 24,
          jsonb_array_length(v_action -> 'sections') > 1);
        if jsonb_typeof(v_item -> 'rows') is distinct from 'array' or jsonb_array_length(v_item -> 'rows') < 1 then
          perform private.whatsapp_payload_error(format('action.sections[%s].rows', v_i), 'must have at least one row');
        end if;
        v_j := 0;
        for v_row in select e from jsonb_array_elements(v_item -> 'rows') e loop
          v_ids := v_ids || private.whatsapp_text_field(v_row, 'id',
            format('action.sections[%s].rows[%s].id', v_i, v_j), 1, 200);
          perform private.whatsapp_text_field(v_row, 'title',
            format('action.sections[%s].rows[%s].title', v_i, v_j), 1, 24);
          perform private.whatsapp_text_field(v_row, 'description',
            format('action.sections[%s].rows[%s].description', v_i, v_j), 1, 72, false);
          v_j := v_j + 1;
          v_rows := v_rows + 1;
        end loop;
        v_i := v_i + 1;
      end loop;
      if v_rows > 10 then
        perform private.whatsapp_payload_error('action.sections', 'may hold at most 10 rows in all');
      end if;
    end if;
    if (select count(distinct x) from unnest(v_ids) x) <> cardinality(v_ids) then
      perform private.whatsapp_payload_error('action', 'button and row ids must be unique');
    end if;
    return p_payload;

  else -- location
    if jsonb_typeof(p_payload -> 'latitude') is distinct from 'number'
       or (p_payload ->> 'latitude')::numeric not between -90 and 90 then
      perform private.whatsapp_payload_error('latitude', 'must be a number between -90 and 90');
    end if;
    if jsonb_typeof(p_payload -> 'longitude') is distinct from 'number'
       or (p_payload ->> 'longitude')::numeric not between -180 and 180 then
      perform private.whatsapp_payload_error('longitude', 'must be a number between -180 and 180');
    end if;
    v_out := jsonb_build_object('latitude', p_payload -> 'latitude', 'longitude', p_payload -> 'longitude');
    v_text := private.whatsapp_text_field(p_payload, 'name', 'name', 1, 1000, false);
    if v_text is not null then
      v_out := v_out || jsonb_build_object('name', v_text);
    end if;
    v_text := private.whatsapp_text_field(p_payload, 'address', 'address', 1, 1000, false);
    if v_text is not null then
      v_out := v_out || jsonb_build_object('address', v_text);
    end if;
    return v_out;
  end if;
end;
$$;

-- -----------------------------------------------------------------------------
-- whatsapp_sessions
-- -----------------------------------------------------------------------------
create table public.whatsapp_sessions (
  id uuid primary key default gen_random_uuid(),
  phone_number text not null unique check (phone_number ~ '^\+[1-9][0-9]{6,14}$'),
  status text not null default 'active'
    check (status in ('active', 'inactive', 'suspended', 'expired')),
  display_name text check (char_length(display_name) <= 256),
  last_activity_at timestamptz not null default now(),
  -- The user's last message: Meta's 24-hour customer-service window starts here.
  last_inbound_at timestamptz,
  message_count bigint not null default 0 check (message_count >= 0),
  error_count bigint not null default 0 check (error_count >= 0),
  last_error text check (char_length(last_error) <= 2000),
  last_error_at timestamptz,
  -- End of the customer-service window (last_inbound_at + 24 h).
  expires_at timestamptz,
  metadata jsonb not null default '{}'::jsonb check (jsonb_typeof(metadata) = 'object'),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

create index whatsapp_sessions_activity_idx on public.whatsapp_sessions (last_activity_at desc);

create trigger whatsapp_sessions_updated_at before update on public.whatsapp_sessions
  for each row execute function private.set_updated_at();

alter table public.whatsapp_sessions enable row level security;

-- The service role too: Supabase's default privileges give it every right
-- (TRUNCATE included) and it passes RLS, so the grants are all that limit it.
revoke all on public.whatsapp_sessions from anon, authenticated, service_role;
grant select on public.whatsapp_sessions to authenticated;
grant select, insert, update, delete on public.whatsapp_sessions to service_role;

create policy whatsapp_sessions_user_select on public.whatsapp_sessions
  for select to authenticated using (phone_number = (select private.whatsapp_jwt_phone()));
create policy whatsapp_sessions_service_all on public.whatsapp_sessions
  for all to service_role using (true) with check (true);

-- Tokens and secrets of a session live apart, readable by service_role only.
create table public.whatsapp_session_secrets (
  session_id uuid primary key references public.whatsapp_sessions (id) on delete cascade,
  session_token text not null check (char_length(session_token) between 16 and 512),
  expires_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

create trigger whatsapp_session_secrets_updated_at before update on public.whatsapp_session_secrets
  for each row execute function private.set_updated_at();

alter table public.whatsapp_session_secrets enable row level security;

revoke all on public.whatsapp_session_secrets from anon, authenticated, service_role;
grant select, insert, update, delete on public.whatsapp_session_secrets to service_role;

create policy whatsapp_session_secrets_service_all on public.whatsapp_session_secrets
  for all to service_role using (true) with check (true);

-- -----------------------------------------------------------------------------
-- Inbound messages: partitioned by month; once per wamid across partitions
-- (Meta delivers at least once and retries for days).
-- -----------------------------------------------------------------------------
create table public.whatsapp_inbound_wamids (
  wamid text primary key check (char_length(wamid) between 1 and 256),
  received_at timestamptz not null default now()
);

alter table public.whatsapp_inbound_wamids enable row level security;

revoke all on public.whatsapp_inbound_wamids from anon, authenticated, service_role;
grant select, insert on public.whatsapp_inbound_wamids to service_role;

create policy whatsapp_inbound_wamids_service_all on public.whatsapp_inbound_wamids
  for all to service_role using (true) with check (true);

create table public.whatsapp_inbound_messages (
  id bigserial not null,
  wamid text not null check (char_length(wamid) between 1 and 256),
  from_phone text not null check (from_phone ~ '^\+[1-9][0-9]{6,14}$'),
  phone_number_id text check (char_length(phone_number_id) <= 64),
  message_type text not null check (char_length(message_type) between 1 and 32 and message_type ~ '^[a-z_]+$'),
  text_body text check (char_length(text_body) <= 8192),
  payload jsonb not null check (jsonb_typeof(payload) = 'object'),
  context_wamid text check (char_length(context_wamid) <= 256),
  sent_at timestamptz not null,
  correlation_id text check (char_length(correlation_id) <= 128),
  created_at timestamptz not null default now(),
  primary key (id, created_at)
) partition by range (created_at);

create index whatsapp_inbound_messages_from_idx
  on public.whatsapp_inbound_messages (from_phone, created_at desc);
create index whatsapp_inbound_messages_wamid_idx on public.whatsapp_inbound_messages (wamid);

select private.register_partitioned_table('public', 'whatsapp_inbound_messages', 3, null);

alter table public.whatsapp_inbound_messages enable row level security;

revoke all on public.whatsapp_inbound_messages from anon, authenticated, service_role;
revoke all on sequence public.whatsapp_inbound_messages_id_seq from anon, authenticated, service_role;
grant select on public.whatsapp_inbound_messages to authenticated;
grant select, insert on public.whatsapp_inbound_messages to service_role;
grant usage on sequence public.whatsapp_inbound_messages_id_seq to service_role;

create policy whatsapp_inbound_messages_user_select on public.whatsapp_inbound_messages
  for select to authenticated using (from_phone = (select private.whatsapp_jwt_phone()));
create policy whatsapp_inbound_messages_service_select on public.whatsapp_inbound_messages
  for select to service_role using (true);
create policy whatsapp_inbound_messages_service_insert on public.whatsapp_inbound_messages
  for insert to service_role with check (true);

-- -----------------------------------------------------------------------------
-- Status events of outbound messages, one per (wamid, status). Kept even when
-- the event arrives before the dispatcher has recorded the wamid, so the send
-- can pick it up.
-- -----------------------------------------------------------------------------
create table public.whatsapp_message_statuses (
  wamid text not null check (char_length(wamid) between 1 and 256),
  status text not null check (status in ('sent', 'delivered', 'read', 'failed')),
  occurred_at timestamptz not null,
  recipient_phone text check (recipient_phone ~ '^\+[1-9][0-9]{6,14}$'),
  error_code text check (char_length(error_code) <= 64),
  error_message text check (char_length(error_message) <= 2000),
  created_at timestamptz not null default now(),
  primary key (wamid, status)
);

alter table public.whatsapp_message_statuses enable row level security;

revoke all on public.whatsapp_message_statuses from anon, authenticated, service_role;
grant select, insert on public.whatsapp_message_statuses to service_role;

create policy whatsapp_message_statuses_service_all on public.whatsapp_message_statuses
  for all to service_role using (true) with check (true);

-- -----------------------------------------------------------------------------
-- whatsapp_message_queue
-- -----------------------------------------------------------------------------
create table public.whatsapp_message_queue (
  id bigint generated always as identity primary key,
  recipient_phone text not null check (recipient_phone ~ '^\+[1-9][0-9]{6,14}$'),
  message_type text not null
    check (message_type in ('text', 'template', 'media', 'interactive', 'location')),
  message_payload jsonb not null check (jsonb_typeof(message_payload) = 'object'),
  priority smallint not null default 5 check (priority between 1 and 10),
  scheduled_at timestamptz not null default now(),
  -- Pending: the earliest next attempt (scheduled_at, then moved by backoff).
  -- Processing: when the lease ends.
  visible_at timestamptz not null default now(),
  attempts integer not null default 0 check (attempts >= 0),
  max_attempts integer not null default 5 check (max_attempts between 1 and 50),
  status text not null default 'pending' check (status in
    ('pending', 'processing', 'sent', 'delivered', 'read', 'failed', 'cancelled')),
  wamid text check (char_length(wamid) between 1 and 256),
  error_code text check (char_length(error_code) <= 64),
  last_error text check (char_length(last_error) <= 4000),
  correlation_id text check (char_length(correlation_id) <= 128),
  idempotency_key text check (char_length(idempotency_key) between 1 and 256),
  metadata jsonb not null default '{}'::jsonb check (jsonb_typeof(metadata) = 'object'),
  lease_token uuid,
  locked_by text check (char_length(locked_by) <= 128),
  locked_at timestamptz,
  finished_at timestamptz,
  sent_at timestamptz,
  delivered_at timestamptz,
  read_at timestamptz,
  failed_at timestamptz,
  cancelled_at timestamptz,
  dead_lettered_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  check (status <> 'processing' or lease_token is not null)
);

create unique index whatsapp_message_queue_idempotency_key_idx
  on public.whatsapp_message_queue (idempotency_key) where idempotency_key is not null;
create unique index whatsapp_message_queue_wamid_idx
  on public.whatsapp_message_queue (wamid) where wamid is not null;
-- claim order: within a priority, rows not yet due (scheduled for later, or
-- backing off) sort after the due ones, so a claim does not walk them
create index whatsapp_message_queue_pending_idx
  on public.whatsapp_message_queue (priority desc, visible_at, id) where status = 'pending';
-- head of line per recipient
create index whatsapp_message_queue_recipient_active_idx
  on public.whatsapp_message_queue (recipient_phone, priority desc, id)
  where status in ('pending', 'processing');
-- lease expiry
create index whatsapp_message_queue_lease_idx
  on public.whatsapp_message_queue (visible_at) where status = 'processing';
create index whatsapp_message_queue_recipient_idx
  on public.whatsapp_message_queue (recipient_phone, created_at desc);
create index whatsapp_message_queue_correlation_idx
  on public.whatsapp_message_queue (correlation_id) where correlation_id is not null;
-- metrics count failed and dead-lettered (failed, and terminal) messages on
-- every scrape, and the queue keeps its history: without it, two scans of the
-- whole table each time
create index whatsapp_message_queue_failed_idx
  on public.whatsapp_message_queue (id) where status = 'failed';

create trigger whatsapp_message_queue_updated_at before update on public.whatsapp_message_queue
  for each row execute function private.set_updated_at();

alter table public.whatsapp_message_queue enable row level security;

revoke all on public.whatsapp_message_queue from anon, authenticated, service_role;
grant select on public.whatsapp_message_queue to authenticated;
grant select, insert, update, delete on public.whatsapp_message_queue to service_role;
-- enqueue (security invoker) takes ids as the service role; nobody else
-- touches the sequence (setval would make new ids collide with old ones)
revoke all on sequence public.whatsapp_message_queue_id_seq from anon, authenticated, service_role;
grant usage on sequence public.whatsapp_message_queue_id_seq to service_role;

create policy whatsapp_message_queue_user_select on public.whatsapp_message_queue
  for select to authenticated using (recipient_phone = (select private.whatsapp_jwt_phone()));
create policy whatsapp_message_queue_service_all on public.whatsapp_message_queue
  for all to service_role using (true) with check (true);

-- -----------------------------------------------------------------------------
-- Rate limiter state, shared by every dispatcher (private; reached only via
-- the claim function).
--
-- Throughput per business number is paced, not bursted: each claimed message
-- gets a send slot 1/rate apart, starting at next_slot_at, and a claim hands
-- out only the slots that fall within a short lookahead. No burst credit is
-- kept while idle, so the rate is never exceeded in any window. The row lock
-- on a business number's window serialises its claimers.
-- -----------------------------------------------------------------------------
create table private.whatsapp_send_windows (
  business_number text primary key check (char_length(business_number) between 1 and 64),
  next_slot_at timestamptz not null default '-infinity',
  paused_until timestamptz,
  pause_reason text,
  updated_at timestamptz not null default now()
);
alter table private.whatsapp_send_windows enable row level security;

-- Meta's pair limit: about one message per 6 s from a business number to one user.
create table private.whatsapp_pair_pacing (
  business_number text not null,
  recipient_phone text not null,
  next_allowed_at timestamptz not null,
  primary key (business_number, recipient_phone)
);
alter table private.whatsapp_pair_pacing enable row level security;

-- -----------------------------------------------------------------------------
-- Lease expiry on the generic lease functions (installed for this table by
-- 20260401140500_whatsapp_leases.sql):
-- messages whose lease ended (their dispatcher died or hung) go back to
-- pending, or to failed once their attempts are used up. The WhatsApp part:
-- the error code, the dead-letter time and a metric per message with its
-- correlation id. Returns the metrics to record.
-- -----------------------------------------------------------------------------
create or replace function private.whatsapp_expire_leases()
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_ids bigint[];
  v_metrics jsonb;
begin
  v_ids := private.whatsapp_message_queue_lease_expire('failed', 0,
    'the dispatcher holding this message stopped before finishing it');
  if cardinality(v_ids) = 0 then
    return '[]'::jsonb;
  end if;

  with expired as (
    update public.whatsapp_message_queue q set
      error_code = 'lease_expired',
      failed_at = case when q.status = 'failed' then now() end,
      dead_lettered_at = case when q.status = 'failed' then now() end
    where q.id = any(v_ids) and q.status in ('pending', 'failed')
    returning q.id, q.status, q.attempts, q.correlation_id
  )
  select coalesce(jsonb_agg(jsonb_build_object(
    'service_name', 'whatsapp', 'metric_type', 'counter',
    'metric_name', case when e.status = 'failed' then 'whatsapp.message.dead_letter'
                        else 'whatsapp.message.retry' end,
    'value', 1,
    'tags', jsonb_build_object('message_id', e.id, 'attempt', e.attempts, 'error_code', 'lease_expired'),
    'correlation_id', e.correlation_id)), '[]'::jsonb)
  into v_metrics
  from expired e;
  return v_metrics;
end;
$$;

-- -----------------------------------------------------------------------------
-- enqueue_whatsapp_message
--
-- Validates everything first, so bad input raises a stable code and writes
-- nothing. An idempotency key returns the original message when the request
-- is the same, and 409 idempotency_key_conflict when it differs.
-- -----------------------------------------------------------------------------
create or replace function public.enqueue_whatsapp_message(
  p_recipient_phone text,
  p_message_type text,
  p_message_payload jsonb,
  p_priority integer default 5,
  p_scheduled_at timestamptz default null,
  p_max_attempts integer default 5,
  p_correlation_id text default null,
  p_idempotency_key text default null,
  p_metadata jsonb default '{}'::jsonb
) returns bigint
language plpgsql
set search_path = ''
as $$
declare
  v_payload jsonb;
  v_id bigint;
  v_existing public.whatsapp_message_queue;
begin
  perform private.whatsapp_check_phone(p_recipient_phone, 'recipient_phone');
  v_payload := private.whatsapp_validate_payload(p_message_type, p_message_payload);
  if p_priority is null or p_priority not between 1 and 10 then
    perform private.raise_error(400, 'invalid_priority', 'priority must be between 1 and 10',
      jsonb_build_object('field', 'priority'));
  end if;
  if p_max_attempts is null or p_max_attempts not between 1 and 50 then
    perform private.raise_error(400, 'invalid_max_attempts', 'max_attempts must be between 1 and 50',
      jsonb_build_object('field', 'max_attempts'));
  end if;
  if p_idempotency_key is not null and char_length(p_idempotency_key) not between 1 and 256 then
    perform private.raise_error(400, 'invalid_idempotency_key', 'the idempotency key must have 1 to 256 characters',
      jsonb_build_object('field', 'idempotency_key'));
  end if;
  if p_metadata is not null and jsonb_typeof(p_metadata) <> 'object' then
    perform private.raise_error(400, 'invalid_metadata', 'metadata must be a JSON object',
      jsonb_build_object('field', 'metadata'));
  end if;
  if p_correlation_id is not null and char_length(p_correlation_id) > 128 then
    perform private.raise_error(400, 'invalid_correlation_id', 'correlation_id must have at most 128 characters',
      jsonb_build_object('field', 'correlation_id'));
  end if;

  insert into public.whatsapp_message_queue (
    recipient_phone, message_type, message_payload, priority, scheduled_at, visible_at,
    max_attempts, correlation_id, idempotency_key, metadata
  ) values (
    p_recipient_phone, p_message_type, v_payload, p_priority, coalesce(p_scheduled_at, now()),
    coalesce(p_scheduled_at, now()), p_max_attempts,
    coalesce(p_correlation_id, nullif(current_setting('request.correlation_id', true), '')),
    p_idempotency_key, coalesce(p_metadata, '{}'::jsonb)
  )
  on conflict (idempotency_key) where idempotency_key is not null do nothing
  returning id into v_id;

  if v_id is not null then
    return v_id;
  end if;

  select * into v_existing from public.whatsapp_message_queue where idempotency_key = p_idempotency_key;
  if v_existing.recipient_phone is distinct from p_recipient_phone
     or v_existing.message_type is distinct from p_message_type
     or v_existing.message_payload is distinct from v_payload
     or v_existing.priority is distinct from p_priority::smallint
     or v_existing.max_attempts is distinct from p_max_attempts
     or v_existing.metadata is distinct from coalesce(p_metadata, '{}'::jsonb)
     or (p_scheduled_at is not null and v_existing.scheduled_at is distinct from p_scheduled_at) then
    perform private.raise_error(409, 'idempotency_key_conflict',
      'this idempotency key was already used for a different message',
      jsonb_build_object('message_id', v_existing.id));
  end if;
  return v_existing.id;
end;
$$;

-- -----------------------------------------------------------------------------
-- update_whatsapp_session_activity: creates the session on first sight.
-- p_inbound_at marks a message from the user (opens the 24-hour window).
-- -----------------------------------------------------------------------------
create or replace function public.update_whatsapp_session_activity(
  p_phone_number text,
  p_increment_message_count boolean default false,
  p_inbound_at timestamptz default null,
  p_error text default null,
  p_display_name text default null,
  p_metadata jsonb default null
) returns uuid
language plpgsql
set search_path = ''
as $$
declare
  v_id uuid;
  -- least() skips nulls: no inbound time means no inbound message
  v_inbound timestamptz := case when p_inbound_at is not null then least(p_inbound_at, now()) end;
begin
  perform private.whatsapp_check_phone(p_phone_number, 'phone_number');
  if p_metadata is not null and jsonb_typeof(p_metadata) <> 'object' then
    perform private.raise_error(400, 'invalid_metadata', 'metadata must be a JSON object',
      jsonb_build_object('field', 'metadata'));
  end if;

  insert into public.whatsapp_sessions as s (
    phone_number, display_name, last_activity_at, last_inbound_at, expires_at, message_count,
    error_count, last_error, last_error_at, metadata
  ) values (
    p_phone_number, left(p_display_name, 256), now(), v_inbound, v_inbound + interval '24 hours',
    case when coalesce(p_increment_message_count, false) then 1 else 0 end,
    case when p_error is null then 0 else 1 end, left(p_error, 2000),
    case when p_error is not null then now() end, coalesce(p_metadata, '{}'::jsonb)
  )
  on conflict (phone_number) do update set
    display_name = coalesce(left(p_display_name, 256), s.display_name),
    last_activity_at = now(),
    last_inbound_at = greatest(s.last_inbound_at, v_inbound),
    expires_at = coalesce(greatest(s.last_inbound_at, v_inbound) + interval '24 hours', s.expires_at),
    status = case when v_inbound is not null and s.status in ('inactive', 'expired') then 'active'
                  else s.status end,
    message_count = s.message_count + case when coalesce(p_increment_message_count, false) then 1 else 0 end,
    error_count = s.error_count + case when p_error is null then 0 else 1 end,
    last_error = coalesce(left(p_error, 2000), s.last_error),
    last_error_at = case when p_error is not null then now() else s.last_error_at end,
    metadata = s.metadata || coalesce(p_metadata, '{}'::jsonb)
  returning id into v_id;
  return v_id;
end;
$$;

-- Locks the session rows of p_phones in one statement, in phone order, and
-- makes the missing ones (empty: the caller's statements fill them as they
-- would have made them). The ingest and the record of sends each write
-- several sessions over several statements, each in phone order; taken that
-- way, two calls could take two sessions in opposite orders (a deadlock), so
-- both take all of theirs here first. The update that does nothing only locks.
create or replace function private.lock_whatsapp_sessions(p_phones text[])
returns void
language sql
set search_path = ''
as $$
  insert into public.whatsapp_sessions (phone_number)
  select distinct p.phone from unnest(p_phones) p(phone)
  where p.phone is not null
  order by p.phone
  on conflict (phone_number) do update set phone_number = excluded.phone_number where false;
$$;

-- run as its callers' role (the service role's ingest and record of sends)
revoke all on function private.lock_whatsapp_sessions(text[]) from public, anon, authenticated;
grant execute on function private.lock_whatsapp_sessions(text[]) to service_role;

-- -----------------------------------------------------------------------------
-- ingest_whatsapp_events: one verified webhook delivery, already flattened by
-- the webhook function, applied in one transaction.
--
--   p_messages  [{wamid, from_phone, message_type, sent_at, phone_number_id,
--                 text_body, context_wamid, payload}]
--   p_statuses  [{wamid, status, occurred_at, recipient_phone, error_code,
--                 error_message}]
--   p_contacts  [{phone, display_name}]
--   p_errors    [{code, title, details}]  (recorded as metrics)
--
-- Inbound messages are stored once per wamid and update the sender's session
-- once; statuses move queue rows forward only.
--
-- At most 5,000 items a call, the four arrays together, so one statement's
-- cost stays bounded. The webhook stores a larger delivery in several calls,
-- each its own transaction, and answers 200 only once all are stored: a call
-- that fails leaves those before it committed, and Meta's retry of the whole
-- delivery repeats them. That is safe because a call applied twice changes
-- nothing the second time: a message is stored only if its wamid is new
-- (whatsapp_inbound_wamids), and only a stored one counts on its sender's
-- session; a status is kept once per (wamid, status) and moves a queue row
-- only forward (read, delivered and sent never go back; failed only from
-- processing or sent; one that put the message back cleared its wamid, so
-- it matches no row again); a contact sets the display name it set before
-- (a later delivery's name is set back, as by any replay of an old one).
-- Only the whatsapp.webhook.error metrics of p_errors are counted again, as
-- for any delivery Meta sends twice. A webhook keeps a message's statuses in
-- one call, so the furthest of them wins as it would in a single call.
-- -----------------------------------------------------------------------------
create or replace function public.ingest_whatsapp_events(
  p_messages jsonb default '[]'::jsonb,
  p_statuses jsonb default '[]'::jsonb,
  p_contacts jsonb default '[]'::jsonb,
  p_errors jsonb default '[]'::jsonb,
  p_correlation_id text default null
) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_stored integer := 0;
  v_received integer;
  v_applied integer := 0;
  v_metrics jsonb;
  v_bad text;
begin
  if jsonb_typeof(coalesce(p_messages, '[]')) <> 'array' or jsonb_typeof(coalesce(p_statuses, '[]')) <> 'array'
     or jsonb_typeof(coalesce(p_contacts, '[]')) <> 'array' or jsonb_typeof(coalesce(p_errors, '[]')) <> 'array' then
    perform private.raise_error(400, 'invalid_events', 'messages, statuses, contacts and errors must be arrays');
  end if;
  if jsonb_array_length(coalesce(p_messages, '[]')) + jsonb_array_length(coalesce(p_statuses, '[]'))
     + jsonb_array_length(coalesce(p_contacts, '[]')) + jsonb_array_length(coalesce(p_errors, '[]')) > 5000 then
    perform private.raise_error(413, 'too_many_events',
      'at most 5000 messages, statuses, contacts and errors per call');
  end if;

  select e ->> 'from_phone' into v_bad
  from jsonb_array_elements(coalesce(p_messages, '[]')) e
  where coalesce(e ->> 'from_phone', '') !~ '^\+[1-9][0-9]{6,14}$'
     or coalesce(e ->> 'wamid', '') = '' or coalesce(e ->> 'message_type', '') = ''
     or jsonb_typeof(e -> 'payload') is distinct from 'object'
  limit 1;
  if found then
    perform private.raise_error(400, 'invalid_events', 'an inbound message lacks a wamid, sender, type or payload');
  end if;

  -- The statuses' wamid locks (see the statuses below) come first, before any
  -- session row: complete_whatsapp_messages takes its wamids' locks and then
  -- its recipients' sessions, and a delivery with a message from a user and a
  -- status of a send to them, taking them the other way round, would deadlock
  -- with the record of that send.
  perform private.lock_key_buckets('whatsapp/wamid', array(
    select x ->> 'wamid' from jsonb_array_elements(coalesce(p_statuses, '[]')) x));

  -- every session row this call may write, its contacts' and its senders'
  -- (of duplicates too), first (see lock_whatsapp_sessions)
  perform private.lock_whatsapp_sessions(array(
    select x.phone from jsonb_to_recordset(coalesce(p_contacts, '[]')) as x(phone text, display_name text)
    where x.phone ~ '^\+[1-9][0-9]{6,14}$' and x.display_name is not null
    union
    select m ->> 'from_phone' from jsonb_array_elements(coalesce(p_messages, '[]')) m));

  -- contacts: the sender's profile name
  with c as (
    select distinct on (x.phone) x.phone, left(x.display_name, 256) as display_name
    from jsonb_to_recordset(coalesce(p_contacts, '[]')) as x(phone text, display_name text)
    where x.phone ~ '^\+[1-9][0-9]{6,14}$' and x.display_name is not null
    order by x.phone
  )
  insert into public.whatsapp_sessions as s (phone_number, display_name)
  select c.phone, c.display_name from c order by c.phone
  on conflict (phone_number) do update set display_name = excluded.display_name
  where s.display_name is distinct from excluded.display_name;

  -- inbound messages, once per wamid
  select count(*) into v_received from jsonb_array_elements(coalesce(p_messages, '[]'));
  with incoming as (
    select distinct on (m.wamid) m.*
    from jsonb_to_recordset(coalesce(p_messages, '[]')) as m(
      wamid text, from_phone text, message_type text, sent_at timestamptz, phone_number_id text,
      text_body text, context_wamid text, payload jsonb)
    order by m.wamid
  ), fresh as (
    insert into public.whatsapp_inbound_wamids (wamid)
    select i.wamid from incoming i order by i.wamid
    on conflict (wamid) do nothing
    returning wamid
  ), stored as (
    insert into public.whatsapp_inbound_messages (
      wamid, from_phone, phone_number_id, message_type, text_body, payload, context_wamid,
      sent_at, correlation_id)
    select i.wamid, i.from_phone, i.phone_number_id, i.message_type, left(i.text_body, 8192), i.payload,
           i.context_wamid, least(coalesce(i.sent_at, now()), now()), p_correlation_id
    from incoming i join fresh f on f.wamid = i.wamid
    returning from_phone, sent_at
  ), per_sender as (
    select s.from_phone, count(*) as n, max(s.sent_at) as last_at from stored s group by s.from_phone
  ), sessions as (
    insert into public.whatsapp_sessions as s (
      phone_number, last_activity_at, last_inbound_at, expires_at, message_count)
    select p.from_phone, now(), p.last_at, p.last_at + interval '24 hours', p.n
    from per_sender p order by p.from_phone
    on conflict (phone_number) do update set
      last_activity_at = now(),
      last_inbound_at = greatest(s.last_inbound_at, excluded.last_inbound_at),
      expires_at = greatest(s.last_inbound_at, excluded.last_inbound_at) + interval '24 hours',
      status = case when s.status in ('inactive', 'expired') then 'active' else s.status end,
      message_count = s.message_count + excluded.message_count
    returning 1
  )
  select coalesce(sum(p.n), 0) into v_stored from per_sender p;

  -- statuses: every event kept once; queue rows move forward only. A status
  -- and the dispatcher's record of its send (Meta reports within a second)
  -- each look for the other's row, and two overlapping transactions would
  -- each miss the other's, leaving a failed message shown as sent: both hold
  -- their wamids' locks (taken above) before they look, so whichever commits
  -- second sees the first.
  with incoming as (
    select x.* from jsonb_to_recordset(coalesce(p_statuses, '[]')) as x(
      wamid text, status text, occurred_at timestamptz, recipient_phone text, error_code text,
      error_message text)
    where x.status in ('sent', 'delivered', 'read', 'failed') and coalesce(x.wamid, '') <> ''
  ), kept as (
    insert into public.whatsapp_message_statuses (
      wamid, status, occurred_at, recipient_phone, error_code, error_message)
    select distinct on (i.wamid, i.status) i.wamid, i.status, coalesce(i.occurred_at, now()),
      case when i.recipient_phone ~ '^\+[1-9][0-9]{6,14}$' then i.recipient_phone end,
      left(i.error_code, 64), left(i.error_message, 2000)
    from incoming i
    order by i.wamid, i.status
    on conflict (wamid, status) do nothing
  ), best as (
    -- A failure Meta reports later for throttling (the pair limit, 131056,
    -- mostly arrives this way) or a transient fault is retried like one the
    -- send got back: pending again after a backoff, as an attempt, without
    -- the wamid of the send that failed; out of attempts it is final.
    select distinct on (i.wamid) i.*,
           i.status = 'failed' and exists (
             select from public.whatsapp_message_queue r
             where r.wamid = i.wamid
               and private.whatsapp_status_requeues(i.status, i.error_code, r.attempts,
                                                    r.max_attempts)) as requeue
    from incoming i
    order by i.wamid, case i.status when 'read' then 4 when 'delivered' then 3 when 'failed' then 2.5 else 2 end desc
  ), moved as (
    update public.whatsapp_message_queue q set
      status = case when b.requeue then 'pending' else b.status end,
      wamid = case when b.requeue then null else q.wamid end,
      visible_at = case when b.requeue then private.whatsapp_requeue_at(q.attempts)
                        else q.visible_at end,
      sent_at = case when b.requeue then null else coalesce(q.sent_at, b.occurred_at) end,
      finished_at = case when b.requeue then null else q.finished_at end,
      delivered_at = case when b.status in ('delivered', 'read') then coalesce(q.delivered_at, b.occurred_at)
                          else q.delivered_at end,
      read_at = case when b.status = 'read' then coalesce(q.read_at, b.occurred_at) else q.read_at end,
      failed_at = case when b.status = 'failed' and not b.requeue
                       then coalesce(b.occurred_at, now()) else q.failed_at end,
      error_code = case when b.status = 'failed' then left(b.error_code, 64) else q.error_code end,
      last_error = case when b.status = 'failed' then left(b.error_message, 2000) else q.last_error end
    from best b
    where q.wamid = b.wamid
      and ((b.status in ('sent', 'delivered', 'read') and q.status in ('processing', 'sent', 'delivered')
            and private.whatsapp_status_rank(q.status) < private.whatsapp_status_rank(b.status))
        or (b.status = 'failed' and q.status in ('processing', 'sent')))
    returning q.id, q.status, q.recipient_phone, q.correlation_id, q.error_code, q.attempts
  )
  select count(*),
         coalesce(jsonb_agg(jsonb_build_object(
           'service_name', 'whatsapp', 'metric_type', 'counter',
           'metric_name', case when m.status = 'failed' then 'whatsapp.message.failed'
                               else 'whatsapp.message.retry' end,
           'value', 1, 'tags', jsonb_build_object('message_id', m.id, 'error_code', m.error_code,
                                                  'source', 'webhook', 'attempt', m.attempts),
           'correlation_id', m.correlation_id)) filter (where m.status in ('failed', 'pending')),
           '[]'::jsonb)
  into v_applied, v_metrics
  from moved m;

  -- errors Meta reports about the business number (entry.changes.value.errors)
  select v_metrics || coalesce(jsonb_agg(jsonb_build_object(
    'service_name', 'whatsapp', 'metric_type', 'counter', 'metric_name', 'whatsapp.webhook.error',
    'value', 1, 'tags', jsonb_build_object('error_code', left(e ->> 'code', 64), 'title', left(e ->> 'title', 200))))
    , '[]'::jsonb)
  into v_metrics
  from jsonb_array_elements(coalesce(p_errors, '[]')) e
  where jsonb_typeof(e) = 'object';

  if jsonb_array_length(v_metrics) > 0 then
    perform public.record_metrics(v_metrics, p_correlation_id);
  end if;

  return jsonb_build_object(
    'messages_received', v_received,
    'messages_stored', v_stored,
    'duplicates', v_received - v_stored,
    'statuses_received', jsonb_array_length(coalesce(p_statuses, '[]')),
    'statuses_applied', v_applied);
end;
$$;

-- -----------------------------------------------------------------------------
-- claim_whatsapp_messages: the dispatcher's claim.
--
-- Under the business number's window lock: recovers expired leases, pauses
-- while a token problem is unresolved, fails free-form messages whose 24-hour
-- window is closed, then claims due head-of-line messages (one per recipient,
-- none whose recipient is paced; by priority, then the longest due first) for
-- the send slots inside the lookahead. Each message comes with its slot
-- (slot_ms, epoch ms). Returns {messages, now_ms, wait_ms, paused,
-- pause_reason, next_due_ms}.
-- -----------------------------------------------------------------------------
create or replace function public.claim_whatsapp_messages(
  p_dispatcher_id text,
  p_business_number text,
  p_limit integer default 100,
  p_rate_per_second integer default 80,
  p_pair_interval_ms integer default 6000,
  p_lease_seconds integer default 60,
  p_lookahead_ms integer default 250
) returns jsonb
language plpgsql
security definer
set search_path = ''
-- The claim must walk the pending index in (priority, visible_at, id) order
-- and stop at the limit, and probe private.whatsapp_pair_pacing by its primary
-- key. When the statistics are young (a burst right after a quiet period) the
-- planner otherwise bitmap-scans and sorts the whole backlog, or reads the
-- whole pacing table once per candidate message (which every send grows):
-- either turns a millisecond claim into over a hundred, leaving send slots
-- unfilled.
-- Every table the claim reads has the index it needs.
set enable_bitmapscan = off
set enable_seqscan = off
as $$
declare
  v_window private.whatsapp_send_windows;
  v_now timestamptz;
  v_step interval;
  v_lookahead_ms numeric;
  v_base timestamptz;
  v_horizon timestamptz;
  v_allowed integer;
  v_count integer;
  v_messages jsonb;
  v_metrics jsonb;
  v_next_due double precision;
  v_ids bigint[];
  v_closed boolean[];
  v_send_ids bigint[];
begin
  if coalesce(p_dispatcher_id, '') = '' or char_length(p_dispatcher_id) > 128 then
    perform private.raise_error(400, 'invalid_dispatcher_id', 'dispatcher_id must have 1 to 128 characters');
  end if;
  if coalesce(p_business_number, '') = '' or char_length(p_business_number) > 64 then
    perform private.raise_error(400, 'invalid_business_number', 'business_number must have 1 to 64 characters');
  end if;
  if p_rate_per_second is null or p_rate_per_second not between 1 and 1000 then
    perform private.raise_error(400, 'invalid_rate_limit', 'rate_per_second must be between 1 and 1000');
  end if;
  perform private.check_limit(p_limit, 1000);
  if p_pair_interval_ms is null or p_pair_interval_ms not between 0 and 600000
     or p_lease_seconds is null or p_lease_seconds not between 1 and 3600
     or p_lookahead_ms is null or p_lookahead_ms not between 1 and 10000 then
    perform private.raise_error(400, 'invalid_dispatch_settings',
      'pair_interval_ms 0..600000, lease_seconds 1..3600, lookahead_ms 1..10000');
  end if;

  insert into private.whatsapp_send_windows (business_number) values (p_business_number)
  on conflict (business_number) do nothing;
  select * into v_window from private.whatsapp_send_windows
  where business_number = p_business_number for update;

  v_now := clock_timestamp();
  v_step := make_interval(secs => 1.0 / p_rate_per_second);
  -- At least one slot: a lookahead shorter than the gap between slots (a low
  -- rate limit) would otherwise never let a claim hand out anything.
  v_lookahead_ms := greatest(p_lookahead_ms, 1000.0 / p_rate_per_second);

  v_metrics := private.whatsapp_expire_leases();

  if v_window.paused_until > v_now then
    if jsonb_array_length(v_metrics) > 0 then
      perform public.record_metrics(v_metrics);
    end if;
    return jsonb_build_object('messages', '[]'::jsonb, 'paused', true, 'pause_reason', v_window.pause_reason,
      'wait_ms', ceil(extract(epoch from v_window.paused_until - v_now) * 1000), 'next_due_ms', null);
  end if;

  v_base := greatest(v_window.next_slot_at, v_now);
  v_horizon := v_now + make_interval(secs => v_lookahead_ms / 1000.0);
  v_allowed := least(p_limit, floor(extract(epoch from v_horizon - v_base) * p_rate_per_second)::integer);
  if v_allowed < 1 then
    if jsonb_array_length(v_metrics) > 0 then
      perform public.record_metrics(v_metrics);
    end if;
    return jsonb_build_object('messages', '[]'::jsonb, 'paused', false, 'pause_reason', null,
      -- come back when half the lookahead is free again, so claims stay batched
      'wait_ms', greatest(1, ceil(extract(epoch from v_base - v_horizon) * 1000 + v_lookahead_ms / 2.0)),
      'next_due_ms', 0);
  end if;

  -- Heads of line: due, first of their recipient (priority, then enqueue
  -- order), recipient not paced; locked, in claim order (priority, then the
  -- longest due first: visible_at is when a message became due, or its retry
  -- did). Free-form heads whose recipient's 24-hour window is closed fail
  -- instead of being sent.
  -- (Each step below is its own statement driven by these ids through the
  -- primary key: a join here could turn into a scan of the whole table.)
  select coalesce(array_agg(c.id order by c.priority desc, c.visible_at, c.id), '{}'),
         coalesce(array_agg(c.window_closed order by c.priority desc, c.visible_at, c.id), '{}')
  into v_ids, v_closed
  from (
    select q.id, q.priority, q.visible_at,
           q.message_type <> 'template' and not coalesce((
             select s.last_inbound_at > v_now - interval '24 hours'
             from public.whatsapp_sessions s where s.phone_number = q.recipient_phone), false)
             as window_closed
    from public.whatsapp_message_queue q
    where q.status = 'pending' and q.visible_at <= v_now and q.scheduled_at <= v_now
      and not exists (
        select from public.whatsapp_message_queue e
        where e.recipient_phone = q.recipient_phone
          and e.status in ('pending', 'processing')
          and e.scheduled_at <= v_now
          -- a message in flight holds its recipient whatever its priority
          and (e.status = 'processing' or e.priority > q.priority
               or (e.priority = q.priority and e.id < q.id)))
      and not exists (
        select from private.whatsapp_pair_pacing p
        where p.business_number = p_business_number and p.recipient_phone = q.recipient_phone
          and p.next_allowed_at > v_now)
    order by q.priority desc, q.visible_at, q.id
    limit v_allowed
    for update of q skip locked
  ) c;

  v_send_ids := array(select x.id from unnest(v_ids, v_closed) with ordinality as x(id, closed, n)
                      where not x.closed order by x.n);

  with closed as (
    update public.whatsapp_message_queue q set
      status = 'failed', failed_at = v_now, error_code = 'outside_customer_service_window',
      finished_at = v_now,
      last_error = 'free-form messages need a message from the user in the last 24 hours; send a template'
    where q.id = any(array(select x.id from unnest(v_ids, v_closed) as x(id, closed) where x.closed))
    returning q.id, q.correlation_id, q.attempts
  )
  select v_metrics || coalesce(jsonb_agg(private.whatsapp_metric('whatsapp.message.failed', f.id, f.attempts,
           'outside_customer_service_window', null, f.correlation_id)), '[]'::jsonb)
  into v_metrics
  from closed f;

  with slotted as (
    select x.id, v_base + v_step * (x.n - 1) as slot_at
    from unnest(v_send_ids) with ordinality as x(id, n)
  ), claimed as (
    update public.whatsapp_message_queue q set
      status = 'processing',
      attempts = q.attempts + 1,
      lease_token = gen_random_uuid(),
      locked_by = p_dispatcher_id,
      locked_at = v_now,
      visible_at = s.slot_at + make_interval(secs => p_lease_seconds)
    from slotted s where q.id = s.id and q.id = any(v_send_ids)
    returning q.id, q.lease_token, q.recipient_phone, q.message_type, q.message_payload, q.attempts,
              q.max_attempts, q.correlation_id, s.slot_at
  ), paced as (
    insert into private.whatsapp_pair_pacing (business_number, recipient_phone, next_allowed_at)
    select p_business_number, c.recipient_phone,
           c.slot_at + make_interval(secs => p_pair_interval_ms / 1000.0)
    from claimed c order by c.recipient_phone
    on conflict (business_number, recipient_phone) do update set next_allowed_at = excluded.next_allowed_at
  )
  select count(*),
    coalesce(jsonb_agg(jsonb_build_object(
      'id', c.id, 'lease_token', c.lease_token, 'recipient_phone', c.recipient_phone,
      'message_type', c.message_type,
      'message_payload', c.message_payload, 'attempts', c.attempts, 'max_attempts', c.max_attempts,
      'correlation_id', c.correlation_id,
      'slot_ms', round(extract(epoch from c.slot_at) * 1000, 3))
      order by c.slot_at), '[]'::jsonb)
  into v_count, v_messages
  from claimed c;

  if jsonb_array_length(v_metrics) > 0 then
    perform public.record_metrics(v_metrics);
  end if;

  update private.whatsapp_send_windows
  set next_slot_at = v_base + v_step * v_count, updated_at = now()
  where business_number = p_business_number;

  if v_count = 0 then
    select extract(epoch from min(greatest(q.visible_at, q.scheduled_at)) - v_now) * 1000
    into v_next_due
    from (select visible_at, scheduled_at from public.whatsapp_message_queue
          where status = 'pending' order by priority desc, visible_at, id limit 500) q;
  end if;

  -- Old pacing rows are pruned now and then.
  if random() < 0.01 then
    delete from private.whatsapp_pair_pacing
    where business_number = p_business_number and next_allowed_at < v_now - interval '1 hour';
  end if;

  -- now_ms: the database clock as the claim ends, which a dispatcher maps
  -- onto its own clock to send each message at its slot_ms. wait_ms: after
  -- handing out slots, come back when the next free slot is within half the
  -- lookahead (as when none was free above), so claims stay batched instead
  -- of each taking the few slots freed since the last one.
  return jsonb_build_object('messages', v_messages, 'paused', false, 'pause_reason', null,
    'now_ms', round(extract(epoch from clock_timestamp()) * 1000, 3),
    'wait_ms', case when v_count > 0 then greatest(0, ceil(
      extract(epoch from v_base + v_step * v_count - clock_timestamp()) * 1000
      - v_lookahead_ms / 2.0)) else 0 end,
    'next_due_ms', case when v_count = 0 and v_next_due is not null then greatest(0, ceil(v_next_due)) end);
end;
$$;

-- The results a dispatcher reports, one row per message id.
create or replace function private.whatsapp_results(p_results jsonb)
returns table (
  id bigint, lease_token uuid, outcome text, wamid text, error_code text, error_message text,
  duration_ms double precision
)
language sql
immutable
set search_path = ''
as $$
  select distinct on (r.id) r.id, r.lease_token, r.outcome, left(r.wamid, 256), left(r.error_code, 64),
         left(r.error_message, 2000), r.duration_ms
  from jsonb_to_recordset(p_results) as r(
    id bigint, lease_token uuid, outcome text, wamid text, error_code text, error_message text,
    duration_ms double precision)
  order by r.id;
$$;

-- One metric row (for public.record_metrics) about a queue message.
create or replace function private.whatsapp_metric(
  p_name text, p_message_id bigint, p_attempt integer, p_error_code text, p_duration_ms double precision,
  p_correlation_id text, p_metric_type text default 'counter'
) returns jsonb
language sql
immutable
set search_path = ''
as $$
  select jsonb_build_object(
    'service_name', 'whatsapp', 'metric_type', p_metric_type, 'metric_name', p_name, 'value', 1,
    'tags', jsonb_strip_nulls(jsonb_build_object('message_id', p_message_id, 'attempt', p_attempt,
                                                 'error_code', p_error_code, 'duration_ms', p_duration_ms)),
    'correlation_id', p_correlation_id);
$$;

-- -----------------------------------------------------------------------------
-- complete_whatsapp_messages: a dispatcher reports what happened to the
-- messages it claimed, in one batch.
--
--   p_results [{id, lease_token, outcome, wamid, error_code, error_message, duration_ms}]
--   outcome: sent | retry (5xx, timeout) | failed (permanent) |
--            stop (token expired or invalid: the message goes back untouched
--            and the business number pauses for p_pause_seconds) |
--            refused (the business account cannot send: the same) |
--            throttle (Meta asks us to slow down: the same, for
--            p_throttle_seconds, so a spell of throttling spends no attempts
--            and dead-letters nothing)
--
-- retry and failed settle through the generic lease settlement (lease holders only;
-- backoff with jitter; dead letter once max_attempts is used up). A send is
-- recorded whenever the message has no wamid yet, even if its lease was lost
-- meanwhile: it went out, and forgetting that would send it twice. Every
-- applied outcome records a metric with the message's correlation id.
-- -----------------------------------------------------------------------------
create or replace function public.complete_whatsapp_messages(
  p_dispatcher_id text,
  p_business_number text,
  p_results jsonb,
  p_retry_base_ms integer default 2000,
  p_pause_seconds integer default 300,
  p_throttle_seconds integer default 30
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_now timestamptz := clock_timestamp();
  v_metrics jsonb := '[]'::jsonb;
  v_part jsonb;
  v_sent integer := 0;
  v_retried integer := 0;
  v_failed integer := 0;
  v_stopped integer := 0;
  v_throttled integer := 0;
  v_dead integer := 0;
  v_n integer;
  v_n_dead integer;
  v_pause_reason text;
  v_ids bigint[];
  v_group record;
  v_settled bigint[];
  -- sent, but Meta's failed status for the send came first
  v_failed_first bigint[];
begin
  if jsonb_typeof(p_results) is distinct from 'array' or jsonb_array_length(p_results) > 1000 then
    perform private.raise_error(400, 'invalid_results', 'results must be an array of at most 1000 objects');
  end if;
  if exists (
    select from jsonb_array_elements(p_results) e
    where jsonb_typeof(e) <> 'object'
      or coalesce(e ->> 'outcome', '') not in ('sent', 'retry', 'failed', 'stop', 'refused', 'throttle')
      or coalesce(e ->> 'id', '') !~ '^[0-9]{1,18}$'
      or coalesce(e ->> 'lease_token', '') !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
      or (e ->> 'outcome' = 'sent' and coalesce(e ->> 'wamid', '') = '')
  ) then
    perform private.raise_error(400, 'invalid_results',
      'each result needs an id, its lease_token, an outcome (sent, retry, failed, stop, refused, throttle) and, when sent, a wamid');
  end if;
  if p_retry_base_ms is null or p_retry_base_ms not between 1 and 3600000
     or p_pause_seconds is null or p_pause_seconds not between 1 and 86400
     or p_throttle_seconds is null or p_throttle_seconds not between 1 and 86400 then
    perform private.raise_error(400, 'invalid_dispatch_settings',
      'retry_base_ms 1..3600000, pause_seconds and throttle_seconds 1..86400');
  end if;
  -- The updates below are driven by this id list through the primary key, so
  -- their plans stay index lookups even before the queue has statistics.
  v_ids := array(select (e ->> 'id')::bigint from jsonb_array_elements(p_results) e);

  -- sent: adopt any status event that beat us here (forward only), under the
  -- wamids' locks (see ingest_whatsapp_events), taken before any session row
  -- as the ingest takes them
  perform private.lock_key_buckets('whatsapp/wamid', array(
    select e ->> 'wamid' from jsonb_array_elements(p_results) e where e ->> 'outcome' = 'sent'));

  -- Every session row this call may write, first (see lock_whatsapp_sessions):
  -- the recipients of the sends it records and of the messages it fails for
  -- good (failed, or a retry on the last attempt), as far as the unlocked rows
  -- tell: one that changes meanwhile costs a lock, or an empty session.
  perform private.lock_whatsapp_sessions(array(
    select q.recipient_phone
    from private.whatsapp_results(p_results) r
    join public.whatsapp_message_queue q on q.id = r.id
    where q.id = any(v_ids)
      and ((r.outcome = 'sent' and q.wamid is null)
        or (r.outcome in ('retry', 'failed') and q.status = 'processing'
            and q.lease_token = r.lease_token
            and (r.outcome = 'failed' or q.attempts >= q.max_attempts)))));

  with results as materialized (select * from private.whatsapp_results(p_results)),
  upd as (
    update public.whatsapp_message_queue q set
      status = coalesce(ev.status, 'sent'),
      wamid = r.wamid,
      sent_at = v_now,
      finished_at = v_now,
      delivered_at = case when ev.status in ('delivered', 'read') then ev.occurred_at end,
      read_at = case when ev.status = 'read' then ev.occurred_at end,
      failed_at = case when ev.status = 'failed' then ev.occurred_at end,
      error_code = case when ev.status = 'failed' then ev.error_code end,
      last_error = case when ev.status = 'failed' then ev.error_message end,
      dead_lettered_at = null,
      lease_token = null,
      locked_by = null
    from results r
    left join lateral (
      select s.status, s.occurred_at, s.error_code, s.error_message
      from public.whatsapp_message_statuses s
      where s.wamid = r.wamid
      order by case s.status when 'read' then 4 when 'delivered' then 3 when 'failed' then 2.5 else 2 end desc
      limit 1
    ) ev on true
    where r.outcome = 'sent' and q.id = r.id and q.id = any(v_ids) and q.wamid is null
      and (q.status in ('pending', 'processing')
           -- its lease ran out on its last attempt while the send was out:
           -- Meta has it, so it is sent, not a dead letter
           or (q.status = 'failed' and q.error_code = 'lease_expired'))
    returning q.id, q.status, q.recipient_phone, q.correlation_id, q.attempts, r.duration_ms
  ), counted as (
    insert into public.whatsapp_sessions as s (phone_number, message_count, last_activity_at)
    select u.recipient_phone, count(*), now() from upd u group by u.recipient_phone order by u.recipient_phone
    on conflict (phone_number) do update set
      message_count = s.message_count + excluded.message_count, last_activity_at = now()
  )
  select count(*), coalesce(jsonb_agg(private.whatsapp_metric('whatsapp.message.sent', u.id, u.attempts, null,
                                                                u.duration_ms, u.correlation_id)), '[]'::jsonb),
         array_agg(u.id) filter (where u.status = 'failed')
  into v_sent, v_part, v_failed_first from upd u;
  v_metrics := v_metrics || v_part;

  -- A failed status that beat the record of its send (the pair limit mostly
  -- reports that way) ends as if it had followed it (ingest_whatsapp_events):
  -- pending again after the same backoff, without the failed send's wamid,
  -- when worth another send and attempts are left; else failed for good.
  if v_failed_first is not null then
    with requeued as (
      update public.whatsapp_message_queue q set
        status = 'pending', wamid = null, sent_at = null, finished_at = null, failed_at = null,
        visible_at = private.whatsapp_requeue_at(q.attempts)
      where q.id = any(v_failed_first)
        and private.whatsapp_status_requeues(q.status, q.error_code, q.attempts, q.max_attempts)
      returning q.id
    )
    -- the rows as they were before requeued (same id, attempts, code)
    select coalesce(jsonb_agg(private.whatsapp_metric(
             case when r.id is null then 'whatsapp.message.failed' else 'whatsapp.message.retry' end,
             q.id, q.attempts, q.error_code, null, q.correlation_id)), '[]'::jsonb)
    into v_part
    from public.whatsapp_message_queue q left join requeued r on r.id = q.id
    where q.id = any(v_failed_first);
    v_metrics := v_metrics || v_part;
  end if;

  -- retry and failed: the generic lease settlement, one call per error
  for v_group in
    select r.outcome, r.error_code, r.error_message, array_agg(r.id) as ids, array_agg(r.lease_token) as tokens,
           jsonb_object_agg(r.id::text, r.duration_ms) as durations
    from private.whatsapp_results(p_results) r
    where r.outcome in ('retry', 'failed')
    group by r.outcome, r.error_code, r.error_message
  loop
    v_settled := array(
      select t.id from private.whatsapp_message_queue_lease_settle(
        v_group.ids, v_group.tokens, case when v_group.outcome = 'retry' then 'retry' else 'done' end,
        'failed', 'failed', p_retry_base_ms / 1000.0, null,
        coalesce(v_group.error_message, v_group.error_code), null) t);
    if cardinality(v_settled) = 0 then
      continue;
    end if;
    with upd as (
      update public.whatsapp_message_queue q set
        error_code = coalesce(v_group.error_code, case when v_group.outcome = 'retry' then 'send_error'
                                                       else 'send_failed' end),
        failed_at = case when q.status = 'failed' then v_now end,
        dead_lettered_at = case when q.status = 'failed' and v_group.outcome = 'retry' then v_now end
      where q.id = any(v_settled)
      returning q.id, q.status, q.recipient_phone, q.correlation_id, q.attempts, q.error_code
    ), counted as (
      insert into public.whatsapp_sessions as s (phone_number, error_count, last_error, last_error_at)
      -- cut before the insert: the column check applies to the proposed row
      -- even when the conflict turns it into an update
      select u.recipient_phone, count(*),
             left(max(u.error_code || ': ' || coalesce(v_group.error_message, '')), 2000), now()
      from upd u where u.status = 'failed' group by u.recipient_phone order by u.recipient_phone
      on conflict (phone_number) do update set
        error_count = s.error_count + excluded.error_count, last_error = excluded.last_error,
        last_error_at = now()
    )
    select count(*), coalesce(jsonb_agg(private.whatsapp_metric(
             case when v_group.outcome = 'failed' then 'whatsapp.message.failed'
                  when u.status = 'failed' then 'whatsapp.message.dead_letter'
                  else 'whatsapp.message.retry' end,
             u.id, u.attempts, u.error_code, (v_group.durations ->> u.id::text)::double precision,
             u.correlation_id)), '[]'::jsonb),
           count(*) filter (where v_group.outcome = 'retry' and u.status = 'failed')
    into v_n, v_part, v_n_dead
    from upd u;
    v_metrics := v_metrics || v_part;
    if v_group.outcome = 'failed' then
      v_failed := v_failed + v_n;
    else
      v_dead := v_dead + v_n_dead;
      v_retried := v_retried + v_n - v_n_dead;
    end if;
  end loop;

  -- stop (the token is expired or invalid), refused (the business account
  -- cannot send) and throttle (Meta asks us to slow down): put the message
  -- back without spending an attempt and pause the business number, for
  -- p_throttle_seconds when throttled, else p_pause_seconds. The reason
  -- names the pause and the metric (an alert but for throttling).
  with results as materialized (
    select r.*, case r.outcome when 'stop' then 'token_invalid'
                               when 'refused' then 'account_refused'
                               else 'throttled' end as reason
    from private.whatsapp_results(p_results) r
    where r.outcome in ('stop', 'refused', 'throttle')
  ),
  upd as (
    update public.whatsapp_message_queue q set
      status = 'pending', attempts = greatest(q.attempts - 1, 0),
      visible_at = v_now + make_interval(secs => case r.outcome when 'throttle' then p_throttle_seconds
                                                                 else p_pause_seconds end),
      error_code = coalesce(r.error_code, r.reason),
      last_error = r.error_message,
      lease_token = null, locked_by = null
    from results r
    where q.id = r.id and q.id = any(v_ids) and q.status = 'processing'
      and q.lease_token = r.lease_token
    returning q.id, q.correlation_id, q.error_code, q.attempts, r.outcome, r.reason
  )
  select count(*) filter (where u.outcome <> 'throttle'), count(*) filter (where u.outcome = 'throttle'),
         -- a refusal names the pause over throttling
         (array_agg(u.reason || ':' || u.error_code
                    order by u.outcome = 'throttle', u.error_code))[1],
         coalesce(jsonb_agg(case u.outcome
           when 'throttle' then private.whatsapp_metric('whatsapp.message.throttled', u.id,
                                  u.attempts, u.error_code, null, u.correlation_id)
           else private.whatsapp_metric('whatsapp.alert.' || u.reason, u.id, u.attempts,
                                        u.error_code, null, u.correlation_id, 'alert') end),
           '[]'::jsonb)
  into v_stopped, v_throttled, v_pause_reason, v_part from upd u;
  v_metrics := v_metrics || v_part;

  -- never shortening a pause already there
  if v_stopped > 0 or v_throttled > 0 then
    insert into private.whatsapp_send_windows as w (business_number, paused_until, pause_reason)
    values (p_business_number,
            v_now + make_interval(secs => case when v_stopped > 0 then p_pause_seconds
                                               else p_throttle_seconds end),
            v_pause_reason)
    on conflict (business_number) do update set
      paused_until = greatest(w.paused_until, excluded.paused_until),
      pause_reason = case when excluded.paused_until >= coalesce(w.paused_until, excluded.paused_until)
                          then excluded.pause_reason else w.pause_reason end,
      updated_at = now();
  end if;

  if jsonb_array_length(v_metrics) > 0 then
    perform public.record_metrics(v_metrics);
  end if;

  return jsonb_build_object('sent', v_sent, 'retried', v_retried, 'dead_lettered', v_dead,
    'failed', v_failed, 'stopped', v_stopped, 'throttled', v_throttled,
    'ignored', jsonb_array_length(p_results) - v_sent - v_retried - v_dead - v_failed - v_stopped
               - v_throttled);
end;
$$;

-- -----------------------------------------------------------------------------
-- Reading and cancelling (security invoker: RLS decides who sees what)
-- -----------------------------------------------------------------------------
create or replace function public.get_whatsapp_message(p_message_id bigint)
returns setof public.whatsapp_message_queue
language sql
stable
set search_path = ''
as $$
  select * from public.whatsapp_message_queue where id = p_message_id;
$$;

create or replace function public.cancel_whatsapp_message(p_message_id bigint)
returns public.whatsapp_message_queue
language plpgsql
set search_path = ''
as $$
declare
  v_row public.whatsapp_message_queue;
begin
  select * into v_row from public.whatsapp_message_queue where id = p_message_id for update;
  if not found then
    perform private.raise_error(404, 'message_not_found', 'no such message');
  end if;
  if v_row.status = 'cancelled' then
    return v_row;
  end if;
  if v_row.status <> 'pending' then
    perform private.raise_error(409, 'message_not_cancellable',
      format('a %s message cannot be cancelled', v_row.status), jsonb_build_object('status', v_row.status));
  end if;
  update public.whatsapp_message_queue
  set status = 'cancelled', cancelled_at = now(), finished_at = now()
  where id = p_message_id
  returning * into v_row;
  return v_row;
end;
$$;

create or replace function public.list_whatsapp_sessions(
  p_status text default null,
  p_limit integer default 50,
  p_after_phone text default null
) returns setof public.whatsapp_sessions
language plpgsql
stable
set search_path = ''
as $$
begin
  perform private.check_limit(p_limit, 1000);
  if p_status is not null and p_status not in ('active', 'inactive', 'suspended', 'expired') then
    perform private.raise_error(400, 'invalid_status', 'status must be active, inactive, suspended or expired');
  end if;
  return query
  select s.* from public.whatsapp_sessions s
  where (p_status is null or s.status = p_status)
    and (p_after_phone is null or s.phone_number > p_after_phone)
  order by s.phone_number
  limit p_limit;
end;
$$;

-- Queue depth, in flight, failures and the send rate over the last minute.
create or replace function public.get_whatsapp_queue_metrics()
returns jsonb
language sql
stable
security definer
set search_path = ''
as $$
  select jsonb_build_object(
    'queue_depth', (select count(*) from public.whatsapp_message_queue where status = 'pending'),
    'due_now', (select count(*) from public.whatsapp_message_queue
                where status = 'pending' and visible_at <= now() and scheduled_at <= now()),
    'in_flight', (select count(*) from public.whatsapp_message_queue where status = 'processing'),
    'failed', (select count(*) from public.whatsapp_message_queue where status = 'failed'),
    'dead_lettered', (select count(*) from public.whatsapp_message_queue
                      where status = 'failed' and dead_lettered_at is not null),
    -- from the per-send metrics (indexed by name and time), not the queue
    'sent_last_minute', (select count(*) from public.system_metrics
                         where service_name = 'whatsapp' and metric_name = 'whatsapp.message.sent'
                           and created_at > now() - interval '1 minute'),
    'send_rate_per_second', round((select count(*) from public.system_metrics
                                   where service_name = 'whatsapp' and metric_name = 'whatsapp.message.sent'
                                     and created_at > now() - interval '1 minute') / 60.0, 3),
    'oldest_pending_seconds', (select round(extract(epoch from now() - min(created_at))::numeric, 3)
                               from public.whatsapp_message_queue where status = 'pending'),
    'paused', (select coalesce(jsonb_agg(jsonb_build_object(
                 'business_number', w.business_number, 'paused_until', w.paused_until,
                 'reason', w.pause_reason)), '[]'::jsonb)
               from private.whatsapp_send_windows w where w.paused_until > now()));
$$;

-- -----------------------------------------------------------------------------
-- Grants: the queue, ingest and dispatch API is for service_role; users may
-- read their own message and session through RLS.
-- -----------------------------------------------------------------------------
revoke all on function public.enqueue_whatsapp_message(text, text, jsonb, integer, timestamptz, integer, text, text, jsonb)
  from public, anon, authenticated;
revoke all on function public.update_whatsapp_session_activity(text, boolean, timestamptz, text, text, jsonb)
  from public, anon, authenticated;
revoke all on function public.ingest_whatsapp_events(jsonb, jsonb, jsonb, jsonb, text) from public, anon, authenticated;
revoke all on function public.claim_whatsapp_messages(text, text, integer, integer, integer, integer, integer)
  from public, anon, authenticated;
revoke all on function public.complete_whatsapp_messages(text, text, jsonb, integer, integer, integer)
  from public, anon, authenticated;
revoke all on function public.cancel_whatsapp_message(bigint) from public, anon, authenticated;
revoke all on function public.get_whatsapp_queue_metrics() from public, anon, authenticated;
revoke all on function public.get_whatsapp_message(bigint) from public, anon;
revoke all on function public.list_whatsapp_sessions(text, integer, text) from public, anon;

grant execute on function public.enqueue_whatsapp_message(text, text, jsonb, integer, timestamptz, integer, text, text, jsonb)
  to service_role;
grant execute on function public.update_whatsapp_session_activity(text, boolean, timestamptz, text, text, jsonb)
  to service_role;
grant execute on function public.ingest_whatsapp_events(jsonb, jsonb, jsonb, jsonb, text) to service_role;
grant execute on function public.claim_whatsapp_messages(text, text, integer, integer, integer, integer, integer)
  to service_role;
grant execute on function public.complete_whatsapp_messages(text, text, jsonb, integer, integer, integer)
  to service_role;
grant execute on function public.cancel_whatsapp_message(bigint) to service_role;
grant execute on function public.get_whatsapp_queue_metrics() to service_role;
grant execute on function public.get_whatsapp_message(bigint) to authenticated, service_role;
grant execute on function public.list_whatsapp_sessions(text, integer, text) to authenticated, service_role;

-- Private helpers: per-schema default privileges cannot take EXECUTE away from
-- PUBLIC, so it is revoked here function by function. service_role runs the
-- validation helpers (enqueue and ingest are security invoker); the dispatch
-- helpers run only inside the security definer claim / complete functions.
revoke all on function private.whatsapp_status_rank(text) from public, anon, authenticated;
revoke all on function private.whatsapp_status_requeues(text, text, integer, integer)
  from public, anon, authenticated;
revoke all on function private.whatsapp_requeue_at(integer) from public, anon, authenticated;
revoke all on function private.whatsapp_check_phone(text, text) from public, anon, authenticated;
revoke all on function private.whatsapp_payload_error(text, text) from public, anon, authenticated;
revoke all on function private.whatsapp_text_field(jsonb, text, text, integer, integer, boolean)
  from public, anon, authenticated;
revoke all on function private.whatsapp_validate_payload(text, jsonb) from public, anon, authenticated;
revoke all on function private.whatsapp_expire_leases() from public, anon, authenticated, service_role;
revoke all on function private.whatsapp_results(jsonb) from public, anon, authenticated, service_role;
revoke all on function private.whatsapp_metric(text, bigint, integer, text, double precision, text, text)
  from public, anon, authenticated, service_role;
grant execute on function private.whatsapp_status_rank(text) to service_role;
grant execute on function private.whatsapp_status_requeues(text, text, integer, integer)
  to service_role;
grant execute on function private.whatsapp_requeue_at(integer) to service_role;
grant execute on function private.whatsapp_check_phone(text, text) to service_role;
grant execute on function private.whatsapp_payload_error(text, text) to service_role;
grant execute on function private.whatsapp_text_field(jsonb, text, text, integer, integer, boolean) to service_role;
grant execute on function private.whatsapp_validate_payload(text, jsonb) to service_role;
