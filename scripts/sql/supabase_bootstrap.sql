-- =============================================================================
-- Supabase bootstrap for plain PostgreSQL.
--
-- Creates what Supabase's Postgres image already has, so that the migrations in
-- supabase/migrations run unchanged locally and on a hosted project. Migrations
-- never create any of this. Idempotent: safe to run on every start and on every
-- database of the cluster (roles are cluster-wide, schemas are per database).
-- =============================================================================

-- -----------------------------------------------------------------------------
-- Roles (cluster-wide)
-- -----------------------------------------------------------------------------
do $$
begin
  if not exists (select from pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  if not exists (select from pg_roles where rolname = 'service_role') then
    create role service_role nologin noinherit bypassrls;
  end if;
  if not exists (select from pg_roles where rolname = 'authenticator') then
    create role authenticator login noinherit;
  end if;
end
$$;

grant anon, authenticated, service_role to authenticator;
-- The connection role used by functions (postgres here, as on Supabase) must be
-- able to switch into the API roles with set_config('role', ...).
grant anon, authenticated, service_role to current_user;

-- -----------------------------------------------------------------------------
-- Schemas
-- -----------------------------------------------------------------------------
create schema if not exists extensions;
grant usage on schema extensions to public;
-- Preinstalled on Supabase.
create extension if not exists pgcrypto with schema extensions;

create schema if not exists auth;
grant usage on schema auth to anon, authenticated, service_role;

grant usage on schema public to anon, authenticated, service_role;

-- As on Supabase, extensions' objects resolve without a schema prefix.
alter role postgres set search_path = "$user", public, extensions;
alter role authenticator set search_path = "$user", public, extensions;

-- -----------------------------------------------------------------------------
-- auth.users: the columns other schemas reference
-- -----------------------------------------------------------------------------
create table if not exists auth.users (
  instance_id uuid,
  id uuid primary key,
  aud varchar(255),
  role varchar(255),
  email varchar(255),
  phone text unique,
  raw_app_meta_data jsonb default '{}'::jsonb,
  raw_user_meta_data jsonb default '{}'::jsonb,
  is_anonymous boolean not null default false,
  created_at timestamptz default now(),
  updated_at timestamptz default now(),
  deleted_at timestamptz
);
-- added after the first local databases were made, as Supabase has it
alter table auth.users add column if not exists phone_confirmed_at timestamptz;
grant select on auth.users to service_role;

-- -----------------------------------------------------------------------------
-- Claim helpers, as Supabase defines them: they read the claims PostgREST (or
-- our db helper) puts in request.jwt.claims, falling back to the legacy
-- per-claim settings.
-- -----------------------------------------------------------------------------
create or replace function auth.uid() returns uuid
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;

create or replace function auth.role() returns text
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text
$$;

create or replace function auth.email() returns text
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.email', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'email')
  )::text
$$;

create or replace function auth.jwt() returns jsonb
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;

grant execute on function auth.uid(), auth.role(), auth.email(), auth.jwt()
  to anon, authenticated, service_role;

-- -----------------------------------------------------------------------------
-- Default privileges as on Supabase: objects created in public are granted to
-- the API roles. Migrations must therefore revoke what a role should not have.
-- -----------------------------------------------------------------------------
alter default privileges in schema public grant all on tables to anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences to anon, authenticated, service_role;
alter default privileges in schema public grant all on functions to anon, authenticated, service_role;
