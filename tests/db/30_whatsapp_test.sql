-- WhatsApp: the spec's calls, payload validation (bad input writes nothing),
-- idempotency, forward-only statuses, inbound dedup, and the RLS matrix for
-- sessions, secrets, inbound messages, statuses and the queue
-- (anon, two users matched by their phone claim, a user without one, service_role).
begin;
select plan(103);

-- the spec's examples, verbatim
select ok(public.enqueue_whatsapp_message(
  p_recipient_phone := '+250788123456',
  p_message_type := 'text',
  p_message_payload := '{"text": "Hello!"}'::jsonb,
  p_priority := 5
) is not null, 'enqueue_whatsapp_message works as the spec calls it');
select ok(public.update_whatsapp_session_activity(
  p_phone_number := '+250788123456',
  p_increment_message_count := true
) is not null, 'update_whatsapp_session_activity works as the spec calls it');
select is((select message_count::int from public.whatsapp_sessions where phone_number = '+250788123456'), 1,
  'the session was created and counted');
select is((select last_inbound_at from public.whatsapp_sessions where phone_number = '+250788123456'), null,
  'activity alone does not open the 24-hour window');
select is((select message_payload from public.whatsapp_message_queue where recipient_phone = '+250788123456'),
  '{"body": "Hello!", "preview_url": false}'::jsonb, 'a text payload is stored in the Cloud API form');

-- preview_url, in each form a text takes: a boolean, carried to what is sent
select is(private.whatsapp_validate_payload('text', '{"text": {"body": "https://easymo.rw", "preview_url": true}}'),
  '{"body": "https://easymo.rw", "preview_url": true}'::jsonb, 'a nested preview_url is kept');
select is(private.whatsapp_validate_payload('text', '{"text": {"body": "hi"}}'),
  '{"body": "hi", "preview_url": false}'::jsonb, 'no preview_url is false');
select is(private.whatsapp_validate_payload('text', '{"text": "https://easymo.rw", "preview_url": true}'),
  '{"body": "https://easymo.rw", "preview_url": true}'::jsonb, 'a preview_url beside the text is kept');
select is(private.whatsapp_validate_payload('text', '{"text": {"body": "hi", "preview_url": false}, "preview_url": false}'),
  '{"body": "hi", "preview_url": false}'::jsonb, 'the same preview_url in both places is fine');
select throws_ok($$select private.whatsapp_validate_payload('text', '{"text": {"body": "hi", "preview_url": "true"}}')$$,
  'PT400', 'invalid_payload', 'a nested preview_url must be a boolean, not a string');
select throws_ok($$select private.whatsapp_validate_payload('text', '{"text": {"body": "hi", "preview_url": 1}}')$$,
  'PT400', 'invalid_payload', 'nor a number');
select throws_ok($$select private.whatsapp_validate_payload('text', '{"text": {"body": "hi", "preview_url": null}}')$$,
  'PT400', 'invalid_payload', 'nor null');
select throws_ok($$select private.whatsapp_validate_payload('text', '{"text": "hi", "preview_url": "false"}')$$,
  'PT400', 'invalid_payload', 'nor one beside the text');
select throws_ok($$select private.whatsapp_validate_payload('text', '{"text": {"body": "hi", "preview_url": true}, "preview_url": false}')$$,
  'PT400', 'invalid_payload', 'two preview_urls that disagree are refused, not one picked');

-- ---------------------------------------------------------------------------
-- validation: stable codes, nothing written
-- ---------------------------------------------------------------------------
create temp table before as select count(*) as n from public.whatsapp_message_queue;

select throws_ok($$select public.enqueue_whatsapp_message('0788123456', 'text', '{"text": "x"}')$$,
  'PT400', 'invalid_phone_number', 'a number without + is not E.164');
select throws_ok($$select public.enqueue_whatsapp_message('+0788123456', 'text', '{"text": "x"}')$$,
  'PT400', 'invalid_phone_number', 'E.164 does not start with 0');
select throws_ok($$select public.enqueue_whatsapp_message('+2507881234567890', 'text', '{"text": "x"}')$$,
  'PT400', 'invalid_phone_number', 'E.164 has at most 15 digits');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'sms', '{"text": "x"}')$$,
  'PT400', 'invalid_message_type', 'unknown message types are refused');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'text', '"x"')$$,
  'PT400', 'invalid_payload', 'a payload must be an object');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'text', '{"text": ""}')$$,
  'PT400', 'invalid_payload', 'empty text');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'text', '{"text": "   "}')$$,
  'PT400', 'invalid_payload', 'blank text');
select throws_ok(format($$select public.enqueue_whatsapp_message('+250788123456', 'text', '{"text": "%s"}')$$,
  repeat('a', 4097)), 'PT400', 'invalid_payload', 'text over 4096 characters');
select lives_ok(format($$select public.enqueue_whatsapp_message('+250788123456', 'text', '{"text": "%s"}')$$,
  repeat('a', 4096)), 'text of exactly 4096 characters');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'text', '{"text": 5}')$$,
  'PT400', 'invalid_payload', 'text must be a string');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'template', '{"language": "en"}')$$,
  'PT400', 'invalid_payload', 'a template needs a name');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'template', '{"name": "Hello World", "language": "en"}')$$,
  'PT400', 'invalid_payload', 'template names are lower-case identifiers');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'template', '{"name": "hello"}')$$,
  'PT400', 'invalid_payload', 'a template needs a language');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'media', '{"media_type": "image"}')$$,
  'PT400', 'invalid_payload', 'media needs an id or a link');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'media', '{"media_type": "image", "id": "1", "link": "https://x.io/a.jpg"}')$$,
  'PT400', 'invalid_payload', 'media takes an id or a link, not both');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'media', '{"media_type": "image", "link": "ftp://x.io/a.jpg"}')$$,
  'PT400', 'invalid_payload', 'media links are http(s)');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'media', '{"media_type": "gif", "id": "1"}')$$,
  'PT400', 'invalid_payload', 'unknown media types');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'interactive',
  '{"type": "button", "body": {"text": "Pick"}, "action": {"buttons": []}}')$$,
  'PT400', 'invalid_payload', 'buttons need at least one button');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'interactive',
  '{"type": "button", "body": {"text": "Pick"}, "action": {"buttons": [
    {"type": "reply", "reply": {"id": "a", "title": "A"}}, {"type": "reply", "reply": {"id": "b", "title": "B"}},
    {"type": "reply", "reply": {"id": "c", "title": "C"}}, {"type": "reply", "reply": {"id": "d", "title": "D"}}]}}')$$,
  'PT400', 'invalid_payload', 'at most 3 buttons');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'interactive',
  '{"type": "button", "body": {"text": "Pick"}, "action": {"buttons": [{"type": "reply", "reply": {"id": "a", "title": "A title that is far too long"}}]}}')$$,
  'PT400', 'invalid_payload', 'button titles have at most 20 characters');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'interactive',
  '{"type": "list", "body": {"text": "Pick"}, "action": {"button": "Options", "sections": [{"rows": []}]}}')$$,
  'PT400', 'invalid_payload', 'list sections need rows');
select lives_ok($$select public.enqueue_whatsapp_message('+250788123456', 'interactive',
  '{"type": "list", "body": {"text": "Pick a ride"}, "action": {"button": "Options", "sections": [
    {"title": "Rides", "rows": [{"id": "moto", "title": "Moto"}, {"id": "cab", "title": "Cab", "description": "4 seats"}]}]}}')$$,
  'a valid list');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'location', '{"latitude": 91, "longitude": 30}')$$,
  'PT400', 'invalid_payload', 'latitude within -90..90');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'location', '{"latitude": -1.95, "longitude": -180.5}')$$,
  'PT400', 'invalid_payload', 'longitude within -180..180');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'location', '{"latitude": "-1.95", "longitude": 30}')$$,
  'PT400', 'invalid_payload', 'coordinates are numbers');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'text', '{"text": "x"}', p_priority := 11)$$,
  'PT400', 'invalid_priority', 'priority 1..10');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123456', 'text', '{"text": "x"}', p_priority := 0)$$,
  'PT400', 'invalid_priority', 'priority 1..10 (low end)');
select is((select count(*) from public.whatsapp_message_queue), (select n + 2 from before),
  'only the two valid messages were written');

-- ---------------------------------------------------------------------------
-- idempotency
-- ---------------------------------------------------------------------------
select is(
  public.enqueue_whatsapp_message('+250788123457', 'text', '{"text": "once"}', p_idempotency_key := 'order-42'),
  public.enqueue_whatsapp_message('+250788123457', 'text', '{"text": "once"}', p_idempotency_key := 'order-42'),
  'the same idempotency key and request return the same message');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123457', 'text', '{"text": "twice"}', p_idempotency_key := 'order-42')$$,
  'PT409', 'idempotency_key_conflict', 'the key with another payload is a conflict');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123457', 'text', '{"text": "once"}',
    p_idempotency_key := 'order-42', p_max_attempts := 9)$$,
  'PT409', 'idempotency_key_conflict', 'so is the key with another max_attempts');
select throws_ok($$select public.enqueue_whatsapp_message('+250788123457', 'text', '{"text": "once"}',
    p_idempotency_key := 'order-42', p_metadata := '{"order": 43}')$$,
  'PT409', 'idempotency_key_conflict', 'or other metadata');
select is((select count(*)::int from public.whatsapp_message_queue where idempotency_key = 'order-42'), 1,
  'one message per key');

-- ---------------------------------------------------------------------------
-- inbound dedup and forward-only statuses
-- ---------------------------------------------------------------------------
select is((public.ingest_whatsapp_events(
  '[{"wamid": "wamid.in-1", "from_phone": "+250788000001", "message_type": "text", "sent_at": "2026-01-01T00:00:00Z",
     "text_body": "hi", "payload": {"type": "text"}}]'::jsonb) ->> 'messages_stored')::int, 1, 'an inbound message is stored');
select is((public.ingest_whatsapp_events(
  '[{"wamid": "wamid.in-1", "from_phone": "+250788000001", "message_type": "text", "sent_at": "2026-01-01T00:00:00Z",
     "text_body": "hi", "payload": {"type": "text"}}]'::jsonb) ->> 'duplicates')::int, 1, 'the same wamid again is a duplicate');
select is((select count(*)::int from public.whatsapp_inbound_messages where wamid = 'wamid.in-1'), 1, 'stored once');
select throws_ok($$select public.ingest_whatsapp_events('[{"wamid": "w", "from_phone": "250788000001", "message_type": "text", "payload": {}}]')$$,
  'PT400', 'invalid_events', 'a sender that is not E.164 refuses the delivery');

insert into public.whatsapp_message_queue (recipient_phone, message_type, message_payload, status, wamid, sent_at)
values ('+250788000001', 'text', '{"body": "x"}', 'sent', 'wamid.out-1', now()),
       ('+250788000002', 'text', '{"body": "y"}', 'sent', 'wamid.out-2', now());
create temp table out_ids as
  select id, wamid from public.whatsapp_message_queue where wamid in ('wamid.out-1', 'wamid.out-2');
grant select on out_ids to authenticated, anon, service_role;

select public.ingest_whatsapp_events(p_statuses := '[{"wamid": "wamid.out-1", "status": "read", "occurred_at": "2026-01-01T00:00:05Z"}]');
select public.ingest_whatsapp_events(p_statuses := '[{"wamid": "wamid.out-1", "status": "delivered", "occurred_at": "2026-01-01T00:00:03Z"}]');
select is((select status from public.whatsapp_message_queue where wamid = 'wamid.out-1'), 'read',
  'a late delivered never overwrites read');
select public.ingest_whatsapp_events(p_statuses := '[{"wamid": "wamid.out-1", "status": "failed", "error_code": "131026"}]');
select is((select status from public.whatsapp_message_queue where wamid = 'wamid.out-1'), 'read',
  'failed cannot undo a read');
select public.ingest_whatsapp_events(p_statuses := '[{"wamid": "wamid.out-2", "status": "failed", "error_code": "131047", "error_message": "Re-engagement message"}]');
select is((select status || ':' || error_code from public.whatsapp_message_queue where wamid = 'wamid.out-2'),
  'failed:131047', 'a sent message can fail with its code');
select public.ingest_whatsapp_events(p_statuses := '[{"wamid": "wamid.out-2", "status": "delivered"}]');
select is((select status from public.whatsapp_message_queue where wamid = 'wamid.out-2'), 'failed', 'failed is terminal');
-- throttling (the pair limit mostly comes this way) or a transient fault that
-- the webhook reports: sent again after a backoff, until the attempts run out
insert into public.whatsapp_message_queue (recipient_phone, message_type, message_payload, status, wamid,
  sent_at, finished_at, attempts, max_attempts)
values ('+250788000003', 'text', '{"body": "z"}', 'sent', 'wamid.out-3', now(), now(), 1, 2);
create temp table out3 as select id from public.whatsapp_message_queue where wamid = 'wamid.out-3';
select public.ingest_whatsapp_events(p_statuses := '[{"wamid": "wamid.out-3", "status": "failed",
  "error_code": "131056", "error_message": "pair rate limit hit"}]');
select is((select row(status, wamid, error_code, visible_at > now(), failed_at, sent_at, finished_at)::text
           from public.whatsapp_message_queue where id = (select id from out3)),
  row('pending', null::text, '131056', true, null::timestamptz, null::timestamptz,
      null::timestamptz)::text,
  'a throttled send the webhook reports is sent again after a backoff');
update public.whatsapp_message_queue set status = 'sent', wamid = 'wamid.out-3b', attempts = 2
where id = (select id from out3);
select public.ingest_whatsapp_events(p_statuses := '[{"wamid": "wamid.out-3b", "status": "failed",
  "error_code": "131056"}]');
select is((select status || ':' || error_code from public.whatsapp_message_queue where id = (select id from out3)),
  'failed:131056', 'out of attempts it fails for good');
-- Meta's passing faults the webhook may report: the account in maintenance
-- mode (a throughput upgrade) and the server temporarily unavailable
select ok(private.whatsapp_status_requeues('failed', '131057', 1, 5),
  'a send failed for the account''s maintenance mode goes again');
select ok(private.whatsapp_status_requeues('failed', '133004', 1, 5),
  'a send failed for a server temporarily unavailable goes again');

-- at most 5,000 events a call, of every kind together: the cost of one
-- statement stays bounded (the webhook splits a larger delivery)
select throws_ok($$select public.ingest_whatsapp_events(
  p_statuses := (select jsonb_agg(jsonb_build_object('wamid', 'wamid.cap-' || g, 'status', 'sent'))
                 from generate_series(1, 4000) g),
  p_contacts := (select jsonb_agg(jsonb_build_object('phone', '+25079900' || lpad(g::text, 4, '0'),
                                                     'display_name', 'Cap'))
                 from generate_series(1, 1001) g))$$,
  'PT413', 'too_many_events', 'contacts count toward the cap');
select throws_ok($$select public.ingest_whatsapp_events(
  p_errors := (select jsonb_agg(jsonb_build_object('code', 131000)) from generate_series(1, 5001) g))$$,
  'PT413', 'too_many_events', 'and so do errors');
select throws_ok($$select public.cancel_whatsapp_message((select id from out_ids where wamid = 'wamid.out-1'))$$,
  'PT409', 'message_not_cancellable', 'a read message cannot be cancelled');

-- ---------------------------------------------------------------------------
-- RLS matrix
-- ---------------------------------------------------------------------------
create temp table ids as select tests.create_user() as alice, tests.create_user() as bob, tests.create_user() as nophone;
grant select on ids to authenticated, anon, service_role;
select public.update_whatsapp_session_activity('+250788000002', true);
insert into public.whatsapp_session_secrets (session_id, session_token)
select id, 'secret-token-of-session-' || phone_number from public.whatsapp_sessions;
-- every session, as the table owner sees them, for the service_role check below
create temp table all_sessions as select phone_number from public.whatsapp_sessions;
grant select on all_sessions to service_role;

-- alice: phone claim 250788000001 (Supabase puts digits without +)
select tests.authenticate_as((select alice from ids), '{"phone": "250788000001"}');
select is((select array_agg(phone_number) from public.whatsapp_sessions), array['+250788000001'],
  'alice sees only her session');
select is((select array_agg(id::text) from public.whatsapp_message_queue), array[(select id from out_ids where wamid = 'wamid.out-1')::text],
  'alice sees only her messages');
select is((select count(*)::int from public.whatsapp_inbound_messages), 1, 'alice sees her inbound message');
select is((select count(*)::int from public.get_whatsapp_message((select id from out_ids where wamid = 'wamid.out-2'))), 0,
  'alice cannot read bob''s message by id');
select is((select count(*)::int from public.list_whatsapp_sessions()), 1, 'list_whatsapp_sessions applies RLS');
select throws_ok($$select * from public.whatsapp_session_secrets$$, '42501', null, 'users never read session secrets');
select throws_ok($$select * from public.whatsapp_message_statuses$$, '42501', null, 'users cannot read raw status events');
select throws_ok($$select public.enqueue_whatsapp_message('+250788000001', 'text', '{"text": "x"}')$$, '42501', null,
  'users cannot enqueue');
select throws_ok($$insert into public.whatsapp_message_queue (recipient_phone, message_type, message_payload)
                  values ('+250788000002', 'text', '{"body": "x"}')$$, '42501', null, 'users cannot insert queue rows');
select throws_ok($$update public.whatsapp_sessions set status = 'suspended'$$, '42501', null,
  'users cannot update sessions');
select throws_ok($$select public.claim_whatsapp_messages('me', 'biz')$$, '42501', null, 'users cannot claim');
select throws_ok($$select private.whatsapp_validate_payload('text', '{"text": "x"}')$$, '42501', null,
  'users cannot call the private WhatsApp helpers');
select throws_ok($$select public.update_whatsapp_session_activity('+250788000001', true)$$, '42501', null,
  'users cannot touch session activity');

-- bob sees bob's, never alice's
select tests.authenticate_as((select bob from ids), '{"phone": "+250788000002"}');
select is((select array_agg(phone_number) from public.whatsapp_sessions), array['+250788000002'],
  'bob sees only his session');
select is((select array_agg(id::text) from public.whatsapp_message_queue), array[(select id from out_ids where wamid = 'wamid.out-2')::text],
  'bob sees only his messages');
select is((select count(*)::int from public.whatsapp_inbound_messages), 0, 'bob sees no inbound of alice');

-- a user without a phone claim sees nothing
select tests.authenticate_as((select nophone from ids));
select is((select count(*)::int from public.whatsapp_sessions) + (select count(*)::int from public.whatsapp_message_queue),
  0, 'a user without a phone sees no session or message');

-- anon: nothing at all
select tests.authenticate_as_anon();
select throws_ok($$select count(*) from public.whatsapp_sessions$$, '42501', null, 'anon cannot read sessions');
select throws_ok($$select count(*) from public.whatsapp_message_queue$$, '42501', null, 'anon cannot read the queue');
select throws_ok($$select count(*) from public.whatsapp_inbound_messages$$, '42501', null, 'anon cannot read inbound');
select throws_ok($$select public.get_whatsapp_message((select id from out_ids where wamid = 'wamid.out-1'))$$, '42501', null,
  'anon cannot call get_whatsapp_message');

-- service_role: everything
select tests.authenticate_as_service_role();
select is((select array_agg(phone_number order by phone_number) from public.whatsapp_sessions),
  (select array_agg(phone_number order by phone_number) from all_sessions), 'service_role sees every session');
select is((select count(*)::int from public.whatsapp_session_secrets), (select count(*)::int from public.whatsapp_sessions),
  'service_role reads session secrets');
select ok(public.enqueue_whatsapp_message('+250788000002', 'template', '{"name": "hello_world", "language": "en"}') is not null,
  'service_role enqueues');

-- metrics count by index, not by reading the queue's whole history: 20,000
-- sent messages, and a scrape scans none of them
select tests.clear_authentication();
insert into public.whatsapp_message_queue (recipient_phone, message_type, message_payload, status)
select '+250788000009', 'text', '{"body": "x"}', 'sent' from generate_series(1, 20000);
insert into public.whatsapp_message_queue
  (recipient_phone, message_type, message_payload, status, failed_at, dead_lettered_at)
values ('+250788000009', 'text', '{"body": "x"}', 'failed', now(), now());
create temp table expected as
  select count(*) filter (where status = 'failed') as failed,
         count(*) filter (where dead_lettered_at is not null) as dead_lettered
  from public.whatsapp_message_queue;
grant select on expected to service_role;
create temp table scans as
  select seq_scan from pg_stat_xact_user_tables where relname = 'whatsapp_message_queue';
select tests.authenticate_as_service_role();
select is((select row((m ->> 'failed')::bigint, (m ->> 'dead_lettered')::bigint)::text
           from (select public.get_whatsapp_queue_metrics() as m) x),
  (select row(failed, dead_lettered)::text from expected),
  'metrics count the failed and the dead-lettered messages');
select tests.clear_authentication();
select is((select seq_scan from pg_stat_xact_user_tables where relname = 'whatsapp_message_queue')
          - (select seq_scan from scans), 0::bigint, 'without reading the whole queue');

-- a claim does not walk messages that are not due yet: 20,000 scheduled for
-- tomorrow, at the same priority as the one due message, enqueued before it
insert into public.whatsapp_message_queue
  (recipient_phone, message_type, message_payload, priority, scheduled_at, visible_at)
select '+25078' || lpad(i::text, 7, '0'), 'template', '{"name": "hello_world", "language": "en"}', 5,
       now() + interval '1 day', now() + interval '1 day'
from generate_series(1, 20000) i;
insert into public.whatsapp_message_queue (recipient_phone, message_type, message_payload, priority)
values ('+250799999999', 'template', '{"name": "hello_world", "language": "en"}', 5);
discard plans;
create temp table pages as
  select pg_stat_get_xact_blocks_fetched('public.whatsapp_message_queue'::regclass) as n;
grant select on pages to service_role;
select tests.authenticate_as_service_role();
select is((select array_agg(m ->> 'recipient_phone' order by m ->> 'recipient_phone')
           from jsonb_array_elements(public.claim_whatsapp_messages('disp-pages', 'biz-pages',
                                                                    p_limit := 10) -> 'messages') m),
  array['+250788000002', '+250799999999'],
  'a claim hands out the due messages (the one enqueued above, and this one)');
select tests.clear_authentication();
select cmp_ok(pg_stat_get_xact_blocks_fetched('public.whatsapp_message_queue'::regclass)
              - (select n from pages), '<', 40::bigint,
  'and reads a few of the queue''s pages, not the messages due tomorrow');

-- a send whose lease ran out on its last attempt while it was out is still
-- recorded as sent: Meta has it
delete from public.whatsapp_message_queue;
insert into public.whatsapp_message_queue (recipient_phone, message_type, message_payload, max_attempts)
values ('+250788777777', 'template', '{"name": "hello_world", "language": "en"}', 1);
create temp table late as
  select m from jsonb_array_elements(public.claim_whatsapp_messages('disp-late', 'biz-late',
    p_pair_interval_ms := 1) -> 'messages') m;
update public.whatsapp_message_queue set visible_at = now() - interval '1 second';
select private.whatsapp_expire_leases();
select is((select status || '/' || error_code from public.whatsapp_message_queue), 'failed/lease_expired',
  'its lease expired on its last attempt: a dead letter');
select is((public.complete_whatsapp_messages('disp-late', 'biz-late', jsonb_build_array(jsonb_build_object(
    'id', (select m ->> 'id' from late), 'lease_token', (select m ->> 'lease_token' from late),
    'outcome', 'sent', 'wamid', 'wamid.LATE', 'duration_ms', 5))) ->> 'sent')::int, 1,
  'the late sent outcome is recorded');
select is((select row(status, wamid, error_code, dead_lettered_at)::text from public.whatsapp_message_queue),
  row('sent', 'wamid.LATE', null::text, null::timestamptz)::text, 'as sent, no longer a dead letter');

-- Meta's failed status may beat the dispatcher's record of the send: it ends
-- as it does when it follows the record. Worth another send with attempts
-- left: pending again after a backoff; on the last attempt: failed for good.
delete from public.whatsapp_message_queue;
insert into public.whatsapp_message_queue (recipient_phone, message_type, message_payload, max_attempts)
values ('+250788555551', 'template', '{"name": "hello_world", "language": "en"}', 3),
       ('+250788555552', 'template', '{"name": "hello_world", "language": "en"}', 1);
create temp table early as
  select m from jsonb_array_elements(public.claim_whatsapp_messages('disp-early', 'biz-early',
    p_pair_interval_ms := 0) -> 'messages') m;
select public.ingest_whatsapp_events(p_statuses := '[
  {"wamid": "wamid.EARLY1", "status": "failed", "error_code": "131056", "error_message": "pair rate limit hit"},
  {"wamid": "wamid.EARLY2", "status": "failed", "error_code": "131056", "error_message": "pair rate limit hit"}]');
select is((public.complete_whatsapp_messages('disp-early', 'biz-early', (
    select jsonb_agg(jsonb_build_object('id', m ->> 'id', 'lease_token', m ->> 'lease_token',
      'outcome', 'sent', 'duration_ms', 5,
      'wamid', case m ->> 'recipient_phone' when '+250788555551' then 'wamid.EARLY1' else 'wamid.EARLY2' end))
    from early)) ->> 'sent')::int, 2, 'both sends are recorded');
select is((select row(status, wamid, error_code, visible_at > now(), sent_at, finished_at, failed_at)::text
           from public.whatsapp_message_queue where recipient_phone = '+250788555551'),
  row('pending', null::text, '131056', true, null::timestamptz, null::timestamptz,
      null::timestamptz)::text,
  'a throttled send whose failure came first is sent again after a backoff');
select is((select row(status, wamid, error_code, failed_at is not null)::text
           from public.whatsapp_message_queue where recipient_phone = '+250788555552'),
  row('failed', 'wamid.EARLY2', '131056', true)::text,
  'on its last attempt it fails for good');
select is((select array_agg(metric_name order by metric_name) from public.system_metrics
           where tags ->> 'message_id' in (select id::text from public.whatsapp_message_queue
                                           where recipient_phone like '+25078855555_')),
  array['whatsapp.message.failed', 'whatsapp.message.retry', 'whatsapp.message.sent',
        'whatsapp.message.sent'],
  'each is counted as sent, then as a retry or a failure, as when the status follows');

-- one message in flight per recipient: a higher-priority message enqueued
-- while a lower one is out waits for it, even with no pair pacing
delete from public.whatsapp_message_queue;
insert into public.whatsapp_message_queue (recipient_phone, message_type, message_payload, priority)
values ('+250788666666', 'template', '{"name": "hello_world", "language": "en"}', 1);
select is(jsonb_array_length(public.claim_whatsapp_messages('disp-one', 'biz-one',
    p_pair_interval_ms := 0) -> 'messages'), 1, 'the low-priority message goes out');
insert into public.whatsapp_message_queue (recipient_phone, message_type, message_payload, priority)
values ('+250788666666', 'template', '{"name": "hello_world", "language": "en"}', 10);
select is(jsonb_array_length(public.claim_whatsapp_messages('disp-one', 'biz-one',
    p_pair_interval_ms := 0) -> 'messages'), 0,
  'a higher-priority one to the same recipient waits while the first is in flight');

-- the inbound log and the status history are append-only for the service
-- role (it passes RLS: only the grants hold it)
select tests.authenticate_as_service_role();
select throws_ok($$update public.whatsapp_inbound_messages set text_body = 'rewritten'$$, '42501', null,
  'the service role cannot rewrite inbound messages');
select throws_ok($$delete from public.whatsapp_message_statuses$$, '42501', null,
  'the service role cannot delete status history');
select throws_ok($$truncate public.whatsapp_message_queue$$, '42501', null,
  'the service role cannot empty the outbound queue');
select throws_ok($$delete from public.whatsapp_inbound_wamids$$, '42501', null,
  'the service role cannot forget which deliveries it has seen');
select tests.clear_authentication();

select * from finish();
rollback;
