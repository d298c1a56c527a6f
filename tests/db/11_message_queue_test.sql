-- Message queue: send (one, batch, idempotent), claim order and leases, ack,
-- nack with backoff, dead letters, lease expiry, purge, metrics, validation
-- and the RLS matrix. Time is moved by editing visible_at, never by sleeping.
begin;
select plan(200);

select is((public.send_message('emails', '{"n": 1}', p_idempotency_key := 'k1')).status, 'pending',
  'send_message queues a pending message');
select is((public.send_message('emails', '{"n": 1}', p_idempotency_key := 'k1')).id,
  (select id from public.message_queue where idempotency_key = 'k1'), 'the same key returns the same message');
select is((select count(*)::int from public.message_queue where idempotency_key = 'k1'), 1,
  'an idempotency key sends once');
select throws_ok($$select public.send_message('emails', '{"n": 2}', p_idempotency_key := 'k1')$$,
  'PT409', 'idempotency_key_conflict', 'a key reused for another message is a conflict');

-- A replay whose message is deleted (purged, say) between the send's insert
-- and its read finds nothing to return: a serialization failure, which the
-- routes retry (the key is free then, and the message is sent anew), not an
-- empty answer. A statement trigger stands in for the racing delete.
select public.send_message('race-del', '{"n": 1}', p_idempotency_key := 'gone');
create function pg_temp.delete_replayed() returns trigger language plpgsql as $fn$
begin
  delete from public.message_queue where queue_name = 'race-del';
  return null;
end;
$fn$;
create trigger delete_replayed after insert on public.message_queue
  for each statement execute function pg_temp.delete_replayed();
select throws_ok($$select public.send_message('race-del', '{"n": 1}', p_idempotency_key := 'gone')$$,
  '40001', null, 'a replay whose message was deleted meanwhile is a serialization failure');
drop trigger delete_replayed on public.message_queue;
delete from public.message_queue where queue_name = 'race-del';

-- bad input is refused and sends nothing
select throws_ok($$select public.send_message('Bad Queue!', '{}')$$, 'PT400', 'invalid_queue_name',
  'queue names are checked');
select lives_ok(format($$select public.send_message(%L, '{}')$$, 'q' || repeat('a', 62)),
  'a 63-character queue name is fine');
delete from public.message_queue where queue_name = 'q' || repeat('a', 62);
select throws_ok(format($$select public.send_message(%L, '{}')$$, 'q' || repeat('a', 63)),
  'PT400', 'invalid_queue_name', 'a 64-character queue name is one too long');
select throws_ok($$select public.send_message('emails', '[1]')$$, 'PT400', 'invalid_payload',
  'a payload must be an object');
select throws_ok($$select public.send_messages('emails', jsonb_build_array('{"payload": {}}'::jsonb,
    jsonb_build_object('payload', jsonb_build_object('blob', repeat('x', 1048576)))))$$,
  'PT413', 'payload_too_large', 'a payload over a megabyte refuses the batch');
select throws_ok($$select public.send_message('emails', '{}',
    p_headers := jsonb_build_object('blob', repeat('x', 1048576)))$$,
  'PT413', 'payload_too_large', 'and so do headers over a megabyte');
select throws_ok($$select public.send_message('emails',
    (select jsonb_object_agg(i::text, 1e131071) from generate_series(1, 9) i))$$,
  'PT413', 'payload_too_large', 'a payload is measured as its text, not as stored');
set local statement_timeout = '1s';
select throws_ok($$select public.send_messages('emails', jsonb_build_array(jsonb_build_object('payload',
    ('{"a": [' || (select string_agg('1e131071', ',') from generate_series(1, 8000)) || ']}')::jsonb)))$$,
  'PT413', 'payload_too_large', 'a number beyond a double''s range is refused before any is printed');
reset statement_timeout;
select throws_ok($$select public.send_message('emails', '{}', p_priority := -1)$$, 'PT400', 'invalid_priority',
  'negative priorities are refused');
select throws_ok($$select public.send_messages('emails', '[{"payload":{}}, {"payload":3}]')$$,
  'PT400', 'invalid_payload', 'one bad message refuses the batch');
-- over SQL the batch's fields are checked as the HTTP route checks them:
-- a clear 400 for each, never a cast error
select throws_ok($$select public.send_messages('emails', '[{"payload": {}, "priority": 1.5}]')$$,
  'PT400', 'invalid_priority', 'a fractional priority is refused');
select throws_ok($$select public.send_messages('emails', '[{"payload": {}, "priority": "5"}]')$$,
  'PT400', 'invalid_priority', 'a priority given as a string is refused');
select throws_ok($$select public.send_messages('emails', '[{"payload": {}, "priority": 99999999999}]')$$,
  'PT400', 'invalid_priority', 'a priority beyond an integer is refused');
select throws_ok($$select public.send_messages('emails', '[{"payload": {}, "delay_seconds": 1e12}]')$$,
  'PT400', 'invalid_delay', 'a delay beyond an integer is refused');
select throws_ok($$select public.send_messages('emails', '[{"payload": {}, "delay_seconds": 0.5}]')$$,
  'PT400', 'invalid_delay', 'a fractional delay is refused');
select throws_ok($$select public.send_messages('emails', '[{"payload": {}, "max_attempts": 2.5}]')$$,
  'PT400', 'invalid_max_attempts', 'a fractional max_attempts is refused');
select throws_ok($$select public.send_messages('emails', '[{"payload": {}, "max_attempts": 0}]')$$,
  'PT400', 'invalid_max_attempts', 'max_attempts below 1 is refused');
select throws_ok($$select public.send_message('emails', '{}', p_max_attempts := 101)$$,
  'PT400', 'invalid_max_attempts', 'max_attempts above 100 is refused by the one-message form too');
select throws_ok($$select public.send_messages('emails', '[{"payload": {}, "idempotency_key": ["x"]}]')$$,
  'PT400', 'invalid_messages', 'an idempotency key that is not a string is refused');
select throws_ok($$select public.send_messages('emails', '[{"payload": {}, "message_type": 7}]')$$,
  'PT400', 'invalid_messages', 'a message type that is not a string is refused');
select throws_ok($$select public.send_messages('emails', '[{"payload": {}, "correlation_id": {}}]')$$,
  'PT400', 'invalid_messages', 'a correlation id that is not a string is refused');
-- a string of the wrong form is refused by its column's domain, the one
-- place the form is checked (23514, which PostgREST and the functions answer
-- as a 400)
select throws_ok($$select public.send_messages('emails', '[{"payload": {}, "message_type": "has space"}]')$$,
  '23514', null, 'a message type that is not a type name is refused');
select throws_ok($$select public.send_messages('emails', '[{"payload": {}, "idempotency_key": ""}]')$$,
  '23514', null, 'an empty idempotency key is refused');
select throws_ok(format($$select public.send_messages('emails', %L)$$,
    jsonb_build_array(jsonb_build_object('payload', '{}'::jsonb, 'correlation_id', repeat('c', 129)))),
  '23514', null, 'a correlation id over 128 characters is refused');
select throws_ok(format($$select public.send_messages('emails', '[{"payload": {}}]', %L)$$, repeat('c', 129)),
  '23514', null, 'and so is the batch''s');
-- nesting past 1,000 levels is refused before the number check walks it (at
-- 12,000 the walk ran out of stack: 54001)
select throws_ok(format($$select public.send_messages('emails', %L)$$,
    '[{"payload": {"a": ' || repeat('[', 12000) || repeat(']', 12000) || '}}]'),
  'PT413', 'payload_too_large', 'a payload nested 12,000 levels deep is refused');
select is((select count(*)::int from public.message_queue), 1, 'nothing of refused sends was kept');
select is((select row(priority, max_attempts)::text from public.send_messages('whole',
    '[{"payload": {}, "priority": 2.0, "max_attempts": 3e0}]')), '(2,3)',
  'a whole number written with a fraction or an exponent is taken as the integer');
delete from public.message_queue where queue_name = 'whole';

select is((select array_agg(priority::integer order by id) from public.send_messages('emails',
  '[{"payload":{"n":2}}, {"payload":{"n":3},"priority":5}, {"payload":{"n":4},"delay_seconds":3600}]')),
  array[0, 5, 0], 'a batch sends in order');

-- claim: priority first, then age; delayed messages wait
create temp table c1 as select * from public.claim_messages('emails', 10, 30, 'consumer-1');
select is((select array_agg(payload ->> 'n' order by priority desc, id) from c1), array['3', '1', '2'],
  'claims take priority then age, and skip delayed messages');
select ok((select bool_and(status = 'processing' and attempts = 1 and lease_token is not null
                           and locked_by = 'consumer-1') from c1), 'claimed messages are leased');
select is((select count(*)::int from public.claim_messages('emails', 10, 30)), 0,
  'leased messages are invisible to other consumers');

-- ack
select is((public.ack_message('emails', (select id from c1 where payload ->> 'n' = '3'),
  (select lease_token from c1 where payload ->> 'n' = '3'))).status, 'completed', 'ack completes');
select throws_ok(format($$select public.ack_message('emails', %s, %L)$$,
  (select id from c1 where payload ->> 'n' = '3'), (select lease_token from c1 where payload ->> 'n' = '3')),
  'PT409', 'lease_lost', 'a message cannot be acked twice');
select throws_ok(format($$select public.ack_message('emails', %s, %L)$$,
  (select id from c1 where payload ->> 'n' = '1'), gen_random_uuid()),
  'PT409', 'lease_lost', 'only the lease holder can ack');
select throws_ok(format($$select public.ack_message('sms', %s, %L)$$,
  (select id from c1 where payload ->> 'n' = '1'), (select lease_token from c1 where payload ->> 'n' = '1')),
  'PT404', 'message_not_found', 'a message is acked in its own queue only');

-- nack: backoff, then dead letter after max attempts
create temp table m as select * from public.send_message('retries', '{"x": 1}', p_max_attempts := 2);
create temp table a1 as select * from public.claim_messages('retries', 1, 30);
create temp table n1 as select * from public.nack_message('retries', (select id from a1),
  (select lease_token from a1), 'boom');
select ok((select status = 'pending' and visible_at > now() + interval '1 second'
                  and visible_at < now() + interval '3 seconds' and last_error = 'boom' from n1),
  'a nack makes the message visible again after a backoff of about 2 s');
update public.message_queue set visible_at = now() where queue_name = 'retries';
create temp table a2 as select * from public.claim_messages('retries', 1, 30);
select is((select attempts::integer from a2), 2, 'the retry is a new attempt');
select is((public.nack_message('retries', (select id from a2), (select lease_token from a2), 'boom again')).status,
  'dead', 'after max attempts a nack dead-letters the message');
select is((select count(*)::int from public.claim_messages('retries', 10, 30)), 0,
  'dead letters are not delivered');

-- lease expiry: a crashed consumer's message comes back
select public.send_message('leases', '{"x": 1}');
create temp table l1 as select * from public.claim_messages('leases', 1, 30);
update public.message_queue set visible_at = now() - interval '1 second' where queue_name = 'leases';
create temp table l2 as select * from public.claim_messages('leases', 1, 30);
select is((select id from l2), (select id from l1), 'an expired lease makes the message visible again');
select isnt((select lease_token from l2), (select lease_token from l1), 'with a new lease token');
select throws_ok(format($$select public.ack_message('leases', %s, %L)$$, (select id from l1), (select lease_token from l1)),
  'PT409', 'lease_lost', 'the first consumer can no longer ack');
select is((public.extend_message_lease('leases', (select id from l2), (select lease_token from l2), 600)).visible_at
  > now() + interval '599 seconds', true, 'the holder can extend its lease');
-- a late holder whose lease no claim has swept yet still settles: no one else has the message
select public.send_message('late-ack', '{"x": 1}');
create temp table la as select * from public.claim_messages('late-ack', 1, 30);
update public.message_queue set visible_at = now() - interval '1 second' where queue_name = 'late-ack';
select is((public.ack_message('late-ack', (select id from la), (select lease_token from la))).status,
  'completed', 'a holder whose lease ended but was not swept still acks');
select public.purge_queue('late-ack');

-- metrics and purge
select is((select row(depth, delayed, in_flight, dead, completed, total)::text from public.queue_metrics('emails')),
  '(0,1,2,0,1,4)', 'metrics count depth, delayed, in flight, dead and completed');
select ok((select oldest_age_seconds >= 0 from public.queue_metrics('emails')), 'metrics give the oldest age');
select is(public.purge_queue('emails', 'completed'), 1::bigint, 'purge by status');
select is(public.purge_queue('emails'), 3::bigint, 'purge everything left');

-- Sends, metrics and purges find messages by index however stale the
-- statistics: 20,000 messages the planner has never seen, and none of them
-- scans the table.
insert into public.message_queue (queue_name, payload)
select 'bulk', jsonb_build_object('i', i) from generate_series(1, 20000) i;
discard plans; -- plan the sends afresh, against the table as it is now
create temp table scans as
  select seq_scan from pg_stat_xact_user_tables where relname = 'message_queue';
select public.send_message('bulk', '{"i": 0}');
select public.send_messages('bulk', '[{"payload": {}}, {"payload": {}, "idempotency_key": "b1"}]');
select public.send_messages('bulk', '[{"payload": {}, "idempotency_key": "b1"}]');
select is((select seq_scan from pg_stat_xact_user_tables where relname = 'message_queue')
          - (select seq_scan from scans), 0::bigint, 'sends look messages up by index only');
select is((select total from public.queue_metrics('other')), 0::bigint, 'an empty queue''s metrics');
select is(public.purge_queue('other'), 0::bigint, 'an empty queue''s purge');
select is((select seq_scan from pg_stat_xact_user_tables where relname = 'message_queue')
          - (select seq_scan from scans), 0::bigint,
  'one queue''s metrics and purge do not read the other queues'' messages');
-- A keyed send finds its key in a few index pages, not by reading every keyed
-- message of the queue (the sender cannot be searched for: the service role's
-- is null).
insert into public.message_queue (queue_name, payload, idempotency_key)
select 'bulk', '{}', 'bulk-' || i from generate_series(1, 20000) i;
create temp table pages as select tests.blocks_read('public.message_queue_idempotency_idx', 'public.message_queue') as n;
select public.send_message('bulk', '{}', p_idempotency_key := 'bulk-new');
select public.send_message('bulk', '{}', p_idempotency_key := 'bulk-new');
select cmp_ok(tests.blocks_read('public.message_queue_idempotency_idx', 'public.message_queue') - (select n from pages), '<', 40::bigint,
  'keyed sends read a few pages');
delete from public.message_queue where queue_name = 'bulk';

-- pgmq's other operations: pop, archive and delete by id, every queue's metrics
select public.send_messages('ops', '[{"payload": {"n": 1}}, {"payload": {"n": 2}, "priority": 9},
  {"payload": {"n": 3}, "delay_seconds": 3600}]');
create temp table p1 as select * from public.pop_messages('ops', 5);
select is((select array_agg(payload ->> 'n' order by priority desc, id) from p1), array['2', '1'],
  'pop takes the visible messages in claim order');
select ok((select bool_and(status = 'completed' and attempts = 1 and lease_token is null
                           and finished_at is not null) from p1),
  'popped messages are completed at once, one attempt each');
select is((select count(*)::int from public.pop_messages('ops')), 0, 'a delayed message is not popped');
select throws_ok($$select public.pop_messages('ops', 0)$$, 'PT400', 'invalid_limit',
  'pop checks its limit');

create temp table o as
  select * from public.send_messages('ops', '[{"payload": {"n": 4}}, {"payload": {"n": 5}}]');
create temp table oc as select * from public.claim_messages('ops', 1, 30);
select is((select array_agg(payload ->> 'n' order by id) from public.archive_messages('ops',
    array[(select id from oc), (select id from o where payload ->> 'n' = '5'),
          (select min(id) from p1), -1])),
  array['4', '5'],
  'archive takes pending and in-flight messages by id, and leaves out finished and unknown ones');
select throws_ok(format($$select public.ack_message('ops', %s, %L)$$, (select id from oc),
  (select lease_token from oc)), 'PT409', 'lease_lost',
  'the lease holder of an archived message cannot ack it');
select throws_ok(format($$select public.archive_message('ops', %s)$$, (select id from oc)),
  'PT409', 'message_finished', 'a completed message is not archived again');
select throws_ok(format($$select public.archive_message('emails', %s)$$,
  (select id from o where payload ->> 'n' = '5')), 'PT404', 'message_not_found',
  'archive acts in its own queue only');
select throws_ok($$select public.archive_messages('ops', '{}')$$, 'PT400', 'invalid_message_ids',
  'an empty id list is refused');
select throws_ok($$select public.archive_messages('ops', array[1, null])$$, 'PT400',
  'invalid_message_ids', 'a null id is refused');
select throws_ok(format($$select public.delete_messages('ops', %L)$$,
  (select array_agg(g) from generate_series(1, 1001) g)), 'PT400', 'invalid_message_ids',
  'at most 1000 ids at once');

select public.send_message('ops', '{"n": 6}');
create temp table dc as select * from public.claim_messages('ops', 1, 30);
select is(public.delete_message('ops', (select id from dc)), (select id from dc),
  'delete removes a message in flight');
select throws_ok(format($$select public.ack_message('ops', %s, %L)$$, (select id from dc),
  (select lease_token from dc)), 'PT404', 'message_not_found',
  'the lease holder of a deleted message gets 404');
select throws_ok(format($$select public.delete_message('ops', %s)$$, (select id from dc)),
  'PT404', 'message_not_found', 'a message is deleted once');
select is((select count(*)::int from public.delete_messages('emails',
    array(select id from public.message_queue where queue_name = 'ops'))), 0,
  'delete acts in its own queue only');
select is((select count(*)::int from public.delete_messages('ops',
    array(select id from public.message_queue where queue_name = 'ops' and status = 'completed'))),
  4, 'delete takes finished messages too');

-- leases: one message in flight only; ops: one delayed; retries: one dead
select is((select array_agg(row(queue_name, delayed, in_flight, dead, total)::text order by queue_name)
           from public.list_queues()),
  array['(leases,0,1,0,1)', '(ops,1,0,0,1)', '(retries,0,0,1,1)'],
  'list_queues gives every queue''s metrics, whatever state its messages are in');

-- FIFO groups: one message of a group at a time, in send order
create temp table g as select * from public.send_messages('fifo', '[
  {"payload": {"n": 1}, "group_key": "alice"},
  {"payload": {"n": 2}, "group_key": "alice", "priority": 9},
  {"payload": {"n": 3}, "group_key": "bob"},
  {"payload": {"n": 4}}]');
create function pg_temp.fifo_status(p_n text) returns text language sql as $$
  select status::text from public.message_queue where queue_name = 'fifo' and payload ->> 'n' = p_n
$$;
select is((select array_agg(status::text order by id) from g),
  array['pending', 'blocked', 'pending', 'pending'],
  'a group''s first message is pending and the rest of the group waits, blocked');
create temp table g1 as select * from public.claim_messages('fifo', 10, 30);
select is((select array_agg(payload ->> 'n' order by id) from g1), array['1', '3', '4'],
  'a claim takes each group''s head only, whatever the priority of the messages behind it');
select public.ack_message('fifo', (select id from g1 where payload ->> 'n' = '1'),
  (select lease_token from g1 where payload ->> 'n' = '1'));
select is(pg_temp.fifo_status('2'), 'pending', 'acking a head lets its group''s next message go');
select is((public.send_message('fifo', '{"n": 5}', p_group_key := 'alice')).status::text, 'blocked',
  'a message sent to a group with a head waits');
create temp table g2 as select * from public.claim_messages('fifo', 10, 30);
select public.nack_message('fifo', (select id from g2), (select lease_token from g2), 'later');
select is((select count(*)::int from public.claim_messages('fifo', 10, 30)), 0,
  'a nacked head holds its group through its backoff');
update public.message_queue set visible_at = now() where id = (select id from g2);
create temp table g3 as select * from public.claim_messages('fifo', 10, 30);
update public.message_queue set max_attempts = 2 where id = (select id from g3);
select is((public.nack_message('fifo', (select id from g3), (select lease_token from g3), 'gave up')).status::text,
  'dead', 'the head is dead-lettered after its last attempt');
select is(pg_temp.fifo_status('5'), 'pending', 'a dead-lettered head lets its group''s next message go');
select public.send_message('fifo', '{"n": 6}', p_group_key := 'alice');
create temp table g4 as select * from public.claim_messages('fifo', 10, 30);
update public.message_queue set max_attempts = 1, visible_at = now() - interval '1 second'
where id = (select id from g4);
create temp table g5 as select * from public.claim_messages('fifo', 10, 30);
select is((select array_agg(payload ->> 'n') from g5), array['6'],
  'a head whose last lease expires is dead-lettered, and the next of its group is claimed');
select public.send_message('fifo', '{"n": 7}', p_group_key := 'alice');
select public.archive_message('fifo', (select id from g5));
select is(pg_temp.fifo_status('7'), 'pending', 'archiving a head lets its group''s next message go');
select public.send_message('fifo', '{"n": 8}', p_group_key := 'alice');
select public.delete_message('fifo', (select id from public.message_queue where payload ->> 'n' = '7'
                                      and queue_name = 'fifo'));
select is(pg_temp.fifo_status('8'), 'pending', 'deleting a head lets its group''s next message go');
select public.send_message('fifo', '{"n": 9}', p_group_key := 'alice');
select is(public.purge_queue('fifo', 'pending'), 1::bigint, 'purge the pending head');
select is(pg_temp.fifo_status('9'), 'pending', 'purging a head lets its group''s next message go');
select public.send_message('fifo', '{"n": 10}', p_group_key := 'alice');
select is((select row(depth, blocked, in_flight)::text from public.queue_metrics('fifo')), '(1,1,2)',
  'metrics count blocked messages apart');
select throws_ok($$select public.send_message('fifo', '{}', p_group_key := '')$$, 'PT400',
  'invalid_group_key', 'an empty group key is refused');
select throws_ok($$select public.send_messages('fifo', '[{"payload": {}, "group_key": 5}]')$$, 'PT400',
  'invalid_group_key', 'a group key is a string');
select public.send_message('fifo', '{"n": 11}', p_idempotency_key := 'g-key', p_group_key := 'carol');
select throws_ok($$select public.send_message('fifo', '{"n": 11}', p_idempotency_key := 'g-key',
  p_group_key := 'dave')$$, 'PT409', 'idempotency_key_conflict',
  'a key reused for another group is a conflict');
-- an expired lease with attempts left keeps the head; a blocked message can be skipped
select public.send_messages('fifo-skip', '[{"payload": {"n": 1}, "group_key": "k"},
  {"payload": {"n": 2}, "group_key": "k"}, {"payload": {"n": 3}, "group_key": "k"}]');
create temp table s1 as select * from public.claim_messages('fifo-skip', 10, 30);
update public.message_queue set visible_at = now() - interval '1 second' where id = (select id from s1);
select is((select array_agg(payload ->> 'n') from public.claim_messages('fifo-skip', 10, 30)), array['1'],
  'a head whose lease expires with attempts left is claimed again, its group still behind it');
select is((select count(*)::int from public.archive_messages('fifo-skip',
    array(select id from public.message_queue where queue_name = 'fifo-skip' and payload ->> 'n' = '2'))), 1,
  'a blocked message can be archived');
select is(public.purge_queue('fifo-skip', 'processing'), 1::bigint, 'purge the head in flight');
select is((select array_agg(payload ->> 'n' || ':' || status order by id) from public.message_queue
           where queue_name = 'fifo-skip'), array['2:completed', '3:pending'],
  'the archived message is skipped: the next of the group goes once the head is gone');
-- a claim goes priority by priority, each from its due messages: 20,000
-- higher-priority messages due in an hour cost it nothing
insert into public.message_queue (queue_name, payload, priority, visible_at)
select 'later', '{}', 5, now() + interval '1 hour' from generate_series(1, 20000);
select public.send_message('later', '{"due": true}');
create temp table later_pages as select tests.blocks_read('public.message_queue_claim_idx', 'public.message_queue') as n;
select is((select array_agg(payload ->> 'due') from public.claim_messages('later', 10, 30)), array['true'],
  'the due message is claimed past higher-priority ones due later');
select cmp_ok(tests.blocks_read('public.message_queue_claim_idx', 'public.message_queue') - (select n from later_pages), '<', 40::bigint,
  'without reading them');
delete from public.message_queue where queue_name = 'later';
-- Nor the delayed messages of many priorities: 20,000 messages due in an hour
-- spread over every priority (0-1000), one due now at the lowest. A claim that
-- went priority by priority read each of the 1,001 priorities to find it.
insert into public.message_queue (queue_name, payload, priority, visible_at)
select 'later', '{}', i % 1001, now() + interval '1 hour' from generate_series(1, 20000) i;
select public.send_message('later', '{"due": true}', p_priority := 0);
create temp table spread_pages as select tests.index_blocks_read('public.message_queue') as n;
select is((select array_agg(payload ->> 'due') from public.claim_messages('later', 10, 30)), array['true'],
  'the due message is claimed past delayed ones of every priority');
select cmp_ok(tests.index_blocks_read('public.message_queue')
  - (select n from spread_pages), '<', 40::bigint,
  'reading a few index pages, not one per priority');
delete from public.message_queue where queue_name = 'later';
-- Due (see install_leases): a delayed send waits outside the claim index and a
-- claim takes it from the delayed index once its time has come; a nack's
-- delay takes it out again, and making it visible at once puts it back.
select public.send_message('due-check', '{"n": 1}', p_delay_seconds := 60);
select public.send_message('due-check', '{"n": 2}');
select is((select array_agg((payload ->> 'n') || ':' || due order by id) from public.message_queue
           where queue_name = 'due-check'),
  array['1:false', '2:true'], 'a message is marked due at once only when it is visible now');
update public.message_queue set visible_at = now() - interval '1 second'
where queue_name = 'due-check' and payload ->> 'n' = '1'; -- its time has come
create temp table due_claim as select * from public.claim_messages('due-check', 10, 30);
select is((select array_agg(payload ->> 'n' order by visible_at) from due_claim),
  array['1', '2'], 'a claim takes the messages whose time has come beside the due ones, in claim order');
select is((public.nack_message('due-check', (select id from due_claim where payload ->> 'n' = '1'),
                               (select lease_token from due_claim where payload ->> 'n' = '1'),
                               'later', 30)).due,
  false, 'a nack with a delay is not due');
select is((public.set_message_visibility('due-check',
             (select id from due_claim where payload ->> 'n' = '1'), 0)).due,
  true, 'made visible at once, it is due');
delete from public.message_queue where queue_name = 'due-check';
-- A lease runs from when the claim takes the message, not from when its
-- transaction began: a claim that waited (here, 0.3 s; in life, for another
-- queue's FIFO group lock) handed out leases already ending or ended.
select public.send_message('lease-start', '{}');
select pg_sleep(0.3);
select cmp_ok((select visible_at from public.claim_messages('lease-start', 1, 0.5)),
  '>=', clock_timestamp() + interval '0.4 seconds', 'a claim that waited still hands out its whole lease');
select cmp_ok((public.extend_message_lease('lease-start',
                 (select id from public.message_queue where queue_name = 'lease-start'),
                 (select lease_token from public.message_queue where queue_name = 'lease-start'),
                 0.5)).visible_at,
  '>=', clock_timestamp() + interval '0.4 seconds', 'and so does an extension');
delete from public.message_queue where queue_name = 'lease-start';
-- A flood falling due together is claimed in claim order: in two queues,
-- 1,500 messages of priority 0 whose time came before two more. A claim takes
-- the priority-9 message first, and a claim filtered on the content finds its
-- one match behind the 1,500.
insert into public.message_queue (queue_name, payload, priority, visible_at)
select q, '{"k": "a"}', 0, now() - interval '1 hour' + i * interval '1 ms'
from generate_series(1, 1500) i, unnest(array['flood-1', 'flood-2']) q;
insert into public.message_queue (queue_name, payload, priority, visible_at)
select q, v.payload, v.priority, now() - interval '1 second'
from unnest(array['flood-1', 'flood-2']) q, (values ('{"k": "b"}'::jsonb, 9), ('{"k": "c"}', 0)) v(payload, priority);
select is((select array_agg(payload ->> 'k') from public.claim_messages('flood-1', 1, 30)), array['b'],
  'of a flood falling due together, the highest priority is claimed first');
select is((select array_agg(payload ->> 'k') from public.claim_messages('flood-2', 1, 30, 'w', '{"k": "c"}')),
  array['c'], 'a filtered claim finds its match behind a flood falling due');
-- A claim marks none of them (marked rows stayed locked from the claims beside
-- it until it committed); and it reads them in claim order from an index,
-- where sorting the whole flood read every one of its rows.
select is((select count(*)::int from public.message_queue
           where queue_name like 'flood-_' and status = 'pending' and due), 0,
  'a claim marks none of the flood due');
update pages set n = tests.blocks_read('public.message_queue')
  + tests.index_blocks_read('public.message_queue');
select is((select array_agg(payload ->> 'k') from public.claim_messages('flood-1', 2, 30)),
  array['a', 'a'], 'then the oldest of the flood');
select cmp_ok(tests.blocks_read('public.message_queue') + tests.index_blocks_read('public.message_queue')
  - (select n from pages), '<', 150::bigint, 'reading a few pages of its 1,500 messages');
delete from public.message_queue where queue_name like 'flood-_';
-- a long group is never walked by a claim: its blocked messages are not in the claim index
insert into public.message_queue (queue_name, payload, group_key, status)
select 'fifo-long', jsonb_build_object('i', i), 'long', 'blocked' from generate_series(1, 20000) i;
select public.send_message('fifo-long', '{"other": 1}', p_priority := 0);
create temp table fifo_pages as select tests.blocks_read('public.message_queue_claim_idx', 'public.message_queue') as n;
select is((select count(*)::int from public.claim_messages('fifo-long', 10, 30)), 1,
  'the other message is claimed');
select cmp_ok(tests.blocks_read('public.message_queue_claim_idx', 'public.message_queue') - (select n from fifo_pages), '<', 40::bigint,
  'a claim reads a few pages with 20,000 messages of one group waiting');
delete from public.message_queue where queue_name = 'fifo-long';
-- a lease expiry promotes the groups of the heads it dead-lettered, and reads
-- nothing of the 2,000 other groups waiting behind heads in flight (their
-- rows fill 66 table pages; the claim reads about 40 pages in all, 2 more since
-- a claim's first step probes its queue's delayed rows)
insert into public.message_queue (queue_name, payload, group_key, status, visible_at, attempts,
                                  lease_token)
select 'fifo-many', '{}', 'g' || i, s.status, now() + interval '1 hour', s.attempts, s.token
from generate_series(1, 2000) i,
     (values ('processing', 1, gen_random_uuid()), ('blocked', 0, null)) s(status, attempts, token)
order by i, s.status desc;
select public.send_messages('fifo-expiring', '[{"payload": {"n": 1}, "group_key": "x", "max_attempts": 1},
  {"payload": {"n": 2}, "group_key": "x"}]');
create temp table x1 as select * from public.claim_messages('fifo-expiring', 10, 30);
update public.message_queue set visible_at = now() - interval '1 second' where id = (select id from x1);
create temp table many_pages as
  select tests.blocks_read('public.message_queue', 'public.message_queue_blocked_idx',
                           'public.message_queue_group_head_idx') as n;
select is((select array_agg(payload ->> 'n') from public.claim_messages('fifo-expiring', 10, 30)),
  array['2'], 'the expired head is dead-lettered and the next of its group claimed');
select cmp_ok(tests.blocks_read('public.message_queue', 'public.message_queue_blocked_idx',
                                'public.message_queue_group_head_idx') - (select n from many_pages),
  '<', 45::bigint, 'without looking at the other groups');
select is((select count(*)::int from public.message_queue where queue_name = 'fifo-many'
           and status = 'blocked'), 2000, 'whose messages stay blocked behind their heads');
delete from public.message_queue where queue_name in ('fifo-many', 'fifo-expiring');

-- release: handed back by the lease holder, the attempt not counted
select public.send_message('rel', '{"n": 1}');
create temp table r1 as select * from public.claim_messages('rel', 1, 30);
select is((select count(*)::int from public.release_messages('rel', array[(select id from r1)],
           array[gen_random_uuid()])), 0, 'release needs the lease token');
select is((select row(status, attempts, lease_token)::text from public.release_messages('rel',
           array[(select id from r1)], array[(select lease_token from r1)])),
  row('pending', 0, null::uuid)::text, 'released: pending, the attempt not counted, no lease');
select is((select count(*)::int from public.claim_messages('rel', 1, 30)), 1,
  'and claimable at once');
select throws_ok($$select public.release_messages('rel', array[1, 2], array[gen_random_uuid()])$$,
  'PT400', 'invalid_acks', 'one token per id');
select throws_ok($$select public.release_messages('rel',
    array(select g::bigint from generate_series(1, 1001) g),
    array(select gen_random_uuid() from generate_series(1, 1001)))$$,
  'PT400', 'invalid_acks', 'release takes at most 1,000 ids, as a claim hands out');
select throws_ok($$select public.ack_messages('rel',
    array(select g::bigint from generate_series(1, 1001) g),
    array(select gen_random_uuid() from generate_series(1, 1001)))$$,
  'PT400', 'invalid_acks', 'and so does ack');

-- a send of 1,000 groups takes at most 64 advisory locks (one a bucket of the
-- queue's groups), not one a group: the cluster's lock table is shared
create temp table locks_before as
  select count(*) as n from pg_locks where locktype = 'advisory' and pid = pg_backend_pid();
select is((select count(*)::int from public.send_messages('many-groups', (select jsonb_agg(
    jsonb_build_object('payload', '{}'::jsonb, 'group_key', 'g' || i)) from generate_series(1, 1000) i))),
  1000, 'a send of 1,000 messages in 1,000 groups');
select cmp_ok((select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid())
  - (select n from locks_before), '<=', 64::bigint, 'takes at most 64 group locks');
select is((select count(*)::int from public.message_queue where queue_name = 'many-groups'
           and status = 'pending'), 1000, 'each its group''s head');
select throws_ok($$select public.send_messages('many-groups', '[{"payload": {}, "prio": 5}]')$$,
  'PT400', 'invalid_messages', 'an unknown key is refused');
-- a queue whose only messages are blocked is still listed
insert into public.message_queue (queue_name, payload, group_key, status)
values ('only-blocked', '{}', 'g', 'blocked');
select is((select blocked::int from public.list_queues() where queue_name = 'only-blocked'), 1,
  'list_queues lists a queue whose only message is blocked');
delete from public.message_queue where queue_name in ('many-groups', 'only-blocked');

-- headers, and nulls inside a payload or headers are kept
select is((select row(payload, headers)::text from public.send_message('nulls',
    '{"a": null, "b": {"c": null}}', p_headers := '{"trace": null, "source": "app"}')),
  row('{"a": null, "b": {"c": null}}'::jsonb, '{"trace": null, "source": "app"}'::jsonb)::text,
  'send_message keeps a payload''s and headers'' nulls');
select is((select headers::jsonb from public.send_messages('nulls', '[{"payload": {}}]')), null::jsonb,
  'headers are optional');
select throws_ok($$select public.send_messages('nulls', '[{"payload": {}, "headers": [1]}]')$$,
  'PT400', 'invalid_headers', 'headers must be an object');
select public.send_message('nulls', '{}', p_idempotency_key := 'h-key', p_headers := '{"v": 1}');
select throws_ok($$select public.send_message('nulls', '{}', p_idempotency_key := 'h-key',
  p_headers := '{"v": 2}')$$, 'PT409', 'idempotency_key_conflict',
  'a key reused with other headers is a conflict');
select is((public.send_message('nulls', '{}', p_idempotency_key := 'h-key',
  p_headers := '{"v": 1}')).headers::jsonb, '{"v": 1}'::jsonb, 'the same headers replay');
delete from public.message_queue where queue_name = 'nulls';

-- redrive: a dead letter is due again, attempts back at 0; one of a group goes back to it
create temp table rd as select * from public.send_messages('redrive', '[{"payload": {"n": 1}, "max_attempts": 1},
  {"payload": {"n": 2}, "max_attempts": 1, "group_key": "k"}, {"payload": {"n": 3}, "group_key": "k"}]');
create temp table rd1 as select * from public.claim_messages('redrive', 10, 30);
select public.nack_message('redrive', id, lease_token, 'broken') from rd1;
select is((select array_agg(payload ->> 'n' || ':' || status order by id) from public.message_queue
           where queue_name = 'redrive'), array['1:dead', '2:dead', '3:pending'],
  'two dead letters, and the group''s next message went');
select is((select row(status, attempts, finished_at)::text from public.redrive_message('redrive',
    (select id from rd where payload ->> 'n' = '1'))), '(pending,0,)',
  'a redriven message is pending with its attempts back at 0');
select is((select status::text from public.redrive_message('redrive', (select id from rd where payload ->> 'n' = '2'))),
  'blocked', 'a redriven message of a group waits behind the group''s head');
select throws_ok(format($$select public.redrive_message('redrive', %s)$$,
  (select id from rd where payload ->> 'n' = '3')), 'PT409', 'message_not_dead',
  'only dead letters are redriven');
select throws_ok(format($$select public.redrive_message('emails', %s)$$,
  (select id from rd where payload ->> 'n' = '1')), 'PT404', 'message_not_found',
  'redrive acts in its own queue only');
create temp table rd2 as select * from public.claim_messages('redrive', 10, 30);
select public.ack_message('redrive', id, lease_token) from rd2 where payload ->> 'n' = '3';
select is((select array_agg(payload ->> 'n' || ':' || status order by id) from public.message_queue
           where queue_name = 'redrive'), array['1:processing', '2:pending', '3:completed'],
  'the redriven message of the group goes once the head is done');
delete from public.message_queue where queue_name = 'redrive';

-- content-filtered claims (pgmq's read conditional): payload @> filter
create temp table cf as select * from public.send_messages('filtered', '[
  {"payload": {"kind": "email"}},
  {"payload": {"kind": "sms", "to": "a"}},
  {"payload": {"kind": "sms", "to": "b"}, "priority": 5},
  {"payload": {"kind": "sms", "to": "c"}, "delay_seconds": 3600},
  {"payload": {"kind": "push", "meta": {"region": "kigali", "zone": 1}}}]');
select is((select array_agg(payload ->> 'to') from public.claim_messages('filtered', 1, 30, 'f',
  '{"kind": "sms"}')), array['b'], 'a filtered claim takes the first matching message in claim order');
select is((select array_agg(payload ->> 'to') from public.claim_messages('filtered', 1, 30, 'f',
  '{"kind": "sms"}')), array['a'],
  'its limit counts matching messages: an older one that does not match is passed over');
select is((select count(*)::int from public.claim_messages('filtered', 10, 30, 'f', '{"kind": "sms"}')),
  0, 'a filtered claim skips delayed messages too');
select is((select array_agg(payload ->> 'kind') from public.claim_messages('filtered', 10, 30, 'f',
  '{"meta": {"region": "kigali"}}')), array['push'], 'a filter may match inside nested objects');
select is((select array_agg(payload ->> 'kind' || coalesce(payload ->> 'to', '') || ':' || status
                            || ':' || attempts order by id)
           from public.message_queue where queue_name = 'filtered'),
  array['email:pending:0', 'smsa:processing:1', 'smsb:processing:1', 'smsc:pending:0',
        'push:processing:1'], 'messages a filter passed over are left as they were');
select throws_ok($$select public.claim_messages('filtered', 10, 30, 'f', '[{"kind": "email"}]')$$,
  'PT400', 'invalid_filter', 'a filter must be a JSON object, not an array');
select throws_ok($$select public.claim_messages('filtered', 10, 30, 'f', '"email"')$$,
  'PT400', 'invalid_filter', 'nor a string');
select throws_ok($$select public.claim_messages('filtered', 10, 30, 'f', 'null'::jsonb)$$,
  'PT400', 'invalid_filter', 'nor JSON null');
select is((select status || ':' || attempts from public.message_queue
           where queue_name = 'filtered' and payload ->> 'kind' = 'email'), 'pending:0',
  'a refused filter claims nothing');
select is((select array_agg(payload ->> 'kind') from public.claim_messages('filtered', 10, 30, 'f',
  '{}')), array['email'], 'an empty filter claims every message');
delete from public.message_queue where queue_name = 'filtered';

-- set_vt: when a message becomes visible, whoever holds it
create temp table vt as select * from public.send_messages('vt', '[
  {"payload": {"n": 1}, "delay_seconds": 3600}, {"payload": {"n": 2}}, {"payload": {"n": 3}},
  {"payload": {"n": 4}}, {"payload": {"n": 5}, "max_attempts": 1},
  {"payload": {"n": 6}, "group_key": "g"}, {"payload": {"n": 7}, "group_key": "g"}]');
create temp table vtid as select (payload ->> 'n')::int as n, id from vt;
select is((select visible_at from public.set_message_visibility('vt', (select id from vtid where n = 1), 0)),
  now(), 'set_vt 0 makes a delayed message visible now');
select is((select visible_at from public.set_message_visibility('vt', (select id from vtid where n = 2), 600)),
  now() + interval '600 seconds', 'set_vt re-times a pending message');
select is((select visible_at from public.set_message_visibility('vt', (select id from vtid where n = 7), 60.5)),
  now() + interval '60.5 seconds', 'and a blocked one (it waits for its group as well)');
create temp table vt1 as select * from public.claim_messages('vt', 10, 30, 'vt-1');
select is((select array_agg(payload ->> 'n' order by id) from vt1), array['1', '3', '4', '5', '6'],
  'a claim takes the message made visible, and not the one re-timed');
select is((select row(status, visible_at, lease_token)::text from public.set_message_visibility('vt',
    (select id from vtid where n = 3), 0)),
  (select row('processing'::text, now(), lease_token)::text from vt1 where payload ->> 'n' = '3'),
  'set_vt of an in-flight message ends its lease then; it stays with its holder until swept');
select is((select visible_at from public.set_message_visibility('vt', (select id from vtid where n = 4), 3600)),
  now() + interval '3600 seconds', 'set_vt extends an in-flight message''s lease');
select is((select row(payload ->> 'n', attempts)::text from public.claim_messages('vt', 10, 30, 'vt-2')),
  '(3,2)', 'the next claim sweeps the ended lease and takes the message again, a new attempt');
select throws_ok(format($$select public.ack_message('vt', %s, %L)$$, (select id from vtid where n = 3),
  (select lease_token from vt1 where payload ->> 'n' = '3')), 'PT409', 'lease_lost',
  'its first holder''s ack then fails: lease_lost');
select is((public.ack_message('vt', (select id from vtid where n = 4),
  (select lease_token from vt1 where payload ->> 'n' = '4'))).status::text, 'completed',
  'the holder of an extended lease still acks');
select public.nack_message('vt', id, lease_token, 'broken') from vt1 where payload ->> 'n' = '5';
select throws_ok(format($$select public.set_message_visibility('vt', %s, 0)$$,
  (select id from vtid where n = 4)), 'PT409', 'message_finished', 'a completed message is not re-timed');
select throws_ok(format($$select public.set_message_visibility('vt', %s, 0)$$,
  (select id from vtid where n = 5)), 'PT409', 'message_finished', 'nor a dead one');
select throws_ok(format($$select public.set_message_visibility('emails', %s, 0)$$,
  (select id from vtid where n = 2)), 'PT404', 'message_not_found', 'set_vt acts in its own queue only');
select is((select array_agg(payload ->> 'n' order by id) from public.set_messages_visibility('vt',
  (select array_agg(id) from vtid where n in (2, 4, 5)) || 0::bigint, 0)), array['2'],
  'the batch form returns the messages set, leaving out finished and unknown ones');
create temp table vt_before as select id, visible_at, updated_at from public.message_queue where queue_name = 'vt';
select throws_ok(format($$select public.set_message_visibility('vt', %s, -1)$$,
  (select id from vtid where n = 2)), 'PT400', 'invalid_visibility', 'a negative time is refused');
select throws_ok(format($$select public.set_message_visibility('vt', %s, 31536001)$$,
  (select id from vtid where n = 2)), 'PT400', 'invalid_visibility', 'more than a year is refused');
select throws_ok(format($$select public.set_message_visibility('vt', %s, 'NaN')$$,
  (select id from vtid where n = 2)), 'PT400', 'invalid_visibility', 'NaN is refused');
select throws_ok(format($$select public.set_message_visibility('vt', %s, null)$$,
  (select id from vtid where n = 2)), 'PT400', 'invalid_visibility', 'a time is required');
select throws_ok($$select public.set_messages_visibility('vt', '{}', 0)$$, 'PT400',
  'invalid_message_ids', 'the batch form needs ids');
select throws_ok($$select public.set_message_visibility('Bad Queue', 1, 0)$$, 'PT400',
  'invalid_queue_name', 'queue names are checked');
select is((select count(*)::int from public.message_queue q join vt_before b using (id)
           where q.visible_at = b.visible_at and q.updated_at = b.updated_at),
  (select count(*)::int from vt_before), 'refused set_vt calls change nothing');
delete from public.message_queue where queue_name = 'vt';

-- total_messages: every message a queue was sent, stored or since purged or deleted
create temp table tm as select * from public.send_messages('counted', '[{"payload": {}}, {"payload": {}},
  {"payload": {}}, {"payload": {}}]');
select is((select row(total, total_messages)::text from public.queue_metrics('counted')), '(4,4)',
  'total_messages counts the messages sent');
select public.delete_message('counted', (select min(id) from tm));
select public.delete_messages('counted', array[(select min(id) from tm), (select id from vtid where n = 1)]);
select public.pop_messages('counted', 1);
select public.purge_queue('counted', 'completed');
select is((select row(total, total_messages)::text from public.queue_metrics('counted')), '(2,4)',
  'and keeps counting those deleted or purged (ids not deleted are not counted)');
select public.purge_queue('counted');
select public.send_message('counted', '{}');
select is((select row(total, total_messages)::text from public.list_queues() where queue_name = 'counted'),
  '(1,5)', 'every queue''s metrics count them too');
select is((select total_messages from public.queue_metrics('never-sent')), 0::bigint,
  'a queue never sent to has none');
select public.purge_queue('counted');

-- RLS matrix
create temp table ids as select tests.create_user() as alice, tests.create_user() as bob;
grant select on ids to authenticated, anon, service_role;
-- the queues users may send to (the service role sends anywhere)
insert into private.user_queues (queue_name, max_priority) values ('uploads', 0), ('ordered', 5);

select tests.authenticate_as((select alice from ids));
select throws_ok($$select public.send_message('payments', '{"amount": 5000}')$$, 'PT403',
  'queue_not_open', 'users cannot send to a queue not open to them');
select throws_ok($$select public.send_messages('ordered', '[{"payload": {}, "priority": 5},
  {"payload": {}, "priority": 6}]')$$, 'PT403', 'priority_not_allowed',
  'nor above the queue''s priority for users');
select is((public.send_message('uploads', '{"f": 1}', p_idempotency_key := 'same')).user_id,
  (select alice from ids), 'a user''s message carries their id');
select is((select count(*)::int from public.message_queue), 1, 'alice sees only her own messages');
select throws_ok($$select public.claim_messages('uploads')$$, '42501', null, 'users cannot claim');
select throws_ok($$select public.claim_messages('uploads', 10, 30, null, '{"f": 1}')$$, '42501', null,
  'nor claim with a filter');
select throws_ok(format($$select public.set_message_visibility('uploads', %s, 0)$$,
  (select id from public.message_queue where queue_name = 'uploads')), '42501', null,
  'users cannot set when a message becomes visible, not even their own');
select throws_ok(format($$select public.set_messages_visibility('uploads', array[%s], 0)$$,
  (select id from public.message_queue where queue_name = 'uploads')), '42501', null,
  'nor in a batch');
select throws_ok($$select public.pop_messages('uploads')$$, '42501', null, 'users cannot pop');
select throws_ok($$select public.list_queues()$$, '42501', null, 'users cannot list the queues');
select throws_ok($$select public.redrive_messages('uploads', '{1}')$$, '42501', null,
  'users cannot redrive');

select is((public.send_message('ordered', '{"f": 1}', p_group_key := 'k')).group_key::text,
  (select alice from ids)::text || ':k', 'a user''s group key is stored under their id');

select tests.authenticate_as((select bob from ids));
select is((public.send_message('uploads', '{"f": 2}', p_idempotency_key := 'same')).user_id,
  (select bob from ids), 'idempotency keys are per sender: bob gets his own message, not alice''s');
select is((public.send_message('ordered', '{"f": 2}', p_group_key := 'k')).status::text, 'pending',
  'group keys are per sender: bob''s message does not queue behind alice''s');
select is((public.send_message('ordered', '{"f": 3}', p_group_key := 'k')).status::text, 'blocked',
  'but behind his own');
select is((public.send_message('ordered', '{"f": 4}', p_group_key := repeat('k', 128))).status::text,
  'pending', 'a user''s key may have 128 characters');

select tests.authenticate_as_anon();
select throws_ok($$select public.send_message('uploads', '{}')$$, '42501', null, 'anon cannot send');
select throws_ok($$select public.set_message_visibility('uploads', 1, 0)$$, '42501', null,
  'anon cannot set visibility');
select throws_ok($$select public.claim_messages('uploads', 10, 30, null, '{}')$$, '42501', null,
  'nor claim with a filter');


select tests.authenticate_as_service_role();
select throws_ok($$update public.message_queue set status = 'completed', lease_token = null$$, '42501', null,
  'service_role cannot settle messages past the lease functions');
select throws_ok($$insert into public.message_queue (queue_name, message_type, payload) values ('uploads', 'x', '{}')$$,
  '42501', null, 'service_role cannot insert messages past send_message');

-- A claim answers at most max_bytes of payload and headers (at least one
-- message); the rest go back at once, attempt not counted.
select public.send_message('paged', jsonb_build_object('blob', repeat('x', 600), 'n', i))
from generate_series(1, 3) i;
create temp table pg1 as select * from public.claim_messages('paged', 10, 30, p_max_bytes := 1000);
select is((select array_agg((payload ->> 'n')::int order by id) from pg1), array[1, 2],
  'a claim stops after the message that reaches max_bytes');
select is((select status || ':' || attempts || ':' || (lease_token is null)::text
           from public.message_queue where queue_name = 'paged' and payload ->> 'n' = '3'),
  'pending:0:true', 'and hands back the messages past it, attempt not counted');
select is((select count(*)::int from public.claim_messages('paged', 10, 30, p_max_bytes := 1)), 1,
  'the next claim takes it, one message however small max_bytes is');
select is((select count(*)::int from public.claim_messages('paged', 10, 30)), 0,
  'and none was left behind');
select throws_ok($$select public.claim_messages('paged', 10, 30, p_max_bytes := 0)$$, 'PT400',
  'invalid_max_bytes', 'max_bytes must be at least 1');
select public.send_message('paged', jsonb_build_object('blob', repeat('x', 600), 'n', i))
from generate_series(4, 5) i;
select is((select array_agg((payload ->> 'n')::int) from public.pop_messages('paged', 10, p_max_bytes := 10)),
  array[4], 'pop takes max_bytes too, and completes only what it answers');
select is((select status from public.message_queue where queue_name = 'paged' and payload ->> 'n' = '5'),
  'pending', 'leaving the rest pending');
select * from finish();
rollback;
