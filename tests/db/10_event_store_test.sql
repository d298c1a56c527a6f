-- Event store: the spec's calls, versions, expected versions, batches,
-- validation, the commit-safe global position, and the RLS matrix.
begin;
select plan(95);

-- the spec's calls, verbatim
select is((public.append_event(
  p_aggregate_id := 'trip-123',
  p_aggregate_type := 'trip',
  p_event_type := 'trip_completed',
  p_payload := '{"fare": 5000}'::jsonb
)).version::bigint, 1::bigint, 'append_event works as the spec calls it and starts at version 1');
select is((select count(*)::int from public.get_aggregate_events(
  p_aggregate_type := 'trip',
  p_aggregate_id := 'trip-123'
)), 1, 'get_aggregate_events works as the spec calls it');

select is((public.append_event('trip-123', 'trip', 'fare_adjusted', '{"fare": 4500}',
  p_expected_version := 1, p_correlation_id := 'corr-1', p_causation_id := 'cmd-9',
  p_metadata := '{"source": "test"}')).version::bigint, 2::bigint, 'an expected version that matches appends');
select is((select correlation_id || '/' || causation_id || '/' || (metadata ->> 'source')
           from public.event_store where version = 2 and aggregate_id = 'trip-123'),
  'corr-1/cmd-9/test', 'correlation, causation and metadata are kept');
select last_value as seq_before from public.event_store_id_seq \gset
select throws_ok($$select public.append_event('trip-123', 'trip', 'x', '{}', p_expected_version := 1)$$,
  'PT409', 'version_conflict', 'a stale expected version is a conflict');
select is((select last_value from public.event_store_id_seq), :seq_before::bigint,
  'a conflict does not start writing the event (no id taken)');
select throws_ok($$select public.append_event('trip-123', 'trip', 'x', '{}', p_expected_version := -1)$$,
  'PT409', 'version_conflict', 'expected version -1 means no events yet');
select throws_ok($$select public.append_event('trip-123', 'trip', 'x', '{}',
                    p_expected_version := 9223372036854775807)$$,
  'PT409', 'version_conflict', 'the largest expected version is a conflict, not an overflow');
select throws_ok($$select public.append_event('trip-huge', 'trip', 'x', '{}',
                    p_expected_version := 9223372036854775807)$$,
  'PT409', 'version_conflict', 'so it is for an aggregate with no events yet');
select is((public.append_event('trip-new', 'trip', 'trip_created', '{}', p_expected_version := -1)).version::bigint,
  1::bigint, 'expected version -1 starts a new aggregate');
select is((public.append_event('trip-new', 'trip', 'trip_started', '{}')).version::bigint, 2::bigint,
  'without an expected version an append simply takes the next version');
select is((select count(*)::int from public.event_store where aggregate_id = 'trip-123'), 2,
  'a conflict writes nothing');
select is(tests.error_details($$select public.append_event('trip-123', 'trip', 'x', '{}',
                                p_expected_version := 1)$$),
  '{"error": "version_conflict", "aggregate_type": "trip", "aggregate_id": "trip-123",
    "expected_version": 1, "current_version": 2}'::jsonb,
  'a conflict names the version the aggregate is at');
select is(tests.error_details($$select public.append_event('ghost', 'trip', 'x', '{}',
                                p_expected_version := 3)$$) -> 'current_version',
  '0'::jsonb, 'an expected version above 0 on an aggregate without events is a conflict at 0');
select is((select count(*)::int from public.event_streams where aggregate_id = 'ghost'), 0,
  'and it leaves no stream behind');

-- bad input is refused and writes nothing
select throws_ok($$select public.append_events('[{"aggregate_type": "trip", "aggregate_id": "trip-123",
    "event_type": "x", "payload": {}, "expectedVersion": 0}]')$$, 'PT400', 'invalid_events',
  'an unknown key (a misspelled expected_version) is refused, not dropped');
select throws_ok($$select public.append_event('trip-123', 'trip', 'x', '[1]')$$,
  'PT400', 'invalid_payload', 'a payload must be an object');
-- a megabyte at most, as stored, for the payload and for the metadata (an
-- event is a fact, not a file; a page of history must not pass gigabytes)
select throws_ok($$select public.append_event('big-1', 'trip', 'x',
    jsonb_build_object('blob', repeat('x', 1048576)))$$,
  'PT413', 'payload_too_large', 'a payload over a megabyte is refused');
select throws_ok($$select public.append_event('big-1', 'trip', 'x', '{}',
    p_metadata := jsonb_build_object('blob', repeat('x', 1048576)))$$,
  'PT413', 'payload_too_large', 'and so is metadata over a megabyte');
-- measured as the text readers are sent, not as stored: nine 22-byte numbers
-- print as 1.2 MB, and 200,000 control characters print as six bytes each
select throws_ok($$select public.append_event('big-1', 'trip', 'x',
    (select jsonb_object_agg(i::text, 1e131071) from generate_series(1, 9) i))$$,
  'PT413', 'payload_too_large', 'a payload of numbers that print as over a megabyte is refused');
select throws_ok($$select public.append_event('big-1', 'trip', 'x', '{}',
    p_metadata := jsonb_build_object('blob', repeat(chr(1), 200000)))$$,
  'PT413', 'payload_too_large', 'and so is metadata whose escapes print as over a megabyte');
-- a number beyond a double's range is refused before anything is printed: 8,000
-- of 1e131071 printed a gigabyte, past the statement timeout
set local statement_timeout = '1s';
select throws_ok($$select public.append_event('big-1', 'trip', 'x',
    ('{"a": [' || (select string_agg('1e131071', ',') from generate_series(1, 8000)) || ']}')::jsonb)$$,
  'PT413', 'payload_too_large', 'a payload of numbers beyond a double''s range is refused at once');
reset statement_timeout;
select throws_ok($$select public.append_event('big-1', 'trip', 'x', '{"tiny": 1e-400}')$$,
  'PT413', 'payload_too_large', 'and so is one too small for a double');
-- 0e-16383 is 8 bytes stored and prints as 16 KB of zeros: 30,000 of them in
-- a 300 KB call printed 490 MB (1.2 s) before the 413. Numbers with more than
-- 400 decimal places (a double's smallest prints with 324) are refused as
-- the numbers beyond a double's range are, before anything is printed.
set local statement_timeout = '1s';
select throws_ok($$select public.append_event('big-1', 'trip', 'x',
    ('{"a": [' || (select string_agg('0e-16383', ',') from generate_series(1, 30000)) || ']}')::jsonb)$$,
  'PT413', 'payload_too_large', 'a payload of zeros with thousands of decimal places is refused at once');
reset statement_timeout;
select throws_ok($$select public.append_event('big-1', 'trip', 'x', '{"z": -0e-401}')$$,
  'PT413', 'payload_too_large', 'a number with 401 decimal places is refused');
select throws_ok(format($$select public.append_event('deep-1', 'trip', 'x', %L)$$,
    '{"a": ' || repeat('[', 12000) || repeat(']', 12000) || '}'),
  'PT413', 'payload_too_large', 'a payload nested 12,000 levels deep is refused');
select ok(not private.json_too_large(('{"a": ' || repeat('[', 999) || '1' || repeat(']', 999) || '}')::jsonb),
  'one nested 1,000 levels passes');
select ok(private.json_too_large(('{"a": ' || repeat('[', 1000) || '1' || repeat(']', 1000) || '}')::jsonb),
  'one nested 1,001 levels does not');
select ok(not private.json_too_large(
    '{"z": 0e-400, "zero": 0, "minus": -0.0, "least": 5e-324, "most": 1.7976931348623157e308}'),
  'numbers up to 400 decimal places, and every double, pass');
select lives_ok($$select public.append_event('big-3', 'trip', 'x',
    '{"max": 1.7976931348623157e308, "min": 5e-324, "neg": -1e300}')$$,
  'numbers a double holds are fine');
delete from public.event_store where aggregate_id = 'big-3';
delete from public.event_stream_members where aggregate_id = 'big-3';
delete from public.event_streams where aggregate_id = 'big-3';
select lives_ok($$select public.append_event('big-2', 'trip', 'x',
    jsonb_build_object('blob', repeat('x', 1000000)))$$, 'a payload just under a megabyte is fine');
delete from public.event_store where aggregate_id = 'big-2';
delete from public.event_stream_members where aggregate_id = 'big-2';
delete from public.event_streams where aggregate_id = 'big-2';
select throws_ok($$select public.append_event('trip-123', 'trip', 'x', '{}', p_expected_version := -2)$$,
  'PT400', 'invalid_expected_version', 'expected versions below -1 are refused');
select throws_ok($$select public.append_event('trip-123', 'Trip!', 'x', '{}')$$,
  '23514', null, 'aggregate types are checked');
select throws_ok($$select public.append_event('trip-123', 'trip', 'x', '{}', p_metadata := '"m"')$$,
  'PT400', 'invalid_metadata', 'metadata must be an object');
select throws_ok($$select public.append_event(repeat('x', 257), 'trip', 'x', '{}')$$,
  '23514', null, 'aggregate ids are at most 256 characters');
select throws_ok($$select public.append_event('..', 'trip', 'x', '{}')$$,
  '23514', null, 'an aggregate id of .. is refused (no URL can address it)');
select throws_ok($$select public.append_events('[{"aggregate_type": "trip", "aggregate_id": ".",
  "event_type": "x", "payload": {}}]')$$,
  '23514', null, 'an aggregate id of . is refused, in a batch too');
select throws_ok($$select public.append_event('trip-123', 'Trip!', 'x', '{}', p_expected_version := 2)$$,
  '23514', null, 'with an expected version too');
select throws_ok($$select public.append_event(repeat('x', 257), 'trip', 'x', '{}', p_expected_version := 1)$$,
  '23514', null, 'aggregate ids as well');
select throws_ok($$select public.append_event('trip-123', null, 'x', '{}', p_expected_version := 2)$$,
  '23502', null, 'a null aggregate type is refused, not a conflict');
select throws_ok($$select public.append_event(null, 'trip', 'x', '{}', p_expected_version := 2)$$,
  '23502', null, 'a null aggregate id too');
-- the column rules hold for any writer, not only append_event
select throws_ok($$insert into public.event_store (aggregate_type, aggregate_id, event_type, version, payload)
                  values ('trip', 'direct', '9lives', 1, '{}')$$,
  '23514', null, 'event types are checked on every insert');
select throws_ok($$insert into public.event_store (aggregate_type, aggregate_id, event_type, version, payload)
                  values ('trip', 'direct', 'x', 1, '[]')$$,
  '23514', null, 'payloads are objects on every insert');
select is((select version::bigint from public.event_streams where aggregate_id = 'trip-123'), 2::bigint,
  'refused appends leave the stream version alone');

-- batches: atomic, in order, several aggregates
select is((select array_agg(version::bigint order by id) from public.append_events(
  '[{"aggregate_type":"trip","aggregate_id":"b1","event_type":"a","payload":{}},
    {"aggregate_type":"trip","aggregate_id":"b1","event_type":"b","payload":{},"expected_version":1},
    {"aggregate_type":"wallet","aggregate_id":"w1","event_type":"c","payload":{}}]')),
  array[1, 2, 1]::bigint[], 'a batch appends to several aggregates in array order');
select throws_ok($$select public.append_events(
  '[{"aggregate_type":"trip","aggregate_id":"b1","event_type":"d","payload":{}},
    {"aggregate_type":"trip","aggregate_id":"b2","event_type":"e","payload":{},"expected_version":7}]')$$,
  'PT409', 'version_conflict', 'one conflict refuses the whole batch');
select is((select count(*)::int from public.event_store where aggregate_id in ('b1', 'b2')), 2,
  'nothing of a refused batch is kept');
select is((select version::bigint from public.event_streams where aggregate_id = 'b1'), 2::bigint,
  'the refused batch did not move versions');

-- from a version, in version order
select is((select array_agg(version::bigint) from public.get_aggregate_events('trip', 'b1', p_from_version := 2)),
  array[2]::bigint[], 'history from a given version');

-- the global position: numbered after commit, dense
select is((select count(*)::int from public.event_store where position is null), 7,
  'events are written without a position');
select is(public.sequence_events(), 0, 'events of a running transaction are not numbered yet');

-- fixtures for the RLS matrix
create temp table ids as select tests.create_user() as alice, tests.create_user() as bob;
grant select on ids to authenticated, anon, service_role;

select tests.authenticate_as((select alice from ids));
select throws_ok(format($$select public.append_event('ride-a', 'trip', 'trip_requested', '{}',
  p_user_id := %L)$$, (select bob from ids)), 'PT403', 'forbidden',
  'a user cannot append as another user');
select is((public.append_event('ride-a', 'trip', 'trip_requested', '{}',
  p_user_id := (select alice from ids))).user_id, (select alice from ids),
  'a user may name themselves');
select is((select count(*)::int from public.event_store), 1, 'alice sees only her aggregates');
select is((select count(*)::int from public.get_aggregate_events('trip', 'trip-123')), 0,
  'alice cannot read an aggregate without her events');
select throws_ok($$select public.append_event('trip-123', 'trip', 'x', '{}')$$,
  'PT404', 'aggregate_not_found', 'alice cannot append to an aggregate that is not hers');
select throws_ok($$select public.append_event('trip-123', 'trip', 'x', '{}', p_expected_version := 0)$$,
  'PT404', 'aggregate_not_found',
  'a wrong expected version on another''s aggregate is still 404, never a 409 showing its version');
select throws_ok($$select public.append_event('trip-123', 'trip', 'x', '{}', p_expected_version := 2)$$,
  'PT404', 'aggregate_not_found', 'the right expected version on another''s aggregate is 404 too');
select throws_ok($$select * from public.read_event_stream()$$, '42501', null,
  'users cannot read the global stream');
select throws_ok($$insert into public.event_store (aggregate_type, aggregate_id, event_type, version, payload)
                  values ('trip', 'forged', 'x', 1, '{}')$$, '42501', null, 'users cannot insert events directly');

select tests.authenticate_as((select bob from ids));
select is((select count(*)::int from public.get_aggregate_events('trip', 'ride-a')), 0,
  'bob does not see alice''s aggregate');

select tests.authenticate_as_anon();
select throws_ok($$select count(*) from public.event_store$$, '42501', null, 'anon cannot read events');
select throws_ok($$select public.append_event('t', 'trip', 'x', '{}')$$, '42501', null,
  'anon cannot append');

select tests.authenticate_as_service_role();
select is((select count(*)::int from public.event_store), 8, 'service_role sees every event');
select is((select version::bigint from public.event_streams where aggregate_id = 'trip-123'), 2::bigint,
  'alice''s refused appends left trip-123 at version 2');
select ok((select user_id from public.append_event('svc-1', 'trip', 'x', '{}',
  p_user_id := (select bob from ids))) = (select bob from ids),
  'service_role may append on a user''s behalf');
select is((select count(*)::int from public.event_stream_members
           where aggregate_id = 'svc-1' and user_id = (select bob from ids)), 1,
  'the user the service role appends for may read the aggregate');
select is((select count(*)::int from public.read_event_stream(0, 100)), 0,
  'the stream holds nothing while the writing transaction is open');
select throws_ok($$insert into public.event_store (aggregate_type, aggregate_id, event_type, version, payload)
                  values ('trip', 'svc-1', 'x', 9, '{}')$$, '42501', null,
  'service_role cannot insert events past append_event');
select throws_ok($$update public.event_streams set version = 9 where aggregate_id = 'svc-1'$$,
  '42501', null, 'service_role cannot move a stream''s version');
select throws_ok($$update public.event_store set position = 1 where aggregate_id = 'svc-1'$$,
  '42501', null, 'service_role cannot set positions');
select throws_ok($$delete from public.event_stream_members$$, '42501', null,
  'service_role cannot change who reads an aggregate');

-- Ownership: bob starts aggregate ids the backend will use later, one alone
-- and two in a batch; the backend's events for alice never land in them.
select tests.authenticate_as((select bob from ids));
select is((public.append_event('trip-squat', 'trip', 'trip_requested', '{"fake": true}')).version::bigint,
  1::bigint, 'a user may start any free aggregate id');
select is((select count(*)::int from public.append_events(
  '[{"aggregate_type": "trip", "aggregate_id": "squat-1", "event_type": "a", "payload": {}},
    {"aggregate_type": "trip", "aggregate_id": "squat-2", "event_type": "a", "payload": {}}]')), 2,
  'or several in a batch');
select tests.authenticate_as_service_role();
select throws_ok(format($$select public.append_event(p_aggregate_id := 'trip-squat',
  p_aggregate_type := 'trip', p_event_type := 'trip_completed', p_payload := '{"fare": 5000}'::jsonb,
  p_user_id := %L)$$, (select alice from ids)), 'PT409', 'aggregate_owned',
  'the service role cannot write alice''s event into an aggregate bob started');
select throws_ok($$select public.append_event(p_aggregate_id := 'trip-squat',
  p_aggregate_type := 'trip', p_event_type := 'trip_completed', p_payload := '{"fare": 5000}'::jsonb)$$,
  'PT409', 'aggregate_owned', 'nor an event without a user (bob would read it)');
select throws_ok(format($$select public.append_event('trip-squat', 'trip', 'trip_completed', '{}',
  p_expected_version := 1, p_user_id := %L)$$, (select alice from ids)), 'PT409', 'aggregate_owned',
  'nor with the expected version it is at');
select throws_ok(format($$select public.append_events(
  '[{"aggregate_type": "trip", "aggregate_id": "squat-2", "event_type": "b", "payload": {},
     "user_id": %s}]')$$, to_json((select alice from ids))), 'PT409', 'aggregate_owned',
  'a stream a user''s batch started is theirs too');
select is((public.append_event('trip-squat', 'trip', 'fare_set', '{}',
  p_user_id := (select bob from ids))).version::bigint, 2::bigint,
  'the service role may add the owner''s own events');
select is((select array_agg(user_id) from public.event_stream_members
           where aggregate_id in ('trip-squat', 'squat-2')),
  array[(select bob from ids), (select bob from ids)], 'and bob is still their only member');
select is((select count(*)::int from public.event_store
           where aggregate_id in ('trip-squat', 'squat-2')
             and user_id is distinct from (select bob from ids)), 0,
  'no event of anyone else is in them');

-- The stream row is found by its key even while event_streams is a page or
-- two, where the planner would rather read the whole table: a scan that reads
-- every version HOT updates leave on the page, at every append. (Until it is
-- first vacuumed or analyzed the planner takes any table for ten pages.)
reset role;
analyze public.event_streams;
select tests.authenticate_as_service_role();
select seq_scan as streams_scanned from pg_stat_xact_user_tables
where relid = 'public.event_streams'::regclass \gset
select count(public.append_event('trip-scan', 'trip', 'trip_paused', '{}',
                                 p_expected_version := v))
from generate_series(-1, 8) v where v <> 0;
select is((select seq_scan from pg_stat_xact_user_tables
           where relid = 'public.event_streams'::regclass), :streams_scanned::bigint,
  'appends with an expected version read their stream by key, however small the table');

-- A batch finds its streams by key however stale the statistics: 20,000
-- streams the planner has never seen, and the batch does not scan them all.
reset role;
select throws_ok($$insert into public.event_streams (aggregate_type, aggregate_id, version)
  values ('trip', 'negative', -1)$$, '23514', null, 'a stream''s version is never negative');
select throws_ok($$insert into public.event_store (aggregate_type, aggregate_id, event_type, version, payload)
  values ('trip', 'zero', 'x', 0, '{}')$$, '23514', null, 'an event''s version is at least 1');
insert into public.event_streams (aggregate_type, aggregate_id)
select 'bulk', 'bulk-' || i from generate_series(1, 20000) i;
discard plans; -- plan the batch afresh, against the table as it is now
create temp table scans as
  select seq_scan from pg_stat_xact_user_tables where relname = 'event_streams';
grant select on scans to service_role;
select tests.authenticate_as_service_role();
select public.append_events('[{"aggregate_type":"bulk","aggregate_id":"bulk-1","event_type":"a","payload":{}},
  {"aggregate_type":"bulk","aggregate_id":"new-1","event_type":"a","payload":{}}]');
select is((select seq_scan from pg_stat_xact_user_tables where relname = 'event_streams')
          - (select seq_scan from scans), 0::bigint, 'a batch looks its streams up by index only');

-- A projection of a rare type reads a few of the events' pages, not every
-- event before it: 20,000 sequenced trip events, then three wallet events.
-- (Heap pages only: planning alone reads every partition index's metapage.)
reset role;
insert into public.event_store (aggregate_type, aggregate_id, event_type, version, payload, position)
select 'trip', 'bulk-' || i, 'trip_requested', 1, '{}', 1000000 + i from generate_series(1, 20000) i;
insert into public.event_store (aggregate_type, aggregate_id, event_type, version, payload, position)
select 'wallet', 'w-bulk', 'wallet_credited', i, '{}', 1020000 + i from generate_series(1, 3) i;
discard plans;
create temp view event_store_pages as
  select sum(pg_stat_get_xact_blocks_fetched(relid))::bigint as n
  from pg_partition_tree('public.event_store') where isleaf;
create temp table pages as select n from event_store_pages;
select is((select array_agg(version::bigint order by position)
           from public.read_event_stream(1000000, 10, p_aggregate_type := 'wallet')),
  array[1, 2, 3]::bigint[], 'a stream read of one aggregate type: its events, in position order');
select cmp_ok((select n from event_store_pages) - (select n from pages), '<', 20::bigint,
  'and it reads a few pages');
update pages set n = (select n from event_store_pages);
select is((select array_agg(version::bigint order by position)
           from public.read_event_stream(1000000, 10, p_event_type := 'wallet_credited')),
  array[1, 2, 3]::bigint[], 'a stream read of one event type: its events, in position order');
select cmp_ok((select n from event_store_pages) - (select n from pages), '<', 20::bigint,
  'and it reads a few pages');

-- A page of at most max_bytes: events in order while the JSON text of the
-- payloads and metadata before each is under it (the first always comes).
-- The reader stops fetching there, instead of reading its whole limit first.
reset role;
insert into public.event_store (aggregate_type, aggregate_id, event_type, version, payload, position)
select 'ledger', 'l-big', 'posted', i, jsonb_build_object('blob', repeat('x', 400000)), 1030000 + i
from generate_series(1, 4) i;
select tests.authenticate_as_service_role();
select is((select array_agg(version::bigint order by version)
           from public.get_aggregate_events('ledger', 'l-big', p_max_bytes := 1048576)),
  array[1, 2, 3]::bigint[], 'a history page ends with the event that takes it past max_bytes');
select is((select array_agg(version::bigint order by position)
           from public.read_event_stream(1000000, 10, 'ledger', p_max_bytes := 1048576)),
  array[1, 2, 3]::bigint[], 'and so does a page of the stream');
select is((select array_agg(version::bigint)
           from public.get_aggregate_events('ledger', 'l-big', p_max_bytes := 1)),
  array[1]::bigint[], 'the first event always comes');
select is((select count(*)::int from public.get_aggregate_events('ledger', 'l-big')), 4,
  'without max_bytes a page is its limit');
select throws_ok($$select * from public.read_event_stream(0, 10, p_max_bytes := 0)$$,
  'PT400', 'invalid_max_bytes', 'max_bytes below 1 is refused');

-- On a read replica, or in a caller's read-only transaction, the reader reads
-- what is numbered already instead of failing on the sequencer's writes.
select tests.authenticate_as_service_role();
set local transaction_read_only = on;
select is((select array_agg(version::bigint order by position)
           from public.read_event_stream(1000000, 10, p_aggregate_type := 'wallet')),
  array[1, 2, 3]::bigint[], 'a read-only transaction reads the numbered stream');

select * from finish();
rollback;
