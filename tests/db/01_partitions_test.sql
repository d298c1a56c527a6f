-- Monthly partitions: any date inserts; maintenance creates partitions ahead
-- and moves rows out of DEFAULT; only service_role may run it.
begin;
select plan(16);

select has_function('public', 'maintain_partitions', array[]::text[]);
select ok(
  exists (select from private.partitioned_tables where table_name = 'system_metrics'),
  'system_metrics is registered for maintenance'
);
select has_table('public', 'system_metrics_default', 'system_metrics has a DEFAULT partition');
select has_table('public', 'system_metrics_' || to_char(now() at time zone 'UTC', 'YYYY_MM'),
  'the current month has a partition');
select has_table('public',
  'system_metrics_' || to_char((now() at time zone 'UTC') + interval '3 months', 'YYYY_MM'),
  'partitions exist three months ahead');

select lives_ok($$
  insert into public.system_metrics (service_name, metric_type, metric_name, value, created_at)
  values ('api', 'latency', 'old', 1, now() - interval '5 years'),
         ('api', 'latency', 'future', 2, now() + interval '5 years')
$$, 'rows dated five years back and five years ahead insert');

select is((select count(*)::int from public.system_metrics_default), 2,
  'far-off rows land in DEFAULT');

create temp table actions as select * from public.maintain_partitions();

select is((select count(*)::int from public.system_metrics_default), 0,
  'maintenance empties DEFAULT');
select is((select sum(rows_moved)::int from actions where table_name = 'public.system_metrics'), 2,
  'maintenance reports the moved rows');
select has_table('public',
  'system_metrics_' || to_char((now() at time zone 'UTC') - interval '5 years', 'YYYY_MM'),
  'a partition was made for the old month');
select is(
  (select count(*)::int from public.system_metrics where metric_name in ('old', 'future')), 2,
  'no row was lost in the move');

select is((select count(*)::int from public.maintain_partitions()), 0,
  'a second run has nothing to do');

select tests.authenticate_as(tests.create_user());
select throws_ok('select * from public.maintain_partitions()', '42501', null,
  'users cannot run maintenance');

-- partitions cannot be used to step around the parent's RLS
select throws_ok(
  format('select count(*) from public.%I', 'system_audit_logs_' || to_char(now() at time zone 'UTC', 'YYYY_MM')),
  '42501', null, 'users cannot read a partition directly');
select throws_ok('select count(*) from public.system_audit_logs_default', '42501', null,
  'users cannot read the DEFAULT partition directly');
select tests.authenticate_as_anon();
select throws_ok(
  format('select count(*) from public.%I', 'system_metrics_' || to_char(now() at time zone 'UTC', 'YYYY_MM')),
  '42501', null, 'anon cannot read a partition directly');

select * from finish();
rollback;
