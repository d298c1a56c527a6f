-- Background jobs: the spec's call, idempotency, claim, complete, fail with
-- growing backoff until failed, timeouts, cancel, retry-now, validation and
-- the RLS matrix. Time is moved by editing visible_at, never by sleeping.
begin;
select plan(101);

create temp table j1 as select * from public.schedule_job(
  p_job_type := 'payment_processing',
  p_job_name := 'Process Payment',
  p_payload := '{"amount": 5000}'::jsonb
);
select is((select status from j1), 'pending', 'schedule_job works as the spec calls it');
select is((public.schedule_job('report', 'Daily report', '{}', p_idempotency_key := 'day-1')).id,
  (public.schedule_job('report', 'Daily report', '{}', p_idempotency_key := 'day-1')).id,
  'an idempotency key schedules once');
select throws_ok($$select public.schedule_job('report', 'Daily report', '{"other": 1}', p_idempotency_key := 'day-1')$$,
  'PT409', 'idempotency_key_conflict', 'a key reused for another job is a conflict');
select throws_ok($$select public.schedule_job('report', 'Daily report', '{}', p_priority := 9,
  p_idempotency_key := 'day-1')$$, 'PT409', 'idempotency_key_conflict',
  'so is one with another priority');
select throws_ok($$select public.schedule_job('report', 'Weekly report', '{}',
  p_idempotency_key := 'day-1')$$, 'PT409', 'idempotency_key_conflict', 'or another name');
select throws_ok($$select public.schedule_job('report', 'Daily report', '{}',
  p_run_at := '2030-01-01', p_idempotency_key := 'day-1')$$, 'PT409', 'idempotency_key_conflict',
  'or a run_at other than the job''s');
select throws_ok($$select public.schedule_job('report', 'x', '[]')$$, 'PT400', 'invalid_payload',
  'a payload must be an object');
select throws_ok($$select public.schedule_job('report', 'x',
    jsonb_build_object('blob', repeat('x', 1048576)))$$,
  'PT413', 'payload_too_large', 'a payload over a megabyte is refused');
select throws_ok($$select public.schedule_job('report', 'x',
    jsonb_build_object('blob', repeat(chr(1), 200000)))$$,
  'PT413', 'payload_too_large', 'a payload is measured as its text, not as stored');
select throws_ok($$select public.schedule_job('report', 'x', '{}', p_priority := -1)$$, 'PT400',
  'invalid_priority', 'negative priorities are refused');
select throws_ok($$select public.schedule_job('report', 'x', '{}', p_run_at := '-infinity')$$, 'PT400',
  'invalid_run_at', 'an infinite run_at is refused');
select throws_ok($$select public.schedule_job('report', 'x', '{}', p_run_at := '0001-01-01 00:00:00+01')$$,
  'PT400', 'invalid_run_at', 'a run_at in a year BC (UTC) is refused');
select throws_ok($$select public.schedule_job('report', 'x', '{}', p_run_at := '10000-01-01 00:00:00+00')$$,
  'PT400', 'invalid_run_at', 'a run_at past the year 9999 is refused');
select throws_ok($$select public.schedule_job('report', 'x', '{}', p_timeout_seconds := 600)$$, '23514', null,
  'timeouts are capped so a worker run fits the edge limit');
select is((select count(*)::int from public.background_jobs), 2, 'refused jobs are not kept');
select public.schedule_job('later', 'Later', '{}', p_run_at := now() + interval '1 hour');

-- claim and complete
create temp table c1 as select * from public.claim_jobs(array['payment_processing'], 10, 'w1');
select is((select count(*)::int from c1), 1, 'claim_jobs takes due jobs of the given types');
select ok((select status = 'running' and attempts = 1 and visible_at > now() + interval '29 seconds'
           from c1), 'a claimed job is running, leased for its timeout');
select is((select count(*)::int from public.claim_jobs(null, 10)), 1,
  'jobs not yet due stay pending (only the report was claimable)');
select is((public.complete_job((select id from c1), (select lease_token from c1), '{"paid": true}')).result,
  '{"paid": true}'::jsonb, 'complete_job stores the result');
select throws_ok(format($$select public.complete_job(%s, %L)$$, (select id from c1), (select lease_token from c1)),
  'PT409', 'lease_lost', 'a finished job cannot be completed again');
-- a result is measured as a payload is (413), over SQL too, and a refused
-- one settles nothing
select public.schedule_job('big_result', 'Big result', '{}');
create temp table c2 as select * from public.claim_jobs(array['big_result'], 1, 'w1');
select throws_ok(format($$select public.complete_job(%s, %L, jsonb_build_object('blob', repeat('x', 1048576)))$$,
    (select id from c2), (select lease_token from c2)),
  'PT413', 'payload_too_large', 'complete_job refuses a result over a megabyte');
select throws_ok(format($$select public.complete_job(%s, %L, '{"n": 1e400}')$$,
    (select id from c2), (select lease_token from c2)),
  'PT413', 'payload_too_large', 'and one of numbers beyond a double''s range');
select throws_ok(format($$select public.settle_and_claim_jobs(%s, %L,
      jsonb_build_object('blob', repeat(chr(1), 200000)), p_job_types := array['big_result'])$$,
    (select id from c2), (select lease_token from c2)),
  'PT413', 'payload_too_large', 'and so does settle_and_claim_jobs, measuring the text');
select is((select status || ':' || (result is null)::text from public.background_jobs
           where id = (select id from c2)),
  'running:true', 'a refused result leaves the job running and its result unset');
select is((public.complete_job((select id from c2), (select lease_token from c2), '{"n": 1e300}')).status,
  'completed', 'the same lease then completes it with a result of fitting size');
-- a handler that ran to its end but whose result cannot be kept: the job
-- completes without it (it is not run again), saying why
select public.schedule_job('lost_result', 'Lost result ' || i, '{}') from generate_series(1, 2) i;
create temp table c3 as select * from public.claim_jobs(array['lost_result'], 2, 'w1');
select is((select j.status || ':' || (j.result is null)::text || ':' || j.last_error
           from public.complete_job((select min(id) from c3), (select lease_token from c3 order by id limit 1),
                                    p_result_error := 'result not stored: payload_too_large') j),
  'completed:true:result not stored: payload_too_large',
  'complete_job with a result_error completes the job without a result, saying why');
select is((select count(*)::int from public.settle_and_claim_jobs((select max(id) from c3),
             (select lease_token from c3 order by id desc limit 1), p_result_error := 'not kept',
             p_job_types := array['lost_result'])),
  0, 'settle_and_claim_jobs takes a result_error too (nothing is left to claim)');
select is((select status || ':' || last_error from public.background_jobs where id = (select max(id) from c3)),
  'completed:not kept', 'and completes the job with it');

-- settle and claim in one call (the worker's round trip per job)
select public.schedule_job('sac', 'Sac ' || i, jsonb_build_object('i', i)) from generate_series(1, 3) i;
create temp table s1 as select * from public.claim_jobs(array['sac'], 1, 'w2');
create temp table s2 as select * from public.settle_and_claim_jobs((select id from s1),
  (select lease_token from s1), '{"ok": 1}', p_job_types := array['sac'], p_worker := 'w2');
select is((select status || ':' || result::text from public.background_jobs where id = (select id from s1)),
  'completed:{"ok": 1}', 'settle_and_claim_jobs completes the job it is given');
select is((select status || ':' || (payload ->> 'i') || ':' || locked_by from s2), 'running:2:w2',
  'and claims the next one in the same call');
select throws_ok(format($$select public.settle_and_claim_jobs(%s, %L, p_job_types := array['sac'])$$,
    (select id from s1), (select lease_token from s1)),
  'PT409', 'lease_lost', 'a settled job cannot be settled again');
select throws_ok(format($$select public.settle_and_claim_jobs(%s, %L, p_timed_out := true)$$,
    (select id from s2), (select lease_token from s2)),
  'PT400', 'invalid_settlement', 'a timeout needs an error');
select throws_ok(format($$select public.settle_and_claim_jobs(%s, %L, p_limit := 0)$$,
    (select id from s2), (select lease_token from s2)),
  'PT400', 'invalid_limit', 'the claim''s limit is checked before anything is settled');
select is((select string_agg(status, ',' order by id) from public.background_jobs where job_type = 'sac'),
  'completed,running,pending', 'refused calls settle and claim nothing');
-- a worker whose answer was lost takes up the job claimed under its name,
-- on a fresh lease
create temp table r as select * from public.reclaim_held_jobs('w2');
select is((select array_agg(id) from r), (select array_agg(id) from s2),
  'reclaim_held_jobs: the jobs a worker holds');
select ok((select r.lease_token <> s2.lease_token and r.visible_at > s2.visible_at
                  and r.attempts = s2.attempts from r, s2),
  'each on a fresh lease, its attempt unchanged');
select is((select count(*)::int from public.reclaim_held_jobs('w1-other')), 0,
  'and none held under another name');
select is((select count(*)::int from public.reclaim_held_jobs('w2', 10)), 0,
  'nor one whose timeout is longer than the time the worker has left');
update s2 set lease_token = (select lease_token from r);
create temp table s3 as select * from public.settle_and_claim_jobs((select id from s2),
  (select lease_token from s2), p_error := 'boom', p_job_types := array['sac']);
select is((select status || ':' || last_error || ':' || (visible_at > now() + interval '5 seconds')
           from public.background_jobs where id = (select id from s2)),
  'pending:boom:true', 'with an error the attempt fails and waits for its backoff');
select is((select payload ->> 'i' from s3), '3', 'and the call still claims the next job');

-- fail: growing delays, then failed
create temp table f as select * from public.schedule_job('flaky', 'Flaky', '{}', p_max_attempts := 3);
create temp table delays (attempt int, delay interval);
do $$
declare
  v_job public.background_jobs;
  v_failed public.background_jobs;
begin
  for i in 1..3 loop
    update public.background_jobs set visible_at = now() where job_type = 'flaky';
    select * into v_job from public.claim_jobs(array['flaky'], 1);
    select * into v_failed from public.fail_job(v_job.id, v_job.lease_token, 'boom ' || i);
    insert into delays values (i, v_failed.visible_at - now());
  end loop;
end;
$$;
select ok((select delay from delays where attempt = 1) between interval '7 seconds' and interval '13 seconds',
  'the first retry waits about 10 s');
select ok((select delay from delays where attempt = 2) > (select delay from delays where attempt = 1) * 1.3,
  'the second retry waits longer');
select is((select status || ':' || attempts || ':' || last_error from public.background_jobs where job_type = 'flaky'),
  'failed:3:boom 3', 'after max attempts the job ends failed');

-- timeouts: a job running past its timeout
create temp table h as select * from public.schedule_job('hangs', 'Hangs', '{}', p_max_attempts := 1,
  p_timeout_seconds := 1);
create temp table hc as select * from public.claim_jobs(array['hangs'], 1);
select is((select visible_at - locked_at from hc), interval '11 seconds',
  'a job''s lease is its timeout and 10 s for its worker to report');
update public.background_jobs set visible_at = now() - interval '1 second' where job_type = 'hangs';
select is(public.timeout_jobs(), 1, 'timeout_jobs finds the job past its timeout');
select is((select status from public.background_jobs where job_type = 'hangs'), 'timeout',
  'with no attempts left it ends timed out');
select throws_ok(format($$select public.fail_job(%s, %L, 'late', true)$$, (select id from hc), (select lease_token from hc)),
  'PT409', 'lease_lost', 'a timed-out job cannot be settled by its old worker');

-- retry now and cancel
select is((public.retry_job((select id from h))).status, 'pending', 'retry-now requeues a timed-out job');
select is((select attempts::integer from public.background_jobs where job_type = 'hangs'), 0,
  'with a fresh set of attempts');
select is((public.cancel_job((select id from h))).status, 'cancelled', 'a pending job can be cancelled');
select throws_ok(format($$select public.cancel_job(%s)$$, (select id from h)), 'PT409', 'invalid_state',
  'a cancelled job cannot be cancelled again');

-- A run a cancel took from its worker may go on until its lease ends: no
-- sequence of retries and cancels makes the job claimable before then.
create temp table rv as select * from public.schedule_job('revoked', 'Revoked', '{}',
  p_timeout_seconds := 120);
create temp table rvc as select * from public.claim_jobs(array['revoked'], 1, 'w-first');
select public.cancel_job((select id from rv));
select public.retry_job((select id from rv));
select public.retry_job((select id from rv));
select is((select count(*)::int from public.claim_jobs(array['revoked'], 1, 'w-second')), 0,
  'retrying a job twice does not cut short the lease of a run cancelled under it');
select public.cancel_job((select id from rv));
select public.retry_job((select id from rv));
select is((select count(*)::int from public.claim_jobs(array['revoked'], 1, 'w-second')), 0,
  'nor does cancelling and retrying it again');
select is((select visible_at from public.background_jobs where id = (select id from rv)),
  (select visible_at from rvc), 'it is due when that lease ends');
-- (time moves: the lease has ended)
update public.background_jobs set abandoned_lease_until = now() - interval '1 second',
  visible_at = now() + interval '1 hour' where id = (select id from rv);
select public.retry_job((select id from rv));
select is((select locked_by from public.claim_jobs(array['revoked'], 1, 'w-second')), 'w-second',
  'once it has ended, retry-now runs the job at once');

-- So may a run its worker timed out (it stops waiting; the handler may not
-- stop): neither its backoff nor a retry-now makes the job due before that
-- run's lease ends.
create temp table slow as select * from public.schedule_job('slow-handler', 'Slow', '{}',
  p_timeout_seconds := 30, p_max_attempts := 2);
create temp table slowc as select * from public.claim_jobs(array['slow-handler'], 1, 'w-slow');
select is((public.fail_job((select id from slow), (select lease_token from slowc), 'timed out',
                           true)).visible_at,
  (select visible_at from slowc), 'a timed-out attempt is retried no sooner than its lease ends');
select is((public.retry_job((select id from slow))).visible_at, (select visible_at from slowc),
  'nor does retry-now run it sooner');
update public.background_jobs set visible_at = now(), due = true where id = (select id from slow);
create temp table slowc2 as select * from public.claim_jobs(array['slow-handler'], 1, 'w-slow');
select is((public.fail_job((select id from slow), (select lease_token from slowc2), 'timed out',
                           true)).status, 'timeout', 'its last attempt timed out');
select is((public.retry_job((select id from slow))).visible_at, (select visible_at from slowc2),
  'and a retry of the timed-out job waits for that run''s lease too');
delete from public.background_jobs where job_type = 'slow-handler';

-- A replayed key is found in a few index pages, not by reading every keyed job
-- (the scheduler cannot be searched for: the service role's is null).
insert into public.background_jobs (job_type, job_name, idempotency_key, status)
select 'bulk', 'Bulk', 'bulk-' || i, 'completed' from generate_series(1, 20000) i;
create temp table pages as select tests.blocks_read('public.background_jobs_idempotency_idx', 'public.background_jobs') as n;
select is((public.schedule_job('bulk', 'Bulk', '{}', p_idempotency_key := 'bulk-new')).id,
  (public.schedule_job('bulk', 'Bulk', '{}', p_idempotency_key := 'bulk-new')).id,
  'a replayed key returns the job it scheduled');
select cmp_ok(tests.blocks_read('public.background_jobs_idempotency_idx', 'public.background_jobs') - (select n from pages), '<', 40::bigint,
  'keyed schedules read a few pages');
delete from public.background_jobs where job_type = 'bulk';

-- A claim does not walk jobs that are not due: 20,000 jobs due tomorrow, then
-- one due now, and the claim finds it in a few pages.
insert into public.background_jobs (job_type, job_name, run_at, visible_at)
select 'bulk', 'Tomorrow', now() + interval '1 day', now() + interval '1 day'
from generate_series(1, 20000);
select public.schedule_job('bulk', 'Now', '{}');
delete from pages;
insert into pages select tests.blocks_read('public.background_jobs_claim_idx', 'public.background_jobs');
select is((select job_name from public.claim_jobs(array['bulk'], 1)), 'Now',
  'the due job is claimed ahead of those due later');
select cmp_ok(tests.blocks_read('public.background_jobs_claim_idx', 'public.background_jobs') - (select n from pages), '<', 40::bigint,
  'without reading the jobs due later');
delete from public.background_jobs where job_type = 'bulk';

-- Nor those of a higher priority: the claim goes priority by priority, each
-- from its due jobs. 20,000 urgent jobs due tomorrow, one ordinary job due now,
-- claimed with another type beside it (the merged form).
insert into public.background_jobs (job_type, job_name, priority, run_at, visible_at)
select 'bulk', 'Urgent tomorrow', 9, now() + interval '1 day', now() + interval '1 day'
from generate_series(1, 20000);
select public.schedule_job('bulk', 'Now', '{}');
delete from pages;
insert into pages select tests.blocks_read('public.background_jobs_claim_idx', 'public.background_jobs');
select is((select job_name from public.claim_jobs(array['bulk', 'other'], 1)), 'Now',
  'the due job is claimed past higher-priority jobs due later');
select cmp_ok(tests.blocks_read('public.background_jobs_claim_idx', 'public.background_jobs') - (select n from pages), '<', 40::bigint,
  'without reading them');
delete from public.background_jobs where job_type = 'bulk';

-- Nor the delayed jobs of many priorities: 20,000 jobs due tomorrow spread over
-- every priority (0-1000), one due now at the lowest, claimed alone and with
-- another type beside it. A claim that went priority by priority read each of
-- the 1,001 priorities to find it.
insert into public.background_jobs (job_type, job_name, priority, run_at, visible_at)
select 'bulk', 'Spread tomorrow', i % 1001, now() + interval '1 day', now() + interval '1 day'
from generate_series(1, 20000) i;
select public.schedule_job('bulk', 'Now', '{}');
select public.schedule_job('bulk', 'Now too', '{}');
delete from pages;
insert into pages select tests.index_blocks_read('public.background_jobs');
select is((select job_name from public.claim_jobs(array['bulk'], 1)), 'Now',
  'the due job is claimed past delayed jobs of every priority');
select is((select job_name from public.claim_jobs(array['bulk', 'other'], 1)), 'Now too',
  'and so in the merged form');
select cmp_ok(tests.index_blocks_read('public.background_jobs')
  - (select n from pages), '<', 80::bigint,
  'two claims read a few index pages, not one per priority');
delete from public.background_jobs where job_type = 'bulk';

-- A flood falling due together is claimed in claim order (see install_leases):
-- 1,500 ordinary jobs whose time came before an urgent one's. Claimed alone
-- and in the merged form, the urgent job goes first.
insert into public.background_jobs (job_type, job_name, priority, run_at, visible_at)
select t, 'Flood', 0, now() - interval '1 hour' + i * interval '1 ms',
       now() - interval '1 hour' + i * interval '1 ms'
from generate_series(1, 1500) i, unnest(array['flood-1', 'flood-2']) t;
insert into public.background_jobs (job_type, job_name, priority, run_at, visible_at)
select t, 'Urgent', 9, now() - interval '1 second', now() - interval '1 second'
from unnest(array['flood-1', 'flood-2']) t;
select is((select job_name from public.claim_jobs(array['flood-1'], 1)), 'Urgent',
  'of a flood falling due together, the urgent job is claimed first');
select is((select job_name from public.claim_jobs(array['flood-2', 'other'], 1)), 'Urgent',
  'and so in the merged form');
select is((select count(*)::int from public.background_jobs
           where job_type like 'flood-_' and status = 'pending' and due), 0,
  'a claim marks none of the flood due');
delete from public.background_jobs where job_type like 'flood-_';

-- A claim for some job types does not walk the jobs of others: 20,000 due jobs
-- of a type no worker handles, ahead of one the worker asks for.
insert into public.background_jobs (job_type, job_name)
select 'orphan', 'Orphan' from generate_series(1, 20000);
select public.schedule_job('wanted', 'Wanted', '{}');
delete from pages;
insert into pages select tests.blocks_read('public.background_jobs_claim_idx', 'public.background_jobs');
select is((select job_name from public.claim_jobs(array['wanted', 'other'], 1)), 'Wanted',
  'a claim takes the due job of the types it names');
select cmp_ok(tests.blocks_read('public.background_jobs_claim_idx', 'public.background_jobs') - (select n from pages), '<', 40::bigint,
  'without reading the jobs of other types');
-- across types, in claim order: priority, then the longest due
select public.schedule_job('wanted', 'Urgent', '{}', p_priority := 9);
select public.schedule_job('other', 'Other', '{}', p_priority := 5);
select is((select array_agg(job_name::text order by priority desc, visible_at, id)
           from public.claim_jobs(array['other', 'wanted', 'other'], 5)),
  array['Urgent', 'Other'], 'several types are claimed together, by priority');
-- no types: every type, by a walk of the types with pending jobs
select is((select array_agg(job_type || '/' || job_name)
           from public.claim_jobs(null, 2)),
  array['orphan/Orphan', 'orphan/Orphan'], 'no types claims the longest-due jobs of any type');
delete from public.background_jobs where job_type in ('orphan', 'wanted', 'other');

-- Due: a job scheduled for later waits outside the claim index; a claim takes
-- it from the delayed index once its time has come. A failure's backoff takes
-- a job out again, and a retry-now puts it back.
select public.schedule_job('due-check', 'Later', '{}', p_run_at := now() + interval '1 hour');
select public.schedule_job('due-check', 'Now', '{}');
select is((select array_agg(job_name || ':' || due order by id) from public.background_jobs
           where job_type = 'due-check'),
  array['Later:false', 'Now:true'], 'a job is marked due at once only when it may run now');
update public.background_jobs set visible_at = now() - interval '1 second'
where job_type = 'due-check' and job_name = 'Later'; -- its time has come
create temp table due_claim as select * from public.claim_jobs(array['due-check'], 5);
select is((select array_agg(job_name::text order by visible_at) from due_claim),
  array['Later', 'Now'], 'a claim takes the jobs whose time has come beside the due ones, in claim order');
select is((public.fail_job((select id from due_claim where job_name = 'Later'),
                           (select lease_token from due_claim where job_name = 'Later'), 'boom')).due,
  false, 'a failure waiting out its backoff is not due');
select is((public.retry_job((select id from due_claim where job_name = 'Later'))).due, true,
  'a retry-now is due at once');
delete from public.background_jobs where job_type = 'due-check';

-- RLS matrix
create temp table ids as select tests.create_user() as alice, tests.create_user() as bob;
grant select on ids, f, s3 to authenticated, anon, service_role;

-- the job types users may schedule (the service role schedules any)
insert into private.user_job_types (job_type, max_priority) values ('export', 10);

select tests.authenticate_as((select alice from ids));
select throws_ok($$select public.schedule_job('payment_processing', 'Pay', '{"amount": 5000}')$$,
  'PT403', 'job_type_not_allowed', 'users cannot schedule a job type not open to them');
select throws_ok($$select public.schedule_job('export', 'Urgent', '{}', p_priority := 11)$$,
  'PT403', 'priority_not_allowed', 'nor above the type''s priority for users');
create temp table aj as select * from public.schedule_job('export', 'My export', '{}');
grant select on aj to authenticated, anon, service_role;
select is((select user_id from aj), (select alice from ids), 'a user''s job is theirs');
select is((select count(*)::int from public.background_jobs), 1, 'alice sees only her jobs');
select throws_ok(format($$select public.cancel_job(%s)$$, (select id from f)), 'PT404', 'job_not_found',
  'alice cannot cancel someone else''s job');
select throws_ok($$select public.claim_jobs()$$, '42501', null, 'users cannot claim jobs');
select throws_ok($$select public.reclaim_held_jobs('w2')$$, '42501', null,
  'or take up the jobs a worker holds');
select throws_ok(format($$select public.settle_and_claim_jobs(%s, %L)$$, (select id from s3),
    (select lease_token from s3)), '42501', null, 'users cannot settle jobs');

-- a retry asks again: a type closed since, or a cap lowered below the job's
-- priority, no longer runs for a user
create temp table ak as select * from public.schedule_job('export', 'Capped', '{}', p_priority := 10);
grant select on ak to authenticated, anon, service_role;
select public.cancel_job((select id from ak));
select tests.clear_authentication();
update private.user_job_types set max_priority = 5 where job_type = 'export';
select tests.authenticate_as((select alice from ids));
select throws_ok(format($$select public.retry_job(%s)$$, (select id from ak)),
  'PT403', 'priority_not_allowed', 'a user cannot retry a job above the type''s priority now');
create temp table ek as select * from public.schedule_job('export', 'Keyed', '{}',
  p_idempotency_key := 'ek');
grant select on ek to authenticated, anon, service_role;
select tests.clear_authentication();
delete from private.user_job_types where job_type = 'export';
select tests.authenticate_as((select alice from ids));
select throws_ok(format($$select public.retry_job(%s)$$, (select id from ak)),
  'PT403', 'job_type_not_allowed', 'nor one of a type closed to users since');
-- a replay schedules nothing: it answers with its job, closed type or not
select is((public.schedule_job('export', 'Keyed', '{}', p_idempotency_key := 'ek')).id,
  (select id from ek), 'a keyed replay returns its job though the type has closed since');
select throws_ok($$select public.schedule_job('export', 'Keyed', '{}', p_idempotency_key := 'ek2')$$,
  'PT403', 'job_type_not_allowed', 'a new key for the closed type is refused');
select tests.clear_authentication();
insert into private.user_job_types (job_type, max_priority) values ('export', 10);
select tests.authenticate_as((select alice from ids));
select is((select status from public.retry_job((select id from ak))), 'pending',
  'reopened, the job is retried');

select tests.authenticate_as((select bob from ids));
select throws_ok(format($$select public.get_job(%s)$$, (select id from aj)), 'PT404', 'job_not_found',
  'bob cannot read alice''s job');

select tests.authenticate_as_anon();
select throws_ok($$select public.schedule_job('x', 'y', '{}')$$, '42501', null, 'anon cannot schedule');


select tests.authenticate_as_service_role();
select throws_ok($$update public.background_jobs set status = 'completed'$$, '42501', null,
  'service_role cannot complete jobs past the lease functions');
select throws_ok($$delete from public.background_jobs$$, '42501', null,
  'service_role cannot delete jobs');

-- A run_at in the past is due now, behind the jobs already waiting.
select public.schedule_job('fair', 'first', '{}');
select public.schedule_job('fair', 'backdated', '{}', p_run_at := '1970-01-01');
select is((select job_name from public.claim_jobs(array['fair'], 1, 'w')), 'first',
  'a backdated job does not jump the queue');
select is((select run_at from public.background_jobs where job_name = 'backdated'),
  '1970-01-01'::timestamptz, 'its run_at is kept as given');
select is((select count(*)::int from public.due_jobs_by_type(array['fair'])
           where job_type = 'fair'), 0, 'due_jobs_by_type leaves out the types given');
select is((select due from public.due_jobs_by_type() where job_type = 'fair'), 1::bigint,
  'and counts the due jobs of the others');
select tests.authenticate_as((select alice from ids));
select throws_ok($$select * from public.due_jobs_by_type()$$, '42501', null,
  'users cannot count every user''s jobs');
select * from finish();
rollback;
