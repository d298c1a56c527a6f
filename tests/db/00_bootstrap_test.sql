-- The Supabase bootstrap: roles, auth helpers reading request.jwt.claims,
-- and built-ins left unshadowed by the migrations.
begin;
select plan(14);

select has_role('anon');
select has_role('authenticated');
select has_role('service_role');
select has_role('authenticator');
select has_schema('auth');
select has_schema('extensions');

-- without claims
select is(auth.uid(), null, 'auth.uid() is null without claims');
select is(auth.role(), null, 'auth.role() is null without claims');
select is(auth.jwt(), null, 'auth.jwt() is null without claims');

-- with claims
select set_config('request.jwt.claims',
  '{"sub": "8d0fd2b3-9ca7-4a0e-9b6e-1d2c3e4f5a6b", "role": "authenticated", "email": "a@b.rw"}', true);
select is(auth.uid(), '8d0fd2b3-9ca7-4a0e-9b6e-1d2c3e4f5a6b'::uuid, 'auth.uid() reads sub');
select is(auth.role(), 'authenticated', 'auth.role() reads role');
select is(auth.email(), 'a@b.rw', 'auth.email() reads email');
select is(auth.jwt() ->> 'sub', '8d0fd2b3-9ca7-4a0e-9b6e-1d2c3e4f5a6b', 'auth.jwt() returns the claims');

-- the built-in set_config still resolves to pg_catalog's
select is(set_config('easymo.test', '1', false), '1', 'pg_catalog.set_config is not shadowed');

select * from finish();
rollback;
