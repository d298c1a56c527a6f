-- Transactions: the spec's calls, validation, idempotency, the state machine
-- (every pair of statuses), holds and the double-entry ledger, partition
-- edges, maintenance, and the RLS matrix (anon, two users, service_role).
begin;
select plan(203);

-- fixtures ------------------------------------------------------------------
create temp table ids as
select tests.create_user() as alice,
       tests.create_user(null, '250788000002') as bob,
       tests.create_user() as carol;
grant select on ids to authenticated, anon, service_role;

-- This file's helpers are called while impersonating API roles (rolled back
-- with everything else at the end).
alter default privileges grant execute on functions to public;

-- A credit of p_amount to p_user, completed (money in, through the state machine).
create function pg_temp.fund(p_user uuid, p_amount numeric, p_currency text default 'RWF')
returns uuid language plpgsql as $$
declare v_id uuid;
begin
  v_id := (public.create_transaction(p_user, 'credit', p_amount, p_currency)).id;
  perform public.update_transaction_status(v_id, 'processing');
  perform public.update_transaction_status(v_id, 'completed');
  return v_id;
end $$;

create function pg_temp.wallet(p_user uuid, p_currency text default 'RWF')
returns public.wallets language sql as $$
  select * from public.wallets where user_id = p_user and currency = p_currency
$$;

create function pg_temp.funds(p_user uuid) returns text language sql as $$
  select balance || '/' || held from public.wallets where user_id = p_user and currency = 'RWF'
$$;

create function pg_temp.ledger_ok() returns boolean language sql as $$
  select not exists (select from public.ledger_entries group by currency having sum(amount) <> 0)
     and not exists (
       select from public.wallets w
       where w.balance <> coalesce((select sum(e.amount) from public.ledger_entries e where e.wallet_id = w.id), 0)
     )
     and not exists (
       select from public.wallets w
       where w.kind = 'user' and w.held <> coalesce((
         select sum(t.amount) from public.transactions t
         where t.source_wallet_id = w.id and t.status in ('pending', 'processing')
           and t.type in ('debit', 'payment', 'fee', 'transfer')), 0)
     )
$$;

-- the spec's call ------------------------------------------------------------
select tests.authenticate_as_service_role();
select set_config('request.jwt.claims',
  json_build_object('role', 'service_role', 'sub', (select alice from ids))::text, true);
select is((select (public.create_transaction(
  p_user_id := auth.uid(),
  p_type := 'credit',
  p_amount := 100.00,
  p_currency := 'RWF',
  p_idempotency_key := 'unique-key-123'
)).status), 'pending', 'create_transaction works exactly as the spec calls it');
select tests.authenticate_as_service_role();

create temp table spec_tx as
select * from public.transactions where idempotency_key = 'unique-key-123';
grant select on spec_tx to authenticated, service_role;

select ok((select reference ~ '^TX-[0-9]{6}-[0-9A-F]{16}$' from spec_tx), 'references are human-readable');
select is((select count(*)::int from public.transaction_references r join spec_tx s on s.id = r.transaction_id
           and s.reference = r.reference and s.created_at = r.created_at), 1,
  'the reference is registered in the non-partitioned table');
select is((select created_by from spec_tx), 'service_role', 'the row records who created it');
select is((select count(*)::int from public.transaction_events e join spec_tx s on s.id = e.transaction_id), 0,
  'creation is not a transition: no event yet');
select is((select status from public.update_transaction_status(
  p_transaction_id := (select id from spec_tx), p_new_status := 'processing')), 'processing',
  'update_transaction_status works as the spec calls it');

-- validation: 400 and nothing written ----------------------------------------
create temp table counts as select (select count(*) from public.transactions) as txs,
  (select count(*) from public.transaction_idempotency_keys) as keys;
select throws_ok($$select public.create_transaction((select alice from ids), 'credit', 0, 'RWF')$$,
  'PT400', 'invalid_amount', 'zero is not an amount');
select throws_ok($$select public.create_transaction((select alice from ids), 'credit', -5, 'RWF')$$,
  'PT400', 'invalid_amount', 'negative amounts are refused');
select throws_ok($$select public.create_transaction((select alice from ids), 'credit', null, 'RWF')$$,
  'PT400', 'invalid_amount', 'an amount is required');
select throws_ok($$select public.create_transaction((select alice from ids), 'credit', 100.5, 'RWF')$$,
  'PT400', 'invalid_amount_precision', 'RWF has no minor unit');
select throws_ok($$select public.create_transaction((select alice from ids), 'credit', 10.005, 'USD')$$,
  'PT400', 'invalid_amount_precision', 'USD has two decimals');
select is((public.create_transaction((select alice from ids), 'credit', 10.01, 'USD')).amount::numeric, 10.01,
  'two decimals are fine for USD');
select throws_ok($$select public.create_transaction((select alice from ids), 'credit', 1, 'rwf')$$,
  'PT400', 'invalid_currency', 'currency codes are upper-case ISO 4217');
select throws_ok($$select public.create_transaction((select alice from ids), 'credit', 1, 'XYZ')$$,
  'PT400', 'invalid_currency', 'unknown currencies are refused');
select throws_ok($$select public.create_transaction((select alice from ids), 'gift', 1, 'RWF')$$,
  'PT400', 'invalid_type', 'unknown types are refused');
select throws_ok($$select public.create_transaction(null, 'credit', 1, 'RWF')$$,
  'PT400', 'invalid_user', 'a user is required');
select throws_ok($$select public.create_transaction((select alice from ids), 'transfer', 1, 'RWF')$$,
  'PT400', 'destination_required', 'a transfer needs a destination');
select throws_ok($$select public.create_transaction((select alice from ids), 'credit', 1, 'RWF',
  p_destination_user_id := (select bob from ids))$$,
  'PT400', 'unexpected_destination', 'only transfers have a destination');
select throws_ok($$select public.create_transaction((select alice from ids), 'transfer', 1, 'RWF',
  p_destination_user_id := (select alice from ids), p_idempotency_key := 'refused-self')$$,
  'PT400', 'self_transfer', 'no transfers to oneself');
select throws_ok($$select public.create_transaction((select alice from ids), 'credit', 1, 'RWF',
  p_metadata := '[1]'::jsonb, p_idempotency_key := 'refused-metadata')$$,
  'PT400', 'invalid_metadata', 'metadata must be an object');
select throws_ok($$select public.create_transaction(gen_random_uuid(), 'credit', 1, 'RWF',
  p_idempotency_key := 'refused-user')$$,
  'PT404', 'user_not_found', 'credits go to existing users only');
select throws_ok($$select public.create_transaction((select alice from ids), 'credit', 1, 'RWF',
  p_category := repeat('c', 65), p_idempotency_key := 'refused-category')$$,
  'PT400', 'invalid_input', 'text lengths are checked');
select throws_ok($$select public.create_transaction((select alice from ids), 'credit', 1, 'RWF',
  p_created_at := '9999-12-31 23:59:59-01', p_idempotency_key := 'refused-year')$$,
  'PT400', 'invalid_created_at', 'a created_at past the year 9999 (UTC) is refused');
select throws_ok($$select public.create_transaction((select alice from ids), 'credit', 1, 'RWF',
  p_created_at := '0001-01-01 00:00:00+01', p_idempotency_key := 'refused-bc')$$,
  'PT400', 'invalid_created_at', 'so is one before the year 1000');
select throws_ok($$select public.create_transaction((select alice from ids), 'credit', 1, 'RWF',
  p_created_at := '-infinity', p_idempotency_key := 'refused-infinity')$$,
  'PT400', 'invalid_created_at', 'and an infinite one');
select is((select count(*) from public.transactions), (select txs + 1 from counts),
  'only the valid USD credit was written');
select is((select count(*) from public.transaction_idempotency_keys), (select keys from counts),
  'no refused call kept its idempotency key');
select throws_ok($$select * from public.list_transactions(p_limit := 1001)$$,
  'PT400', 'invalid_limit', 'a page holds at most 1000 transactions');

-- idempotency ----------------------------------------------------------------
create temp table idem as
select (public.create_transaction((select carol from ids), 'credit', 500, 'RWF', 'idem-1',
  p_metadata := '{"a": 1}')).id as first_id;
select is((public.create_transaction((select carol from ids), 'credit', 500.0, 'RWF', 'idem-1',
  p_metadata := '{"a": 1}')).id, (select first_id from idem),
  'the same key with the same parameters returns the original');
select throws_ok($$select public.create_transaction((select carol from ids), 'credit', 501, 'RWF', 'idem-1',
  p_metadata := '{"a": 1}')$$, 'PT409', 'idempotency_key_reused', 'the same key with another amount is a 409');
select throws_ok($$select public.create_transaction((select carol from ids), 'credit', 500, 'RWF', 'idem-1',
  p_metadata := '{"a": 2}')$$, 'PT409', 'idempotency_key_reused', 'the same key with other metadata is a 409');
select is((select count(*)::int from public.transactions where user_id = (select carol from ids)), 1,
  'the conflicts wrote nothing');
-- the same instant from a session in another time zone is the same request
set local timezone = 'UTC';
create temp table idem_tz as
select (public.create_transaction((select carol from ids), 'credit', 5, 'RWF', 'idem-tz',
  p_created_at := '2026-11-01 10:00:00+00')).id as first_id;
set local timezone = 'Africa/Kigali';
select is((public.create_transaction((select carol from ids), 'credit', 5, 'RWF', 'idem-tz',
  p_created_at := '2026-11-01 12:00:00+02')).id, (select first_id from idem_tz),
  'a replay in another time zone returns the original');
select throws_ok($$select public.create_transaction((select carol from ids), 'credit', 5, 'RWF', 'idem-tz',
  p_created_at := '2026-11-01 10:00:00+02')$$, 'PT409', 'idempotency_key_reused',
  'another instant is another request');
reset timezone;
select isnt((public.create_transaction((select bob from ids), 'credit', 7, 'RWF', 'idem-1')).id,
  (select first_id from idem), 'keys are scoped per user');

-- purge: keys live at least 24 hours
select tests.clear_authentication();
update public.transaction_idempotency_keys set created_at = now() - interval '25 hours'
where idempotency_key = 'idem-1' and user_id = (select carol from ids);
select tests.authenticate_as_service_role();
select is(public.purge_transaction_idempotency_keys(interval '1 minute'), 1::bigint,
  'purge removes keys older than 24 hours, never younger ones');
select ok(exists (select from public.transaction_idempotency_keys where idempotency_key = 'idem-1'
                  and user_id = (select bob from ids)), 'younger keys are kept');
select isnt((public.create_transaction((select carol from ids), 'credit', 501, 'RWF', 'idem-1')).id,
  (select first_id from idem), 'a purged key can be used again');

-- the state machine: every pair of statuses -----------------------------------
-- A credit of 10 to bob driven to p_status through the allowed path.
create function pg_temp.tx_in(p_status text) returns uuid language plpgsql as $$
declare v_id uuid := (public.create_transaction((select bob from ids), 'credit', 10, 'RWF')).id;
begin
  if p_status in ('processing', 'completed', 'failed', 'reversed') then
    perform public.update_transaction_status(v_id, 'processing');
  end if;
  if p_status in ('completed', 'reversed') then
    perform public.update_transaction_status(v_id, 'completed');
  end if;
  if p_status = 'failed' then
    perform public.update_transaction_status(v_id, 'failed');
  end if;
  if p_status = 'cancelled' then
    perform public.update_transaction_status(v_id, 'cancelled');
  end if;
  if p_status = 'reversed' then
    perform public.update_transaction_status(v_id, 'reversed');
  end if;
  return v_id;
end $$;

create temp table pairs as
with s(status, ord) as (
  values ('pending', 1), ('processing', 2), ('completed', 3), ('failed', 4), ('cancelled', 5), ('reversed', 6)
)
select f.status as from_status, t.status as to_status, f.ord * 10 + t.ord as ord,
       (f.status, t.status) in (('pending', 'processing'), ('pending', 'cancelled'),
         ('processing', 'completed'), ('processing', 'failed'), ('processing', 'cancelled'),
         ('completed', 'reversed')) as allowed,
       pg_temp.tx_in(f.status) as id
from s f cross join s t;
alter table pairs add column events_before int;
update pairs p set events_before = (select count(*) from public.transaction_events e where e.transaction_id = p.id);

select case when allowed
  then lives_ok(format('select public.update_transaction_status(%L, %L)', id, to_status),
                format('%s -> %s is allowed', from_status, to_status))
  else throws_ok(format('select public.update_transaction_status(%L, %L)', id, to_status),
                 'PT409', 'illegal_transition', format('%s -> %s is a 409', from_status, to_status))
  end
from pairs order by ord;

select is((select count(*)::int from pairs p join public.transactions t on t.id = p.id
           where t.status = case when p.allowed then p.to_status else p.from_status end), 36,
  'allowed transitions took effect; refused ones changed nothing');
select is((select count(*)::int from pairs p
           where (select count(*) from public.transaction_events e where e.transaction_id = p.id)
                 <> p.events_before + p.allowed::int), 0,
  'each transition appends exactly one event; refused ones append none');
select is((select count(*)::int from pairs p join public.transactions t on t.id = p.id
           where p.allowed and (
             (p.to_status = 'processing' and t.processing_at is null)
             or (p.to_status = 'completed' and t.completed_at is null)
             or (p.to_status = 'failed' and t.failed_at is null)
             or (p.to_status = 'cancelled' and t.cancelled_at is null)
             or (p.to_status = 'reversed' and t.reversed_at is null))), 0,
  'every terminal state sets its timestamp');
select ok(pg_temp.ledger_ok(), 'the ledger balances after every state machine path');
select throws_ok($$select public.update_transaction_status(gen_random_uuid(), 'processing')$$,
  'PT404', 'not_found', 'unknown transactions are a 404');
select throws_ok($$select public.update_transaction_status((select id from pairs limit 1), 'done')$$,
  'PT400', 'invalid_status', 'unknown statuses are a 400');

-- holds, settlement, release, reversal ----------------------------------------
select pg_temp.fund((select alice from ids), 1000);
select is((pg_temp.wallet((select alice from ids))).balance, 1000::numeric, 'a completed credit lands');

create temp table pay as
select (public.create_transaction((select alice from ids), 'payment', 300, 'RWF', 'pay-1')).id as id;
select is(pg_temp.funds((select alice from ids)), '1000/300', 'an outgoing payment holds funds at creation');
select is((select count(*)::int from public.ledger_entries where transaction_id = (select id from pay)), 0,
  'a hold writes no ledger entries');

create temp table before_overdraft as
select (select count(*) from public.transactions) as txs, (select count(*) from public.transaction_events) as evs,
       (pg_temp.wallet((select alice from ids))).held as held;
select throws_ok($$select public.create_transaction((select alice from ids), 'payment', 701, 'RWF', 'pay-2')$$,
  'PT409', 'insufficient_funds', 'spending more than available is insufficient_funds');
select is(format('%s %s %s', (select count(*) from public.transactions),
                  (select count(*) from public.transaction_events), pg_temp.funds((select alice from ids))),
  (select format('%s %s %s', txs, evs, '1000/' || held) from before_overdraft),
  'an overdraft changes nothing');
select ok(not exists (select from public.transaction_idempotency_keys where idempotency_key = 'pay-2'),
  'a failed create stores no idempotency key');

select public.update_transaction_status((select id from pay), 'processing');
select public.update_transaction_status((select id from pay), 'completed');
select is(pg_temp.funds((select alice from ids)), '700/0', 'completion settles the hold');
select is((select array_agg(amount::numeric order by amount) from public.ledger_entries where transaction_id = (select id from pay)),
  array[-300, 300]::numeric[], 'settlement writes two balanced entries');

create temp table fee as
select (public.create_transaction((select alice from ids), 'fee', 50, 'RWF')).id as id;
select public.update_transaction_status((select id from fee), 'processing');
select public.update_transaction_status((select id from fee), 'failed', p_error_code := 'provider_down',
  p_error_message := 'the provider timed out');
select is(pg_temp.funds((select alice from ids)), '700/0', 'failure releases the hold');
select is((select error_code || ':' || error_message from public.transactions where id = (select id from fee)),
  'provider_down:the provider timed out', 'failures keep their error code and message');

create temp table xfer as
select (public.create_transaction((select alice from ids), 'transfer', 200, 'RWF',
  p_destination_user_id := (select bob from ids))).id as id;
select public.update_transaction_status((select id from xfer), 'cancelled', p_reason := 'user changed mind');
select is((pg_temp.wallet((select alice from ids))).held, 0::numeric, 'cancellation releases the hold');
select is((select reason from public.transaction_events where transaction_id = (select id from xfer)
           and new_status = 'cancelled'), 'user changed mind', 'events keep the reason');

create temp table direct as
select * from public.transfer_funds(p_amount := 250, p_currency := 'RWF', p_to_phone := '+250788000002',
  p_from_user_id := (select alice from ids));
select is((select status from direct), 'completed', 'transfer_funds settles at once');
select is((select created_by from direct), 'service_role', 'a service-role transfer records the service role');
select is((select destination_user_id from direct), (select bob from ids), 'recipients are found by phone');
select is((pg_temp.wallet((select alice from ids))).balance, 450::numeric, 'the sender paid');
select public.update_transaction_status((select id from direct), 'reversed', p_reason := 'dispute');
select is(((pg_temp.wallet((select alice from ids))).balance), 700::numeric, 'a reversal pays back');
select is((select count(*)::int from public.ledger_entries where transaction_id = (select id from direct)
           and entry_type = 'reversal'), 2, 'a reversal writes compensating entries');

-- a reversal that would overdraw the payer back is refused and changes nothing
create temp table rev as select (public.transfer_funds(p_amount := 100, p_currency := 'RWF',
  p_to_user_id := (select carol from ids), p_from_user_id := (select alice from ids))).id as id;
select public.create_transaction((select carol from ids), 'payment', 100, 'RWF');
select throws_ok($$select public.update_transaction_status((select id from rev), 'reversed')$$,
  'PT409', 'insufficient_funds', 'reversing money the recipient has reserved is insufficient_funds');
select is((select status from public.transactions where id = (select id from rev)), 'completed',
  'the refused reversal changed nothing');
select throws_ok($$select public.transfer_funds(p_amount := 1, p_currency := 'RWF',
  p_to_phone := '+250700000000', p_from_user_id := (select alice from ids))$$,
  'PT404', 'recipient_not_found', 'unknown phones are a 404');
select throws_ok($$select public.transfer_funds(p_amount := 1, p_currency := 'RWF',
  p_to_phone := '+250788000002', p_to_user_id := (select bob from ids), p_from_user_id := (select alice from ids))$$,
  'PT400', 'invalid_recipient', 'one recipient only');
-- one number stored both ways (with and without +) by two users: no guess
select tests.create_user(p_phone := '250788999991');
select tests.create_user(p_phone := '+250788999991');
select throws_ok($$select public.transfer_funds(p_amount := 1, p_currency := 'RWF',
  p_to_phone := '+250788999991', p_from_user_id := (select alice from ids))$$,
  'PT409', 'recipient_ambiguous', 'a phone two users have is a 409, not one of them');
-- a deleted account receives nothing, by id or by phone
select tests.clear_authentication();
create temp table gone as select tests.create_user(p_phone := '250788999992') as id;
update auth.users set deleted_at = now() where id = (select id from gone);
grant select on gone to service_role;
select tests.authenticate_as_service_role();
select throws_ok($$select public.transfer_funds(p_amount := 1, p_currency := 'RWF',
  p_to_user_id := (select id from gone), p_from_user_id := (select alice from ids))$$,
  'PT404', 'recipient_not_found', 'a deleted user cannot be paid by id');
select throws_ok($$select public.transfer_funds(p_amount := 1, p_currency := 'RWF',
  p_to_phone := '+250788999992', p_from_user_id := (select alice from ids))$$,
  'PT404', 'recipient_not_found', 'nor by phone');
select tests.clear_authentication();
select tests.create_user(p_phone := '250788999993');
update auth.users set phone_confirmed_at = null where phone = '250788999993';
select tests.authenticate_as_service_role();
select throws_ok($$select public.transfer_funds(p_amount := 1, p_currency := 'RWF',
  p_to_phone := '+250788999993', p_from_user_id := (select alice from ids))$$,
  'PT404', 'recipient_not_found', 'nor a number its holder has not confirmed');
select throws_ok($$select public.create_transaction((select alice from ids), 'transfer', 1, 'RWF',
  p_destination_user_id := (select id from gone))$$,
  'PT404', 'recipient_not_found', 'nor by a pending transfer (create_transaction)');
select throws_ok($$select public.create_transaction((select alice from ids), 'transfer', 1, 'RWF',
  p_destination_user_id := gen_random_uuid())$$,
  'PT404', 'recipient_not_found', 'nor can a user who never existed');
select throws_ok($$select public.create_transaction((select id from gone), 'credit', 1, 'RWF')$$,
  'PT404', 'user_not_found', 'nor is a deleted user credited');
select is((select count(*)::int from public.transactions where user_id = (select id from gone)), 0,
  'and nothing was written for them');

-- Nor is one paid by a transaction that waited while the account was deleted:
-- completing it is refused, and failing it releases the sender's hold.
select tests.clear_authentication();
create temp table leaving as select tests.create_user() as id;
grant select on leaving to service_role;
create temp table held as
  select null::uuid as transfer, null::uuid as credit, w.held as alice_held
  from public.wallets w where w.user_id = (select alice from ids) and w.currency = 'RWF';
grant select, update on held to service_role;
select tests.authenticate_as_service_role();
update held set
  transfer = (public.create_transaction((select alice from ids), 'transfer', 3, 'RWF',
                p_destination_user_id := (select id from leaving))).id,
  credit = (public.create_transaction((select id from leaving), 'credit', 4, 'RWF')).id;
select public.update_transaction_status((select transfer from held), 'processing');
select public.update_transaction_status((select credit from held), 'processing');
select tests.delete_user((select id from leaving));
select throws_ok($$select public.update_transaction_status((select transfer from held), 'completed')$$,
  'PT409', 'recipient_deleted', 'a transfer to an account deleted while it waited is not completed');
select throws_ok($$select public.update_transaction_status((select credit from held), 'completed')$$,
  'PT409', 'recipient_deleted', 'nor a credit to it');
select is((select coalesce(sum(w.balance), 0) from public.wallets w
           where w.user_id = (select id from leaving)), 0::numeric,
  'the deleted account received nothing');
select is((select status from public.transactions where id = (select transfer from held)),
  'processing', 'the refused completion changed nothing');
select is((select w.held from public.wallets w
           where w.user_id = (select alice from ids) and w.currency = 'RWF'),
  (select alice_held + 3 from held), 'the sender''s hold stays while it waits');
select lives_ok($$select public.update_transaction_status((select transfer from held), 'failed')$$,
  'the transfer can be failed instead');
select is((select w.held from public.wallets w
           where w.user_id = (select alice from ids) and w.currency = 'RWF'),
  (select alice_held from held), 'which releases the sender''s hold');
-- Nor is a deleted sender paid back by a reversal.
select tests.clear_authentication();
create temp table reverser as select tests.create_user() as id, null::uuid as payment;
grant select, update on reverser to service_role;
select tests.authenticate_as_service_role();
select tests.complete_transaction(
  (public.create_transaction((select id from reverser), 'credit', 50, 'RWF')).id);
update reverser set payment =
  (public.create_transaction((select id from reverser), 'payment', 20, 'RWF')).id;
select tests.complete_transaction((select payment from reverser));
select tests.delete_user((select id from reverser));
select throws_ok($$select public.update_transaction_status((select payment from reverser), 'reversed')$$,
  'PT409', 'recipient_deleted', 'a payment of a deleted account is not reversed to it');
select is((select w.balance from public.wallets w where w.user_id = (select id from reverser)),
  30::numeric, 'and its balance is unchanged');

-- A retry replays the stored transfer whatever has happened to the recipient since.
select tests.clear_authentication();
create temp table payee as
  select tests.create_user(p_phone := '250788999994') as leaves,
         tests.create_user(p_phone := '250788999995') as moves,
         tests.create_user() as heir;
grant select on payee to service_role;
select tests.authenticate_as_service_role();
create temp table paid as
  select (public.transfer_funds(p_amount := 1, p_currency := 'RWF', p_to_phone := '+250788999994',
            p_from_user_id := (select alice from ids), p_idempotency_key := 'retry-1')).id as left_one,
         (public.transfer_funds(p_amount := 1, p_currency := 'RWF', p_to_phone := '250788999995',
            p_from_user_id := (select alice from ids), p_idempotency_key := 'retry-2')).id as moved_one;
select tests.clear_authentication();
update auth.users set deleted_at = now() where id = (select leaves from payee);
update auth.users set phone = null where id = (select moves from payee);
update auth.users set phone = '250788999995' where id = (select heir from payee);
select tests.authenticate_as_service_role();
select is((public.transfer_funds(p_amount := 1, p_currency := 'RWF', p_to_phone := '+250788999994',
  p_from_user_id := (select alice from ids), p_idempotency_key := 'retry-1')).id,
  (select left_one from paid), 'a retry after the recipient left replays the transfer');
select is((public.transfer_funds(p_amount := 1, p_currency := 'RWF', p_to_phone := '+250788999995',
  p_from_user_id := (select alice from ids), p_idempotency_key := 'retry-2')).id,
  (select moved_one from paid), 'a retry after the phone passed to someone else replays it too');
select is((select count(*)::int from public.transactions
           where destination_user_id = (select heir from payee)), 0,
  'and the phone''s new holder is paid nothing');
select throws_ok($$select public.transfer_funds(p_amount := 2, p_currency := 'RWF',
  p_to_phone := '+250788999995', p_from_user_id := (select alice from ids),
  p_idempotency_key := 'retry-2')$$, 'PT409', 'idempotency_key_reused',
  'a retry with another amount is still refused');
-- the phone passes on to the sender: the retry still replays, a new transfer is to oneself
select tests.clear_authentication();
update auth.users set phone = null where id = (select heir from payee);
update auth.users set phone = '250788999995', phone_confirmed_at = now()
where id = (select alice from ids);
select tests.authenticate_as_service_role();
select is((public.transfer_funds(p_amount := 1, p_currency := 'RWF', p_to_phone := '+250788999995',
  p_from_user_id := (select alice from ids), p_idempotency_key := 'retry-2')).id,
  (select moved_one from paid), 'a retry after the phone passed to the sender replays too');
select throws_ok($$select public.transfer_funds(p_amount := 1, p_currency := 'RWF',
  p_to_phone := '+250788999995', p_from_user_id := (select alice from ids),
  p_idempotency_key := 'retry-4')$$, 'PT400', 'self_transfer',
  'while a new transfer to that phone is one to oneself');
select tests.clear_authentication();
update auth.users set phone = null, phone_confirmed_at = null where id = (select alice from ids);
select tests.authenticate_as_service_role();
select public.create_transaction((select alice from ids), 'debit', 1, 'RWF', 'retry-3');
select throws_ok($$select public.transfer_funds(p_amount := 1, p_currency := 'RWF',
  p_to_user_id := (select bob from ids), p_from_user_id := (select alice from ids),
  p_idempotency_key := 'retry-3')$$, 'PT409', 'idempotency_key_reused',
  'a key used for a debit is refused for a transfer');

select ok(pg_temp.ledger_ok(), 'ledger sums to zero per currency; balances and holds equal their entries');

-- the ledger's own guards (as the owner: constraints hold even for it)
select tests.clear_authentication();
select throws_ok($$insert into public.ledger_entries (transaction_id, wallet_id, currency, amount, entry_type)
  values (gen_random_uuid(), (pg_temp.wallet((select alice from ids))).id, 'RWF', 5, 'settlement')$$,
  '23514', null, 'an unbalanced entry is refused even for the owner');
select throws_ok($$update public.ledger_entries set amount = amount * 2$$, '42501', null,
  'ledger entries are append-only');
select throws_ok($$update public.wallets set held = balance + 1 where user_id = (select alice from ids)$$,
  '23514', null, 'a user wallet never holds more than its balance');
select throws_ok($$update public.wallets set balance = -1, held = 0 where user_id = (select alice from ids)$$,
  '23514', null, 'a user wallet never goes negative');
-- single-column rules are domains: they hold for the owner too
select throws_ok($$update public.transactions set status = 'settled' where user_id = (select alice from ids)$$,
  '23514', 'value for domain private.transaction_status violates check constraint "transaction_status_check"',
  'a transaction''s status is one of the six');
select throws_ok($$update public.transactions set type = 'gift' where user_id = (select alice from ids)$$,
  '23514', 'value for domain private.transaction_type violates check constraint "transaction_type_check"',
  'a transaction''s type is one of the seven');
select throws_ok($$update public.transactions set amount = 0 where user_id = (select alice from ids)$$,
  '23514', 'value for domain private.positive_amount violates check constraint "positive_amount_check"',
  'a transaction''s amount is positive');
select throws_ok($$update public.wallets set kind = 'shared' where user_id = (select alice from ids)$$,
  '23514', 'value for domain private.wallet_kind violates check constraint "wallet_kind_check"',
  'a wallet is a user''s or the system''s');
select throws_ok($$insert into public.ledger_entries (transaction_id, wallet_id, currency, amount, entry_type)
  values (gen_random_uuid(), (pg_temp.wallet((select alice from ids))).id, 'RWF', 0, 'settlement')$$,
  '23514', 'value for domain private.ledger_amount violates check constraint "ledger_amount_check"',
  'a ledger entry moves money');

-- partitions: the last second of a month, two years ahead ---------------------
create temp table edges as
select (public.create_transaction((select alice from ids), 'credit', 1, 'RWF',
          p_created_at := date_trunc('month', now()) + interval '1 month' - interval '1 second')).id as month_end,
       (public.create_transaction((select alice from ids), 'credit', 2, 'RWF',
          p_created_at := now() + interval '2 years')).id as far;
grant select on edges to authenticated, service_role;
select is((select tableoid::regclass::text from public.transactions where id = (select month_end from edges)),
  'transactions_' || to_char(now(), 'YYYY_MM'), 'the last second of a month lands in that month');
select is((select tableoid::regclass::text from public.transactions where id = (select far from edges)),
  'transactions_default', 'two years ahead lands in DEFAULT');
select is((select amount::numeric from public.get_transaction((select month_end from edges))), 1::numeric,
  'the month-end transaction is found by id');
select is((select amount::numeric from public.get_transaction((select far from edges))), 2::numeric,
  'the far-future transaction is found by id');
select is((public.update_transaction_status((select far from edges), 'processing')).status, 'processing',
  'the far-future transaction is updated by id');
select ok(exists (select from public.maintain_partitions()
                  where partition_name like '%transactions_' || to_char(now() + interval '2 years', 'YYYY_MM')),
  'maintenance gives the far-future month its partition');
select is((select t.tableoid::regclass::text || ' ' || g.status
            from public.get_transaction((select far from edges)) g
            join public.transactions t on t.id = g.id and t.created_at = g.created_at),
  'transactions_' || to_char(now() + interval '2 years', 'YYYY_MM') || ' processing',
  'after maintenance it is still found by id, in its own partition');

-- RLS matrix ------------------------------------------------------------------
grant select on pairs, pay, edges, direct, xfer to authenticated, anon, service_role;
-- alice: own rows only, and transfers she received
select count(*) as alice_visible from public.transactions
where user_id = (select alice from ids) or destination_user_id = (select alice from ids) \gset
select count(*) as alice_events from public.transaction_events e
where exists (select from public.transactions t where t.id = e.transaction_id
              and (select alice from ids) in (t.user_id, t.destination_user_id)) \gset
select tests.authenticate_as((select alice from ids));
select is((select count(*)::int from public.transactions where user_id <> (select alice from ids)
           and destination_user_id is distinct from (select alice from ids)), 0,
  'alice sees no one else''s transactions');
select is((select count(*) from public.transactions), :alice_visible::bigint,
  'alice sees all of her own transactions');
select is((select count(*)::int from public.get_transaction((select id from pairs limit 1))), 0,
  'alice cannot read bob''s transaction by id');
select throws_ok($$select * from public.list_transaction_events((select id from pairs limit 1))$$,
  'PT404', 'not_found', 'alice cannot read bob''s events');
select is((select count(*)::int from public.list_transactions(p_type := 'credit', p_user_id := (select bob from ids))), 0,
  'alice cannot list bob''s credits');
select is((select count(*) from public.transaction_events), :alice_events::bigint,
  'alice sees exactly the events of her transactions and of transfers she received');
select is((select array_agg(distinct user_id) from public.get_balances()), array[(select alice from ids)],
  'alice sees only her own balances');
select is((select count(*)::int from public.wallets where user_id is distinct from (select alice from ids)), 0,
  'alice sees no other wallet');
select is((select count(*)::int from public.recent_transactions where user_id <> (select alice from ids)
           and destination_user_id is distinct from (select alice from ids)), 0,
  'recent_transactions applies RLS');
select throws_ok($$select public.create_transaction((select alice from ids), 'credit', 100, 'RWF')$$,
  'PT403', 'type_not_allowed', 'alice cannot credit herself');
select throws_ok($$select public.create_transaction((select alice from ids), 'refund', 100, 'RWF')$$,
  'PT403', 'type_not_allowed', 'alice cannot refund herself');
select throws_ok($$select public.create_transaction((select alice from ids), 'commission', 100, 'RWF')$$,
  'PT403', 'type_not_allowed', 'alice cannot pay herself a commission');
select throws_ok($$select public.create_transaction((select bob from ids), 'payment', 1, 'RWF')$$,
  'PT403', 'forbidden', 'alice cannot spend bob''s money');
select throws_ok($$select public.create_transaction((select alice from ids), 'payment', 1, 'RWF',
  p_created_at := now() - interval '1 year')$$, 'PT403', 'forbidden', 'alice cannot backdate');
select throws_ok($$select public.transfer_funds(p_amount := 1, p_currency := 'RWF',
  p_to_user_id := (select alice from ids), p_from_user_id := (select bob from ids))$$,
  'PT403', 'forbidden', 'alice cannot transfer bob''s money');
select throws_ok($$select public.update_transaction_status((select id from pay), 'reversed')$$,
  '42501', null, 'alice cannot change statuses (no reversals)');
select throws_ok($$insert into public.transactions (reference, user_id, type, amount, currency,
  source_wallet_id, destination_wallet_id) values ('TX-260101-000000000000', (select alice from ids), 'credit',
  1, 'RWF', gen_random_uuid(), gen_random_uuid())$$, '42501', null, 'alice cannot insert transactions directly');
select throws_ok($$update public.transactions set amount = 1$$, '42501', null,
  'alice cannot update transactions');
select throws_ok($$update public.wallets set balance = 1e9$$, '42501', null, 'alice cannot update wallets');
select throws_ok($$select count(*) from public.ledger_entries$$, '42501', null,
  'alice cannot read the ledger');
select throws_ok($$select count(*) from public.transaction_idempotency_keys$$, '42501', null,
  'alice cannot read idempotency keys');
select throws_ok($$select count(*) from public.transaction_references$$, '42501', null,
  'alice cannot read the reference table');
select throws_ok($$select count(*) from public.transaction_summary$$, '42501', null,
  'the operators'' summary is not for users');
select throws_ok(format('select count(*) from public.%I', 'transactions_' || to_char(now(), 'YYYY_MM')),
  '42501', null, 'alice cannot read a partition by name, around RLS');
select throws_ok($$select count(*) from public.transactions_default$$, '42501', null,
  'alice cannot read the DEFAULT partition by name');
select throws_ok(format('select count(*) from public.%I', 'transaction_events_' || to_char(now(), 'YYYY_MM')),
  '42501', null, 'alice cannot read an events partition by name');
select throws_ok($$select public.purge_transaction_idempotency_keys()$$, '42501', null,
  'alice cannot purge keys');
select is((public.create_transaction((select alice from ids), 'payment', 10, 'RWF', 'alice-pay')).status,
  'pending', 'alice can pay from her own wallet');
select is((select array[t.user_id::text, t.created_by]
           from public.transfer_funds(p_amount := 10, p_currency := 'RWF',
                                      p_to_user_id := (select bob from ids)) t),
  array[(select alice from ids)::text, (select alice from ids)::text],
  'alice can transfer her own money, and the transfer records her as its creator');
select throws_ok($$select public.transfer_funds(p_amount := 100000, p_currency := 'RWF',
  p_to_user_id := (select bob from ids))$$, 'PT409', 'insufficient_funds', 'alice cannot overdraw');
select is((select created_by from public.transactions where idempotency_key = 'alice-pay'),
  (select alice from ids)::text, 'transactions record the creating user');

-- bob sees the transfer he received, not alice's other rows
select tests.authenticate_as((select bob from ids));
select ok(exists (select from public.transactions where user_id = (select alice from ids)
                  and destination_user_id = (select bob from ids)), 'bob sees transfers he received');
select is((select count(*)::int from public.transactions where user_id = (select alice from ids)
           and destination_user_id is distinct from (select bob from ids)), 0,
  'bob sees none of alice''s other transactions');
select is((select count(*)::int from public.get_transaction((select month_end from edges))), 0,
  'bob cannot read alice''s transaction by id');
select is((select array_agg(new_status::text) from public.list_transaction_events((select id from direct))),
  array['reversed'], 'bob reads the history of a transfer he received');
select is((select array_agg(new_status::text) from public.list_transaction_events((select id from xfer))),
  array['cancelled'], 'and of one cancelled before it reached him');
select is((select count(*)::int from public.get_balances((select alice from ids))), 0,
  'bob cannot read alice''s balance');

-- anon: nothing
select tests.authenticate_as_anon();
select throws_ok($$select count(*) from public.transactions$$, '42501', null, 'anon cannot read transactions');
select throws_ok($$select count(*) from public.wallets$$, '42501', null, 'anon cannot read wallets');
select throws_ok($$select count(*) from public.transaction_events$$, '42501', null, 'anon cannot read events');
select throws_ok($$select count(*) from public.recent_transactions$$, '42501', null, 'anon cannot read recent transactions');
select throws_ok($$select public.create_transaction(gen_random_uuid(), 'payment', 1, 'RWF')$$, '42501', null,
  'anon cannot create transactions');
select throws_ok($$select public.transfer_funds(1, 'RWF', gen_random_uuid())$$, '42501', null,
  'anon cannot transfer');
select throws_ok($$select * from public.get_balances()$$, '42501', null, 'anon cannot read balances');
select throws_ok($$select * from public.get_transaction(gen_random_uuid())$$, '42501', null,
  'anon cannot read by id');
select throws_ok(format('select count(*) from public.%I', 'transactions_' || to_char(now(), 'YYYY_MM')),
  '42501', null, 'anon cannot read a partition by name');

-- a user token claimed through the API, without the role switch: still a user
select tests.clear_authentication();
select set_config('request.jwt.claims', json_build_object('role', 'authenticated', 'sub', (select carol from ids))::text, true);
select throws_ok($$select public.create_transaction((select carol from ids), 'credit', 1, 'RWF')$$,
  'PT403', 'type_not_allowed', 'claims alone make a caller a user');
select set_config('request.jwt.claims', '{"role": "anon"}', true);
select throws_ok($$select public.create_transaction((select carol from ids), 'credit', 1, 'RWF')$$,
  'PT401', 'login_required', 'anon claims are a 401 even for the owner role');

-- service role: everything
select tests.authenticate_as_service_role();
select is((select count(distinct user_id)::int from public.transactions), 5, 'service_role reads every transaction');
select ok((select count(*) from public.transaction_summary) > 0, 'service_role reads the summary');
select ok((select count(*) from public.ledger_entries) > 0, 'service_role reads the ledger');
select is((public.create_transaction((select carol from ids), 'refund', 5, 'RWF')).type, 'refund',
  'service_role creates refunds');
select is((public.create_transaction((select carol from ids), 'commission', 5, 'RWF')).type, 'commission',
  'service_role creates commissions');
select throws_ok($$update public.transactions set amount = 1$$, '42501', null,
  'service_role changes transactions only through the functions');
select throws_ok($$update public.transactions_default set status = 'completed'$$, '42501', null,
  'service_role cannot write a partition by name either');
select throws_ok(format('update public.%I set status = ''completed''',
                        'transactions_' || to_char(now(), 'YYYY_MM')), '42501', null,
  'nor the current month''s partition');

select tests.clear_authentication();
select ok(pg_temp.ledger_ok(), 'the ledger still balances at the end');

-- The service role's lists by user read that user's rows by index, not every
-- user's: 20,000 users with a wallet and a payment method each, and calls made
-- the way rpc makes them (the user id a literal).
insert into auth.users (id) select gen_random_uuid() from generate_series(1, 20000);
insert into public.wallets (kind, user_id, currency)
select 'user', u.id, 'RWF' from auth.users u
where not exists (select from public.wallets w where w.user_id = u.id);
insert into public.payment_methods (user_id, type) select id, 'cash' from auth.users;
create temp table scans as select relname, seq_scan from pg_stat_xact_user_tables
  where relname in ('wallets', 'payment_methods');
create temp table listed_user as
  select u.id,
         (select count(*)::int from public.wallets w where w.user_id = u.id and w.kind = 'user')
           as wallets,
         (select count(*)::int from public.payment_methods m
          where m.user_id = u.id and m.deleted_at is null) as methods
  from auth.users u order by u.id limit 1;
grant select on listed_user to service_role;
create function pg_temp.listed(p_function text) returns integer
language plpgsql as $$
declare
  v_count integer;
begin
  execute format('select count(*) from public.%I(%L::uuid)', p_function,
    (select id from listed_user)) into v_count;
  return v_count;
end;
$$;
select tests.authenticate_as_service_role();
select is(pg_temp.listed('get_balances'), (select wallets from listed_user),
  'the service role lists a user''s balances');
select is(pg_temp.listed('list_payment_methods'), (select methods from listed_user),
  'and their payment methods');
select tests.clear_authentication();
select is((select sum(t.seq_scan - s.seq_scan)::int from pg_stat_xact_user_tables t
           join scans s using (relname)), 0, 'by index, without reading every user''s rows');

select * from finish();
rollback;
