-- Project-wide security invariants, checked over the catalog so that every
-- table, view and function any migration adds is covered.
begin;
select plan(8);

select is(
  array(select c.relname::text from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = 'public' and c.relkind in ('r', 'p') and not c.relrowsecurity
        order by 1),
  array[]::text[],
  'every table in public has row level security'
);

select is(
  array(select c.relname::text from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = 'public' and c.relkind in ('r', 'p', 'v', 'm')
          and (has_table_privilege('anon', c.oid, 'select') or has_table_privilege('anon', c.oid, 'insert')
               or has_table_privilege('anon', c.oid, 'update') or has_table_privilege('anon', c.oid, 'delete'))
        order by 1),
  array[]::text[],
  'anon has no privilege on any table or view'
);

select is(
  array(select p.oid::regprocedure::text from pg_proc p join pg_namespace n on n.oid = p.pronamespace
        where n.nspname in ('public', 'private') and has_function_privilege('anon', p.oid, 'execute')
        order by 1),
  array[]::text[],
  'anon can execute no function'
);

-- setval on a queue's id sequence would make later rows collide with old ones
select is(
  array(select c.oid::regclass::text || ' ' || r.rolname
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        cross join (values ('anon'), ('authenticated')) r(rolname)
        where n.nspname in ('public', 'private') and c.relkind = 'S'
          and (has_sequence_privilege(r.rolname, c.oid, 'usage')
               or has_sequence_privilege(r.rolname, c.oid, 'select')
               or has_sequence_privilege(r.rolname, c.oid, 'update'))
        order by 1),
  array[]::text[],
  'anon and users hold no privilege on any sequence'
);

select is(
  array(select p.proname::text from pg_proc p join pg_namespace n on n.oid = p.pronamespace
        where n.nspname = 'private' and has_function_privilege('authenticated', p.oid, 'execute')
        order by 1),
  array['check_limit', 'events_within_bytes', 'raise_error', 'transaction_created_at', 'whatsapp_jwt_phone'],
  'users can execute only the private helpers granted to them'
);

select is(
  array(select p.oid::regprocedure::text from pg_proc p join pg_namespace n on n.oid = p.pronamespace
        where n.nspname in ('public', 'private') and p.prosecdef
          and not coalesce(p.proconfig, '{}') @> array['search_path=""']
        order by 1),
  array[]::text[],
  'every security definer function pins search_path to empty'
);

select is(
  array(select c.relname::text from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = 'public' and c.relkind = 'v'
          and not coalesce(c.reloptions, '{}') @> array['security_invoker=true']
        order by 1),
  array[]::text[],
  'every view is security_invoker'
);

select is(
  array(select c.relname::text
        from pg_inherits i join pg_class c on c.oid = i.inhrelid
        join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = 'public'
          and (has_table_privilege('authenticated', c.oid, 'select') or has_table_privilege('anon', c.oid, 'select'))
        order by 1),
  array[]::text[],
  'no partition is readable by an API role directly'
);

select * from finish();
rollback;
