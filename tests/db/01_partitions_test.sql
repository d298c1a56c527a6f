-- Monthly partitions: any date inserts; maintenance creates partitions ahead
-- and moves rows out of DEFAULT; only service_role may run it.
begin;
select plan(36);

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

-- under any DateStyle and time zone: SQL style prints Kigali's zone as CAT,
-- which Postgres cannot read back
set local datestyle = 'SQL, DMY';
set local timezone = 'Africa/Kigali';
insert into public.system_metrics (service_name, metric_type, metric_name, value, created_at)
values ('api', 'latency', 'styled', 1, now() - interval '6 years');
select is((select count(*)::int from public.maintain_partitions() where action = 'created'), 1,
  'maintenance makes a month in another DateStyle and zone');
select is((select count(*)::int from public.system_metrics_default), 0, 'and moves its row');
reset datestyle;
reset timezone;

-- rows no month can hold stay in DEFAULT, and maintenance goes on
insert into public.system_metrics (service_name, metric_type, metric_name, value, created_at)
values ('api', 'latency', 'odd', 1, 'infinity'), ('api', 'latency', 'odd', 2, '-infinity'),
       ('api', 'latency', 'odd', 3, '294276-12-15'), ('api', 'latency', 'odd', 4, '0001-12-15 BC'),
       ('api', 'latency', 'odd', 5, now() + interval '7 years');
select results_eq(
  $$select action, count(*)::int from public.maintain_partitions() group by action$$,
  $$values ('created'::text, 1)$$,
  'maintenance makes the one month it can and fails on none of the others');
select is((select count(*)::int from public.system_metrics_default where metric_name = 'odd'), 4,
  'the four rows out of every month stay in DEFAULT');
select is((select count(*)::int from public.system_metrics where metric_name = 'odd'), 5,
  'and all five are read through the parent');

-- A partition made by hand, as the spec's recipe does, gets Supabase's default
-- grants to the API roles; it is closed in the statement that made it.
create function pg_temp.open_to_api(p_table regclass) returns text[]
language sql as $$
  select array(
    select r from unnest(array['anon', 'authenticated', 'service_role']) r
    where has_table_privilege(r, p_table, 'select')
       or has_table_privilege(r, p_table, 'insert,update,delete')
    union all
    select 'row level security off' from pg_class c
    where c.oid = p_table and not c.relrowsecurity
    order by 1)
$$;
create table if not exists public.transactions_2031_06
  partition of public.transactions
  for values from ('2031-06-01') to ('2031-07-01');
select is(pg_temp.open_to_api('public.transactions_2031_06'), array[]::text[],
  'a partition made with CREATE TABLE ... PARTITION OF is closed to the API roles, RLS on');

create table public.system_metrics_attached
  (like public.system_metrics including defaults including constraints);
select isnt(pg_temp.open_to_api('public.system_metrics_attached'), array[]::text[],
  'a new plain table is open to the API roles (the default grants the trigger undoes)');
alter table public.system_metrics attach partition public.system_metrics_attached
  for values from ('2032-01-01') to ('2032-02-01');
select is(pg_temp.open_to_api('public.system_metrics_attached'), array[]::text[],
  'a table attached as a partition is closed to the API roles, RLS on');

-- The recipe run in a session whose time zone is not UTC would make a month
-- that overlaps the one before; refused. With the offset written out it is fine.
set local timezone = 'Africa/Kigali';
select throws_ok($$create table public.system_audit_logs_2033_08 partition of public.system_audit_logs
  for values from ('2033-08-01') to ('2033-09-01')$$, '42P17', null,
  'a hand-made partition that is not one UTC month is refused');
select lives_ok($$create table public.system_audit_logs_2033_08 partition of public.system_audit_logs
  for values from ('2033-08-01 00:00+00') to ('2033-09-01 00:00+00')$$,
  'one with UTC bounds is made, whatever the session''s time zone');
reset timezone;

-- a hand-made partition partitioned again: its own partitions are closed too
create table public.system_audit_logs_2033_09 partition of public.system_audit_logs
  for values from ('2033-09-01') to ('2033-10-01') partition by range (created_at);
create table public.system_audit_logs_2033_09_a partition of public.system_audit_logs_2033_09
  for values from ('2033-09-01') to ('2033-09-16');
select is(pg_temp.open_to_api('public.system_audit_logs_2033_09_a'), array[]::text[],
  'a partition of a partition is closed to the API roles, RLS on');
select is(pg_temp.open_to_api('public.system_audit_logs_2033_09'), array[]::text[],
  'and so is the partition it belongs to');

-- a grant after the fact (GRANT fires no trigger): maintenance closes it
grant select on public.transactions_2031_06 to anon;
select is(pg_temp.open_to_api('public.transactions_2031_06'), array['anon'],
  'a grant on a partition opens it (to that role alone; RLS stays on)');
select results_eq(
  $$select table_name, partition_name, action from public.maintain_partitions()$$,
  $$values ('public.transactions'::text, 'transactions_2031_06'::text, 'secured'::text)$$,
  'maintenance closes a partition open to an API role, and says so');
select is(pg_temp.open_to_api('public.transactions_2031_06'), array[]::text[],
  'after maintenance the partition is closed again');
insert into public.system_metrics (service_name, metric_type, metric_name, value, created_at)
values ('api', 'latency', 'attached', 1, '2032-01-15');
select tests.authenticate_as_service_role();
select is(
  (select count(*)::int from public.system_metrics where metric_name = 'attached'), 1,
  'the service role still reads the closed partition''s rows through the parent');
select tests.clear_authentication();

-- retention: months past it are detached (kept as tables), the rest stay
create table public.retained (id bigint, created_at timestamptz not null)
  partition by range (created_at);
select private.register_partitioned_table('public', 'retained', 0, 2);
create table public.retained_2020_01 partition of public.retained
  for values from ('2020-01-01 00:00+00') to ('2020-02-01 00:00+00');
select results_eq(
  $$select partition_name, action from public.maintain_partitions()
    where table_name = 'public.retained'$$,
  $$values ('retained_2020_01'::text, 'detached'::text)$$,
  'maintenance detaches a month past the table''s retention, and says so');
select is(
  (select array_agg(c.relname::text order by c.relname) from pg_inherits i
   join pg_class c on c.oid = i.inhrelid where i.inhparent = 'public.retained'::regclass),
  array['retained_' || to_char(now() at time zone 'UTC', 'YYYY_MM'), 'retained_default'],
  'the current month and DEFAULT stay attached');

-- a month made by hand under a name of its own is that month's partition:
-- maintenance takes it as made instead of failing that month on every run
create table public.handmade (id bigint, created_at timestamptz not null)
  partition by range (created_at);
select private.register_partitioned_table('public', 'handmade', 0, null);
create temp table next_month as
  select to_char(date_trunc('month', now() at time zone 'UTC') + interval '1 month',
                 'YYYY-MM-DD 00:00+00') as from_at,
         to_char(date_trunc('month', now() at time zone 'UTC') + interval '2 months',
                 'YYYY-MM-DD 00:00+00') as to_at;
select format('create table public.handmade_next partition of public.handmade
               for values from (%L) to (%L)', from_at, to_at) from next_month \gexec
update private.partitioned_tables set months_ahead = 1 where table_name = 'handmade';
select is_empty(
  $$select partition_name, action from public.maintain_partitions()
    where table_name = 'public.handmade'$$,
  'maintenance leaves a month made by hand under another name as it is');
insert into public.handmade (id, created_at) select 1, from_at::timestamptz from next_month;
select is((select count(*)::int from public.handmade_next), 1,
  'and that month''s rows go to it');

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
