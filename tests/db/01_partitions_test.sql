-- Monthly partitions: any date inserts; maintenance creates partitions ahead
-- and moves rows out of DEFAULT; only service_role may run it.
begin;
select plan(68);

select has_function('public', 'maintain_partitions', array['boolean']);
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

-- A row arriving late for a month retention detached: the detached table
-- keeps the month's name, so the month is not made again, and its rows stay
-- in DEFAULT (read through the parent, as every row there is). That is
-- reported on every run, never taken as a month already made.
insert into public.retained (id, created_at) values (7, '2020-01-20 00:00+00');
select results_eq(
  $$select partition_name, action, rows_moved::int from public.maintain_partitions()
    where table_name = 'public.retained'$$,
  $$values ('retained_2020_01'::text, 'clash'::text, 0)$$,
  'a late row for a month retention detached is reported as a clash');
select ok(
  (select detail from public.maintain_partitions()
   where table_name = 'public.retained' and action = 'clash')
    ~ 'retained_2020_01.*DEFAULT',
  'the report names the table in the way and says the rows stay in DEFAULT');
select is((select count(*)::int from public.retained_default where id = 7), 1,
  'the late row stays in DEFAULT');
select is((select count(*)::int from public.retained where id = 7), 1,
  'and is read through the parent');
select is_empty(
  $$select from pg_inherits where inhrelid = 'public.retained_2020_01'::regclass$$,
  'the detached month stays detached');
-- once the archived month is dropped, the next run makes the month, moves
-- the late row into it and detaches it again, for archiving
drop table public.retained_2020_01;
select results_eq(
  $$select partition_name, action, rows_moved::int from public.maintain_partitions()
    where table_name = 'public.retained'$$,
  $$values ('retained_2020_01'::text, 'created'::text, 1),
           ('retained_2020_01'::text, 'detached'::text, 0)$$,
  'with the archived month dropped, its late rows are made a month and detached');
select is((select count(*)::int from public.retained_2020_01 where id = 7), 1,
  'the late row is in the detached month');

-- A plain table under a month's name is not that month either.
create table public.handmade_2040_01 (id bigint, created_at timestamptz not null);
insert into public.handmade (id, created_at) values (2, '2040-01-10 00:00+00');
select results_eq(
  $$select partition_name, action from public.maintain_partitions()
    where table_name = 'public.handmade'$$,
  $$values ('handmade_2040_01'::text, 'clash'::text)$$,
  'a table under a month''s name that is no partition of it is a clash');
select is((select count(*)::int from public.handmade where id = 2), 1,
  'the month''s row is still read through the parent');

-- Bounds are UTC month starts whatever the session's time zone. In Cuba,
-- 2012-04-01 began at 01:00 (no local midnight), and April was made from
-- 01:00 UTC: refused as not one UTC month, it failed on every run.
create table public.zoned (id bigint, created_at timestamptz not null)
  partition by range (created_at);
set local timezone = 'Cuba';
select private.register_partitioned_table('public', 'zoned', 0, null);
insert into public.zoned (id, created_at)
values (1, '2012-04-01 00:30+00'), (2, '2012-03-31 23:30+00');
select is(private.create_monthly_partition('public', 'zoned', '2012-04-01'), 1::bigint,
  'in Cuba, April 2012 is made, with its row');
select results_eq(
  $$select partition_name, action, rows_moved::int from public.maintain_partitions()
    where table_name = 'public.zoned'$$,
  $$values ('zoned_2012_03'::text, 'created'::text, 1)$$,
  'and maintenance makes March, with its row');
set local timezone = 'Asia/Kolkata';
insert into public.zoned (id, created_at) values (3, '2013-02-28 20:00+00'); -- 1 March in Kolkata
select results_eq(
  $$select partition_name, action, rows_moved::int from public.maintain_partitions()
    where table_name = 'public.zoned'$$,
  $$values ('zoned_2013_02'::text, 'created'::text, 1)$$,
  'in Kolkata, maintenance makes the UTC month of the row');
reset timezone;
select results_eq(
  $$select partition_name, from_at, to_at
    from private.registered_partitions(array['public.zoned'::regclass::oid])
    where partition_name ~ '^zoned_201' order by from_at$$,
  $$values ('zoned_2012_03'::text, '2012-03-01 00:00+00'::timestamptz,
            '2012-04-01 00:00+00'::timestamptz),
           ('zoned_2012_04', '2012-04-01 00:00+00', '2012-05-01 00:00+00'),
           ('zoned_2013_02', '2013-02-01 00:00+00', '2013-03-01 00:00+00')$$,
  'their bounds are UTC month starts');
select results_eq(
  $$select id::int, tableoid::regclass::text from public.zoned order by id$$,
  $$values (1, 'zoned_2012_04'::text), (2, 'zoned_2012_03'), (3, 'zoned_2013_02')$$,
  'each row is in its UTC month');

-- Without the event trigger (a database where it could not be made),
-- maintenance checks the partitions itself: one made by hand that is not
-- one UTC month is reported by name (and closed, as the trigger would have),
-- and so is the month it keeps from being made.
alter event trigger secure_new_partitions disable;
set local timezone = 'Africa/Kigali';
create table public.system_audit_logs_2034_08 partition of public.system_audit_logs
  for values from ('2034-08-01') to ('2034-09-01');
reset timezone;
insert into public.system_audit_logs (actor_type, actor_identifier, action, created_at)
values ('system', 'test', 'late_in_august', '2034-08-31 23:00+00');
select results_eq(
  $$select partition_name, action from public.maintain_partitions()
    where table_name = 'public.system_audit_logs' order by action$$,
  $$values ('system_audit_logs_2034_08'::text, 'clash'::text),
           ('system_audit_logs_2034_08', 'misaligned'),
           ('system_audit_logs_2034_08', 'secured')$$,
  'maintenance reports a hand-made partition that is not one UTC month, by name');
select ok(
  (select detail from public.maintain_partitions() where action = 'clash'
   and table_name = 'public.system_audit_logs')
    ~ 'month 2034-08 .* partition public.system_audit_logs_2034_08 overlaps it',
  'and the month it overlaps, naming it');
select ok(
  (select detail from public.maintain_partitions() where action = 'misaligned')
    ~ '2034-07-31 22:00:00.* to 2034-08-31 22:00:00',
  'and says what it spans');
drop table public.system_audit_logs_2034_08;
alter event trigger secure_new_partitions enable;
select is_empty($$select from public.maintain_partitions() where action = 'misaligned'$$,
  'once it is gone nothing is misaligned');

-- The HTTP route's steps: maintain_partitions(false) makes the empty months
-- ahead and moves nothing; partition_backlog lists what waits in DEFAULT;
-- maintain_partition_month makes one month, moving its rows.
create table public.stepped (id bigint, created_at timestamptz not null)
  partition by range (created_at);
select private.register_partitioned_table('public', 'stepped', 0, null);
update private.partitioned_tables set months_ahead = 2 where table_name = 'stepped';
create temp table stepped_months as
  select to_char(m + interval '1 month', 'YYYY_MM') as next,
         to_char(m + interval '2 months', 'YYYY_MM') as after,
         (m + interval '2 months')::date as after_month,
         (m + interval '2 months 3 days') at time zone 'UTC' as after_at
  from (select date_trunc('month', now() at time zone 'UTC') as m) n;
insert into public.stepped (id, created_at) select 1, after_at from stepped_months;
insert into public.stepped (id, created_at)
values (2, '2050-03-10 00:00+00'), (3, '2050-03-20 00:00+00');
select results_eq(
  $$select partition_name, action, rows_moved::int from public.maintain_partitions(false)
    where table_name = 'public.stepped'$$,
  $$select 'stepped_' || next, 'created'::text, 0 from stepped_months$$,
  'without the backlog, maintenance makes the empty month ahead and moves nothing');
select results_eq(
  $$select table_name, partition_name, month, rows::int from public.partition_backlog()
    where table_name = 'public.stepped'$$,
  $$select 'public.stepped'::text, 'stepped_' || after, after_month, 1 from stepped_months
    union all
    select 'public.stepped', 'stepped_2050_03', '2050-03-01'::date, 2$$,
  'the backlog lists the months waiting in DEFAULT, in order, with their rows');
select results_eq(
  $$select * from public.maintain_partition_month('public.stepped', '2050-03-17')$$,
  $$values ('public.stepped'::text, 'stepped_2050_03'::text, 'created'::text, 2::bigint,
            null::text)$$,
  'maintain_partition_month makes one month of the backlog, moving its rows');
select is_empty($$select * from public.maintain_partition_month('public.stepped', '2050-03-01')$$,
  'a month already made is nothing to do');
select is_empty($$select * from public.maintain_partition_month('public.stepped', '2050-04-01')$$,
  'nor is an empty month that is not ahead');
select hasnt_table('public', 'stepped_2050_04', 'which is not made');
select is((select count(*)::int from public.stepped_default), 1, 'the other month still waits');
select throws_ok($$select * from public.maintain_partition_month('public.nope', '2050-03-01')$$,
  'PT404', 'table_not_found', 'a table maintenance does not keep is 404');
select throws_ok(
  $$select * from public.maintain_partition_month('public.stepped_default', '2050-03-01')$$,
  'PT404', 'table_not_found', 'so is a partition');
select throws_ok($$select * from public.maintain_partition_month('stepped', '2050-03-01')$$,
  'PT404', 'table_not_found', 'and a name without its schema');
select throws_ok($$select * from public.maintain_partition_month('public.stepped', null)$$,
  'PT400', 'invalid_month', 'a missing month is 400');
select throws_ok($$select * from public.maintain_partition_month('public.stepped', '10000-01-01')$$,
  'PT400', 'invalid_month', 'so is one past year 9999');

select tests.authenticate_as(tests.create_user());
select throws_ok('select * from public.maintain_partitions()', '42501', null,
  'users cannot run maintenance');
select throws_ok('select * from public.partition_backlog()', '42501', null,
  'users cannot list the backlog');
select throws_ok($$select * from public.maintain_partition_month('public.stepped', '2050-04-01')$$,
  '42501', null, 'users cannot move a month');

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
