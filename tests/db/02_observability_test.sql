-- Observability: the spec's calls, validation, and the RLS matrix for
-- system_metrics and system_audit_logs (anon, two users, service_role).
begin;
select plan(42);

-- the spec's example, verbatim
select ok(public.record_metric(
  p_service_name := 'api',
  p_metric_type := 'latency',
  p_metric_name := 'request_duration',
  p_value := 150,
  p_unit := 'ms',
  p_tags := '{"endpoint": "/api/trips"}'::jsonb
) > 0, 'record_metric works as the spec calls it');

select throws_ok($$select public.record_metric('api', 'latency', 'x', 1, null, '[1]'::jsonb)$$,
  'PT400', 'invalid_tags', 'tags must be an object');
select throws_ok($$select public.record_metric('API!', 'latency', 'x', 1)$$,
  '23514', null, 'service names are checked');
select throws_ok($$select public.record_metric('api', 'latency', 'x', 'NaN')$$,
  '23514', null, 'NaN is not a value');
select throws_ok($$select public.record_metric('api', 'latency', 'x', 1e301)$$,
  '23514', null, 'a value beyond 1e300 is refused');
select lives_ok($$select public.record_metric('api', 'gauge', 'huge', 1e300),
                         public.record_metric('api', 'gauge', 'huge', 1e300),
                         public.record_metric('api', 'gauge', 'huge', -1e300)$$,
  'values up to 1e300 either way are kept');
select is((select max from public.get_metric_stats('api', 'huge', now() - interval '1 hour',
                                                     now() + interval '1 minute', 3600)),
  1e300::double precision, 'the stats of the largest values do not overflow');
select is(public.record_metrics('[{"service_name":"api","metric_type":"gauge","metric_name":"q","value":1},
                                  {"service_name":"api","metric_type":"gauge","metric_name":"q","value":3}]'::jsonb),
  2, 'record_metrics inserts a batch');
select throws_ok($$select public.record_metrics('[{"service_name":"api","metric_type":"gauge","metric_name":"q","value":1},
                                  {"service_name":"api","metric_type":"gauge","metric_name":"q"}]'::jsonb)$$,
  '23502', null, 'a bad batch element fails the whole batch');
select is((select count(*)::int from public.system_metrics where metric_name = 'q'), 2,
  'nothing of the failed batch was written');
select is(public.record_metrics((select jsonb_agg(jsonb_build_object('service_name', 'whatsapp',
  'metric_type', 'counter', 'metric_name', 'big', 'value', g)) from generate_series(1, 2500) g)),
  2500, 'internal batches are not capped at the HTTP request size');
create temp table returned_ids as
  select r.id, r.n from public.record_metrics_returning_ids(
    '[{"service_name":"api","metric_type":"gauge","metric_name":"ids","value":1},
      {"service_name":"api","metric_type":"gauge","metric_name":"ids","value":2},
      {"service_name":"api","metric_type":"gauge","metric_name":"ids","value":3}]'::jsonb)
    with ordinality as r(id, n);
select is((select array_agg(m.value::int order by r.n) from returned_ids r
           join public.system_metrics m on m.id = r.id),
  array[1, 2, 3], 'record_metrics_returning_ids returns the new ids in input order');

select is((select avg from public.get_metric_stats('api', 'q', now() - interval '1 hour', now() + interval '1 minute', 3600)),
  2::double precision, 'get_metric_stats averages a bucket');

-- audit as a service / system
select ok(public.log_audit_event(
  p_actor_type := 'system',
  p_actor_identifier := 'cron',
  p_action := 'trip_created',
  p_resource_type := 'trip',
  p_resource_id := 'trip-123'
) > 0, 'log_audit_event works as the spec calls it');

-- fixtures
create temp table ids as select tests.create_user() as alice, tests.create_user() as bob;
grant select on ids to authenticated, anon, service_role;

-- alice writes as herself, pretending to be admin
select tests.authenticate_as((select alice from ids));
select ok(public.log_audit_event(
  p_actor_type := 'admin',
  p_actor_identifier := 'root',
  p_action := 'wallet_viewed',
  p_resource_type := 'wallet',
  p_resource_id := 'w-1'
) > 0, 'a user can write an audit event');
select is((select actor_type || ':' || actor_identifier from public.system_audit_logs where action = 'wallet_viewed'),
  'user:' || (select alice from ids)::text, 'a user cannot impersonate admin: actor is forced to themselves');
select is((select user_id from public.system_audit_logs where action = 'wallet_viewed'),
  (select alice from ids), 'the event is owned by the user');
select is((select count(*)::int from public.system_audit_logs), 1, 'alice sees only her own events');
select is((select count(*)::int from public.list_audit_events()), 1, 'list_audit_events applies RLS');
select throws_ok($$select public.record_metric('api', 'latency', 'x', 1)$$, '42501', null,
  'users cannot record metrics');
select throws_ok($$select count(*) from public.system_metrics$$, '42501', null,
  'users cannot read metrics');
select throws_ok($$insert into public.system_audit_logs (actor_type, actor_identifier, action, user_id)
                  values ('user', 'x', 'forged', (select bob from ids))$$, '42501', null,
  'users cannot insert audit rows directly');
select throws_ok($$update public.system_audit_logs set action = 'changed'$$, '42501', null,
  'users cannot update audit rows');
select throws_ok($$delete from public.system_audit_logs$$, '42501', null,
  'users cannot delete audit rows');

-- bob sees nothing of alice's
select tests.authenticate_as((select bob from ids));
select is((select count(*)::int from public.system_audit_logs), 0, 'bob does not see alice''s events');
select is((select count(*)::int from public.list_audit_events(p_resource_id := 'w-1')), 0,
  'bob cannot list alice''s events by resource');

-- anon can do nothing
select tests.authenticate_as_anon();
select throws_ok($$select count(*) from public.system_audit_logs$$, '42501', null, 'anon cannot read audit logs');
select throws_ok($$select count(*) from public.system_metrics$$, '42501', null, 'anon cannot read metrics');
select throws_ok($$select public.log_audit_event('user', 'x', 'y')$$, '42501', null, 'anon cannot write audit events');
select throws_ok($$select public.record_metric('api', 'latency', 'x', 1)$$, '42501', null, 'anon cannot record metrics');

-- service_role sees and writes everything
select tests.authenticate_as_service_role();
select is((select count(*)::int from public.system_audit_logs), 2, 'service_role sees all audit events');
select ok((select count(*) from public.system_metrics) >= 3, 'service_role reads metrics');
select ok(public.record_metric('wallet-service', 'counter', 'transfers', 1) > 0, 'service_role records metrics');
select ok(public.log_audit_event(p_actor_type := 'service', p_actor_identifier := 'wallet-service',
  p_action := 'transfer_reviewed') > 0, 'service_role writes audit events as a service');
select is((select actor_type from public.system_audit_logs where action = 'transfer_reviewed'), 'service',
  'service actor types are kept');
-- the spec's call shape, made by the service role: auth.uid() is null there
select throws_ok($$select public.log_audit_event(p_actor_type := 'user',
  p_actor_identifier := auth.uid()::text, p_action := 'trip_rated')$$,
  'PT400', 'invalid_audit_event', 'the service role must name the actor (400, not a bare not-null error)');
select is((select count(*)::int from public.system_audit_logs where action = 'trip_rated'), 0,
  'and nothing is written');
-- the service role passes RLS: only the grants keep the trail append-only
select throws_ok($$update public.system_audit_logs set action = 'nothing_happened'$$, '42501', null,
  'the service role cannot rewrite audit rows');
select throws_ok($$delete from public.system_audit_logs$$, '42501', null,
  'the service role cannot delete audit rows');
select throws_ok($$truncate public.system_audit_logs$$, '42501', null,
  'the service role cannot empty the audit trail');
select throws_ok($$delete from public.system_metrics$$, '42501', null,
  'the service role cannot delete metrics');
select is((select count(*)::int from public.system_audit_logs where action = 'nothing_happened'), 0,
  'no audit row was changed');

select * from finish();
rollback;
