-- Who is calling: private.caller_role, caller_is_service, require_caller,
-- caller_user_id and acting_user over every mix of session role and JWT claims
-- (the weaker one wins), and that the planner inlines the SQL helpers.
begin;
select plan(30);

-- Security definer wrappers, as the domains call the helpers: the session may
-- be anon or a user while they run as their owner.
create function tests.who_role() returns text
language sql security definer set search_path = '' as $$ select private.caller_role() $$;
create function tests.who_required() returns text
language sql security definer set search_path = '' as $$ select private.require_caller() $$;
create function tests.who_user() returns uuid
language sql security definer set search_path = '' as $$ select private.caller_user_id() $$;
create function tests.who_is_service() returns boolean
language sql security definer set search_path = '' as $$ select private.caller_is_service() $$;
create function tests.who_acts_for(p_user_id uuid) returns uuid
language sql security definer set search_path = ''
as $$ select private.acting_user(p_user_id, 'user_id') $$;
grant execute on all functions in schema tests to anon, authenticated, service_role;

create temp table ids as select gen_random_uuid() as alice, gen_random_uuid() as bob;
grant select on ids to anon, authenticated, service_role;

-- Sets the session role and the claims the way a request does.
create function tests.call_as(p_role text, p_claims jsonb) returns void
language sql as $$
  select set_config('role', p_role, true),
         set_config('request.jwt.claims', coalesce(p_claims::text, ''), true);
$$;
grant execute on function tests.call_as(text, jsonb) to anon, authenticated, service_role;

-- The caller needs a login: require_caller and caller_user_id are both 401.
create function tests.needs_login(p_case text) returns setof text
language sql as $$
  select throws_ok('select tests.who_required()', 'PT401', 'login_required',
    p_case || ': require_caller is 401')
  union all
  select throws_ok('select tests.who_user()', 'PT401', 'login_required',
    p_case || ': caller_user_id is 401')
$$;
grant execute on function tests.needs_login(text) to anon, authenticated, service_role;

-- no claims at all (pg_cron, migrations): the service role
select tests.call_as('none', null);
select is(tests.who_role(), 'service_role', 'no claims: service role');
select is(tests.who_required(), 'service_role', 'no claims: require_caller passes');
select is(tests.who_user(), null::uuid, 'no claims: no user');

-- the service role
select tests.call_as('service_role', '{"role": "service_role"}');
select is(tests.who_role(), 'service_role', 'service role');
select is(tests.who_user(), null::uuid, 'service role: no user');
select is(tests.who_acts_for((select bob from ids)), (select bob from ids),
  'service role acts for the user it names');
select throws_ok($$select tests.who_acts_for(null)$$, 'PT400', 'invalid_user',
  'service role must name the user');

-- a user
select tests.call_as('authenticated',
  jsonb_build_object('role', 'authenticated', 'sub', (select alice from ids)));
select is(tests.who_role(), 'authenticated', 'user');
select is(tests.who_required(), 'authenticated', 'user: require_caller passes');
select is(tests.who_user(), (select alice from ids), 'user: their id');
select is(tests.who_acts_for(null), (select alice from ids), 'user acts for themselves by default');
select is(tests.who_acts_for((select alice from ids)), (select alice from ids),
  'user may name themselves');
select throws_ok($$select tests.who_acts_for((select bob from ids))$$, 'PT403', 'forbidden',
  'user may not act for another');

-- a user token without a subject
select tests.call_as('authenticated', '{"role": "authenticated"}');
select is(tests.who_role(), 'authenticated', 'subjectless token: still a user');
select tests.needs_login('subjectless token');

-- anon
select tests.call_as('anon', '{"role": "anon"}');
select is(tests.who_role(), 'anon', 'anon');
select tests.needs_login('anon');

-- the weaker of the session role and the claims wins
select tests.call_as('service_role', '{"role": "anon"}');
select is(tests.who_role(), 'anon', 'anon claims under the service role: anon');
select tests.call_as('anon', '{"role": "service_role"}');
select is(tests.who_role(), 'anon', 'the anon role with service claims: anon');
select tests.call_as('none',
  jsonb_build_object('role', 'authenticated', 'sub', (select bob from ids)));
select is(tests.who_user(), (select bob from ids), 'user claims under the owner role: that user');
select tests.call_as('service_role',
  jsonb_build_object('role', 'authenticated', 'sub', (select bob from ids)));
select is(tests.who_role(), 'authenticated', 'user claims under the service role: a user');
select tests.call_as('authenticated', '{"role": "service_role"}');
select tests.needs_login('the user role with service claims and no subject');

-- caller_is_service says the same as caller_role for every mix
select tests.call_as('none', null);
create function tests.service_disagreements() returns text[]
language plpgsql as $$
declare
  v_role text;
  v_claims text;
  v_out text[] := '{}';
begin
  foreach v_role in array array['none', 'anon', 'authenticated', 'service_role'] loop
    foreach v_claims in array array['', '{}', '{"role": "anon"}', '{"role": "authenticated"}',
                                    '{"role": "service_role"}', '{"role": "other"}'] loop
      perform set_config('role', v_role, true), set_config('request.jwt.claims', v_claims, true);
      if tests.who_is_service() is distinct from (tests.who_role() = 'service_role') then
        v_out := v_out || (v_role || ' ' || v_claims);
      end if;
    end loop;
  end loop;
  perform set_config('role', 'none', true);
  return v_out;
end;
$$;
select is(tests.service_disagreements(), '{}'::text[],
  'caller_is_service is true exactly when caller_role is service_role');

-- inlined: the plan holds the expression, not a call of the helper
create function tests.plan_of(p_sql text) returns text language plpgsql as $$
declare
  v_line text;
  v_plan text := '';
begin
  for v_line in execute 'explain (verbose, costs off) ' || p_sql loop
    v_plan := v_plan || v_line || E'\n';
  end loop;
  return v_plan;
end;
$$;
select unalike(tests.plan_of('select private.caller_role()'), '%caller_role%',
  'caller_role is inlined');
select unalike(tests.plan_of('select private.require_caller()'), '%require_caller%',
  'require_caller is inlined');
select unalike(tests.plan_of('select private.caller_user_id()'), '%caller_user_id%',
  'caller_user_id is inlined');
select unalike(tests.plan_of('select private.caller_is_service()'), '%caller_is_service%',
  'caller_is_service is inlined');

select * from finish();
rollback;
